"""The segment Bradley-Terry loss of one micro-batch, and the pair statistics a step or an evaluation reports.

Loss (paper Eq. 3-4): e(x, y) = aggregate of the head outputs at the segment ends (rm.aggregation, mean by default),
loss = -mean over pairs of log sigmoid(e(x, y_chosen) - e(x, y_rejected)).

Statistics are kept as SUMS in one float64 vector, so that micro-batches, data-parallel ranks and pipeline stages
combine by addition (one all-reduce) and every mean is taken once, over the whole global batch, at the end.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megaseg.algorithms.aggregation import aggregate_segment_rewards, bradley_terry_loss
from megaseg.algorithms.segments import num_segments
from megaseg.training.reward_model.batches import RewardMicroBatch

# Order of the entries in a statistics vector.
STAT_NAMES = ("loss_sum", "num_pairs", "num_correct", "chosen_reward_sum", "rejected_reward_sum",
              "num_segments", "num_segment_tokens", "num_responses", "num_tokens")


def pair_scores(values: torch.Tensor, batch: RewardMicroBatch, aggregation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """values [2P, S] head outputs -> (chosen [P], rejected [P]) sequence evaluations e(x, y), in float32."""
    scores = aggregate_segment_rewards(values.float(), batch.segment_ends, aggregation)
    return scores[:batch.num_pairs], scores[batch.num_pairs:]


def pair_statistics(chosen: torch.Tensor, rejected: torch.Tensor, *, num_segments: float, num_segment_tokens: float,
                    num_tokens: float) -> torch.Tensor:
    """[len(STAT_NAMES)] float64 sums over pairs with sequence rewards ``chosen`` / ``rejected`` [P] (no gradient);
    the counts are over both answers of every pair."""
    with torch.no_grad():
        chosen, rejected = chosen.detach().double().cpu(), rejected.detach().double().cpu()
        named = {"loss_sum": -torch.nn.functional.logsigmoid(chosen - rejected).sum(),
                 "num_pairs": float(chosen.numel()), "num_correct": (chosen > rejected).double().sum(),
                 "chosen_reward_sum": chosen.sum(), "rejected_reward_sum": rejected.sum(),
                 "num_segments": num_segments, "num_segment_tokens": num_segment_tokens,
                 "num_responses": 2.0 * chosen.numel(), "num_tokens": num_tokens}
        return torch.tensor([float(named[name]) for name in STAT_NAMES], dtype=torch.float64)


def batch_statistics(chosen: torch.Tensor, rejected: torch.Tensor, batch: RewardMicroBatch) -> torch.Tensor:
    """``pair_statistics`` of one micro-batch."""
    # Tokens inside segments (EOS outside the last segment in entropy/token modes is not counted).
    covered = batch.response_mask & (batch.segment_ends.long().flip(1).cumsum(1).flip(1) > 0)
    return pair_statistics(chosen, rejected, num_segments=float(num_segments(batch.segment_ends).sum()),
                           num_segment_tokens=float(covered.sum()), num_tokens=float(batch.num_tokens))


def segment_preference_loss(values: torch.Tensor, batch: RewardMicroBatch,
                            aggregation: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, {"stats": vector}) for megatron's pipeline schedule (which divides the loss by the number of
    micro-batches, in place: the statistics are computed from separate tensors)."""
    chosen, rejected = pair_scores(values, batch, aggregation)
    loss = bradley_terry_loss(chosen, rejected)
    return loss, {"stats": batch_statistics(chosen, rejected, batch)}


def zero_statistics() -> torch.Tensor:
    return torch.zeros(len(STAT_NAMES), dtype=torch.float64)


@dataclass(frozen=True)
class PairMetrics:
    """Means over the pairs of a step (or an evaluation), from summed statistics."""

    loss: float
    accuracy: float
    chosen_reward: float
    rejected_reward: float
    segments_per_response: float
    mean_segment_length: float
    num_pairs: int
    num_tokens: int

    @classmethod
    def from_statistics(cls, stats: torch.Tensor) -> "PairMetrics":
        named = dict(zip(STAT_NAMES, stats.tolist()))
        pairs = max(named["num_pairs"], 1.0)
        return cls(
            loss=named["loss_sum"] / pairs,
            accuracy=named["num_correct"] / pairs,
            chosen_reward=named["chosen_reward_sum"] / pairs,
            rejected_reward=named["rejected_reward_sum"] / pairs,
            segments_per_response=named["num_segments"] / max(named["num_responses"], 1.0),
            mean_segment_length=named["num_segment_tokens"] / max(named["num_segments"], 1.0),
            num_pairs=round(named["num_pairs"]),
            num_tokens=round(named["num_tokens"]),
        )

    def as_scalars(self) -> dict[str, float]:
        """What the run logger records (names without a prefix)."""
        return {"loss": self.loss, "acc": self.accuracy, "chosen_reward": self.chosen_reward,
                "rejected_reward": self.rejected_reward, "segments_per_response": self.segments_per_response,
                "mean_segment_length": self.mean_segment_length}
