"""The reward pipeline on unpadded response tokens: each per-token step touches the response tokens of a batch (and a
few pad slots), not its whole ``[batch, seq]`` grid.

A rollout batch is right-padded ``[batch, seq]`` with the prompt in front of each response, so much of it is prompt
or padding (40% response tokens in benchmarks/algorithms.py's batch). ``UnpaddedResponses`` lists the response tokens
of every row end to end in *slots*: response b fills slots ``starts[b] : starts[b] + lengths[b]`` and is followed by
1 to ``SLOT_ALIGN`` pad slots, so that the next response starts at a multiple of ``SLOT_ALIGN`` (megatron's packed
"THD" layout with padded sequence starts, TransformerEngine's ``cu_seqlens_padded``). Pad slots hold 0 (False): the
functions here take ``[slots]`` tensors with 0 there (``unpad`` makes them so) and return them so.
``UnpaddedSegments`` lists the K segments of those responses, response by response.
Per-token steps cost a pass over the slots (about 1.02 N for N response tokens at seq 2048), per-segment steps a pass
over K (about N / 6 at c_ent 1.75), and the pipeline costs a few passes over ``[batch, seq]`` only to unpad its inputs
and pad its outputs.

Why the alignment: GAE is a discounted reverse sum over each response alone. With every response starting on a block
of ``SLOT_ALIGN`` slots, no block holds two responses, so one matmul gives the sums inside every block and a small
per-response scan over the block sums (a ``[batch, blocks]`` grid) carries them back; nothing leaks from one response
into the one before it, so there is nothing to subtract. The pad slot after each response is its V_next = 0.

Conventions are those of the padded functions (segmentation.py, segments.py, interpolation.py, advantages.py), and
the tests hold both layouts to the same results and to the per-sequence loop reference:
- segment ends as ``_content_ends`` makes them for the entropy, token, sentence and n-gram modes (content tokens only,
  the last content token always ends a segment, an EOS-only response ends its one segment on EOS), so EOS is in no
  segment and gets only the KL term; the bandit mode's one segment ends on the last token, EOS included;
- segment t of T sits at p = (t + 1) / T; the even split gives each of its tokens r_t / |a_t|;
- GAE runs over each response alone, V = 0 after its last token.

Host syncs: ``from_masks`` reads the numbers of slots and response tokens and the longest response, with its mask
check, in one read; ``from_ends`` the number of segments K (listing the ends) and its checks in another; each value
check (entropy, reward head at the ends) one more. Like the remove-padding paths of other trainers, sizes must be
known to allocate.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

from megaseg.algorithms.advantages import block_carry_weights, block_reverse_sums, discounted_reverse_cumsum
from megaseg.algorithms.interpolation import INTERPOLATION_MODES
from megaseg.algorithms.normalizer import Normalizer
from megaseg.algorithms.segments import INDEX_DTYPE
from megaseg.algorithms.validation import (
    check_choice,
    check_finite,
    check_masks,
    check_nonnegative_float,
    check_shape,
    check_unit_interval,
)
from megaseg.kernels.dispatch import use_triton

# Every response starts at a multiple of this many slots; it is also the block of GAE's within-block matmul
# ([slots / 16, 16] x [16, 16] was faster on CPU than blocks of 32 or 8 at 64 x 2048).
SLOT_ALIGN = 16


@dataclass(frozen=True, eq=False)
class UnpaddedResponses:
    """The response tokens of a ``[batch, seq]`` batch in aligned slots (see module docstring).

    Build with ``UnpaddedResponses.from_masks``; ``unpad`` takes a ``[batch, seq]`` tensor to its ``[slots]`` entries,
    ``pad`` puts ``[slots]`` values back (0 at prompt and padding positions).
    """

    shape: tuple[int, int]  # (batch, seq) of the padded batch
    # [slots] INDEX_DTYPE: row-major flat position in [batch, seq] of each slot's token (a pad slot: its response's
    # last token's)
    index: torch.Tensor
    scatter_index: torch.Tensor  # [slots] INDEX_DTYPE: ``index`` with the pad slots at batch * seq (past the grid)
    # [slots] float32: 1 in response slots, 0 in pad slots. A pad slot reads a token of its response, so multiplying
    # by this mask zeroes it (one op; only a non-finite token, which the pipeline refuses or propagates anyway, would
    # leave a NaN there).
    real_float: torch.Tensor
    starts: torch.Tensor  # [batch + 1] int64: response b fills slots starts[b]:starts[b] + lengths[b]
    lengths: torch.Tensor  # [batch] int64: response lengths (>= 1)
    has_eos: torch.Tensor  # [batch] bool: the response ends with EOS
    # GAE's per-response grid: block j of slots (slots SLOT_ALIGN * j ...) is entry grid_index[j] of a
    # [batch, grid_width] grid, row = its response, column = its index within the response.
    grid_index: torch.Tensor  # [slots / SLOT_ALIGN] INDEX_DTYPE
    grid_width: int  # a power of two > the most blocks of any response (the spare column reads as 0)
    num_tokens: int  # N, the number of response tokens

    @classmethod
    def from_masks(
        cls, response_mask: torch.Tensor, eos_mask: torch.Tensor, validate: bool = True
    ) -> UnpaddedResponses:
        """The response tokens of ``response_mask`` ``[batch, seq]`` bool (one contiguous, non-empty run per row) with
        their EOS marks from ``eos_mask`` (at most one per row, on its last response token); ``validate`` checks
        those promises (in the one host read of the sizes)."""
        check_masks(response_mask, eos_mask, validate=False)  # dtypes and shapes
        batch, seq = response_mask.shape
        device = response_mask.device
        mask_bytes = response_mask.view(torch.uint8)
        # Per-row bookkeeping is int32 (exact: flat positions < 2^31), which spares conversions.
        lengths = mask_bytes.sum(dim=1, dtype=torch.int32)
        # A run's tokens end at its last True: the largest column + 1 holding True. On CPU that max costs a tenth of
        # a nonzero over the whole grid (argmax twice as much: it does not vectorise on bytes).
        columns, flipped = _columns(seq, device)
        run_end = (mask_bytes * columns).amax(dim=1)
        last = (_row_starts(batch, seq, device) + run_end).sub_(1).clamp_(min=0)  # flat position of the last token
        has_eos = eos_mask.view(-1).index_select(0, last)
        # Blocks of SLOT_ALIGN slots: length // SLOT_ALIGN + 1 per response leaves 1 to SLOT_ALIGN pad slots after it.
        blocks = lengths.div(SLOT_ALIGN, rounding_mode="floor").add_(1)
        block_ends = blocks.cumsum(0, dtype=torch.int32)
        sizes = [block_ends[-1], blocks.amax(), lengths.sum()]
        if validate:
            # In the same host read as the sizes: a row's span (last True + 1 - first True) minus its count is >= 0,
            # and 0 iff the row is one run (an empty row gives -seq); its EOS marks number at least has_eos (the mark
            # on its last response token), exactly that iff it has no other. All is well iff both excesses are 0.
            span = (mask_bytes * flipped).amax(dim=1).int().add_(run_end).sub_(seq)  # (int32: 2 seq may not fit int16)
            eos_marks = eos_mask.view(torch.uint8).sum(dtype=torch.int32)  # (int32: twice as fast as int64 on CPU)
            sizes.append(span.sub_(lengths).abs_().sum() + (eos_marks - has_eos.sum()))
        num_blocks, most_blocks, num_tokens, *excess = torch.stack(sizes).tolist()
        if excess and excess[0] != 0:
            check_masks(response_mask, eos_mask)  # names the bad rows
            raise AssertionError("check_masks accepted masks that from_masks refused")  # unreachable by construction
        width = 1 << most_blocks.bit_length()
        block_starts = block_ends - blocks
        slot_starts = block_starts * SLOT_ALIGN
        # Per response, less what its first block j adds back below: the flat position of its first token, the
        # number of its tokens, its row in the grid; and the flat position of its last token.
        per_response = torch.stack(
            [(last - slot_starts).sub_(lengths).add_(1), lengths + slot_starts,
             _row_starts(batch, width, device) - block_starts, last],
            dim=1,
        )  # fmt: skip
        per_block = torch.repeat_interleave(per_response, blocks, dim=0, output_size=num_blocks)
        block = _arange(num_blocks, torch.int32, device)
        block_slot = block * SLOT_ALIGN
        lane = _arange(SLOT_ALIGN, torch.int32, device)
        # Slot i of block j holds the response's token SLOT_ALIGN * (j - its first block) + i, if that is < its
        # length; a pad slot reads the last token (any real entry will do: it is zeroed after the read).
        index = torch.minimum((per_block[:, 0] + block_slot)[:, None] + lane, per_block[:, 3:]).view(-1)
        in_run = (per_block[:, 1] - block_slot)[:, None].sub(lane).clamp_(0, 1).view(-1)  # (a comparison is slower)
        size = batch * seq
        return cls(
            shape=(batch, seq),
            index=index.to(INDEX_DTYPE),
            scatter_index=(index - size).mul_(in_run).add_(size).to(INDEX_DTYPE),
            real_float=in_run.to(torch.float32),
            starts=torch.constant_pad_nd(slot_starts, (0, 1), num_blocks * SLOT_ALIGN).long(),
            lengths=lengths.long(),
            has_eos=has_eos,
            grid_index=(per_block[:, 2] + block).to(INDEX_DTYPE),
            grid_width=width,
            num_tokens=num_tokens,
        )

    @property
    def num_slots(self) -> int:
        return self.index.numel()

    @cached_property
    def last(self) -> torch.Tensor:
        """``[batch]`` int64: the slot of each response's last token (EOS if it has one)."""
        return self.starts[:-1] + self.lengths - 1

    @cached_property
    def real(self) -> torch.Tensor:
        """``[slots]`` bool: the slot holds a response token (False: pad slot)."""
        return self.real_float.bool()

    @cached_property
    def eos_after_content(self) -> torch.Tensor:
        """``[batch]`` bool: the response ends with an EOS after content tokens. Its last content token, which ends
        its last segment, is then the one before the EOS; an EOS-only response's one segment is its EOS."""
        return self.has_eos & (self.lengths > 1)

    @cached_property
    def eos(self) -> torch.Tensor:
        """``[slots]`` bool: the EOS tokens."""
        return self.real.new_zeros(self.num_slots).index_fill_(0, self.last[self.has_eos], True)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """``[slots]``: the response entries of ``x`` ``[batch, seq]``, response by response, 0 (False) in the pad
        slots."""
        check_shape("x", x, self.shape, "the padded batch")
        return _zero_pads(x.reshape(-1).index_select(0, self.index), self)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, seq]``: ``x`` ``[slots]`` back at its response positions, 0 at prompt and padding positions."""
        check_shape("x", x, (self.num_slots,), "the response slots")
        size = self.shape[0] * self.shape[1]
        out = x.new_zeros(size + 1)  # the pad slots land in the extra entry
        return out.scatter_(0, self.scatter_index, x)[:size].view(self.shape)


def _arange(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """0, 1, ..., size - 1: a view of a cached table (read-only) sized to the next power of two, so that batches of
    many sizes share it."""
    return _arange_table(1 << max(size - 1, 0).bit_length(), dtype, device)[:size]


@lru_cache(maxsize=16)
def _arange_table(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.arange(size, dtype=dtype, device=device)


@lru_cache(maxsize=8)
def _columns(seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, ..., seq) and (seq, ..., 1) in the narrowest integer dtype that holds seq (read-only, cached)."""
    columns = torch.arange(1, seq + 1, device=device, dtype=torch.int16 if seq < 2**15 else torch.int32)
    return columns, columns.flip(0)


