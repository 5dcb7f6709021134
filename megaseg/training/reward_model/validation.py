"""Periodic validation inside `train-rm`: pair accuracy, loss, rewards and segment statistics on the eval split.

Runs the live (DDP-wrapped) model forward-only through the one frozen-model runner (megaseg.models.inference):
eval pairs are dealt round-robin over the data-parallel ranks, sequences go in length-sorted micro-batches, and the
summed statistics are reduced once at the end. For scoring a saved reward model on any file use `megaseg eval-rm`
(megaseg.scoring.evaluate), which loads the checkpoint instead.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from megaseg.algorithms.aggregation import aggregate_segment_rewards
from megaseg.models.inference import infer_sequences
from megaseg.parallel.collectives import sum_over_replicas
from megaseg.parallel.initialize import ParallelContext
from megaseg.segmentation.cache import ends_mask_from_positions
from megaseg.training.reward_model.data import SegmentedPair
from megaseg.training.reward_model.loss import STAT_NAMES, PairMetrics, pair_statistics


def _row_scores_fn(row_ends: Sequence[tuple[int, ...]], aggregation: str):
    def rows(values: torch.Tensor, micro_batch) -> list[float]:
        ends = ends_mask_from_positions([row_ends[row] for row in micro_batch.rows], values.shape[1])
        return aggregate_segment_rewards(values.detach().float(), ends, aggregation).tolist()

    return rows


def _statistics(pairs: Sequence[SegmentedPair], chosen: Sequence[float], rejected: Sequence[float]) -> torch.Tensor:
    ends = [ends for item in pairs for ends in (item.chosen_ends, item.rejected_ends)]
    prompts = [len(item.pair.chosen.prompt_ids) for item in pairs for _ in range(2)]
    # Segments tile a response from its first token to its last end.
    covered = sum(e[-1] + 1 - start for e, start in zip(ends, prompts))
    return pair_statistics(torch.tensor(chosen), torch.tensor(rejected), num_segments=sum(len(e) for e in ends),
                           num_segment_tokens=covered, num_tokens=sum(item.num_tokens for item in pairs))


@torch.no_grad()
def validate(model: torch.nn.Module, pairs: Sequence[SegmentedPair], *, micro_batch_size: int, aggregation: str,
             parallel_ctx: ParallelContext, packing: bool = False, prefix_features: Any = None) -> PairMetrics:
    """Metrics over all of `pairs` (every rank passes the same list; each scores its data-parallel share);
    ``prefix_features`` (megaseg.training.reward_model.frozen_prefix): run the top layers from them (unpacked)."""
    shard = list(pairs[parallel_ctx.dp_rank::parallel_ctx.dp_size])
    sequences = [item.pair.chosen for item in shard] + [item.pair.rejected for item in shard]
    row_ends = [item.chosen_ends for item in shard] + [item.rejected_ends for item in shard]
    was_training = model.training
    model.eval()
    try:
        if prefix_features is not None:
            scores = prefix_features.infer_sequences(model, sequences, micro_batch_size=micro_batch_size,
                                                     output_fn=_row_scores_fn(row_ends, aggregation),
                                                     is_last_stage=parallel_ctx.is_last_pipeline_stage)
        else:
            scores = infer_sequences(model, sequences, micro_batch_size=micro_batch_size,
                                     output_fn=_row_scores_fn(row_ends, aggregation),
                                     is_last_stage=parallel_ctx.is_last_pipeline_stage, packing=packing)
    finally:
        model.train(was_training)
    local = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
    if scores is not None and shard:  # the last pipeline stage holds the scores
        local = _statistics(shard, scores[:len(shard)], scores[len(shard):])
    return PairMetrics.from_statistics(sum_over_replicas(local, parallel_ctx))
