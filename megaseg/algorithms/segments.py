"""Index arithmetic on a segment-end mask: segment ids, locations p, lengths, packing.

A segmentation is represented by ``ends``, a ``[batch, seq]`` bool mask that is True on the last token of each segment
(see ``segmentation.py``). Segment ``t`` of a row is the run of response tokens after end ``t - 1`` (or the response
start) up to and including end ``t``. Response tokens after the last end (the EOS token in entropy/token/sentence/n-gram
mode) belong to no segment.

Everything here is cumsum/cummax/gather over the sequence dimension, so it runs unchanged on GPU and never syncs with
the host, except ``pack_segment_ends`` which must read the largest segment count to size its output.
"""

from __future__ import annotations

import torch

from megaseg.algorithms.validation import check_ends


def num_segments(ends: torch.Tensor) -> torch.Tensor:
    """``[batch]`` long: number of segments T of each row."""
    return ends.sum(dim=1)


def segment_index_at_ends(ends: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` long: 0-based index t of the segment ending at each end, -1 elsewhere."""
    return torch.where(ends, ends.long().cumsum(dim=1) - 1, -1)


def segment_ids(ends: torch.Tensor, response_mask: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """``[batch, seq]`` long: the segment index of each response token, -1 for tokens in no segment.

    A token's index is the number of segment ends strictly before it; tokens past the last end (EOS outside the final
    segment), prompt and padding get -1.
    """
    check_ends(ends, response_mask, validate)
    ends_long = ends.long()
    ids = ends_long.cumsum(dim=1) - ends_long
    in_segment = response_mask & (ids < num_segments(ends)[:, None])
    return torch.where(in_segment, ids, -1)


def segment_positions(ends: torch.Tensor, response_mask: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """``[batch, seq]`` float32: location p = (t + 1) / T at each segment end, 0 elsewhere.

    t is the 0-based segment index and T the row's segment count, so p is in (0, 1] and the last segment has p = 1.
    """
    check_ends(ends, response_mask, validate)
    counts = ends.float().cumsum(dim=1)
    total = counts[:, -1:].clamp(min=1.0)
    return torch.where(ends, counts / total, 0.0)


def last_end_at_or_before(ends: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` long: column of the latest end at or before each column, -1 if none."""
    cols = torch.arange(ends.shape[1], device=ends.device)
    return torch.where(ends, cols, -1).cummax(dim=1).values


def next_end_at_or_after(ends: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` long: column of the earliest end at or after each column, ``seq`` if none.

    A token's segment is the one ending at this column, so this is how a value stored at a segment end reaches the
    tokens of its segment (a reverse cummin done as a flip + cummax of negated columns).
    """
    seq = ends.shape[1]
    cols = torch.arange(seq, device=ends.device)
    neg = torch.where(ends, -cols, -seq)
    return -neg.flip(1).cummax(dim=1).values.flip(1)


def segment_lengths(ends: torch.Tensor, response_mask: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """``[batch, seq]`` long: number of tokens |a_t| of each segment at its end, 0 elsewhere.

    The running count of response tokens is non-decreasing, so its value at the previous end is a cummax away; the
    length is the difference of the counts at consecutive ends (the count before the first segment is 0 because the
    response is contiguous).
    """
    check_ends(ends, response_mask, validate)
    counts = response_mask.long().cumsum(dim=1)
    at_ends = torch.where(ends, counts, 0).cummax(dim=1).values
    before = torch.zeros_like(at_ends)
    before[:, 1:] = at_ends[:, :-1]
    return torch.where(ends, counts - before, 0)


def broadcast_from_segment_end(
    values: torch.Tensor, ends: torch.Tensor, response_mask: torch.Tensor, validate: bool = True
) -> torch.Tensor:
    """``[batch, seq]``: each token of a segment gets ``values`` at that segment's end; tokens in no segment get 0."""
    check_ends(ends, response_mask, validate)
    seq = ends.shape[1]
    owner = next_end_at_or_after(ends)
    in_segment = response_mask & (owner < seq)
    gathered = values.gather(1, owner.clamp(max=seq - 1))
    return torch.where(in_segment, gathered, torch.zeros((), dtype=values.dtype, device=values.device))


def pack_segment_ends(
    values: torch.Tensor, ends: torch.Tensor, max_segments: int | None = None, validate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ``values`` at the segment ends into a left-aligned ``[batch, max_segments]`` layout.

    Args:
        values: ``[batch, seq]`` any dtype.
        ends: ``[batch, seq]`` bool segment ends.
        max_segments: output width; ``None`` uses the largest segment count in the batch (one host sync).

    Returns:
        ``(packed, mask)``: ``packed[b, t]`` is ``values`` at the end of segment t of row b (0 where ``mask`` is False),
        ``mask`` ``[batch, max_segments]`` bool marks the real segments.
    """
    check_ends(ends, None, validate)
    if values.shape != ends.shape:
        raise ValueError(f"values has shape {tuple(values.shape)} but ends has shape {tuple(ends.shape)}")
    counts = num_segments(ends)
    width = int(counts.max()) if max_segments is None else max_segments
    if validate and max_segments is not None and bool((counts > max_segments).any()):
        raise ValueError(f"max_segments={max_segments} is smaller than the largest segment count {int(counts.max())}")
    batch = ends.shape[0]
    # Scatter each end into column t; non-ends go to a spare column `width` that is dropped afterwards.
    column = torch.where(ends, segment_index_at_ends(ends), width)
    packed = values.new_zeros(batch, width + 1)
    packed.scatter_(1, column, torch.where(ends, values, torch.zeros((), dtype=values.dtype, device=values.device)))
    mask = torch.arange(width, device=ends.device)[None, :] < counts[:, None]
    return packed[:, :width], mask
