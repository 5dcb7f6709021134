"""Reward-model training data: segmented preference pairs, the global-batch arithmetic, and micro-batch collation.

A global batch of G pairs is spread over the data-parallel ranks (G / dp each) and, on every rank, over micro-batches
of m pairs (G / (dp * m) micro-batches, gradients accumulated). One micro-batch holds the chosen AND the rejected
answers of its m pairs in ONE forward batch of 2m rows (chosen rows first, as megaseg.data.batch.PreferenceBatch).
All micro-batches of a step are padded to one length, because megatron's pipeline schedule sends fixed-size
activations between stages.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from megaseg.data.batch import collate_pairs
from megaseg.data.encoding import TokenizedPair


@dataclass(frozen=True)
class SegmentedPair:
    """A tokenized pair with the segment ends of both answers, as positions in each answer's prompt+response ids
    (position 0 = first prompt token: the columns of a right-padded batch; the segmentation cache's convention)."""

    pair: TokenizedPair
    chosen_ends: tuple[int, ...]    # [T_chosen], ascending, on response tokens
    rejected_ends: tuple[int, ...]  # [T_rejected]

    def __post_init__(self) -> None:
        for name, ends, sequence in (("chosen", self.chosen_ends, self.pair.chosen),
                                     ("rejected", self.rejected_ends, self.pair.rejected)):
            start, stop = len(sequence.prompt_ids), len(sequence.prompt_ids) + len(sequence.response_ids)
            if not ends or min(ends) < start or max(ends) >= stop:
                raise ValueError(f"{self.pair.source}: {name} segment ends {list(ends)[:8]} must be non-empty "
                                 f"positions of its response tokens [{start}, {stop}); the segmentation does not "
                                 "match this data (delete its cache entry and segment again)")

    @property
    def num_tokens(self) -> int:
        """Prompt + response tokens of both answers (what a forward pass over the pair processes)."""
        return sum(len(s.prompt_ids) + len(s.response_ids) for s in (self.pair.chosen, self.pair.rejected))


@dataclass(frozen=True)
class RewardMicroBatch:
    """One forward batch: rows [0, P) are the chosen answers of P pairs, rows [P, 2P) their rejected answers."""

    input_ids: torch.Tensor      # [2P, S] long, right-padded
    position_ids: torch.Tensor   # [2P, S] long
    response_mask: torch.Tensor  # [2P, S] bool, response tokens (EOS included)
    segment_ends: torch.Tensor   # [2P, S] bool, the last token of every segment
    num_pairs: int               # P
    num_tokens: int              # real (non-pad) tokens in the batch
    attention_mask: Optional[torch.Tensor] = None  # causal only: right padding never reaches an earlier position


def collate_reward_micro_batch(pairs: Sequence[SegmentedPair], pad_id: int, seq_length: int) -> RewardMicroBatch:
    """Right-pad the 2P sequences of `pairs` to `seq_length` and mark their segment ends."""
    preference = collate_pairs([item.pair for item in pairs], pad_id)
    sequences = preference.sequences
    if sequences.seq_length > seq_length:
        raise ValueError(f"a pair is {sequences.seq_length} tokens long but the step pads to {seq_length}")
    extra = seq_length - sequences.seq_length
    pad = lambda tensor, value: torch.nn.functional.pad(tensor, (0, extra), value=value)  # noqa: E731
    response_mask = pad(sequences.response_mask, False)
    segment_ends = torch.zeros_like(response_mask)
    for row, ends in enumerate([item.chosen_ends for item in pairs] + [item.rejected_ends for item in pairs]):
        segment_ends[row, list(ends)] = True
    return RewardMicroBatch(
        input_ids=pad(sequences.input_ids, pad_id), position_ids=pad(sequences.position_ids, 0),
        response_mask=response_mask, segment_ends=segment_ends, num_pairs=len(pairs),
        num_tokens=int(sequences.attention_mask.sum()))


def longest_sequence(pairs: Sequence[SegmentedPair]) -> int:
    return max(len(s.prompt_ids) + len(s.response_ids) for item in pairs for s in (item.pair.chosen, item.pair.rejected))


def collate_step(pairs: Sequence[SegmentedPair], micro_batch_size: int, pad_id: int,
                 pad_to_multiple_of: int = 8) -> list[RewardMicroBatch]:
    """This rank's pairs of one step -> micro-batches of `micro_batch_size` pairs, all padded to one length
    (the step's longest sequence, rounded up to `pad_to_multiple_of` so fewer distinct shapes reach the kernels)."""
    assert len(pairs) % micro_batch_size == 0, "the batch plan guarantees whole micro-batches"
    longest = longest_sequence(pairs)
    seq_length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return [collate_reward_micro_batch(pairs[start:start + micro_batch_size], pad_id, seq_length)
            for start in range(0, len(pairs), micro_batch_size)]


@dataclass(frozen=True)
class BatchPlan:
    """How many pairs each step, rank and micro-batch takes, and how many steps the run has."""

    global_batch_size: int   # pairs per optimizer step, all data-parallel ranks together
    micro_batch_size: int    # pairs per forward pass (2x rows: chosen + rejected)
    dp_size: int
    steps_per_epoch: int
    total_steps: int

    @property
    def pairs_per_rank(self) -> int:
        return self.global_batch_size // self.dp_size

    @property
    def num_micro_batches(self) -> int:
        return self.pairs_per_rank // self.micro_batch_size


def plan_batches(*, num_pairs: int, global_batch_size: int, micro_batch_size: int, dp_size: int, epochs: int,
                 max_steps: Optional[int]) -> BatchPlan:
    """Check the batch sizes divide as they must; total steps = epochs x full global batches per epoch, capped by
    max_steps. The last partial global batch of an epoch is not trained on (drop_last)."""
    if global_batch_size % (dp_size * micro_batch_size):
        raise ValueError(
            f"rm.global_batch_size={global_batch_size} must be a multiple of data-parallel size {dp_size} x "
            f"rm.micro_batch_size={micro_batch_size} = {dp_size * micro_batch_size}; change one of them")
    usable = num_pairs - num_pairs % dp_size  # what the sampler hands out per epoch with drop_last
    steps_per_epoch = usable // global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has {num_pairs} pairs, fewer than one global batch "
                         f"(rm.global_batch_size={global_batch_size}); lower rm.global_batch_size or add data")
    total_steps = steps_per_epoch * epochs
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    return BatchPlan(global_batch_size, micro_batch_size, dp_size, steps_per_epoch, total_steps)
