"""Driving megatron's training machinery for one model: DDP wrapping, megatron's Adam(W), and the optimizer step
with gradient clipping. (The pipeline schedules are megaseg.models.pipeline.) Both wrap megatron's CUDA-only code
paths in the CPU shim themselves, so nothing above this layer imports it.

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

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.transformer.module import MegatronModule

from megaseg.config.training import OptimizerConfig
from megaseg.parallel.cpu_compat import cuda_device_redirect


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
