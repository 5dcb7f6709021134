"""`megaseg train-dpo`: sigmoid DPO on the reward model's preference data and backbone (the paper's Table 3 baseline).

    megaseg train-dpo --config examples/paper/phi3-mini/table3-dpo.yaml [section.key=value ...]

The policy and the frozen reference both start from the SFT checkpoint (model.checkpoint); pairs come from
data.train_path (held-out pairs from data.eval_path or data.eval_fraction), rendered with the chat template and cut
by the paper's truncation rule, exactly as for reward-model training. The common loop (megaseg.training.common.loop)
runs the steps; a step, each phase timed:

    batch              this rank's dpo.global_batch_size / dp pairs -> micro-batches (chosen + rejected rows)
    reference_forward  the frozen SFT model's sequence log-probs
    forward_backward   -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) on the policy (beta 0.1)
    optimizer          clip -> Adam step -> LR schedule

Metrics go to metrics.jsonl / TensorBoard; checkpoints (policy, optimizer, schedule, RNG, data position) every
checkpoint.save_every steps and at the end, resumed automatically with the invariant check every trainer has.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from megaseg.checkpoint.sft import load_sft_language_model
from megaseg.checkpoint.step_dirs import TrainedModel, TrainingProgress
from megaseg.config import MegasegConfig
from megaseg.config.loader import absolute_local_paths
from megaseg.data.encoding import TokenizedPair
from megaseg.models.inference import tensor_parallel_group
from megaseg.models.pipeline import forward_backward, forward_only
from megaseg.parallel.collectives import sum_over_replicas
from megaseg.parallel.initialize import ParallelContext
from megaseg.training.common.loop import StepPlan, StepReport, Trainer, plan_steps, rank_sampler
from megaseg.training.common.optimizer import TrainingSetup, setup_training
from megaseg.training.dpo.step import (
    STAT_NAMES,
    add_reference_log_probs,
    collate_step,
    dpo_loss_fn,
    statistics_to_metrics,
)

ROLE = "policy"  # the model's directory in a checkpoint step
# Micro-batches per reference + policy forward during evaluation.
EVAL_MICRO_BATCHES_PER_CALL = 4


def train_dpo(config: MegasegConfig, explicit_keys: frozenset[str] = frozenset()) -> int:
    """CLI entry: set up the process groups, train, tear down. Returns the exit code."""
    from megaseg.parallel import parallel_session

    with parallel_session(config) as parallel_ctx:
        DPOTrainer.from_config(config, parallel_ctx).run()
    return 0


def load_preference_data(config: MegasegConfig) -> tuple[list[TokenizedPair], list[TokenizedPair], int]:
    """(train pairs, held-out pairs, pad id) under the config's tokenizer, template and truncation."""
    from megaseg.data.rendering import ChatTemplateRenderer
    from megaseg.data.splits import load_preference_splits
    from megaseg.data.tokenizer import load_tokenizer, padding_token_id

    if config.model.tokenizer is None:
        raise ValueError("model.tokenizer is not set; give the SFT model's tokenizer directory or GGUF file")
    tokenizer = load_tokenizer(config.model.tokenizer)
    renderer = ChatTemplateRenderer(tokenizer, config.model.eos_token_ids)
    train, evaluation = load_preference_splits(config.data, renderer, config.seed)
    return train.pairs, (evaluation.pairs if evaluation is not None else []), padding_token_id(tokenizer)


