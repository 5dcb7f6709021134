"""One DPO step: preference pairs -> micro-batches (chosen and rejected rows in ONE batch) -> reference sequence
log-probs from the frozen SFT model -> sigmoid DPO loss on the policy -> optimizer step.

A sequence log-prob is the sum of log pi(token j | < j) over the response tokens (EOS included), from the logits at
j - 1, computed vocab-parallel from the tensor-parallel logit shards. Micro-batch rows [0, m) are the chosen answers
of m pairs and rows [m, 2m) their rejected answers (megaseg.data.batch.PreferenceBatch); every micro-batch of a step
is padded to one length (the pipeline schedule sends one activation shape).

Statistics are sums in one float64 vector (combined over micro-batches, data-parallel ranks and pipeline stages by
one all-reduce) and turned into means once per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from megaseg.algorithms.dpo import dpo_loss
from megaseg.data.batch import collate_pairs
from megaseg.data.encoding import TokenizedPair
from megaseg.models.pipeline import forward_backward, forward_only
from megaseg.parallel.vocab_parallel import vocab_parallel_log_probs
from megaseg.training.ppo.experience_forward import broadcast_from_last_stage, shift_right
from megaseg.training.common.optimizer import TrainingSetup

STAT_NAMES = ("loss_sum", "num_pairs", "num_correct", "chosen_reward_sum", "rejected_reward_sum", "num_tokens")


@dataclass(frozen=True)
class DPOMicroBatch:
    """m pairs in one forward batch: rows [0, m) chosen, rows [m, 2m) rejected (ModelInputs + loss inputs)."""

    input_ids: torch.Tensor       # [2m, S] long, right-padded
    position_ids: torch.Tensor    # [2m, S] long
    response_mask: torch.Tensor   # [2m, S] bool
    ref_log_probs: Optional[torch.Tensor]  # [2m] fp32 reference sequence log-probs (None until computed)
    num_pairs: int                # m
    num_tokens: int               # real tokens of the batch
    attention_mask: Optional[torch.Tensor] = None  # causal

    def with_reference(self, ref_log_probs: torch.Tensor) -> "DPOMicroBatch":
        return DPOMicroBatch(self.input_ids, self.position_ids, self.response_mask, ref_log_probs, self.num_pairs,
                             self.num_tokens)


def collate_step(pairs: Sequence[TokenizedPair], micro_batch_size: int, pad_token_id: int, device: torch.device,
                 pad_to_multiple_of: int = 8) -> list[DPOMicroBatch]:
    """This rank's pairs of one step -> micro-batches of ``micro_batch_size`` pairs, all of one padded length."""
    if len(pairs) % micro_batch_size:
        raise ValueError(f"{len(pairs)} pairs per rank do not split into micro-batches of {micro_batch_size}; make "
                         "dpo.global_batch_size a multiple of data-parallel size x dpo.micro_batch_size")
    longest = max(len(s.prompt_ids) + len(s.response_ids) for pair in pairs for s in (pair.chosen, pair.rejected))
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    batches = []
    for start in range(0, len(pairs), micro_batch_size):
        sequences = collate_pairs(pairs[start:start + micro_batch_size], pad_token_id).sequences
        extra = width - sequences.seq_length
        input_ids = torch.nn.functional.pad(sequences.input_ids, (0, extra), value=pad_token_id)
        response = torch.nn.functional.pad(sequences.response_mask, (0, extra), value=False)
        batches.append(DPOMicroBatch(
            input_ids=input_ids.to(device), position_ids=torch.arange(width, device=device).expand_as(input_ids),
            response_mask=response.to(device), ref_log_probs=None, num_pairs=micro_batch_size,
            num_tokens=int(sequences.attention_mask.sum())))
    return batches


def sequence_log_probs(logits: torch.Tensor, batch: DPOMicroBatch, tp_group: Any) -> torch.Tensor:
    """``[2m]`` sum over each row's response tokens of log pi(token | prefix), differentiable w.r.t. the logits."""
    next_tokens = torch.cat([batch.input_ids[:, 1:], batch.input_ids[:, :1]], dim=1)
    token_log_probs = shift_right(vocab_parallel_log_probs(logits, next_tokens, tp_group, validate=False))
    return torch.where(batch.response_mask, token_log_probs, 0.0).sum(dim=1)


@torch.no_grad()
def add_reference_log_probs(reference: torch.nn.Module, batches: list[DPOMicroBatch],
                            parallel_ctx: Any) -> list[DPOMicroBatch]:
    """The frozen SFT model's sequence log-probs attached to every micro-batch (on every pipeline stage)."""
    tp_group = parallel_ctx.tp_group if parallel_ctx.tp_size > 1 else None
    outputs = forward_only(reference, batches, lambda logits, batch: sequence_log_probs(logits, batch, tp_group))
    shapes = [(batch.input_ids.shape[0],) for batch in batches]
    values = broadcast_from_last_stage(outputs if parallel_ctx.is_last_pipeline_stage else None, shapes, parallel_ctx)
    return [batch.with_reference(value) for batch, value in zip(batches, values)]


