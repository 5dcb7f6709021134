"""The pieces of a DPO step: preference pairs -> micro-batches (chosen and rejected rows in ONE batch) -> reference
sequence log-probs from the frozen SFT model -> the sigmoid DPO loss on the policy, with its statistics.

A sequence log-prob is the sum of log pi(token j | < j) over the response tokens (EOS included), from the logits at
j - 1, computed vocab-parallel from the tensor-parallel logit shards (megaseg.models.inference). Micro-batch rows
[0, m) are the chosen answers of m pairs and rows [m, 2m) their rejected answers (megaseg.data.batch.PreferenceBatch);
every micro-batch of a step is padded to one length (the pipeline schedule sends one activation shape); packed
(data.packing): each micro-batch also carries its rows' real tokens in one row, all packed to one length, and the
model runs on that (megaseg.models.packing; the losses read the rows' layout as before).

Statistics are sums in one float64 vector (combined over micro-batches, data-parallel ranks and pipeline stages by
one all-reduce) and turned into means once per step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from megaseg.algorithms.dpo import dpo_loss
from megaseg.data.batch import collate_pairs
from megaseg.data.encoding import TokenizedPair
from megaseg.models.inference import next_token_log_probs, run_frozen, tensor_parallel_group
from megaseg.models.packing import PackedRows, pack_rows, packed_lengths
from megaseg.parallel.initialize import ParallelContext

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
    packing: Optional[PackedRows] = None  # the rows' real tokens in one row (megaseg.models.pipeline)


def collate_step(pairs: Sequence[TokenizedPair], micro_batch_size: int, pad_token_id: int, device: torch.device,
                 pad_to_multiple_of: int = 8, packing: bool = False) -> list[DPOMicroBatch]:
    """This rank's pairs of one step -> micro-batches of ``micro_batch_size`` pairs, all of one padded length."""
    if len(pairs) % micro_batch_size:
        raise ValueError(f"{len(pairs)} pairs per rank do not split into micro-batches of {micro_batch_size}; make "
                         "dpo.global_batch_size a multiple of data-parallel size x dpo.micro_batch_size")
    longest = max(len(s.prompt_ids) + len(s.response_ids) for pair in pairs for s in (pair.chosen, pair.rejected))
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    batches = []
    for start in range(0, len(pairs), micro_batch_size):
        sequences = collate_pairs(pairs[start:start + micro_batch_size], pad_token_id, pad_to_multiple_of=width)
        input_ids = sequences.sequences.input_ids.to(device)
        batches.append(DPOMicroBatch(
            input_ids=input_ids, position_ids=torch.arange(width, device=device).expand_as(input_ids),
            response_mask=sequences.sequences.response_mask.to(device), ref_log_probs=None,
            num_pairs=micro_batch_size, num_tokens=int(sequences.sequences.attention_mask.sum())))
    if packing:
        lengths = [[len(s.prompt_ids) + len(s.response_ids) for s in
                    [pair.chosen for pair in pairs[start:start + micro_batch_size]]
                    + [pair.rejected for pair in pairs[start:start + micro_batch_size]]]
                   for start in range(0, len(pairs), micro_batch_size)]
        batches = [dataclasses.replace(batch, packing=pack_rows(batch.input_ids, batch_lengths, packed_length,
                                                                pad_token_id))
                   for batch, batch_lengths, packed_length in zip(batches, lengths, packed_lengths(lengths))]
    return batches


def sequence_log_probs(logits: torch.Tensor, batch: DPOMicroBatch, tp_group: Any) -> torch.Tensor:
    """``[2m]`` sum over each row's response tokens of log pi(token | prefix), differentiable w.r.t. the logits."""
    token_log_probs = next_token_log_probs(logits, batch.input_ids, tp_group)
    return torch.where(batch.response_mask, token_log_probs, 0.0).sum(dim=1)


def add_reference_log_probs(reference: torch.nn.Module, batches: list[DPOMicroBatch],
                            parallel_ctx: ParallelContext) -> list[DPOMicroBatch]:
    """The frozen SFT model's sequence log-probs attached to every micro-batch (on every pipeline stage)."""
    tp_group = tensor_parallel_group(parallel_ctx)
    outputs = run_frozen(reference, batches, lambda logits, batch: (sequence_log_probs(logits, batch, tp_group),),
                         parallel_ctx, row_shapes=[()])
    return [dataclasses.replace(batch, ref_log_probs=values) for batch, (values,) in zip(batches, outputs)]


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


def statistics_to_metrics(total: torch.Tensor) -> dict[str, float]:
    s = dict(zip(STAT_NAMES, total.tolist()))
    pairs = max(s["num_pairs"], 1.0)
    return {"loss": s["loss_sum"] / pairs, "accuracy": s["num_correct"] / pairs,
            "chosen_reward": s["chosen_reward_sum"] / pairs, "rejected_reward": s["rejected_reward_sum"] / pairs,
            "margin": (s["chosen_reward_sum"] - s["rejected_reward_sum"]) / pairs, "num_pairs": s["num_pairs"],
            "num_tokens": s["num_tokens"]}
