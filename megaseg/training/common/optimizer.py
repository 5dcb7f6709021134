"""Megatron's optimizer for one model: DDP wrapping, Adam(W), gradient clipping and the LR schedule.

Gradients: megatron's DistributedDataParallel accumulates them into `param.main_grad` buffers and reduces them over
data-parallel ranks (and ties embeddings across pipeline stages) in `finalize_model_grads`, which the pipeline
schedule calls at the end of `megaseg.models.pipeline.forward_backward`. A plain torch optimizer would never see
them (they are not in `param.grad`), hence megatron's optimizer.

Clipping: megatron's own `clip_grad` asserts CUDA tensors, so megatron's config always gets clip_grad=0 and
`optimizer_step` clips with torch ops, the way megatron does it: the global L2 norm over the gradients that are not
tensor-parallel duplicates or shared copies, all-reduced over the model-parallel group, and every gradient scaled by
`max_norm / (norm + 1e-6)` when that is below 1. One code path on CPU and GPU.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import MegatronModule

from megaseg.config.training import OptimizerConfig
from megaseg.parallel.cpu_compat import cuda_device_redirect

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


def wrap_in_ddp(model: MegatronModule) -> DistributedDataParallel:
    """Megatron DDP with fp32 gradient buffers; also points the model config's hooks (used by the pipeline
    schedule) at this wrapper's gradient synchronisation."""
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    ddp_model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    model.config.no_sync_func = ddp_model.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp_model


def megatron_optimizer_config(opt_cfg: OptimizerConfig, params_dtype: torch.dtype) -> MegatronOptimizerConfig:
    return MegatronOptimizerConfig(
        optimizer="adam", lr=opt_cfg.lr, min_lr=opt_cfg.lr * opt_cfg.min_lr_ratio,
        weight_decay=opt_cfg.weight_decay, adam_beta1=opt_cfg.adam_beta1, adam_beta2=opt_cfg.adam_beta2,
        adam_eps=opt_cfg.adam_eps, params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16, use_distributed_optimizer=False,
        # See the module docstring: clipping happens in optimizer_step.
        clip_grad=0.0)


def build_optimizer(ddp_model: DistributedDataParallel, opt_cfg: OptimizerConfig):
    """Megatron's Adam(W) over the trainable parameters (no weight decay on norms and biases, megatron's rule)."""
    config = megatron_optimizer_config(opt_cfg, ddp_model.config.params_dtype)
    with cuda_device_redirect():  # the optimizer allocates its loss-scale tensor with device="cuda"
        optimizer = get_megatron_optimizer(config, [ddp_model])
    # fp16 runs scale the loss before backward; the pipeline schedule applies this hook.
    ddp_model.config.grad_scale_func = optimizer.scale_loss
    return optimizer


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


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _grads_for_norm(inner) -> list[torch.Tensor]:
    """Gradients that count towards the norm (no tensor-parallel duplicates, no shared copies)."""
    # megatron-core renamed the method (0.16: get_main_grads_for_grad_norm; 0.19: get_grads_for_grad_norm).
    if hasattr(inner, "get_grads_for_grad_norm"):
        return inner.get_grads_for_grad_norm()
    return inner.get_main_grads_for_grad_norm()


@torch.no_grad()
def clip_grad_norm(optimizer, max_norm: float) -> float:
    """The global gradient L2 norm (before clipping); scales all gradients so it is <= max_norm (0: no clipping)."""
    squares = []
    group = None
    for inner in _inner_optimizers(optimizer):
        grads = _grads_for_norm(inner)
        squares += [grad.detach().float().pow(2).sum() for grad in grads]
        group = inner.get_grad_stats_parallel_group()
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    norm = float(total.sqrt())
    if max_norm > 0:
        coefficient = max_norm / (norm + 1e-6)
        if coefficient < 1.0:
            for inner in _inner_optimizers(optimizer):
                grads = [param.grad for param in inner.get_parameters() if param.grad is not None]
                if grads:  # a pipeline stage whose layers are all frozen has none
                    torch._foreach_mul_(grads, coefficient)
    return norm


@dataclass(frozen=True)
class StepResult:
    updated: bool  # False when fp16 loss scaling found inf/nan gradients and skipped the update
    grad_norm: float  # before clipping; nan when skipped


def optimizer_step(optimizer, max_grad_norm: float) -> StepResult:
    """Gradients (already reduced by the schedule) -> clip -> Adam update of the model's parameters."""
    with cuda_device_redirect():
        found_inf = optimizer.prepare_grads()
        if found_inf:
            return StepResult(updated=False, grad_norm=float("nan"))
        grad_norm = clip_grad_norm(optimizer, max_grad_norm)
        updated = optimizer.step_with_ready_grads()
    return StepResult(updated=bool(updated), grad_norm=grad_norm)


def zero_grads(ddp_model: DistributedDataParallel, optimizer) -> None:
    """Clear the DDP gradient buffers and the optimizer's gradients before the next forward_backward."""
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()


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
    ddp_model = wrap_in_ddp(model)
    optimizer = build_optimizer(ddp_model, opt_cfg)
    scheduler = build_lr_scheduler(optimizer, opt_cfg, total_steps)
    return TrainingSetup(model=ddp_model, optimizer=optimizer, scheduler=scheduler, max_grad_norm=opt_cfg.grad_clip)
