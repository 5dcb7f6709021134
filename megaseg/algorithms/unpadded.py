"""The reward pipeline on unpadded response tokens: each per-token step touches the N response tokens of a batch, not
its whole ``[batch, seq]`` grid.

A rollout batch is right-padded ``[batch, seq]`` with the prompt in front of each response, so much of it is prompt
or padding (40% response tokens in benchmarks/algorithms.py's batch). ``UnpaddedResponses`` lists the response tokens
of every row end to end, response b in ``cu_seqlens[b]:cu_seqlens[b + 1]`` (megatron's packed-sequence "THD" layout,
verl's remove-padding); ``UnpaddedSegments`` lists the K segments of those responses the same way, segment by segment.
Per-token steps then cost a pass over N entries, per-segment steps a pass over K (about N / 6 at c_ent 1.75), and the
pipeline costs a few passes over ``[batch, seq]`` only to unpad its inputs and pad its outputs.

Conventions are those of the padded functions (segmentation.py, segments.py, interpolation.py, advantages.py), and
the tests hold both layouts to the same results and to the per-sequence loop reference:
- segment ends as ``_content_ends`` makes them (content tokens only, the last content token always ends a segment, an
  EOS-only response ends its one segment on EOS), so EOS is in no segment and gets only the KL term;
- segment t of T sits at p = (t + 1) / T; the even split gives each of its tokens r_t / |a_t|;
- GAE runs over each response alone, V = 0 after its last token.

Host syncs: the numbers of response tokens N and segments K (listing the segment ends is a ``nonzero``), the longest
response, and the validation checks; like the remove-padding paths of other trainers, N and K must be known to
allocate.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

from megaseg.algorithms.advantages import decay_powers, discounted_reverse_cumsum
from megaseg.algorithms.interpolation import INTERPOLATION_MODES
from megaseg.algorithms.masking import count_true
from megaseg.algorithms.normalizer import Normalizer
from megaseg.algorithms.ppo import moments_to_mean_var
from megaseg.algorithms.segments import INDEX_DTYPE
from megaseg.algorithms.validation import check_choice, check_finite, check_masks, check_nonnegative_float, check_shape

# Width of the rows the flat discounted sum is folded into: the padded filter's cached matrices for this length are
# reused for every batch, and the carry between rows is a second, short filter.
FOLD_WIDTH = 2048


@dataclass(frozen=True, eq=False)
class UnpaddedResponses:
    """The response tokens of a ``[batch, seq]`` batch, listed row by row (see module docstring).

    Build with ``UnpaddedResponses.from_masks``; ``unpad`` takes a ``[batch, seq]`` tensor to its ``[N]`` response
    entries, ``pad`` puts ``[N]`` values back (0 at prompt and padding positions).
    """

    shape: tuple[int, int]  # (batch, seq) of the padded batch
    index: torch.Tensor  # [N] INDEX_DTYPE: row-major flat position of each response token in [batch, seq]
    cu_seqlens: torch.Tensor  # [batch + 1] int64: response b is entries cu_seqlens[b]:cu_seqlens[b + 1]
    lengths: torch.Tensor  # [batch] int64: response lengths (>= 1)
    eos: torch.Tensor  # [N] bool: the EOS tokens

    @classmethod
    def from_masks(
        cls, response_mask: torch.Tensor, eos_mask: torch.Tensor, validate: bool = True
    ) -> UnpaddedResponses:
        """The response tokens of ``response_mask`` ``[batch, seq]`` bool (one contiguous, non-empty run per row) with
        their EOS marks from ``eos_mask`` (at most one per row, on its last response token); ``validate`` checks
        those promises (one host sync)."""
        check_masks(response_mask, eos_mask, validate=False)  # dtypes and shapes
        batch, seq = response_mask.shape
        mask_bytes = response_mask.view(torch.uint8)
        lengths = count_true(response_mask, dim=1)
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
        # A run's tokens are its first position plus 0, 1, ...; the first position is the run's end (the largest
        # column + 1 holding True) minus its length. On CPU that max costs a tenth of a nonzero over the whole grid
        # (argmax twice as much: it does not vectorise on bytes).
        column_dtype = torch.int16 if seq < 2**15 else torch.int32
        columns = torch.arange(1, seq + 1, device=response_mask.device, dtype=column_dtype)
        run_end = (mask_bytes * columns).amax(dim=1).long()
        first = run_end - lengths
        if validate:
            _check_runs(response_mask, eos_mask, mask_bytes, columns, first, run_end)
        row_offset = (first + torch.arange(batch, device=first.device) * seq - cu_seqlens[:-1]).to(INDEX_DTYPE)
        num_tokens = int(cu_seqlens[-1])
        index = torch.repeat_interleave(row_offset, lengths, output_size=num_tokens)
        index += torch.arange(num_tokens, device=index.device, dtype=index.dtype)
        eos = eos_mask.reshape(-1).index_select(0, index)
        return cls((batch, seq), index, cu_seqlens, lengths, eos)

    @property
    def num_tokens(self) -> int:
        return self.index.numel()

    @cached_property
    def last(self) -> torch.Tensor:
        """``[batch]`` int64: the position of each response's last token (EOS if it has one)."""
        return self.cu_seqlens[1:] - 1

    @cached_property
    def steps_before_end(self) -> torch.Tensor:
        """``[N]`` INDEX_DTYPE: for each token, the number of tokens of its response after it."""
        last_flat = self.index.index_select(0, self.last.to(INDEX_DTYPE))
        return torch.repeat_interleave(last_flat, self.lengths, output_size=self.num_tokens).sub_(self.index)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """``[N]``: the response entries of ``x`` ``[batch, seq]``, response by response."""
        check_shape("x", x, self.shape, "the padded batch")
        return x.reshape(-1).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, seq]``: ``x`` ``[N]`` back at its response positions, 0 at prompt and padding positions."""
        check_shape("x", x, (self.num_tokens,), "the response tokens")
        out = x.new_zeros(self.shape[0] * self.shape[1])
        return out.scatter_(0, self.index, x).view(self.shape)


def _check_runs(response_mask, eos_mask, mask_bytes, columns, first, run_end) -> None:
    """``validation.check_masks``'s promises from what ``from_masks`` computed anyway (one host sync): every row is
    one non-empty run (its first True is where its length says, counting back from its last), and a row's EOS marks
    are either none or its last response token alone. On failure ``check_masks`` names the bad rows."""
    seq = response_mask.shape[1]
    first_true = seq - (mask_bytes * columns.flip(0)).amax(dim=1).long()  # seq for an empty row
    eos_count = count_true(eos_mask, dim=1)
    eos_at_end = eos_mask.gather(1, (run_end - 1).clamp(min=0)[:, None]).squeeze(1)
    broken = (first_true != first) | (run_end == 0) | (eos_count != eos_at_end.long())
    if bool(broken.any()):
        check_masks(response_mask, eos_mask)
        raise AssertionError("check_masks accepted masks that _check_runs refused")  # unreachable by construction


def segment_ends_from_boundaries(boundary: torch.Tensor, responses: UnpaddedResponses) -> torch.Tensor:
    """``[N]`` bool segment ends from a per-token boundary rule ``[N]`` bool (True may fall anywhere, EOS included),
    with ``segmentation._content_ends``'s conventions: only content tokens end segments, the last content token (before
    EOS, or the last token of a truncated response) always does, and an EOS-only response ends on its EOS."""
    ends = boundary & ~responses.eos
    last = responses.last
    # One step back from an EOS, unless the EOS is the whole response.
    step_back = responses.eos.index_select(0, last) & (responses.lengths > 1)
    ends[last - step_back.long()] = True
    return ends


def entropy_segment_ends(
    entropy: torch.Tensor, responses: UnpaddedResponses, cutoff: float, validate: bool = True
) -> torch.Tensor:
    """``segmentation.entropy_segment_ends`` on unpadded tokens: content token j ends a segment iff
    ``entropy[j] > cutoff`` (``entropy`` ``[N]``, unpadded like the responses)."""
    check_shape("entropy", entropy, (responses.num_tokens,), "the response tokens")
    check_nonnegative_float("cutoff", cutoff)
    check_finite("entropy", entropy, where=~responses.eos, validate=validate)
    return segment_ends_from_boundaries(entropy > cutoff, responses)


@dataclass(frozen=True, eq=False)
class UnpaddedSegments:
    """The segments of unpadded responses, listed response by response (K in all), and where each token's is.

    Build with ``UnpaddedSegments.from_ends``. Per-segment tensors are ``[K]``: entry k is segment
    ``index_in_response[k]`` of response ``response_of[k]``.
    """

    responses: UnpaddedResponses
    end_at: torch.Tensor  # [K] int64: token position of each segment's end
    response_of: torch.Tensor  # [K] int64: the response each segment belongs to
    index_in_response: torch.Tensor  # [K] int64: t, 0-based within its response
    num_segments: torch.Tensor  # [batch] int64: T of each response (>= 1)
    lengths: torch.Tensor  # [K] int64: |a_t|, tokens of each segment
    token_segment: torch.Tensor  # [N] int32: the segment of each token, K for tokens in no segment

    @classmethod
    def from_ends(cls, ends: torch.Tensor, responses: UnpaddedResponses, validate: bool = True) -> UnpaddedSegments:
        """The segments ending at ``ends`` ``[N]`` bool; ``validate`` checks that every response has one (a segment
        ends on its last content token, as every segmentation mode makes it)."""
        check_shape("ends", ends, (responses.num_tokens,), "the response tokens")
        batch = responses.shape[0]
        end_at = ends.nonzero().squeeze(1)
        count = end_at.numel()
        ends_int = ends.view(torch.uint8)
        ends_before = torch.nn.functional.pad(ends_int[:-1], (1, 0)).cumsum(0, dtype=torch.int32)  # [N]
        # The ends before a response's first token index its first segment.
        first = ends_before.index_select(0, responses.cu_seqlens[:-1]).long()
        num_segments = torch.diff(first, append=first.new_full((1,), count))
        if validate and bool((num_segments == 0).any()):
            empty = (num_segments == 0).nonzero().flatten().tolist()
            raise ValueError(f"responses {empty[:8]} have no segment end; every response needs at least one")
        response_of = torch.repeat_interleave(torch.arange(batch, device=ends.device), num_segments, output_size=count)
        index_in_response = torch.arange(count, device=ends.device) - first.index_select(0, response_of)
        # A segment starts after the previous end, or at its response's start if it is the response's first.
        previous_end = torch.nn.functional.pad(end_at[:-1], (1, 0), value=-1)
        start = torch.where(index_in_response == 0, responses.cu_seqlens.index_select(0, response_of), previous_end + 1)
        last_end = end_at.index_select(0, first + num_segments - 1)
        return cls(
            responses=responses,
            end_at=end_at,
            response_of=response_of,
            index_in_response=index_in_response,
            num_segments=num_segments,
            lengths=end_at - start + 1,
            token_segment=_token_segments(ends_before, count, last_end, responses),
        )

    @property
    def count(self) -> int:
        return self.end_at.numel()

    def at_ends(self, values: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """``[K]``: ``values`` ``[N]`` (e.g. the reward head output) at each segment end; only the ends are read."""
        check_shape("values", values, (self.responses.num_tokens,), "the response tokens")
        out = values.index_select(0, self.end_at)
        check_finite("values at segment ends", out, validate=validate)
        return out

    def positions(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[K]`` locations p = (t + 1) / T."""
        total = self.num_segments.index_select(0, self.response_of)
        return (self.index_in_response + 1).to(dtype) / total.to(dtype)

    def mean(self, segment_values: torch.Tensor) -> torch.Tensor:
        """``[batch]`` the mean of each response's segment values ``[K]`` (the RM's e(x, y) with mean aggregation)."""
        total = segment_values.new_zeros(self.responses.shape[0]).index_add_(0, self.response_of, segment_values)
        return total / self.num_segments.to(segment_values.dtype)

    def token_rewards(self, segment_values: torch.Tensor, mode: str = "even") -> torch.Tensor:
        """``[N]`` per-token rewards from segment rewards ``[K]`` (``interpolation.token_rewards``'s modes); tokens
        in no segment get 0."""
        check_choice("interpolation mode", mode, INTERPOLATION_MODES)
        check_shape("segment_values", segment_values, (self.count,), "the segments")
        if mode == "none":
            out = segment_values.new_zeros(self.responses.num_tokens)
            return out.index_copy_(0, self.end_at, segment_values)
        if mode == "even":
            segment_values = segment_values / self.lengths.to(segment_values.dtype)
        # Entry K, read by the tokens in no segment, is 0.
        table = torch.nn.functional.pad(segment_values, (0, 1))
        return table.index_select(0, self.token_segment)


