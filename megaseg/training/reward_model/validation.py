"""Periodic validation inside `train-rm`: pair accuracy, loss, rewards and segment statistics on the eval split.

Runs the live (DDP-wrapped) model forward-only: eval pairs are dealt round-robin over the data-parallel ranks, each
micro-batch is its own pipeline pass (padded only to its own longest pair, since eval lengths vary a lot), and the
summed statistics are all-reduced once at the end. For scoring a saved reward model on any file use
`megaseg eval-rm` (megaseg.scoring.evaluate), which loads the checkpoint instead.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from megaseg.models.pipeline import forward_only
from megaseg.training.reward_model.batches import SegmentedPair, collate_step
from megaseg.training.reward_model.loss import PairMetrics, all_reduce_statistics, pair_scores, pair_statistics, zero_statistics


def _micro_batch_statistics(values: torch.Tensor, batch, aggregation: str) -> torch.Tensor:
    chosen, rejected = pair_scores(values, batch, aggregation)
    return pair_statistics(chosen, rejected, batch)


@torch.no_grad()
def validate(model: torch.nn.Module, pairs: Sequence[SegmentedPair], *, micro_batch_size: int, pad_id: int,
             aggregation: str, parallel_ctx) -> PairMetrics:
    """Metrics over all of `pairs` (every rank passes the same list; each scores its data-parallel share)."""
    shard = list(pairs[parallel_ctx.dp_rank::parallel_ctx.dp_size])
    # Sorting by length keeps similar lengths in one micro-batch (less padding); the order does not change sums.
    shard.sort(key=lambda item: item.num_tokens)
    local = zero_statistics()
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(shard), micro_batch_size):
            chunk = shard[start:start + micro_batch_size]
            (batch,) = collate_step(chunk, len(chunk), pad_id)
            outputs = forward_only(model, [batch], partial(_micro_batch_statistics, aggregation=aggregation))
            for stats in outputs:  # empty except on the last pipeline stage
                local += stats
    finally:
        model.train(was_training)
    total = all_reduce_statistics(local, num_duplicates=parallel_ctx.tp_size * parallel_ctx.cp_size)
    return PairMetrics.from_statistics(total)
