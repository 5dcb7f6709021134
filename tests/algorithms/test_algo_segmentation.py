import algo_reference as ref
import pytest
import torch
from algo_strategies import CUTOFFS, batches
from hypothesis import given
from hypothesis import strategies as st

from megaseg.algorithms import segmentation as seg


def _reference_ends(batch, mode, **kwargs):
    rows = []
    for b in range(batch.response_mask.shape[0]):
        response, eos = batch.row(b)
        segments = ref.segments_of(
            mode,
            response,
            eos,
            entropy=batch.entropy[b].tolist(),
            texts=batch.texts[b],
            **kwargs,
        )
        rows.append(ref.ends_of(segments, len(response)))
    return torch.tensor(rows, dtype=torch.bool)


@given(batches(), st.sampled_from(CUTOFFS))
def test_entropy_mode_matches_reference(batch, cutoff):
    ends = seg.entropy_segment_ends(batch.entropy, batch.response_mask, batch.eos_mask, cutoff)
    assert torch.equal(ends, _reference_ends(batch, "entropy", cutoff=cutoff))


@given(batches())
def test_bandit_token_sentence_modes_match_reference(batch):
    masks = (batch.response_mask, batch.eos_mask)
    assert torch.equal(seg.bandit_segment_ends(*masks), _reference_ends(batch, "bandit"))
    assert torch.equal(seg.token_segment_ends(*masks), _reference_ends(batch, "token"))
    assert torch.equal(seg.sentence_segment_ends(batch.texts, *masks), _reference_ends(batch, "sentence"))


@given(batches(), st.integers(1, 7))
def test_ngram_mode_matches_reference(batch, n):
    ends = seg.ngram_segment_ends(batch.response_mask, batch.eos_mask, n)
    assert torch.equal(ends, _reference_ends(batch, "ngram", n=n))


@given(batches(), st.sampled_from(["entropy", "bandit", "token", "sentence", "ngram"]))
def test_ids_positions_lengths_match_reference(batch, mode):
    ends = seg.segment_ends(
        mode, batch.response_mask, batch.eos_mask, entropy=batch.entropy, cutoff=1.75, n=3, token_texts=batch.texts
    )
    ids = seg.segment_ids(ends, batch.response_mask)
    positions = seg.segment_positions(ends, batch.response_mask)
    lengths = seg.segment_lengths(ends, batch.response_mask)
    for b in range(ends.shape[0]):
        response, _ = batch.row(b)
        segments = ref.segments_from_ends(ends[b].tolist(), response)
        assert ids[b].tolist() == ref.ids_of(segments, len(response))
        assert positions[b].tolist() == pytest.approx(ref.positions_of(segments, len(response)))
        assert lengths[b].tolist() == ref.lengths_of(segments, len(response))
    assert positions.dtype == torch.float32
    # Invariants: every row has a segment, the last one at p = 1; only response tokens end segments.
    assert bool((ends.sum(1) >= 1).all())
    assert torch.allclose(positions.max(dim=1).values, torch.ones(ends.shape[0]))
    assert not bool((ends & ~batch.response_mask).any())


def _masks(response_rows, eos_rows):
    return torch.tensor(response_rows, dtype=torch.bool), torch.tensor(eos_rows, dtype=torch.bool)


def test_eos_boundary_moves_to_the_token_before_eos():
    # prompt(2) + response(4) + pad; EOS at 5. Entropy predicting after EOS-1 is low, EOS itself high.
    response, eos = _masks([[0, 0, 1, 1, 1, 1, 0]], [[0, 0, 0, 0, 0, 1, 0]])
    entropy = torch.tensor([[9.0, 9.0, 0.0, 3.0, 0.0, 9.0, 9.0]])
    ends = seg.entropy_segment_ends(entropy, response, eos, cutoff=2.0)
    assert ends.int().tolist() == [[0, 0, 0, 1, 1, 0, 0]]