def dpo_loss_fn(beta: float, label_smoothing: float, tp_group: Any):
    """(policy logits, micro-batch) -> (mean DPO loss over its pairs, {"stats": [len(STAT_NAMES)] float64})."""

    def loss_fn(logits: torch.Tensor, batch: DPOMicroBatch):
        policy = sequence_log_probs(logits, batch, tp_group)
        m = batch.num_pairs
        ref = batch.ref_log_probs
        loss, chosen, rejected = dpo_loss(policy[:m], policy[m:], ref[:m], ref[m:], beta, label_smoothing)
        with torch.no_grad():
            margin = beta * ((policy[:m] - ref[:m]) - (policy[m:] - ref[m:]))
            per_pair = -(1.0 - label_smoothing) * torch.nn.functional.logsigmoid(margin) \
                - label_smoothing * torch.nn.functional.logsigmoid(-margin)
            counts = torch.tensor([float(m), float(batch.num_tokens)], device=policy.device)
            stats = torch.stack([per_pair.sum(), counts[0], (chosen > rejected).float().sum(), chosen.sum(),
                                 rejected.sum(), counts[1]]).double()
        return loss, {"stats": stats}

    return loss_fn


def reduce_statistics(local: torch.Tensor, parallel_ctx: Any) -> torch.Tensor:
    """Sum over all ranks; the tp x cp last-stage ranks of a replica hold the same numbers, other stages zeros."""
    total = local.to(parallel_ctx.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.cpu() / (parallel_ctx.tp_size * parallel_ctx.cp_size)


def statistics_to_metrics(total: torch.Tensor) -> dict[str, float]:
    s = dict(zip(STAT_NAMES, total.tolist()))
    pairs = max(s["num_pairs"], 1.0)
    return {"loss": s["loss_sum"] / pairs, "accuracy": s["num_correct"] / pairs,
            "chosen_reward": s["chosen_reward_sum"] / pairs, "rejected_reward": s["rejected_reward_sum"] / pairs,
            "margin": (s["chosen_reward_sum"] - s["rejected_reward_sum"]) / pairs, "num_pairs": s["num_pairs"],
            "num_tokens": s["num_tokens"]}


def dpo_train_step(setup: TrainingSetup, reference: torch.nn.Module, pairs: Sequence[TokenizedPair], *,
                   beta: float, label_smoothing: float, micro_batch_size: int, pad_token_id: int,
                   parallel_ctx: Any) -> dict[str, float]:
    """Reference forward, policy forward/backward over the micro-batches, one optimizer step; returns the step's
    means over the global batch (collective over every rank)."""
    tp_group = parallel_ctx.tp_group if parallel_ctx.tp_size > 1 else None
    batches = collate_step(pairs, micro_batch_size, pad_token_id, parallel_ctx.device)
    batches = add_reference_log_probs(reference, batches, parallel_ctx)
    setup.model.train()
    setup.zero_grads()
    outputs = forward_backward(setup.model, batches, dpo_loss_fn(beta, label_smoothing, tp_group))
    result = setup.step()
    local = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
    for output in outputs:
        local += output["stats"].detach().cpu()
    metrics = statistics_to_metrics(reduce_statistics(local, parallel_ctx))
    metrics.update(grad_norm=result.grad_norm, skipped_step=float(not result.updated),
                   lr=float(setup.optimizer.param_groups[0]["lr"]))
    return metrics


@torch.no_grad()
def dpo_evaluate(policy: torch.nn.Module, reference: torch.nn.Module, pairs: Sequence[TokenizedPair], *,
                 beta: float, label_smoothing: float, micro_batch_size: int, pad_token_id: int,
                 parallel_ctx: Any) -> dict[str, float]:
    """Loss, accuracy and implicit rewards on this rank's share of held-out pairs (means over all ranks)."""
    tp_group = parallel_ctx.tp_group if parallel_ctx.tp_size > 1 else None
    loss_fn = dpo_loss_fn(beta, label_smoothing, tp_group)
    local = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
    usable = len(pairs) - len(pairs) % micro_batch_size
    for start in range(0, usable, 4 * micro_batch_size):
        chunk = pairs[start:min(start + 4 * micro_batch_size, usable)]
        batches = add_reference_log_probs(reference, collate_step(chunk, micro_batch_size, pad_token_id,
                                                                  parallel_ctx.device), parallel_ctx)
        for output in forward_only(policy, batches, loss_fn):
            local += output[1]["stats"].detach().cpu()
    return statistics_to_metrics(reduce_statistics(local, parallel_ctx))
