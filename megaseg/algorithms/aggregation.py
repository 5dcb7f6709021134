"""Sequence evaluation from segment rewards (paper Eq. 3-4) and the Bradley-Terry loss.

The reward head runs at every position, producing ``values`` ``[batch, seq]``; the reward of segment a_t is the head
output at its last token, i.e. ``values`` where ``ends`` is True. Entries elsewhere (prompt, padding, EOS outside a
segment) are never read: they are masked with ``zero_outside`` (``torch.where`` for tensors that need a gradient), not
multiplied by 0, so garbage or NaN there cannot leak into the result or its gradient.

``aggregate_segment_rewards`` runs the Triton kernel ``megaseg.kernels.segment_reduce`` instead when the ``kernels``
setting selects it for the tensor's device (``megaseg.kernels.dispatch``); the functions below are its reference.

A pipeline that already packed its segment rewards with a ``SegmentLayout`` aggregates them with
``aggregate_packed_rewards`` instead of going back to the ``[batch, seq]`` layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from megaseg.algorithms.masking import zero_outside
from megaseg.algorithms.segments import SegmentLayout, num_segments, pack_segment_ends, segment_positions
from megaseg.algorithms.validation import check_choice, check_ends, check_finite, check_shape
from megaseg.kernels.dispatch import use_triton


def _check(values: torch.Tensor, ends: torch.Tensor, validate: bool) -> None:
    check_ends(ends, None, validate)
    check_shape("values", values, ends.shape, "ends")
    check_finite("values at segment ends", values, where=ends, validate=validate)


def _checked(values: torch.Tensor, ends: torch.Tensor, validate: bool) -> torch.Tensor:
    """Validate and return ``values`` zeroed outside the segment ends."""
    _check(values, ends, validate)
    return zero_outside(values, ends)


def sum_segment_reward(values: torch.Tensor, ends: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """``[batch]``: sum of the segment rewards of each row."""
    return _checked(values, ends, validate).sum(dim=1)


def mean_segment_reward(values: torch.Tensor, ends: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """``[batch]``: e(x, y) = (1/T) sum_t r(s_t, a_t), the paper's Average aggregation (Eq. 4).

    Args:
        values: ``[batch, seq]`` reward-head output at every position.
        ends: ``[batch, seq]`` bool segment ends; every row needs at least one (checked when ``validate``).
    """
    total = _checked(values, ends, validate).sum(dim=1)
    # clamp only guards the unvalidated path against 0/0; validated rows always have T >= 1.
    return total / num_segments(ends).clamp(min=1).to(total.dtype)


def last_segment_reward(values: torch.Tensor, ends: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """``[batch]``: reward of the final segment (the bandit reward when ``ends`` is the bandit segmentation)."""
    masked = _checked(values, ends, validate)
    cols = torch.arange(ends.shape[1], device=ends.device)
    last_col = (cols * ends.view(torch.uint8)).amax(dim=1, keepdim=True)
    return masked.gather(1, last_col).squeeze(1)


def min_segment_reward(values: torch.Tensor, ends: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """``[batch]``: the worst segment reward of each row."""
    _checked(values, ends, validate)
    inf = torch.tensor(float("inf"), dtype=values.dtype, device=values.device)
    return torch.where(ends, values, inf).amin(dim=1)


AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "mean": mean_segment_reward,
    "sum": sum_segment_reward,
    "last": last_segment_reward,
    "min": min_segment_reward,
}


def aggregate_segment_rewards(
    values: torch.Tensor, ends: torch.Tensor, how: str = "mean", validate: bool = True
) -> torch.Tensor:
    """``[batch]`` sequence evaluation e(x, y) with the aggregation named ``how`` (a key of ``AGGREGATIONS``)."""
    check_choice("aggregation", how, AGGREGATIONS)
    if use_triton(values):
        from megaseg.kernels.segment_reduce import aggregate_padded

        _check(values, ends, validate)
        return aggregate_padded(values, ends, how)
    return AGGREGATIONS[how](values, ends, validate=validate)


def packed_segment_rewards(values: torch.Tensor, layout: SegmentLayout, validate: bool = True) -> torch.Tensor:
    """Segment rewards r(s_t, a_t) packed by ``layout``: ``values`` at the end of segment t in column t, 0 beyond T.

    Args:
        values: ``[batch, seq]`` reward-head output at every position; only the segment ends are read.
        layout: the ``SegmentLayout`` of the segmentation.
        validate: check that the rewards are finite (one host sync; the packed tensor holds nothing else).
    """
    check_shape("values", values, layout.ends.shape, "ends")
    packed = layout.pack(values)
    check_finite("values at segment ends", packed, validate=validate)
    return packed


def aggregate_packed_rewards(rewards: torch.Tensor, num_segments: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """``[batch]`` e(x, y) from packed segment rewards, with the aggregation named ``how`` (as ``AGGREGATIONS``).

    Args:
        rewards: ``[batch, width]`` segment t of each row in column t and 0 in the columns t >= T
            (``SegmentLayout.pack`` or ``padded_segment_rewards``).
        num_segments: ``[batch]`` or ``[batch, 1]`` T >= 1 of each row (``SegmentLayout.num_segments``).
    """
    check_choice("aggregation", how, AGGREGATIONS)
    total = num_segments.reshape(-1, 1)
    if how == "sum":
        return rewards.sum(dim=1)
    if how == "mean":
        return rewards.sum(dim=1) / total.squeeze(1).to(rewards.dtype)
    if how == "last":
        return rewards.gather(1, total - 1).squeeze(1)
    cols = torch.arange(rewards.shape[1], device=rewards.device)
    return rewards.masked_fill(cols >= total, float("inf")).amin(dim=1)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Scalar -mean(log sigmoid(chosen - rejected)) (paper Eq. 1 and 3).

    ``logsigmoid`` is evaluated directly (not log of sigmoid), so a large negative margin gives a large finite loss and
    a finite gradient instead of log(0).
    """
    check_shape("rejected_scores", rejected_scores, chosen_scores.shape, "chosen_scores")
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def preference_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Scalar fraction of pairs with chosen strictly above rejected (a tie counts as wrong)."""
    check_shape("rejected_scores", rejected_scores, chosen_scores.shape, "chosen_scores")
    return (chosen_scores > rejected_scores).float().mean()


def padded_segment_rewards(
    values: torch.Tensor, ends: torch.Tensor, max_segments: int | None = None, validate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment rewards left-aligned per row, for logging and normalizer fitting.

    Returns:
        ``rewards`` ``[batch, max_segments]`` (0 where padded) and ``mask`` ``[batch, max_segments]`` bool.
        ``max_segments`` defaults to the largest segment count in the batch.
    """
    _checked(values, ends, validate)
    return pack_segment_ends(values, ends, max_segments, validate=validate)


def padded_segment_positions(
    ends: torch.Tensor, max_segments: int | None = None, validate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Locations p = (t + 1) / T in the layout of ``padded_segment_rewards``: ``([batch, max_segments], mask)``."""
    check_ends(ends, None, validate)
    positions = segment_positions(ends, ends, validate=False)
    return pack_segment_ends(positions, ends, max_segments, validate=validate)
