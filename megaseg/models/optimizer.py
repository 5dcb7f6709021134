"""Driving megatron's training machinery for one model: DDP wrapping, megatron's Adam(W), and the optimizer step
with gradient clipping. (The pipeline schedules are megaseg.models.pipeline.) Both wrap megatron's CUDA-only code
paths in the CPU shim themselves, so nothing above this layer imports it.

Gradients: megatron's DistributedDataParallel accumulates them into `param.main_grad` buffers and reduces them over
data-parallel ranks (and ties embeddings across pipeline stages) in `finalize_model_grads`, which the pipeline
schedule calls at the end of `megaseg.models.pipeline.forward_backward`. A plain torch optimizer would never see
them (they are not in `param.grad`), hence megatron's optimizer.

Distributed optimizer (megatron's ZeRO-1, `optimizer.use_distributed_optimizer`): DDP reduce-scatters the
gradients so that each data-parallel rank holds 1/DP of them, the optimizer keeps fp32 main weights and Adam moments
only for that shard, and the updated shards are all-gathered into every rank's weights after the step. The norm below
then sums disjoint shards over the whole world (megatron's grad-stats group), which gives the same global norm.

Clipping: megatron's own `clip_grad` asserts CUDA tensors, so megatron's config always gets clip_grad=0 and
`optimizer_step` clips with torch ops, the way megatron does it: the global L2 norm over the gradients that are not
tensor-parallel duplicates or shared copies, all-reduced over the model-parallel group, and every gradient scaled by
`max_norm / (norm + 1e-6)` when that is below 1. One code path on CPU and GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from typing import Optional

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.transformer.module import MegatronModule

from megaseg.config.training import OptimizerConfig
from megaseg.parallel.cpu_compat import cuda_device_redirect


def resolve_distributed_optimizer(setting: Optional[bool]) -> bool:
    """`optimizer.use_distributed_optimizer`: an explicit value as given; None -> on when this run has more than
    one data-parallel rank and CUDA (on CPU the sharding saves nothing worth the extra collectives)."""
    if setting is not None:
        return setting
    return torch.cuda.is_available() and parallel_state.get_data_parallel_world_size() > 1


def wrap_in_ddp(model: MegatronModule, use_distributed_optimizer: bool = False) -> DistributedDataParallel:
    """Megatron DDP with fp32 gradient buffers (reduce-scattered instead of all-reduced for the distributed
    optimizer); also points the model config's hooks (used by the pipeline schedule) at this wrapper's gradient
    synchronisation."""
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=use_distributed_optimizer)
    ddp_model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    model.config.no_sync_func = ddp_model.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp_model


def megatron_optimizer_config(opt_cfg: OptimizerConfig, params_dtype: torch.dtype,
                              use_distributed_optimizer: bool = False) -> MegatronOptimizerConfig:
    return MegatronOptimizerConfig(
        optimizer="adam", lr=opt_cfg.lr, min_lr=opt_cfg.lr * opt_cfg.min_lr_ratio,
        weight_decay=opt_cfg.weight_decay, adam_beta1=opt_cfg.adam_beta1, adam_beta2=opt_cfg.adam_beta2,
        adam_eps=opt_cfg.adam_eps, params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16, use_distributed_optimizer=use_distributed_optimizer,
        # See the module docstring: clipping happens in optimizer_step.
        clip_grad=0.0)


def build_optimizer(ddp_model: DistributedDataParallel, opt_cfg: OptimizerConfig):
    """Megatron's Adam(W) over the trainable parameters (no weight decay on norms and biases, megatron's rule);
    distributed exactly when `ddp_model` was wrapped for it (the two must agree on the gradient buffers)."""
    config = megatron_optimizer_config(opt_cfg, ddp_model.config.params_dtype,
                                       ddp_model.ddp_config.use_distributed_optimizer)
    with cuda_device_redirect():  # the optimizer allocates its loss-scale tensor with device="cuda"
        optimizer = get_megatron_optimizer(config, [ddp_model])
    # fp16 runs scale the loss before backward; the pipeline schedule applies this hook.
    ddp_model.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def load_optimizer_state(optimizer, state_dict: dict) -> None:
    """`optimizer.load_state_dict` for the state `dist_checkpointing.load` returned (plain or distributed).

    megatron-core 0.16's distributed optimizer, loading its "fully_reshardable" state into torch's Adam (no TE / apex
    FusedAdam: always on CPU), copies every per-parameter state key from the checkpoint, including torch's `step`,
    which that format keeps in the parameter groups instead (and has already restored from them): a KeyError. Here
    the parameter's own, already restored, `step` stands in for the missing one, and is un-shared afterwards."""
    patched = []
    for inner in _inner_optimizers(optimizer):
        if isinstance(inner, DistributedOptimizer):
            original = inner._set_main_param_and_optimizer_states

            def set_states(model_param, tensors, inner=inner, original=original):
                group_index, group_order = inner.model_param_group_index_map[model_param]
                main_param = inner.optimizer.param_groups[group_index]["params"][group_order]
                current = inner.optimizer.state[main_param]
                if "step" in current and "step" not in tensors:
                    tensors = {**tensors, "step": current["step"]}
                original(model_param, tensors)

            inner._set_main_param_and_optimizer_states = set_states
            patched.append(inner)
    try:
        with cuda_device_redirect():  # the distributed optimizer scatters its state through .cuda() buffers
            optimizer.load_state_dict(state_dict)
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states  # back to the class's method
    for inner in patched:
        # The same load gives every parameter one shared `step` tensor; torch's foreach Adam then adds 1 to it once
        # per parameter and every step (3 -> 12 after one step of a 9-tensor shard: wrong bias corrections).
        for param_state in inner.optimizer.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()


@torch.no_grad()
def prepare_state_for_loading(optimizer) -> None:
    """Give a distributed optimizer that has not stepped yet its Adam state (and `step`) tensors, which its
    `sharded_state_dict(is_loading=True)` reads to lay out the load (the plain optimizer creates them itself).

    megatron's own dummy step: zero gradients through Adam(W), so weight decay moves the weights once; the load that
    follows overwrites weights, main weights and state alike."""
    for inner in _inner_optimizers(optimizer):
        if isinstance(inner, DistributedOptimizer) and not inner.optimizer.state:
            with cuda_device_redirect():
                inner._init_optimizer_states_with_dummy_values()


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
