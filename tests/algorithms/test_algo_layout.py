"""SegmentLayout and the packed path (pack -> normalize -> interpolate) against the references and the token path,
the bitwise masking helpers against torch.where, and GAE on contiguous masks against the textbook loop."""

import algo_reference as ref
import pytest
import torch
from algo_strategies import batches
from hypothesis import given
from hypothesis import strategies as st

from megaseg.algorithms import normalizer as nz
from megaseg.algorithms import ppo, unpadded
from megaseg.algorithms.aggregation import aggregate_packed_rewards, aggregate_segment_rewards, packed_segment_rewards
from megaseg.algorithms.interpolation import packed_token_rewards, token_rewards
from megaseg.algorithms.masking import any_true, count_true, zero_outside, zero_outside_
from megaseg.algorithms.segmentation import SegmentLayout, segment_ends, segment_positions

MODES = ["entropy", "bandit", "token", "sentence", "ngram"]
META = {"model": "tiny", "c_ent": 1.75, "aggregation": "mean", "segmentation": "entropy"}


def _ends(batch, mode):
    return segment_ends(
        mode, batch.response_mask, batch.eos_mask, entropy=batch.entropy, cutoff=1.75, n=2, token_texts=batch.texts
    )


def _row_segments(batch, ends, b):
    return ref.segments_from_ends(ends[b].tolist(), batch.response_mask[b].tolist())


@given(batches(), st.sampled_from(MODES))
def test_layout_matches_reference(batch, mode):
    ends = _ends(batch, mode)
    layout = SegmentLayout.from_ends(ends, batch.response_mask)
    packed = layout.pack(batch.values)
    lengths, positions = layout.lengths, layout.positions()
    seq = ends.shape[1]
    assert packed.shape == lengths.shape == positions.shape == (ends.shape[0], seq)
    for b in range(ends.shape[0]):
        segments = _row_segments(batch, ends, b)
        num = len(segments)
        assert layout.num_segments[b].item() == num
        padding = [0.0] * (seq - num)
        assert packed[b].tolist() == ref.segment_rewards(batch.values[b].tolist(), segments) + padding
        assert lengths[b].tolist() == [float(len(s)) for s in segments] + padding
        assert positions[b].tolist() == pytest.approx([(t + 1) / num for t in range(num)] + padding)
    # broadcast / unpack are the repeat / none interpolations; unpack inverts pack.
    assert torch.equal(layout.broadcast(packed), token_rewards(batch.values, ends, batch.response_mask, "repeat"))
    assert torch.equal(layout.unpack(packed), torch.where(ends, batch.values, 0.0))


@given(batches(), st.sampled_from(MODES), st.sampled_from(["even", "repeat", "none"]))
def test_packed_token_rewards_equal_token_rewards(batch, mode, how):
    ends = _ends(batch, mode)
    layout = SegmentLayout.from_ends(ends, batch.response_mask)
    out = packed_token_rewards(layout.pack(batch.values), layout, how)
    assert torch.equal(out, token_rewards(batch.values, ends, batch.response_mask, how))


@given(batches(), st.sampled_from(MODES), st.sampled_from(["mean", "sum", "last", "min"]))
def test_packed_aggregation_equals_token_aggregation(batch, mode, how):
    ends = _ends(batch, mode)
    layout = SegmentLayout.from_ends(ends, batch.response_mask)
    packed = packed_segment_rewards(batch.values, layout)
    expected = aggregate_segment_rewards(batch.values, ends, how)
    torch.testing.assert_close(aggregate_packed_rewards(packed, layout.num_segments, how), expected, rtol=1e-12, atol=0)


