"""The PPO update: several epochs over the rollout batch in train batches of micro-batches, critic then actor.

Each rank's rollouts are shuffled once per epoch (a permutation drawn from (seed, step, epoch) alone, so every rank
of a model-parallel group, a resumed run and a run at another TP/PP draw the same one), cut into train batches of
``train_batch_size / dp`` rows (one optimizer step each, gradients averaged over data-parallel ranks by megatron's
DDP) and those into micro-batches of ``micro_batch_size`` rows (gradient accumulation through the pipeline schedule).
A train batch is cut to its longest row: every micro-batch of one schedule call has the same shape.

Losses (megaseg.algorithms.ppo): the clipped surrogate -min(r A, clip(r, 1 - eps, 1 + eps) A) and the clipped value
loss 0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), each a token mean over the micro-batch's actions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megaseg.algorithms.ppo import policy_loss, value_loss
from megaseg.models.pipeline import forward_backward
from megaseg.parallel.vocab_parallel import vocab_parallel_log_probs
from megaseg.training.ppo.experience import Experience
from megaseg.training.ppo.experience_forward import shift_right
from megaseg.training.common.optimizer import TrainingSetup

# Entries of a statistics vector: summed over micro-batches, optimizer steps and data-parallel ranks.
STAT_NAMES = ("loss", "clip_fraction", "approx_kl", "num_micro_batches")


@dataclass(frozen=True)
class PPOMicroBatch:
    """One micro-batch of the update (megaseg.models.pipeline.ModelInputs plus the loss inputs)."""

    input_ids: torch.Tensor      # [b, s] long
    position_ids: torch.Tensor   # [b, s] long
    action_mask: torch.Tensor    # [b, s] bool
    old_log_probs: torch.Tensor  # [b, s] fp32
    advantages: torch.Tensor     # [b, s] fp32
    old_values: torch.Tensor     # [b, s] fp32
    returns: torch.Tensor        # [b, s] fp32
    attention_mask: Optional[torch.Tensor] = None  # causal


@dataclass(frozen=True)
class UpdateStats:
    loss: float
    clip_fraction: float
    approx_kl: float           # actor only: k3 estimate of KL(old || new) over the update
    grad_norm: float           # mean over optimizer steps, before clipping
    num_optimizer_steps: int
    num_skipped_steps: int     # fp16 loss scaling found inf/nan gradients


def epoch_permutation(num_rows: int, seed: int, step: int, epoch: int) -> torch.Tensor:
    """The row order of one PPO epoch, from (seed, step, epoch) alone."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step) * 1_009 + int(epoch))
    return torch.randperm(num_rows, generator=generator)


def train_batches(experience: Experience, *, rows_per_step: int, micro_batch_size: int, num_epochs: int,
                  seed: int, step: int) -> list[list[PPOMicroBatch]]:
    """The micro-batches of every optimizer step of the update, in order (``num_epochs`` x rows / rows_per_step)."""
    num_rows = experience.batch_size
    if num_rows % rows_per_step or rows_per_step % micro_batch_size:
        raise ValueError(f"{num_rows} rollouts per rank do not split into train batches of {rows_per_step} rows of "
                         f"micro-batches of {micro_batch_size}; make ppo.rollout_batch_size a multiple of "
                         "ppo.train_batch_size and that a multiple of data-parallel size x ppo.micro_batch_size")
    lengths = experience.sequences.attention_mask.sum(dim=1)
    steps = []
    for epoch in range(num_epochs):
        order = epoch_permutation(num_rows, seed, step, epoch)
        for start in range(0, num_rows, rows_per_step):
            rows = order[start:start + rows_per_step]
            width = int(lengths[rows].max())
            steps.append([_micro_batch(experience, rows[m:m + micro_batch_size], width)
                          for m in range(0, rows_per_step, micro_batch_size)])
    return steps


