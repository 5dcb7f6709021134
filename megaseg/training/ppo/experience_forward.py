"""The model forwards of the experience maker: actor / reference log-probs and entropies, critic values, RM values.

Every function takes a rollout (``SequenceBatch``, right-padded, rows start at column 0) and returns ``[B, S]``
tensors on EVERY rank of the model-parallel group: the last pipeline stage computes them (through megatron's
pipeline schedule, micro-batch by micro-batch) and broadcasts them to the earlier stages, so the rest of the
experience maker runs the same tensor code everywhere. Tensor-parallel ranks already agree (the vocab-parallel
reductions and the scalar heads give replicated outputs).

Alignment (shared/notes/method-conventions.md: logits at j predict token j + 1), all in token positions:

- ``log_probs[b, j]``  = log pi(token j | tokens < j), from logits at j - 1; column 0 is 0 (never a response token).
- ``entropy[b, j]``    = H(softmax(logits at j)), the uncertainty about token j + 1: response token j ends a
  segment iff ``entropy[b, j] > c_ent``. (The entropy of the distribution that CHOSE token j is ``entropy[b, j-1]``.)
- ``values[b, j]``     = V(state before token j) = critic head at j - 1 (the state that sees tokens < j); column 0 is 0.
- ``rm_values[b, j]``  = reward-model head at j: the reward of a segment whose last token is j.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megaseg.data.batch import SequenceBatch
from megaseg.models.pipeline import forward_only
from megaseg.parallel.vocab_parallel import vocab_parallel_entropy, vocab_parallel_log_probs


@dataclass(frozen=True)
class ForwardMicroBatch:
    """Model inputs of one micro-batch (megaseg.models.pipeline.ModelInputs)."""

    input_ids: torch.Tensor     # [b, S] long
    position_ids: torch.Tensor  # [b, S] long
    attention_mask: Optional[torch.Tensor] = None  # causal: right padding never precedes a real token


@dataclass(frozen=True)
class PolicyOutputs:
    log_probs: torch.Tensor  # [B, S] fp32, token-aligned (column 0 is 0)
    entropy: torch.Tensor    # [B, S] fp32, position-aligned (H of the distribution predicting token j + 1)


def shift_right(values: torch.Tensor) -> torch.Tensor:
    """``[b, S]`` -> ``[b, S]`` with ``out[:, j] = values[:, j - 1]`` and 0 in column 0."""
    return torch.nn.functional.pad(values[:, :-1], (1, 0))


def micro_batches_of(sequences: SequenceBatch, micro_batch_size: int) -> tuple[list[ForwardMicroBatch], int]:
    """Rows in order, ``micro_batch_size`` per micro-batch; the last one is filled with copies of row 0 (their
    outputs are dropped) because the pipeline schedule sends one activation shape. Returns (micro-batches, rows)."""
    num_rows = sequences.batch_size
    padded_rows = -(-num_rows // micro_batch_size) * micro_batch_size
    index = torch.cat([torch.arange(num_rows), torch.zeros(padded_rows - num_rows, dtype=torch.long)])
    input_ids = sequences.input_ids[index]
    # RoPE goes by column; right padding keeps column == position for every real token.
    positions = torch.arange(sequences.seq_length, device=input_ids.device).expand_as(input_ids)
    batches = [ForwardMicroBatch(input_ids[start:start + micro_batch_size],
                                 positions[start:start + micro_batch_size].contiguous())
               for start in range(0, padded_rows, micro_batch_size)]
    return batches, num_rows


def broadcast_from_last_stage(tensors: Optional[Sequence[torch.Tensor]], shapes: Sequence[tuple[int, ...]],
                              parallel_ctx: Any) -> list[torch.Tensor]:
    """The last pipeline stage's fp32 tensors on every stage of its pipeline group (one broadcast each)."""
    if parallel_ctx.pp_size == 1:
        assert tensors is not None
        return list(tensors)
    source = dist.get_global_rank(parallel_ctx.pp_group, parallel_ctx.pp_size - 1)
    if parallel_ctx.is_last_pipeline_stage:
        out = [tensor.float().contiguous() for tensor in tensors]
    else:
        out = [torch.empty(shape, dtype=torch.float32, device=parallel_ctx.device) for shape in shapes]
    for tensor in out:
        dist.broadcast(tensor, src=source, group=parallel_ctx.pp_group)
    return out


