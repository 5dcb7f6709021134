"""A trained reward model on disk: everything needed to score with it, in one directory, loadable at any TP/PP.

Layout of a reward-model directory (what `megaseg train-rm` writes as <logging.out_dir>/reward_model/):

    state/              dist_checkpointing of the model ("model.*": backbone + scalar head) and its common part
                        (model architecture, progress, parallel layout); the same format as a training checkpoint's
                        step directory (megaseg.checkpoint.step_dirs) without optimizer or schedule state
    config.yaml         the resolved MegasegConfig of the run that trained it: model (architecture, tokenizer,
                        stop tokens, the SFT checkpoint used for entropies), segmentation (mode, c_ent, n) and
                        rm.aggregation, so scoring needs nothing else passed
    reward_model.json   marker + summary: format version, segmentation, aggregation, step, final metrics
    normalizer.json     written later beside it by `megaseg fit-normalizer` (`normalizer_path`)

The directory appears atomically (written under a staging name, renamed by rank 0 once every rank has finished).
Re-saving over an existing directory replaces it whole: a normalizer fitted to the old weights does not survive.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import torch.distributed as dist

from megaseg.config import MegasegConfig, load_config
from megaseg.config.loader import RESOLVED_CONFIG_NAME
from megaseg.config.parallel import ParallelConfig
from megaseg.checkpoint.step_dirs import (
    STATE_DIR,
    TrainingProgress,
    latest_checkpoint,
    load_checkpoint,
    replace_dir,
    save_checkpoint,
)

REWARD_MODEL_DIR = "reward_model"  # under a train-rm run's logging.out_dir
MARKER_FILE = "reward_model.json"
NORMALIZER_FILE = "normalizer.json"
FORMAT_NAME = "megaseg-reward-model"
FORMAT_VERSION = 1
# Parameters of the scalar head (megaseg.models.scalar_head), absent from an SFT language model checkpoint.
HEAD_PREFIX = "head."


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def normalizer_path(rm_dir: str | os.PathLike) -> Path:
    """Where `fit-normalizer` writes (and PPO reads) the normalizer of the reward model in `rm_dir`."""
    return resolve_reward_model_dir(rm_dir) / NORMALIZER_FILE


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
    info = json.loads((rm_dir / MARKER_FILE).read_text())
    if info.get("format") != FORMAT_NAME or info.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{rm_dir / MARKER_FILE}: format {info.get('format')!r} version {info.get('version')!r} "
                         f"is not {FORMAT_NAME!r} <= {FORMAT_VERSION}; it was written by another (newer?) megaseg")
    return info


def read_reward_model_config(rm_dir: str | os.PathLike) -> MegasegConfig:
    """The training run's resolved config, with rm.checkpoint pointing at `rm_dir` (absolute)."""
    rm_dir = resolve_reward_model_dir(rm_dir).absolute()
    read_reward_model_info(rm_dir)
    config = load_config(rm_dir / RESOLVED_CONFIG_NAME)
    return dataclasses.replace(config, rm=dataclasses.replace(config.rm, checkpoint=str(rm_dir)))


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
    staging_root = rm_dir.with_name(f".staging_{rm_dir.name}")
    if _rank() == 0:
        shutil.rmtree(staging_root, ignore_errors=True)  # the leftover of a save that died part-way
    _barrier()
    # A step directory without optimizer/schedule is exactly the model part of a training checkpoint.
    step_dir = save_checkpoint(staging_root, model=model, config=config, progress=progress)
    if _rank() == 0:
        tmp_marker = step_dir / f".{MARKER_FILE}.tmp"
        tmp_marker.write_text(json.dumps(_marker(config, progress, metrics), indent=2) + "\n")
        tmp_marker.replace(step_dir / MARKER_FILE)
        replace_dir(step_dir, rm_dir)
        shutil.rmtree(staging_root)
    _barrier()
    return rm_dir


def parallel_config_of(parallel_ctx, base: ParallelConfig) -> ParallelConfig:
    """`base` (backend, timeout, ...) with the sizes of the process groups `parallel_ctx` was initialised with."""
    return dataclasses.replace(base, tensor_model_parallel_size=parallel_ctx.tp_size,
                               pipeline_model_parallel_size=parallel_ctx.pp_size,
                               context_parallel_size=parallel_ctx.cp_size)


def load_reward_model(rm_dir: str | os.PathLike, parallel_ctx) -> tuple[Any, MegasegConfig]:
    """(model, config): this rank's pipeline stage of the trained reward model, in eval mode, at the layout of
    `parallel_ctx` (whatever layout it was trained at), and its training config with rm.checkpoint = `rm_dir` and
    the parallel sizes of `parallel_ctx`. Collective: every rank calls it.

    The model returns the head output at every position, values [batch, seq], on the last pipeline stage; the reward
    of a segment is the value at its last token, aggregated with config.rm.aggregation (see megaseg.algorithms)."""
    from megaseg.models.scalar_head import build_reward_model

    config = read_reward_model_config(rm_dir)
    config = dataclasses.replace(config, parallel=parallel_config_of(parallel_ctx, config.parallel))
    model = build_reward_model(config.model, config.parallel)
    # RNG streams are per rank and irrelevant for scoring; the architecture and tensor shapes are checked.
    load_checkpoint(config.rm.checkpoint, model=model, model_cfg=config.model, load_rng=False)
    model.eval()
    return model, config


def initialize_from_sft(model, sft_checkpoint: str | os.PathLike) -> None:
    """Load the SFT language model's weights (a dist checkpoint as `megaseg convert hf-to-megatron` writes, at any
    TP/PP) into this rank's reward model; the scalar head keeps its fresh initialisation and the SFT model's output
    layer is not read. Collective. ValueError when the checkpoint lacks a backbone tensor or its shapes differ."""
    from megatron.core import dist_checkpointing

    from megaseg.checkpoint.step_dirs import check_tensor_shapes

    ckpt_dir = Path(sft_checkpoint)
    if not (ckpt_dir / "metadata.json").is_file():
        raise ValueError(f"model.checkpoint={str(ckpt_dir)!r} is not a megatron dist checkpoint (no metadata.json); "
                         "convert the SFT model first: `megaseg convert hf-to-megatron --hf DIR --out DIR`")
    backbone = {key: value for key, value in model.sharded_state_dict().items() if not key.startswith(HEAD_PREFIX)}
    check_tensor_shapes(ckpt_dir, backbone, dist_checkpointing.load_tensors_metadata(str(ckpt_dir)))
    loaded = dist_checkpointing.load(backbone, str(ckpt_dir))
    result = model.load_state_dict(loaded, strict=False)
    missing = [key for key in result.missing_keys if not key.startswith(HEAD_PREFIX)
               and not key.endswith("_extra_state")]
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
