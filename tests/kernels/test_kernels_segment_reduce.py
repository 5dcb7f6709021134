"""The ragged segment-reduction kernel against the torch aggregation it replaces and against a per-sequence loop:
values and gradients, on padded batches (through ``aggregate_segment_rewards``) and on the flat layout with
``cu_seqlens`` (empty sequences included). NaN off the segment ends must not reach the result or the gradient."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_strategies import DEVICE, response_batches

from megaseg.algorithms.aggregation import aggregate_segment_rewards
from megaseg.kernels import kernels_mode

HOWS = ["mean", "sum", "min", "last"]


def _loop_reference(values: torch.Tensor, ends: torch.Tensor, how: str) -> tuple[list[float], torch.Tensor]:
    """e(x, y) row by row from the list of end values, and its gradient (weights 1, 2, 3, ... per row) by hand."""
    scores, grad = [], torch.zeros(values.shape, dtype=torch.float64)
    for b in range(values.shape[0]):
        columns = ends[b].nonzero().flatten().tolist()
        row = [float(values[b, j]) for j in columns]
        weight = float(b + 1)
        if how == "sum":
            scores.append(sum(row))
            grad[b, columns] = weight
        elif how == "mean":
            scores.append(sum(row) / len(row))
            grad[b, columns] = weight / len(row)
        elif how == "last":
            scores.append(row[-1])
            grad[b, columns[-1]] = weight
        else:
            best = min(row)
            tied = [j for j, v in zip(columns, row) if v == best]
            scores.append(best)
            grad[b, tied] = weight / len(tied)
    return scores, grad


def _run(values: torch.Tensor, ends: torch.Tensor, how: str, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = values.detach().clone().requires_grad_(True)
    with kernels_mode(mode):
        scores = aggregate_segment_rewards(leaf, ends, how, validate=False)
    weights = torch.arange(1, scores.numel() + 1, dtype=scores.dtype, device=scores.device)
    (grad,) = torch.autograd.grad((scores * weights).sum(), leaf)
    return scores.detach(), grad


@given(batch=response_batches(), how=st.sampled_from(HOWS), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_padded_kernel_matches_torch_and_the_loop(batch, how, dtype):
    values = batch.values.to(dtype)
    scores, grad = _run(values, batch.ends, how, "triton")
    expected_scores, expected_grad = _loop_reference(values.cpu().double(), batch.ends.cpu(), how)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    # The torch path reads NaN off the ends through torch.where: compare on finite values (there are no others).
    torch_scores, torch_grad = _run(torch.nan_to_num(values, nan=0.0), batch.ends, how, "torch")
    assert scores.dtype == dtype and grad.dtype == dtype
    assert torch.isfinite(grad).all(), "NaN off the segment ends leaked into the gradient"
    torch.testing.assert_close(scores.cpu().double(), torch.tensor(expected_scores, dtype=torch.float64),
                               atol=tolerance * 100, rtol=tolerance)
    torch.testing.assert_close(scores, torch_scores, atol=tolerance * 100, rtol=tolerance)
    torch.testing.assert_close(grad.cpu().double(), expected_grad, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(grad, torch_grad, atol=tolerance, rtol=tolerance)


@given(lengths=st.lists(st.integers(0, 300), min_size=1, max_size=5), how=st.sampled_from(HOWS),
       seed=st.integers(0, 2**31 - 1), end_rate=st.sampled_from([0.0, 0.1, 1.0]))
def test_flat_layout_matches_its_reference_and_the_loop(lengths, how, seed, end_rate):
    from megaseg.kernels.segment_reduce import segment_reduce, segment_reduce_reference

    generator = torch.Generator().manual_seed(seed)
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
    total = int(cu_seqlens[-1])
    values = torch.randn(total, generator=generator, dtype=torch.float64)
    ends = torch.rand(total, generator=generator) < end_rate
    leaf = values.to(DEVICE).requires_grad_(True)
    with kernels_mode("triton"):
        scores = segment_reduce(leaf, ends.to(DEVICE), cu_seqlens.to(DEVICE), how)
    reference = segment_reduce_reference(values, ends, cu_seqlens, how)
    torch.testing.assert_close(scores.detach().cpu(), reference, atol=1e-12, rtol=1e-12)
    # Sequences without an end: 0 (mean, sum, last) or +inf (min), as the torch aggregation gives.
    scores_list = scores.detach().cpu().tolist()
    for b, (start, stop) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        row = values[start:stop][ends[start:stop]].tolist()
        if not row:
            assert scores_list[b] == (math.inf if how == "min" else 0.0)
            continue
        expected = {"sum": sum(row), "mean": sum(row) / len(row), "min": min(row), "last": row[-1]}[how]
        assert scores_list[b] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    if total == 0:
        return
    finite = torch.isfinite(scores.detach())
    (grad,) = torch.autograd.grad(scores[finite].sum(), leaf)
    reference_leaf = values.clone().requires_grad_(True)
    reference_scores = segment_reduce_reference(reference_leaf, ends, cu_seqlens, how)
    (reference_grad,) = torch.autograd.grad(reference_scores[finite.cpu()].sum(), reference_leaf)
    torch.testing.assert_close(grad.cpu(), reference_grad, atol=1e-12, rtol=1e-12)


def test_validation_still_runs_on_the_kernel_path():
    values = torch.zeros(2, 4, device=DEVICE)
    ends = torch.zeros(2, 4, dtype=torch.bool, device=DEVICE)
    ends[0, 1] = True
    with kernels_mode("triton"), pytest.raises(ValueError):
        aggregate_segment_rewards(values, ends)  # row 1 has no segment end
    ends[1, 3] = True
    values[1, 3] = float("inf")
    with kernels_mode("triton"), pytest.raises(ValueError):
        aggregate_segment_rewards(values, ends)


def test_bad_layouts_are_refused():
    from megaseg.kernels.segment_reduce import segment_reduce

    values = torch.zeros(6, device=DEVICE)
    ends = torch.zeros(6, dtype=torch.bool, device=DEVICE)
    cu_seqlens = torch.tensor([0, 6], device=DEVICE)
    with pytest.raises(ValueError, match="aggregation='median'"):
        segment_reduce(values, ends, cu_seqlens, "median")
    with pytest.raises(ValueError, match="ends bool"):
        segment_reduce(values, ends.float(), cu_seqlens)
    with pytest.raises(ValueError, match="cu_seqlens"):
        segment_reduce(values, ends, cu_seqlens.float())
