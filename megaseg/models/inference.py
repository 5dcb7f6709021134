"""Run a frozen model over many prompt+response sequences in length-sorted micro-batches, at any TP/PP.

Used by segmentation (entropies of the SFT model) and scoring (reward-head values). Sequences are sorted by length
so that each micro-batch is padded only to its own longest row (rounded up to ``LENGTH_MULTIPLE``); consecutive
micro-batches of the same padded shape go through megatron's pipeline schedule together, because the schedule
sends fixed-size activations between stages. A short last micro-batch is filled up with copies of its first row,
whose outputs are dropped.

Right padding keeps every real token at its own position and after no padding token, so causal attention needs no
mask and the outputs at real positions do not depend on the padding.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megaseg.data.batch import SequenceBatch, collate_sequences
from megaseg.data.encoding import TokenizedSequence
from megaseg.models.pipeline import forward_only

LENGTH_MULTIPLE = 16
# Micro-batches per pipeline-schedule call at most, so progress is reported at a useful granularity.
MAX_MICRO_BATCHES_PER_CALL = 32
PAD_ID = 0


@dataclass(frozen=True)
class InferenceMicroBatch:
    """One micro-batch: the model inputs (the pipeline's ModelInputs protocol) and which caller rows they are."""

    input_ids: torch.Tensor               # [b, S] long, right-padded
    position_ids: torch.Tensor            # [b, S] long
    attention_mask: Optional[torch.Tensor]  # None: causal
    sequences: SequenceBatch              # [b, S] the same rows with their response / EOS masks
    rows: tuple[int, ...]                 # [b] indices into the caller's sequence list; fillers repeat a real row
    num_real_rows: int                    # the first num_real_rows rows are real


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_micro_batches(lengths: Sequence[int], micro_batch_size: int) -> list[list[tuple[tuple[int, ...], int, int]]]:
    """Groups of ``(rows, num_real_rows, padded_length)`` with one padded shape per group, shortest first."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    groups: list[list[tuple[tuple[int, ...], int, int]]] = []
    for start in range(0, len(order), micro_batch_size):
        rows = order[start:start + micro_batch_size]
        num_real = len(rows)
        rows = rows + [rows[0]] * (micro_batch_size - num_real)
        padded = _round_up(max(lengths[index] for index in rows), LENGTH_MULTIPLE)
        if groups and groups[-1][-1][2] == padded and len(groups[-1]) < MAX_MICRO_BATCHES_PER_CALL:
            groups[-1].append((tuple(rows), num_real, padded))
        else:
            groups.append([(tuple(rows), num_real, padded)])
    return groups


def _micro_batch(sequences: Sequence[TokenizedSequence], rows: tuple[int, ...], num_real: int,
                 padded: int) -> InferenceMicroBatch:
    batch = collate_sequences([sequences[index] for index in rows], PAD_ID, pad_to_multiple_of=padded)
    return InferenceMicroBatch(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None,
                               sequences=batch, rows=rows, num_real_rows=num_real)


# (model output on the last stage, the micro-batch) -> one result per row of the micro-batch (fillers included).
RowOutputFn = Callable[[torch.Tensor, InferenceMicroBatch], Sequence[Any]]


def infer_sequences(model: torch.nn.Module, sequences: Sequence[TokenizedSequence], *, micro_batch_size: int,
                    output_fn: RowOutputFn, is_last_stage: bool,
                    on_progress: Optional[Callable[[int, int], None]] = None) -> Optional[list[Any]]:
    """``output_fn``'s result for every sequence, in the caller's order, on the last pipeline stage; None elsewhere.

    Collective over the model-parallel group: every rank of it calls this with the same sequences.
    ``on_progress(done, total)`` is called after each schedule call.
    """
    results: list[Any] = [None] * len(sequences)
    done = 0
    with torch.no_grad():
        for group in plan_micro_batches([len(s.prompt_ids) + len(s.response_ids) for s in sequences],
                                        micro_batch_size):
            micro_batches = [_micro_batch(sequences, rows, num_real, padded) for rows, num_real, padded in group]
            outputs = forward_only(model, micro_batches, output_fn)
            if is_last_stage:
                for micro_batch, per_row in zip(micro_batches, outputs):
                    for row, value in zip(micro_batch.rows[:micro_batch.num_real_rows], per_row):
                        results[row] = value
            done += sum(micro_batch.num_real_rows for micro_batch in micro_batches)
            if on_progress is not None:
                on_progress(done, len(sequences))
    return results if is_last_stage else None
