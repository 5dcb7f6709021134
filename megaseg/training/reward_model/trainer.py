"""`megaseg train-rm`: train a segment-level reward model (paper Sec. 2.2, Eq. 3-4) on preference pairs.

Phases, each timed:
    load_data  -> tokenizer, chat template, train/eval splits (bad rows: file:line errors or counted skips)
    segments   -> segment ends of every chosen and rejected response (segmentation cache; mode per config)
    model      -> backbone + scalar head from the SFT checkpoint, optional top-N-layer training, megatron Adam,
                  cosine schedule with warm-up and min lr; resume from the latest checkpoint when there is one
    train      -> per step: this rank's share of the global batch -> micro-batches (chosen + rejected in one forward)
                  -> forward_backward with the segment BT loss (gradients accumulate, reduced over data-parallel
                  ranks) -> clip -> Adam step; metrics, progress line, periodic validation and checkpoints
    finish     -> final validation, <out>/reward_model (see megaseg.checkpoint.reward_model_dir)

Exact resume: a checkpoint holds the model, the optimizer, the LR schedule, every RNG and the sampler position,
so a run killed at any point and restarted produces the same loss curve as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from megaseg.config import MegasegConfig, save_config
from megaseg.config.loader import RESOLVED_CONFIG_NAME
from megaseg.data.resources import SHIPPED_PREFIX
from megaseg.data.sampler import ResumableShardedSampler
from megaseg.models.pipeline import forward_backward
from megaseg.checkpoint.step_dirs import TrainingProgress, latest_checkpoint, load_checkpoint, save_checkpoint
from megaseg.training.common.metrics import METRICS_FILE_NAME, PhaseTimer, RunLogger
from megaseg.training.common.optimizer import TrainingSetup, setup_training
from megaseg.training.reward_model.batches import BatchPlan, SegmentedPair, collate_step, plan_batches
from megaseg.checkpoint.reward_model_dir import REWARD_MODEL_DIR, initialize_from_sft, save_reward_model
from megaseg.training.reward_model.data import RewardModelData, load_reward_model_data
from megaseg.training.reward_model.loss import PairMetrics, all_reduce_statistics, segment_preference_loss, zero_statistics
from megaseg.training.reward_model.validation import validate

CHECKPOINTS_DIR = "checkpoints"
# Settings a resumed run must share with the checkpoint's run, or the resumed curve is not the same training.
_RESUME_INVARIANTS = ("seed", "rm.global_batch_size", "rm.micro_batch_size", "rm.aggregation", "rm.train_top_layers",
                      "segmentation.mode", "segmentation.entropy_cutoff", "segmentation.ngram_size",
                      "data.train_path", "data.max_samples", "data.eval_path", "data.eval_fraction",
                      "data.skip_invalid", "data.max_length", "data.max_prompt_length", "data.shuffle")


@dataclass(frozen=True)
class RewardModelResult:
    """What a finished train-rm run wrote and measured."""

    reward_model: Path           # the trained reward-model directory
    out_dir: Path
    steps: int
    final_train: Optional[PairMetrics]  # the last step's metrics (None when nothing was trained in this process)
    final_eval: Optional[PairMetrics]   # None without an eval split

    def summary(self) -> dict:
        return {"reward_model": str(self.reward_model), "metrics": str(self.out_dir / METRICS_FILE_NAME),
                "config": str(self.out_dir / RESOLVED_CONFIG_NAME), "steps": self.steps,
                **_summary_metrics(self.final_train, self.final_eval)}


def train_reward_model(config: MegasegConfig) -> int:
    """CLI entry (`megaseg train-rm`): set up the process groups, train, tear down. Returns the exit code."""
    from megaseg.parallel import parallel_session

    with parallel_session(config) as parallel_ctx:
        result = run_reward_model_training(config, parallel_ctx)
        if parallel_ctx.is_rank_zero:  # the last line of output: one JSON object, for scripts
            print(json.dumps(result.summary()), flush=True)
    return 0


def absolute_local_paths(config: MegasegConfig) -> MegasegConfig:
    """Make the model's and data's local paths absolute, so the saved config works from any directory."""
    def absolute(path: Optional[str]) -> Optional[str]:
        if path is None or path.startswith(SHIPPED_PREFIX):
            return path
        return str(Path(path).absolute())

    model = dataclasses.replace(config.model, tokenizer=absolute(config.model.tokenizer),
                                checkpoint=absolute(config.model.checkpoint))
    data = dataclasses.replace(config.data, train_path=absolute(config.data.train_path),
                               eval_path=absolute(config.data.eval_path))
    logging = dataclasses.replace(config.logging, out_dir=absolute(config.logging.out_dir))
    return dataclasses.replace(config, model=model, data=data, logging=logging)


def run_reward_model_training(config: MegasegConfig, parallel_ctx) -> RewardModelResult:
    """The whole train-rm job on initialised process groups (every rank calls it)."""
    config = absolute_local_paths(config)
    out_dir = Path(config.logging.out_dir)
    timer = PhaseTimer()
    if parallel_ctx.is_rank_zero:
        save_config(config, out_dir)
    with timer.phase("load_data_and_segments"):
        data = load_reward_model_data(config, parallel_ctx)
    plan = plan_batches(num_pairs=len(data.train), global_batch_size=config.rm.global_batch_size,
                        micro_batch_size=config.rm.micro_batch_size, dp_size=parallel_ctx.dp_size,
                        epochs=config.rm.epochs, max_steps=config.rm.max_steps)
    sampler = ResumableShardedSampler(len(data.train), seed=config.seed, dp_rank=parallel_ctx.dp_rank,
                                      dp_size=parallel_ctx.dp_size, shuffle=config.data.shuffle, drop_last=True)
    with timer.phase("model"):
        setup = build_training_setup(config, plan)
        progress = resume_if_possible(config, setup, sampler)
    logger = RunLogger(config.logging, plan.total_steps, is_main=parallel_ctx.is_rank_zero, run_config=config,
                       start_step=progress.step)
    try:
        _log_start(logger, config, data, plan, progress, timer)
        trainer = _Trainer(config, parallel_ctx, plan, data, setup, sampler, logger, timer)
        final_train, progress = trainer.train(progress)
        final_eval = trainer.validate_and_log(progress.step) if config.rm.validate_at_end else None
        rm_dir = save_reward_model(out_dir / REWARD_MODEL_DIR, model=setup.model, config=config, progress=progress,
                                   metrics=_summary_metrics(final_train, final_eval))
        logger.message(f"reward model written to {rm_dir}")
    finally:
        logger.close()
    return RewardModelResult(reward_model=rm_dir, out_dir=out_dir, steps=progress.step, final_train=final_train,
                             final_eval=final_eval)


def build_training_setup(config: MegasegConfig, plan: BatchPlan) -> TrainingSetup:
    """Reward model (SFT backbone + fresh head) -> freeze all but the top layers -> DDP -> Adam -> LR schedule."""
    import warnings

    from megaseg.models.scalar_head import build_reward_model

    model = build_reward_model(config.model, config.parallel)
    initialize_head(model, config.seed)
    if config.model.checkpoint is not None:
        initialize_from_sft(model, config.model.checkpoint)
    else:
        warnings.warn("model.checkpoint is not set: the reward model starts from RANDOM weights (fine for tests, "
                      "useless for real training); set model.checkpoint to the converted SFT model")
    return setup_training(model, config.rm.optimizer, plan.total_steps, config.rm.train_top_layers)


def initialize_head(model, seed: int) -> None:
    """Draw the fresh scalar head from its own generator seeded by `seed`, N(0, 1 / (hidden + 1)) as the model's own
    init (OpenRLHF's value head). The default generator is seeded per pipeline stage, so without this the initial
    reward model (SFT backbone + head) would depend on the pipeline-parallel size."""
    head = getattr(model, "head", None)
    if head is None:  # not the last pipeline stage
        return
    generator = torch.Generator().manual_seed(seed)
    std = 1.0 / (model.config.hidden_size + 1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator, dtype=torch.float32) * std)


def _config_value(config: MegasegConfig, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def resume_if_possible(config: MegasegConfig, setup: TrainingSetup,
                       sampler: ResumableShardedSampler) -> TrainingProgress:
    """Load the latest checkpoint under <out>/checkpoints (checkpoint.resume) or start at step 0."""
    from megaseg.config import load_config

    root = Path(config.logging.out_dir) / CHECKPOINTS_DIR
    latest = latest_checkpoint(root) if config.checkpoint.resume else None
    if latest is None:
        return TrainingProgress()
    saved = load_config(latest / "config.yaml")
    changed = {key: (_config_value(saved, key), _config_value(config, key)) for key in _RESUME_INVARIANTS
               if _config_value(saved, key) != _config_value(config, key)}
    if changed:
        listed = "; ".join(f"{key}: checkpoint {old!r}, now {new!r}" for key, (old, new) in changed.items())
        raise ValueError(f"cannot resume from {latest}: {listed}. Use the checkpoint's settings, or start a fresh run "
                         f"(checkpoint.resume=false, or another logging.out_dir)")
    loaded = load_checkpoint(latest, model=setup.model, model_cfg=config.model, optimizer=setup.optimizer,
                             scheduler=setup.scheduler)
    sampler.load_state_dict(loaded.progress.data_state)
    return loaded.progress


def _log_start(logger: RunLogger, config: MegasegConfig, data: RewardModelData, plan: BatchPlan,
               progress: TrainingProgress, timer: PhaseTimer) -> None:
    logger.message(data.describe())
    logger.message(f"batches: {plan.global_batch_size} pairs per step = {plan.dp_size} data-parallel ranks x "
                   f"{plan.num_micro_batches} micro-batches x {plan.micro_batch_size} pairs; "
                   f"{plan.steps_per_epoch} steps per epoch, {plan.total_steps} steps in all")
    if progress.step:
        logger.message(f"resumed from step {progress.step} ({progress.consumed_samples} pairs consumed)")
    logger.log(progress.step, {name: seconds for name, seconds in timer.pop().items()}, prefix="time")


def _summary_metrics(train: Optional[PairMetrics], evaluation: Optional[PairMetrics]) -> dict[str, float]:
    summary = {}
    for prefix, metrics in (("train", train), ("eval", evaluation)):
        if metrics is not None:
            summary.update({f"{prefix}/{name}": value for name, value in metrics.as_scalars().items()})
            summary[f"{prefix}/num_pairs"] = metrics.num_pairs
    return summary


class _Trainer:
    """The training loop; holds what every step needs so the step itself reads as its phases."""

    def __init__(self, config: MegasegConfig, parallel_ctx, plan: BatchPlan, data: RewardModelData,
                 setup: TrainingSetup, sampler: ResumableShardedSampler, logger: RunLogger, timer: PhaseTimer):
        self.config, self.ctx, self.plan, self.data = config, parallel_ctx, plan, data
        self.setup, self.sampler, self.logger, self.timer = setup, sampler, logger, timer
        self.loss_fn = partial(segment_preference_loss, aggregation=config.rm.aggregation)

    def train(self, progress: TrainingProgress) -> tuple[Optional[PairMetrics], TrainingProgress]:
        metrics = None
        save_every, eval_every = self.config.checkpoint.save_every, self.config.rm.eval_every
        while progress.step < self.plan.total_steps:
            metrics, progress = self.step(progress)
            if eval_every and progress.step % eval_every == 0 and progress.step < self.plan.total_steps:
                self.validate_and_log(progress.step)
            if save_every and (progress.step % save_every == 0 or progress.step == self.plan.total_steps):
                with self.timer.phase("checkpoint"):
                    save_checkpoint(Path(self.config.logging.out_dir) / CHECKPOINTS_DIR, model=self.setup.model,
                                    config=self.config, progress=progress, optimizer=self.setup.optimizer,
                                    scheduler=self.setup.scheduler, keep_last=self.config.checkpoint.keep_last)
        return metrics, progress

    def _next_pairs(self) -> list[SegmentedPair]:
        indices = list(itertools.islice(iter(self.sampler), self.plan.pairs_per_rank))
        assert len(indices) == self.plan.pairs_per_rank, "steps_per_epoch leaves a whole global batch"
        return [self.data.train[index] for index in indices]

    def _advance_sampler(self) -> None:
        self.sampler.advance(self.plan.global_batch_size)
        left_in_epoch = self.sampler.samples_per_epoch - self.sampler.consumed_in_epoch
        if 0 < left_in_epoch < self.plan.global_batch_size and self.sampler.consumed_in_epoch:
            self.sampler.advance(left_in_epoch)  # the epoch's last partial global batch is dropped

    def step(self, progress: TrainingProgress) -> tuple[PairMetrics, TrainingProgress]:
        start = time.perf_counter()
        with self.timer.phase("batch"):
            micro_batches = collate_step(self._next_pairs(), self.plan.micro_batch_size, self.data.pad_id)
        with self.timer.phase("forward_backward"):
            self.setup.zero_grads()
            outputs = forward_backward(self.setup.model, micro_batches, self.loss_fn)
        with self.timer.phase("optimizer"):
            learning_rate = self.setup.optimizer.param_groups[0]["lr"]
            result = self.setup.step()
        local = sum((output["stats"] for output in outputs), zero_statistics())
        metrics = PairMetrics.from_statistics(
            all_reduce_statistics(local, num_duplicates=self.ctx.tp_size * self.ctx.cp_size))
        self._advance_sampler()
        progress = TrainingProgress(step=progress.step + 1,
                                    consumed_samples=progress.consumed_samples + self.plan.global_batch_size,
                                    epoch=self.sampler.epoch, data_state=self.sampler.state_dict())
        elapsed = time.perf_counter() - start
        scalars = {**metrics.as_scalars(), "tokens_per_s": metrics.num_tokens / elapsed, "lr": learning_rate,
                   "grad_norm": result.grad_norm}
        if not result.updated:
            self.logger.message(f"step {progress.step}: non-finite gradients, update skipped")
        self.logger.log(progress.step, scalars)
        self.logger.log(progress.step, self.timer.pop(), prefix="time")
        return metrics, progress

    def validate_and_log(self, step: int) -> Optional[PairMetrics]:
        if not self.data.eval:
            return None
        with self.timer.phase("validate"):
            # Inference only: as many sequences per forward as scoring uses (2 per pair).
            pairs_per_forward = max(1, self.config.rm.scoring_micro_batch_size // 2)
            metrics = validate(self.setup.model, self.data.eval, micro_batch_size=pairs_per_forward,
                               pad_id=self.data.pad_id, aggregation=self.config.rm.aggregation,
                               parallel_ctx=self.ctx)
        self.logger.log(step, metrics.as_scalars(), prefix="eval")
        self.logger.message(f"eval at step {step}: accuracy {metrics.accuracy:.4f} on {metrics.num_pairs} pairs, "
                            f"loss {metrics.loss:.4f}")
        return metrics