@given(batches(), st.sampled_from(MODES), st.sampled_from(sorted(nz.NORMALIZERS)))
def test_normalize_packed_equals_normalizing_at_the_ends(batch, mode, kind):
    params = {
        "location": {"w_mu": 0.7668, "b_mu": 0.4705, "w_sigma": 0.2569, "b_sigma": 2.8339, "p_min": 0.05},
        "global": {"mean": 0.3, "std": 1.7},
        "last_segment": {"mean": -0.2, "std": 0.9},
        "bandit": {"mean": 1.0, "std": 2.0},
        "none": {},
    }[kind]
    normalizer = nz.NORMALIZERS[kind](**params, **META)
    ends = _ends(batch, mode)
    layout = SegmentLayout.from_ends(ends, batch.response_mask)
    packed = normalizer.normalize_packed(layout.pack(batch.values), layout.num_segments)
    expected = normalizer(batch.values, segment_positions(ends, batch.response_mask).double())
    # segment_positions gives p in float32 (relative error 6e-8); the location normalizer's packed path takes log p as
    # log(t + 1) - log T in the rewards' float64, without LOG_EPS (<= 1e-10 / p_min).
    torch.testing.assert_close(layout.unpack(packed), expected, rtol=1e-6, atol=1e-6)
    beyond_last_segment = torch.arange(packed.shape[1]) >= layout.num_segments
    assert bool((packed[beyond_last_segment] == 0).all())


def test_pack_never_reads_off_the_ends_and_its_gradient_is_clean():
    response = torch.tensor([[False, True, True, True, True]])
    ends = torch.tensor([[False, True, False, True, False]])
    values = torch.tensor([[float("nan"), 1.0, float("inf"), 3.0, -float("inf")]], requires_grad=True)
    layout = SegmentLayout.from_ends(ends, response)
    packed = layout.pack(values)
    assert packed.tolist() == [[1.0, 3.0, 0.0, 0.0, 0.0]]
    packed.sum().backward()
    assert values.grad.tolist() == [[0.0, 1.0, 0.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match=r"values at segment ends contains NaN or inf in rows \[0\]"):
        packed_segment_rewards(torch.tensor([[0.0, float("nan"), 0.0, 1.0, 0.0]]), layout)


def test_layout_of_every_token_an_end():
    # T = seq: no spare column is free, and no token lies after the last end.
    response = torch.ones(2, 3, dtype=torch.bool)
    layout = SegmentLayout.from_ends(response.clone(), response)
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert torch.equal(layout.pack(values), values)
    assert torch.equal(layout.broadcast(values), values)
    assert layout.lengths.tolist() == [[1.0, 1.0, 1.0]] * 2


# ------------------------------------------------------------------------------------------------------ masking
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_zero_outside_is_torch_where_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, generator=gen).to(dtype)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]).to(dtype)
    mask = torch.rand(3, 7, generator=gen) < 0.5
    mask[0, :2] = torch.tensor([True, False])
    expected = torch.where(mask, x, torch.zeros((), dtype=dtype))
    bits = {torch.float32: torch.int32, torch.float64: torch.int64}.get(dtype, torch.int16)
    assert torch.equal(zero_outside(x, mask).view(bits), expected.view(bits))
    assert torch.equal(zero_outside_(x.clone(), mask).view(bits), expected.view(bits))


def test_zero_outside_keeps_gradients_and_integer_tensors():
    x = torch.tensor([1.0, float("nan"), 3.0], requires_grad=True)
    mask = torch.tensor([True, False, True])
    zero_outside(x, mask).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 1.0]
    assert zero_outside(torch.tensor([5, 6, 7]), mask).tolist() == [5, 0, 7]


def test_mask_reductions():
    mask = torch.tensor([[True, False, True], [False, False, False]])
    assert count_true(mask).item() == 2 and count_true(mask, dim=1).tolist() == [2, 0]
    assert any_true(mask).item() and any_true(mask, dim=1).tolist() == [True, False]
    assert any_true(mask, dim=1, keepdim=True).shape == (2, 1)
    assert any_true(torch.zeros(2, 0, dtype=torch.bool), dim=1).tolist() == [False, False]


# ---------------------------------------------------------------------------------------------------------- GAE
@st.composite
def contiguous_rollouts(draw, max_batch=4, max_seq=40):
    batch, seq = draw(st.integers(1, max_batch)), draw(st.integers(1, max_seq))
    rows = []
    for _ in range(batch):
        start = draw(st.integers(0, seq))
        length = draw(st.integers(0, seq - start))
        rows.append([start <= j < start + length for j in range(seq)])
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.tensor(rows, dtype=torch.bool).view(batch, seq)
    # Garbage outside the mask must not leak in.
    rewards = torch.randn(batch, seq, generator=gen, dtype=torch.float64).masked_fill(~mask, float("nan"))
    values = torch.randn(batch, seq, generator=gen, dtype=torch.float64).masked_fill(~mask, float("inf"))
    return rewards, values, mask


