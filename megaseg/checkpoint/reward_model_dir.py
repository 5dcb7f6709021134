"""A trained reward model on disk: everything needed to score with it, in one directory, loadable at any TP/PP.

Layout of a reward-model directory (what `megaseg train-rm` writes as <logging.out_dir>/reward_model/):

    state/              the model state (megaseg.checkpoint.step_dirs.save_model_state: backbone + scalar head,
                        architecture, parallel layout), without optimizer or schedule
    config.yaml         the resolved MegasegConfig of the run that trained it: model (architecture, tokenizer,
                        stop tokens, the SFT checkpoint used for entropies), segmentation (mode, c_ent, n) and
                        rm.aggregation, so scoring needs nothing else passed
    reward_model.json   marker + summary: format version, segmentation, aggregation, step, final metrics
    megaseg-manifest.json  size and sha256 of every file above (megaseg.integrity), checked before the weights load
    normalizer.json     written later beside it by `megaseg fit-normalizer` (megaseg.scoring.normalizer_file)

The directory appears atomically (written under a staging name, renamed by rank 0 once every rank has finished).
Re-saving over an existing directory replaces it whole: a normalizer fitted to the old weights does not survive.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

from megaseg.atomic_io import replace_dir, write_json_atomic
from megaseg.checkpoint.step_dirs import (
    TrainingProgress,
    check_architecture,
    latest_checkpoint,
    load_model_state,
    read_common_state,
    save_model_state,
)
from megaseg.config import MegasegConfig, load_config, save_config
from megaseg.config.loader import RESOLVED_CONFIG_NAME
from megaseg.config.parallel import ParallelConfig
from megaseg.integrity import (
    MANIFEST_FILE,
    DamagedFileError,
    check_on_rank_zero,
    read_json_file,
    verify_manifest,
    write_manifest,
)
from megaseg.parallel.collectives import barrier, is_rank_zero
from megaseg.parallel.initialize import ParallelContext

STATE_DIR = "state"
REWARD_MODEL_DIR = "reward_model"  # under a train-rm run's logging.out_dir
MARKER_FILE = "reward_model.json"
FORMAT_NAME = "megaseg-reward-model"
FORMAT_VERSION = 3  # 2: the model state in state/ (megaseg.checkpoint.step_dirs.save_model_state); 3: a manifest
MANIFEST_SINCE_VERSION = 3


def resolve_reward_model_dir(path: str | os.PathLike) -> Path:
    """The reward-model directory itself, or the `reward_model/` inside a train-rm run directory.

    ValueError naming the path and what was expected when it is neither."""
    path = Path(path)
    for candidate in (path, path / REWARD_MODEL_DIR):
        if (candidate / MARKER_FILE).is_file() and (candidate / STATE_DIR).is_dir():
            return candidate
    hint = ""
    if latest_checkpoint(path / "checkpoints") is not None or latest_checkpoint(path) is not None:
        hint = (" It holds training checkpoints only: the run has not finished; let `megaseg train-rm` complete "
                "(it writes <out>/reward_model at the end) or resume it.")
    raise ValueError(f"{path} is not a megaseg reward model (no {MARKER_FILE} and {STATE_DIR}/ in it or in "
                     f"{path / REWARD_MODEL_DIR}); pass the directory `megaseg train-rm` wrote, "
                     f"<logging.out_dir>/{REWARD_MODEL_DIR}.{hint}")


def read_reward_model_info(rm_dir: str | os.PathLike) -> dict[str, Any]:
    """The contents of reward_model.json (format, segmentation, aggregation, step, metrics)."""
    rm_dir = resolve_reward_model_dir(rm_dir)
    info = read_json_file(rm_dir / MARKER_FILE, "the reward model's marker", damaged_reward_model_repair(rm_dir))
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME or info.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{rm_dir / MARKER_FILE}: format {info.get('format')!r} version {info.get('version')!r} "
                         f"is not {FORMAT_NAME!r} <= {FORMAT_VERSION}; it was written by another (newer?) megaseg")
    return info


def damaged_reward_model_repair(rm_dir: Path) -> str:
    """The command that writes the reward-model directory again (train-rm resumes from its last checkpoint)."""
    run_dir = Path(rm_dir).absolute().parent
    return (f"Write the reward model again: `megaseg train-rm --config {run_dir / RESOLVED_CONFIG_NAME}` (the run's "
            f"saved config; it resumes from {run_dir / 'checkpoints'} when a checkpoint is left there)")


def verify_reward_model_dir(rm_dir: str | os.PathLike) -> None:
    """DamagedFileError naming the first file of the reward-model directory that is missing, truncated or altered
    (rank 0 reads every byte once; the same error on every rank). Collective."""
    rm_dir = resolve_reward_model_dir(rm_dir)
    check_on_rank_zero(lambda: _verify(rm_dir))


def _verify(rm_dir: Path, selected=None) -> None:
    """verify_manifest, and a missing manifest is damage too in a directory of a version that writes one."""
    repair = damaged_reward_model_repair(rm_dir)
    if not verify_manifest(rm_dir, repair, selected=selected):
        if read_reward_model_info(rm_dir).get("version", 0) >= MANIFEST_SINCE_VERSION:
            raise DamagedFileError(rm_dir / MANIFEST_FILE, "is missing (the list of sizes and checksums the reward "
                                                           "model was written with)", repair)


def read_reward_model_config(rm_dir: str | os.PathLike) -> MegasegConfig:
    """The training run's resolved config, with rm.checkpoint pointing at `rm_dir` (absolute)."""
    rm_dir = resolve_reward_model_dir(rm_dir).absolute()
    # The small files only (this is read on one process too); the weights are checked where they load.
    _verify(rm_dir, selected=lambda name: not name.startswith(STATE_DIR))
    read_reward_model_info(rm_dir)
    config = load_config(rm_dir / RESOLVED_CONFIG_NAME)
    return dataclasses.replace(config, rm=dataclasses.replace(config.rm, checkpoint=str(rm_dir)))


