"""A frozen model over many sequences, at any TP/PP: the one runner behind segmentation entropies, scoring, the PPO
experience forwards, the DPO reference log-probs and reward-model validation; and the token alignment of outputs.

Two entry points over one primitive (``run_frozen``: forward-only micro-batches through megatron's pipeline
schedule, the last stage's per-row outputs broadcast to every stage of the pipeline group):

- ``infer_sequences(model, sequences, ...)``: ragged ``TokenizedSequence`` s in length-sorted micro-batches, each
  padded only to its own longest row (rounded up to ``LENGTH_MULTIPLE``); consecutive micro-batches of one padded
  shape go through the schedule together (it sends fixed-size activations). A short last micro-batch is filled with
  copies of its first row, whose outputs are dropped. Per-row Python results on the last stage (None elsewhere).
- ``infer_batch(model, batch, ...)``: a right-padded ``SequenceBatch`` (rollouts) in order, micro-batch by
  micro-batch; per-row tensors on every stage.

Right padding keeps every real token at its own position and after no padding token, so causal attention needs no
mask and the outputs at real positions do not depend on the padding.

Packed (``packing=True``, from data.packing; megaseg.models.packing): each micro-batch also carries its rows' real
tokens packed into one row, which is what the model runs on; ``output_fn`` still gets the output in the rows'
``[b, S, ...]`` layout. Micro-batches then need no filler rows (the schedule's shape is the packed length), and the
micro-batches of one schedule call are packed to one length.

Alignment (docs/method.md: logits at j predict token j + 1), all in token positions:
- ``next_token_log_probs(...)[b, j]`` = log pi(token j | tokens < j), from the logits at j - 1; column 0 is 0;
- ``vocab_parallel_entropy(logits)[b, j]`` = H(softmax(logits at j)), the uncertainty about token j + 1;
- ``shift_right(values)[b, j]`` = values[b, j - 1]: a critic's V(state before token j) from its head at j - 1.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.distributed as dist

from megaseg.data.batch import SequenceBatch, collate_sequences
from megaseg.data.encoding import TokenizedSequence
from megaseg.models.packing import PackedRows, pack_rows, packed_lengths, row_lengths
from megaseg.models.pipeline import forward_only
from megaseg.parallel.initialize import ParallelContext
from megaseg.parallel.vocab_parallel import vocab_parallel_log_probs, vocab_parallel_log_probs_and_entropy

LENGTH_MULTIPLE = 16
# Micro-batches per pipeline-schedule call at most, so progress is reported at a useful granularity.
MAX_MICRO_BATCHES_PER_CALL = 32
# Padding sits after every real token and is never read, so any valid id does.
PAD_ID = 0


# --- token alignment ---------------------------------------------------------------------------------------------


def shift_right(values: torch.Tensor) -> torch.Tensor:
    """``[b, S]`` -> ``[b, S]`` with ``out[:, j] = values[:, j - 1]`` and 0 in column 0."""
    return torch.nn.functional.pad(values[:, :-1], (1, 0))


def next_token_log_probs(logits: torch.Tensor, input_ids: torch.Tensor, tp_group: Any,
                         chunk_size: Optional[int] = None) -> torch.Tensor:
    """Vocab-parallel logits ``[b, S, V/tp]`` -> ``[b, S]`` log pi(token j | < j), token-aligned (column 0 is 0).
    Differentiable with respect to the logits (the PPO actor and DPO policy losses)."""
    # Score every position against the NEXT token (the last column against a dummy id, dropped by the shift), so the
    # vocab-sized logits are never sliced into a copy.
    next_tokens = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
    return shift_right(vocab_parallel_log_probs(logits, next_tokens, tp_group, chunk_size, validate=False))


def log_probs_and_entropy(logits: torch.Tensor, input_ids: torch.Tensor, tp_group: Any,
                          chunk_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token log-probs ``[b, S]`` token-aligned, position entropies ``[b, S]``) from one logits block (one read of
    it with the Triton kernels)."""
    next_tokens = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)  # as in next_token_log_probs
    log_probs, entropy = vocab_parallel_log_probs_and_entropy(logits, next_tokens, tp_group, chunk_size,
                                                              validate=False)
    return shift_right(log_probs), entropy


def tensor_parallel_group(parallel_ctx: ParallelContext) -> Any:
    """The group vocab-parallel reductions run over (None at TP=1: nothing to reduce)."""
    return parallel_ctx.tp_group if parallel_ctx.tp_size > 1 else None


