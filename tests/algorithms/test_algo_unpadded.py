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


def _expected_slots(batch):
    """The slot layout written out with a loop: (tokens as (row, column) or None per slot, start slot per row)."""
    slots, starts = [], []
    for b in range(batch.response_mask.shape[0]):
        columns = [j for j, m in enumerate(batch.response_mask[b].tolist()) if m]
        starts.append(len(slots))
        slots += [(b, j) for j in columns]
        slots += [None] * (up.SLOT_ALIGN - len(columns) % up.SLOT_ALIGN)  # 1 to SLOT_ALIGN pad slots
    return slots, starts + [len(slots)]


@given(batches(max_seq=40))
def test_unpad_lays_responses_out_in_aligned_slots_and_pad_inverts_it(batch):
    responses = _responses(batch)
    slots, starts = _expected_slots(batch)
    seq = batch.values.shape[1]
    assert responses.starts.tolist() == starts
    assert all(start % up.SLOT_ALIGN == 0 for start in starts)
    assert responses.real.tolist() == [slot is not None for slot in slots]
    assert responses.real_float.tolist() == [float(slot is not None) for slot in slots]
    got = responses.unpad(batch.values).tolist()
    assert [v for v, slot in zip(got, slots) if slot] == [batch.values[b, j].item() for b, j in filter(None, slots)]
    assert responses.scatter_index.tolist() == [b * seq + j if slot else batch.values.numel()
                                                for slot in slots for b, j in [slot or (0, 0)]]
    # NaN outside the responses stays out: the pad slots hold 0.
    unpadded = responses.unpad(torch.where(batch.response_mask, batch.values, float("nan")))
    assert not unpadded[~responses.real].any()
    assert torch.equal(responses.pad(unpadded), torch.where(batch.response_mask, batch.values, 0.0))
    assert torch.equal(responses.eos, responses.unpad(batch.eos_mask) & responses.real)
    # GAE's grid: block j is (its response, its block within the response) of a power-of-two width with room for one
    # more column than the longest response has blocks.
    blocks = [(b, (i - starts[b]) // up.SLOT_ALIGN) for b in range(len(starts) - 1)
              for i in range(starts[b], starts[b + 1], up.SLOT_ALIGN)]
    width = responses.grid_width
    assert width & (width - 1) == 0 and width >= max(column for _, column in blocks) + 2
    assert responses.grid_index.tolist() == [b * width + column for b, column in blocks]


@given(batches(), st.sampled_from([0.0, 0.5, 1.75, 2.0, 1000.0]))
def test_entropy_and_token_ends_equal_the_padded_segmentation(batch, cutoff):
    responses = _responses(batch)
    padded = entropy_segment_ends(batch.entropy, batch.response_mask, batch.eos_mask, cutoff)
    got = up.entropy_segment_ends(responses.unpad(batch.entropy), responses, cutoff)
    assert torch.equal(responses.pad(got), padded)
    assert not (got & ~responses.real).any()
    every = up.segment_ends_from_boundaries(responses.real.clone(), responses)  # False in the pad slots
    assert torch.equal(responses.pad(every), token_segment_ends(batch.response_mask, batch.eos_mask))
    assert not (every & ~responses.real).any()


@given(batches(), st.sampled_from(MODES), st.sampled_from(["even", "repeat", "none"]))
def test_segments_equal_the_padded_layout_and_the_loop_reference(batch, mode, how):
    ends = _ends(batch, mode)
    responses = _responses(batch)
    segments = up.UnpaddedSegments.from_ends(responses.unpad(ends), responses)  # pad slots hold garbage: ignored
    values = responses.unpad(batch.values)
    rewards = segments.at_ends(values)
    assert torch.equal(segments.at_ends(batch.values), rewards)  # straight from the padded tensor

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
    ends = responses.unpad(torch.tensor([[True, True, False], [False, False, False]]))
    with pytest.raises(ValueError, match=r"responses \[1\] have no segment end"):
        up.UnpaddedSegments.from_ends(ends, responses)


def test_ends_in_pad_slots_or_far_before_the_last_token_are_refused():
    mask = torch.tensor([[True, True, True], [True, True, False]])
    responses = up.UnpaddedResponses.from_masks(mask, torch.zeros_like(mask))
    early = responses.unpad(torch.tensor([[True, False, False], [False, True, False]]))
    with pytest.raises(ValueError, match=r"responses \[0\] have more than one token after their last segment end"):
        up.UnpaddedSegments.from_ends(early, responses)
    on_pad = responses.unpad(torch.tensor([[False, False, True], [False, True, False]]))
    on_pad[responses.last[1] + 1] = True
    with pytest.raises(ValueError, match="ends marks pad slots"):
        up.UnpaddedSegments.from_ends(on_pad, responses)


def test_a_token_after_the_last_end_gets_no_reward_as_in_the_padded_layout():
    """Ends one token short of a response without EOS: that last token is in no segment (the padded functions' rule
    for tokens after the last end)."""
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])
    eos = torch.tensor([[False, False, False, False], [False, False, False, True]])
    ends = torch.tensor([[True, True, False, False], [False, False, True, False]])
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    responses = up.UnpaddedResponses.from_masks(mask, eos)
    segments = up.UnpaddedSegments.from_ends(responses.unpad(ends), responses)
    for how in ("even", "repeat", "none"):
        got = responses.pad(segments.token_rewards(segments.at_ends(values), how))
        assert torch.equal(got, token_rewards(values, ends, mask, how))


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


