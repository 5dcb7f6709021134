"""What a trainer steps for one model: freezing all but the top layers, the LR schedule, and ``TrainingSetup``
(the DDP-wrapped model, megatron's optimizer and the schedule, from megaseg.models.optimizer)."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import MegatronModule

from megaseg.config.training import OptimizerConfig
from megaseg.models.optimizer import (StepResult, build_optimizer, optimizer_step, resolve_distributed_optimizer,
                                     wrap_in_ddp, zero_grads)

# megaseg scheduler name -> megatron's lr_decay_style.
_DECAY_STYLES = {"cosine": "cosine", "linear": "linear", "constant": "constant"}


def freeze_all_but_top_layers(model: MegatronModule, num_trainable_layers: Optional[int]) -> int:
    """Leave only the top `num_trainable_layers` transformer layers, the final norm and the head/output layer
    trainable (None: everything). Call before wrapping in DDP. Returns the number of trainable parameters on this
    rank (possibly 0 on an early pipeline stage)."""
    if num_trainable_layers is None:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    num_layers = model.config.num_layers
    if not 0 < num_trainable_layers <= num_layers:
        raise ValueError(
            f"rm.train_top_layers={num_trainable_layers} must lie in [1, model.num_layers={num_layers}]")
    for param in model.parameters():
        param.requires_grad_(False)
    trainable: list[torch.nn.Module] = []
    # layer_number is the 1-based global index, whatever the pipeline stage.
    trainable += [layer for layer in model.decoder.layers if layer.layer_number > num_layers - num_trainable_layers]
    for name in ("final_layernorm",):
        if getattr(model.decoder, name, None) is not None:
            trainable.append(getattr(model.decoder, name))
    for name in ("head", "output_layer"):  # ScalarHeadModel / GPTModel
        if getattr(model, name, None) is not None:
            trainable.append(getattr(model, name))
    for module in trainable:
        for param in module.parameters():
            param.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def num_warmup_steps(opt_cfg: OptimizerConfig, total_steps: int) -> int:
    """ceil(warmup_ratio * total_steps) (OpenRLHF's rounding), kept below total_steps so that decay has a step."""
    warmup = math.ceil(opt_cfg.warmup_ratio * total_steps)
    if warmup >= total_steps and opt_cfg.warmup_ratio > 0:
        warnings.warn(f"optimizer.warmup_ratio={opt_cfg.warmup_ratio} covers all {total_steps} steps; "
                      f"warming up for {total_steps - 1} instead")
        warmup = total_steps - 1
    return warmup


def build_lr_scheduler(optimizer, opt_cfg: OptimizerConfig, total_steps: int) -> OptimizerParamScheduler:
    """Linear warm-up from 0 to lr, then `opt_cfg.scheduler` decay to min_lr_ratio * lr at `total_steps`.

    Call `scheduler.step(1)` after every optimizer step; its state_dict goes into checkpoints."""
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1 to build a learning-rate schedule")
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=opt_cfg.lr, min_lr=opt_cfg.lr * opt_cfg.min_lr_ratio,
        lr_warmup_steps=num_warmup_steps(opt_cfg, total_steps), lr_decay_steps=total_steps,
        lr_decay_style=_DECAY_STYLES[opt_cfg.scheduler], start_wd=opt_cfg.weight_decay,
        end_wd=opt_cfg.weight_decay, wd_incr_steps=total_steps, wd_incr_style="constant",
        # A resumed run continues the schedule saved in its checkpoint.
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False)


@dataclass
class TrainingSetup:
    """What a trainer steps: the DDP-wrapped model, megatron's optimizer and the LR schedule."""

    model: DistributedDataParallel
    optimizer: object  # megatron.core.optimizer.MegatronOptimizer
    scheduler: OptimizerParamScheduler
    max_grad_norm: float

    def zero_grads(self) -> None:
        zero_grads(self.model, self.optimizer)

    def step(self) -> StepResult:
        result = optimizer_step(self.optimizer, self.max_grad_norm)
        if result.updated:
            self.scheduler.step(increment=1)
        return result


def setup_training(model: MegatronModule, opt_cfg: OptimizerConfig, total_steps: int,
                   train_top_layers: Optional[int] = None) -> TrainingSetup:
    """Freeze (optionally), wrap in DDP, build optimizer and schedule, in that order (DDP only buffers trainable
    parameters, and the optimizer only sees what DDP buffers)."""
    freeze_all_but_top_layers(model, train_top_layers)
    ddp_model = wrap_in_ddp(model, resolve_distributed_optimizer(opt_cfg.use_distributed_optimizer))
    optimizer = build_optimizer(ddp_model, opt_cfg)
    scheduler = build_lr_scheduler(optimizer, opt_cfg, total_steps)
    return TrainingSetup(model=ddp_model, optimizer=optimizer, scheduler=scheduler, max_grad_norm=opt_cfg.grad_clip)
