"""Token selection rules (pure torch) against slow references: the nucleus, top-k, the filter order, greedy ties,
and the empirical distribution of the draws; SamplingSettings validation."""
import math

import pytest
import torch
from gen_reference import nucleus_reference
from hypothesis import given, settings
from hypothesis import strategies as st

from megaseg.config.policy import PPOConfig
from megaseg.generation.sampling import (
    filtered_logits,
    keep_top_k,
    keep_top_p,
    nucleus_mask,
    sample_next_tokens,
)
from megaseg.generation.settings import SamplingSettings

# Probabilities (sorted: 0.4, 0.25, 0.15, 0.1, 0.06, 0.04) scattered over 6 ids; cumulative 0.4, 0.65, 0.8, 0.9,
# 0.96, 1.0 -- no top_p below sits within 0.01 of a partial sum, where fp32 rounding would decide.
FIXED_PROBS = [0.1, 0.4, 0.04, 0.25, 0.06, 0.15]


def _settings(**overrides):
    values = dict(max_new_tokens=4, stop_token_ids=(0,))
    values.update(overrides)
    return SamplingSettings(**values)


@pytest.mark.parametrize("top_p, expected", [
    (0.3, {1}), (0.45, {1, 3}), (0.6, {1, 3}), (0.7, {1, 3, 5}), (0.85, {1, 3, 5, 0}), (0.95, {1, 3, 5, 0, 4}),
    (0.99, set(range(6))), (1.0, set(range(6))),
])
def test_nucleus_of_a_fixed_distribution(top_p, expected):
    assert nucleus_reference(FIXED_PROBS, top_p) == expected
    mask = nucleus_mask(torch.tensor([FIXED_PROBS]), top_p)
    assert set(mask[0].nonzero().flatten().tolist()) == expected


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.floats(-6.0, 6.0), min_size=2, max_size=30), min_size=1, max_size=4).filter(
    lambda rows: len({len(row) for row in rows}) == 1), st.floats(0.05, 0.999))
def test_nucleus_mask_matches_the_reference(rows, top_p):
    logits = torch.tensor(rows, dtype=torch.float64)
    probs = torch.softmax(logits, dim=-1)
    for row, row_fp32 in zip(probs.tolist(), probs.float().tolist()):
        partial_sums = torch.tensor(sorted(row, reverse=True)).cumsum(0)
        # Probabilities equal in fp32 (what nucleus_mask sees), or a partial sum within fp32 rounding of top_p: the
        # set is not well defined there.
        if len(set(row_fp32)) < len(row_fp32) or (partial_sums - top_p).abs().min() < 1e-5:
            return
    mask = nucleus_mask(probs.float(), top_p)
    for row, row_mask in zip(probs.tolist(), mask):
        kept = set(row_mask.nonzero().flatten().tolist())
        assert kept == nucleus_reference(row, top_p)
        assert sum(row[i] for i in kept) >= top_p - 1e-6


def test_keep_top_p_masks_outside_the_nucleus_only():
    logits = torch.tensor([FIXED_PROBS]).log()
    filtered = keep_top_p(logits, 0.7)
    kept = torch.isfinite(filtered[0])
    assert kept.nonzero().flatten().tolist() == [1, 3, 5]
    assert torch.equal(filtered[0, kept], logits[0, kept])
    assert keep_top_p(logits, 1.0) is logits


def test_keep_top_k():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0, 2.5], [1.0, 1.0, 0.0, -2.0, 1.0]])
    top2 = keep_top_k(logits, 2)
    assert torch.isfinite(top2[0]).nonzero().flatten().tolist() == [1, 4]
    # Ties with the k-th largest value are all kept.
    assert torch.isfinite(top2[1]).nonzero().flatten().tolist() == [0, 1, 4]
    assert keep_top_k(logits, 0) is logits and keep_top_k(logits, 5) is logits


def test_filters_apply_temperature_then_top_k_then_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    got = filtered_logits(logits, _settings(temperature=2.0, top_k=3, top_p=0.6))
    scaled = [value / 2.0 for value in logits[0].tolist()]
    top3 = sorted(range(5), key=lambda i: -scaled[i])[:3]  # ids 4, 0, 1
    total = sum(math.exp(scaled[i]) for i in top3)
    nucleus = nucleus_reference([math.exp(scaled[i]) / total if i in top3 else 0.0 for i in range(5)], 0.6)
    assert set(torch.isfinite(got[0]).nonzero().flatten().tolist()) == nucleus == {4, 0}
    torch.testing.assert_close(got[0, [4, 0]], torch.tensor([1.5, 1.0]))


def test_greedy_takes_the_first_maximum():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, -1.0, 5.0, 5.0]])
    assert sample_next_tokens(logits, _settings(greedy=True), None).tolist() == [1, 0]
    assert sample_next_tokens(logits, _settings(temperature=0.0), None).tolist() == [1, 0]


def test_samples_follow_the_filtered_distribution():
    probs = torch.tensor(FIXED_PROBS)
    logits = probs.log().expand(20000, -1).contiguous()
    draws = sample_next_tokens(logits, _settings(top_p=0.85), torch.Generator().manual_seed(3))
    counts = torch.bincount(draws, minlength=6).double() / draws.numel()
    nucleus = torch.tensor([i in {0, 1, 3, 5} for i in range(6)])
    expected = torch.where(nucleus, probs.double(), 0.0)
    expected /= expected.sum()
    assert (counts[~nucleus] == 0).all()
    # 20000 draws: the standard error of each frequency is below 0.004.
    torch.testing.assert_close(counts, expected, atol=0.015, rtol=0.0)


def test_sampling_is_reproducible_and_needs_a_generator():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    first = sample_next_tokens(logits, _settings(), torch.Generator().manual_seed(9))
    again = sample_next_tokens(logits, _settings(), torch.Generator().manual_seed(9))
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match="torch.Generator"):
        sample_next_tokens(logits, _settings(), None)


@pytest.mark.parametrize("overrides, message", [
    (dict(stop_token_ids=()), "stop_token_ids=\\(\\) is empty"),
    (dict(stop_token_ids=(-1,)), "non-negative integer"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k=-1), "top_k=-1"),
])
def test_settings_name_the_bad_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        _settings(**overrides)


def test_settings_from_the_ppo_config():
    ppo = PPOConfig(max_new_tokens=64, temperature=0.8, top_p=0.95, top_k=40)
    got = SamplingSettings.from_ppo_config(ppo, [2, 7])
    assert got == SamplingSettings(max_new_tokens=64, stop_token_ids=(2, 7), temperature=0.8, top_p=0.95, top_k=40)
    assert not got.is_greedy and SamplingSettings(4, (1,), temperature=0.0).is_greedy