# --- the runner --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceMicroBatch:
    """One micro-batch: the model inputs (the pipeline's ModelInputs protocol) and which caller rows they are."""

    input_ids: torch.Tensor                 # [b, S] long, right-padded
    position_ids: torch.Tensor              # [b, S] long
    sequences: SequenceBatch                # [b, S] the same rows with their response / EOS masks
    rows: tuple[int, ...]                   # [b] indices into the caller's rows; fillers repeat a real row
    num_real_rows: int                      # the first num_real_rows rows are real
    attention_mask: Optional[torch.Tensor] = None  # None: causal
    packing: Optional[PackedRows] = None    # the real tokens of the rows packed into one (what the model runs on)


def _packed(micro_batches: Sequence[InferenceMicroBatch]) -> list[InferenceMicroBatch]:
    """The micro-batches with their rows packed (one schedule call: models/packing.packed_lengths)."""
    lengths = [row_lengths(batch.sequences.attention_mask) for batch in micro_batches]
    return [replace(batch, packing=pack_rows(batch.input_ids, batch_lengths, packed_length, PAD_ID))
            for batch, batch_lengths, packed_length in zip(micro_batches, lengths, packed_lengths(lengths))]


# (model output on the last stage, the micro-batch) -> one tensor per output, each with leading dim b.
TensorOutputFn = Callable[[torch.Tensor, InferenceMicroBatch], Sequence[torch.Tensor]]
# (model output on the last stage, the micro-batch) -> one result per row of the micro-batch (fillers included).
RowOutputFn = Callable[[torch.Tensor, InferenceMicroBatch], Sequence[Any]]


def broadcast_from_last_stage(tensors: Optional[Sequence[torch.Tensor]], shapes: Sequence[tuple[int, ...]],
                              parallel_ctx: ParallelContext) -> list[torch.Tensor]:
    """The last pipeline stage's fp32 tensors on every stage of its pipeline group (one broadcast each)."""
    if parallel_ctx.pp_size == 1:
        assert tensors is not None
        return [tensor.float() for tensor in tensors]
    source = dist.get_global_rank(parallel_ctx.pp_group, parallel_ctx.pp_size - 1)
    if parallel_ctx.is_last_pipeline_stage:
        out = [tensor.float().contiguous() for tensor in tensors]
    else:
        out = [torch.empty(shape, dtype=torch.float32, device=parallel_ctx.device) for shape in shapes]
    for tensor in out:
        dist.broadcast(tensor, src=source, group=parallel_ctx.pp_group)
    return out


@torch.no_grad()
def run_frozen(model: torch.nn.Module, micro_batches: Sequence[Any], output_fn: TensorOutputFn,
               parallel_ctx: ParallelContext, row_shapes: Sequence[tuple[int, ...]]) -> list[list[torch.Tensor]]:
    """Per micro-batch, ``output_fn``'s fp32 tensors on EVERY stage of the pipeline group.

    ``row_shapes``: the shape of each output per row (e.g. ``(S,)`` for per-position values, ``()`` for one number
    per row); the earlier stages allocate their receive buffers from it. Collective over the model-parallel group.
    """
    outputs = forward_only(model, micro_batches, output_fn)
    results = []
    for index, batch in enumerate(micro_batches):
        rows = batch.input_ids.shape[0]
        shapes = [(rows, *shape) for shape in row_shapes]
        local = list(outputs[index]) if parallel_ctx.is_last_pipeline_stage else None
        results.append(broadcast_from_last_stage(local, shapes, parallel_ctx))
    return results


