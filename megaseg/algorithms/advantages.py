"""Generalised advantage estimation without a Python loop over tokens.

GAE is the reverse scan A_t = delta_t + gamma * lam * A_{t+1}. Written out, A_t = sum_{k >= t} (gamma*lam)^(k-t)
delta_k: a discounted reverse cumulative sum. The tempting closed form, (gamma*lam)^-t * revcumsum((gamma*lam)^k
delta_k), is useless in floating point (0.95^2048 ~ 1e-46 underflows fp32; gamma*lam = 0.5 underflows fp64 too), so
this module never divides by a power. It evaluates every weight (gamma*lam)^e directly with e >= 0, in blocks:

- inside a block of ``block_size`` positions, a [block, block] upper-triangular weight matrix gives the local sums;
- across blocks, an [n_blocks, n_blocks] matrix of the same kind gives each block the discounted sum of all later
  blocks, which then decays into the block by one more direct power.

Each weight lies in [0, 1], so nothing overflows or underflows harmfully, for any gamma*lam in [0, 1] including 0 and 1.
Memory is about ``batch * seq * block_size`` floats (block 64: 32 MiB for 64 x 2048 in fp32).

Masked positions are skipped, not treated as zero-reward steps: the next state of a valid token is the next valid token
(V = 0 after the last one, i.e. the episode ends). For the usual contiguous response mask this is exactly the OpenRLHF
/ textbook loop over the response; with holes in the mask the hole is simply not a time step.
"""

from __future__ import annotations

import torch

from megaseg.algorithms.validation import check_2d, check_bool, check_shape

DEFAULT_BLOCK_SIZE = 64


def _next_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` long: index of the first valid position strictly after each position, ``seq`` if none."""
    seq = mask.shape[1]
    cols = torch.arange(seq, device=mask.device)
    # Reverse cummin of valid columns, done as cummax of negated columns on the flipped row.
    at_or_after = -torch.where(mask, -cols, -seq).flip(1).cummax(dim=1).values.flip(1)
    after = torch.full_like(at_or_after, seq)
    after[:, :-1] = at_or_after[:, 1:]
    return after


def discounted_reverse_cumsum(
    x: torch.Tensor, steps: torch.Tensor, decay: float, block_size: int = DEFAULT_BLOCK_SIZE
) -> torch.Tensor:
    """y_t = sum_{k >= t} decay^(steps_k - steps_t) * x_k along the last dimension, for [batch, seq] tensors.

    ``steps`` must be non-decreasing along each row (it is the running count of valid tokens, so masked positions do
    not advance the clock); ``decay`` in [0, 1]. Computed in the dtype of ``x``.
    """
    batch, seq = x.shape
    num_blocks = -(-seq // block_size)
    pad = num_blocks * block_size - seq
    if pad:
        # Padding carries x = 0 and repeats the last step count, so it contributes nothing and keeps steps monotone.
        x = torch.cat([x, x.new_zeros(batch, pad)], dim=1)
        steps = torch.cat([steps, steps[:, -1:].expand(batch, pad)], dim=1)
    xb = x.view(batch, num_blocks, block_size)
    sb = steps.to(x.dtype).view(batch, num_blocks, block_size)
    upper = torch.ones(block_size, block_size, dtype=torch.bool, device=x.device).triu()

    # Local sums: weights[i, j] = decay^(s_j - s_i) for j >= i within the block.
    gaps = sb[..., None, :] - sb[..., :, None]
    weights = torch.where(upper, torch.pow(decay, gaps.clamp(min=0)), 0.0)
    local = torch.einsum("bnij,bnj->bni", weights, xb)

    # Each block's sum referred to the step count at the end of the previous block ...
    block_end = sb[..., -1]
    prev_end = torch.cat([sb[:, :1, 0], block_end[:, :-1]], dim=1)
    block_sums = (torch.pow(decay, (sb - prev_end[..., None]).clamp(min=0)) * xb).sum(dim=-1)
    # ... then carried to the end of block n: tail_n = sum_{m > n} decay^(prev_end_m - end_n) * block_sums_m.
    later = torch.ones(num_blocks, num_blocks, dtype=torch.bool, device=x.device).triu(diagonal=1)
    block_gaps = (prev_end[:, None, :] - block_end[:, :, None]).clamp(min=0)
    carry = torch.where(later, torch.pow(decay, block_gaps), 0.0)
    tail = torch.einsum("bnm,bm->bn", carry, block_sums)

    # Decay the tail from the block end back to each position inside the block.
    out = local + torch.pow(decay, (block_end[..., None] - sb).clamp(min=0)) * tail[..., None]
    return out.reshape(batch, -1)[:, :seq]


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by GAE over the valid (``mask``) tokens of each row.

    delta_t = r_t + gamma * V_next(t) - V_t, A_t = sum_{k >= t} (gamma*lam)^(k - t) delta_k over valid steps,
    returns = A + V. V_next is the value of the next valid token (0 after the last one).

    Args:
        rewards: ``[batch, seq]`` per-token rewards (KL term included).
        values: ``[batch, seq]`` critic values.
        mask: ``[batch, seq]`` bool, the action tokens (response incl. EOS).
        gamma, lam: discount and GAE lambda, each in [0, 1].

    Returns:
        ``(advantages, returns)`` ``[batch, seq]``, 0 at masked positions, in at least fp32 (fp64 inputs stay fp64).
        Not differentiable by intent: both are computed from detached inputs.
    """
    check_bool("mask", mask)
    check_2d("mask", mask)
    check_shape("rewards", rewards, mask.shape, "mask")
    check_shape("values", values, mask.shape, "mask")
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    r = torch.where(mask, rewards.detach().to(dtype), zero)
    v = torch.where(mask, values.detach().to(dtype), zero)
    seq = mask.shape[1]
    nxt = _next_valid_index(mask)
    v_next = torch.where(nxt < seq, v.gather(1, nxt.clamp(max=seq - 1)), zero)
    deltas = torch.where(mask, r + gamma * v_next - v, zero)
    steps = mask.long().cumsum(dim=1)
    advantages = torch.where(mask, discounted_reverse_cumsum(deltas, steps, gamma * lam, block_size), zero)
    returns = torch.where(mask, advantages + v, zero)
    return advantages, returns
