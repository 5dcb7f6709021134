"""Checkpoints through megatron's dist_checkpointing: one directory per step, written atomically, any layout.

Layout of a checkpoint root (usually <logging.out_dir>/checkpoints):

    step_000100/
        state/         dist_checkpointing: model ("model.*"), optimizer ("optimizer.*"), per-rank RNG states,
                       and the common part (progress, LR schedule, model architecture, parallel layout)
        config.yaml    the resolved MegasegConfig of the run that wrote it
    latest             text: the name of the newest complete step directory

A step directory is first written as `.tmp_step_000100` and renamed once every rank has finished, so a directory
named `step_*` is always complete; `latest` is replaced atomically after the rename. Tensors are stored as global
shards (sharded_state_dict), so a checkpoint written at one tensor/pipeline-parallel layout loads at any other.

dist_checkpointing's writer starts helper processes: scripts that save must guard their entry point with
`if __name__ == "__main__":`. Every rank must call save_checkpoint / load_checkpoint (they are collective), and
the directory must be on a filesystem all ranks see.
"""
from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megaseg.config import MegasegConfig, save_config
from megaseg.config.model import ModelConfig
from megaseg.models.architecture import architecture_differences, model_architecture

STEP_DIR_PATTERN = re.compile(r"^step_(\d+)$")
LATEST_FILE = "latest"
STATE_DIR = "state"
_RNG_KEY = "rng_state"


@dataclass(frozen=True)
class TrainingProgress:
    """Where training stands; saved in every checkpoint so that a resumed run continues the same data order."""

    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # training samples (pairs, prompts) consumed over all data-parallel ranks
    epoch: int = 0
    # The data loader's own position (e.g. shuffle seed and index); JSON-like values only.
    data_state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path  # the step directory that was loaded
    progress: TrainingProgress
    restored_rng: bool  # False when the parallel layout differs from the saving run's (streams are per rank)


def check_architecture(step_dir: Path, saved: Optional[dict[str, Any]], model_cfg: ModelConfig) -> None:
    """ValueError naming every architecture field where the checkpoint and the model config disagree."""
    if saved is None:
        return  # written by a tool that records no architecture: the tensor-shape check still applies
    differences = architecture_differences(saved, model_cfg)
    if differences:
        listed = "; ".join(f"model.{name}: checkpoint {old!r}, config {new!r}" for name, (old, new) in differences.items())
        raise ValueError(
            f"checkpoint {step_dir} was written for another architecture ({listed}); use the model config it was "
            f"saved with (its {step_dir / 'config.yaml'}) or a checkpoint of this model")


def check_tensor_shapes(step_dir: Path, model_state: dict[str, Any], saved_tensors: dict[str, Any]) -> None:
    """ValueError for a model tensor the checkpoint lacks or holds with another global shape."""
    missing, mismatched = [], []
    for value in model_state.values():
        for sharded in _sharded_tensors(value):
            saved = saved_tensors.get(sharded.key)
            if saved is None:
                missing.append(sharded.key)
            elif tuple(saved.global_shape) != tuple(sharded.global_shape):
                mismatched.append(f"{sharded.key}: checkpoint {tuple(saved.global_shape)}, model "
                                  f"{tuple(sharded.global_shape)}")
    if mismatched:
        raise ValueError(f"checkpoint {step_dir} does not fit this model; tensor shapes differ: "
                         + "; ".join(mismatched))
    if missing:
        raise ValueError(
            f"checkpoint {step_dir} lacks model tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} (e.g. a "
            "reward-model checkpoint loaded as a language model, or a language model without its head); pass "
            "missing_ok=(prefix, ...) for parts that should keep their fresh initialisation")


def _sharded_tensors(value: Any) -> list[Any]:
    """The ShardedTensors in one sharded-state-dict entry (factories such as SwiGLU's fc1 hold several)."""
    if isinstance(value, ShardedTensor):
        return [value]
    if isinstance(value, ShardedTensorFactory):
        return [item for built in _flatten(value.build()) for item in _sharded_tensors(built)]
    return []


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _flatten(item)]
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # Megatron DDP keeps the model in .module; the sharded state dict is the model's own.
    return getattr(model, "module", model)


