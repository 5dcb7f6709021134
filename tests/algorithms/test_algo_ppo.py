import math

import algo_reference as ref
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megaseg.algorithms import ppo
from megaseg.algorithms.advantages import discounted_reverse_cumsum
from megaseg.algorithms.dpo import dpo_loss


@st.composite
def rollouts(draw, max_batch=4, max_seq=40, holes=False):
    batch, seq = draw(st.integers(1, max_batch)), draw(st.integers(1, max_seq))
    rows = []
    for _ in range(batch):
        if holes:
            rows.append(draw(st.lists(st.booleans(), min_size=seq, max_size=seq)))
        else:
            start = draw(st.integers(0, seq))
            length = draw(st.integers(0, seq - start))
            rows.append([start <= j < start + length for j in range(seq)])
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, seq, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, seq, generator=gen, dtype=torch.float64)
    return rewards, values, torch.tensor(rows, dtype=torch.bool).view(batch, seq)


GAMMA_LAM = st.tuples(st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]), st.sampled_from([0.0, 0.3, 0.95, 1.0]))


def _check_gae(rewards, values, mask, gamma, lam, block_size, rtol):
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam, block_size=block_size)
    for b in range(mask.shape[0]):
        exp_adv, exp_ret = ref.gae_row(rewards[b].tolist(), values[b].tolist(), mask[b].tolist(), gamma, lam)
        assert adv[b].tolist() == pytest.approx(exp_adv, rel=rtol, abs=rtol)
        assert ret[b].tolist() == pytest.approx(exp_ret, rel=rtol, abs=rtol)


@given(rollouts(), GAMMA_LAM, st.sampled_from([1, 3, 8, 64]))
def test_gae_matches_textbook_loop(rollout, gamma_lam, block_size):
    _check_gae(*rollout, *gamma_lam, block_size=block_size, rtol=1e-9)


@given(rollouts(holes=True), GAMMA_LAM, st.sampled_from([2, 5, 64]))
def test_gae_skips_masked_holes(rollout, gamma_lam, block_size):
    _check_gae(*rollout, *gamma_lam, block_size=block_size, rtol=1e-9)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.5, 1.0), (0.1, 0.1), (1.0, 0.0)])
def test_gae_long_sequences_fp32_are_stable(gamma, lam):
    gen = torch.Generator().manual_seed(7)
    seq = 2048
    rewards = torch.randn(2, seq, generator=gen)
    values = torch.randn(2, seq, generator=gen)
    mask = torch.zeros(2, seq, dtype=torch.bool)
    mask[0, 100:] = True
    mask[1, 3:1900] = True
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    assert adv.dtype == torch.float32 and torch.isfinite(adv).all()
    for b in range(2):
        row = (rewards[b].double().tolist(), values[b].double().tolist(), mask[b].tolist())
        exp_adv, _ = ref.gae_row(*row, gamma, lam)
        exp = torch.tensor(exp_adv)
        # fp32 accumulation over up to 2048 terms: error relative to the largest advantage of the row.
        assert (adv[b].double() - exp).abs().max() <= 1e-5 * max(1.0, exp.abs().max().item())


def test_discounted_reverse_cumsum_simple():
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    for block_size in (1, 2, 3, 64):
        assert discounted_reverse_cumsum(x, 0.5, block_size).tolist() == [[1 + 1 + 0.75, 2 + 1.5, 3.0]]
    assert discounted_reverse_cumsum(x, 0.0, 2).tolist() == [[1.0, 2.0, 3.0]]
    assert discounted_reverse_cumsum(x, 1.0, 2).tolist() == [[6.0, 5.0, 3.0]]


def test_gae_errors():
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\], got 1.5"):
        ppo.gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), 1.0, 1.5)
    with pytest.raises(ValueError, match=r"values has shape \(1, 3\)"):
        ppo.gae(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2, dtype=torch.bool), 1.0, 0.95)


