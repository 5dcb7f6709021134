"""The PPO update: several epochs over the rollout batch in train batches of micro-batches, critic then actor.

Each rank's rollouts are shuffled once per epoch (a permutation drawn from (seed, step, epoch) alone, so every rank
of a model-parallel group, a resumed run and a run at another TP/PP draw the same one), cut into train batches of
``train_batch_size / dp`` rows (one optimizer step each, gradients averaged over data-parallel ranks by megatron's
DDP) and those into micro-batches of ``micro_batch_size`` rows (gradient accumulation through the pipeline schedule).
A train batch is cut to its longest row: every micro-batch of one schedule call has the same shape.

Losses (megaseg.algorithms.ppo): the clipped surrogate -min(r A, clip(r, 1 - eps, 1 + eps) A) and the clipped value
loss 0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), reduced by ``ppo.loss_aggregation`` over the WHOLE
train batch (all micro-batches of all data-parallel ranks): each micro-batch's loss is its share of that reduction
(its token or response sums over the train batch's token or response count, counted across ranks before the step),
times the micro-batch count and the data-parallel size that megatron's schedule and DDP divide by. So micro-batching
and data parallelism never change the loss being minimised.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch

from megaseg.algorithms.ppo import policy_loss, value_loss
from megaseg.models.inference import next_token_log_probs, shift_right, tensor_parallel_group
from megaseg.models.packing import PackedRows, pack_rows, packed_lengths, row_lengths
from megaseg.models.pipeline import forward_backward
from megaseg.parallel.collectives import sum_over_data_parallel, sum_over_replicas
from megaseg.parallel.initialize import ParallelContext
from megaseg.training.common.optimizer import TrainingSetup
from megaseg.training.ppo.experience import Experience

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
    packing: Optional[PackedRows] = None  # the rows' real tokens in one row (data.packing; megaseg.models.pipeline)


@dataclass(frozen=True)
class TrainBatch:
    """The micro-batches of one optimizer step, and the train batch's counts over all data-parallel ranks (the
    denominators of the loss reduction)."""

    micro_batches: list[PPOMicroBatch]
    num_tokens: float      # action tokens of the whole train batch
    num_sequences: float   # responses of the whole train batch (ppo.train_batch_size)
    dp_size: int

    @property
    def loss_scale(self) -> float:
        """What megatron divides each micro-batch's loss by (the micro-batch count, DDP's data-parallel mean)."""
        return float(len(self.micro_batches) * self.dp_size)


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
                  seed: int, step: int, parallel_ctx: Optional[ParallelContext],
                  packing: bool = False) -> list[TrainBatch]:
    """The train batches of every optimizer step of the update, in order (``num_epochs`` x rows / rows_per_step).
    Collective over the data-parallel group (one reduction of the token counts for the whole update); None: one
    process, nothing to reduce. ``packing``: the micro-batches of a step packed to one length (one schedule call)."""
    num_rows = experience.batch_size
    if num_rows % rows_per_step or rows_per_step % micro_batch_size:
        raise ValueError(f"{num_rows} rollouts per rank do not split into train batches of {rows_per_step} rows of "
                         f"micro-batches of {micro_batch_size}; make ppo.rollout_batch_size a multiple of "
                         "ppo.train_batch_size and that a multiple of data-parallel size x ppo.micro_batch_size")
    lengths = experience.sequences.attention_mask.sum(dim=1)
    if packing:
        row_lengths(experience.sequences.attention_mask)  # packing keeps each row's prefix: refuse other layouts
    actions = experience.action_mask.sum(dim=1)
    plans = []
    for epoch in range(num_epochs):
        order = epoch_permutation(num_rows, seed, step, epoch)
        plans += [order[start:start + rows_per_step] for start in range(0, num_rows, rows_per_step)]
    local_tokens = torch.stack([actions[rows].sum() for rows in plans]).double()
    dp_size = 1 if parallel_ctx is None else parallel_ctx.dp_size
    global_tokens = (local_tokens if parallel_ctx is None else sum_over_data_parallel(local_tokens, parallel_ctx)).tolist()
    batches = []
    for rows, num_tokens in zip(plans, global_tokens):
        width = int(lengths[rows].max())
        micro_batches = [_micro_batch(experience, rows[m:m + micro_batch_size], width)
                         for m in range(0, rows_per_step, micro_batch_size)]
        if packing:
            per_batch = [lengths[rows[m:m + micro_batch_size]].tolist() for m in range(0, rows_per_step,
                                                                                     micro_batch_size)]
            micro_batches = [replace(batch, packing=pack_rows(batch.input_ids, batch_lengths, packed_length))
                             for batch, batch_lengths, packed_length in zip(micro_batches, per_batch,
                                                                            packed_lengths(per_batch))]
        batches.append(TrainBatch(
            micro_batches=micro_batches,
            num_tokens=num_tokens, num_sequences=float(rows_per_step * dp_size), dp_size=dp_size))
    return batches


def _micro_batch(experience: Experience, rows: torch.Tensor, width: int) -> PPOMicroBatch:
    def take(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[rows, :width].contiguous()

    input_ids = take(experience.sequences.input_ids)
    return PPOMicroBatch(
        input_ids=input_ids, position_ids=torch.arange(width, device=input_ids.device).expand_as(input_ids).contiguous(),
        action_mask=take(experience.action_mask), old_log_probs=take(experience.log_probs),
        advantages=take(experience.advantages), old_values=take(experience.values), returns=take(experience.returns))


def _stats(loss: torch.Tensor, scale: float, clip_fraction: torch.Tensor, approx_kl: torch.Tensor) -> torch.Tensor:
    # The schedule divides the loss in place: the statistics are a fresh tensor (stack copies). The logged loss is
    # the micro-batch's share of the train batch's loss, summed back to it in run_update.
    one = torch.ones((), device=loss.device)
    return torch.stack([loss.detach() / scale, clip_fraction.to(loss.device), approx_kl.to(loss.device), one]).double()


def actor_loss_fn(tp_group: Any, clip_eps: float, loss_aggregation: str, train_batch: TrainBatch) -> Callable:
    """(logits ``[b, s, V/tp]``, micro-batch) -> (policy loss, {"stats": [len(STAT_NAMES)]})."""

    def loss_fn(logits: torch.Tensor, batch: PPOMicroBatch):
        log_probs = next_token_log_probs(logits, batch.input_ids, tp_group)
        loss, clip_fraction, approx_kl = policy_loss(
            log_probs, batch.old_log_probs, batch.advantages, batch.action_mask, clip_eps,
            loss_aggregation=loss_aggregation, num_tokens=train_batch.num_tokens,
            num_sequences=train_batch.num_sequences)
        loss = loss * train_batch.loss_scale
        return loss, {"stats": _stats(loss, train_batch.loss_scale, clip_fraction, approx_kl)}

    return loss_fn


def critic_loss_fn(value_clip: Optional[float], loss_aggregation: str, train_batch: TrainBatch) -> Callable:
    """(critic head ``[b, s]``, micro-batch) -> (clipped value loss, {"stats": [len(STAT_NAMES)]})."""

    def loss_fn(head: torch.Tensor, batch: PPOMicroBatch):
        values = shift_right(head.float())
        loss, clip_fraction = value_loss(values, batch.old_values, batch.returns, batch.action_mask, value_clip,
                                         loss_aggregation=loss_aggregation, num_tokens=train_batch.num_tokens,
                                         num_sequences=train_batch.num_sequences)
        loss = loss * train_batch.loss_scale
        return loss, {"stats": _stats(loss, train_batch.loss_scale, clip_fraction, torch.zeros(()))}

    return loss_fn


def run_update(setup: TrainingSetup, batches: list[TrainBatch], make_loss_fn: Callable[[TrainBatch], Callable],
               parallel_ctx: ParallelContext) -> UpdateStats:
    """One optimizer step per train batch; returns the means over all of them (the loss per train batch)."""
    setup.model.train()
    local = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
    grad_norms, skipped = [], 0
    for train_batch in batches:
        setup.zero_grads()
        outputs = forward_backward(setup.model, train_batch.micro_batches, make_loss_fn(train_batch))
        for output in outputs:
            local += output["stats"].detach().cpu()
        result = setup.step()
        if result.updated:
            grad_norms.append(result.grad_norm)
        else:
            skipped += 1
    total = sum_over_replicas(local, parallel_ctx)
    num_micro = max(float(total[3]), 1.0)
    return UpdateStats(loss=float(total[0]) / max(len(batches), 1), clip_fraction=float(total[1]) / num_micro,
                       approx_kl=float(total[2]) / num_micro,
                       grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
                       num_optimizer_steps=len(batches), num_skipped_steps=skipped)


def update_critic(setup: TrainingSetup, batches: list[TrainBatch], value_clip: Optional[float], loss_aggregation: str,
                  parallel_ctx: ParallelContext) -> UpdateStats:
    return run_update(setup, batches, lambda batch: critic_loss_fn(value_clip, loss_aggregation, batch), parallel_ctx)


def update_actor(setup: TrainingSetup, batches: list[TrainBatch], clip_eps: float, loss_aggregation: str,
                 parallel_ctx: ParallelContext) -> UpdateStats:
    tp_group = tensor_parallel_group(parallel_ctx)
    return run_update(setup, batches, lambda batch: actor_loss_fn(tp_group, clip_eps, loss_aggregation, batch),
                      parallel_ctx)
