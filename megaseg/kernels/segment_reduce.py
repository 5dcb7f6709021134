"""Ragged segment reductions in Triton: e(x, y) = mean / sum / min / last of the reward head's outputs at the segment
ends of each sequence, forward and backward (the reward-model loss trains through it).

Layout: ``values`` ``[N]`` and ``ends`` ``[N]`` bool, flat; sequence b owns positions ``cu_seqlens[b] :
cu_seqlens[b + 1]`` (the unpadded THD layout; a right-padded ``[batch, seq]`` batch is the same with
``cu_seqlens = 0, seq, 2 seq, ...``: ``aggregate_padded``). Only the ends are read, with masked loads, so garbage or
NaN elsewhere cannot leak into the result or its gradient (``megaseg.algorithms.aggregation``'s promise).

One program per sequence walks its positions in blocks of ``BLOCK`` and keeps the running sum, the number of ends
T, the running min with its number of ties and the last end: one read of ``values`` and ``ends``. The backward
writes the gradient of every position of the sequence in one pass: ``g`` at the ends (sum), ``g / T`` (mean), ``g``
at the last end (last), ``g / ties`` at the ends holding the min (min: how torch's ``amin`` shares a tied gradient).

Conventions of the torch reference ``megaseg.algorithms.aggregation`` (which ``segment_reduce_reference`` pads into):
a sequence without an end gets 0 (mean, sum, last) or +inf (min). Accumulation in fp32, or fp64 for fp64 values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Whether these kernels run in Triton's interpreter (decided when ``triton.jit`` wraps them, i.e. now).
INTERPRETED = bool(triton.knobs.runtime.interpret)
HOW_CODES = {"sum": 0, "mean": 1, "min": 2, "last": 3}
BLOCK = 256


@triton.jit
def _segment_reduce_forward(values_ptr, ends_ptr, cu_ptr, out_ptr, count_ptr, aux_ptr,
                            HOW: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    start = tl.load(cu_ptr + row)
    stop = tl.load(cu_ptr + row + 1)
    lanes = tl.arange(0, BLOCK)
    total = tl.zeros((), dtype=ACC)
    best = tl.full((), float("inf"), ACC)
    count = tl.zeros((), dtype=tl.int64)
    ties = tl.zeros((), dtype=tl.int64)
    last = tl.full((), -1, tl.int64)
    for block_start in range(start, stop, BLOCK):
        offs = block_start + lanes
        end = tl.load(ends_ptr + offs, mask=offs < stop, other=0) != 0
        v = tl.load(values_ptr + offs, mask=end, other=0.0).to(ACC)
        total += tl.sum(tl.where(end, v, 0.0), axis=0)
        count += tl.sum(end.to(tl.int64), axis=0)
        last = tl.maximum(last, tl.max(tl.where(end, offs.to(tl.int64), -1), axis=0))
        candidate = tl.where(end, v, float("inf"))
        block_min = tl.min(candidate, axis=0)
        block_ties = tl.sum((end & (candidate == block_min)).to(tl.int64), axis=0)
        ties = tl.where(block_min < best, block_ties, tl.where(block_min == best, ties + block_ties, ties))
        best = tl.minimum(best, block_min)
    if HOW == 0:
        out = total
        aux = count
    elif HOW == 1:
        out = total / tl.maximum(count, 1).to(ACC)
        aux = count
    elif HOW == 2:
        out = best
        aux = ties
    else:
        out = tl.where(last >= 0, tl.load(values_ptr + tl.maximum(last, 0), mask=last >= 0, other=0.0).to(ACC), 0.0)
        aux = last
    tl.store(out_ptr + row, out.to(out_ptr.dtype.element_ty))
    tl.store(count_ptr + row, count)
    tl.store(aux_ptr + row, aux)


@triton.jit
def _segment_reduce_backward(values_ptr, ends_ptr, cu_ptr, out_ptr, count_ptr, aux_ptr, grad_out_ptr, grad_ptr,
                             HOW: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    start = tl.load(cu_ptr + row)
    stop = tl.load(cu_ptr + row + 1)
    g = tl.load(grad_out_ptr + row).to(ACC)
    count = tl.load(count_ptr + row)
    aux = tl.load(aux_ptr + row)
    best = tl.load(out_ptr + row).to(ACC)
    lanes = tl.arange(0, BLOCK)
    for block_start in range(start, stop, BLOCK):
        offs = block_start + lanes
        inside = offs < stop
        end = tl.load(ends_ptr + offs, mask=inside, other=0) != 0
        if HOW == 0:
            grad = tl.where(end, g, 0.0)
        elif HOW == 1:
            grad = tl.where(end, g / tl.maximum(count, 1).to(ACC), 0.0)
        elif HOW == 2:
            v = tl.load(values_ptr + offs, mask=end, other=0.0).to(ACC)
            grad = tl.where(end & (v == best), g / tl.maximum(aux, 1).to(ACC), 0.0)
        else:
            grad = tl.where(offs.to(tl.int64) == aux, g, 0.0)
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=inside)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class _SegmentReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: torch.Tensor, ends: torch.Tensor, cu_seqlens: torch.Tensor, how: str) -> torch.Tensor:
        batch = cu_seqlens.numel() - 1
        out = values.new_empty(batch)
        count = torch.empty(batch, dtype=torch.int64, device=values.device)
        aux = torch.empty_like(count)
        if batch:
            _segment_reduce_forward[(batch,)](values, ends, cu_seqlens, out, count, aux, HOW=HOW_CODES[how],
                                              ACC=_acc_dtype(values.dtype), BLOCK=BLOCK)
        ctx.save_for_backward(values, ends, cu_seqlens, out, count, aux)
        ctx.how = how
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        values, ends, cu_seqlens, out, count, aux = ctx.saved_tensors
        grad = torch.zeros_like(values)
        batch = cu_seqlens.numel() - 1
        if batch:
            _segment_reduce_backward[(batch,)](values, ends, cu_seqlens, out, count, aux, grad_out.contiguous(), grad,
                                               HOW=HOW_CODES[ctx.how], ACC=_acc_dtype(values.dtype), BLOCK=BLOCK)
        return grad, None, None, None


def _check_layout(values: torch.Tensor, ends: torch.Tensor, cu_seqlens: torch.Tensor, how: str) -> None:
    if how not in HOW_CODES:
        raise ValueError(f"aggregation={how!r} is not allowed; choose one of {list(HOW_CODES)}")
    if values.dim() != 1 or ends.shape != values.shape or ends.dtype != torch.bool:
        raise ValueError(f"values and ends must be [N] tensors, ends bool; got values {tuple(values.shape)}, "
                         f"ends {tuple(ends.shape)} {ends.dtype}")
    if not values.is_floating_point():
        raise ValueError(f"values must be a floating-point tensor, got dtype {values.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be an integer [batch + 1] tensor, got {tuple(cu_seqlens.shape)} "
                         f"{cu_seqlens.dtype}")


def segment_reduce(values: torch.Tensor, ends: torch.Tensor, cu_seqlens: torch.Tensor, how: str = "mean"
                   ) -> torch.Tensor:
    """``[batch]`` e(x, y) of every sequence of the flat layout (module docstring): ``values`` ``[N]`` float,
    ``ends`` ``[N]`` bool, ``cu_seqlens`` ``[batch + 1]`` int, non-decreasing, within ``[0, N]``. Differentiable with
    respect to ``values``."""
    _check_layout(values, ends, cu_seqlens, how)
    return _SegmentReduce.apply(values.contiguous(), ends.contiguous().view(torch.uint8),
                                cu_seqlens.to(torch.int64).contiguous(), how)


def padded_cu_seqlens(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """``[batch + 1]`` 0, seq, 2 seq, ...: a right-padded ``[batch, seq]`` grid as a flat layout."""
    return torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int64, device=device)


def aggregate_padded(values: torch.Tensor, ends: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """``aggregate_segment_rewards`` of ``[batch, seq]`` ``values`` and ``ends`` by the kernel (no validation: the
    caller's)."""
    batch, seq = values.shape
    return segment_reduce(values.reshape(-1), ends.reshape(-1), padded_cu_seqlens(batch, seq, values.device), how)


def segment_reduce_reference(values: torch.Tensor, ends: torch.Tensor, cu_seqlens: torch.Tensor, how: str = "mean"
                             ) -> torch.Tensor:
    """The torch path for the flat layout: each sequence padded into a ``[batch, longest]`` row (ends False in the
    padding), then ``megaseg.algorithms.aggregation`` without validation."""
    from megaseg.algorithms.aggregation import aggregate_segment_rewards  # (the algorithms layer dispatches here)
    from megaseg.kernels.dispatch import kernels_mode

    _check_layout(values, ends, cu_seqlens, how)
    lengths = cu_seqlens.diff()
    batch, longest = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    columns = torch.arange(max(longest, 1), device=values.device)
    inside = columns < lengths[:, None]
    index = (cu_seqlens[:-1, None] + columns).clamp(max=max(values.numel() - 1, 0))
    padded_ends = torch.zeros(batch, max(longest, 1), dtype=torch.bool, device=values.device)
    padded_values = values.new_zeros(batch, max(longest, 1))
    if values.numel():
        padded_ends = ends[index] & inside
        padded_values = torch.where(inside, values[index], padded_values)
    with kernels_mode("torch"):
        return aggregate_segment_rewards(padded_values, padded_ends, how, validate=False)
