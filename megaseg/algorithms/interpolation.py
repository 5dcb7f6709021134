"""Spread segment rewards over the tokens of each segment (paper Sec. 2.3, ablation Table 6).

- ``even``: every token of segment a_t gets r_t / |a_t| (the method). The tokens of a segment sum back to r_t, so the
  return of the whole response is unchanged (sum_t r_t = sum_t sum_{y_i in a_t} r_t / |a_t|).
- ``repeat``: every token of a_t gets r_t.
- ``none``: the segment's last token gets r_t, the others 0.

Tokens in no segment (prompt, padding, and EOS in entropy/token/sentence/n-gram mode) get 0; in PPO the EOS token then
carries only the KL term.

``token_rewards`` takes segment values at the end tokens of a ``[batch, seq]`` tensor; ``packed_token_rewards`` takes
them packed by a ``SegmentLayout`` (segment t in column t), as a pipeline that normalized them there has them.
"""

from __future__ import annotations

import torch

from megaseg.algorithms.masking import zero_outside
from megaseg.algorithms.segments import SegmentLayout, divide_by_lengths
from megaseg.algorithms.validation import check_choice, check_ends, check_finite, check_shape

INTERPOLATION_MODES = ("even", "repeat", "none")


def token_rewards(
    segment_values: torch.Tensor,
    ends: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str = "even",
    validate: bool = True,
) -> torch.Tensor:
    """Per-token rewards from segment rewards.

    Args:
        segment_values: ``[batch, seq]`` float; the (normalized) reward of each segment at its end position. Other
            entries are ignored.
        ends: ``[batch, seq]`` bool segment ends (inside ``response_mask``).
        response_mask: ``[batch, seq]`` bool.
        mode: one of ``INTERPOLATION_MODES``.

    Returns:
        ``[batch, seq]`` per-token rewards in the dtype of ``segment_values``.
    """
    check_choice("interpolation mode", mode, INTERPOLATION_MODES)
    check_shape("segment_values", segment_values, ends.shape, "ends")
    check_ends(ends, response_mask, validate)
    check_finite("segment_values at segment ends", segment_values, where=ends, validate=validate)
    if mode == "none":
        return zero_outside(segment_values, ends)
    layout = SegmentLayout.from_ends(ends, response_mask, validate=False)
    return packed_token_rewards(layout.pack(segment_values), layout, mode)


def packed_token_rewards(packed_values: torch.Tensor, layout: SegmentLayout, mode: str = "even") -> torch.Tensor:
    """``[batch, seq]`` per-token rewards from packed segment rewards (``token_rewards`` after ``layout.pack``).

    Args:
        packed_values: ``[batch, seq]`` the reward of segment t of each row in column t, 0 beyond T.
        layout: the ``SegmentLayout`` of the segmentation.
        mode: one of ``INTERPOLATION_MODES``.
    """
    check_choice("interpolation mode", mode, INTERPOLATION_MODES)
    if mode == "none":
        return layout.unpack(packed_values)
    if mode == "even":
        packed_values = divide_by_lengths(packed_values, layout)
    return layout.broadcast(packed_values)
