"""The reward phases of the experience maker, on ``[B, S]`` tensors: segment -> score -> normalize -> interpolate ->
clamp -> KL penalty -> GAE -> whitening. One function per phase; the math itself is megaseg.algorithms'.

Conventions (docs/method.md, PPO section): only response tokens are actions; tokens after EOS
are padding and get nothing; in segment/token/sentence/n-gram modes EOS is in no segment, so it gets only the KL
term; a sequence-level reward (bandit, segment-as-bandit) sits on the last response token (EOS, or the last token of
a truncated response).
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist

from megaseg.algorithms.aggregation import aggregate_segment_rewards
from megaseg.algorithms.interpolation import token_rewards
from megaseg.algorithms.normalizer import Normalizer
from megaseg.algorithms.ppo import gae, kl_penalty, masked_moments, masked_whiten
from megaseg.algorithms.segmentation import last_response_token, segment_ends, segment_positions
from megaseg.data.batch import SequenceBatch
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


def score_segments(plan: RewardPlan, scorer: SegmentScorer, sequences: SequenceBatch,
                   segment_ends_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reward_ends ``[B, S]`` bool, raw rewards ``[B, S]`` fp32 at reward_ends, 0 elsewhere).

    Per-segment granularities: the scorer's value at each segment end. Sequence-level: e(x, y), the aggregation of
    the segment rewards (for bandit the single segment's reward itself), on the last response token.
    """
    values = scorer(sequences, segment_ends_mask).float()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    if not plan.sequence_level:
        return segment_ends_mask, torch.where(segment_ends_mask, values, zero)
    sequence_reward = aggregate_segment_rewards(values, segment_ends_mask, plan.aggregation)  # [B]
    last = last_response_token(sequences.response_mask)
    return last, torch.where(last, sequence_reward[:, None], zero)


def normalize_rewards(normalizer: Normalizer, raw_rewards: torch.Tensor, reward_ends: torch.Tensor,
                      response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalized rewards at reward_ends ``[B, S]``, locations p ``[B, S]``), 0 elsewhere.

    p = (t + 1) / T at the end of segment t of T (a sequence-level reward is one segment: p = 1).
    """
    positions = segment_positions(reward_ends, response_mask)
    return normalizer(raw_rewards, positions), positions


def interpolate_rewards(normalized: torch.Tensor, reward_ends: torch.Tensor, response_mask: torch.Tensor,
                        mode: str, clip: float) -> torch.Tensor:
    """``[B, S]`` per-token rewards: the segment rewards spread by ``mode`` (even / repeat / none), then clamped to
    [-clip, clip]. Tokens in no segment (prompt, padding, EOS in segment modes) get 0."""
    spread = token_rewards(normalized, reward_ends, response_mask, mode)
    return spread.clamp(-clip, clip)


def kl_penalized_rewards(token_level: torch.Tensor, log_probs: torch.Tensor, ref_log_probs: torch.Tensor,
                         action_mask: torch.Tensor, kl_coef: float, estimator: str
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards ``[B, S]`` = token rewards - kl_coef * KL on actions and 0 elsewhere, KL ``[B, S]`` on actions)."""
    zero = torch.zeros((), dtype=token_level.dtype, device=token_level.device)
    kl = torch.where(action_mask, kl_penalty(log_probs, ref_log_probs, estimator), zero)
    return torch.where(action_mask, token_level - kl_coef * kl, zero), kl


def all_reduced_moments(values: torch.Tensor, mask: torch.Tensor, dp_group: Any) -> torch.Tensor:
    """``masked_moments`` summed over the data-parallel group: statistics of the whole rollout batch."""
    moments = masked_moments(values, mask)
    if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(moments, op=dist.ReduceOp.SUM, group=dp_group)
    return moments


def compute_advantages(rewards: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor, *, gamma: float,
                       lam: float, whiten: bool, dp_group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) ``[B, S]`` by GAE over the actions; the advantages whitened with the mean/std of the
    whole rollout batch (every data-parallel rank) when ``whiten``. Returns are not whitened (the critic's target)."""
    # The actions of a row are its response: one contiguous run, so GAE needs no compaction (same result, half the
    # time); the run is checked on the way in.
    advantages, returns = gae(rewards, values, action_mask, gamma, lam, contiguous=True)
    if whiten:
        advantages = masked_whiten(advantages, action_mask,
                                   moments=all_reduced_moments(advantages, action_mask, dp_group))
    return advantages, returns
