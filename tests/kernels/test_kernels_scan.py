"""GAE's segmented reverse scan and the masked moments: the kernels against the torch filter they replace
(``advantages.gae``, ``unpadded.gae``, ``ppo.masked_moments``) and against a per-sequence Python loop."""
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_strategies import DEVICE, response_batches

from megaseg.algorithms.advantages import gae
from megaseg.algorithms.ppo import masked_moments, masked_whiten
from megaseg.algorithms.unpadded import UnpaddedResponses
from megaseg.algorithms.unpadded import gae as unpadded_gae
from megaseg.kernels import kernels_mode

GAMMA_LAM = [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.0, 0.0), (0.5, 0.0)]


def _loop_gae(rewards, values, mask, gamma, lam):
    """GAE row by row over the response tokens, in float64."""
    advantages = torch.zeros(rewards.shape, dtype=torch.float64)
    returns = torch.zeros_like(advantages)
    for b in range(rewards.shape[0]):
        columns = mask[b].nonzero().flatten().tolist()
        running = 0.0
        for i in reversed(range(len(columns))):
            j = columns[i]
            next_value = float(values[b, columns[i + 1]]) if i + 1 < len(columns) else 0.0
            delta = float(rewards[b, j]) + gamma * next_value - float(values[b, j])
            running = delta + gamma * lam * running
            advantages[b, j] = running
            returns[b, j] = running + float(values[b, j])
    return advantages, returns


@given(batch=response_batches(max_seq=80), gamma_lam=st.sampled_from(GAMMA_LAM), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_gae_kernel_matches_the_filter_and_the_loop(batch, gamma_lam, seed, dtype):
    gamma, lam = gamma_lam
    generator = torch.Generator().manual_seed(seed)
    mask = batch.response_mask
    rewards = torch.randn(mask.shape, generator=generator, dtype=dtype).to(DEVICE)
    values = torch.randn(mask.shape, generator=generator, dtype=dtype).to(DEVICE)
    # Off the actions: NaN, which must never be read.
    rewards, values = (torch.where(mask, x, torch.full_like(x, float("nan"))) for x in (rewards, values))
    with kernels_mode("triton"):
        advantages, returns = gae(rewards, values, mask, gamma, lam, contiguous=True)
    with kernels_mode("torch"):
        torch_advantages, torch_returns = gae(rewards, values, mask, gamma, lam, contiguous=True)
    loop_advantages, loop_returns = _loop_gae(rewards.cpu(), values.cpu(), mask.cpu(), gamma, lam)
    assert advantages.dtype == dtype and torch.isfinite(advantages).all() and torch.isfinite(returns).all()
    # fp32 sums over up to 2k tokens with lam = 1 (no decay) accumulate ~1e-6 relative rounding per term.
    tolerance = 1e-10 if dtype == torch.float64 else 2e-4
    for name, actual, torch_value, loop_value in (("advantages", advantages, torch_advantages, loop_advantages),
                                                  ("returns", returns, torch_returns, loop_returns)):
        torch.testing.assert_close(actual, torch_value, atol=tolerance, rtol=tolerance, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(actual.cpu().double(), loop_value, atol=tolerance, rtol=tolerance,
                                   msg=lambda m: f"{name} vs loop: {m}")


@given(batch=response_batches(max_seq=60, long_rows=False), gamma_lam=st.sampled_from(GAMMA_LAM),
       seed=st.integers(0, 2**31 - 1))
def test_unpadded_gae_kernel_matches_the_torch_path(batch, gamma_lam, seed):
    gamma, lam = gamma_lam
    responses = UnpaddedResponses.from_masks(batch.response_mask, batch.eos_mask)
    generator = torch.Generator().manual_seed(seed)
    rewards = responses.unpad(torch.randn(batch.response_mask.shape, generator=generator).to(DEVICE))
    values = responses.unpad(torch.randn(batch.response_mask.shape, generator=generator).to(DEVICE))
    with kernels_mode("triton"):
        advantages, returns = unpadded_gae(rewards, values, responses, gamma, lam)
    with kernels_mode("torch"):
        torch_advantages, torch_returns = unpadded_gae(rewards, values, responses, gamma, lam)
    torch.testing.assert_close(advantages, torch_advantages, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(returns, torch_returns, atol=1e-5, rtol=1e-5)


@given(batch=response_batches(max_seq=60), seed=st.integers(0, 2**31 - 1))
def test_masked_moments_kernel_matches_torch_and_whitening_agrees(batch, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = batch.response_mask
    values = torch.randn(mask.shape, generator=generator).mul_(3).add_(1).to(DEVICE)
    values = torch.where(mask, values, torch.full_like(values, float("nan")))
    with kernels_mode("triton"):
        moments = masked_moments(values, mask)
        whitened = masked_whiten(values, mask)
    with kernels_mode("torch"):
        torch_moments = masked_moments(values, mask)
        torch_whitened = masked_whiten(values, mask)
    selected = values.cpu().double()[mask.cpu()]
    loop = torch.tensor([selected.sum(), (selected * selected).sum(), float(selected.numel())], dtype=torch.float64)
    assert moments.dtype == torch.float64
    torch.testing.assert_close(moments.cpu(), loop, atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(moments, torch_moments, atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(whitened, torch_whitened, atol=1e-5, rtol=1e-5)
