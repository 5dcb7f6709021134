"""Scoring responses with a reward model: segment rewards at segment ends, their locations p, and e(x, y).

``score_pairs(model, pairs, segmented, parallel_ctx, aggregation=..., micro_batch_size=...) -> PairScores`` runs the
reward model (this rank's TP/PP stage) over the chosen and rejected sequence of every pair; pairs are shared out over
data-parallel replicas (pair i to replica i % dp_size) and the results gathered, so every rank gets all pairs.

Per response: the head output at each segment end (the reward of segment a_t is the value at its last token), the
locations p = (t + 1) / T, and e(x, y) = the configured aggregation of the segment rewards (Eq. 4: the mean). The
aggregation and locations come from ``megaseg.algorithms`` on the padded batch, the same code the trainer uses.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from megaseg.algorithms.aggregation import (
    aggregate_segment_rewards,
    padded_segment_positions,
    padded_segment_rewards,
)
from megaseg.data.encoding import TokenizedPair
from megaseg.segmentation.cache import RaggedArray, SegmentedPairs, ends_mask_from_positions
from megaseg.models.inference import infer_sequences
from megaseg.parallel.collectives import merge_dicts_across_ranks
from megaseg.parallel.initialize import ParallelContext
from megaseg.progress import Progress


@dataclass(frozen=True)
class ResponseScores:
    """One side (chosen or rejected) of every pair, in pair order."""

    segment_rewards: RaggedArray  # per response: float64 head output at each segment end, in segment order
    positions: RaggedArray        # per response: float64 p = (t + 1) / T of each segment
    sequence_rewards: np.ndarray  # [P] float64 e(x, y)

    def num_segments(self) -> np.ndarray:
        return self.segment_rewards.lengths()


@dataclass(frozen=True)
class PairScores:
    chosen: ResponseScores
    rejected: ResponseScores
    aggregation: str

    @property
    def num_pairs(self) -> int:
        return len(self.chosen.sequence_rewards)

    def margins(self) -> np.ndarray:
        """[P] e(x, y_chosen) - e(x, y_rejected)."""
        return self.chosen.sequence_rewards - self.rejected.sequence_rewards

    def accuracy(self) -> float:
        """Fraction of pairs with e(chosen) strictly above e(rejected) (a tie counts as wrong)."""
        return float(np.mean(self.margins() > 0))

    def calibration_samples(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, segment rewards), flat over every segment of the chosen AND rejected responses."""
        return (np.concatenate([self.chosen.positions.values, self.rejected.positions.values]),
                np.concatenate([self.chosen.segment_rewards.values, self.rejected.segment_rewards.values]))

    def sequence_rewards(self) -> np.ndarray:
        """[2P] e(x, y) of the chosen then the rejected responses."""
        return np.concatenate([self.chosen.sequence_rewards, self.rejected.sequence_rewards])


def _row_scores_fn(row_ends: Sequence[np.ndarray], aggregation: str):
    def rows(values: torch.Tensor, micro_batch) -> list[tuple[np.ndarray, np.ndarray, float]]:
        ends = ends_mask_from_positions([row_ends[row] for row in micro_batch.rows], values.shape[1])
        stray = ends & ~micro_batch.sequences.response_mask
        if bool(stray.any()):
            raise ValueError("segment ends fall outside the responses; the segmentation was computed for other "
                             "sequences (pass the SegmentedPairs of these very pairs)")
        values = values.detach().float()
        scores = aggregate_segment_rewards(values, ends, aggregation)
        rewards, mask = padded_segment_rewards(values, ends)
        positions, _ = padded_segment_positions(ends)
        return [(rewards[row][mask[row]].double().numpy(), positions[row][mask[row]].double().numpy(),
                 float(scores[row])) for row in range(values.shape[0])]

    return rows


def _side(results: Sequence[tuple[np.ndarray, np.ndarray, float]]) -> ResponseScores:
    return ResponseScores(segment_rewards=RaggedArray.from_arrays([r[0] for r in results], np.float64),
                          positions=RaggedArray.from_arrays([r[1] for r in results], np.float64),
                          sequence_rewards=np.array([r[2] for r in results], dtype=np.float64))


def score_pairs(model: torch.nn.Module, pairs: Sequence[TokenizedPair], segmented: SegmentedPairs,
                parallel_ctx: ParallelContext,
                *, aggregation: str, micro_batch_size: int,
                on_progress: Optional[Callable[[int, int], None]] = None, packing: bool = False,
                prefix_features: Any = None) -> PairScores:
    """Score every pair's chosen and rejected response (see the module docstring). Collective: every rank calls it
    with the same pairs and gets every pair's scores. ``prefix_features``: a PrefixFeatures of ``model``'s frozen
    bottom layers (megaseg.training.reward_model.frozen_prefix, one process): run its top layers only."""
    if segmented.num_pairs != len(pairs):
        raise ValueError(f"the segmentation holds {segmented.num_pairs} pairs but {len(pairs)} pairs were given; "
                         "segment these very pairs (segment_ends_for)")
    mine = list(range(parallel_ctx.dp_rank, len(pairs), parallel_ctx.dp_size))
    sequences = [pairs[i].chosen for i in mine] + [pairs[i].rejected for i in mine]
    row_ends = [segmented.chosen_ends[i] for i in mine] + [segmented.rejected_ends[i] for i in mine]
    progress = Progress("scoring", len(sequences), unit="sequences")
    if prefix_features is not None:  # the top layers from kept hidden states, unpacked rows
        rows = prefix_features.infer_sequences(model, sequences, micro_batch_size=micro_batch_size,
                                               output_fn=_row_scores_fn(row_ends, aggregation),
                                               is_last_stage=parallel_ctx.is_last_pipeline_stage,
                                               on_progress=on_progress or (lambda done, total: progress.update(done)))
    else:
        rows = infer_sequences(model, sequences, micro_batch_size=micro_batch_size,
                               output_fn=_row_scores_fn(row_ends, aggregation),
                               is_last_stage=parallel_ctx.is_last_pipeline_stage,
                               on_progress=on_progress or (lambda done, total: progress.update(done)), packing=packing)
    progress.close()
    # One rank per replica reports (the last stage's tensor-parallel rank 0); the others hold the same values or none.
    reports = rows is not None and parallel_ctx.tp_rank == 0
    local = {pair: (rows[k], rows[len(mine) + k]) for k, pair in enumerate(mine)} if reports else {}
    merged = merge_dicts_across_ranks(local)
    missing = [i for i in range(len(pairs)) if i not in merged]
    assert not missing, f"pairs {missing[:8]} were scored by no rank"
    return PairScores(chosen=_side([merged[i][0] for i in range(len(pairs))]),
                      rejected=_side([merged[i][1] for i in range(len(pairs))]), aggregation=aggregation)
