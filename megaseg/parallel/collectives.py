"""The collectives every layer above uses, written once: who is rank 0, barriers, sums of statistics across ranks.

Each works without an initialised process group too (one process: rank 0 of 1, sums are the local values), so the
same code runs in single-process tools and tests.

Statistics convention: a trainer or scorer keeps its statistics as SUMS in one float64 vector per rank, so that
micro-batches, data-parallel ranks and pipeline stages combine by addition and every mean is taken once at the end.
Only the last pipeline stage computes them, and the tp x cp ranks of one model replica hold identical copies:
``sum_over_replicas`` sums over the world and divides by that count.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from megaseg.parallel.initialize import ParallelContext


def is_distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """The global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_rank_zero() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def print_rank_zero(text: str) -> None:
    if is_rank_zero():
        print(text, flush=True)


def sum_across_ranks(local: torch.Tensor, *, group: Optional[Any] = None,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """``local`` summed over ``group`` (default: the world), as a new tensor on the CPU.

    ``device``: where the reduction runs (NCCL reduces device tensors only; the context's device); None keeps it."""
    total = local.detach().clone() if device is None else local.detach().to(device, copy=True)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.cpu()


def sum_over_replicas(local: torch.Tensor, parallel_ctx: ParallelContext) -> torch.Tensor:
    """Statistics of the whole global batch: the world sum divided by the tp x cp identical copies per replica
    (the other pipeline stages contribute zeros). See the module docstring."""
    total = sum_across_ranks(local, device=parallel_ctx.device)
    return total / (parallel_ctx.tp_size * parallel_ctx.cp_size)


def sum_over_data_parallel(local: torch.Tensor, parallel_ctx: ParallelContext) -> torch.Tensor:
    """``local`` summed over the data-parallel group: statistics every rank of a replica already agrees on
    (e.g. rollout statistics computed on every stage), over the whole batch."""
    return sum_across_ranks(local, group=parallel_ctx.dp_group, device=parallel_ctx.device)


def gather_objects(local: Any) -> list[Any]:
    """Every rank's picklable ``local``, in rank order (``[local]`` without a process group)."""
    if not is_distributed():
        return [local]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def merge_dicts_across_ranks(local: dict) -> dict:
    """The union of every rank's dict (ranks hold disjoint keys, e.g. the pairs each data-parallel replica scored)."""
    merged: dict = {}
    for part in gather_objects(local):
        merged.update(part or {})
    return merged
