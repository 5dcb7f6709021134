"""The fused reward-shaping kernel against the PPO experience maker's torch phases (normalize -> interpolate ->
clamp -> KL penalty) and against a per-sequence loop written from the paper's equations."""
import math

import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_strategies import DEVICE, response_batches

from megaseg.algorithms.normalizer import GlobalNormalizer, IdentityNormalizer, LocationNormalizer
from megaseg.algorithms.interpolation import token_rewards
from megaseg.algorithms.ppo import kl_penalty
from megaseg.algorithms.segmentation import segment_positions

NORMALIZERS = [
    LocationNormalizer(w_mu=0.7668, b_mu=0.4705, w_sigma=0.2569, b_sigma=2.8339, p_min=0.05),  # paper, Phi-3
    GlobalNormalizer(mean=0.3, std=1.7),
    IdentityNormalizer(),
]


def _torch_phases(normalizer, raw, ends, mask, logp, ref, mode, clip, kl_coef, estimator):
    """The padded torch path of megaseg.algorithms: normalize at p, interpolate, clamp, KL on the actions."""
    normalized = normalizer(raw, segment_positions(ends, mask))
    token_level = token_rewards(normalized, ends, mask, mode).clamp(-clip, clip)
    zero = torch.zeros((), dtype=token_level.dtype, device=token_level.device)
    kl = torch.where(mask, kl_penalty(logp, ref, estimator), zero)
    return (torch.where(ends, normalized, zero), token_level, torch.where(mask, token_level - kl_coef * kl, zero),
            kl)


def _loop(normalizer, raw, ends, mask, logp, ref, mode, clip, kl_coef, estimator):
    rewards, kls = torch.zeros(raw.shape, dtype=torch.float64), torch.zeros(raw.shape, dtype=torch.float64)
    for b in range(raw.shape[0]):
        columns = mask[b].nonzero().flatten().tolist()
        end_columns = [j for j in columns if ends[b, j]]
        previous = columns[0] - 1
        for t, e in enumerate(end_columns):
            p = (t + 1) / len(end_columns)
            r = float(raw[b, e])
            if isinstance(normalizer, LocationNormalizer):
                log_p = math.log(min(max(p, normalizer.p_min), 1.0) + 1e-10)
                r = (r - normalizer.w_mu * log_p - normalizer.b_mu) / (normalizer.w_sigma * log_p + normalizer.b_sigma)
            elif isinstance(normalizer, GlobalNormalizer):
                r = (r - normalizer.mean) / normalizer.std
            for j in range(previous + 1, e + 1):
                share = {"even": r / (e - previous), "repeat": r, "none": r if j == e else 0.0}[mode]
                rewards[b, j] = max(-clip, min(clip, share))
            previous = e
        for j in columns:
            x = float(logp[b, j]) - float(ref[b, j])
            kl = {"k1": x, "k2": 0.5 * x * x, "k3": math.expm1(-x) + x, "abs": abs(x)}[estimator]
            kls[b, j] = kl
            rewards[b, j] -= kl_coef * kl
    return rewards, kls


@given(batch=response_batches(max_seq=50), normalizer=st.sampled_from(NORMALIZERS),
       mode=st.sampled_from(["even", "repeat", "none"]), estimator=st.sampled_from(["k1", "k2", "k3", "abs"]),
       clip=st.sampled_from([10.0, 0.3]), seed=st.integers(0, 2**31 - 1))
def test_fused_shaping_matches_the_torch_phases_and_the_loop(batch, normalizer, mode, estimator, clip, seed):
    from megaseg.kernels.reward_shaping import shape_token_rewards

    generator = torch.Generator().manual_seed(seed)
    mask, ends = batch.response_mask, batch.ends
    raw = torch.where(ends, torch.randn(mask.shape, generator=generator).mul_(3).to(DEVICE),
                      torch.full(mask.shape, float("nan"), device=DEVICE))
    logp = -torch.rand(mask.shape, generator=generator).mul_(5).to(DEVICE)
    # Log ratios from 1e-4 (where k3 needs expm1's precision) to ~1.
    ref = logp - torch.randn(mask.shape, generator=generator).mul_(0.3).to(DEVICE) * (
        torch.rand(mask.shape, generator=generator) < 0.5).to(DEVICE).add(1e-3)
    kwargs = dict(mode=mode, clip=clip, kl_coef=0.05, estimator=estimator)
    normalized, token_level, rewards, kl = shape_token_rewards(normalizer, raw, ends, mask, logp, ref, **kwargs)
    torch_normalized, torch_token_level, torch_rewards, torch_kl = _torch_phases(
        normalizer, torch.nan_to_num(raw), ends, mask, logp, ref, mode, clip, 0.05, estimator)
    loop_rewards, loop_kl = _loop(normalizer, raw.cpu(), ends.cpu(), mask.cpu(), logp.cpu(), ref.cpu(), **kwargs)
    assert torch.isfinite(rewards).all(), "NaN off the reward ends leaked in"
    torch.testing.assert_close(normalized, torch_normalized, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(token_level, torch_token_level, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(rewards, torch_rewards, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(kl, torch_kl, atol=1e-8, rtol=1e-5)
    torch.testing.assert_close(rewards.cpu().double(), loop_rewards, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(kl.cpu().double(), loop_kl, atol=1e-8, rtol=1e-5)
