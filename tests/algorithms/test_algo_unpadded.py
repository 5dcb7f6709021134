"""The unpadded pipeline (megaseg.algorithms.unpadded) against the padded functions, the per-sequence loop reference
and a plain discounted-sum loop."""

import algo_reference as ref
import pytest
import torch
from algo_strategies import batches
from hypothesis import given
from hypothesis import strategies as st

from megaseg.algorithms import ppo
from megaseg.algorithms import unpadded as up
from megaseg.algorithms.aggregation import aggregate_segment_rewards
from megaseg.algorithms.interpolation import token_rewards
from megaseg.algorithms.segmentation import (
    entropy_segment_ends,
    segment_ends,
    segment_lengths,
    segment_positions,
    token_segment_ends,
)

MODES = ["entropy", "bandit", "token", "sentence", "ngram"]


def _ends(batch, mode):
    return segment_ends(
        mode, batch.response_mask, batch.eos_mask, entropy=batch.entropy, cutoff=1.75, n=2, token_texts=batch.texts
    )


def _responses(batch):
    return up.UnpaddedResponses.from_masks(batch.response_mask, batch.eos_mask)


@given(batches())
def test_unpad_lists_the_response_tokens_row_by_row_and_pad_inverts_it(batch):
    responses = _responses(batch)
    expected = [v for b in range(batch.values.shape[0]) for v, m in zip(batch.values[b].tolist(),
                                                                        batch.response_mask[b].tolist()) if m]
    assert responses.unpad(batch.values).tolist() == expected
    assert responses.cu_seqlens.tolist() == [0] + torch.cumsum(batch.response_mask.sum(1), 0).tolist()
    assert torch.equal(responses.pad(responses.unpad(batch.values)), torch.where(batch.response_mask,
                                                                                 batch.values, 0.0))
    assert torch.equal(responses.eos, responses.unpad(batch.eos_mask))


@given(batches(), st.sampled_from([0.0, 0.5, 1.75, 2.0, 1000.0]))
def test_entropy_and_token_ends_equal_the_padded_segmentation(batch, cutoff):
    responses = _responses(batch)
    padded = entropy_segment_ends(batch.entropy, batch.response_mask, batch.eos_mask, cutoff)
    got = up.entropy_segment_ends(responses.unpad(batch.entropy), responses, cutoff)
    assert torch.equal(got, responses.unpad(padded))
    every = up.segment_ends_from_boundaries(torch.ones_like(responses.eos), responses)
    assert torch.equal(every, responses.unpad(token_segment_ends(batch.response_mask, batch.eos_mask)))


@given(batches(), st.sampled_from(MODES), st.sampled_from(["even", "repeat", "none"]))
def test_segments_equal_the_padded_layout_and_the_loop_reference(batch, mode, how):
    ends = _ends(batch, mode)
    responses = _responses(batch)
    segments = up.UnpaddedSegments.from_ends(responses.unpad(ends), responses)
    values = responses.unpad(batch.values)
    rewards = segments.at_ends(values)

    assert torch.equal(responses.pad(segments.token_rewards(rewards, how)),
                       token_rewards(batch.values, ends, batch.response_mask, how))
    at_ends = torch.zeros_like(values).index_copy_(0, segments.end_at, segments.positions(torch.float64))
    torch.testing.assert_close(responses.pad(at_ends).float(), segment_positions(ends, batch.response_mask))
    lengths = torch.zeros_like(values).index_copy_(0, segments.end_at, segments.lengths.double())
    assert torch.equal(responses.pad(lengths).long(), segment_lengths(ends, batch.response_mask))
    torch.testing.assert_close(segments.mean(rewards), aggregate_segment_rewards(batch.values, ends, "mean"))
    for b in range(ends.shape[0]):
        row = ref.segments_from_ends(ends[b].tolist(), batch.response_mask[b].tolist())
        assert segments.num_segments[b].item() == len(row)
        mine = rewards[segments.response_of == b].tolist()
        assert mine == ref.segment_rewards(batch.values[b].tolist(), row)


def test_a_response_without_a_segment_end_is_refused():
    mask = torch.tensor([[True, True, False], [False, True, True]])
    responses = up.UnpaddedResponses.from_masks(mask, torch.zeros_like(mask))
    ends = torch.tensor([True, True, False, False])
    with pytest.raises(ValueError, match=r"responses \[1\] have no segment end"):
        up.UnpaddedSegments.from_ends(ends, responses)


