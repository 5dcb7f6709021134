"""`megaseg train-ppo`: PPO against a segment (or baseline) reward model, every variant of the paper by config.

    megaseg train-ppo --config examples/ppo_cpu.yaml [section.key=value ...]

The run: set up the process groups -> tokenizer, prompts, reward model + normalizer (checked against
ppo.reward_granularity) -> actor / reference / critic from the SFT checkpoint -> resume from
<out>/checkpoints if there is one -> PPO steps (megaseg.training.ppo.step: rollout -> score_segments -> normalize
-> interpolate -> advantages -> update_critic -> update_actor) with metrics to <out>/metrics.jsonl and TensorBoard,
text samples with per-segment rewards to <out>/samples.jsonl, held-out evaluation every ppo.eval_every steps, and
checkpoints every checkpoint.save_every steps and at the end.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megaseg.config import MegasegConfig, save_config
from megaseg.training.common.metrics import PhaseTimer, RunLogger
from megaseg.training.ppo.checkpointing import (
    PPOState,
    checkpoint_root,
    latest_ppo_step,
    load_ppo_checkpoint,
    save_ppo_checkpoint,
)
from megaseg.training.ppo.evaluation import evaluate_policy
from megaseg.training.ppo.metrics import segment_samples, write_samples
from megaseg.training.ppo.step import PPORun, build_kl_controller, ppo_step

# Logged under train/ and shown on the progress line; everything else goes under ppo/ and speed/.
PROGRESS_KEYS = ("rm_score", "normalized_segment_reward", "kl", "response_length", "policy_loss", "value_loss")


@dataclass(frozen=True)
class PPOResult:
    steps: int
    last_metrics: dict[str, float]
    last_eval: Optional[dict[str, float]]


def train_ppo(config: MegasegConfig) -> int:
    """CLI entry: set up the process groups, run PPO, tear down. Returns the exit code."""
    from megaseg.parallel import parallel_session

    with parallel_session(config) as parallel_ctx:
        run_ppo(build_ppo_run(config, parallel_ctx))
    return 0


def build_ppo_run(config: MegasegConfig, parallel_ctx: Any) -> PPORun:
    """Tokenizer, prompts, reward parts and models from the config (megaseg.training.ppo.setup)."""
    from megaseg.data.rendering import ChatTemplateRenderer
    from megaseg.data.splits import load_prompt_set
    from megaseg.data.tokenizer import load_tokenizer, padding_token_id
    from megaseg.training.ppo.experience_forward import RewardModelScorer
    from megaseg.training.ppo.setup import (
        TokenizerSentenceMarker,
        assemble_ppo_run,
        build_rollout_fn,
        load_policy_models,
        load_reward_parts,
    )

    if config.data.prompt_path is None:
        raise ValueError("data.prompt_path is not set; give a prompt file, e.g. "
                         "data.prompt_path=shipped:prompts/arena-hard-v0.1_question.jsonl")
    if config.model.tokenizer is None:
        raise ValueError("model.tokenizer is not set; give the SFT model's tokenizer directory or GGUF file")
    tokenizer = load_tokenizer(config.model.tokenizer)
    renderer = ChatTemplateRenderer(tokenizer, config.model.eos_token_ids)
    prompts = load_prompt_set(config.data.prompt_path, config.data, renderer,
                              max_prompt_length=config.ppo.max_prompt_length, max_samples=config.data.max_samples)
    eval_prompts = []
    if config.ppo.eval_every:
        if config.data.eval_prompt_path is None:
            raise ValueError(f"ppo.eval_every={config.ppo.eval_every} needs held-out prompts: set "
                             "data.eval_prompt_path (or ppo.eval_every=0)")
        eval_prompts = load_prompt_set(config.data.eval_prompt_path, config.data, renderer,
                                       max_prompt_length=config.ppo.max_prompt_length,
                                       max_samples=config.ppo.eval_max_prompts).prompts
    reward = load_reward_parts(config, parallel_ctx)
    models = load_policy_models(config)
    pad_id = padding_token_id(tokenizer)
    scorer = RewardModelScorer(reward.reward_model, parallel_ctx, config.ppo.micro_rollout_batch_size)
    marker = TokenizerSentenceMarker(tokenizer) if reward.plan.segmentation.mode == "sentence" else None
    return assemble_ppo_run(
        config, parallel_ctx, models=models, plan=reward.plan, scorer=scorer, normalizer=reward.normalizer,
        prompts=prompts.prompts, rollout_fn=build_rollout_fn(config, pad_id), stop_token_ids=renderer.stop_token_ids,
        pad_token_id=pad_id, sentence_marker=marker, decode=lambda ids: tokenizer.decode(ids),
        eval_prompts=eval_prompts)


def resume(run: PPORun) -> PPOState:
    """The PPO state of the latest complete checkpoint (models, optimizers, RNG loaded), or a fresh start."""
    root = checkpoint_root(run.config)
    step = latest_ppo_step(root) if run.config.checkpoint.resume else None
    if step is None:
        return PPOState(kl_coef=run.kl_controller.value)
    state = load_ppo_checkpoint(root, step, actor=run.actor, critic=run.critic, config=run.config)
    if state.sampler is not None:
        run.sampler.load_state_dict(state.sampler)
    run.kl_controller = build_kl_controller(run.config, state.kl_coef)
    return state


def save(run: PPORun, state: PPOState) -> Path:
    return save_ppo_checkpoint(checkpoint_root(run.config), actor=run.actor, critic=run.critic, config=run.config,
                               state=state, keep_last=run.config.checkpoint.keep_last)


def _should(every: int, step: int) -> bool:
    return every > 0 and step % every == 0


def run_ppo(run: PPORun) -> PPOResult:
    """The PPO loop on a built run (every rank calls it); resumes from the latest checkpoint when allowed."""
    config, ctx = run.config, run.parallel_ctx
    out_dir = Path(config.logging.out_dir)
    if ctx.is_rank_zero:
        save_config(config, out_dir)
    state = resume(run)
    logger = RunLogger(config.logging, run.total_steps, is_main=ctx.is_rank_zero, run_config=config,
                       start_step=state.step)
    timer = PhaseTimer()
    metrics: dict[str, float] = {}
    last_eval = None
    try:
        logger.message(f"PPO: {run.plan.describe()}; {run.total_steps} steps of {config.ppo.rollout_batch_size} "
                       f"prompts ({len(run.prompts)} prompts, {ctx.dp_size} data-parallel ranks)"
                       + (f"; resumed at step {state.step}" if state.step else ""))
        if config.ppo.eval_every and state.step == 0:
            last_eval = evaluate_policy(run, 0)
            logger.log(0, last_eval, prefix="eval")
        saved_step = state.step
        while state.step < run.total_steps:
            result = ppo_step(run, state, timer)
            state, metrics = result.state, result.metrics
            _log_step(logger, state.step, metrics)
            if ctx.is_rank_zero and run.decode is not None and (_should(config.ppo.sample_every, state.step)
                                                                 or state.step == 1):
                rows = range(min(config.ppo.num_logged_samples, result.experience.batch_size))
                write_samples(out_dir, segment_samples(result.experience, rows, run.decode, result.prompt_ids,
                                                       run.plan, state.step))
            if _should(config.ppo.eval_every, state.step):
                last_eval = evaluate_policy(run, state.step)
                logger.log(state.step, last_eval, prefix="eval")
            if _should(config.checkpoint.save_every, state.step):
                save(run, state)
                saved_step = state.step
        if saved_step != state.step:
            save(run, state)
    finally:
        logger.close()
    return PPOResult(steps=state.step, last_metrics=metrics, last_eval=last_eval)


def _log_step(logger: RunLogger, step: int, metrics: dict[str, float]) -> None:
    """Headline metrics under train/ (they make the progress line with ETA), throughput under speed/, the rest
    (losses, clip fractions, grad norms, learning rates, ...) under ppo/."""
    speed = {key: value for key, value in metrics.items() if key.startswith(("seconds/", "tokens_per_second/"))}
    headline = {key: metrics[key] for key in PROGRESS_KEYS if key in metrics}
    rest = {key: value for key, value in metrics.items() if key not in speed and key not in headline}
    logger.log(step, rest, prefix="ppo")
    logger.log(step, speed, prefix="speed")
    logger.log(step, headline, prefix="train")
