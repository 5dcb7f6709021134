"""Rollouts for PPO and evaluation: prompts -> generated prompt + response ``SequenceBatch``.

The sampler itself is megaseg.generation (batched, KV cache, TP/PP); a ``RolloutFn`` is anything with its call
shape, so tests can swap in a plain loop. Prompts go through it ``micro_rollout_batch_size`` at a time and the
pieces are joined into one right-padded batch.

The sampling generator of a PPO step is seeded from (seed, step, data-parallel rank) alone: rollouts do not depend
on how many random numbers anything else drew, and a resumed run samples exactly what the uninterrupted run would.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from megaseg.data.batch import PromptBatch, SequenceBatch, collate_prompts
from megaseg.data.encoding import TokenizedPrompt
from megaseg.generation.settings import SamplingSettings
from megaseg.parallel.initialize import ParallelContext

# (actor, left-padded prompts, settings, parallel context, generator) -> right-padded prompt + response batch
RolloutFn = Callable[[torch.nn.Module, PromptBatch, SamplingSettings, ParallelContext, Optional[torch.Generator]],
                    SequenceBatch]


def megatron_rollout(backend: str, pad_token_id: int) -> RolloutFn:
    """megaseg.generation.generate with the run's backend (kv_cache / full_forward) and pad id."""

    def rollout(model: torch.nn.Module, prompts: PromptBatch, settings: SamplingSettings, parallel_ctx: ParallelContext,
                generator: Optional[torch.Generator]) -> SequenceBatch:
        from megaseg.generation import generate

        return generate(model, prompts, settings, parallel_ctx, pad_token_id=pad_token_id, generator=generator,
                        backend=backend).sequences

    return rollout


def rollout_generator(seed: int, step: int, dp_rank: int, device: torch.device) -> torch.Generator:
    """The sampling generator of PPO step ``step`` on data-parallel rank ``dp_rank``."""
    return torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(step) * 7_919 + int(dp_rank) + 1)


def concat_sequence_batches(batches: Sequence[SequenceBatch], pad_token_id: int) -> SequenceBatch:
    """Rows of every batch in order, right-padded to the widest (the masks padded with False, positions with 0)."""
    width = max(batch.seq_length for batch in batches)

    def padded(tensor: torch.Tensor, value: Any) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)

    return SequenceBatch(
        input_ids=torch.cat([padded(b.input_ids, pad_token_id) for b in batches]),
        attention_mask=torch.cat([padded(b.attention_mask, False) for b in batches]),
        response_mask=torch.cat([padded(b.response_mask, False) for b in batches]),
        eos_mask=torch.cat([padded(b.eos_mask, False) for b in batches]),
        position_ids=torch.cat([padded(b.position_ids, 0) for b in batches]))


def generate_rollouts(rollout_fn: RolloutFn, model: torch.nn.Module, prompts: Sequence[TokenizedPrompt],
                      settings: SamplingSettings, parallel_ctx: ParallelContext, *, generator: Optional[torch.Generator],
                      micro_batch_size: int, pad_token_id: int) -> SequenceBatch:
    """Responses to ``prompts`` (this rank's), ``micro_batch_size`` prompts per sampler call, in prompt order."""
    pieces = []
    for start in range(0, len(prompts), micro_batch_size):
        batch = collate_prompts(prompts[start:start + micro_batch_size], pad_token_id)
        pieces.append(rollout_fn(model, batch, settings, parallel_ctx, generator).to(parallel_ctx.device))
    return concat_sequence_batches(pieces, pad_token_id)
