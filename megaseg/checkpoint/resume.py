"""Resuming a run from its latest checkpoint, for every trainer: the one invariant rule, and the load.

A resumed run must be the same training as the one that wrote the checkpoint, or its curve means nothing. So every
setting a trainer reads (the config sections it names) must be unchanged, except the few that only say where and
how the run executes or is observed (``RESUMABLE_CHANGES``: logging, checkpointing, the parallel layout, which a
checkpoint reshards to, inference-only batch sizes, evaluation cadence, and max_steps, a stop point that the LR
schedule does not depend on). A changed learning rate, batch
size, data file or segmentation is refused with each field named, never silently ignored.

A latest checkpoint that fails its integrity check (megaseg.integrity: a file missing, truncated or altered) is
skipped with a warning naming it under ``checkpoint.on_damaged=previous`` (the newest intact step is resumed from)
and stops the run under ``checkpoint.on_damaged=error``.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from megaseg.checkpoint.step_dirs import (
    LoadedCheckpoint,
    TrainedModel,
    latest_checkpoint,
    load_training_checkpoint,
    step_dirs,
    verify_step_dir,
)
from megaseg.integrity import check_on_rank_zero
from megaseg.parallel.collectives import print_rank_zero
from megaseg.config import MegasegConfig, load_config
from megaseg.config.loader import RESOLVED_CONFIG_NAME, flat_settings

CHECKPOINTS_DIR = "checkpoints"  # under a run's logging.out_dir
# Dotted prefixes of the settings that may differ on resume (each changes where or how fast a run goes, or what it
# reports, never what it computes).
RESUMABLE_CHANGES = (
    "logging.", "checkpoint.", "parallel.",
    "segmentation.cache_dir", "segmentation.micro_batch_size", "segmentation.entropy_chunk_size",
    "rm.max_steps", "rm.eval_every", "rm.validate_at_end", "rm.scoring_micro_batch_size",
    "ppo.max_steps", "ppo.eval_every", "ppo.eval_max_prompts", "ppo.eval_greedy", "ppo.sample_every",
    "ppo.num_logged_samples", "dpo.max_steps", "dpo.eval_every",
)


def checkpoint_root(config: MegasegConfig) -> Path:
    return Path(config.logging.out_dir) / CHECKPOINTS_DIR


def changed_settings(saved: MegasegConfig, config: MegasegConfig, sections: tuple[str, ...]) -> dict[str, tuple]:
    """{key: (saved, now)} for every setting under ``sections`` that differs and is not a resumable change."""
    old, new = flat_settings(saved), flat_settings(config)
    return {key: (old.get(key), value) for key, value in new.items()
            if (key in sections or key.startswith(tuple(f"{section}." for section in sections)))
            and not key.startswith(RESUMABLE_CHANGES) and old.get(key) != value}


def check_resume_invariants(saved: MegasegConfig, config: MegasegConfig, sections: tuple[str, ...],
                            where: Path) -> None:
    changed = changed_settings(saved, config, sections)
    if changed:
        listed = "; ".join(f"{key}: checkpoint {old!r}, now {new!r}" for key, (old, new) in changed.items())
        raise ValueError(f"cannot resume from {where}: {listed}. Resume with the checkpoint's settings (its "
                         f"{where / RESOLVED_CONFIG_NAME}), or start a fresh run (checkpoint.resume=false, or another "
                         "logging.out_dir)")


def resume_latest(config: MegasegConfig, *, sections: tuple[str, ...],
                  models: Mapping[str, TrainedModel]) -> Optional[LoadedCheckpoint]:
    """Load the latest checkpoint under ``<logging.out_dir>/checkpoints`` into ``models`` after checking the
    invariants, or None (a fresh start: none exists, or ``checkpoint.resume=false``). Collective."""
    if not config.checkpoint.resume:
        return None
    intact = newest_intact_checkpoint(config)
    if intact is None:
        return None
    check_resume_invariants(load_config(intact / RESOLVED_CONFIG_NAME), config, sections, intact)
    return load_training_checkpoint(intact, models=models, model_cfg=config.model)


def newest_intact_checkpoint(config: MegasegConfig) -> Optional[Path]:
    """The latest step directory that passes its integrity check, skipping damaged newer ones with a warning under
    ``checkpoint.on_damaged=previous`` (raising under ``error``); None when there is none. Collective."""
    root = checkpoint_root(config)
    latest = latest_checkpoint(root)
    if latest is None:
        return None
    candidates = [latest] + [path for _, path in reversed(step_dirs(root)) if path != latest]
    for candidate in candidates:
        try:
            check_on_rank_zero(lambda: verify_step_dir(candidate))
            return candidate
        except ValueError as error:
            if config.checkpoint.on_damaged == "error":
                raise
            message = (f"checkpoint {candidate} is damaged and is skipped (checkpoint.on_damaged=previous): {error}")
            warnings.warn(message)
            print_rank_zero(f"warning: {message}")
    raise ValueError(f"no intact checkpoint under {root}: every step directory failed its check (see the warnings "
                     "above); start afresh with checkpoint.resume=false or another logging.out_dir")
