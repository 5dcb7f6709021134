"""The experience maker: one rollout batch -> everything the PPO update needs, one named phase at a time.

    actor_forward      log-probs of the sampled tokens under the rollout policy (+ its entropy, for logging)
    reference_forward  reference log-probs AND entropies, from one forward of the frozen SFT model
    critic_forward     V(state before each token)
    segmentation       segment ends (entropy rule or the baseline's)
    score_segments     reward-model head at the ends
    shape_rewards      location-aware normalizer (or the ablation's / the bandit scalar), even / repeat / none
                       interpolation, clamp to [-reward_clip, reward_clip], minus kl_coef * KL per token (one fused
                       Triton kernel when megaseg.kernels selects it)
    advantages         GAE (gamma, lambda), whitening over all data-parallel ranks

The reward phases run on the unpadded response tokens (megaseg.training.ppo.reward_shaping); what the Experience
keeps is padded back once. Every tensor of it is ``[B, S]`` in token positions (megaseg.models.inference gives the alignment: log-probs at j are of
token j, entropies at j predict token j + 1, values at j are V(state before token j)), the same on every rank of a
model-parallel group: the forwards run through the one frozen-model runner, whose last stage broadcasts its outputs
to the earlier stages, so the reward phases run the same tensor code everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megaseg.algorithms.normalizer import Normalizer
from megaseg.config.policy import PPOConfig
from megaseg.data.batch import SequenceBatch
from megaseg.models.inference import infer_batch, log_probs_and_entropy, shift_right, tensor_parallel_group
from megaseg.parallel.initialize import ParallelContext
from megaseg.training.common.metrics import PhaseTimer
from megaseg.training.ppo.reward_plan import RewardPlan
from megaseg.training.ppo.reward_shaping import (
    SegmentScorer,
    SentenceMarker,
    compute_advantages,
    cut_segments,
    score_segments,
    shape_rewards,
)


@dataclass(frozen=True)
class PolicyOutputs:
    log_probs: torch.Tensor  # [B, S] fp32, token-aligned (column 0 is 0)
    entropy: torch.Tensor    # [B, S] fp32, position-aligned (H of the distribution predicting token j + 1)


@torch.no_grad()
def policy_log_probs_and_entropy(model: torch.nn.Module, sequences: SequenceBatch, parallel_ctx: ParallelContext, *,
                                 micro_batch_size: int, chunk_size: Optional[int] = None,
                                 packing: bool = False) -> PolicyOutputs:
    """Log-probs of the rollout's tokens and the entropies of a causal LM (actor or reference), in ONE forward."""
    tp_group = tensor_parallel_group(parallel_ctx)
    log_probs, entropy = infer_batch(
        model, sequences, parallel_ctx, micro_batch_size=micro_batch_size, num_outputs=2, packing=packing,
        output_fn=lambda logits, batch: log_probs_and_entropy(logits, batch.input_ids, tp_group, chunk_size))
    return PolicyOutputs(log_probs=log_probs, entropy=entropy)


@torch.no_grad()
def critic_values(critic: torch.nn.Module, sequences: SequenceBatch, parallel_ctx: ParallelContext, *,
                  micro_batch_size: int, packing: bool = False) -> torch.Tensor:
    """``[B, S]`` V(state before token j), token-aligned."""
    (values,) = infer_batch(critic, sequences, parallel_ctx, micro_batch_size=micro_batch_size, num_outputs=1,
                            packing=packing,
                            output_fn=lambda head, batch: (shift_right(head.float()),))
    return values


class RewardModelScorer:
    """The trained segment reward model behind the ``SegmentScorer`` interface of the experience maker: the head
    runs at every position, the caller reads the segment ends (the model needs no segmentation)."""

    def __init__(self, model: torch.nn.Module, parallel_ctx: ParallelContext, micro_batch_size: int,
                 packing: bool = False):
        self.model, self.parallel_ctx, self.micro_batch_size = model, parallel_ctx, micro_batch_size
        self.packing = packing

    @torch.no_grad()
    def __call__(self, sequences: SequenceBatch, segment_ends: torch.Tensor) -> torch.Tensor:
        (values,) = infer_batch(self.model, sequences, self.parallel_ctx, micro_batch_size=self.micro_batch_size,
                                num_outputs=1, output_fn=lambda head, batch: (head.float(),), packing=self.packing)
        return values


@dataclass(frozen=True)
class ExperienceSources:
    """The models and reward parts the experience maker reads (none of them is trained here)."""

    actor: torch.nn.Module            # the policy being trained (its rollout weights)
    reference: torch.nn.Module        # frozen SFT model: KL reference and segmentation entropies
    critic: torch.nn.Module
    scorer: SegmentScorer             # the reward model (or a hand-written reward in tests)
    normalizer: Normalizer
    sentence_marker: Optional[SentenceMarker] = None