def batch_micro_batches(sequences: SequenceBatch, micro_batch_size: int,
                        packing: bool = False) -> list[InferenceMicroBatch]:
    """Rows in order, ``micro_batch_size`` per micro-batch; the last one filled with copies of row 0 (packed: the
    last one is shorter instead, and every micro-batch is packed to one length)."""
    num_rows = sequences.batch_size
    padded_rows = num_rows if packing else -(-num_rows // micro_batch_size) * micro_batch_size
    index = torch.cat([torch.arange(num_rows), torch.zeros(padded_rows - num_rows, dtype=torch.long)])
    # RoPE goes by column; right padding keeps column == position for every real token.
    positions = torch.arange(sequences.seq_length, device=sequences.input_ids.device).expand(
        micro_batch_size, sequences.seq_length).contiguous()
    batches = []
    for start in range(0, padded_rows, micro_batch_size):
        rows = index[start:start + micro_batch_size]
        part = SequenceBatch(*(tensor[rows] for tensor in (sequences.input_ids, sequences.attention_mask,
                                                           sequences.response_mask, sequences.eos_mask,
                                                           sequences.position_ids)))
        batches.append(InferenceMicroBatch(input_ids=part.input_ids, position_ids=positions[:len(rows)],
                                           sequences=part, rows=tuple(rows.tolist()),
                                           num_real_rows=min(micro_batch_size, num_rows - start)))
    return _packed(batches) if packing else batches


def infer_batch(model: torch.nn.Module, sequences: SequenceBatch, parallel_ctx: ParallelContext, *,
                micro_batch_size: int, output_fn: TensorOutputFn, num_outputs: int,
                packing: bool = False) -> list[torch.Tensor]:
    """``num_outputs`` ``[B, S]`` fp32 tensors from ``output_fn`` (each ``[b, S]`` per micro-batch) over all rows, on
    every stage. Collective over the model-parallel group."""
    batches = batch_micro_batches(sequences, micro_batch_size, packing)
    per_batch = run_frozen(model, batches, output_fn, parallel_ctx, [(sequences.seq_length,)] * num_outputs)
    num_rows = sequences.batch_size
    return [torch.cat([outputs[k] for outputs in per_batch])[:num_rows] for k in range(num_outputs)]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_micro_batches(lengths: Sequence[int], micro_batch_size: int, packing: bool = False
                       ) -> list[list[tuple[tuple[int, ...], int, int]]]:
    """Groups of ``(rows, num_real_rows, padded_length)`` with one padded shape per group, shortest first (packed:
    no filler rows, and one packed length, the rows' total rounded up, per group)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    groups: list[list[tuple[tuple[int, ...], int, int]]] = []
    for start in range(0, len(order), micro_batch_size):
        rows = order[start:start + micro_batch_size]
        num_real = len(rows)
        if not packing:
            rows = rows + [rows[0]] * (micro_batch_size - num_real)
        padded = _round_up(max(lengths[index] for index in rows), LENGTH_MULTIPLE)
        # What must agree within a schedule call: the padded shape, or the packed length.
        shape = _round_up(sum(lengths[index] for index in rows), LENGTH_MULTIPLE) if packing else padded
        group_shape = None
        if groups:
            last_rows = groups[-1][-1][0]
            group_shape = (_round_up(sum(lengths[index] for index in last_rows), LENGTH_MULTIPLE) if packing
                           else groups[-1][-1][2])
        if groups and group_shape == shape and len(groups[-1]) < MAX_MICRO_BATCHES_PER_CALL:
            groups[-1].append((tuple(rows), num_real, padded))
        else:
            groups.append([(tuple(rows), num_real, padded)])
    return groups


def _sequence_micro_batch(sequences: Sequence[TokenizedSequence], rows: tuple[int, ...], num_real: int,
                          padded: int) -> InferenceMicroBatch:
    batch = collate_sequences([sequences[index] for index in rows], PAD_ID, pad_to_multiple_of=padded)
    return InferenceMicroBatch(input_ids=batch.input_ids, position_ids=batch.position_ids, sequences=batch,
                               rows=rows, num_real_rows=num_real)


@torch.no_grad()
def infer_sequences(model: torch.nn.Module, sequences: Sequence[TokenizedSequence], *, micro_batch_size: int,
                    output_fn: RowOutputFn, is_last_stage: bool,
                    on_progress: Optional[Callable[[int, int], None]] = None,
                    packing: bool = False) -> Optional[list[Any]]:
    """``output_fn``'s result for every sequence, in the caller's order, on the last pipeline stage; None elsewhere.

    Collective over the model-parallel group: every rank of it calls this with the same sequences.
    ``on_progress(done, total)`` is called after each schedule call.
    """
    results: list[Any] = [None] * len(sequences)
    done = 0
    for group in plan_micro_batches([len(s.prompt_ids) + len(s.response_ids) for s in sequences],
                                    micro_batch_size, packing):
        micro_batches = [_sequence_micro_batch(sequences, rows, num_real, padded) for rows, num_real, padded in group]
        if packing:
            micro_batches = _packed(micro_batches)
        outputs = forward_only(model, micro_batches, output_fn)
        if is_last_stage:
            for micro_batch, per_row in zip(micro_batches, outputs):
                for row, value in zip(micro_batch.rows[:micro_batch.num_real_rows], per_row):
                    results[row] = value
        done += sum(micro_batch.num_real_rows for micro_batch in micro_batches)
        if on_progress is not None:
            on_progress(done, len(sequences))
    return results if is_last_stage else None
