"""The PPO experience of ONE sequence, the slow obvious way: Python loops over tokens and segments, written from
docs/method.md (PPO section) and sharing no code with megaseg.

Inputs are the dense model outputs of one row (full-vocabulary logits of actor and reference, the critic's and the
reward model's head at every position); outputs are per-position Python lists in the layout of
megaseg.training.ppo.experience.Experience (0 where a quantity does not exist).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

SENTENCE_MODES = ("entropy", "token", "sentence", "ngram")


@dataclass
class RowInputs:
    ids: list[int]
    prompt_length: int
    response_length: int            # EOS included
    has_eos: bool
    actor_logits: list[list[float]]  # [S][V]
    ref_logits: list[list[float]]
    critic_head: list[float]         # [S]
    rm_head: list[float]             # [S]
    sentence_flags: list[bool] = field(default_factory=list)  # [S] token text ends a sentence


@dataclass
class Settings:
    mode: str                 # bandit | entropy | token | sentence | ngram (how the rollout is cut)
    sequence_level: bool      # bandit / segment_as_bandit: one e(x, y) on the last token
    cutoff: float = 2.0
    n: int = 2
    aggregation: str = "mean"
    normalizer: tuple = ("none",)  # ("none",) | ("scalar", mean, std) | ("location", w_mu, b_mu, w_s, b_s, p_min)
    interpolation: str = "even"
    clip: float = 10.0
    kl_coef: float = 0.01
    gamma: float = 1.0
    lam: float = 0.95


def log_softmax_at(row: list[float], token: int) -> float:
    top = max(row)
    return row[token] - top - math.log(sum(math.exp(x - top) for x in row))


def entropy(row: list[float]) -> float:
    top = max(row)
    weights = [math.exp(x - top) for x in row]
    z = sum(weights)
    return -sum(w / z * math.log(w / z) for w in weights if w > 0)


def segments(inputs: RowInputs, settings: Settings, entropies: list[float]) -> list[list[int]]:
    actions = list(range(inputs.prompt_length, inputs.prompt_length + inputs.response_length))
    if settings.mode == "bandit":
        return [actions]
    content = actions[:-1] if inputs.has_eos else actions
    if not content:
        return [actions]  # a response of EOS alone: one segment, on EOS
    result, current = [], []
    for rank, j in enumerate(content, start=1):
        current.append(j)
        if settings.mode == "entropy":
            boundary = entropies[j] > settings.cutoff
        elif settings.mode == "token":
            boundary = True
        elif settings.mode == "ngram":
            boundary = rank % settings.n == 0
        else:
            boundary = inputs.sentence_flags[j]
        if boundary or j == content[-1]:
            result.append(current)
            current = []
    return result


def normalize(reward: float, p: float, normalizer: tuple) -> float:
    if normalizer[0] == "none":
        return reward
    if normalizer[0] == "scalar":
        return (reward - normalizer[1]) / normalizer[2]
    _, w_mu, b_mu, w_s, b_s, p_min = normalizer
    p = min(max(p, p_min), 1.0)  # the calibrated range (megaseg.algorithms.normalizer)
    return (reward - (w_mu * math.log(p + 1e-10) + b_mu)) / (w_s * math.log(p + 1e-10) + b_s)


def aggregate(values: list[float], how: str) -> float:
    return {"mean": sum(values) / len(values), "sum": sum(values), "last": values[-1], "min": min(values)}[how]


def experience_row(inputs: RowInputs, settings: Settings) -> dict[str, list]:
    """Every per-position quantity of the experience maker for one row, plus pre-whitening advantages."""
    length = len(inputs.ids)
    actions = list(range(inputs.prompt_length, inputs.prompt_length + inputs.response_length))
    zeros = [0.0] * length
    log_probs, ref_log_probs, values = list(zeros), list(zeros), list(zeros)
    for j in actions:
        log_probs[j] = log_softmax_at(inputs.actor_logits[j - 1], inputs.ids[j])
        ref_log_probs[j] = log_softmax_at(inputs.ref_logits[j - 1], inputs.ids[j])
        values[j] = inputs.critic_head[j - 1]
    entropies = [entropy(row) for row in inputs.ref_logits]
    segs = segments(inputs, settings, entropies)
    ends = [False] * length
    for seg in segs:
        ends[seg[-1]] = True
    raw, positions, normalized, token_rewards = list(zeros), list(zeros), list(zeros), list(zeros)
    if settings.sequence_level:
        last = actions[-1]
        raw[last] = aggregate([inputs.rm_head[seg[-1]] for seg in segs], settings.aggregation)
        positions[last] = 1.0
        normalized[last] = normalize(raw[last], 1.0, settings.normalizer)
        token_rewards[last] = normalized[last]
    else:
        for t, seg in enumerate(segs):
            end = seg[-1]
            raw[end] = inputs.rm_head[end]
            positions[end] = (t + 1) / len(segs)
            normalized[end] = normalize(raw[end], positions[end], settings.normalizer)
            for j in seg:
                if settings.interpolation == "even":
                    token_rewards[j] = normalized[end] / len(seg)
                elif settings.interpolation == "repeat":
                    token_rewards[j] = normalized[end]
                elif j == end:
                    token_rewards[j] = normalized[end]
    token_rewards = [min(max(r, -settings.clip), settings.clip) for r in token_rewards]
    kl, rewards = list(zeros), list(zeros)
    for j in actions:
        kl[j] = log_probs[j] - ref_log_probs[j]
        rewards[j] = token_rewards[j] - settings.kl_coef * kl[j]
    advantages, returns = list(zeros), list(zeros)
    next_value, next_advantage = 0.0, 0.0
    for j in reversed(actions):
        delta = rewards[j] + settings.gamma * next_value - values[j]
        advantages[j] = delta + settings.gamma * settings.lam * next_advantage
        returns[j] = advantages[j] + values[j]
        next_value, next_advantage = values[j], advantages[j]
    return {"log_probs": log_probs, "ref_log_probs": ref_log_probs, "ref_entropy": entropies, "values": values,
            "segment_ends": ends, "raw_rewards": raw, "positions": positions, "normalized_rewards": normalized,
            "token_rewards": token_rewards, "kl": kl, "rewards": rewards, "advantages": advantages,
            "returns": returns, "actions": actions}


def whiten_batch(rows: list[dict[str, list]], eps: float = 1e-8) -> list[list[float]]:
    """Advantages whitened with the mean and population variance of every action token of every row."""
    pooled = [row["advantages"][j] for row in rows for j in row["actions"]]
    mean = sum(pooled) / len(pooled)
    var = sum((x - mean) ** 2 for x in pooled) / len(pooled)
    out = []
    for row in rows:
        whitened = [0.0] * len(row["advantages"])
        for j in row["actions"]:
            whitened[j] = (row["advantages"][j] - mean) / math.sqrt(var + eps)
        out.append(whitened)
    return out


def policy_loss(log_probs: list[float], old: list[float], adv: list[float], actions: list[int], eps: float) -> float:
    terms = []
    for j in actions:
        ratio = math.exp(log_probs[j] - old[j])
        terms.append(-min(ratio * adv[j], min(max(ratio, 1 - eps), 1 + eps) * adv[j]))
    return sum(terms) / len(terms)


def value_loss(values: list[float], old: list[float], returns: list[float], actions: list[int],
               clip: Optional[float]) -> float:
    terms = []
    for j in actions:
        unclipped = (values[j] - returns[j]) ** 2
        clipped_value = old[j] + min(max(values[j] - old[j], -clip), clip)
        terms.append(0.5 * max(unclipped, (clipped_value - returns[j]) ** 2))
    return sum(terms) / len(terms)