def test_bad_masks_are_refused_with_the_padded_messages():
    holes = torch.tensor([[True, False, True]])
    with pytest.raises(ValueError, match="contiguous"):
        up.UnpaddedResponses.from_masks(holes, torch.zeros_like(holes))
    empty = torch.tensor([[False, False], [True, True]])
    with pytest.raises(ValueError, match="no response tokens"):
        up.UnpaddedResponses.from_masks(empty, torch.zeros_like(empty))
    response = torch.tensor([[False, True, True, False], [True, True, True, True]])
    early_eos = torch.tensor([[False, True, False, False], [False, False, False, True]])
    with pytest.raises(ValueError, match=r"eos_mask rows \[0\] mark an EOS that is not the last response token"):
        up.UnpaddedResponses.from_masks(response, early_eos)
    two_eos = torch.tensor([[False, False, True, False], [False, False, True, True]])
    with pytest.raises(ValueError, match=r"eos_mask rows \[1\] have more than one EOS"):
        up.UnpaddedResponses.from_masks(response, two_eos)
    outside = torch.tensor([[False, False, False, True], [False, False, False, False]])
    with pytest.raises(ValueError, match=r"eos_mask rows \[0\] mark an EOS"):
        up.UnpaddedResponses.from_masks(response, outside)


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("length", [1, 7, 8, 9, 33, 70])
def test_flat_discounted_sum_equals_the_loop_across_folds(decay, length):
    x = torch.randn(length, generator=torch.Generator().manual_seed(length), dtype=torch.float64)
    expected, running = [0.0] * length, 0.0
    for t in reversed(range(length)):
        running = x[t].item() + decay * running
        expected[t] = running
    for width in (4, 8, up.FOLD_WIDTH):
        got = up.flat_discounted_reverse_cumsum(x, decay, width)
        assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@given(batches(max_batch=5, max_seq=40), st.sampled_from([0.0, 0.5, 0.99, 1.0]), st.sampled_from([0.0, 0.95, 1.0]))
def test_gae_runs_each_response_alone_like_the_textbook_loop(batch, gamma, lam):
    responses = _responses(batch)
    gen = torch.Generator().manual_seed(1)
    rewards, values = (torch.randn(batch.values.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    adv, ret = up.gae(responses.unpad(rewards), responses.unpad(values), responses, gamma, lam)
    padded = ppo.gae(rewards, values, batch.response_mask, gamma, lam)
    torch.testing.assert_close((responses.pad(adv), responses.pad(ret)), padded, rtol=1e-9, atol=1e-9)
    b = 0
    mask = batch.response_mask[b].tolist()
    exp_adv, _ = ref.gae_row(torch.where(batch.response_mask[b], rewards[b], 0.0).tolist(),
                             torch.where(batch.response_mask[b], values[b], 0.0).tolist(), mask, gamma, lam)
    assert responses.pad(adv)[b].tolist() == pytest.approx(exp_adv, rel=1e-9, abs=1e-9)


def test_gae_in_fp32_over_long_responses_stays_close_to_fp64():
    """The leak into the following responses is subtracted, not avoided: check it costs no fp32 accuracy that
    matters at rollout size (64 responses of up to 2048 tokens)."""
    gen = torch.Generator().manual_seed(0)
    batch, seq = 64, 2048
    start = torch.randint(0, 1024, (batch, 1), generator=gen)
    cols = torch.arange(seq)
    mask = (cols >= start) & (cols < start + torch.randint(1, 1024, (batch, 1), generator=gen))
    rewards, values = torch.randn(batch, seq, generator=gen), torch.randn(batch, seq, generator=gen)
    responses = up.UnpaddedResponses.from_masks(mask, torch.zeros_like(mask))
    adv, _ = up.gae(responses.unpad(rewards), responses.unpad(values), responses, 1.0, 0.95)
    exact, _ = ppo.gae(rewards.double(), values.double(), mask, 1.0, 0.95)
    torch.testing.assert_close(responses.pad(adv).double(), exact, rtol=1e-5, atol=1e-5)


def test_gae_when_the_tokens_fill_whole_folds():
    """N a multiple of the fold width: the sum after the last response must still read as 0."""
    mask = torch.ones(2, up.FOLD_WIDTH // 2, dtype=torch.bool)
    gen = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(mask.shape, generator=gen), torch.randn(mask.shape, generator=gen)
    responses = up.UnpaddedResponses.from_masks(mask, torch.zeros_like(mask))
    assert responses.num_tokens == up.FOLD_WIDTH
    adv, ret = up.gae(responses.unpad(rewards), responses.unpad(values), responses, 0.99, 0.95)
    expected = ppo.gae(rewards.double(), values.double(), mask, 0.99, 0.95)
    torch.testing.assert_close((responses.pad(adv).double(), responses.pad(ret).double()), expected,
                               rtol=1e-5, atol=1e-5)