def _micro_batch(experience: Experience, rows: torch.Tensor, width: int) -> PPOMicroBatch:
    def take(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[rows, :width].contiguous()

    input_ids = take(experience.sequences.input_ids)
    return PPOMicroBatch(
        input_ids=input_ids, position_ids=torch.arange(width, device=input_ids.device).expand_as(input_ids).contiguous(),
        action_mask=take(experience.action_mask), old_log_probs=take(experience.log_probs),
        advantages=take(experience.advantages), old_values=take(experience.values), returns=take(experience.returns))


def actor_loss_fn(tp_group: Any, clip_eps: float) -> Callable:
    """(logits ``[b, s, V/tp]``, micro-batch) -> (policy loss, {"stats": [len(STAT_NAMES)]})."""

    def loss_fn(logits: torch.Tensor, batch: PPOMicroBatch):
        next_tokens = torch.cat([batch.input_ids[:, 1:], batch.input_ids[:, :1]], dim=1)
        log_probs = shift_right(vocab_parallel_log_probs(logits, next_tokens, tp_group, validate=False))
        loss, clip_fraction, approx_kl = policy_loss(log_probs, batch.old_log_probs, batch.advantages,
                                                     batch.action_mask, clip_eps)
        # The schedule divides the loss in place: the statistics are a fresh tensor (stack copies).
        stats = torch.stack([loss.detach(), clip_fraction, approx_kl, torch.ones((), device=loss.device)])
        return loss, {"stats": stats.double()}

    return loss_fn


def critic_loss_fn(value_clip: Optional[float]) -> Callable:
    """(critic head ``[b, s]``, micro-batch) -> (clipped value loss, {"stats": [len(STAT_NAMES)]})."""

    def loss_fn(head: torch.Tensor, batch: PPOMicroBatch):
        values = shift_right(head.float())
        loss, clip_fraction = value_loss(values, batch.old_values, batch.returns, batch.action_mask, value_clip)
        zero = torch.zeros((), device=loss.device)
        stats = torch.stack([loss.detach(), clip_fraction.to(loss.device), zero, torch.ones((), device=loss.device)])
        return loss, {"stats": stats.double()}

    return loss_fn


def _reduce(local: torch.Tensor, parallel_ctx: Any) -> torch.Tensor:
    """Sum over every rank; the last-stage ranks of one data-parallel replica (tp x cp of them) hold the same
    statistics and the other stages zeros, so the sum is divided by tp x cp."""
    total = local.to(parallel_ctx.device)  # NCCL reduces device tensors only
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.cpu() / (parallel_ctx.tp_size * parallel_ctx.cp_size)


def run_update(setup: TrainingSetup, steps: list[list[PPOMicroBatch]], loss_fn: Callable,
               parallel_ctx: Any) -> UpdateStats:
    """One optimizer step per entry of ``steps``; returns the means over all of them."""
    setup.model.train()
    local = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
    grad_norms, skipped = [], 0
    for micro_batches in steps:
        setup.zero_grads()
        outputs = forward_backward(setup.model, micro_batches, loss_fn)
        for output in outputs:
            local += output["stats"].detach().cpu()
        result = setup.step()
        if result.updated:
            grad_norms.append(result.grad_norm)
        else:
            skipped += 1
    total = _reduce(local, parallel_ctx)
    count = max(float(total[3]), 1.0)
    return UpdateStats(loss=float(total[0]) / count, clip_fraction=float(total[1]) / count,
                       approx_kl=float(total[2]) / count,
                       grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
                       num_optimizer_steps=len(steps), num_skipped_steps=skipped)


def update_critic(setup: TrainingSetup, steps: list[list[PPOMicroBatch]], value_clip: Optional[float],
                  parallel_ctx: Any) -> UpdateStats:
    return run_update(setup, steps, critic_loss_fn(value_clip), parallel_ctx)


def update_actor(setup: TrainingSetup, steps: list[list[PPOMicroBatch]], clip_eps: float,
                 parallel_ctx: Any) -> UpdateStats:
    tp_group = parallel_ctx.tp_group if parallel_ctx.tp_size > 1 else None
    return run_update(setup, steps, actor_loss_fn(tp_group, clip_eps), parallel_ctx)