class DPOTrainer(Trainer):
    config_sections = ("seed", "model", "data", "dpo")

    def __init__(self, config: MegasegConfig, parallel_ctx: ParallelContext, *, policy: TrainingSetup,
                 reference: torch.nn.Module, train_pairs: Sequence[TokenizedPair],
                 eval_pairs: Sequence[TokenizedPair], pad_token_id: int, plan: StepPlan) -> None:
        super().__init__(config, parallel_ctx, plan=plan, sampler=rank_sampler(len(train_pairs), config, parallel_ctx))
        self.policy, self.reference = policy, reference
        self.train_pairs, self.pad_token_id = list(train_pairs), pad_token_id
        self.num_eval_pairs = len(eval_pairs)
        self.eval_share = list(eval_pairs)[parallel_ctx.dp_rank::parallel_ctx.dp_size]
        dpo = config.dpo
        self.loss_fn = dpo_loss_fn(dpo.beta, dpo.label_smoothing, tensor_parallel_group(parallel_ctx))

    @staticmethod
    def plan(config: MegasegConfig, num_pairs: int, dp_size: int) -> StepPlan:
        dpo = config.dpo
        return plan_steps(section="dpo", num_samples=num_pairs, global_batch_size=dpo.global_batch_size,
                          micro_batch_size=dpo.micro_batch_size, dp_size=dp_size, epochs=dpo.epochs,
                          max_steps=dpo.max_steps)

    @classmethod
    def from_config(cls, config: MegasegConfig, parallel_ctx: ParallelContext) -> "DPOTrainer":
        """Pairs, then policy (trainable: DDP + Adam + schedule) and reference (frozen), both from model.checkpoint."""
        config = absolute_local_paths(config)
        train_pairs, eval_pairs, pad_id = load_preference_data(config)
        plan = cls.plan(config, len(train_pairs), parallel_ctx.dp_size)
        policy = setup_training(load_sft_language_model(config, "train-dpo"), config.dpo.optimizer,
                                plan.schedule_steps)
        reference = load_sft_language_model(config, "train-dpo", frozen=True)
        return cls(config, parallel_ctx, policy=policy, reference=reference, train_pairs=train_pairs,
                   eval_pairs=eval_pairs, pad_token_id=pad_id, plan=plan)

    def trained_models(self) -> Mapping[str, TrainedModel]:
        return {ROLE: self.policy}

    @property
    def eval_every(self) -> int:
        return self.config.dpo.eval_every

    def describe(self) -> str:
        dpo = self.config.dpo
        return (f"DPO: {len(self.train_pairs)} pairs, beta {dpo.beta}, {self.plan.total_steps} steps of "
                f"{dpo.global_batch_size} pairs")

    def step(self, indices: list[int], progress: TrainingProgress) -> StepReport:
        with self.timer.phase("batch"):
            batches = collate_step([self.train_pairs[index] for index in indices], self.plan.micro_batch_size,
                                   self.pad_token_id, self.ctx.device, packing=self.config.data.packing)
        with self.timer.phase("reference_forward"):
            batches = add_reference_log_probs(self.reference, batches, self.ctx)
        with self.timer.phase("forward_backward"):
            self.policy.model.train()
            self.policy.zero_grads()
            outputs = forward_backward(self.policy.model, batches, self.loss_fn)
        with self.timer.phase("optimizer"):
            learning_rate = float(self.policy.optimizer.param_groups[0]["lr"])
            result = self.policy.step()
        local = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
        for output in outputs:
            local += output["stats"].detach().cpu()
        metrics = statistics_to_metrics(sum_over_replicas(local, self.ctx))
        metrics.update(grad_norm=result.grad_norm, skipped_step=float(not result.updated), lr=learning_rate)
        return StepReport(train=metrics)

    @torch.no_grad()
    def evaluate(self, step: int) -> Optional[dict[str, float]]:
        """Loss, accuracy and implicit rewards on the held-out pairs (means over all ranks); None without them."""
        if not self.num_eval_pairs:
            return None
        micro = self.plan.micro_batch_size
        local = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
        usable = len(self.eval_share) - len(self.eval_share) % micro
        for start in range(0, usable, EVAL_MICRO_BATCHES_PER_CALL * micro):
            chunk = self.eval_share[start:min(start + EVAL_MICRO_BATCHES_PER_CALL * micro, usable)]
            batches = add_reference_log_probs(
                self.reference, collate_step(chunk, micro, self.pad_token_id, self.ctx.device,
                                             packing=self.config.data.packing), self.ctx)
            for output in forward_only(self.policy.model, batches, self.loss_fn):
                local += output[1]["stats"].detach().cpu()
        return statistics_to_metrics(sum_over_replicas(local, self.ctx))
