"""`megaseg train-rm`: train a segment-level reward model (paper Sec. 2.2, Eq. 3-4) on preference pairs.

Built by ``RewardModelTrainer.from_config`` (tokenizer, chat template, train/eval splits, segment ends of every
chosen and rejected answer from the segmentation cache, the SFT backbone with a fresh head, optional top-N-layer
training, megatron Adam with the LR schedule); then the common loop (megaseg.training.common.loop). A step:

    batch             this rank's share of the global batch -> micro-batches (chosen + rejected in one forward)
    forward_backward  the segment BT loss through the pipeline schedule (gradients accumulate, reduced over the
                      data-parallel ranks)
    optimizer         clip -> Adam step -> LR schedule

with validation every rm.eval_every steps and at the end (rm.validate_at_end); at the end <out>/reward_model
(megaseg.checkpoint.reward_model_dir). Exact resume: a checkpoint holds the model, the optimizer, the LR schedule,
every RNG and the sampler position, so a run killed at any point and restarted produces the same loss curve.
"""
from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Mapping, Optional

from megaseg.checkpoint.reward_model_dir import REWARD_MODEL_DIR, save_reward_model
from megaseg.checkpoint.sft import load_sft_scalar_head_model
from megaseg.checkpoint.step_dirs import TrainedModel, TrainingProgress
from megaseg.config import MegasegConfig
from megaseg.config.loader import RESOLVED_CONFIG_NAME, absolute_local_paths
from megaseg.models.pipeline import forward_backward
from megaseg.parallel.collectives import print_rank_zero, sum_over_replicas
from megaseg.parallel.initialize import ParallelContext
from megaseg.training.common.loop import RunResult, StepPlan, StepReport, Trainer, plan_steps, rank_sampler
from megaseg.training.common.metrics import METRICS_FILE_NAME
from megaseg.training.common.optimizer import TrainingSetup, setup_training
from megaseg.training.reward_model.batches import collate_step
from megaseg.training.reward_model.data import RewardModelData, load_reward_model_data
from megaseg.training.reward_model.frozen_prefix import (
    PrefixFeatures,
    complete_prefix_features,
    frozen_bottom_source,
    frozen_prefix_plan,
)
from megaseg.training.reward_model.loss import PairMetrics, segment_preference_loss, zero_statistics
from megaseg.training.reward_model.validation import validate

ROLE = "reward_model"  # the model's directory in a checkpoint step


def train_reward_model(config: MegasegConfig, explicit_keys: frozenset[str] = frozenset()) -> int:
    """CLI entry (`megaseg train-rm`): set up the process groups, train, tear down. Returns the exit code."""
    from megaseg.parallel import parallel_session

    with parallel_session(config) as parallel_ctx:
        result = RewardModelTrainer.from_config(config, parallel_ctx).run()
        if parallel_ctx.is_rank_zero:  # the last line of output: one JSON object, for scripts
            print(json.dumps(result_summary(result, config)), flush=True)
    return 0


def result_summary(result: RunResult, config: MegasegConfig) -> dict:
    out_dir = Path(config.logging.out_dir).absolute()
    return {"reward_model": str(result.outputs["reward_model"]), "metrics": str(out_dir / METRICS_FILE_NAME),
            "config": str(out_dir / RESOLVED_CONFIG_NAME), "steps": result.steps,
            **summary_metrics(result.last_metrics, result.last_eval)}


def summary_metrics(train: Mapping[str, float], evaluation: Optional[Mapping[str, float]]) -> dict[str, float]:
    summary = {f"train/{name}": value for name, value in train.items()}
    summary.update({f"eval/{name}": value for name, value in (evaluation or {}).items()})
    return summary


