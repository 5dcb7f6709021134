"""The reward phases of the experience maker: segment -> score -> normalize -> interpolate -> clamp -> KL penalty ->
GAE -> whitening. One function per phase; the math itself is megaseg.algorithms'. Segments are cut on the padded
``[B, S]`` rollout (one rule per mode); every later phase runs on the unpadded response tokens
(megaseg.algorithms.unpadded: ``[slots]`` per token, ``[K]`` per segment), and the experience maker pads the results
back once for the update and the logs.

Conventions (docs/method.md, PPO section): only response tokens are actions; tokens after EOS
are padding and get nothing; in segment/token/sentence/n-gram modes EOS is in no segment, so it gets only the KL
term; a sequence-level reward (bandit, segment-as-bandit) sits on the last response token (EOS, or the last token of
a truncated response).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from megaseg.algorithms.aggregation import AGGREGATIONS
from megaseg.algorithms.normalizer import Normalizer
from megaseg.algorithms.ppo import kl_penalty, masked_moments, masked_whiten
from megaseg.algorithms.segmentation import segment_ends
from megaseg.algorithms.unpadded import UnpaddedResponses, UnpaddedSegments, gae, normalize
from megaseg.algorithms.validation import check_choice
from megaseg.data.batch import SequenceBatch
from megaseg.kernels.dispatch import use_triton
from megaseg.parallel.collectives import sum_over_data_parallel
from megaseg.parallel.initialize import ParallelContext
from megaseg.training.ppo.reward_plan import RewardPlan


class SegmentScorer(Protocol):
    """What scores segments: a trained reward model (``RewardModelScorer``) or, in tests, a hand-written reward.

    Returns ``[B, S]``: at every segment end j (``segment_ends[b, j]``) the reward of the segment ending there; other
    entries are ignored.
    """

    def __call__(self, sequences: SequenceBatch, segment_ends: torch.Tensor) -> torch.Tensor: ...


class SentenceMarker(Protocol):
    """``[B, S]`` bool: response tokens whose text ends a sentence (sentence granularity only)."""

    def __call__(self, sequences: SequenceBatch) -> torch.Tensor: ...


def cut_segments(plan: RewardPlan, sequences: SequenceBatch, entropy: Optional[torch.Tensor],
                 sentence_marker: Optional[SentenceMarker] = None) -> torch.Tensor:
    """``[B, S]`` bool segment ends of the rollouts under ``plan.segmentation`` (entropy from the reference model)."""
    seg = plan.segmentation
    marks = None
    if seg.mode == "sentence":
        if sentence_marker is None:
            raise ValueError("segmentation.mode='sentence' needs the tokenizer's token texts; build the run with a "
                             "sentence marker (train_ppo does this from model.tokenizer)")
        marks = sentence_marker(sequences)
    return segment_ends(seg.mode, sequences.response_mask, sequences.eos_mask, entropy=entropy,
                        cutoff=seg.entropy_cutoff if seg.mode == "entropy" else None,
                        n=seg.ngram_size if seg.mode == "ngram" else None, token_texts=marks)


@dataclass(frozen=True, eq=False)
class ScoredSegments:
    """The reward model's output on a rollout batch, on unpadded response tokens (megaseg.algorithms.unpadded).

    ``reward_segments`` are where the rewards sit: the segments themselves for per-segment granularities, one segment
    per response ending on its last token for sequence-level ones; ``raw`` ``[K]`` is the reward of each, response by
    response; ``evaluations`` ``[B]`` is e(x, y) of each response (``plan.aggregation`` of its segment rewards).
    """

    responses: UnpaddedResponses
    segment_ends: torch.Tensor          # [B, S] bool, the segments the reward model scored
    reward_segments: UnpaddedSegments
    raw: torch.Tensor                   # [K] fp32
    evaluations: torch.Tensor           # [B] fp32

    def padded(self, per_segment: torch.Tensor) -> torch.Tensor:
        """``[B, S]``: ``per_segment`` ``[K]`` at the reward positions, 0 elsewhere."""
        slots = per_segment.new_zeros(self.responses.num_slots).index_copy_(0, self.reward_segments.end_at,
                                                                             per_segment)
        return self.responses.pad(slots)

    @property
    def reward_ends(self) -> torch.Tensor:
        """``[B, S]`` bool: where the rewards sit."""
        ends = torch.zeros(self.responses.num_slots, dtype=torch.bool, device=self.raw.device)
        return self.responses.pad(ends.index_fill_(0, self.reward_segments.end_at, True))


def evaluate_responses(segment_rewards: torch.Tensor, segments: UnpaddedSegments, how: str) -> torch.Tensor:
    """``[B]`` e(x, y): the aggregation ``how`` (megaseg.algorithms.aggregation's names) of each response's segment
    rewards ``[K]``."""
    check_choice("aggregation", how, AGGREGATIONS)
    if how == "last":
        return segment_rewards.index_select(0, segments.num_segments.cumsum(0) - 1)
    return torch.segment_reduce(segment_rewards, how, lengths=segments.num_segments)


def score_segments(plan: RewardPlan, scorer: SegmentScorer, sequences: SequenceBatch,
                   segment_ends_mask: torch.Tensor) -> ScoredSegments:
    """The reward model at the segment ends ``[B, S]``: per-segment granularities keep each segment's reward;
    sequence-level ones put e(x, y) (for bandit the single segment's reward itself) on the last response token."""
    responses = UnpaddedResponses.from_masks(sequences.response_mask, sequences.eos_mask)
    segments = UnpaddedSegments.from_ends(responses.unpad(segment_ends_mask), responses)
    per_segment = segments.at_ends(scorer(sequences, segment_ends_mask).float())
    evaluations = evaluate_responses(per_segment, segments, plan.aggregation)
    if not plan.sequence_level:
        return ScoredSegments(responses, segment_ends_mask, segments, per_segment, evaluations)
    last = torch.zeros(responses.num_slots, dtype=torch.bool, device=per_segment.device)
    one_per_response = UnpaddedSegments.from_ends(last.index_fill_(0, responses.last, True), responses)
    return ScoredSegments(responses, segment_ends_mask, one_per_response, evaluations, evaluations)


def normalize_rewards(normalizer: Normalizer, scored: ScoredSegments) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalized rewards ``[K]``, locations p ``[K]``): p = (t + 1) / T at segment t of T (a sequence-level reward
    is one segment: p = 1)."""
    segments = scored.reward_segments
    return normalize(normalizer, scored.raw, segments), segments.positions()


def interpolate_rewards(normalized: torch.Tensor, scored: ScoredSegments, mode: str, clip: float) -> torch.Tensor:
    """``[slots]`` per-token rewards: the segment rewards spread by ``mode`` (even / repeat / none), then clamped to
    [-clip, clip]. Tokens in no segment (EOS in segment modes, the pad slots) get 0."""
    return scored.reward_segments.token_rewards(normalized, mode).clamp_(-clip, clip)


def kl_penalized_rewards(token_level: torch.Tensor, log_probs: torch.Tensor, ref_log_probs: torch.Tensor,
                         responses: UnpaddedResponses, kl_coef: float, estimator: str
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards ``[slots]`` = token rewards - kl_coef * KL, KL ``[slots]``) from the ``[B, S]`` log-probs of the
    actions; 0 in the pad slots."""
    kl = kl_penalty(responses.unpad(log_probs), responses.unpad(ref_log_probs), estimator).mul_(responses.real_float)
    return token_level - kl_coef * kl, kl


@dataclass(frozen=True, eq=False)
class ShapedRewards:
    """What reward shaping gives the advantages and the logs."""

    normalized: torch.Tensor     # [K] the normalizer's output per reward segment
    positions: torch.Tensor      # [K] location p of each
    token_rewards: torch.Tensor  # [slots] after interpolation and the clamp
    kl: torch.Tensor             # [slots] KL estimate on the actions
    rewards: torch.Tensor        # [slots] token_rewards - kl_coef * kl: what GAE consumes


def shape_rewards(normalizer: Normalizer, scored: ScoredSegments, log_probs: torch.Tensor,
                  ref_log_probs: torch.Tensor, *, interpolation: str, clip: float, kl_coef: float,
                  estimator: str) -> ShapedRewards:
    """normalize -> interpolate -> clamp -> KL penalty: the three functions above, or the same math in one fused
    Triton kernel where ``megaseg.kernels.dispatch`` selects the kernels (``kernels: auto`` on CUDA). Either way
    the results are the same (tests/training/ppo/test_experience_phases.py runs both)."""
    positions = scored.reward_segments.positions()
    if use_triton(scored.raw):
        from megaseg.kernels.reward_shaping import shape_token_rewards

        fused = shape_token_rewards(normalizer, scored.padded(scored.raw), scored.reward_ends,
                                    scored.responses.pad(scored.responses.real), log_probs, ref_log_probs,
                                    mode=interpolation, clip=clip, kl_coef=kl_coef, estimator=estimator)
        unpad = scored.responses.unpad
        normalized = unpad(fused.normalized).index_select(0, scored.reward_segments.end_at)
        return ShapedRewards(normalized, positions, unpad(fused.token_rewards), unpad(fused.kl), unpad(fused.rewards))
    normalized = normalize(normalizer, scored.raw, scored.reward_segments)
    token_level = interpolate_rewards(normalized, scored, interpolation, clip)
    rewards, kl = kl_penalized_rewards(token_level, log_probs, ref_log_probs, scored.responses, kl_coef, estimator)
    return ShapedRewards(normalized, positions, token_level, kl, rewards)


def compute_advantages(rewards: torch.Tensor, values: torch.Tensor, responses: UnpaddedResponses, *, gamma: float,
                       lam: float, whiten: bool, parallel_ctx: Optional[ParallelContext]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) ``[slots]`` by GAE over each response (``values`` ``[B, S]``); the advantages whitened
    with the mean/std of the whole rollout batch (every data-parallel rank) when ``whiten``. Returns are not whitened
    (the critic's target)."""
    advantages, returns = gae(rewards, responses.unpad(values), responses, gamma, lam)
    if whiten:
        moments = masked_moments(advantages, responses.real)
        if parallel_ctx is not None:
            moments = sum_over_data_parallel(moments, parallel_ctx)
        advantages = masked_whiten(advantages, responses.real, moments=moments)
    return advantages, returns
