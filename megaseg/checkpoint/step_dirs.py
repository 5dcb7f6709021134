"""Training checkpoints through megatron's dist_checkpointing: one directory per step, complete or absent, any layout.

Layout of a checkpoint root (``<logging.out_dir>/checkpoints``):

    step_000100/
        <role>/        one model state per trained model (train-rm: reward_model; train-dpo: policy; train-ppo:
                       actor and critic): dist_checkpointing of the model ("model.*"), its optimizer ("optimizer.*")
                       and the common part (LR schedule, model architecture, parallel layout)
        rng/           dist_checkpointing of every rank's RNG states (one entry per global rank)
        progress.json  ``TrainingProgress``: steps done, samples consumed, the data position and trainer state
        config.yaml    the resolved MegasegConfig of the run that wrote it
    latest             text: the name of the newest complete step directory

Every step directory holds ``megaseg-manifest.json`` (megaseg.integrity): the size and sha256 of each of its files,
recorded before the rename and checked (on rank 0) before anything of the step is read, so a truncated, emptied or
altered file is one error naming it. Loading executes nothing from the files (megaseg.checkpoint.safe_load).

A step directory is written as ``.tmp_step_000100`` and renamed once every rank has written every model, so a
directory named ``step_*`` always holds all the models of its step (PPO's actor and critic are committed together);
``latest`` is replaced atomically after the rename, and older steps are pruned only after that. Tensors are stored as
global shards (``sharded_state_dict``), so a checkpoint written at one tensor/pipeline-parallel layout loads at any
other.

A *model state* directory (``save_model_state`` / ``load_model_state``) is also what a finished reward model keeps
its weights in (megaseg.checkpoint.reward_model_dir).

dist_checkpointing's writer starts helper processes: scripts that save must guard their entry point with
``if __name__ == "__main__":``. Every rank must call the save and load functions (they are collective), and the
directory must be on a filesystem all ranks see.
"""
from __future__ import annotations

import dataclasses
import random
import re
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megaseg.atomic_io import replace_dir, write_json_atomic, write_text_atomic
from megaseg.checkpoint.safe_load import load_common_state, load_dist_checkpoint, load_tensors_metadata
from megaseg.integrity import MANIFEST_FILE as MANIFEST_NAME
from megaseg.integrity import check_on_rank_zero, read_json_file, verify_manifest, write_manifest
from megaseg.config import MegasegConfig, save_config
from megaseg.config.model import ModelConfig
from megaseg.models.architecture import architecture_differences, model_architecture
from megaseg.models.optimizer import load_optimizer_state, prepare_state_for_loading
from megaseg.parallel.collectives import barrier, is_rank_zero, rank, world_size
from megaseg.parallel.cpu_compat import cuda_device_redirect

STEP_DIR_PATTERN = re.compile(r"^step_(\d+)$")
LATEST_FILE = "latest"
RNG_DIR = "rng"
PROGRESS_FILE = "progress.json"
CHECKPOINT_METADATA = "metadata.json"  # what dist_checkpointing writes into every checkpoint directory
_RNG_KEY = "rng_state"


@dataclass(frozen=True)
class TrainingProgress:
    """Where training stands; saved in every checkpoint so that a resumed run continues the same data order."""

    step: int = 0  # optimizer steps (PPO: PPO steps) done
    consumed_samples: int = 0  # training samples (pairs, prompts) consumed over all data-parallel ranks
    epoch: int = 0
    # The sampler's position and any trainer state (PPO's KL coefficient); JSON-like values only.
    data_state: dict[str, Any] = field(default_factory=dict)


class TrainedModel(Protocol):
    """A model with what trains it (megaseg.training.common.optimizer.TrainingSetup); optimizer and scheduler may
    be None for weights only."""

    model: torch.nn.Module
    optimizer: Any
    scheduler: Any


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path  # the step directory that was loaded
    progress: TrainingProgress
    restored_rng: bool  # False when the parallel layout differs from the saving run's (streams are per rank)


def check_architecture(where: Path, saved: Optional[dict[str, Any]], model_cfg: ModelConfig) -> None:
    """ValueError naming every architecture field where the checkpoint and the model config disagree."""
    if saved is None:
        return  # written by a tool that records no architecture: the tensor-shape check still applies
    differences = architecture_differences(saved, model_cfg)
    if differences:
        listed = "; ".join(f"model.{name}: checkpoint {old!r}, config {new!r}" for name, (old, new) in differences.items())
        raise ValueError(
            f"checkpoint {where} was written for another architecture ({listed}); use the model config it was "
            "saved with (the config.yaml beside it) or a checkpoint of this model")


