"""Generalised advantage estimation without a Python loop over tokens.

GAE is the reverse scan A_t = delta_t + gamma * lam * A_{t+1}. Written out, A_t = sum_{k >= t} (gamma*lam)^(k-t)
delta_k: a discounted reverse cumulative sum, i.e. a fixed linear filter. The tempting closed form,
(gamma*lam)^-t * revcumsum((gamma*lam)^k delta_k), is useless in floating point (0.95^2048 ~ 1e-46 underflows fp32;
gamma*lam = 0.5 underflows fp64 too), so this module never divides by a power. Instead:

1. Masked positions are squeezed out: each row's valid tokens are scattered to the front (a hole in the mask is not
   a time step; the next state of a valid token is the next valid token, and V = 0 after the last one). For the usual
   contiguous response mask this is exactly the OpenRLHF / textbook loop over the response.
2. On the compacted rows the filter is evaluated blockwise with constant matrices: inside a block of ``block_size``
   positions an upper-triangular [block, block] matrix of (gamma*lam)^(j-i) gives the local sums (one matmul); across
   blocks, each block's sum discounted to its start goes through an [n_blocks, n_blocks] matrix of
   (gamma*lam)^(block_size*(m-n-1)), and decays into block n by (gamma*lam)^(block_size-i).

Every weight is a direct power with a non-negative exponent, in [0, 1], so nothing overflows and an underflow to 0 is
the true (negligible) weight, for any gamma*lam in [0, 1] including 0 and 1. The work is matmuls of about
batch * seq * block_size multiply-adds plus a few elementwise passes; the matrices depend only on gamma*lam.
"""

from __future__ import annotations

import torch

from megaseg.algorithms.segments import choose_index
from megaseg.algorithms.validation import check_2d, check_bool, check_shape

DEFAULT_BLOCK_SIZE = 64


def _decay_powers(exponents: torch.Tensor, decay: float) -> torch.Tensor:
    """decay ** exponents for integer exponents >= 0 (0 ** 0 = 1, so decay = 0 keeps only the diagonal terms)."""
    return torch.pow(torch.tensor(decay, dtype=torch.float64, device=exponents.device), exponents.double())


def discounted_reverse_cumsum(x: torch.Tensor, decay: float, block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """y_t = sum_{k >= t} decay^(k - t) x_k along the last dimension of a [batch, seq] tensor, decay in [0, 1].

    Returned in the dtype of ``x``. On GPU the matmuls run in fp64: Megatron setups commonly enable TF32 matmuls, which
    would round these weights and sums to 10 mantissa bits; the matrices are small, so fp64 costs little there. On CPU
    (no TF32) they run in the dtype of ``x``, where fp64 would be several times slower.
    """
    out_dtype = x.dtype
    if x.is_cuda:
        x = x.double()
    batch, seq = x.shape
    num_blocks = -(-seq // block_size)
    pad = num_blocks * block_size - seq
    if pad:
        x = torch.cat([x, x.new_zeros(batch, pad)], dim=1)  # zeros contribute nothing
    xb = x.view(batch, num_blocks, block_size)
    i = torch.arange(block_size, device=x.device)
    # within[j, i] = decay^(j - i) for j >= i: local_i = sum_j x_j within[j, i].
    gaps = i[:, None] - i[None, :]
    within = torch.where(gaps >= 0, _decay_powers(gaps.clamp(min=0), decay), 0.0).to(x.dtype)
    local = xb @ within
    # Block sums discounted to the block start, then carried back block by block.
    block_sums = xb @ _decay_powers(i, decay).to(x.dtype)
    n = torch.arange(num_blocks, device=x.device)
    block_gaps = n[:, None] - n[None, :] - 1  # [m, n]: m - n - 1, >= 0 for later blocks m > n
    carry = torch.where(block_gaps >= 0, _decay_powers(block_size * block_gaps.clamp(min=0), decay), 0.0)
    tail = block_sums @ carry.to(x.dtype)
    into_block = _decay_powers(block_size - i, decay).to(x.dtype)
    out = local + tail[..., None] * into_block
    return out.reshape(batch, -1)[:, :seq].to(out_dtype)


def _compact(x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Scatter each row's valid entries to the front (``slot`` = their 0-based rank, ``seq`` for invalid entries)."""
    batch, seq = x.shape
    out = x.new_zeros(batch, seq + 1)  # column ``seq`` collects the invalid entries and is dropped
    return out.scatter_(1, slot, x)[:, :seq]


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
    seq = mask.shape[1]
    rank = mask.long().cumsum(dim=1) - 1
    # Masked entries are scattered into a spare column and never read, so garbage there (even NaN) cannot leak in.
    slot = choose_index(mask, rank, seq)
    r_c = _compact(rewards.detach().to(dtype), slot)
    v_c = _compact(values.detach().to(dtype), slot)
    # Compacted rows hold their valid tokens first and zeros after, so V_next of the last valid token is 0 and the
    # deltas past the row's length are exactly 0.
    v_next = torch.cat([v_c[:, 1:], v_c.new_zeros(v_c.shape[0], 1)], dim=1)
    adv_c = discounted_reverse_cumsum(r_c + gamma * v_next - v_c, gamma * lam, block_size)
    # Back to the original columns; everything gathered is finite, so a multiply by the mask zeroes the rest.
    index = rank.clamp(min=0)
    mask_f = mask.to(dtype)
    return adv_c.gather(1, index) * mask_f, (adv_c + v_c).gather(1, index) * mask_f