@given(batches(max_batch=5, max_seq=40), st.sampled_from([0.0, 0.5, 0.99, 1.0]), st.sampled_from([0.0, 0.95, 1.0]))
def test_gae_runs_each_response_alone_like_the_textbook_loop(batch, gamma, lam):
    responses = _responses(batch)
    gen = torch.Generator().manual_seed(1)
    rewards, values = (torch.randn(batch.values.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    adv, ret = up.gae(responses.unpad(rewards), responses.unpad(values), responses, gamma, lam)
    padded = ppo.gae(rewards, values, batch.response_mask, gamma, lam)
    torch.testing.assert_close((responses.pad(adv), responses.pad(ret)), padded, rtol=1e-9, atol=1e-9)
    assert not adv[~responses.real].any() and not ret[~responses.real].any()
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


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.95, 1.0])
def test_gae_across_block_and_grid_boundaries_equals_the_textbook_loop(decay):
    """Lengths on either side of a block edge (SLOT_ALIGN), one response of 1, and a long one whose blocks span
    several blocks of the per-response grid filter; NaN at every prompt and padding position must not leak in."""
    lengths = [up.SLOT_ALIGN - 1, up.SLOT_ALIGN, up.SLOT_ALIGN + 1, 1, 2 * up.SLOT_ALIGN, 40 * up.SLOT_ALIGN + 3]
    seq = max(lengths) + 5
    mask = torch.arange(seq) < torch.tensor(lengths)[:, None]
    mask = mask.roll(3, dims=1)  # a prompt of 3 in front of every response
    gen = torch.Generator().manual_seed(7)
    rewards, values = (torch.randn(mask.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    responses = up.UnpaddedResponses.from_masks(mask, torch.zeros_like(mask))
    unpad = lambda x: responses.unpad(torch.where(mask, x, float("nan")))  # noqa: E731
    adv, ret = up.gae(unpad(rewards), unpad(values), responses, 1.0, decay)
    assert not adv[~responses.real].any() and not ret[~responses.real].any()
    for b in range(len(lengths)):
        expected, _ = ref.gae_row(torch.where(mask[b], rewards[b], 0.0).tolist(),
                                  torch.where(mask[b], values[b], 0.0).tolist(), mask[b].tolist(), 1.0, decay)
        assert responses.pad(adv)[b].tolist() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    torch.testing.assert_close(responses.pad(ret), ppo.gae(rewards, values, mask, 1.0, decay)[1])


@given(batches(max_batch=5, max_seq=40))
def test_whiten_uses_the_response_tokens_only(batch):
    responses = _responses(batch)
    values = torch.randn(batch.values.shape, generator=torch.Generator().manual_seed(2))
    whitened = up.whiten(responses.unpad(values), responses)
    assert not whitened[~responses.real].any()
    got = responses.pad(whitened)
    torch.testing.assert_close(got, ppo.masked_whiten(values, batch.response_mask), rtol=1e-5, atol=1e-5)