def check_tensor_shapes(where: Path, model_state: dict[str, Any], saved_tensors: dict[str, Any]) -> None:
    """ValueError for a model tensor the checkpoint lacks or holds with another global shape."""
    missing, mismatched, depths = [], [], set()
    for value in model_state.values():
        for sharded in _sharded_tensors(value):
            saved = saved_tensors.get(sharded.key)
            if saved is None:
                missing.append(sharded.key)
            elif tuple(saved.global_shape) != tuple(sharded.global_shape):
                mismatched.append(f"{sharded.key}: checkpoint {tuple(saved.global_shape)}, model "
                                  f"{tuple(sharded.global_shape)}")
                # megatron stacks a stage's layers on the first axis of each decoder.layers.* tensor
                if sharded.key.startswith("decoder.layers.") and saved.global_shape[1:] == sharded.global_shape[1:]:
                    depths.add((saved.global_shape[0], sharded.global_shape[0]))
    if mismatched:
        depth = ""
        if len(depths) == 1 and len(mismatched) == sum(key.startswith("decoder.layers.") for key in mismatched):
            (saved_layers, model_layers), = depths
            depth = (f" (the checkpoint has {saved_layers} decoder layers, model.num_layers={model_layers}; set "
                     "model.num_layers to the checkpoint's)")
        raise ValueError(f"checkpoint {where} does not fit this model{depth}; tensor shapes differ: "
                         + "; ".join(mismatched))
    if missing:
        raise ValueError(
            f"checkpoint {where} lacks model tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} (e.g. a "
            "reward-model checkpoint loaded as a language model, or a language model without its head)")


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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # Megatron DDP keeps the model in .module; the sharded state dict is the model's own.
    return getattr(model, "module", model)