def check_reward_model_architecture(rm_dir: Path, rm_config: MegasegConfig) -> None:
    """Fail before any segmentation work when the saved weights do not match the saved config (or are damaged).
    Collective."""
    verify_reward_model_dir(rm_dir)
    common = read_common_state(Path(rm_dir) / STATE_DIR)
    check_architecture(Path(rm_dir), common.get("model_architecture"), rm_config.model)


def _marker(config: MegasegConfig, progress: TrainingProgress, metrics: Optional[Mapping[str, float]]) -> dict:
    segmentation = config.segmentation
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model": config.model.name,
        "segmentation": {"mode": segmentation.mode, "entropy_cutoff": segmentation.entropy_cutoff,
                         "ngram_size": segmentation.ngram_size},
        "aggregation": config.rm.aggregation,
        "step": progress.step,
        "consumed_samples": progress.consumed_samples,
        "metrics": {name: float(value) for name, value in (metrics or {}).items()},
    }


def save_reward_model(rm_dir: str | os.PathLike, *, model, config: MegasegConfig, progress: TrainingProgress,
                      metrics: Optional[Mapping[str, float]] = None) -> Path:
    """Write the reward model (this rank's shard of `model`, plain or DDP-wrapped) to `rm_dir`, atomically.

    Collective: every rank calls it. `config` is the training run's resolved config (saved as config.yaml);
    `metrics` (e.g. final eval accuracy) go into reward_model.json for people to read. Returns `rm_dir`."""
    rm_dir = Path(rm_dir).absolute()
    staging = rm_dir.with_name(f".staging_{rm_dir.name}")
    if is_rank_zero():
        shutil.rmtree(staging, ignore_errors=True)  # the leftover of a save that died part-way
    barrier()
    save_model_state(staging / STATE_DIR, model=model, model_cfg=config.model)
    barrier()
    if is_rank_zero():
        save_config(config, staging)
        write_json_atomic(staging / MARKER_FILE, _marker(config, progress, metrics))
        write_manifest(staging)
        replace_dir(staging, rm_dir)
    barrier()
    return rm_dir


def parallel_config_of(parallel_ctx: ParallelContext, base: ParallelConfig) -> ParallelConfig:
    """`base` (backend, timeout, ...) with the sizes of the process groups `parallel_ctx` was initialised with."""
    return dataclasses.replace(base, tensor_model_parallel_size=parallel_ctx.tp_size,
                               pipeline_model_parallel_size=parallel_ctx.pp_size,
                               context_parallel_size=parallel_ctx.cp_size)


def load_reward_model(rm_dir: str | os.PathLike, parallel_ctx: ParallelContext) -> tuple[Any, MegasegConfig]:
    """(model, config): this rank's pipeline stage of the trained reward model, in eval mode, at the layout of
    `parallel_ctx` (whatever layout it was trained at), and its training config with rm.checkpoint = `rm_dir` and
    the parallel sizes of `parallel_ctx`. Collective: every rank calls it.

    The model returns the head output at every position, values [batch, seq], on the last pipeline stage; the reward
    of a segment is the value at its last token, aggregated with config.rm.aggregation (see megaseg.algorithms)."""
    from megaseg.models.scalar_head import build_reward_model

    verify_reward_model_dir(rm_dir)
    config = read_reward_model_config(rm_dir)
    config = dataclasses.replace(config, parallel=parallel_config_of(parallel_ctx, config.parallel))
    model = build_reward_model(config.model, config.parallel, seed=config.seed)
    load_model_state(Path(config.rm.checkpoint) / STATE_DIR, model=model, model_cfg=config.model)
    model.eval()
    return model, config
