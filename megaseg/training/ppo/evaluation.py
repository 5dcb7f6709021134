"""Held-out evaluation of the policy during PPO: responses to fixed eval prompts, scored by the reward model.

Reports, as means over the eval prompts of all data-parallel ranks: the raw reward-model score e(x, y) (the
aggregation of the segment rewards, or the sequence reward of a bandit-style run), the sum of the normalized rewards
per response, KL(pi || pi_ref) summed over the response (k1 on the generated tokens), the response length and the
fraction of responses that ended with a stop token. Greedy decoding by default, so the trend is not sampling noise.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megaseg.generation.rollout import generate_rollouts, rollout_generator
from megaseg.parallel.collectives import sum_over_data_parallel
from megaseg.training.ppo.experience import policy_log_probs_and_entropy
from megaseg.training.ppo.reward_shaping import cut_segments, normalize_rewards, score_segments

if TYPE_CHECKING:
    from megaseg.training.ppo.trainer import PPOTrainer

EVAL_STATS = ("num_responses", "rm_score_sum", "normalized_reward_sum", "kl_sum", "length_sum", "num_stopped")
# Keeps evaluation sampling (eval_greedy=false) off the rollout generators' streams.
EVAL_SEED_OFFSET = 7_777


def eval_prompts_of_rank(run: "PPOTrainer") -> list:
    """This rank's share of the eval prompts: a multiple of dp_size of them, dealt round-robin."""
    ctx = run.ctx
    usable = len(run.eval_prompts) - len(run.eval_prompts) % ctx.dp_size
    if usable == 0:
        raise ValueError(f"{len(run.eval_prompts)} eval prompts for {ctx.dp_size} data-parallel ranks; give at least "
                         "one per rank (data.eval_prompt_path, ppo.eval_max_prompts)")
    return list(run.eval_prompts[:usable][ctx.dp_rank::ctx.dp_size])


@torch.no_grad()
def evaluate_policy(run: "PPOTrainer", step: int) -> dict[str, float]:
    """Collective over every rank. ``step``: the PPO steps done (seeds the sampler when not greedy)."""
    ctx, ppo, sources = run.ctx, run.config.ppo, run.sources
    prompts = eval_prompts_of_rank(run)
    generator = rollout_generator(run.config.seed + EVAL_SEED_OFFSET, step, ctx.dp_rank, ctx.device)
    rollout = generate_rollouts(run.rollout_fn, run.actor.model, prompts, run.sampling_settings(ppo.eval_greedy),
                                ctx, generator=generator, micro_batch_size=ppo.micro_rollout_batch_size,
                                pad_token_id=run.pad_token_id)
    micro = ppo.micro_rollout_batch_size
    chunk = run.config.segmentation.entropy_chunk_size
    packing = run.config.data.packing
    actor = policy_log_probs_and_entropy(sources.actor, rollout, ctx, micro_batch_size=micro, chunk_size=chunk,
                                         packing=packing)
    reference = policy_log_probs_and_entropy(sources.reference, rollout, ctx, micro_batch_size=micro,
                                             chunk_size=chunk, packing=packing)
    actions = rollout.response_mask
    kl = torch.where(actions, actor.log_probs - reference.log_probs, 0.0).sum(dim=1)
    ends = cut_segments(run.reward_plan, rollout, reference.entropy, sources.sentence_marker)
    scored = score_segments(run.reward_plan, sources.scorer, rollout, ends)
    normalized, _ = normalize_rewards(sources.normalizer, scored)
    scores = scored.evaluations
    local = torch.tensor([float(rollout.batch_size), float(scores.double().sum()), float(normalized.double().sum()),
                          float(kl.double().sum()), float(actions.sum()), float(rollout.eos_mask.any(dim=1).sum())],
                         dtype=torch.float64)
    total = sum_over_data_parallel(local, ctx)
    s = dict(zip(EVAL_STATS, total.tolist()))
    n = max(s["num_responses"], 1.0)
    return {"rm_score": s["rm_score_sum"] / n, "normalized_reward_per_response": s["normalized_reward_sum"] / n,
            "kl": s["kl_sum"] / n, "response_length": s["length_sum"] / n, "stopped_fraction": s["num_stopped"] / n}

