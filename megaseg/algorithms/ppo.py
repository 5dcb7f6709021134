"""PPO pieces: KL estimators, masked statistics, clipped policy/value losses, KL coefficient controllers.

Masked means are token means over the whole batch: sum over all valid tokens / number of valid tokens. An all-False
mask gives 0 rather than NaN (nothing to average), without a host sync.

Loss reduction (``LOSS_AGGREGATIONS``, veRL's names), over the tokens of ``mask``:
- ``token-mean``: sum of token losses / number of tokens (every token weighs the same; OpenRLHF's default);
- ``seq-mean-token-mean``: each response's token mean, then the mean over responses (every response weighs the same;
  the paper's released code);
- ``seq-mean-token-sum``: each response's token sum, then the mean over responses.
``num_tokens`` / ``num_sequences`` replace the batch's own counts as the denominator, so a micro-batch's share of a
larger batch's loss (gradient accumulation, data parallelism) sums to that batch's loss.

``gae`` lives in ``advantages.py`` and is re-exported here.
"""

from __future__ import annotations

import math

import torch

from megaseg.algorithms.advantages import gae  # noqa: F401  (re-exported: part of this module's public API)
from megaseg.algorithms.masking import count_true, zero_outside, zero_outside_
from megaseg.algorithms.validation import check_bool, check_choice, check_shape
from megaseg.kernels.dispatch import use_triton

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of the sampled tokens (same shape as inputs).

    k1 = logp - ref_logp (unbiased, can be negative); k2 = 0.5 (logp - ref_logp)^2; k3 = exp(ref - logp) - 1 -
    (ref - logp) (unbiased, >= 0, Schulman's estimator); abs = |logp - ref_logp|.
    """
    check_shape("ref_logp", ref_logp, logp.shape, "logp")
    return kl_from_log_ratio(logp - ref_logp, kind)


def kl_from_log_ratio(log_ratio: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """``kl_penalty`` from log_ratio = logp - ref_logp (every estimator is a function of it), e.g. computed once on
    the padded batch before the response tokens are gathered."""
    check_choice("KL estimator", kind, KL_ESTIMATORS)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        # expm1 keeps precision when the ratio is close to 1, where exp(x) - 1 would cancel.
        return torch.expm1(-log_ratio) + log_ratio
    return log_ratio.abs()


def kl_penalized_rewards(
    token_rewards: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> torch.Tensor:
    """``[batch, seq]``: token_rewards - kl_coef * KL per token on ``mask``, 0 elsewhere (the rewards GAE consumes).

    Log-probs off the mask (prompt, padding) are never read.
    """
    check_shape("token_rewards", token_rewards, mask.shape, "mask")
    rewards = kl_penalty(logp, ref_logp, kind).mul_(-kl_coef).add_(token_rewards)
    return zero_outside(rewards, mask) if rewards.requires_grad else zero_outside_(rewards, mask)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scalar token mean of ``values`` over the True entries of ``mask`` (same shape)."""
    check_bool("mask", mask)
    check_shape("values", values, mask.shape, "mask")
    total = zero_outside(values, mask).sum()
    return total / count_true(mask).clamp(min=1).to(total.dtype)


def aggregate_loss(token_losses: torch.Tensor, mask: torch.Tensor, loss_aggregation: str = "token-mean", *,
                   num_tokens: float | None = None, num_sequences: float | None = None) -> torch.Tensor:
    """Scalar loss from per-token losses ``[batch, seq]`` over ``mask`` (see the module docstring).

    ``num_tokens`` (token-mean) / ``num_sequences`` (seq-mean-*): the denominator, when the batch is part of a
    larger one; by default this batch's masked tokens / its rows that hold any.
    """
    check_choice("loss aggregation", loss_aggregation, LOSS_AGGREGATIONS)
    check_bool("mask", mask)
    check_shape("token_losses", token_losses, mask.shape, "mask")
    masked = zero_outside(token_losses, mask)
    if loss_aggregation == "token-mean":
        denominator = count_true(mask).clamp(min=1).to(masked.dtype) if num_tokens is None else num_tokens
        return masked.sum() / denominator
    per_sequence = masked.sum(dim=-1)
    if loss_aggregation == "seq-mean-token-mean":
        per_sequence = per_sequence / mask.sum(dim=-1).clamp(min=1).to(masked.dtype)
    if num_sequences is None:
        num_sequences = mask.any(dim=-1).sum().clamp(min=1).to(masked.dtype)
    return per_sequence.sum() / num_sequences


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[3]`` (sum, sum of squares, count) over the masked entries, in fp64.

    Summable across data-parallel ranks (all-reduce with SUM in the parallel layer), then turned into a mean and
    variance by ``moments_to_mean_var``; fp64 avoids cancellation in sum_sq/n - mean^2 over millions of tokens.
    """
    check_bool("mask", mask)
    check_shape("values", values, mask.shape, "mask")
    if use_triton(values):  # megaseg.kernels.scan: one read, fp64 partial sums (the lines below are its reference)
        from megaseg.kernels.scan import masked_moments as triton_masked_moments

        return triton_masked_moments(values, mask)
    x = zero_outside(values.detach(), mask).double().flatten()
    return torch.stack([x.sum(), torch.dot(x, x), count_true(mask).double()])


def moments_to_mean_var(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, population variance) from ``masked_moments`` output (possibly summed over ranks)."""
    count = moments[2].clamp(min=1.0)
    mean = moments[0] / count
    var = (moments[1] / count - mean.square()).clamp(min=0.0)
    return mean, var


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    moments: torch.Tensor | None = None,
) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) with masked token statistics; masked-out entries become 0.

    Args:
        values, mask: ``[batch, seq]`` (any equal shapes).
        shift_mean: if False the mean is added back, so only the scale changes (TRL's convention).
        eps: variance floor.
        moments: optional ``masked_moments`` summed over ranks, to whiten with statistics of the whole rollout batch
            rather than this rank's slice. The variance is the population one (ddof=0).
    """
    if moments is None:
        moments = masked_moments(values, mask)
    else:
        check_bool("mask", mask)
        check_shape("values", values, mask.shape, "mask")
    mean, var = moments_to_mean_var(moments)
    # 0-dim fp64 statistics do not promote ``values``: the result keeps its dtype.
    whitened = (values - mean).mul_(torch.rsqrt(var + eps))
    if not shift_mean:
        whitened.add_(mean)
    return zero_outside(whitened, mask) if whitened.requires_grad else zero_outside_(whitened, mask)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    *,
    loss_aggregation: str = "token-mean",
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate loss, reduced over ``mask`` by ``loss_aggregation`` (``aggregate_loss``).

    loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), ratio = exp(logp - old_logp).

    Returns:
        ``(loss, clip_fraction, approx_kl)``: scalar loss; detached token fraction where the clipped branch is the
        minimum strictly (its gradient is zero there); detached k3 estimate of KL(old || new) on the batch (both
        token means of this batch, whatever the loss reduction).
    """
    check_shape("old_logp", old_logp, logp.shape, "logp")
    check_shape("advantages", advantages, logp.shape, "logp")
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps!r}")
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = aggregate_loss(-torch.minimum(unclipped, clipped), mask, loss_aggregation, num_tokens=num_tokens,
                          num_sequences=num_sequences)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped < unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    *,
    loss_aggregation: str = "token-mean",
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (OpenRLHF): 0.5 * max((v - R)^2, (clip(v, old - c, old + c) - R)^2), reduced over ``mask``
    by ``loss_aggregation`` (``aggregate_loss``).

    ``clip=None`` gives the plain 0.5 * (v - R)^2. Returns ``(loss, clip_fraction)``, the latter the detached token
    fraction where the clipped term is strictly larger (so it is the one trained on).
    """
    check_shape("old_values", old_values, values.shape, "values")
    check_shape("returns", returns, values.shape, "values")
    unclipped_sq = (values - returns).square()
    counts = {"num_tokens": num_tokens, "num_sequences": num_sequences}
    if clip is None:
        return 0.5 * aggregate_loss(unclipped_sq, mask, loss_aggregation, **counts), torch.zeros((), device=values.device)
    if not clip > 0:
        raise ValueError(f"value clip must be > 0 or None, got {clip!r}")
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped_sq = (clipped_values - returns).square()
    loss = 0.5 * aggregate_loss(torch.maximum(unclipped_sq, clipped_sq), mask, loss_aggregation, **counts)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_sq > unclipped_sq).float(), mask)
    return loss, clip_fraction


class FixedKLController:
    """Constant KL coefficient (the paper: beta = 0.01)."""

    def __init__(self, kl_coef: float):
        if not kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef!r}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; present so both controllers share one interface."""


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al., 2019): steer the observed KL towards ``target``.

    value <- value * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if not init_kl_coef >= 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef!r}")
        if not target > 0:
            raise ValueError(f"target KL must be > 0, got {target!r}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon!r}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl!r}")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
