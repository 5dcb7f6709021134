"""Generalised advantage estimation without a Python loop over tokens.

GAE is the reverse scan A_t = delta_t + gamma * lam * A_{t+1}. Written out, A_t = sum_{k >= t} (gamma*lam)^(k-t)
delta_k: a discounted reverse cumulative sum, i.e. a fixed linear filter. The tempting closed form,
(gamma*lam)^-t * revcumsum((gamma*lam)^k delta_k), is useless in floating point (0.95^2048 ~ 1e-46 underflows fp32;
gamma*lam = 0.5 underflows fp64 too), so this module never divides by a power. Instead:

1. Masked positions are not time steps: the next state of a valid token is the next valid token, and V = 0 after the
   last one. For a mask with holes each row's valid tokens are first scattered to the front. A contiguous mask (the
   response mask, one run per row) needs no compaction: with rewards and values zeroed outside the run, the filter
   over the whole row adds nothing after the run, and the outputs before it are discarded (``contiguous=True``).
   Either way this is exactly the OpenRLHF / textbook loop over the response.
2. The filter is evaluated blockwise with constant matrices: inside a block of ``block_size`` positions an
   upper-triangular [block, block] matrix of (gamma*lam)^(j-i) gives the local sums (one matmul; its first column is
   the block's sum discounted to the block start); across blocks, those sums go through an [n_blocks, n_blocks] matrix
   of (gamma*lam)^(block_size*(m-n-1)), and decay into block n by (gamma*lam)^(block_size-i).

Every weight is a direct power with a non-negative exponent, in [0, 1], so nothing overflows and an underflow to 0 is
the true (negligible) weight, for any gamma*lam in [0, 1] including 0 and 1. The work is one matmul of about
batch * seq * block_size multiply-adds plus a few elementwise passes; the matrices depend only on gamma*lam and are
built once per (gamma*lam, block size, length, dtype, device).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from megaseg.algorithms.masking import zero_outside, zero_outside_
from megaseg.algorithms.segments import INDEX_DTYPE
from megaseg.algorithms.validation import check_2d, check_bool, check_contiguous, check_unit_interval, check_shape
from megaseg.kernels.dispatch import use_triton

# The [batch * seq / 32, 32] x [32, 32] local matmul plus the [n_blocks, n_blocks] carry was the fastest split on CPU at
# seq 2048 (block 64: 1.5x slower, 16: about the same).
DEFAULT_BLOCK_SIZE = 32


def decay_powers(exponents: torch.Tensor, decay: float) -> torch.Tensor:
    """decay ** exponents in fp64 for integer exponents >= 0 (0 ** 0 = 1, so decay = 0 keeps only the diagonal)."""
    return torch.pow(torch.tensor(decay, dtype=torch.float64, device=exponents.device), exponents.double())


@lru_cache(maxsize=16)
def _filter_matrices(
    decay: float, block_size: int, num_blocks: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The constant matrices of ``discounted_reverse_cumsum``: (within ``[block, block]``, carry
    ``[n_blocks, n_blocks]``, into_block ``[block]``). Read-only: cached and shared between calls.
    """
    i = torch.arange(block_size, device=device)
    # within[j, i] = decay^(j - i) for j >= i: local_i = sum_j x_j within[j, i].
    gaps = i[:, None] - i[None, :]
    within = torch.where(gaps >= 0, decay_powers(gaps.clamp(min=0), decay), 0.0)
    n = torch.arange(num_blocks, device=device)
    block_gaps = n[:, None] - n[None, :] - 1  # [m, n]: m - n - 1, >= 0 for later blocks m > n
    carry = torch.where(block_gaps >= 0, decay_powers(block_size * block_gaps.clamp(min=0), decay), 0.0)
    into_block = decay_powers(block_size - i, decay)
    return within.to(dtype), carry.to(dtype), into_block.to(dtype)


def block_reverse_sums(blocks: torch.Tensor, decay: float) -> torch.Tensor:
    """y[m, i] = sum_{j >= i} decay^(j - i) blocks[m, j]: the discounted reverse sums inside each row of a
    ``[rows, block]`` tensor (one matmul with a cached constant matrix; ``y[:, 0]`` is each row's sum discounted to
    its start). On GPU it runs and returns fp64, as ``discounted_reverse_cumsum`` does (TF32 would round the weights);
    on CPU the dtype of ``blocks``."""
    if blocks.is_cuda:
        blocks = blocks.double()
    within, _, _ = _filter_matrices(float(decay), blocks.shape[1], 1, blocks.dtype, blocks.device)
    return blocks @ within


