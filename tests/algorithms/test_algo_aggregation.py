import math

import algo_reference as ref
import pytest
import torch
from algo_strategies import batches
from hypothesis import given
from hypothesis import strategies as st

from megaseg.algorithms import aggregation as agg
from megaseg.algorithms.interpolation import token_rewards
from megaseg.algorithms.segmentation import segment_ends, segment_ids

MODES = ["entropy", "bandit", "token", "sentence", "ngram"]


def _ends(batch, mode):
    return segment_ends(
        mode, batch.response_mask, batch.eos_mask, entropy=batch.entropy, cutoff=1.75, n=2, token_texts=batch.texts
    )


def _row_segments(batch, ends, b):
    return ref.segments_from_ends(ends[b].tolist(), batch.response_mask[b].tolist())


@given(batches(), st.sampled_from(MODES), st.sampled_from(["mean", "sum", "last", "min"]))
def test_aggregations_match_reference(batch, mode, how):
    ends = _ends(batch, mode)
    out = agg.aggregate_segment_rewards(batch.values, ends, how=how)
    assert out.shape == (ends.shape[0],)
    for b in range(ends.shape[0]):
        expected = ref.aggregate(batch.values[b].tolist(), _row_segments(batch, ends, b), how)
        assert out[b].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@given(batches(), st.sampled_from(MODES))
def test_padded_rewards_and_positions_match_reference(batch, mode):
    ends = _ends(batch, mode)
    rewards, mask = agg.padded_segment_rewards(batch.values, ends)
    positions, pos_mask = agg.padded_segment_positions(ends)
    assert torch.equal(mask, pos_mask)
    assert rewards.shape[1] == int(ends.sum(1).max())
    for b in range(ends.shape[0]):
        segments = _row_segments(batch, ends, b)
        num = len(segments)
        assert mask[b].tolist() == [t < num for t in range(rewards.shape[1])]
        assert rewards[b, :num].tolist() == ref.segment_rewards(batch.values[b].tolist(), segments)
        assert positions[b, :num].tolist() == pytest.approx([(t + 1) / num for t in range(num)])
        assert bool((rewards[b, num:] == 0).all()) and bool((positions[b, num:] == 0).all())


def test_padded_with_fixed_width():
    ends = torch.tensor([[True, False, True]])
    rewards, mask = agg.padded_segment_rewards(torch.tensor([[1.0, 9.0, 2.0]]), ends, max_segments=4)
    assert rewards.tolist() == [[1.0, 2.0, 0.0, 0.0]] and mask.tolist() == [[True, True, False, False]]
    with pytest.raises(ValueError, match="max_segments=1 is smaller than the largest segment count 2"):
        agg.padded_segment_rewards(torch.tensor([[1.0, 9.0, 2.0]]), ends, max_segments=1)


def test_mean_ignores_garbage_off_segment_and_gradient_is_clean():
    values = torch.tensor([[float("nan"), 1.0, float("inf"), 3.0]], requires_grad=True)
    ends = torch.tensor([[False, True, False, True]])
    out = agg.mean_segment_reward(values, ends)
    assert out.item() == 2.0
    out.backward()
    assert values.grad.tolist() == [[0.0, 0.5, 0.0, 0.5]]


@given(st.lists(st.tuples(st.floats(-50, 50), st.floats(-50, 50)), min_size=1, max_size=20))
def test_bradley_terry_matches_reference(pairs):
    chosen = torch.tensor([c for c, _ in pairs], dtype=torch.float64)
    rejected = torch.tensor([r for _, r in pairs], dtype=torch.float64)
    loss = agg.bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(ref.bradley_terry(chosen.tolist(), rejected.tolist()), rel=1e-9, abs=1e-12)


def test_bradley_terry_is_stable_for_huge_margins():
    chosen = torch.tensor([-1e4, 1e4], requires_grad=True)
    loss = agg.bradley_terry_loss(chosen, torch.zeros(2))
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(1e4 / 2)
    assert torch.isfinite(chosen.grad).all()
    assert agg.preference_accuracy(chosen.detach(), torch.zeros(2)).item() == 0.5


def test_aggregation_errors():
    ends = torch.tensor([[True, False], [False, True]])
    with pytest.raises(ValueError, match=r"aggregation='median' is not supported; choose one of \['mean', 'sum'"):
        agg.aggregate_segment_rewards(torch.zeros(2, 2), ends, how="median")
    with pytest.raises(ValueError, match=r"values at segment ends contains NaN or inf in rows \[1\]"):
        agg.mean_segment_reward(torch.tensor([[0.0, 0.0], [0.0, float("nan")]]), ends)
    with pytest.raises(ValueError, match=r"values has shape \(2, 3\)"):
        agg.mean_segment_reward(torch.zeros(2, 3), ends)
    with pytest.raises(ValueError, match=r"rows \[1\] have no segment end"):
        agg.mean_segment_reward(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="rejected_scores has shape"):
        agg.bradley_terry_loss(torch.zeros(3), torch.zeros(2))


# ----------------------------------------------------------------------------------------------- interpolation
@given(batches(), st.sampled_from(MODES), st.sampled_from(["even", "repeat", "none"]))
def test_token_rewards_match_reference(batch, mode, how):
    ends = _ends(batch, mode)
    out = token_rewards(batch.values, ends, batch.response_mask, mode=how)
    for b in range(ends.shape[0]):
        segments = _row_segments(batch, ends, b)
        seg_values = ref.segment_rewards(batch.values[b].tolist(), segments)
        expected = ref.interpolate(seg_values, segments, ends.shape[1], how)
        assert out[b].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@given(batches(), st.sampled_from(MODES))
def test_even_split_preserves_each_segment_total(batch, mode):
    ends = _ends(batch, mode)
    out = token_rewards(batch.values, ends, batch.response_mask, mode="even")
    ids = segment_ids(ends, batch.response_mask)
    for b in range(ends.shape[0]):
        for t in range(int(ends[b].sum())):
            total = out[b][ids[b] == t].sum().item()
            assert total == pytest.approx(batch.values[b][ends[b]][t].item(), abs=1e-9)
    # The whole return is unchanged (paper Sec. 2.3) and nothing leaks outside segments.
    torch.testing.assert_close(out.sum(1), torch.where(ends, batch.values, 0.0).sum(1))
    assert bool((out[ids < 0] == 0).all())


def test_eos_gets_no_segment_reward():
    response = torch.tensor([[False, True, True, True]])
    ends = torch.tensor([[False, False, True, False]])  # EOS at 3 is outside the final segment
    out = token_rewards(torch.tensor([[7.0, 7.0, 4.0, 7.0]]), ends, response, mode="even")
    assert out.tolist() == [[0.0, 2.0, 2.0, 0.0]]


def test_interpolation_errors():
    response = torch.tensor([[True, True]])
    ends = torch.tensor([[False, True]])
    with pytest.raises(ValueError, match=r"'spread' is not supported; choose one of \['even', 'repeat', 'none'\]"):
        token_rewards(torch.zeros(1, 2), ends, response, mode="spread")
    with pytest.raises(ValueError, match="segment_values at segment ends contains NaN"):
        token_rewards(torch.tensor([[0.0, float("inf")]]), ends, response)
