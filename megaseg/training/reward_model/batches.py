"""Micro-batches of reward-model training: segmented preference pairs -> padded forward batches.

A global batch of G pairs is spread over the data-parallel ranks (G / dp each) and, on every rank, over micro-batches
of m pairs (G / (dp * m) micro-batches, gradients accumulated). One micro-batch holds the chosen AND the rejected
answers of its m pairs in ONE forward batch of 2m rows (chosen rows first, as megaseg.data.batch.PreferenceBatch).
All micro-batches of a step are padded to one length, because megatron's pipeline schedule sends fixed-size
activations between stages. Packed (data.packing): each micro-batch's rows are padded to its own longest row only
(the loss's layout) and its real tokens packed into one row, all micro-batches of the step to one packed length.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Optional

import torch

from megaseg.data.batch import collate_pairs
from megaseg.models.packing import PackedRows, pack_rows, packed_lengths
from megaseg.training.reward_model.data import SegmentedPair


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
    packing: Optional[PackedRows] = None  # the same rows packed into one (the model runs on it; megaseg.models.pipeline)


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


def _row_lengths(pairs: Sequence[SegmentedPair]) -> list[int]:
    """Tokens of every row of a micro-batch, in its row order (chosen answers, then rejected)."""
    return [len(item.pair.chosen.prompt_ids) + len(item.pair.chosen.response_ids) for item in pairs] + \
        [len(item.pair.rejected.prompt_ids) + len(item.pair.rejected.response_ids) for item in pairs]


def collate_step(pairs: Sequence[SegmentedPair], micro_batch_size: int, pad_id: int,
                 pad_to_multiple_of: int = 8, packing: bool = False) -> list[RewardMicroBatch]:
    """This rank's pairs of one step -> micro-batches of `micro_batch_size` pairs, all padded to one length
    (the step's longest sequence, rounded up to `pad_to_multiple_of` so fewer distinct shapes reach the kernels);
    packed: each padded to its own longest and packed (models/packing.packed_lengths)."""
    assert len(pairs) % micro_batch_size == 0, "the batch plan guarantees whole micro-batches"
    groups = [pairs[start:start + micro_batch_size] for start in range(0, len(pairs), micro_batch_size)]
    round_up = lambda length: -(-length // pad_to_multiple_of) * pad_to_multiple_of  # noqa: E731
    if not packing:
        seq_length = round_up(longest_sequence(pairs))
        return [collate_reward_micro_batch(group, pad_id, seq_length) for group in groups]
    lengths = [_row_lengths(group) for group in groups]
    batches = []
    for group, group_lengths, packed_length in zip(groups, lengths, packed_lengths(lengths)):
        batch = collate_reward_micro_batch(group, pad_id, round_up(longest_sequence(group)))
        batches.append(replace(batch, packing=pack_rows(batch.input_ids, group_lengths, packed_length, pad_id)))
    return batches
