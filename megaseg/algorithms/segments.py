"""Index arithmetic on a segment-end mask: segment ids, locations p, lengths, packing, and ``SegmentLayout``.

A segmentation is represented by ``ends``, a ``[batch, seq]`` bool mask that is True on the last token of each segment
(see ``segmentation.py``). Segment ``t`` of a row is the run of response tokens after end ``t - 1`` (or the response
start) up to and including end ``t``. Response tokens after the last end (the EOS token in entropy/token/sentence/n-gram
mode) belong to no segment.

Per-segment tensors are *packed*: ``[batch, seq]`` with segment t of a row in column t and 0 in the columns t >= T.
That is the layout of ``pack_segment_ends`` at full width (a row has at most ``seq`` segments), so it needs no host sync
to find the largest T.

``SegmentLayout`` holds the index products of one segmentation: computed once from ``ends`` (one int32 cumsum and a
few int32 ops), it gives each token the packed column of its segment, so "the values at the segment ends, by segment"
is one scatter (``pack``) and "my segment's value" one gather (``broadcast``). The aggregation, locations, lengths,
normalization and interpolation of a batch share one layout instead of each recomputing it.

Everything runs unchanged on GPU and never syncs with the host, except ``pack_segment_ends`` which must read the
largest segment count to size its output. Integer arithmetic is int32 (exact for any sequence length, and several times
faster than int64 on CPU), and so are the gather/scatter indices where torch accepts them (``INDEX_DTYPE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from megaseg.algorithms.masking import count_true, zero_outside, zero_outside_
from megaseg.algorithms.validation import check_ends

# gather/scatter take int32 indices from torch 2.8 on (CPU and CUDA). A [batch, seq] index in int32 is half the memory
# of int64 and needs no conversion from the int32 arithmetic; on CPU that saves more (allocation, page faults) than
# the slightly slower int32 gather costs. Older torch (e.g. NGC 25.04's 2.7) needs int64.
INDEX_DTYPE = torch.int32 if torch.__version__ >= (2, 8) else torch.int64


def num_segments(ends: torch.Tensor) -> torch.Tensor:
    """``[batch]`` long: number of segments T of each row."""
    return count_true(ends, dim=1)


def _ends_before(ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(number of ends strictly before each token ``[batch, seq]`` int32, T ``[batch, 1]`` int32).

    The strict count is the segment index t of a token (and of the end itself): the cumsum of the ends shifted one
    column right.
    """
    ends_int = ends.view(torch.uint8)
    shifted = torch.cat([ends_int.new_zeros(ends.shape[0], 1), ends_int[:, :-1]], dim=1)
    before = shifted.cumsum(dim=1, dtype=torch.int32)
    return before, before[:, -1:] + ends_int[:, -1:]


