"""Fused reward shaping per token, in one Triton program per rollout row: location normalization of the segment
rewards, interpolation (even / repeat / none), the clamp to [-clip, clip] and the KL penalty.

The torch path it must match is the PPO experience maker's three phases (``megaseg.training.ppo.reward_shaping``):
``normalize_rewards`` (p = (t + 1) / T at the end of segment t of T; ``LocationNormalizer``: log of p clamped to
[p_min, 1] plus LOG_EPS, ``(r - w_mu log p - b_mu) / (w_sigma log p + b_sigma)``; scalar normalizers
``(r - mean) / std``; ``none`` unchanged), ``interpolate_rewards`` (even: ``r_t / |a_t|`` on every token of segment
a_t, counted from the first response token; repeat: ``r_t``; none: ``r_t`` on the end only; tokens in no segment 0)
and ``kl_penalized_rewards`` (``token - kl_coef * KL`` on the actions, 0 elsewhere; KL by k1 / k2 / k3 / abs).

Layout ``[batch, seq]``, right-padded, one contiguous response (= action) run per row, the reward ends inside it.
Pass 1 over the row lists its segment ends: segment t's end column and raw reward go to slot t of a ``[batch, seq]``
scratch (t = the number of ends before it, an exclusive cumulative sum), and T is counted. Pass 2 gives every
response token its segment t (the same cumulative sum), reads slot t (its end, its raw reward) and slot t - 1 (the
previous end, for |a_t|), and writes the token's reward and KL. Only the reward ends of ``raw`` are read.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from megaseg.algorithms.interpolation import INTERPOLATION_MODES
from megaseg.algorithms.normalizer import LOG_EPS, IdentityNormalizer, LocationNormalizer, Normalizer, ScalarNormalizer
from megaseg.algorithms.ppo import KL_ESTIMATORS

INTERPRETED = bool(triton.knobs.runtime.interpret)
BLOCK = 256
MODE_CODES = {"even": 0, "repeat": 1, "none": 2}
KL_CODES = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}


@triton.jit
def _shape_rewards_kernel(raw_ptr, ends_ptr, mask_ptr, logp_ptr, ref_ptr, end_at_ptr, end_raw_ptr, normalized_ptr,
                          token_ptr, rewards_ptr, kl_ptr, seq, p_min, w_mu, b_mu, w_sigma, b_sigma, log_eps, clip, kl_coef,
                          NORM: tl.constexpr, MODE: tl.constexpr, KL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * seq
    lanes = tl.arange(0, BLOCK)
    count = tl.zeros((), dtype=tl.int32)
    start = tl.full((), seq, tl.int32)
    for block_start in range(0, seq, BLOCK):
        offs = block_start + lanes
        inside = offs < seq
        end = tl.load(ends_ptr + base + offs, mask=inside, other=0) != 0
        response = tl.load(mask_ptr + base + offs, mask=inside, other=0) != 0
        start = tl.minimum(start, tl.min(tl.where(response, offs, seq), axis=0))
        end_int = end.to(tl.int32)
        t = count + tl.cumsum(end_int, axis=0) - end_int
        tl.store(end_at_ptr + base + t, offs, mask=end)
        tl.store(end_raw_ptr + base + t, tl.load(raw_ptr + base + offs, mask=end, other=0.0).to(tl.float32), mask=end)
        count += tl.sum(end_int, axis=0)
    tl.debug_barrier()  # pass 2 reads slots that other threads of this program wrote
    ends_before = tl.zeros((), dtype=tl.int32)
    for block_start in range(0, seq, BLOCK):
        offs = block_start + lanes
        inside = offs < seq
        end = tl.load(ends_ptr + base + offs, mask=inside, other=0) != 0
        response = tl.load(mask_ptr + base + offs, mask=inside, other=0) != 0
        end_int = end.to(tl.int32)
        t = ends_before + tl.cumsum(end_int, axis=0) - end_int
        in_segment = response & (t < count)
        end_at = tl.load(end_at_ptr + base + t, mask=in_segment, other=0)
        r = tl.load(end_raw_ptr + base + t, mask=in_segment, other=0.0)
        previous = tl.load(end_at_ptr + base + t - 1, mask=in_segment & (t > 0), other=0)
        previous = tl.where(t > 0, previous, start - 1)
        p = (t + 1).to(tl.float32) / tl.maximum(count, 1).to(tl.float32)
        if NORM == 2:
            log_p = tl.log(tl.minimum(tl.maximum(p, p_min), 1.0) + log_eps)
            normalized = (r - w_mu * log_p - b_mu) / (w_sigma * log_p + b_sigma)
        elif NORM == 1:
            normalized = (r - b_mu) / b_sigma
        else:
            normalized = r
        if MODE == 0:
            token = normalized / tl.maximum(end_at - previous, 1).to(tl.float32)
        elif MODE == 1:
            token = normalized
        else:
            token = tl.where(offs == end_at, normalized, 0.0)
        token = tl.minimum(tl.maximum(tl.where(in_segment, token, 0.0), -clip), clip)
        tl.store(normalized_ptr + base + offs, tl.where(in_segment & (offs == end_at), normalized, 0.0), mask=inside)
        tl.store(token_ptr + base + offs, token, mask=inside)
        log_ratio = (tl.load(logp_ptr + base + offs, mask=response, other=0.0).to(tl.float32)
                     - tl.load(ref_ptr + base + offs, mask=response, other=0.0).to(tl.float32))
        if KL == 0:
            kl = log_ratio
        elif KL == 1:
            kl = 0.5 * log_ratio * log_ratio
        elif KL == 2:
            # exp(-x) - 1 + x cancels for small x (torch uses expm1): its Taylor series to x^8 for |x| < 1/2
            # (truncation < 1e-7 relative there; beyond, the cancellation costs < 1e-6 relative).
            x = log_ratio
            series = x * x * (0.5 + x * (-1.0 / 6 + x * (1.0 / 24 + x * (-1.0 / 120 + x * (
                1.0 / 720 + x * (-1.0 / 5040 + x / 40320))))))
            kl = tl.where(tl.abs(x) < 0.5, series, tl.exp(-x) - 1.0 + x)
        else:
            kl = tl.abs(log_ratio)
        kl = tl.where(response, kl, 0.0)
        tl.store(kl_ptr + base + offs, kl, mask=inside)
        tl.store(rewards_ptr + base + offs, tl.where(response, token - kl_coef * kl, 0.0), mask=inside)
        ends_before += tl.sum(end_int, axis=0)


def _normalizer_code(normalizer: Normalizer) -> tuple[int, tuple[float, ...]]:
    """(NORM code, (p_min, w_mu, b_mu, w_sigma, b_sigma)) of a normalizer the kernel knows."""
    if isinstance(normalizer, LocationNormalizer):
        return 2, (normalizer.p_min, normalizer.w_mu, normalizer.b_mu, normalizer.w_sigma, normalizer.b_sigma)
    if isinstance(normalizer, ScalarNormalizer):
        return 1, (0.0, 0.0, normalizer.mean, 0.0, normalizer.std)
    if isinstance(normalizer, IdentityNormalizer):
        return 0, (0.0, 0.0, 0.0, 0.0, 1.0)
    raise ValueError(f"the fused reward-shaping kernel does not know normalizer kind {normalizer.kind!r}")


class ShapedTokenRewards(NamedTuple):
    """The fused kernel's outputs, ``[batch, seq]`` fp32, 0 where the torch phases have nothing."""

    normalized: torch.Tensor  # the normalized segment reward at each reward end
    token_rewards: torch.Tensor  # after interpolation and the clamp
    rewards: torch.Tensor  # token_rewards - kl_coef * KL on the actions
    kl: torch.Tensor  # the KL estimate on the actions


