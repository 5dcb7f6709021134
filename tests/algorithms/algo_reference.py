"""Slow, obvious references: plain Python loops over ONE sequence, written from the paper and
docs/method.md, sharing no code with megaseg.algorithms.

Rows are plain lists (bools / floats); segments are lists of token indices, so the reference reasons about segments
as the paper does (a_0, ..., a_{T-1}) instead of about an end mask.
"""

from __future__ import annotations

import math

import numpy as np

SENTENCE_MARKS = [".", "!", "?", "\n", ";", "...", ",", ":", "。", "！", "？", "；", "，", "："]


# ----------------------------------------------------------------------------------------------------- entropy
def entropy_of(logits_row: list[float]) -> float:
    """H(softmax(logits)) in nats, float64, -inf logits are impossible tokens."""
    finite = [x for x in logits_row if x != -math.inf]
    top = max(finite)
    weights = [math.exp(x - top) for x in finite]
    z = sum(weights)
    return -sum((w / z) * math.log(w / z) for w in weights if w > 0)


def log_prob_of(logits_row: list[float], token: int) -> float:
    top = max(logits_row)
    z = sum(math.exp(x - top) for x in logits_row)
    return logits_row[token] - top - math.log(z)


# ------------------------------------------------------------------------------------------------ segmentation
def text_ends_sentence(text: str) -> bool:
    while text and text[-1] in " \t":
        text = text[:-1]
    return any(text.endswith(mark) for mark in SENTENCE_MARKS)


def segments_of(
    mode: str,
    response: list[bool],
    eos: list[bool],
    entropy: list[float] | None = None,
    cutoff: float | None = None,
    n: int | None = None,
    texts: list[str] | None = None,
) -> list[list[int]]:
    """The segments a_0..a_{T-1} of one row, each a list of token indices in order."""
    tokens = [j for j, is_response in enumerate(response) if is_response]
    if not tokens:
        raise ValueError("no response tokens")
    has_eos = eos[tokens[-1]]
    if mode == "bandit":
        return [tokens]
    content = tokens[:-1] if has_eos else tokens
    if not content:
        # EOS-only response: the single segment is the EOS token itself.
        return [tokens]
    segments: list[list[int]] = []
    current: list[int] = []
    for rank, j in enumerate(content):
        current.append(j)
        if mode == "entropy":
            closes = entropy[j] > cutoff
        elif mode == "token":
            closes = True
        elif mode == "ngram":
            closes = len(current) == n
        elif mode == "sentence":
            closes = text_ends_sentence(texts[j])
        else:
            raise ValueError(mode)
        if closes:
            segments.append(current)
            current = []
    if current:
        # The final segment is forced to end on the last content token (EOS is never scored).
        segments.append(current)
    return segments


def ends_of(segments: list[list[int]], length: int) -> list[bool]:
    ends = [False] * length
    for segment in segments:
        ends[segment[-1]] = True
    return ends


def segments_from_ends(ends: list[bool], response: list[bool]) -> list[list[int]]:
    """Segments implied by an end mask: response tokens grouped up to each end; tokens after the last end dropped."""
    segments, current = [], []
    for j, is_response in enumerate(response):
        if not is_response:
            continue
        current.append(j)
        if ends[j]:
            segments.append(current)
            current = []
    return segments


def ids_of(segments: list[list[int]], length: int) -> list[int]:
    ids = [-1] * length
    for t, segment in enumerate(segments):
        for j in segment:
            ids[j] = t
    return ids


def positions_of(segments: list[list[int]], length: int) -> list[float]:
    out = [0.0] * length
    total = len(segments)
    for t, segment in enumerate(segments):
        out[segment[-1]] = (t + 1) / total
    return out


def lengths_of(segments: list[list[int]], length: int) -> list[int]:
    out = [0] * length
    for segment in segments:
        out[segment[-1]] = len(segment)
    return out


# ------------------------------------------------------------------------------------------------- aggregation
def segment_rewards(values: list[float], segments: list[list[int]]) -> list[float]:
    """r(s_t, a_t) = reward head output at the last token of a_t."""
    return [values[segment[-1]] for segment in segments]


def aggregate(values: list[float], segments: list[list[int]], how: str) -> float:
    rewards = segment_rewards(values, segments)
    if how == "mean":
        return sum(rewards) / len(rewards)
    if how == "sum":
        return sum(rewards)
    if how == "last":
        return rewards[-1]
    if how == "min":
        return min(rewards)
    raise ValueError(how)


