"""Shared material of the fault-injection suite (tests/fault_injection): a real two-model training checkpoint and
reward-model directory from tiny models, the faults applied to a file, and a payload that proves code ran."""
from __future__ import annotations

import os
import pickle
import random
import shutil
import signal
from pathlib import Path

import torch

ROLES = ("actor", "critic")  # a PPO-shaped checkpoint: two models committed in one step directory
SEQ = 8


class Payload:
    """Unpickling this creates ``marker`` (harmless evidence that a loader executed code from the file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def tiny_config(out_dir: str | Path, **overrides):
    from megaseg.config import load_config

    settings = {"seed": 3, "logging.out_dir": str(out_dir), "logging.tensorboard": False}
    settings.update(overrides)
    return load_config(None, [f"{key}={value}" for key, value in settings.items()])


def build_trained(config, seed: int = 7):
    """A tiny scalar-head model with Adam and an LR schedule, stepped once (so the optimizer has state)."""
    from megaseg.config.training import OptimizerConfig
    from megaseg.models import MicroBatch, build_reward_model, forward_backward
    from megaseg.training.common.optimizer import setup_training

    model = build_reward_model(config.model, config.parallel, seed=seed)
    training = setup_training(model, OptimizerConfig(lr=1e-2, warmup_ratio=0.0), total_steps=10)
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(seed))
    training.zero_grads()
    forward_backward(training.model, [MicroBatch(ids, torch.arange(SEQ).expand(2, SEQ).contiguous())],
                     lambda values, batch: (values.pow(2).mean(), {}))
    training.step()
    return training


def apply_fault(path: Path, fault: str, seed: int = 0) -> None:
    """truncate (keep the first half), zero (empty file), random (same size, random bytes), delete."""
    data = path.read_bytes()
    if fault == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif fault == "zero":
        path.write_bytes(b"")
    elif fault == "random":
        path.write_bytes(random.Random(seed).randbytes(max(len(data), 16)))
    elif fault == "delete":
        path.unlink()
    else:
        raise ValueError(fault)


FAULTS = ("truncate", "zero", "random", "delete")


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def repickle_metadata(metadata_path: Path, payload: Payload) -> None:
    """Rewrite a dist checkpoint's .metadata (a trusted file of our own, read here with plain pickle) with
    ``payload`` inside it, as an attacker would."""
    with open(metadata_path, "rb") as handle:
        metadata = pickle.load(handle)  # noqa: S301 -- test material: our own file, before planting
    metadata.planner_data = dict(metadata.planner_data or {}, planted=payload)
    with open(metadata_path, "wb") as handle:
        pickle.dump(metadata, handle)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def die_after_saving(trainer_class, step: int) -> None:
    """Make every ``trainer_class`` of this process SIGKILL it right after writing the checkpoint of ``step`` (no
    clean-up runs): the run dies with a complete checkpoint behind it, as a preempted job without warning would."""
    save = trainer_class.save

    def save_then_die(self, progress):
        path = save(self, progress)
        if progress.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    trainer_class.save = save_then_die
