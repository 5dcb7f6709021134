"""`megaseg eval-rm --ckpt DIR --data FILE [--out FILE]`: how well a reward model ranks a preference set.

Metrics (over the pairs of the file): accuracy = fraction of pairs with e(x, y_chosen) > e(x, y_rejected) strictly
(ties count as wrong), the mean margin e(chosen) - e(rejected), mean chosen / rejected sequence reward, and the
segment statistics of the segmentation scored with (segments per response, mean segment length in tokens).

Data: ``data.eval_path`` (``--data``); without it, the reward model's own evaluation data (its data.eval_path, or the
data.eval_fraction held out of its training file, the same pairs the trainer validated on).

The last line of output is one JSON object with the metrics; ``--out`` also writes it to a file (atomically).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megaseg.atomic_io import write_text_atomic
from megaseg.config import MegasegConfig
from megaseg.data.encoding import EncodedPairs
from megaseg.parallel.collectives import is_rank_zero
from megaseg.parallel.initialize import ParallelContext
from megaseg.scoring.inputs import (
    ScoredData,
    chat_renderer,
    encode_pairs_file,
    reward_model_config,
    score_encoded_pairs,
)


def evaluation_pairs(config: MegasegConfig) -> tuple[EncodedPairs, str]:
    """(the encoded evaluation pairs, a description of where they came from)."""
    data = config.data
    if data.eval_path is not None:
        return encode_pairs_file(config, data.eval_path, data.eval_max_samples), str(data.eval_path)
    if data.eval_fraction > 0 and data.train_path is not None:
        from megaseg.data.splits import load_preference_splits

        _, held_out = load_preference_splits(data, chat_renderer(config), config.seed)
        return held_out, f"{data.train_path} (held-out fraction {data.eval_fraction}, seed {config.seed})"
    raise ValueError("no evaluation data: pass --data FILE (data.eval_path); the reward model's config names no "
                     "evaluation data either")


def evaluation_metrics(scored: ScoredData, data_source: str) -> dict[str, Any]:
    scores, config = scored.scores, scored.config
    chosen_stats = scored.segmented.statistics()
    margins = scores.margins()
    return {
        "accuracy": scores.accuracy(),
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


def evaluate_reward_model(command_config: MegasegConfig, explicit_keys: Iterable[str],
                          parallel_ctx: Optional[ParallelContext] = None) -> dict[str, Any]:
    """The metrics dict (module docstring). ``explicit_keys``: the settings the user gave (megaseg.scoring.inputs).
    ``parallel_ctx``: an initialised context to use, or None to initialise one from the config and tear it down
    after. Collective; every rank gets the metrics."""
    rm_dir, config = reward_model_config(command_config, explicit_keys)
    encoded, source = evaluation_pairs(config)  # bad data fails here, before any process group or model exists
    from megaseg.parallel import parallel_session

    with parallel_session(config, parallel_ctx) as context:
        scored = score_encoded_pairs(config, rm_dir, encoded, context)
        return evaluation_metrics(scored, source)


def evaluate_reward_model_command(config: MegasegConfig, explicit_keys: frozenset[str] = frozenset(),
                                  out: Optional[str] = None) -> int:
    metrics = evaluate_reward_model(config, explicit_keys)
    if is_rank_zero():
        line = json.dumps(metrics)
        if out is not None:
            target = Path(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(target, line + "\n")
        print(line, flush=True)
    return 0
