"""One PPO step, as named phases with timers:

    rollout -> actor_forward -> reference_forward -> critic_forward -> score_segments -> normalize -> interpolate
    -> advantages -> update_critic -> update_actor

``PPORun`` holds everything a step touches (models with their optimizers, the reward parts, prompts, sampler); it is
built from a config by megaseg.training.ppo.setup, or directly by tests (tiny models, a hand-written reward).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from megaseg.algorithms.ppo import AdaptiveKLController, FixedKLController
from megaseg.config import MegasegConfig
from megaseg.data.encoding import TokenizedPrompt
from megaseg.data.sampler import ResumableShardedSampler
from megaseg.generation.settings import SamplingSettings
from megaseg.training.ppo.experience import Experience, ExperienceSources, make_experience
from megaseg.training.common.metrics import PhaseTimer
from megaseg.training.ppo.checkpointing import PPOState
from megaseg.training.ppo.metrics import (
    experience_metrics,
    reduce_experience_statistics,
    throughput_metrics,
    update_metrics,
)
from megaseg.training.ppo.update import train_batches, update_actor, update_critic
from megaseg.training.ppo.reward_plan import RewardPlan
from megaseg.training.common.optimizer import TrainingSetup
from megaseg.generation.rollout import RolloutFn, generate_rollouts, rollout_generator


def build_kl_controller(config: MegasegConfig, value: Optional[float] = None):
    """Fixed (the paper: beta 0.01) or adaptive (Ziegler et al.) KL coefficient, starting at ``value`` on resume."""
    ppo = config.ppo
    start = ppo.kl_coef if value is None else value
    if ppo.adaptive_kl:
        return AdaptiveKLController(start, ppo.kl_target, ppo.kl_horizon)
    return FixedKLController(start)


@dataclass
class PPORun:
    config: MegasegConfig
    parallel_ctx: Any
    plan: RewardPlan
    actor: TrainingSetup
    critic: TrainingSetup
    sources: ExperienceSources            # actor / reference / critic modules, scorer, normalizer, sentence marker
    prompts: Sequence[TokenizedPrompt]
    sampler: ResumableShardedSampler
    rollout_fn: RolloutFn
    stop_token_ids: tuple[int, ...]
    pad_token_id: int
    kl_controller: Any
    total_steps: int
    decode: Optional[Callable[[list[int]], str]] = None  # token ids -> text, for samples
    eval_prompts: Sequence[TokenizedPrompt] = field(default_factory=tuple)

    @property
    def prompts_per_rank(self) -> int:
        return self.config.ppo.rollout_batch_size // self.parallel_ctx.dp_size

    def sampling_settings(self, greedy: bool = False) -> SamplingSettings:
        """The rollout settings of ppo (temperature, top-p/k, max_new_tokens) with the model's stop tokens."""
        settings = SamplingSettings.from_ppo_config(self.config.ppo, self.stop_token_ids)
        return dataclasses.replace(settings, greedy=greedy)


def check_batch_layout(config: MegasegConfig, dp_size: int) -> None:
    ppo = config.ppo
    if ppo.rollout_batch_size % dp_size or ppo.train_batch_size % (dp_size * ppo.micro_batch_size):
        raise ValueError(
            f"ppo.rollout_batch_size={ppo.rollout_batch_size} must be a multiple of the data-parallel size {dp_size}, "
            f"and ppo.train_batch_size={ppo.train_batch_size} a multiple of {dp_size} x ppo.micro_batch_size="
            f"{ppo.micro_batch_size}; change the batch sizes or the parallel layout")


def total_ppo_steps(config: MegasegConfig, num_prompts: int, dp_size: int) -> int:
    """episodes x full rollout batches per pass over the prompts, capped by ppo.max_steps."""
    usable = num_prompts - num_prompts % dp_size
    steps_per_episode = usable // config.ppo.rollout_batch_size
    if steps_per_episode == 0:
        raise ValueError(f"{num_prompts} prompts are fewer than one rollout batch (ppo.rollout_batch_size="
                         f"{config.ppo.rollout_batch_size}); lower it or add prompts")
    total = steps_per_episode * config.ppo.episodes
    return min(total, config.ppo.max_steps) if config.ppo.max_steps is not None else total


def optimizer_steps_per_ppo_step(config: MegasegConfig) -> int:
    return config.ppo.ppo_epochs * (config.ppo.rollout_batch_size // config.ppo.train_batch_size)


def next_prompts(run: PPORun) -> list[TokenizedPrompt]:
    """This rank's prompts of the next step; an epoch's tail shorter than a rollout batch is skipped."""
    if len(run.sampler) < run.prompts_per_rank:
        run.sampler.advance(len(run.sampler) * run.parallel_ctx.dp_size)
    indices = list(run.sampler)[:run.prompts_per_rank]
    return [run.prompts[index] for index in indices]


@dataclass(frozen=True)
class StepResult:
    metrics: dict[str, float]
    experience: Experience                # this rank's rollouts and their rewards
    prompt_ids: tuple[str, ...]           # [B] the prompts of this rank's rollouts
    state: PPOState                       # after the step


def ppo_step(run: PPORun, state: PPOState, timer: PhaseTimer) -> StepResult:
    """Rollout, experience and update of step ``state.step + 1`` (collective over every rank)."""
    config, ctx, ppo = run.config, run.parallel_ctx, run.config.ppo
    prompts = next_prompts(run)
    kl_coef = run.kl_controller.value
    with timer.phase("rollout"):
        generator = rollout_generator(config.seed, state.step, ctx.dp_rank, ctx.device)
        rollout = generate_rollouts(run.rollout_fn, run.actor.model, prompts, run.sampling_settings(), ctx,
                                    generator=generator, micro_batch_size=ppo.micro_rollout_batch_size,
                                    pad_token_id=run.pad_token_id)
    experience = make_experience(rollout, run.sources, run.plan, ppo, kl_coef, ctx, timer,
                                 config.segmentation.entropy_chunk_size)
    steps = train_batches(experience, rows_per_step=ppo.train_batch_size // ctx.dp_size,
                          micro_batch_size=ppo.micro_batch_size, num_epochs=ppo.ppo_epochs, seed=config.seed,
                          step=state.step)
    with timer.phase("update_critic"):
        critic_stats = update_critic(run.critic, steps, ppo.value_clip, ctx)
    with timer.phase("update_actor"):
        actor_stats = update_actor(run.actor, steps, ppo.clip_eps, ctx)
    stats = reduce_experience_statistics(experience, run.plan, ctx)
    metrics = experience_metrics(stats)
    run.kl_controller.update(metrics["kl"], ppo.rollout_batch_size)
    run.sampler.advance(ppo.rollout_batch_size)
    metrics.update(update_metrics(critic_stats, actor_stats))
    metrics.update(kl_coef=kl_coef, actor_lr=_lr(run.actor), critic_lr=_lr(run.critic))
    metrics.update(throughput_metrics(timer.pop(), stats, ppo.ppo_epochs))
    new_state = PPOState(step=state.step + 1, consumed_prompts=state.consumed_prompts + ppo.rollout_batch_size,
                         sampler=run.sampler.state_dict(), kl_coef=run.kl_controller.value)
    return StepResult(metrics, experience, tuple(prompt.id for prompt in prompts), new_state)


def _lr(setup: TrainingSetup) -> float:
    return float(setup.optimizer.param_groups[0]["lr"])