@lru_cache(maxsize=16)
def _row_starts(batch: int, width: int, device: torch.device) -> torch.Tensor:
    """``[batch]`` int32: 0, width, 2 width, ... (read-only, cached)."""
    return torch.arange(0, batch * width, width, dtype=torch.int32, device=device)


def _zero_pads(x: torch.Tensor, responses: UnpaddedResponses) -> torch.Tensor:
    """``x`` ``[slots]`` (a temporary of the caller's, read from the response tokens) with 0 in the pad slots, in
    place."""
    if x.dtype == torch.bool:
        return x.logical_and_(responses.real)
    return x.mul_(responses.real_float if x.is_floating_point() else responses.real_float.to(x.dtype))


def segment_ends_from_boundaries(boundary: torch.Tensor, responses: UnpaddedResponses) -> torch.Tensor:
    """``[slots]`` bool segment ends from a per-token boundary rule ``[slots]`` bool (True may fall on any token,
    EOS included; False in the pad slots), with ``segmentation._content_ends``'s conventions: only content tokens end
    segments, the last content token (before EOS, or the last token of a truncated response) always does, and an
    EOS-only response ends on its EOS."""
    check_shape("boundary", boundary, (responses.num_slots,), "the response slots")
    return _content_ends_(boundary.clone(), responses)


