"""Zeroing a tensor outside a mask without reading what is there, and mask reductions, cheaply on CPU and GPU.

``torch.where(mask, x, 0)`` is the obvious way, but its CPU kernel is scalar: at ``[64, 2048]`` it takes about 20x as
long as an elementwise add. Multiplying by the mask is no substitute, because garbage outside the mask (the raw head
output at a prompt position, a log-prob of padding) survives it: NaN * 0 = NaN, inf * 0 = NaN. Multiplying the bit
pattern of every entry, viewed as an integer of the same width, by the 0/1 mask is both exact and cheap: entries under
the mask are returned bit for bit (NaN included), all others become +0.0 whatever they held, and it is one vectorised
integer op on CPU and one kernel on GPU. The bit view has no gradient, so tensors that need one take ``torch.where``.

Reductions over bool tensors go through a uint8 view for the same reason: ``any`` and ``sum`` of a bool tensor are
scalar loops on CPU.
"""

from __future__ import annotations

import torch

# Floating dtypes and the integer dtypes of the same width, whose bit patterns they are viewed as.
_SAME_WIDTH_INT = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def zero_outside(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, x, 0)``, same values and never reading ``x`` outside ``mask`` (NaN/inf there cannot leak).

    Args:
        x: any shape; floating dtypes take the bitwise path, others (and ``x`` that needs a gradient) ``torch.where``.
        mask: bool, broadcastable with ``x``.
    """
    if x.dtype not in _SAME_WIDTH_INT or (x.requires_grad and torch.is_grad_enabled()):
        return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return (x.view(_SAME_WIDTH_INT[x.dtype]) * mask).view(x.dtype)


def zero_outside_(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """In-place ``zero_outside`` of an ``x`` that needs no gradient (a temporary of the caller's); returns ``x``.

    Saves allocating the result, which on CPU can cost more than the op itself.
    """
    if x.dtype not in _SAME_WIDTH_INT:
        return x.masked_fill_(~mask, 0)
    x.view(_SAME_WIDTH_INT[x.dtype]).mul_(mask)
    return x


def count_true(mask: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Number of True entries (over ``dim``, or all), int64.

    Summed as uint8 into int32 (exact below 2^31 entries), which on CPU takes half the time of a bool or int64 sum.
    """
    as_bytes = mask.view(torch.uint8)
    if dim is None:
        return as_bytes.sum(dtype=torch.int32).long()
    return as_bytes.sum(dim=dim, keepdim=keepdim, dtype=torch.int32).long()


def any_true(mask: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """``mask.any()`` (over ``dim``, or all), bool, as a uint8 max: 30x faster on CPU at ``[64, 2048]``."""
    if mask.numel() == 0:  # amax has no identity to return for an empty reduction
        return mask.any() if dim is None else mask.any(dim=dim, keepdim=keepdim)
    as_bytes = mask.view(torch.uint8)
    out = as_bytes.amax() if dim is None else as_bytes.amax(dim=dim, keepdim=keepdim)
    return out.bool()