@given(
    contiguous_rollouts(),
    st.sampled_from([0.0, 0.5, 0.99, 1.0]),
    st.sampled_from([0.0, 0.3, 0.95, 1.0]),
    st.sampled_from([1, 3, 32]),
)
def test_contiguous_gae_matches_textbook_loop_and_general_path(rollout, gamma, lam, block_size):
    rewards, values, mask = rollout
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam, block_size, contiguous=True)
    general = ppo.gae(rewards, values, mask, gamma, lam, block_size)
    torch.testing.assert_close((adv, ret), general, rtol=1e-9, atol=1e-9)
    for b in range(mask.shape[0]):
        clean_r = torch.where(mask[b], rewards[b], 0.0).tolist()
        clean_v = torch.where(mask[b], values[b], 0.0).tolist()
        exp_adv, exp_ret = ref.gae_row(clean_r, clean_v, mask[b].tolist(), gamma, lam)
        assert adv[b].tolist() == pytest.approx(exp_adv, rel=1e-9, abs=1e-9)
        assert ret[b].tolist() == pytest.approx(exp_ret, rel=1e-9, abs=1e-9)


def test_contiguous_gae_refuses_a_mask_with_holes():
    mask = torch.tensor([[True, False, True], [True, True, False]])
    with pytest.raises(ValueError, match=r"mask rows \[0\] hold more than one run of True"):
        ppo.gae(torch.zeros(2, 3), torch.zeros(2, 3), mask, 1.0, 0.95, contiguous=True)


# ----------------------------------------------------------------------------------------------------- pipeline
@given(batches(max_batch=4, max_seq=40), st.sampled_from(MODES))
def test_packed_and_unpadded_pipelines_equal_token_pipeline(batch, mode):
    """The benchmark's two paths (layout, packed rewards, contiguous GAE; and the unpadded one) and the per-function
    token path agree."""
    normalizer = nz.LocationNormalizer(w_mu=0.7668, b_mu=0.4705, w_sigma=0.2569, b_sigma=2.8339, p_min=0.01, **META)
    response = batch.response_mask
    gen = torch.Generator().manual_seed(0)
    logp, ref_logp, critic = (torch.randn(response.shape, generator=gen, dtype=torch.float64) for _ in range(3))
    ends = _ends(batch, mode)

    positions = segment_positions(ends, response).double()
    dense = token_rewards(normalizer(batch.values, positions), ends, response, "even").clamp(-10, 10)
    rewards = ppo.kl_penalized_rewards(dense, logp, ref_logp, response, 0.01)
    expected = ppo.masked_whiten(ppo.gae(rewards, critic, response, 1.0, 0.95)[0], response)

    layout = SegmentLayout.from_ends(ends, response)
    normalized = normalizer.normalize_packed(packed_segment_rewards(batch.values, layout), layout.num_segments)
    dense = packed_token_rewards(normalized, layout, "even").clamp_(-10, 10)
    rewards = ppo.kl_penalized_rewards(dense, logp, ref_logp, response, 0.01)
    got = ppo.masked_whiten(ppo.gae(rewards, critic, response, 1.0, 0.95, contiguous=True)[0], response)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)

    responses = unpadded.UnpaddedResponses.from_masks(response, batch.eos_mask)
    segments = unpadded.UnpaddedSegments.from_ends(responses.unpad(ends), responses)
    normalized = unpadded.normalize(normalizer, segments.at_ends(responses.unpad(batch.values)), segments)
    dense = segments.token_rewards(normalized, "even").clamp_(-10, 10)
    rewards = dense - 0.01 * ppo.kl_penalty(responses.unpad(logp), responses.unpad(ref_logp), "k1")
    advantages, _ = unpadded.gae(rewards, responses.unpad(critic), responses, 1.0, 0.95)
    got = responses.pad(unpadded.whiten(advantages, responses))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
