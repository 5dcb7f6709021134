"""`megaseg train-dpo`: sigmoid DPO on the reward model's preference data and backbone (the paper's Table 3 baseline).

    megaseg train-dpo --config examples/paper/phi3-mini/table3-dpo.yaml [section.key=value ...]

The policy and the frozen reference both start from the SFT checkpoint (model.checkpoint); pairs come from
data.train_path (held-out pairs from data.eval_path or data.eval_fraction), rendered with the chat template and cut
by the paper's truncation rule, exactly as for reward-model training. Each step takes dpo.global_batch_size pairs
(chosen and rejected answers of a pair in one forward batch), computes the reference's sequence log-probs, and
minimizes -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) (beta 0.1). Metrics go to metrics.jsonl /
TensorBoard; checkpoints (policy, optimizer, schedule, RNG, data position) every checkpoint.save_every steps and at
the end, resumed automatically.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megaseg.config import MegasegConfig, save_config
from megaseg.data.sampler import ResumableShardedSampler
from megaseg.checkpoint.step_dirs import TrainingProgress, latest_checkpoint, load_checkpoint, save_checkpoint
from megaseg.training.dpo.step import dpo_evaluate, dpo_train_step
from megaseg.training.common.metrics import RunLogger
from megaseg.training.common.optimizer import TrainingSetup, setup_training

CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True)
class DPOResult:
    steps: int
    last_metrics: dict[str, float]
    last_eval: Optional[dict[str, float]]


def train_dpo(config: MegasegConfig) -> int:
    """CLI entry: set up the process groups, train, tear down. Returns the exit code."""
    from megaseg.parallel import parallel_session

    with parallel_session(config) as parallel_ctx:
        run_dpo(config, parallel_ctx)
    return 0


def plan_steps(config: MegasegConfig, num_pairs: int, dp_size: int) -> int:
    """Optimizer steps of the run: epochs x full global batches (drop_last), capped by dpo.max_steps."""
    dpo = config.dpo
    if dpo.global_batch_size % (dp_size * dpo.micro_batch_size):
        raise ValueError(f"dpo.global_batch_size={dpo.global_batch_size} must be a multiple of data-parallel size "
                         f"{dp_size} x dpo.micro_batch_size={dpo.micro_batch_size}")
    steps_per_epoch = (num_pairs - num_pairs % dp_size) // dpo.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{num_pairs} training pairs are fewer than one global batch (dpo.global_batch_size="
                         f"{dpo.global_batch_size}); lower it or add data")
    total = steps_per_epoch * dpo.epochs
    return min(total, dpo.max_steps) if dpo.max_steps is not None else total


def build_policy_and_reference(config: MegasegConfig, total_steps: int) -> tuple[TrainingSetup, Any]:
    """Policy (trainable, DDP + Adam + schedule) and reference (frozen), both from model.checkpoint."""
    from megaseg.conversion.megatron_checkpoint import load_model_checkpoint
    from megaseg.models.gpt import build_gpt_model

    sft = config.model.checkpoint
    if sft is None or not (Path(sft) / "metadata.json").is_file():
        raise ValueError(f"model.checkpoint={sft!r} is not a megatron dist checkpoint of the SFT model; DPO starts "
                         "the policy and the reference from it (megaseg convert hf-to-megatron --hf DIR --out DIR)")
    policy = build_gpt_model(config.model, config.parallel)
    load_model_checkpoint(policy, Path(sft))
    reference = build_gpt_model(config.model, config.parallel)
    load_model_checkpoint(reference, Path(sft))
    reference.eval()
    for param in reference.parameters():
        param.requires_grad_(False)
    return setup_training(policy, config.dpo.optimizer, total_steps), reference


def _load_pairs(config: MegasegConfig):
    from megaseg.data.rendering import ChatTemplateRenderer
    from megaseg.data.splits import load_preference_splits
    from megaseg.data.tokenizer import load_tokenizer, padding_token_id

    if config.model.tokenizer is None:
        raise ValueError("model.tokenizer is not set; give the SFT model's tokenizer directory or GGUF file")
    tokenizer = load_tokenizer(config.model.tokenizer)
    renderer = ChatTemplateRenderer(tokenizer, config.model.eos_token_ids)
    train, evaluation = load_preference_splits(config.data, renderer, config.seed)
    return train.pairs, (evaluation.pairs if evaluation is not None else []), padding_token_id(tokenizer)


def run_dpo(config: MegasegConfig, parallel_ctx: Any) -> DPOResult:
    """The whole train-dpo job on initialised process groups (every rank calls it)."""
    dpo = config.dpo
    out_dir = Path(config.logging.out_dir)
    if parallel_ctx.is_rank_zero:
        save_config(config, out_dir)
    train_pairs, eval_pairs, pad_id = _load_pairs(config)
    total_steps = plan_steps(config, len(train_pairs), parallel_ctx.dp_size)
    sampler = ResumableShardedSampler(len(train_pairs), seed=config.seed, dp_rank=parallel_ctx.dp_rank,
                                      dp_size=parallel_ctx.dp_size, shuffle=config.data.shuffle, drop_last=True)
    setup, reference = build_policy_and_reference(config, total_steps)
    root = out_dir / CHECKPOINTS_DIR
    progress = TrainingProgress()
    latest = latest_checkpoint(root) if config.checkpoint.resume else None
    if latest is not None:
        progress = load_checkpoint(latest, model=setup.model, model_cfg=config.model, optimizer=setup.optimizer,
                                   scheduler=setup.scheduler).progress
        sampler.load_state_dict(progress.data_state)
    logger = RunLogger(config.logging, total_steps, is_main=parallel_ctx.is_rank_zero, run_config=config,
                       start_step=progress.step)
    step_kwargs = dict(beta=dpo.beta, label_smoothing=dpo.label_smoothing, micro_batch_size=dpo.micro_batch_size,
                       pad_token_id=pad_id, parallel_ctx=parallel_ctx)
    eval_share = eval_pairs[parallel_ctx.dp_rank::parallel_ctx.dp_size]
    metrics: dict[str, float] = {}
    last_eval = None
    try:
        logger.message(f"DPO: {len(train_pairs)} pairs, beta {dpo.beta}, {total_steps} steps of "
                       f"{dpo.global_batch_size} pairs" + (f"; resumed at step {progress.step}" if progress.step else ""))
        while progress.step < total_steps:
            per_rank = dpo.global_batch_size // parallel_ctx.dp_size
            if len(sampler) < per_rank:
                sampler.advance(len(sampler) * parallel_ctx.dp_size)
            pairs = [train_pairs[index] for index in list(sampler)[:per_rank]]
            metrics = dpo_train_step(setup, reference, pairs, **step_kwargs)
            sampler.advance(dpo.global_batch_size)
            progress = TrainingProgress(step=progress.step + 1,
                                        consumed_samples=progress.consumed_samples + dpo.global_batch_size,
                                        epoch=sampler.epoch, data_state=sampler.state_dict())
            logger.log(progress.step, metrics)
            done = progress.step == total_steps
            if eval_pairs and ((dpo.eval_every and progress.step % dpo.eval_every == 0) or done):
                last_eval = dpo_evaluate(setup.model, reference, eval_share, **step_kwargs)
                logger.log(progress.step, last_eval, prefix="eval")
            if done or (config.checkpoint.save_every and progress.step % config.checkpoint.save_every == 0):
                save_checkpoint(root, model=setup.model, config=config, progress=progress, optimizer=setup.optimizer,
                                scheduler=setup.scheduler, keep_last=config.checkpoint.keep_last)
    finally:
        logger.close()
    return DPOResult(steps=progress.step, last_metrics=metrics, last_eval=last_eval)