def _content_ends_(ends: torch.Tensor, responses: UnpaddedResponses) -> torch.Tensor:
    """``segment_ends_from_boundaries`` in place on a boundary mask of the caller's own."""
    # The last token ends a segment unless it is an EOS after content; then the token before it does.
    step_back = responses.eos_after_content
    ends.index_copy_(0, responses.last, ~step_back)
    return ends.index_fill_(0, responses.last - step_back.long(), True)


def entropy_segment_ends(
    entropy: torch.Tensor, responses: UnpaddedResponses, cutoff: float, validate: bool = True
) -> torch.Tensor:
    """``segmentation.entropy_segment_ends`` on unpadded tokens: content token j ends a segment iff
    ``entropy[j] > cutoff`` (``entropy`` ``[slots]``, unpadded like the responses)."""
    check_shape("entropy", entropy, (responses.num_slots,), "the response slots")
    check_nonnegative_float("cutoff", cutoff)
    check_finite("entropy", entropy, where=lambda: responses.real & ~responses.eos, validate=validate)
    return _content_ends_(entropy > cutoff, responses)


@dataclass(frozen=True, eq=False)
class UnpaddedSegments:
    """The segments of unpadded responses, listed response by response (K in all).

    Build with ``UnpaddedSegments.from_ends``. Per-segment tensors are ``[K]``: entry k is segment
    ``index_in_response[k]`` of response ``response_of[k]``. A response's segments run from its first token to its
    last end, which is its last token or the one before (the last content token before EOS in entropy, token,
    sentence and n-gram mode; the EOS in bandit mode); the token after the last end, if any, and the pad slots are in
    no segment.
    """

    responses: UnpaddedResponses
    end_at: torch.Tensor  # [K] int64: slot of each segment's end
    response_of: torch.Tensor  # [K] int64: the response each segment belongs to
    index_in_response: torch.Tensor  # [K] int64: t, 0-based within its response
    num_segments: torch.Tensor  # [batch] int64: T of each response (>= 1)
    lengths: torch.Tensor  # [K] int64: |a_t|, tokens of each segment
    # [slots] int64: the segment of each token a segment covers (the number of ends before it); the slots after a
    # response's last end read its next response's first segment (K after the last response): masked where it matters.
    token_segment: torch.Tensor
    ends_on_last: torch.Tensor  # [batch] bool: the response's last end is its last token (no token after it)

    @classmethod
    def from_ends(cls, ends: torch.Tensor, responses: UnpaddedResponses, validate: bool = True) -> UnpaddedSegments:
        """The segments ending at ``ends`` ``[slots]`` bool (False in the pad slots), whose last end in every response
        is on its last token or the one before (as every segmentation mode makes it); ``validate`` checks both (one
        host read)."""
        check_shape("ends", ends, (responses.num_slots,), "the response slots")
        batch, device = responses.shape[0], ends.device
        end_at = _arange(responses.num_slots, torch.int64, device).masked_select(ends)  # (nonzero: slower on CPU)
        count = end_at.numel()
        # ends_before[i]: the ends before slot i, for i up to the number of slots (where it reads K).
        ends_before = torch.zeros(responses.num_slots + 1, dtype=torch.int64, device=device)
        torch.cumsum(ends.view(torch.uint8), 0, out=ends_before[1:])
        # The ends before a response's first slot index its first segment.
        first_segment = ends_before.index_select(0, responses.starts)
        first = first_segment[:-1]
        num_segments = first_segment[1:] - first
        last_end = end_at.index_select(0, (first_segment[1:] - 1).clamp_(min=0)) if count else first
        if validate:
            _check_ends(ends, responses, num_segments, last_end)
        response_of = torch.repeat_interleave(_arange(batch, torch.int64, device), num_segments, output_size=count)
        index_in_response = _arange(count, torch.int64, device) - first.index_select(0, response_of)
        # |a_t| is the distance from the previous end, which for a response's first segment is the slot before it.
        previous_end = end_at.roll(1).index_copy_(0, first, responses.starts[:-1] - 1)
        return cls(
            responses=responses,
            end_at=end_at,
            response_of=response_of,
            index_in_response=index_in_response,
            num_segments=num_segments,
            lengths=end_at - previous_end,
            token_segment=ends_before[:-1],
            ends_on_last=last_end == responses.last,
        )

    @property
    def count(self) -> int:
        return self.end_at.numel()

    def at_ends(self, values: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """``[K]``: ``values`` (e.g. the reward head output) at each segment end, from ``[slots]`` or straight from
        the padded ``[batch, seq]`` tensor (which saves unpadding a tensor only K entries of are read)."""
        if values.dim() == 2:
            check_shape("values", values, self.responses.shape, "the padded batch")
            out = values.reshape(-1).index_select(0, self.responses.index.index_select(0, self.end_at))
        else:
            check_shape("values", values, (self.responses.num_slots,), "the response slots")
            out = values.index_select(0, self.end_at)
        check_finite("values at segment ends", out, validate=validate)
        return out

    def positions(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[K]`` locations p = (t + 1) / T."""
        total = self.num_segments.index_select(0, self.response_of)
        return torch.true_divide(self.index_in_response + 1, total).to(dtype)  # integers divide into the default dtype

    def mean(self, segment_values: torch.Tensor) -> torch.Tensor:
        """``[batch]`` the mean of each response's segment values ``[K]`` (the RM's e(x, y) with mean aggregation)."""
        total = torch.segment_reduce(segment_values, "sum", lengths=self.num_segments)
        return total.div_(self.num_segments.to(total.dtype))

    def token_rewards(self, segment_values: torch.Tensor, mode: str = "even") -> torch.Tensor:
        """``[slots]`` per-token rewards from segment rewards ``[K]`` (``interpolation.token_rewards``'s modes);
        an EOS after content and the pad slots get 0."""
        check_choice("interpolation mode", mode, INTERPOLATION_MODES)
        check_shape("segment_values", segment_values, (self.count,), "the segments")
        if mode == "none":
            out = segment_values.new_zeros(self.responses.num_slots)
            return out.index_copy_(0, self.end_at, segment_values)
        if mode == "even":
            segment_values = segment_values / self.lengths.to(segment_values.dtype)
        # Entry K is read by the slots after the last response's last end. Every slot after a last end is zeroed: the
        # pad slots by the mask, the last token where the last end is before it.
        table = torch.constant_pad_nd(segment_values, (0, 1))
        out = table.index_select(0, self.token_segment).mul_(self.responses.real_float)
        last = self.responses.last
        return out.index_copy_(0, last, out.index_select(0, last).mul_(self.ends_on_last))


def _check_ends(
    ends: torch.Tensor, responses: UnpaddedResponses, num_segments: torch.Tensor, last_end: torch.Tensor
) -> None:
    """``from_ends``' promises, in one host read: no end in a pad slot, at least one end per response, and its last
    end on its last token or the one before."""
    on_pads = (ends & ~responses.real).sum()
    early = last_end < responses.last - 1
    empty, misplaced, _ = torch.stack([(num_segments == 0).sum(), on_pads, early.sum()]).tolist()
    if misplaced:
        raise ValueError("ends marks pad slots; build [slots] tensors with UnpaddedResponses.unpad")
    if empty:
        rows = (num_segments == 0).nonzero().flatten().tolist()
        raise ValueError(f"responses {rows[:8]} have no segment end; every response needs at least one")
    if early.any():
        rows = early.nonzero().flatten().tolist()
        raise ValueError(
            f"responses {rows[:8]} have more than one token after their last segment end; a segmentation ends its "
            "last segment on the last content token (or the EOS)"
        )


def gae(
    rewards: torch.Tensor, values: torch.Tensor, responses: UnpaddedResponses, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``advantages.gae`` on unpadded responses: (advantages, returns) ``[slots]``, each response on its own
    (V_next = 0 after its last token), in at least fp32. ``rewards`` and ``values`` hold 0 in the pad slots (as
    ``unpad`` leaves them), and so do the outputs.

    A_t = sum_{k >= t} (gamma lam)^(k - t) delta_k over the response. The slots come in blocks of SLOT_ALIGN that
    never hold two responses: one matmul gives each block's own sums (``advantages.block_reverse_sums``); the sum at
    each block's start goes into a ``[batch, blocks]`` grid, one row per response, whose discounted reverse sums
    (decay (gamma lam)^SLOT_ALIGN) give every block the sum at the start of the next block of its response, and each
    slot adds that, discounted to it. Every weight is a power with a non-negative exponent, as in the padded filter.
    """
    check_unit_interval("gamma", gamma)
    check_unit_interval("lam", lam)
    slots = responses.num_slots
    check_shape("rewards", rewards, (slots,), "the response slots")
    check_shape("values", values, (slots,), "the response slots")
    if use_triton(rewards):  # megaseg.kernels.scan: a reverse scan per response (the lines below are its reference)
        from megaseg.kernels.scan import gae_flat

        return gae_flat(rewards, values, responses.real, responses.starts, gamma, lam)
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    rewards, values = rewards.detach().to(dtype), values.detach().to(dtype)
    decay = gamma * lam
    # delta_t = r_t + gamma * V_next - V_t. V is 0 in the pad slot after each response (its V_next), and delta is 0 in
    # its pad slots, except the last, which reads the next response's first value: that one is zeroed.
    delta = torch.sub(rewards, values)
    delta[:-1].add_(values[1:], alpha=gamma)
    delta.index_fill_(0, responses.starts[1:-1] - 1, 0.0)
    local = block_reverse_sums(delta.view(-1, SLOT_ALIGN), decay)  # [blocks, SLOT_ALIGN]
    # One grid row per response, one column per block (a spare column reads as the sum after the last block), the
    # width a power of two so that the filter's cached matrices serve many batches.
    batch, width = responses.shape[0], responses.grid_width
    grid = local.new_zeros(batch * width).scatter_(0, responses.grid_index, local[:, 0])
    at_block_start = discounted_reverse_cumsum(grid.view(batch, width), decay**SLOT_ALIGN).reshape(-1)
    after_block = at_block_start[1:].index_select(0, responses.grid_index)  # the next column
    advantages = local.addcmul_(after_block[:, None], block_carry_weights(decay, SLOT_ALIGN, local.dtype, local.device))
    advantages = advantages.view(-1).to(dtype)
    return advantages, torch.add(values, advantages)


def whiten(values: torch.Tensor, responses: UnpaddedResponses, eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) with the statistics of the response tokens (``ppo.masked_whiten``'s numbers),
    0 in the pad slots. The mean is summed in fp64 and the variance taken of the centred values, so no sum cancels;
    no host sync."""
    check_shape("values", values, (responses.num_slots,), "the response slots")
    count = max(responses.num_tokens, 1)
    mean = values.detach().sum(dtype=torch.float64) / count
    centred = torch.sub(values, mean.to(values.dtype)).mul_(responses.real_float)  # pad slots: -mean, zeroed
    var = torch.dot(centred.detach(), centred.detach()).double() / count
    return centred.mul_(var.add_(eps).rsqrt_().to(values.dtype))


def normalize(normalizer: Normalizer, rewards: torch.Tensor, segments: UnpaddedSegments) -> torch.Tensor:
    """``[K]`` normalized segment rewards at their locations p = (t + 1) / T, in at least fp32."""
    # normalize_segments computes in at least fp32; the locations are made in that dtype.
    return normalizer.normalize_segments(rewards, segments.positions(torch.promote_types(rewards.dtype, torch.float32)))
