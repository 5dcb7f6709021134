"""`megaseg eval-rm --ckpt DIR --data FILE [--out FILE] [--details FILE]`: how well a reward model ranks a
preference set.

Metrics (over the pairs of the file): accuracy = fraction of pairs with e(x, y_chosen) > e(x, y_rejected) strictly
(ties count as wrong) with its Wilson 95% score interval, the mean margin e(chosen) - e(rejected), mean chosen /
rejected sequence reward, and the segment statistics of the segmentation scored with (segments per response, mean
segment length in tokens).

Subsets: when the records carry a ``subset`` field (RewardBench: ``prompt``, ``chosen``, ``rejected``, ``subset``,
the flat format) or a ``category`` field, ``subsets`` gives the accuracy, its Wilson interval and the pair count of
each (in order of first appearance). RewardBench's section scores (Chat, Chat Hard, Safety, Reasoning) are weighted
averages of these and are left to its own tooling.

``--details FILE`` writes one JSON line per pair (``pair_details``): id, source, subset, the prompt text, and per side
the response text, e(x, y), and every segment with its text, token span, token count, location p, raw reward and
(when the reward model's directory holds a matching normalizer.json) normalized reward. `megaseg show-segments`
renders the same records.

Data: ``data.eval_path`` (``--data``); without it, the reward model's own evaluation data (its data.eval_path, or the
data.eval_fraction held out of its training file, the same pairs the trainer validated on).

The last line of output is one JSON object with the metrics; ``--out`` also writes it to a file (atomically).
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from megaseg.atomic_io import write_text_atomic
from megaseg.config import MegasegConfig
from megaseg.data.encoding import EncodedPairs, TokenizedSequence
from megaseg.parallel.collectives import is_rank_zero
from megaseg.parallel.initialize import ParallelContext
from megaseg.scoring.inputs import (
    ScoredData,
    chat_renderer,
    encode_pairs_file,
    reward_model_config,
    score_encoded_pairs,
)


# Record fields naming a pair's subset, first found wins (RewardBench's `subset`, else a `category`).
SUBSET_FIELDS = ("subset", "category")
Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def evaluation_pairs(config: MegasegConfig) -> tuple[EncodedPairs, str, Optional[str]]:
    """(the encoded evaluation pairs, a description of where they came from, the file they were read from)."""
    data = config.data
    if data.eval_path is not None:
        return (encode_pairs_file(config, data.eval_path, data.eval_max_samples), str(data.eval_path),
                data.eval_path)
    if data.eval_fraction > 0 and data.train_path is not None:
        from megaseg.data.splits import load_preference_splits

        _, held_out = load_preference_splits(data, chat_renderer(config), config.seed)
        return (held_out, f"{data.train_path} (held-out fraction {data.eval_fraction}, seed {config.seed})",
                data.train_path)
    raise ValueError("no evaluation data: pass --data FILE (data.eval_path); the reward model's config names no "
                     "evaluation data either")


def record_subsets(path: str) -> dict[str, str]:
    """source ("file:line") -> the record's subset (``SUBSET_FIELDS``) for every record of ``path`` that has one;
    the sources are the ones the preference loader gives its pairs."""
    from megaseg.data.record_files import read_records
    from megaseg.data.resources import resolve_data_path

    subsets = {}
    for record in read_records(resolve_data_path(path)):
        if isinstance(record.value, dict):
            name = next((record.value[f] for f in SUBSET_FIELDS if record.value.get(f) is not None), None)
            if name is not None:
                subsets[record.source] = str(name)
    return subsets


def wilson_interval(num_correct: int, num_total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for the default z); (0, 1) for no trials."""
    if num_total == 0:
        return 0.0, 1.0
    phat = num_correct / num_total
    denominator = 1 + z * z / num_total
    centre = (phat + z * z / (2 * num_total)) / denominator
    half = z * math.sqrt(phat * (1 - phat) / num_total + z * z / (4 * num_total * num_total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def subset_accuracies(correct: np.ndarray, subsets: Sequence[Optional[str]]) -> dict[str, dict[str, Any]]:
    """subset -> accuracy, Wilson 95% interval and pair count; pairs without a subset are left out."""
    names = list(dict.fromkeys(name for name in subsets if name is not None))
    result = {}
    for name in names:
        mine = np.array([subset == name for subset in subsets])
        num_correct, num_pairs = int(correct[mine].sum()), int(mine.sum())
        result[name] = {"accuracy": num_correct / num_pairs, "accuracy_ci95": list(wilson_interval(num_correct,
                                                                                                num_pairs)),
                        "num_pairs": num_pairs}
    return result


def evaluation_metrics(scored: ScoredData, data_source: str,
                       subsets: Optional[Sequence[Optional[str]]] = None) -> dict[str, Any]:
    """The metrics dict; ``subsets``: each pair's subset name (or None), for the per-subset accuracies."""
    scores, config = scored.scores, scored.config
    chosen_stats = scored.segmented.statistics()
    margins = scores.margins()
    correct = margins > 0
    return {
        "accuracy": scores.accuracy(),
        "accuracy_ci95": list(wilson_interval(int(correct.sum()), len(correct))),
        "subsets": subset_accuracies(correct, subsets) if subsets is not None and any(subsets) else {},
        "mean_margin": float(np.mean(margins)),
        "num_pairs": scores.num_pairs,
        "num_ties": int(np.sum(margins == 0)),
        "chosen_reward_mean": float(np.mean(scores.chosen.sequence_rewards)),
        "rejected_reward_mean": float(np.mean(scores.rejected.sequence_rewards)),
        "segments_per_response": chosen_stats.segments_per_response,
        "mean_segment_length": chosen_stats.mean_segment_length,
        "chosen_segments_per_response": float(np.mean(scores.chosen.num_segments())),
        "rejected_segments_per_response": float(np.mean(scores.rejected.num_segments())),
        "segmentation": config.segmentation.mode,
        "entropy_cutoff": config.segmentation.entropy_cutoff if config.segmentation.mode == "entropy" else None,
        "ngram_size": config.segmentation.ngram_size if config.segmentation.mode == "ngram" else None,
        "aggregation": config.rm.aggregation,
        "reward_model": str(scored.rm_dir),
        "data": data_source,
        "skipped": scored.encoded.skipped.summary(),
    }


# --- per-pair details: every segment's text, span, p and reward ------------------------------------------------


def _matching_normalizer(config: MegasegConfig, rm_dir: Path) -> Any:
    """The reward model's normalizer file when it exists and was fitted to these scores (segmentation and
    aggregation), else None (with a warning when it exists but does not match)."""
    from megaseg.algorithms.normalizer import load_normalizer
    from megaseg.scoring.normalizer_file import normalizer_metadata, normalizer_path

    path = normalizer_path(config, rm_dir)
    if not path.is_file():
        return None
    normalizer = load_normalizer(path)
    expected = normalizer_metadata(config.model.name, config.segmentation, config.rm.aggregation)
    have = normalizer.metadata()
    differing = [key for key, value in expected.items() if key != "model" and have.get(key) is not None and not (
        have[key] == value or (isinstance(value, float) and math.isclose(float(have[key]), value)))]
    if differing:
        warnings.warn(f"{path} was fitted to other settings ({', '.join(differing)}); --details gives raw rewards "
                      "only", stacklevel=2)
        return None
    return normalizer


def response_segments(sequence: TokenizedSequence, ends: np.ndarray, rewards: np.ndarray, positions: np.ndarray,
                      normalized: Optional[np.ndarray], decode: Callable[[list[int]], str]) -> list[dict[str, Any]]:
    """The response cut at its segment ends: one record per segment (text, token span relative to the response,
    token count, p, raw and normalized reward), then, when tokens follow the last end (the EOS in segment modes),
    one unscored piece with reward None."""
    ids = list(sequence.prompt_ids) + list(sequence.response_ids)
    start = len(sequence.prompt_ids)
    pieces = []
    for t, end in enumerate(int(e) for e in ends):
        pieces.append({"text": decode(ids[start:end + 1]), "start": start - len(sequence.prompt_ids),
                       "num_tokens": end + 1 - start, "p": float(positions[t]), "raw": float(rewards[t]),
                       "normalized": float(normalized[t]) if normalized is not None else None})
        start = end + 1
    if start < len(ids):
        pieces.append({"text": decode(ids[start:]), "start": start - len(sequence.prompt_ids),
                       "num_tokens": len(ids) - start, "p": None, "raw": None, "normalized": None})
    return pieces


def pair_details(scored: ScoredData, subsets: Optional[Sequence[Optional[str]]] = None) -> list[dict[str, Any]]:
    """One JSON-able record per pair (module docstring); the segment texts are decoded with the reward model's
    tokenizer, so joined they give the response text as tokenized (special tokens kept)."""
    import torch

    tokenizer = chat_renderer(scored.config).tokenizer
    normalizer = _matching_normalizer(scored.config, scored.rm_dir)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    records = []
    for index, pair in enumerate(scored.encoded.pairs):
        record: dict[str, Any] = {"id": pair.id, "source": pair.source,
                                  "subset": subsets[index] if subsets is not None else None,
                                  "prompt": decode(list(pair.chosen.prompt_ids))}
        for name, sequence, ends in (("chosen", pair.chosen, scored.segmented.chosen_ends[index]),
                                     ("rejected", pair.rejected, scored.segmented.rejected_ends[index])):
            side = getattr(scored.scores, name)
            rewards, positions = side.segment_rewards[index], side.positions[index]
            normalized = None
            if normalizer is not None:
                normalized = normalizer.normalize_segments(torch.from_numpy(rewards),
                                                           torch.from_numpy(positions)).double().numpy()
            record[name] = {"text": decode(list(sequence.response_ids)), "reward": float(side.sequence_rewards[index]),
                            "num_tokens": len(sequence.response_ids),
                            "segments": response_segments(sequence, ends, rewards, positions, normalized, decode)}
        record["margin"] = record["chosen"]["reward"] - record["rejected"]["reward"]
        record["correct"] = record["margin"] > 0
        records.append(record)
    return records


def write_jsonl_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def score_evaluation_data(command_config: MegasegConfig, explicit_keys: Iterable[str],
                          parallel_ctx: Optional[ParallelContext] = None, prefix_features: Any = None
                          ) -> tuple[ScoredData, str, Optional[list[Optional[str]]]]:
    """(the scored evaluation pairs, where they came from, each pair's subset or None when the file has none).
    Collective. ``prefix_features``: see megaseg.scoring.inputs.score_encoded_pairs."""
    rm_dir, config = reward_model_config(command_config, explicit_keys)
    encoded, source, path = evaluation_pairs(config)  # bad data fails here, before any process group or model
    by_source = record_subsets(path) if path is not None else {}
    subsets = [by_source.get(pair.source) for pair in encoded.pairs] if by_source else None
    from megaseg.parallel import parallel_session

    with parallel_session(config, parallel_ctx) as context:
        return (score_encoded_pairs(config, rm_dir, encoded, context, prefix_features=prefix_features), source,
                subsets)


def evaluate_reward_model(command_config: MegasegConfig, explicit_keys: Iterable[str],
                          parallel_ctx: Optional[ParallelContext] = None,
                          prefix_features: Any = None) -> dict[str, Any]:
    """The metrics dict (module docstring). ``explicit_keys``: the settings the user gave (megaseg.scoring.inputs).
    ``parallel_ctx``: an initialised context to use, or None to initialise one from the config and tear it down
    after. ``prefix_features``: the trainer's frozen-layer outputs (megaseg.training.reward_model.frozen_prefix), to
    score through the top layers only. Collective; every rank gets the metrics."""
    scored, source, subsets = score_evaluation_data(command_config, explicit_keys, parallel_ctx, prefix_features)
    return evaluation_metrics(scored, source, subsets)


def evaluate_reward_model_command(config: MegasegConfig, explicit_keys: frozenset[str] = frozenset(),
                                  out: Optional[str] = None, details: Optional[str] = None) -> int:
    scored, source, subsets = score_evaluation_data(config, explicit_keys)
    metrics = evaluation_metrics(scored, source, subsets)
    if is_rank_zero():
        if details is not None:
            write_jsonl_atomic(details, pair_details(scored, subsets))
            metrics["details"] = str(details)
        line = json.dumps(metrics)
        if out is not None:
            target = Path(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(target, line + "\n")
        print(line, flush=True)
    return 0
