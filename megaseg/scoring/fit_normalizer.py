"""`megaseg fit-normalizer`: score a calibration set with a trained reward model and fit its reward normalizer.

Recipe (paper Sec. 2.3 / App. F, docs/method.md): score the chosen AND the rejected response of every
calibration pair; every segment reward with its location p = (t + 1) / T is one sample; ``LocationNormalizer.fit``
groups them by p rounded to 3 decimals and fits Mean(p), Std(p) linear in log p (Huber by default, or OLS).
``normalizer.kind`` (location by default) chooses the ablations instead: global (mean/std of all segment rewards),
last_segment (of each response's last segment reward), bandit (of the sequence rewards e(x, y)), none (identity).

Calibration data: ``data.train_path`` (``--data``; by default the file the reward model was trained on, as in the
paper), its first ``normalizer.num_samples`` pairs (``--num-samples``; None: all).

Writes, into the reward-model directory, or beside ``normalizer.path`` named after it when that is set (each file
atomically, rank 0):
    normalizer.json         ``Normalizer.to_dict()`` (kind, coefficients, R^2 of both fits, the per-p table, and the
                            metadata PPO checks: model, c_ent, aggregation, segmentation, num_samples) plus a
                            ``calibration`` record (data, pairs, reward-model step, segmentation details)
    normalizer.png          per-p mean and std with the fitted curves (``normalizer_plot``)
    normalizer_config.yaml  the resolved config of the fit
The last line of output is a JSON object with the paths and the coefficients.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megaseg.algorithms.location_fit import location_table
from megaseg.algorithms.normalizer import (
    BanditNormalizer,
    GlobalNormalizer,
    IdentityNormalizer,
    LastSegmentNormalizer,
    LocationNormalizer,
    Normalizer,
)
from megaseg.atomic_io import write_text_atomic
from megaseg.checkpoint.reward_model_dir import read_reward_model_info
from megaseg.config import MegasegConfig, config_to_yaml
from megaseg.parallel.collectives import is_rank_zero
from megaseg.parallel.initialize import ParallelContext
from megaseg.parallel.launch_env import read_launch_env
from megaseg.scoring.inputs import ScoredData, encode_pairs_file, reward_model_config, score_encoded_pairs
from megaseg.scoring.normalizer_file import normalizer_metadata, normalizer_path, write_normalizer
from megaseg.scoring.normalizer_plot import plot_normalizer
from megaseg.scoring.scores import PairScores


def fit_from_scores(scores: PairScores, *, kind: str, method: str, metadata: dict[str, Any]) -> Normalizer:
    """Fit the normalizer ``kind`` (config ``normalizer.kind``) on scored calibration responses."""
    positions, rewards = scores.calibration_samples()
    if kind == "location":
        return LocationNormalizer.fit(positions, rewards, method=method, **metadata)
    if kind == "global":
        return GlobalNormalizer.fit(positions, rewards, **metadata)
    if kind == "last_segment":
        return LastSegmentNormalizer.fit(positions, rewards, **metadata)
    if kind == "bandit":
        return BanditNormalizer.fit(None, scores.sequence_rewards(), **metadata)
    if kind == "none":
        return IdentityNormalizer.fit(None, rewards, **metadata)
    raise ValueError(f"normalizer.kind={kind!r} is not one of location, none, global, last_segment, bandit")


@dataclass(frozen=True)
class NormalizerFit:
    normalizer: Normalizer
    normalizer_path: Path
    plot_path: Path
    summary: dict[str, Any]  # what the command prints as its last line


def _calibration_record(scored: ScoredData, data_path: str) -> dict[str, Any]:
    config, positions = scored.config, scored.scores.calibration_samples()[0]
    return {"data": data_path, "num_pairs": scored.scores.num_pairs, "num_responses": 2 * scored.scores.num_pairs,
            "num_segment_rewards": int(positions.size), "skipped": scored.encoded.skipped.summary(),
            "reward_model": str(scored.rm_dir), "reward_model_step": read_reward_model_info(scored.rm_dir)["step"],
            "segmentation": {"mode": config.segmentation.mode, "entropy_cutoff": config.segmentation.entropy_cutoff,
                             "ngram_size": config.segmentation.ngram_size},
            "segment_statistics": scored.segmented.statistics().to_dict(),
            "max_length": config.data.max_length, "max_prompt_length": config.data.max_prompt_length}


def _plot_title(normalizer: Normalizer, config: MegasegConfig, num_rewards: int) -> str:
    seg = config.segmentation
    cut = f" c_ent={seg.entropy_cutoff:.4g}" if seg.mode == "entropy" else (
        f" n={seg.ngram_size}" if seg.mode == "ngram" else "")
    r2 = ""
    if isinstance(normalizer, LocationNormalizer):
        r2 = f", R² mean {normalizer.r2_mean:.3f} / std {normalizer.r2_std:.3f}"
    return (f"{config.normalizer.kind} normalizer of {config.model.name} reward model ({seg.mode}{cut}, "
            f"{config.rm.aggregation} aggregation): {num_rewards} segment rewards{r2}")


def output_paths(config: MegasegConfig, rm_dir: Path) -> tuple[Path, Path, Path]:
    """(normalizer, plot, fit config): ``normalizer.path`` when set, where PPO reads it too (a second normalizer of
    the same reward model, for an ablation, must not replace the first), else ``<rm dir>/normalizer.json``; the plot
    and the config beside it, named after it (``normalizer.png`` and ``normalizer_config.yaml`` by default)."""
    target = normalizer_path(config, rm_dir)
    return target, target.with_suffix(".png"), target.with_name(f"{target.stem}_config.yaml")


def _write_outputs(scored: ScoredData, normalizer: Normalizer, data_path: str) -> NormalizerFit:
    config = scored.config
    target, plot_path, config_path = output_paths(config, scored.rm_dir)
    positions, rewards = scored.scores.calibration_samples()
    table = location_table(positions, rewards).to_dict()
    document = _calibration_record(scored, data_path)
    if is_rank_zero():
        write_normalizer(target, normalizer, document)
        plot_normalizer(plot_path, table, normalizer, _plot_title(normalizer, config, int(rewards.size)))
        write_text_atomic(config_path, config_to_yaml(config))
    coefficients = {key: value for key, value in normalizer.params().items() if key != "table"}
    summary = {"normalizer": str(target), "plot": str(plot_path), "kind": normalizer.kind, **coefficients,
               **normalizer.metadata(), "num_pairs": scored.scores.num_pairs}
    return NormalizerFit(normalizer=normalizer, normalizer_path=target, plot_path=plot_path, summary=summary)


def fit_normalizer(command_config: MegasegConfig, explicit_keys: Iterable[str],
                   parallel_ctx: Optional[ParallelContext] = None, prefix_features: Any = None) -> NormalizerFit:
    """Score the calibration set, fit, write normalizer.json + normalizer.png into the reward-model directory.

    ``command_config``: rm.checkpoint (the reward-model directory), data.train_path, normalizer.kind / method /
    num_samples, and the settings the user gave (``explicit_keys``, see megaseg.scoring.inputs). ``parallel_ctx``: an initialised context to
    use (the caller keeps it), or None to initialise one from the config and tear it down after. Collective.
    ``prefix_features``: the trainer's frozen-layer outputs, to score through the top layers only (score_encoded_pairs).
    """
    rm_dir, config = reward_model_config(command_config, explicit_keys)
    data_path = config.data.train_path
    if data_path is None:
        raise ValueError("no calibration data: pass --data FILE (data.train_path); the reward model's config names "
                         "no training file either")
    limits = [n for n in (config.normalizer.num_samples, config.data.max_samples) if n is not None]
    # Bad data fails here, before any process group or model exists.
    encoded = encode_pairs_file(config, data_path, min(limits) if limits else None)
    from megaseg.parallel import parallel_session

    with parallel_session(config, parallel_ctx) as context:
        scored = score_encoded_pairs(config, rm_dir, encoded, context, prefix_features=prefix_features)
        normalizer = fit_from_scores(scored.scores, kind=config.normalizer.kind, method=config.normalizer.method,
                                     metadata=normalizer_metadata(config.model.name, config.segmentation,
                                                                  config.rm.aggregation))
        return _write_outputs(scored, normalizer, str(data_path))


def fit_normalizer_command(config: MegasegConfig, explicit_keys: frozenset[str] = frozenset()) -> int:
    fit = fit_normalizer(config, explicit_keys)
    # The process group is gone by now (is_rank_zero() would be true on every rank): the launcher's rank decides.
    if read_launch_env().rank == 0:
        print(f"wrote {fit.normalizer_path} and {fit.plot_path}", flush=True)
        print(json.dumps(fit.summary), flush=True)
    return 0
