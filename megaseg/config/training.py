"""Optimizer, schedule, logging and checkpointing: shared by every trainer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megaseg.config._checks import check_choice, check_non_negative, check_positive, check_range

SCHEDULERS = ("cosine", "constant", "linear")
ON_DAMAGED_CHECKPOINT = ("previous", "error")


@dataclass(frozen=True)
class OptimizerConfig:
    """Adam with the paper's betas; cosine decay to min_lr_ratio * lr after a linear warm-up."""

    lr: float = 1e-6
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    # Max global gradient norm; 0 disables clipping.
    grad_clip: float = 1.0
    # Megatron's distributed optimizer (ZeRO-1: the fp32 main weights and Adam moments sharded over the
    # data-parallel ranks, gradients reduce-scattered, weights all-gathered after the step). None: on wherever
    # data parallelism > 1 on GPUs, off on CPU; true/false force it.
    use_distributed_optimizer: Optional[bool] = None

    def __post_init__(self) -> None:
        check_positive("optimizer.lr", self.lr)
        check_range("optimizer.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_range("optimizer.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_choice("optimizer.scheduler", self.scheduler, SCHEDULERS)
        check_range("optimizer.adam_beta1", self.adam_beta1, 0.0, 1.0)
        check_range("optimizer.adam_beta2", self.adam_beta2, 0.0, 1.0)
        check_non_negative("optimizer.weight_decay", self.weight_decay)
        check_non_negative("optimizer.grad_clip", self.grad_clip)


@dataclass(frozen=True)
class LoggingConfig:
    out_dir: str = "runs/default"
    log_every: int = 1
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "megaseg"
    progress_bar: bool = True

    def __post_init__(self) -> None:
        check_positive("logging.log_every", self.log_every)


@dataclass(frozen=True)
class CheckpointConfig:
    # Save every N optimizer steps (0: only at the end).
    save_every: int = 0
    # Resume from the latest checkpoint under <logging.out_dir>/checkpoints when one exists.
    resume: bool = True
    keep_last: Optional[int] = 2
    # When the latest checkpoint fails its integrity check on resume: "previous" warns, naming it, and resumes from
    # the newest intact one; "error" stops with the error.
    on_damaged: str = "previous"

    def __post_init__(self) -> None:
        check_non_negative("checkpoint.save_every", self.save_every)
        check_choice("checkpoint.on_damaged", self.on_damaged, ON_DAMAGED_CHECKPOINT)
        check_positive("checkpoint.keep_last", self.keep_last, allow_none=True)