def bradley_terry(chosen: list[float], rejected: list[float]) -> float:
    total = 0.0
    for c, r in zip(chosen, rejected):
        margin = c - r
        # -log sigmoid(m) = log(1 + exp(-m)), written stably for large |m|.
        total += math.log1p(math.exp(-margin)) if margin > -30 else -margin + math.log1p(math.exp(margin))
    return total / len(chosen)


# ----------------------------------------------------------------------------------------------- interpolation
def interpolate(seg_values: list[float], segments: list[list[int]], length: int, mode: str) -> list[float]:
    out = [0.0] * length
    for value, segment in zip(seg_values, segments):
        for j in segment:
            if mode == "even":
                out[j] = value / len(segment)
            elif mode == "repeat":
                out[j] = value
            elif mode == "none":
                out[j] = value if j == segment[-1] else 0.0
    return out


# ------------------------------------------------------------------------------------------------- normalizer
def location_table(positions: list[float], rewards: list[float]) -> dict[float, tuple[float, float, int]]:
    """Groups keyed the way the paper's released code keys them: the string f"{p:.3f}"."""
    groups: dict[str, list[float]] = {}
    for p, r in zip(positions, rewards):
        groups.setdefault(f"{p:.3f}", []).append(r)
    table = {}
    for key in sorted(groups, key=float):
        values = groups[key]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        table[float(key)] = (mean, math.sqrt(var), len(values))
    return table


def location_fit(positions, rewards, method: str) -> tuple[float, float, float, float]:
    """(w_mu, b_mu, w_sigma, b_sigma) by the recipe: sklearn HuberRegressor or np.polyfit on log(p + 1e-10)."""
    table = location_table(list(positions), list(rewards))
    x = np.log(np.array(list(table.keys())) + 1e-10)
    means = np.array([v[0] for v in table.values()])
    stds = np.array([v[1] for v in table.values()])
    if method == "huber":
        from sklearn.linear_model import HuberRegressor

        mean_fit = HuberRegressor(epsilon=1.35).fit(x[:, None], means)
        std_fit = HuberRegressor(epsilon=1.35).fit(x[:, None], stds)
        return mean_fit.coef_[0], mean_fit.intercept_, std_fit.coef_[0], std_fit.intercept_
    w_mu, b_mu = np.polyfit(x, means, 1)
    w_sigma, b_sigma = np.polyfit(x, stds, 1)
    return w_mu, b_mu, w_sigma, b_sigma


# --------------------------------------------------------------------------------------------------------- PPO
def gae_row(rewards: list[float], values: list[float], mask: list[bool], gamma: float, lam: float):
    """Textbook reverse loop over the valid tokens of one row (masked tokens are not time steps)."""
    steps = [j for j, m in enumerate(mask) if m]
    advantages = [0.0] * len(mask)
    returns = [0.0] * len(mask)
    last = 0.0
    for i in reversed(range(len(steps))):
        j = steps[i]
        next_value = values[steps[i + 1]] if i + 1 < len(steps) else 0.0
        delta = rewards[j] + gamma * next_value - values[j]
        last = delta + gamma * lam * last
        advantages[j] = last
        returns[j] = last + values[j]
    return advantages, returns


def kl_estimate(logp: float, ref: float, kind: str) -> float:
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * (logp - ref) ** 2
    if kind == "k3":
        return math.exp(ref - logp) - 1 - (ref - logp)
    if kind == "abs":
        return abs(logp - ref)
    raise ValueError(kind)


def policy_loss_tokens(logp, old_logp, adv, mask, eps):
    """Token-mean PPO clipped loss over the valid tokens of a flat list."""
    losses = []
    for lp, old, a, m in zip(logp, old_logp, adv, mask):
        if not m:
            continue
        ratio = math.exp(lp - old)
        clipped_ratio = min(max(ratio, 1 - eps), 1 + eps)
        losses.append(-min(ratio * a, clipped_ratio * a))
    return sum(losses) / len(losses)


def value_loss_tokens(values, old_values, returns, mask, clip):
    losses = []
    for v, old, ret, m in zip(values, old_values, returns, mask):
        if not m:
            continue
        clipped = min(max(v, old - clip), old + clip)
        losses.append(0.5 * max((v - ret) ** 2, (clipped - ret) ** 2))
    return sum(losses) / len(losses)


def dpo(pc, pr, rc, rr, beta, smoothing):
    total = 0.0
    for a, b, c, d in zip(pc, pr, rc, rr):
        h = beta * ((a - c) - (b - d))
        log_sig = -math.log1p(math.exp(-h))
        log_sig_neg = -math.log1p(math.exp(h))
        total += -(1 - smoothing) * log_sig - smoothing * log_sig_neg
    return total / len(pc)