@given(
    st.lists(st.tuples(st.floats(-5, 5), st.floats(-5, 5)), min_size=1, max_size=10),
    st.sampled_from(ppo.KL_ESTIMATORS),
)
def test_kl_estimators(pairs, kind):
    logp = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    ref_logp = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    out = ppo.kl_penalty(logp, ref_logp, kind)
    expected = [ref.kl_estimate(a, b, kind) for a, b in pairs]
    assert out.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_kl_penalized_rewards():
    mask = torch.tensor([[True, True, False]])
    out = ppo.kl_penalized_rewards(
        torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, 0.0, 9.0]]), torch.zeros(1, 3), mask, kl_coef=0.1
    )
    assert out[0].tolist() == pytest.approx([0.95, 2.0, 0.0])
    with pytest.raises(ValueError, match=r"KL estimator='k4' is not supported"):
        ppo.kl_penalty(torch.zeros(2), torch.zeros(2), "k4")


def test_masked_mean_and_whiten_are_token_means():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert ppo.masked_mean(values, mask).item() == pytest.approx(2.0)
    assert ppo.masked_mean(values, torch.zeros_like(mask)).item() == 0.0
    white = ppo.masked_whiten(values, mask)
    valid = torch.tensor([1.0, 2.0, 3.0])
    expected = (valid - valid.mean()) / torch.sqrt(valid.var(unbiased=False) + 1e-8)
    torch.testing.assert_close(white[mask], expected)
    assert bool((white[~mask] == 0).all())
    unshifted = ppo.masked_whiten(values, mask, shift_mean=False)
    torch.testing.assert_close(unshifted[mask], expected + 2.0)
    # Statistics from a bigger (e.g. all-reduced) batch are used as given.
    moments = ppo.masked_moments(values, mask) * 2
    torch.testing.assert_close(ppo.masked_whiten(values, mask, moments=moments)[mask], expected)


@given(st.integers(0, 10_000), st.sampled_from([0.1, 0.2]))
def test_policy_loss_matches_reference(seed, eps):
    gen = torch.Generator().manual_seed(seed)
    logp = torch.randn(3, 6, generator=gen, dtype=torch.float64) * 0.3
    old = torch.randn(3, 6, generator=gen, dtype=torch.float64) * 0.3
    adv = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 6, generator=gen) > 0.3
    mask[0, 0] = True
    loss, clip_fraction, approx_kl = ppo.policy_loss(logp, old, adv, mask, clip_eps=eps)
    flat = lambda t: t.flatten().tolist()  # noqa: E731
    assert loss.item() == pytest.approx(ref.policy_loss_tokens(flat(logp), flat(old), flat(adv), flat(mask), eps))
    assert 0.0 <= clip_fraction.item() <= 1.0 and approx_kl.item() >= 0.0
    assert not clip_fraction.requires_grad


def test_policy_loss_gradient_is_zero_where_clipped():
    logp = torch.tensor([[math.log(2.0), 0.0]], requires_grad=True)
    loss, clip_fraction, _ = ppo.policy_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2, dtype=bool))
    loss.backward()
    assert clip_fraction.item() == 0.5
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[0, 1].item() == pytest.approx(-0.5)


@given(st.integers(0, 10_000), st.sampled_from([0.2, 0.25, None]))
def test_value_loss_matches_reference(seed, clip):
    gen = torch.Generator().manual_seed(seed)
    values, old, returns = (torch.randn(2, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 5, generator=gen) > 0.3
    mask[1, 1] = True
    loss, clip_fraction = ppo.value_loss(values, old, returns, mask, clip=clip)
    flat = lambda t: t.flatten().tolist()  # noqa: E731
    expected = ref.value_loss_tokens(flat(values), flat(old), flat(returns), flat(mask), clip if clip else math.inf)
    assert loss.item() == pytest.approx(expected)
    assert 0.0 <= clip_fraction.item() <= 1.0


def test_kl_controllers():
    fixed = ppo.FixedKLController(0.01)
    fixed.update(5.0, 100)
    assert fixed.value == 0.01
    adaptive = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    adaptive.update(12.0, n_steps=1000)  # error clipped to +0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    adaptive.update(6.0, n_steps=1000)
    assert adaptive.value == pytest.approx(0.1 * 1.02)
    with pytest.raises(ValueError, match="target KL must be > 0"):
        ppo.AdaptiveKLController(0.1, target=0.0, horizon=1)


# ------------------------------------------------------------------------------------------------------ DPO
@given(st.integers(0, 10_000), st.sampled_from([0.1, 0.5]), st.sampled_from([0.0, 0.1]))
def test_dpo_matches_reference(seed, beta, smoothing):
    gen = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (torch.randn(4, generator=gen, dtype=torch.float64) * 10 for _ in range(4))
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=smoothing)
    assert loss.item() == pytest.approx(ref.dpo(*(t.tolist() for t in (pc, pr, rc, rr)), beta, smoothing))
    torch.testing.assert_close(chosen, beta * (pc - rc))
    torch.testing.assert_close(rejected, beta * (pr - rr))


