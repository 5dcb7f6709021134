"""GAE as a segmented reverse scan, with the returns, and the masked whitening moments, in Triton.

Layout: flat ``[N]`` rewards, values and a bool action mask; sequence b owns positions ``cu_seqlens[b] :
cu_seqlens[b + 1]`` (a right-padded ``[batch, seq]`` batch: ``cu_seqlens = 0, seq, 2 seq, ...``; the unpadded slots of
``megaseg.algorithms.unpadded``: ``UnpaddedResponses.starts`` with ``real`` as the mask). The actions of a sequence are
one contiguous run (the response), as ``advantages.gae(..., contiguous=True)`` requires.

GAE over each sequence alone: with masked entries read as 0 (masked loads, so NaN there cannot leak in),
``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = sum_{k >= t} (gamma lam)^(k - t) delta_k``; a position before
the run sees the run's first value through ``V_{t+1}`` but its output is zeroed, so the run's outputs are those of
the torch reference ``megaseg.algorithms.advantages.gae``. One program per sequence walks it from its end in blocks
of ``BLOCK``: inside a block, ``A = W delta + c^(BLOCK - t) A_next`` with ``W[t, k] = c^(k - t)`` for ``k >= t``
(``c = gamma lam``; every power has a non-negative exponent, as in the torch filter), and the block's first
advantage is carried into the block before it. Outputs 0 off the mask; returns = A + V.

Moments: ``[3]`` fp64 (sum, sum of squares, count) of the masked values, one read: ``ppo.masked_moments``' numbers.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)
GAE_BLOCK = 32
MOMENTS_BLOCK = 1024


@triton.jit
def _gae_kernel(rewards_ptr, values_ptr, mask_ptr, cu_ptr, adv_ptr, ret_ptr, gamma, log2_decay,
                ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    start = tl.load(cu_ptr + row)
    stop = tl.load(cu_ptr + row + 1)
    lanes = tl.arange(0, BLOCK)
    # W[t, k] = c^(k - t) for k >= t, 0 below the diagonal; c^0 = 1 also when c = 0 (log2 c = -inf).
    diff = lanes[None, :] - lanes[:, None]
    weights = tl.where(diff > 0, tl.exp2(tl.maximum(diff, 1).to(ACC) * log2_decay), tl.where(diff == 0, 1.0, 0.0))
    carry_weights = tl.exp2((BLOCK - lanes).to(ACC) * log2_decay)  # c^(BLOCK - t): exponents >= 1
    carry = tl.zeros((), dtype=ACC)
    num_blocks = tl.cdiv(stop - start, BLOCK)
    for i in range(0, num_blocks):
        offs = stop - (i + 1) * BLOCK + lanes
        inside = (offs >= start) & (offs < stop)
        action = tl.load(mask_ptr + offs, mask=inside, other=0) != 0
        after = offs + 1
        next_action = tl.load(mask_ptr + after, mask=(after >= start) & (after < stop), other=0) != 0
        r = tl.load(rewards_ptr + offs, mask=action, other=0.0).to(ACC)
        v = tl.load(values_ptr + offs, mask=action, other=0.0).to(ACC)
        v_next = tl.load(values_ptr + after, mask=next_action, other=0.0).to(ACC)
        delta = r + gamma * v_next - v
        adv = tl.sum(weights * delta[None, :], axis=1) + carry_weights * carry
        carry = tl.sum(tl.where(lanes == 0, adv, 0.0), axis=0)
        tl.store(adv_ptr + offs, tl.where(action, adv, 0.0).to(adv_ptr.dtype.element_ty), mask=inside)
        tl.store(ret_ptr + offs, tl.where(action, adv + v, 0.0).to(ret_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _moments_kernel(values_ptr, mask_ptr, num, partials_ptr, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    selected = tl.load(mask_ptr + offs, mask=offs < num, other=0) != 0
    x = tl.load(values_ptr + offs, mask=selected, other=0.0).to(tl.float64)
    tl.store(partials_ptr + block * 3, tl.sum(x, axis=0))
    tl.store(partials_ptr + block * 3 + 1, tl.sum(x * x, axis=0))
    tl.store(partials_ptr + block * 3 + 2, tl.sum(selected.to(tl.float64), axis=0))


def gae_flat(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor, gamma: float,
             lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) ``[N]`` of the flat layout (module docstring), in at least fp32, 0 off the mask; no
    gradient. ``gamma`` and ``lam`` in [0, 1] (the caller checks)."""
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    rewards, values = rewards.detach().contiguous(), values.detach().contiguous()
    advantages = torch.empty(rewards.shape, dtype=dtype, device=rewards.device)
    returns = torch.empty_like(advantages)
    batch = cu_seqlens.numel() - 1
    decay = gamma * lam
    if batch:
        _gae_kernel[(batch,)](rewards, values, mask.contiguous().view(torch.uint8), cu_seqlens.to(torch.int64).contiguous(),
                              advantages, returns, float(gamma), math.log2(decay) if decay > 0 else float("-inf"),
                              ACC=tl.float64 if dtype == torch.float64 else tl.float32, BLOCK=GAE_BLOCK)
    return advantages, returns


def gae_padded(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``advantages.gae(..., contiguous=True)`` of ``[batch, seq]`` tensors by the kernel (the caller validates)."""
    batch, seq = mask.shape
    cu_seqlens = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int64, device=mask.device)
    advantages, returns = gae_flat(rewards.reshape(-1), values.reshape(-1), mask.reshape(-1), cu_seqlens, gamma, lam)
    return advantages.view(batch, seq), returns.view(batch, seq)


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[3]`` fp64 (sum, sum of squares, count) of ``values`` where ``mask`` (same shapes, any), one read."""
    flat, flat_mask = values.detach().reshape(-1).contiguous(), mask.reshape(-1).contiguous().view(torch.uint8)
    num_blocks = max(triton.cdiv(flat.numel(), MOMENTS_BLOCK), 1)
    partials = torch.empty(num_blocks, 3, dtype=torch.float64, device=values.device)
    _moments_kernel[(num_blocks,)](flat, flat_mask, flat.numel(), partials, BLOCK=MOMENTS_BLOCK)
    return partials.sum(dim=0)