def block_carry_weights(decay: float, block: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[block]``: decay^(block - i), the weight at position i of a block of the sum at the next block's start
    (read-only, cached with the filter's matrices)."""
    return _filter_matrices(float(decay), block, 1, dtype, device)[2]


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
    _, carry, into_block = _filter_matrices(float(decay), block_size, num_blocks, x.dtype, x.device)
    local = block_reverse_sums(x.view(batch * num_blocks, block_size), decay).view(batch, num_blocks, block_size)
    # local[..., 0] is each block's sum discounted to its start; carry it back into the earlier blocks.
    tail = local[..., 0] @ carry
    out = local.addcmul_(tail[..., None], into_block)
    return out.view(batch, -1)[:, :seq].to(out_dtype)


def _compact(x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Scatter each row's valid entries to the front (``slot`` = their 0-based rank, ``seq`` for invalid entries)."""
    batch, seq = x.shape
    out = x.new_zeros(batch, seq + 1)  # column ``seq`` collects the invalid entries and is dropped
    return out.scatter_(1, slot, x)[:, :seq]


def _next_values(values: torch.Tensor) -> torch.Tensor:
    """``values`` shifted one step left with a 0 after the last column: V_next on rows whose valid tokens are a
    zero-padded run (compacted, or contiguous and zeroed outside the run)."""
    return torch.cat([values[:, 1:], values.new_zeros(values.shape[0], 1)], dim=1)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    contiguous: bool = False,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by GAE over the valid (``mask``) tokens of each row.

    delta_t = r_t + gamma * V_next(t) - V_t, A_t = sum_{k >= t} (gamma*lam)^(k - t) delta_k over valid steps,
    returns = A + V. V_next is the value of the next valid token (0 after the last one).

    Args:
        rewards: ``[batch, seq]`` per-token rewards (KL term included).
        values: ``[batch, seq]`` critic values.
        mask: ``[batch, seq]`` bool, the action tokens (response incl. EOS).
        gamma, lam: discount and GAE lambda, each in [0, 1].
        contiguous: the valid tokens of every row are one run (or none), as a response mask's are; skips compacting
            the rows (same result, about half the time). ``validate`` checks that promise (one host sync).

    Returns:
        ``(advantages, returns)`` ``[batch, seq]``, 0 at masked positions, in at least fp32 (fp64 inputs stay fp64).
        Not differentiable by intent: both are computed from detached inputs. Entries of ``rewards`` and ``values`` at
        masked positions are never read, so garbage there (even NaN) cannot leak in.
    """
    check_bool("mask", mask)
    check_2d("mask", mask)
    check_shape("rewards", rewards, mask.shape, "mask")
    check_shape("values", values, mask.shape, "mask")
    check_unit_interval("gamma", gamma)
    check_unit_interval("lam", lam)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    rewards, values = rewards.detach().to(dtype), values.detach().to(dtype)
    if contiguous:
        check_contiguous("mask", mask, validate)
        if use_triton(rewards):  # megaseg.kernels.scan: one read of each input (the filter below is its reference)
            from megaseg.kernels.scan import gae_padded

            return gae_padded(rewards, values, mask, gamma, lam)
        v = zero_outside(values, mask)
        # delta = r + gamma * V_next - V, built in place; V_next is V one column on (0 after the run).
        delta = zero_outside(rewards, mask)
        delta[:, :-1].add_(v[:, 1:], alpha=gamma)
        delta.sub_(v)
        # Outputs before the run (prompt positions) see the run's deltas and are zeroed.
        adv = zero_outside_(discounted_reverse_cumsum(delta, gamma * lam, block_size), mask)
        return adv, v.add_(adv)
    seq = mask.shape[1]
    mask_int = mask.view(torch.uint8)
    rank = mask_int.cumsum(dim=1, dtype=torch.int32).sub_(1)
    # Masked entries are scattered into a spare column and never read, so garbage there (even NaN) cannot leak in.
    slot = (rank - seq).mul_(mask_int).add_(seq).to(INDEX_DTYPE)
    r_c, v_c = _compact(rewards, slot), _compact(values, slot)
    # Compacted rows hold their valid tokens first and zeros after, so V_next of the last valid token is 0 and the
    # deltas past the row's length are exactly 0.
    adv_c = discounted_reverse_cumsum(r_c + gamma * _next_values(v_c) - v_c, gamma * lam, block_size)
    # Back to the original columns; masked positions read some valid column and are zeroed.
    index = rank.clamp_(min=0).to(INDEX_DTYPE)
    advantages = zero_outside_(adv_c.gather(1, index), mask)
    return advantages, zero_outside_(v_c.add_(adv_c).gather(1, index), mask)
