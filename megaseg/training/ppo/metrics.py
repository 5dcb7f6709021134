"""What a PPO step reports: rollout and reward statistics, losses, throughput per phase, and text samples.

Statistics are summed in one float64 vector per rank and all-reduced over the data-parallel group, so every mean is
over the whole rollout batch. Samples (the generated text cut into the segments that were rewarded, each with its
raw and normalized reward) go to <out>/samples.jsonl.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from megaseg.algorithms.aggregation import aggregate_segment_rewards
from megaseg.algorithms.segments import segment_ids
from megaseg.parallel.collectives import sum_over_data_parallel
from megaseg.parallel.initialize import ParallelContext
from megaseg.training.ppo.experience import Experience
from megaseg.training.ppo.update import UpdateStats
from megaseg.training.ppo.reward_plan import RewardPlan

SAMPLES_FILE_NAME = "samples.jsonl"
EXPERIENCE_STATS = ("num_responses", "num_response_tokens", "num_stopped", "num_segments", "num_segment_tokens",
                    "num_rewards", "raw_reward_sum", "normalized_reward_sum", "rm_score_sum", "kl_sum",
                    "token_reward_sum", "entropy_sum", "value_sum", "return_sum", "num_prompt_tokens")


def rm_scores(experience: Experience, plan: RewardPlan) -> torch.Tensor:
    """``[B]`` raw reward-model score e(x, y) of each rollout (the sequence reward of a bandit-style run)."""
    if plan.sequence_level:
        return experience.raw_rewards.sum(dim=1)
    return aggregate_segment_rewards(experience.raw_rewards, experience.reward_ends, plan.aggregation)


def experience_statistics(experience: Experience, plan: RewardPlan) -> torch.Tensor:
    """``[len(EXPERIENCE_STATS)]`` float64 sums over this rank's rollouts."""
    actions = experience.action_mask
    ends = experience.segment_ends
    covered = segment_ids(ends, actions, validate=False) >= 0
    sequences = experience.sequences
    values = [
        sequences.batch_size, actions.sum(), sequences.eos_mask.any(dim=1).sum(), ends.sum(), covered.sum(),
        experience.reward_ends.sum(), experience.raw_rewards.double().sum(),
        experience.normalized_rewards.double().sum(), rm_scores(experience, plan).double().sum(),
        experience.kl.double().sum(), experience.token_rewards.double().sum(),
        torch.where(actions, experience.action_entropy, 0.0).double().sum(),
        experience.values.double().sum(), torch.where(actions, experience.returns, 0.0).double().sum(),
        (sequences.attention_mask & ~actions).sum(),
    ]
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def experience_metrics(stats: torch.Tensor) -> dict[str, float]:
    """Means from (data-parallel summed) ``experience_statistics``."""
    s = dict(zip(EXPERIENCE_STATS, stats.tolist()))
    responses, tokens = max(s["num_responses"], 1.0), max(s["num_response_tokens"], 1.0)
    rewards = max(s["num_rewards"], 1.0)
    return {
        "rm_score": s["rm_score_sum"] / responses,
        "raw_segment_reward": s["raw_reward_sum"] / rewards,
        "normalized_segment_reward": s["normalized_reward_sum"] / rewards,
        "token_reward_per_response": s["token_reward_sum"] / responses,
        "kl": s["kl_sum"] / responses,
        "kl_per_token": s["kl_sum"] / tokens,
        "response_length": s["num_response_tokens"] / responses,
        "stopped_fraction": s["num_stopped"] / responses,
        "segments_per_response": s["num_segments"] / responses,
        "mean_segment_length": s["num_segment_tokens"] / max(s["num_segments"], 1.0),
        "entropy": s["entropy_sum"] / tokens,
        "value_mean": s["value_sum"] / tokens,
        "return_mean": s["return_sum"] / tokens,
    }


def update_metrics(critic: UpdateStats, actor: UpdateStats) -> dict[str, float]:
    return {"policy_loss": actor.loss, "policy_clip_fraction": actor.clip_fraction, "approx_kl": actor.approx_kl,
            "actor_grad_norm": actor.grad_norm, "value_loss": critic.loss, "value_clip_fraction": critic.clip_fraction,
            "critic_grad_norm": critic.grad_norm,
            "skipped_optimizer_steps": float(actor.num_skipped_steps + critic.num_skipped_steps)}


# phase -> which token count its throughput is measured in
PHASE_TOKENS = {"rollout": "generated", "actor_forward": "all", "reference_forward": "all", "critic_forward": "all",
                "score_segments": "all", "update_critic": "trained", "update_actor": "trained"}


def throughput_metrics(seconds: Mapping[str, float], stats: torch.Tensor, ppo_epochs: int) -> dict[str, float]:
    """tokens/s per phase over all data-parallel ranks (generated tokens for the rollout, prompt + response tokens
    for the forwards, that times the epochs for the updates); the seconds themselves are logged under time/."""
    s = dict(zip(EXPERIENCE_STATS, stats.tolist()))
    counts = {"generated": s["num_response_tokens"], "all": s["num_response_tokens"] + s["num_prompt_tokens"]}
    counts["trained"] = counts["all"] * ppo_epochs
    metrics = {}
    for name, kind in PHASE_TOKENS.items():
        if seconds.get(name, 0.0) > 0:
            metrics[f"tokens_per_second/{name}"] = counts[kind] / seconds[name]
    return metrics


def segment_samples(experience: Experience, rows: range, decode: Callable[[list[int]], str],
                    prompt_ids: tuple[str, ...], plan: RewardPlan, step: int) -> list[dict]:
    """JSON-able records of the given rows: prompt, response, and the rewarded pieces with their rewards."""
    records = []
    sequences = experience.sequences
    scores = rm_scores(experience, plan)
    for row in rows:
        actions = experience.action_mask[row]
        ids = sequences.input_ids[row]
        prompt = ids[sequences.attention_mask[row] & ~actions].tolist()
        response = ids[actions].tolist()
        pieces, start = [], None
        for column in torch.nonzero(actions).flatten().tolist():
            start = column if start is None else start
            if experience.reward_ends[row, column]:
                pieces.append({"text": decode(ids[start:column + 1].tolist()),
                               "raw": float(experience.raw_rewards[row, column]),
                               "normalized": float(experience.normalized_rewards[row, column]),
                               "p": float(experience.positions[row, column])})
                start = None
        if start is not None:  # EOS after the last segment (segment modes): no reward, only the KL term
            pieces.append({"text": decode(ids[start:int(torch.nonzero(actions).max()) + 1].tolist()), "raw": None,
                           "normalized": None, "p": None})
        records.append({"step": step, "prompt_id": prompt_ids[row], "prompt": decode(prompt),
                        "response": decode(response), "rm_score": float(scores[row]),
                        "kl": float(experience.kl[row].sum()), "segments": pieces})
    return records


def write_samples(out_dir: str | Path, records: list[dict]) -> Optional[Path]:
    if not records:
        return None
    path = Path(out_dir) / SAMPLES_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def reduce_experience_statistics(experience: Experience, plan: RewardPlan, parallel_ctx: ParallelContext) -> torch.Tensor:
    """``experience_statistics`` summed over the data-parallel group (the whole rollout batch)."""
    return sum_over_data_parallel(experience_statistics(experience, plan), parallel_ctx)