def _in_segment(before: torch.Tensor, total: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` int32 0/1: response tokens with an end at or after them (fewer than T ends before them).

    min(T - before, 1) is that test as a number (T - before >= 0), cheaper than a comparison on CPU.
    """
    return (total - before).clamp_(max=1).mul_(response_mask.view(torch.uint8))


def _index_or(index: torch.Tensor, keep: torch.Tensor, fill: int) -> torch.Tensor:
    """``torch.where(keep, index, fill)`` for an int32 ``index`` and a 0/1 ``keep`` (bool or integer), by arithmetic:
    several times faster than ``torch.where`` on CPU, one kernel either way on GPU."""
    keep = keep.view(torch.uint8) if keep.dtype == torch.bool else keep
    return (index - fill).mul_(keep).add_(fill)


@dataclass(frozen=True, eq=False)
class SegmentLayout:
    """Where each token's segment sits in the packed layout, computed once per segmentation (see module docstring).

    Build with ``SegmentLayout.from_ends``. ``segment_index`` doubles as the gather index of ``broadcast``: tokens after
    the last end read column T, which is 0 in a packed tensor (and T < seq whenever such tokens exist), and prompt
    tokens, which read column 0, are zeroed afterwards with the response mask.
    """

    ends: torch.Tensor  # [batch, seq] bool: True on the last token of each segment
    response_mask: torch.Tensor  # [batch, seq] bool: one contiguous run of response tokens per row
    num_segments: torch.Tensor  # [batch, 1] int64: T of each row (>= 1 for validated ends)
    segment_index: torch.Tensor  # [batch, seq] INDEX_DTYPE: ends before each token (t on the tokens of segment t)
    end_column: torch.Tensor  # [batch, seq] INDEX_DTYPE: t on the end of segment t, seq (a spare column) elsewhere

    @classmethod
    def from_ends(cls, ends: torch.Tensor, response_mask: torch.Tensor, validate: bool = True) -> SegmentLayout:
        """The layout of ``ends`` ``[batch, seq]`` bool within the (contiguous) ``response_mask`` ``[batch, seq]``."""
        check_ends(ends, response_mask, validate)
        seq = ends.shape[1]
        before, total = _ends_before(ends)
        return cls(
            ends=ends,
            response_mask=response_mask,
            num_segments=total.long(),
            segment_index=before.to(INDEX_DTYPE),
            end_column=_index_or(before, ends, seq).to(INDEX_DTYPE),
        )

    def pack(self, values: torch.Tensor) -> torch.Tensor:
        """Packed ``[batch, seq]``: ``values`` ``[batch, seq]`` at the end of segment t in column t, 0 beyond T.

        Only the end entries are read (the others are scattered into the spare column and dropped), so garbage or NaN
        elsewhere cannot leak, into the result or into a gradient.
        """
        batch, seq = self.ends.shape
        table = values.new_zeros(batch, seq + 1)
        return table.scatter_(1, self.end_column, values)[:, :seq]

    def broadcast(self, packed: torch.Tensor) -> torch.Tensor:
        """``[batch, seq]``: every token of segment t gets ``packed[:, t]``; tokens in no segment get 0.

        ``packed`` must be 0 in the columns t >= T (as every packed tensor here is).
        """
        return _zero_outside_gathered(packed.gather(1, self.segment_index), self.response_mask)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``[batch, seq]``: ``packed[:, t]`` on the end token of segment t, 0 elsewhere (the inverse of ``pack``)."""
        return _zero_outside_gathered(packed.gather(1, self.segment_index), self.ends)

    @cached_property
    def lengths(self) -> torch.Tensor:
        """Packed float32: |a_t|, the number of tokens of segment t, in column t (exact up to 2^24), 0 beyond T.

        The running count of response tokens at consecutive segment ends differs by the segment's length; before the
        first segment it is 0 because the response is contiguous.
        """
        at_ends = self.pack(self.response_mask.view(torch.uint8).cumsum(dim=1, dtype=torch.int32))
        lengths = at_ends.float()
        lengths[:, 1:] -= at_ends[:, :-1]
        # Column T holds 0 minus the count at the last end, the columns after it 0 - 0.
        return lengths.clamp_(min=0)

    def positions(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Packed locations p = (t + 1) / T in column t, 0 beyond T."""
        return packed_positions(self.num_segments, self.ends.shape[1], dtype)


def _zero_outside_gathered(gathered: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero a freshly gathered tensor outside ``mask``, in place unless it needs a gradient."""
    if gathered.requires_grad or not gathered.is_floating_point():
        return zero_outside(gathered, mask)
    return zero_outside_(gathered, mask)


def packed_positions(num_segments: torch.Tensor, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[batch, width]``: location p = (t + 1) / T in column t < T, 0 beyond; ``num_segments`` ``[batch]`` or
    ``[batch, 1]``."""
    rank = torch.arange(1, width + 1, device=num_segments.device, dtype=dtype)
    total = num_segments.reshape(-1, 1).to(dtype)
    return (rank / total).mul_(packed_segment_mask(num_segments, width, dtype))


def packed_segment_mask(num_segments: torch.Tensor, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[batch, width]`` 1.0 in the columns t < T of real segments, 0.0 beyond, in ``dtype``.

    min(max(T - t, 0), 1) on whole numbers: cheaper than a comparison (and a bool -> float conversion) on CPU.
    """
    cols = torch.arange(width, device=num_segments.device, dtype=dtype)
    return (num_segments.reshape(-1, 1).to(dtype) - cols).clamp_(0, 1)


def segment_index_at_ends(ends: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` long: 0-based index t of the segment ending at each end, -1 elsewhere."""
    return _index_or(_ends_before(ends)[0], ends, -1).long()


def segment_ids(ends: torch.Tensor, response_mask: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """``[batch, seq]`` long: the segment index of each response token, -1 for tokens in no segment.

    A token's index is the number of segment ends strictly before it; tokens past the last end (EOS outside the final
    segment), prompt and padding get -1.
    """
    check_ends(ends, response_mask, validate)
    before, total = _ends_before(ends)
    return _index_or(before, _in_segment(before, total, response_mask), -1).long()


def segment_positions(ends: torch.Tensor, response_mask: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """``[batch, seq]`` float32: location p = (t + 1) / T at each segment end, 0 elsewhere.

    t is the 0-based segment index and T the row's segment count, so p is in (0, 1] and the last segment has p = 1.
    """
    check_ends(ends, response_mask, validate)
    ends_int = ends.view(torch.uint8)
    counts = ends_int.cumsum(dim=1, dtype=torch.int32)
    # counts / T is (t + 1) / T at the ends; multiplying by the 0/1 mask zeroes the rest (counts are finite).
    total = counts[:, -1:].clamp(min=1).float()
    return counts.float().mul_(ends_int).div_(total)


def segment_lengths(ends: torch.Tensor, response_mask: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """``[batch, seq]`` long: number of tokens |a_t| of each segment at its end, 0 elsewhere."""
    layout = SegmentLayout.from_ends(ends, response_mask, validate)
    return layout.unpack(layout.lengths).long()


def broadcast_from_segment_end(
    values: torch.Tensor,
    ends: torch.Tensor,
    response_mask: torch.Tensor,
    validate: bool = True,
    divide_by_length: bool = False,
) -> torch.Tensor:
    """``[batch, seq]``: each token of a segment gets ``values`` at that segment's end; tokens in no segment get 0.

    With ``divide_by_length`` each token gets value / |a_t| instead (the even split), divided per segment before the
    broadcast. One scatter into the packed layout and one gather back by each token's column.
    """
    layout = SegmentLayout.from_ends(ends, response_mask, validate)
    packed = layout.pack(values)
    if divide_by_length:
        packed = divide_by_lengths(packed, layout)
    return layout.broadcast(packed)


def divide_by_lengths(packed: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
    """Packed ``packed / |a_t|`` (the even split of a segment value over its tokens), in the dtype of ``packed``.

    Columns beyond T have length 0 and value 0; the clamp keeps them 0 rather than 0/0.
    """
    return packed.div(layout.lengths.clamp(min=1)).to(packed.dtype)


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
    column = _index_or(_ends_before(ends)[0], ends, width).to(INDEX_DTYPE)
    packed = values.new_zeros(batch, width + 1)
    packed.scatter_(1, column, values)
    mask = torch.arange(width, device=ends.device)[None, :] < counts[:, None]
    return packed[:, :width], mask