@dataclass(frozen=True)
class Experience:
    sequences: SequenceBatch            # [B, S] prompt + response, right-padded
    action_mask: torch.Tensor           # [B, S] bool, the response tokens (EOS included): PPO's actions
    log_probs: torch.Tensor             # [B, S] fp32 log pi_old(token j | < j)
    ref_log_probs: torch.Tensor         # [B, S] fp32 log pi_ref(token j | < j)
    action_entropy: torch.Tensor        # [B, S] fp32 entropy of the rollout policy where it chose token j
    ref_entropy: torch.Tensor           # [B, S] fp32 reference entropy at j (predicting j + 1): the segmentation rule
    values: torch.Tensor                # [B, S] fp32 V(state before token j)
    segment_ends: torch.Tensor          # [B, S] bool, the segments the reward model scored
    reward_ends: torch.Tensor           # [B, S] bool, where rewards sit (segment ends, or the last token)
    positions: torch.Tensor             # [B, S] fp32 location p at reward_ends
    raw_rewards: torch.Tensor           # [B, S] fp32 reward-model output at reward_ends
    normalized_rewards: torch.Tensor    # [B, S] fp32 after the normalizer, at reward_ends
    token_rewards: torch.Tensor         # [B, S] fp32 after interpolation and clamp
    kl: torch.Tensor                    # [B, S] fp32 per-token KL estimate on actions
    rewards: torch.Tensor               # [B, S] fp32 token_rewards - kl_coef * kl (what GAE consumes)
    advantages: torch.Tensor            # [B, S] fp32 (whitened)
    returns: torch.Tensor               # [B, S] fp32 critic targets

    @property
    def batch_size(self) -> int:
        return self.sequences.batch_size


def make_experience(rollout: SequenceBatch, sources: ExperienceSources, plan: RewardPlan, ppo: PPOConfig,
                    kl_coef: float, parallel_ctx: ParallelContext, timer: PhaseTimer,
                    entropy_chunk_size: Optional[int] = None, packing: bool = False) -> Experience:
    """Run the phases of the module docstring on one rank's rollouts (collective over the model-parallel group, and
    over the data-parallel group for whitening)."""
    micro = ppo.micro_rollout_batch_size
    action_mask = rollout.response_mask
    with timer.phase("actor_forward"):
        actor = policy_log_probs_and_entropy(sources.actor, rollout, parallel_ctx, micro_batch_size=micro,
                                             chunk_size=entropy_chunk_size, packing=packing)
    with timer.phase("reference_forward"):
        reference = policy_log_probs_and_entropy(sources.reference, rollout, parallel_ctx, micro_batch_size=micro,
                                                 chunk_size=entropy_chunk_size, packing=packing)
    with timer.phase("critic_forward"):
        values = critic_values(sources.critic, rollout, parallel_ctx, micro_batch_size=micro, packing=packing)
    # Two phases: the segmentation is reward machinery (cheap tensor work), scoring is a reward-model forward.
    with timer.phase("segmentation"):
        ends = cut_segments(plan, rollout, reference.entropy, sources.sentence_marker)
    with timer.phase("score_segments"):
        scored = score_segments(plan, sources.scorer, rollout, ends)
    with timer.phase("shape_rewards"):
        shaped = shape_rewards(sources.normalizer, scored, actor.log_probs, reference.log_probs,
                               interpolation=plan.interpolation, clip=ppo.reward_clip, kl_coef=kl_coef,
                               estimator=ppo.kl_estimator)
    with timer.phase("advantages"):
        advantages, returns = compute_advantages(shaped.rewards, values, scored.responses, gamma=ppo.gamma,
                                                 lam=ppo.lam, whiten=ppo.whiten_advantages, parallel_ctx=parallel_ctx)
    pad = scored.responses.pad
    zero = torch.zeros((), dtype=values.dtype)
    return Experience(
        sequences=rollout, action_mask=action_mask,
        log_probs=torch.where(action_mask, actor.log_probs, zero),
        ref_log_probs=torch.where(action_mask, reference.log_probs, zero),
        action_entropy=torch.where(action_mask, shift_right(actor.entropy), zero),
        ref_entropy=reference.entropy, values=torch.where(action_mask, values, zero), segment_ends=ends,
        reward_ends=scored.reward_ends, positions=scored.padded(shaped.positions),
        raw_rewards=scored.padded(scored.raw), normalized_rewards=scored.padded(shaped.normalized),
        token_rewards=pad(shaped.token_rewards), kl=pad(shaped.kl), rewards=pad(shaped.rewards),
        advantages=pad(advantages), returns=pad(returns))