class RewardModelTrainer(Trainer):
    config_sections = ("seed", "model", "data", "segmentation", "rm")

    def __init__(self, config: MegasegConfig, parallel_ctx: ParallelContext, *, data: RewardModelData,
                 setup: TrainingSetup, plan: StepPlan, prefix_features: Optional[PrefixFeatures] = None) -> None:
        super().__init__(config, parallel_ctx, plan=plan, sampler=rank_sampler(len(data.train), config, parallel_ctx))
        self.data, self.setup = data, setup
        self.loss_fn = partial(segment_preference_loss, aggregation=config.rm.aggregation)
        # The frozen bottom layers' output of every train/eval sequence: steps and validation run the top layers only.
        self.prefix_features = prefix_features

    @classmethod
    def from_config(cls, config: MegasegConfig, parallel_ctx: ParallelContext) -> "RewardModelTrainer":
        config = absolute_local_paths(config)
        num_bottom, why = frozen_prefix_plan(config, parallel_ctx)
        features = PrefixFeatures(num_bottom, frozen_bottom_source(config)) if num_bottom is not None else None
        # The entropy pass's SFT model has the reward model's bottom layers only when both are read from a checkpoint.
        capture_from_entropy_pass = features is not None and config.model.checkpoint is not None
        data = load_reward_model_data(config, parallel_ctx, features if capture_from_entropy_pass else None)
        rm = config.rm
        plan = plan_steps(section="rm", num_samples=len(data.train), global_batch_size=rm.global_batch_size,
                          micro_batch_size=rm.micro_batch_size, dp_size=parallel_ctx.dp_size, epochs=rm.epochs,
                          max_steps=rm.max_steps)
        model = load_sft_scalar_head_model(config, "train-rm")
        if features is not None:
            features, why = complete_prefix_features(features, model, data, rm.scoring_micro_batch_size, why)
        print_rank_zero(f"frozen prefix: {'on' if features is not None else 'off, the whole model runs'}: {why}")
        return cls(config, parallel_ctx, data=data, plan=plan, prefix_features=features,
                   setup=setup_training(model, rm.optimizer, plan.schedule_steps, rm.train_top_layers))

    def trained_models(self) -> Mapping[str, TrainedModel]:
        return {ROLE: self.setup}

    @property
    def eval_every(self) -> int:
        return self.config.rm.eval_every

    @property
    def evaluates_at_end(self) -> bool:
        return self.config.rm.validate_at_end

    def describe(self) -> str:
        plan = self.plan
        return (f"{self.data.describe()}\nbatches: {plan.global_batch_size} pairs per step = {plan.dp_size} "
                f"data-parallel ranks x {plan.num_micro_batches} micro-batches x {plan.micro_batch_size} pairs; "
                f"{plan.steps_per_epoch} steps per epoch, {plan.total_steps} steps in all")

    def step(self, indices: list[int], progress: TrainingProgress) -> StepReport:
        start = time.perf_counter()
        with self.timer.phase("batch"):
            pairs = [self.data.train[index] for index in indices]
            # The frozen-prefix path files its hidden states by rows of padded micro-batches: it does not pack.
            micro_batches = collate_step(pairs, self.plan.micro_batch_size, self.data.pad_id,
                                         packing=self.config.data.packing and self.prefix_features is None)
        with self.timer.phase("forward_backward"):
            self.setup.zero_grads()
            if self.prefix_features is not None:
                outputs = self.prefix_features.forward_backward(self.setup.model, micro_batches, self.loss_fn)
            else:
                outputs = forward_backward(self.setup.model, micro_batches, self.loss_fn)
        with self.timer.phase("optimizer"):
            learning_rate = self.setup.optimizer.param_groups[0]["lr"]
            result = self.setup.step()
        local = sum((output["stats"] for output in outputs), zero_statistics())
        metrics = PairMetrics.from_statistics(sum_over_replicas(local, self.ctx))
        scalars = {**metrics.as_scalars(), "tokens_per_s": metrics.num_tokens / (time.perf_counter() - start),
                   "lr": learning_rate, "grad_norm": result.grad_norm}
        skipped = () if result.updated else (f"step {progress.step + 1}: non-finite gradients, update skipped",)
        return StepReport(train=scalars, messages=skipped)

    def evaluate(self, step: int) -> Optional[dict[str, float]]:
        if not self.data.eval:
            return None
        # Inference only: as many sequences per forward as scoring uses.
        metrics = validate(self.setup.model, self.data.eval, micro_batch_size=self.config.rm.scoring_micro_batch_size,
                           aggregation=self.config.rm.aggregation, parallel_ctx=self.ctx,
                           packing=self.config.data.packing, prefix_features=self.prefix_features)
        self.logger.message(f"eval at step {step}: accuracy {metrics.accuracy:.4f} on {metrics.num_pairs} pairs, "
                            f"loss {metrics.loss:.4f}")
        return {**metrics.as_scalars(), "num_pairs": metrics.num_pairs}

    def finish(self, progress: TrainingProgress, result: RunResult) -> RunResult:
        rm_dir = save_reward_model(Path(self.config.logging.out_dir) / REWARD_MODEL_DIR, model=self.setup.model,
                                   config=self.config, progress=progress,
                                   metrics=summary_metrics(result.last_metrics, result.last_eval))
        self.logger.message(f"reward model written to {rm_dir}")
        return RunResult(steps=result.steps, last_metrics=result.last_metrics, last_eval=result.last_eval,
                         outputs={"reward_model": rm_dir})