def current_layout() -> dict[str, int]:
    return {"world_size": world_size(), "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size()}


def make_dir_collectively(path: Path) -> None:
    """Rank 0 creates ``path`` (dist_checkpointing.save needs it to exist), then every rank waits for it."""
    if is_rank_zero():
        path.mkdir(parents=True, exist_ok=True)
    barrier()


# --- one model's state ----------------------------------------------------------------------------------------


def _sharded_state(model: torch.nn.Module, optimizer: Any, *, is_loading: bool,
                   missing_ok: Sequence[str] = ()) -> dict[str, Any]:
    model_state = unwrap(model).sharded_state_dict()
    model_state = {key: value for key, value in model_state.items()
                   if not any(key.startswith(prefix) for prefix in missing_ok)}
    state: dict[str, Any] = {"model": model_state}
    if optimizer is not None:
        # The Adam state is keyed per layer: under layer-stacked keys a partly frozen model (rm.train_top_layers)
        # would cover only some layers of a stacked tensor with optimizer state, which dist_checkpointing refuses.
        per_layer = unwrap(model).sharded_state_dict(metadata={"non_homogeneous_layers": True})
        # The distributed optimizer's state in megatron's "fully_reshardable" form: gathered into per-parameter
        # tensors shaped like the weights, so it loads at any TP/PP/DP layout (0.16's default,
        # fully_sharded_model_space, needs ShardedTensor.flattened_range, which its dist_checkpointing refuses).
        # The plain optimizer ignores the key. The gather moves its buffers with .cuda(): redirected on CPU.
        if is_loading:
            prepare_state_for_loading(optimizer)
        with cuda_device_redirect():
            state["optimizer"] = optimizer.sharded_state_dict(
                per_layer, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    return state


def save_model_state(state_dir: Path, *, model: torch.nn.Module, model_cfg: ModelConfig, optimizer: Any = None,
                     scheduler: Any = None) -> None:
    """Write this rank's shard of ``model`` (plain or DDP-wrapped), its optimizer and LR schedule into the dist
    checkpoint ``state_dir``, with the architecture and parallel layout. Collective."""
    make_dir_collectively(state_dir)
    state = _sharded_state(model, optimizer, is_loading=False)
    state["model_architecture"] = model_architecture(model_cfg)
    state["layout"] = current_layout()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    _collect_write_results_in_process()
    dist_checkpointing.save(state, str(state_dir))


def _collect_write_results_in_process() -> None:
    """Give megatron's checkpoint writer an in-process results queue instead of the ``multiprocessing.Manager``
    queue it creates on first save: that Manager is a server process (with multiprocessing's resource tracker
    beside it) that outlives a run killed with SIGKILL. megaseg saves synchronously, so the writer's results are
    put and read in this very process (its forked file writers report through a queue of their own); megatron's
    asynchronous save, which would need the Manager, is not used."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def read_common_state(state_dir: Path) -> dict[str, Any]:
    """The non-tensor part of a model state (architecture, layout, LR schedule)."""
    if not (Path(state_dir) / CHECKPOINT_METADATA).is_file():
        raise ValueError(f"{state_dir} is not a megatron dist checkpoint (no {CHECKPOINT_METADATA})")
    return load_common_state(state_dir)


def load_model_state(state_dir: Path, *, model: torch.nn.Module, model_cfg: ModelConfig, optimizer: Any = None,
                     scheduler: Any = None, missing_ok: Sequence[str] = ()) -> None:
    """Load a model state written at any layout into this rank's shard of ``model`` (+ optimizer, scheduler).

    ``missing_ok``: prefixes of model keys the checkpoint may lack, which keep their current values (a scalar head
    on an SFT language model's weights). ValueError when the architecture or a tensor's shape differs. Collective."""
    if missing_ok and optimizer is not None:
        raise ValueError("missing_ok is for starting from another model's weights; load the optimizer state only "
                         "from a checkpoint of this very model (drop missing_ok or the optimizer)")
    state_dir = Path(state_dir)
    common = read_common_state(state_dir)
    check_architecture(state_dir, common.get("model_architecture"), model_cfg)
    state = _sharded_state(model, optimizer, is_loading=True, missing_ok=missing_ok)
    check_tensor_shapes(state_dir, state["model"], load_tensors_metadata(state_dir))
    loaded = load_dist_checkpoint(state, state_dir)
    result = unwrap(model).load_state_dict(loaded["model"], strict=not missing_ok)
    if missing_ok:
        unexpected = [key for key in result.missing_keys if not key.startswith(tuple(missing_ok))
                      and not key.endswith("_extra_state")]
        assert not unexpected and not result.unexpected_keys, (unexpected, result.unexpected_keys)
    if optimizer is not None:
        if "optimizer" not in loaded:
            raise ValueError(f"{state_dir} holds no optimizer state; load it without an optimizer (weights only)")
        load_optimizer_state(optimizer, loaded["optimizer"])
    if scheduler is not None:
        if "scheduler" not in common:
            raise ValueError(f"{state_dir} holds no LR-schedule state; load it without a scheduler")
        scheduler.load_state_dict(common["scheduler"])


# --- RNG states ----------------------------------------------------------------------------------------------


def _rng_states() -> dict[str, Any]:
    # Tensors, tuples and numbers only, so that they load with weights_only=True: numpy's key array as a tensor.
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {"python": random.getstate(),
              "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                        float(cached_gaussian)),
              "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    get_cuda_rng_tracker().set_states(states["tracker"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _rng_sharded_object(states: Optional[dict[str, Any]]) -> ShardedObject:
    # One entry per global rank: RNG streams belong to a rank, and only make sense at the same layout.
    return ShardedObject(_RNG_KEY, states, (world_size(),), (rank(),), replica_id=0)


def _save_rng(rng_dir: Path) -> None:
    make_dir_collectively(rng_dir)
    dist_checkpointing.save({_RNG_KEY: _rng_sharded_object(_rng_states()), "layout": current_layout()}, str(rng_dir))


def _load_rng(rng_dir: Path) -> bool:
    """Restore this rank's RNG states when the layout is the saving run's; False (with a warning) otherwise."""
    saved_layout = read_common_state(rng_dir).get("layout")
    if saved_layout != current_layout():
        warnings.warn(f"{rng_dir} was saved at parallel layout {saved_layout}, this run is {current_layout()}: RNG "
                      "states are per rank, so they are not restored (the models, optimizers and progress are)")
        return False
    loaded = load_dist_checkpoint({_RNG_KEY: _rng_sharded_object(None)}, rng_dir)
    _set_rng_states(loaded[_RNG_KEY])
    return True


# --- step directories ----------------------------------------------------------------------------------------


def save_training_checkpoint(root: str | Path, *, models: Mapping[str, TrainedModel], config: MegasegConfig,
                             progress: TrainingProgress, keep_last: Optional[int] = None) -> Path:
    """Write ``<root>/step_<progress.step>/`` with every model of ``models`` (role -> model, optimizer, schedule),
    atomically; point ``latest`` at it; keep only the newest ``keep_last``. Collective. Returns the step directory."""
    root = Path(root)
    final = root / step_dir_name(progress.step)
    tmp = root / f".tmp_{final.name}"
    if is_rank_zero():
        shutil.rmtree(tmp, ignore_errors=True)  # the leftover of a save that died part-way
    barrier()
    for role, trained in models.items():
        save_model_state(tmp / role, model=trained.model, model_cfg=config.model, optimizer=trained.optimizer,
                         scheduler=trained.scheduler)
    _save_rng(tmp / RNG_DIR)
    barrier()
    if is_rank_zero():
        write_json_atomic(tmp / PROGRESS_FILE, dataclasses.asdict(progress))
        save_config(config, tmp)
        write_manifest(tmp)
        replace_dir(tmp, final)
        write_text_atomic(root / LATEST_FILE, final.name + "\n")
        if keep_last is not None:
            for _, path in step_dirs(root)[:-keep_last]:
                shutil.rmtree(path)
    barrier()
    return final


def damaged_step_repair(step_dir: Path) -> str:
    """What to do about a step directory that fails its check (the resume commands that skip or drop it)."""
    return (f"This checkpoint cannot be resumed from: resume with checkpoint.on_damaged=previous (skips it and "
            f"continues from the newest intact step), delete {step_dir}, or start afresh with checkpoint.resume=false")


def verify_step_dir(step_dir: Path) -> None:
    """DamagedFileError naming the first file of ``step_dir`` that is missing, truncated or altered. One process."""
    step_dir = Path(step_dir)
    if not verify_manifest(step_dir, damaged_step_repair(step_dir)):
        raise ValueError(f"{step_dir} has no {MANIFEST_NAME}: it was not written by this megaseg (or its manifest "
                         f"was deleted). {damaged_step_repair(step_dir)}")


def read_progress(step_dir: Path) -> TrainingProgress:
    path = Path(step_dir) / PROGRESS_FILE
    content = read_json_file(path, "the training progress of the step", damaged_step_repair(Path(step_dir)))
    try:
        return TrainingProgress(**content)
    except TypeError as error:
        raise ValueError(f"{path} is not a training-progress record ({error}). "
                         f"{damaged_step_repair(Path(step_dir))}") from None


def load_training_checkpoint(step_dir: Path, *, models: Mapping[str, TrainedModel],
                             model_cfg: ModelConfig) -> LoadedCheckpoint:
    """Restore every model of ``models`` (weights, optimizer, schedule) and the RNG states from ``step_dir``.
    Collective."""
    step_dir = Path(step_dir)
    check_on_rank_zero(lambda: verify_step_dir(step_dir))
    missing = [role for role in models if not (step_dir / role).is_dir()]
    if missing:
        raise ValueError(f"{step_dir} holds no {', '.join(missing)} (it has {sorted(p.name for p in step_dir.iterdir())});"
                         " it was written by another trainer. Point logging.out_dir at this trainer's run, or start a "
                         "fresh run (checkpoint.resume=false)")
    for role, trained in models.items():
        load_model_state(step_dir / role, model=trained.model, model_cfg=model_cfg, optimizer=trained.optimizer,
                         scheduler=trained.scheduler)
    restored_rng = _load_rng(step_dir / RNG_DIR)
    return LoadedCheckpoint(path=step_dir, progress=read_progress(step_dir), restored_rng=restored_rng)


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete step under ``root``, oldest first."""
    found = []
    for path in root.iterdir() if root.is_dir() else ():
        match = STEP_DIR_PATTERN.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest complete step directory under ``root`` (per ``latest``, else the highest step), or None."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir():
            return candidate
        warnings.warn(f"{pointer} names {candidate.name}, which does not exist; using the highest step instead")
    steps = step_dirs(root)
    return steps[-1][1] if steps else None