def _layout() -> dict[str, int]:
    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_states() -> dict[str, Any]:
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    get_cuda_rng_tracker().set_states(states["tracker"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _rng_sharded_object(states: Optional[dict[str, Any]]) -> ShardedObject:
    # One entry per global rank: RNG streams belong to a rank, and only make sense at the same layout.
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return ShardedObject(_RNG_KEY, states, (world_size,), (_rank(),), replica_id=0)


def _sharded_state(model: torch.nn.Module, optimizer: Any, *, is_loading: bool,
                   missing_ok: Sequence[str] = ()) -> dict[str, Any]:
    model_state = _unwrap(model).sharded_state_dict()
    model_state = {key: value for key, value in model_state.items()
                   if not any(key.startswith(prefix) for prefix in missing_ok)}
    state: dict[str, Any] = {"model": model_state}
    if optimizer is not None:
        # The Adam state is keyed per layer: under layer-stacked keys a partly frozen model (rm.train_top_layers)
        # would cover only some layers of a stacked tensor with optimizer state, which dist_checkpointing refuses.
        per_layer = _unwrap(model).sharded_state_dict(metadata={"non_homogeneous_layers": True})
        state["optimizer"] = optimizer.sharded_state_dict(per_layer, is_loading=is_loading)
    return state


def save_checkpoint(root: str | os.PathLike, *, model: torch.nn.Module, config: MegasegConfig,
                    progress: TrainingProgress, optimizer: Any = None, scheduler: Any = None,
                    keep_last: Optional[int] = None) -> Path:
    """Write <root>/step_<progress.step>/ atomically, point `latest` at it and keep only the newest `keep_last`.

    Collective: every rank calls it with its own model shard (and optimizer). Returns the step directory."""
    root = Path(root)
    final = root / step_dir_name(progress.step)
    tmp = root / f".tmp_{final.name}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # the leftover of a save that died part-way
        (tmp / STATE_DIR).mkdir(parents=True)
    _barrier()
    state = _sharded_state(model, optimizer, is_loading=False)
    state[_RNG_KEY] = _rng_sharded_object(_rng_states())
    state["progress"] = dataclasses.asdict(progress)
    state["model_architecture"] = model_architecture(config.model)
    state["layout"] = _layout()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    dist_checkpointing.save(state, str(tmp / STATE_DIR))
    _barrier()
    if _rank() == 0:
        save_config(config, tmp)
        replace_dir(tmp, final)
        _write_latest(root, final.name)
        if keep_last is not None:
            _prune(root, keep_last)
    _barrier()
    return final


def replace_dir(source: Path, target: Path) -> None:
    """Move a finished directory into place by rename, replacing an existing one (e.g. a step saved again after
    resuming at it): the old one is swapped aside first and deleted only once the new one is in place."""
    if target.exists():
        trash = target.with_name(f".old_{target.name}")
        shutil.rmtree(trash, ignore_errors=True)
        target.rename(trash)
        source.rename(target)
        shutil.rmtree(trash)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST_FILE}.tmp"
    tmp.write_text(name + "\n")
    tmp.replace(root / LATEST_FILE)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    found = []
    for path in root.iterdir() if root.is_dir() else ():
        match = STEP_DIR_PATTERN.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _prune(root: Path, keep_last: int) -> None:
    for _, path in _step_dirs(root)[:-keep_last]:
        shutil.rmtree(path)


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The newest complete step directory under `root` (per `latest`, else the highest step), or None."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir():
            return candidate
        warnings.warn(f"{pointer} names {candidate.name}, which does not exist; using the highest step instead")
    steps = _step_dirs(root)
    return steps[-1][1] if steps else None


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A step directory, or a checkpoint root (-> its latest step); ValueError when neither."""
    path = Path(path)
    if (path / STATE_DIR).is_dir():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"{path} is neither a megaseg checkpoint step directory (with a {STATE_DIR}/ folder) nor a "
                         "checkpoint root holding step_* directories; check the path")
    return latest


def read_checkpoint_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The common (non-tensor) part of a checkpoint: progress, layout, model architecture, scheduler."""
    step_dir = resolve_checkpoint_dir(path)
    return dist_checkpointing.load_common_state_dict(str(step_dir / STATE_DIR))


def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module, model_cfg: ModelConfig,
                    optimizer: Any = None, scheduler: Any = None, load_rng: bool = True,
                    missing_ok: Sequence[str] = ()) -> LoadedCheckpoint:
    """Load model (+ optimizer, scheduler, RNG states) from a step directory or a root's latest step.

    `missing_ok`: prefixes of model keys that may be absent from the checkpoint and keep their current values
    (e.g. ("head.",) to start a critic from the SFT model's checkpoint). ValueError when the checkpoint's
    architecture differs from `model_cfg` or a tensor's shape differs. Collective."""
    if missing_ok and optimizer is not None:
        raise ValueError("missing_ok is for starting from another model's weights; load the optimizer state only "
                         "from a checkpoint of this very model (drop missing_ok or the optimizer)")
    step_dir = resolve_checkpoint_dir(path)
    state_dir = str(step_dir / STATE_DIR)
    common = dist_checkpointing.load_common_state_dict(state_dir)
    check_architecture(step_dir, common.get("model_architecture"), model_cfg)
    state = _sharded_state(model, optimizer, is_loading=True, missing_ok=missing_ok)
    check_tensor_shapes(step_dir, state["model"], dist_checkpointing.load_tensors_metadata(state_dir))
    saved_layout = common.get("layout")
    restore_rng = load_rng and saved_layout == _layout()
    if load_rng and not restore_rng:
        warnings.warn(f"{step_dir} was saved at parallel layout {saved_layout}, this run is {_layout()}: RNG states "
                      "are per rank, so they are not restored (the model, optimizer and progress are)")
    if restore_rng:
        state[_RNG_KEY] = _rng_sharded_object(None)
    loaded = dist_checkpointing.load(state, state_dir)
    _unwrap(model).load_state_dict(loaded["model"], strict=not missing_ok)
    if optimizer is not None:
        if "optimizer" not in loaded:
            raise ValueError(f"{step_dir} holds no optimizer state; load it without an optimizer (weights only)")
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        if "scheduler" not in common:
            raise ValueError(f"{step_dir} holds no LR-schedule state; load it without a scheduler")
        scheduler.load_state_dict(common["scheduler"])
    if restore_rng:
        _set_rng_states(loaded[_RNG_KEY])
    progress = TrainingProgress(**common.get("progress", {}))
    return LoadedCheckpoint(path=step_dir, progress=progress, restored_rng=restore_rng)