def _token_segments(
    ends_before: torch.Tensor, count: int, last_end: torch.Tensor, responses: UnpaddedResponses
) -> torch.Tensor:
    """``[N]`` int32: the segment of each token, which is the number of ends before it (``ends_before``, reused in
    place), except for the tokens after their response's last end ``last_end`` ``[batch]``, which get ``count`` (K).
    Those are at most the EOS in every segmentation mode: a handful of tokens, listed from the per-response tail
    lengths rather than found by a test over all N tokens."""
    tail_lengths = responses.last - last_end
    num_tail = int(tail_lengths.sum())
    if num_tail:
        # Tail token i of response b sits at last_end[b] + 1 + i.
        tail_starts = torch.repeat_interleave(
            last_end + 1 - (tail_lengths.cumsum(0) - tail_lengths), tail_lengths, output_size=num_tail
        )
        tail = tail_starts + torch.arange(num_tail, device=tail_starts.device)
        ends_before.index_fill_(0, tail, count)
    return ends_before


@lru_cache(maxsize=8)
def _fold_carry_weights(decay: float, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[width]``: decay^(width - i), the weight of the next row's first sum at column i of a folded row."""
    return _decay_power_table(decay, width, dtype, device).flip(0)


@lru_cache(maxsize=8)
def _decay_power_table(decay: float, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[count]``: decay^1, ..., decay^count (read-only, cached)."""
    return decay_powers(torch.arange(1, count + 1, device=device), decay).to(dtype)


def flat_discounted_reverse_cumsum(x: torch.Tensor, decay: float, width: int = FOLD_WIDTH) -> torch.Tensor:
    """y_t = sum_{k >= t} decay^(k - t) x_k over a 1-D ``x`` of any length, decay in [0, 1].

    ``x`` is folded into rows of ``width``: ``advantages.discounted_reverse_cumsum`` gives each row's own sums, the
    first column of those (each row's sum discounted to its start) goes through the same filter with decay^width to
    give every row the true sum at its start, and each row adds the next row's, discounted to its columns. Every
    weight is a power with a non-negative exponent, as in the padded filter.
    """
    (length,) = x.shape
    rows = max(1, -(-length // width))
    folded = x.view(rows, width) if length == rows * width else torch.nn.functional.pad(x, (0, rows * width - length))
    folded = folded.view(rows, width)
    local = discounted_reverse_cumsum(folded, decay)
    at_row_start = discounted_reverse_cumsum(local[:, 0].contiguous().view(1, rows), decay**width).view(rows)
    after_row = torch.nn.functional.pad(at_row_start[1:], (0, 1))
    local.addcmul_(after_row[:, None], _fold_carry_weights(float(decay), width, local.dtype, local.device))
    return local.reshape(-1)[:length]


def gae(
    rewards: torch.Tensor, values: torch.Tensor, responses: UnpaddedResponses, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``advantages.gae`` on unpadded responses: (advantages, returns) ``[N]``, each response on its own
    (V_next = 0 after its last token), in at least fp32.

    One discounted sum runs over all responses end to end; at token t of a response ending before position e, it has
    also summed the following responses, which is exactly decay^(e - t) times the sum at e, and that is subtracted.
    """
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    length = responses.num_tokens
    check_shape("rewards", rewards, (length,), "the response tokens")
    check_shape("values", values, (length,), "the response tokens")
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    rewards, values = rewards.detach().to(dtype), values.detach().to(dtype)
    decay = gamma * lam
    # delta_t = r_t + gamma * V_next - V_t, written into a buffer already folded for the discounted sum; its zero tail
    # (at least one entry) adds nothing and reads as the sum after the last response.
    folded = (length // FOLD_WIDTH + 1) * FOLD_WIDTH
    delta = values.new_empty(folded)
    delta[length:] = 0.0
    torch.sub(rewards[:length], values, out=delta[:length])
    delta[: length - 1].add_(values[1:], alpha=gamma)
    # V_next after a response's last token is 0, not the next response's first value.
    between = responses.last[:-1]
    delta[between] -= gamma * values[between + 1]
    running = flat_discounted_reverse_cumsum(delta, decay)
    # decay^(e - t) for e - t = 1 .. the longest response, read from a table (sized to a power of two, so batches
    # share it), times the sum at e.
    table_size = 1 << (int(responses.lengths.max()) - 1).bit_length()
    powers = _decay_power_table(float(decay), table_size, dtype, delta.device)
    at_next_start = torch.repeat_interleave(running[responses.cu_seqlens[1:]], responses.lengths,
                                            output_size=length)
    advantages = running[:length].addcmul_(powers.index_select(0, responses.steps_before_end), at_next_start,
                                           value=-1.0)
    return advantages, values + advantages


def whiten(values: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) over all entries, statistics in fp64 (``ppo.masked_whiten``'s numbers)."""
    x = values.detach().double()
    mean, var = moments_to_mean_var(torch.stack([x.sum(), torch.dot(x, x), torch.tensor(float(x.numel()),
                                                                                         dtype=x.dtype)]))
    return (values - mean).mul_(torch.rsqrt(var + eps))


def normalize(normalizer: Normalizer, rewards: torch.Tensor, segments: UnpaddedSegments) -> torch.Tensor:
    """``[K]`` normalized segment rewards at their locations p = (t + 1) / T, in at least fp32."""
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    return normalizer(rewards, segments.positions(rewards.dtype))