def shape_token_rewards(normalizer: Normalizer, raw_rewards: torch.Tensor, reward_ends: torch.Tensor,
                        action_mask: torch.Tensor, log_probs: torch.Tensor, ref_log_probs: torch.Tensor, *,
                        mode: str, clip: float, kl_coef: float, estimator: str) -> ShapedTokenRewards:
    """``normalize_rewards`` -> ``interpolate_rewards`` -> ``kl_penalized_rewards`` in one kernel (module
    docstring), each phase's result kept. ``raw_rewards`` is read at ``reward_ends`` only; ``action_mask`` is one run
    per row holding the ends (the caller's segmentation guarantees it)."""
    if mode not in MODE_CODES:
        raise ValueError(f"interpolation mode={mode!r} is not allowed; choose one of {list(INTERPOLATION_MODES)}")
    if estimator not in KL_CODES:
        raise ValueError(f"KL estimator={estimator!r} is not allowed; choose one of {list(KL_ESTIMATORS)}")
    shape = action_mask.shape
    for name, tensor in (("raw_rewards", raw_rewards), ("reward_ends", reward_ends), ("log_probs", log_probs),
                         ("ref_log_probs", ref_log_probs)):
        if tensor.shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, action_mask {tuple(shape)}")
    norm, params = _normalizer_code(normalizer)
    batch, seq = shape
    device = action_mask.device
    normalized, token, rewards, kl = (torch.empty(shape, dtype=torch.float32, device=device) for _ in range(4))
    end_at = torch.empty(shape, dtype=torch.int32, device=device)
    end_raw = torch.empty(shape, dtype=torch.float32, device=device)
    if batch and seq:
        _shape_rewards_kernel[(batch,)](
            raw_rewards.contiguous(), reward_ends.contiguous().view(torch.uint8),
            action_mask.contiguous().view(torch.uint8), log_probs.contiguous(), ref_log_probs.contiguous(), end_at,
            end_raw, normalized, token, rewards, kl, seq, *(float(x) for x in params), LOG_EPS, float(clip), float(kl_coef),
            NORM=norm, MODE=MODE_CODES[mode], KL=KL_CODES[estimator], BLOCK=BLOCK)
    return ShapedTokenRewards(normalized, token, rewards, kl)