def test_dpo_errors():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match=r"ref_rejected_logps has shape \(2,\)"):
        dpo_loss(z, z, z, torch.zeros(2))
    with pytest.raises(ValueError, match=r"beta must be > 0, got 0"):
        dpo_loss(z, z, z, z, beta=0)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        dpo_loss(z, z, z, z, label_smoothing=0.5)


def test_gae_ignores_garbage_at_masked_positions():
    mask = torch.tensor([[False, True, True, False, True, False]])
    rewards = torch.tensor([[float("nan"), 1.0, 2.0, float("inf"), 3.0, float("nan")]])
    values = torch.tensor([[float("inf"), 0.5, 0.25, float("nan"), 0.125, -float("inf")]])
    adv, ret = ppo.gae(rewards, values, mask, 0.9, 0.8)
    clean_r = torch.where(mask, rewards, 0.0)
    clean_v = torch.where(mask, values, 0.0)
    exp_adv, exp_ret = ref.gae_row(clean_r[0].tolist(), clean_v[0].tolist(), mask[0].tolist(), 0.9, 0.8)
    assert adv[0].tolist() == pytest.approx(exp_adv) and ret[0].tolist() == pytest.approx(exp_ret)


def _rows_reference(token_losses, mask, how):
    """The three reductions written out over rows of plain lists: token-mean, seq-mean-token-mean, seq-mean-token-sum."""
    rows = [[loss for loss, m in zip(row_losses, row_mask) if m] for row_losses, row_mask in zip(token_losses, mask)]
    rows = [row for row in rows if row]
    if how == "token-mean":
        return sum(sum(row) for row in rows) / sum(len(row) for row in rows)
    if how == "seq-mean-token-mean":
        return sum(sum(row) / len(row) for row in rows) / len(rows)
    return sum(sum(row) for row in rows) / len(rows)


@given(st.integers(0, 10_000), st.sampled_from(ppo.LOSS_AGGREGATIONS))
def test_loss_aggregations_match_their_definitions(seed, how):
    gen = torch.Generator().manual_seed(seed)
    logp, old, adv = (torch.randn(4, 7, generator=gen, dtype=torch.float64) * 0.3 for _ in range(3))
    mask = torch.rand(4, 7, generator=gen) > 0.4
    mask[:, 0] = True  # every response has an action
    loss, _, _ = ppo.policy_loss(logp, old, adv, mask, clip_eps=0.2, loss_aggregation=how)
    ratio = torch.exp(logp - old)
    token_losses = (-torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)).tolist()
    assert loss.item() == pytest.approx(_rows_reference(token_losses, mask.tolist(), how), rel=1e-12)
    values, old_values, returns = (torch.randn(4, 7, generator=gen, dtype=torch.float64) for _ in range(3))
    value, _ = ppo.value_loss(values, old_values, returns, mask, clip=None, loss_aggregation=how)
    squares = (0.5 * (values - returns).square()).tolist()
    assert value.item() == pytest.approx(_rows_reference(squares, mask.tolist(), how), rel=1e-12)


def test_loss_shares_of_a_larger_batch_add_up_to_its_loss():
    gen = torch.Generator().manual_seed(1)
    losses = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, 5, generator=gen) > 0.3
    mask[:, 0] = True
    for how in ppo.LOSS_AGGREGATIONS:
        whole = ppo.aggregate_loss(losses, mask, how)
        counts = {"num_tokens": float(mask.sum()), "num_sequences": 6.0}
        parts = sum(ppo.aggregate_loss(losses[rows], mask[rows], how, **counts) for rows in (slice(0, 2), slice(2, 6)))
        assert parts.item() == pytest.approx(whole.item(), rel=1e-12), how
    with pytest.raises(ValueError, match="loss aggregation"):
        ppo.aggregate_loss(losses, mask, "token-sum")