def test_no_extra_end_when_token_before_eos_already_ends():
    response, eos = _masks([[1, 1, 1, 1]], [[0, 0, 0, 1]])
    entropy = torch.tensor([[0.0, 0.0, 5.0, 5.0]])
    ends = seg.entropy_segment_ends(entropy, response, eos, cutoff=2.0)
    assert ends.int().tolist() == [[0, 0, 1, 0]]
    assert seg.segment_lengths(ends, response).tolist() == [[0, 0, 3, 0]]
    assert seg.segment_ids(ends, response).tolist() == [[0, 0, 0, -1]]


def test_truncated_response_ends_on_its_last_token():
    response, eos = _masks([[0, 1, 1, 1]], [[0, 0, 0, 0]])
    entropy = torch.zeros(1, 4)
    for ends in (
        seg.entropy_segment_ends(entropy, response, eos, cutoff=1.0),
        seg.ngram_segment_ends(response, eos, n=5),
        seg.sentence_segment_ends([["", "a", "b", "c"]], response, eos),
        seg.bandit_segment_ends(response, eos),
    ):
        assert ends.int().tolist() == [[0, 0, 0, 1]]


@pytest.mark.parametrize("mode", ["entropy", "token", "sentence", "ngram", "bandit"])
def test_eos_only_response_is_one_segment_on_eos(mode):
    response, eos = _masks([[0, 1, 0]], [[0, 1, 0]])
    ends = seg.segment_ends(
        mode, response, eos, entropy=torch.zeros(1, 3), cutoff=1.0, n=2, token_texts=[["", "", ""]]
    )
    assert ends.int().tolist() == [[0, 1, 0]]
    assert seg.segment_positions(ends, response).tolist() == [[0.0, 1.0, 0.0]]


def test_single_token_response_without_eos():
    response, eos = _masks([[1, 0]], [[0, 0]])
    assert seg.token_segment_ends(response, eos).int().tolist() == [[1, 0]]


def test_cutoff_is_strict_and_token_mode_differs_from_cutoff_zero():
    response, eos = _masks([[1, 1, 1, 1]], [[0, 0, 0, 0]])
    entropy = torch.tensor([[2.0, 0.0, 2.5, 1.0]])
    assert seg.entropy_segment_ends(entropy, response, eos, cutoff=2.0).int().tolist() == [[0, 0, 1, 1]]
    assert seg.entropy_segment_ends(entropy, response, eos, cutoff=0.0).int().tolist() == [[1, 0, 1, 1]]
    assert seg.token_segment_ends(response, eos).int().tolist() == [[1, 1, 1, 1]]


def test_sentence_marks():
    texts = ["Hi", ".", " there. ", "\n", "\n\n", "a,", "x:", "wait...", "好。", "嗯，", "?!", "ok\t", " ", ""]
    expected = [False, True, True, True, True, True, True, True, True, True, True, False, False, False]
    mask = seg.sentence_end_mask([texts], (1, len(texts)))
    assert mask[0].tolist() == expected


def test_sentence_accepts_precomputed_mask():
    response, eos = _masks([[1, 1, 1, 1]], [[0, 0, 0, 1]])
    marks = torch.tensor([[True, False, False, True]])
    assert seg.sentence_segment_ends(marks, response, eos).int().tolist() == [[1, 0, 1, 0]]


def test_entropy_outside_content_may_be_nan():
    response, eos = _masks([[0, 1, 1]], [[0, 0, 1]])
    entropy = torch.tensor([[float("nan"), 3.0, float("inf")]])
    assert seg.entropy_segment_ends(entropy, response, eos, cutoff=1.0).int().tolist() == [[0, 1, 0]]


# ---------------------------------------------------------------------------------------------------- errors
def _good():
    return _masks([[0, 1, 1, 0], [1, 1, 1, 1]], [[0, 0, 1, 0], [0, 0, 0, 0]])


def test_error_empty_response_row():
    response, eos = _masks([[1, 0], [0, 0]], [[0, 0], [0, 0]])
    with pytest.raises(ValueError, match=r"rows \[1\] have no response tokens"):
        seg.token_segment_ends(response, eos)


def test_error_two_eos():
    response, eos = _masks([[1, 1, 1]], [[0, 1, 1]])
    with pytest.raises(ValueError, match="more than one EOS"):
        seg.bandit_segment_ends(response, eos)