def _run(model: torch.nn.Module, sequences: SequenceBatch, micro_batch_size: int, parallel_ctx: Any,
         output_fn: Callable[[torch.Tensor, ForwardMicroBatch], tuple[torch.Tensor, ...]],
         num_outputs: int) -> list[torch.Tensor]:
    """``num_outputs`` ``[B, S]`` fp32 tensors from ``output_fn`` over all micro-batches, on every stage."""
    batches, num_rows = micro_batches_of(sequences, micro_batch_size)
    outputs = forward_only(model, batches, output_fn)
    shape = (num_rows, sequences.seq_length)
    merged = None
    if parallel_ctx.is_last_pipeline_stage:
        merged = [torch.cat([per_batch[k] for per_batch in outputs])[:num_rows] for k in range(num_outputs)]
    return broadcast_from_last_stage(merged, [shape] * num_outputs, parallel_ctx)


def logits_to_log_probs_and_entropy(logits: torch.Tensor, input_ids: torch.Tensor, tp_group: Any,
                                    chunk_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Vocab-parallel logits ``[b, S, V/tp]`` -> (token log-probs ``[b, S]``, position entropies ``[b, S]``)."""
    # Score every position against the NEXT token (the last column against a dummy id, dropped by the shift), so the
    # vocab-sized logits are never sliced into a copy.
    next_tokens = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
    next_log_probs = vocab_parallel_log_probs(logits, next_tokens, tp_group, chunk_size, validate=False)
    entropy = vocab_parallel_entropy(logits, tp_group, chunk_size)
    return shift_right(next_log_probs), entropy


@torch.no_grad()
def policy_log_probs_and_entropy(model: torch.nn.Module, sequences: SequenceBatch, parallel_ctx: Any, *,
                                 micro_batch_size: int, chunk_size: Optional[int] = None) -> PolicyOutputs:
    """Log-probs of the rollout's tokens and the entropies of a causal LM (actor or reference), in ONE forward."""
    tp_group = parallel_ctx.tp_group if parallel_ctx.tp_size > 1 else None

    def output_fn(logits: torch.Tensor, batch: ForwardMicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_to_log_probs_and_entropy(logits, batch.input_ids, tp_group, chunk_size)

    log_probs, entropy = _run(model, sequences, micro_batch_size, parallel_ctx, output_fn, 2)
    return PolicyOutputs(log_probs=log_probs, entropy=entropy)


@torch.no_grad()
def critic_values(critic: torch.nn.Module, sequences: SequenceBatch, parallel_ctx: Any, *,
                  micro_batch_size: int) -> torch.Tensor:
    """``[B, S]`` V(state before token j), token-aligned (see the module docstring)."""
    (values,) = _run(critic, sequences, micro_batch_size, parallel_ctx,
                     lambda out, batch: (shift_right(out.float()),), 1)
    return values


@torch.no_grad()
def reward_model_values(reward_model: torch.nn.Module, sequences: SequenceBatch, parallel_ctx: Any, *,
                        micro_batch_size: int) -> torch.Tensor:
    """``[B, S]`` reward-head output at every position (read at segment ends)."""
    (values,) = _run(reward_model, sequences, micro_batch_size, parallel_ctx, lambda out, batch: (out.float(),), 1)
    return values


class RewardModelScorer:
    """The trained segment reward model behind the ``SegmentScorer`` interface of the experience maker."""

    def __init__(self, model: torch.nn.Module, parallel_ctx: Any, micro_batch_size: int):
        self.model = model
        self.parallel_ctx = parallel_ctx
        self.micro_batch_size = micro_batch_size

    def __call__(self, sequences: SequenceBatch, segment_ends: torch.Tensor) -> torch.Tensor:
        # The head runs at every position; the caller reads the ends (the model needs no segmentation).
        return reward_model_values(self.model, sequences, self.parallel_ctx, micro_batch_size=self.micro_batch_size)
