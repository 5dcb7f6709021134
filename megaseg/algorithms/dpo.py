"""Standard sigmoid DPO loss (Rafailov et al., 2023), the paper's Table 3 comparison baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megaseg.algorithms.validation import check_shape


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss on sequence log-probs (each ``[batch]``, the sum over response tokens).

    loss = -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h), h = (pi_c - ref_c) - (pi_r - ref_r); eps is
    ``label_smoothing`` (conservative DPO), 0 for the standard loss.

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: scalar mean loss, and the detached implicit rewards
        ``beta * (pi - ref)`` per pair, ``[batch]`` each, for logging.
    """
    for name, tensor in (
        ("policy_rejected_logps", policy_rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        check_shape(name, tensor, policy_chosen_logps.shape, "policy_chosen_logps")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps
    margin = beta * (chosen_log_ratio - rejected_log_ratio)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses.mean(), beta * chosen_log_ratio.detach(), beta * rejected_log_ratio.detach()