def test_error_eos_not_last_response_token():
    response, eos = _masks([[1, 1, 1]], [[0, 1, 0]])
    with pytest.raises(ValueError, match="not the last response token"):
        seg.bandit_segment_ends(response, eos)
    response, eos = _masks([[1, 1, 0]], [[0, 0, 1]])
    with pytest.raises(ValueError, match="not the last response token"):
        seg.bandit_segment_ends(response, eos)


def test_error_non_contiguous_response():
    response, eos = _masks([[1, 0, 1]], [[0, 0, 0]])
    with pytest.raises(ValueError, match="contiguous"):
        seg.token_segment_ends(response, eos)


def test_error_shapes_and_dtypes():
    response, eos = _good()
    with pytest.raises(ValueError, match=r"entropy has shape \(2, 3\)"):
        seg.entropy_segment_ends(torch.zeros(2, 3), response, eos, cutoff=1.0)
    with pytest.raises(ValueError, match=r"eos_mask has shape"):
        seg.token_segment_ends(response, eos[:, :3])
    with pytest.raises(ValueError, match="must be a bool tensor"):
        seg.token_segment_ends(response.long(), eos)
    with pytest.raises(ValueError, match="2-D"):
        seg.token_segment_ends(response[0], eos[0])


def test_error_bad_cutoff_n_mode_and_nan_entropy():
    response, eos = _good()
    with pytest.raises(ValueError, match=r"cutoff must be a finite number >= 0, got -0.5"):
        seg.entropy_segment_ends(torch.zeros(2, 4), response, eos, cutoff=-0.5)
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got 0"):
        seg.ngram_segment_ends(response, eos, n=0)
    with pytest.raises(ValueError, match=r"'words' is not supported; choose one of \['entropy'"):
        seg.segment_ends("words", response, eos)
    with pytest.raises(ValueError, match=r"needs \['entropy', 'cutoff'\]"):
        seg.segment_ends("entropy", response, eos)
    nan_entropy = torch.zeros(2, 4)
    nan_entropy[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"entropy contains NaN or inf in rows \[1\]"):
        seg.entropy_segment_ends(nan_entropy, response, eos, cutoff=1.0)


def test_error_token_texts_misaligned():
    response, eos = _good()
    with pytest.raises(ValueError, match="token_texts has 1 rows"):
        seg.sentence_segment_ends([["a"] * 4], response, eos)
    with pytest.raises(ValueError, match=r"\(row, length\) mismatches: \[\(1, 3\)\]"):
        seg.sentence_segment_ends([["a"] * 4, ["a"] * 3], response, eos)


def test_error_ends_outside_response_or_missing():
    response, _ = _good()
    with pytest.raises(ValueError, match="outside the response"):
        seg.segment_positions(torch.ones(2, 4, dtype=torch.bool), response)
    with pytest.raises(ValueError, match=r"rows \[0\] have no segment end"):
        seg.segment_ids(torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool), response)


def test_finite_check_fast_path_and_fallback():
    from megaseg.algorithms.validation import check_finite

    # NaN at an unselected position makes the whole-tensor sum non-finite; the masked sum must still pass.
    check_finite("x", torch.tensor([[1.0, float("nan")]]), where=torch.tensor([[True, False]]))
    # Finite entries whose sum overflows also pass.
    check_finite("x", torch.tensor([[3e38, 3e38]]))
    with pytest.raises(ValueError, match=r"x contains NaN or inf in rows \[0\]"):
        check_finite("x", torch.tensor([[3e38, -float("inf")]]))


def test_numpy_scalars_are_accepted_as_cutoff_and_n():
    import numpy as np

    response, eos = _good()
    seg.entropy_segment_ends(torch.zeros(2, 4), response, eos, cutoff=np.float32(1.75))
    seg.ngram_segment_ends(response, eos, n=np.int64(2))
    with pytest.raises(ValueError, match="cutoff must be a finite number >= 0, got inf"):
        seg.entropy_segment_ends(torch.zeros(2, 4), response, eos, cutoff=float("inf"))
