"""`megaseg train-ppo`: PPO against a segment (or baseline) reward model, every variant of the paper by config.

    megaseg train-ppo --config examples/ppo_cpu.yaml [section.key=value ...]

``PPOTrainer.from_config`` (megaseg.training.ppo.setup) builds the run: tokenizer, prompts, reward model + normalizer
(checked against ppo.reward_granularity), actor / reference / critic from the SFT checkpoint. ``PPOTrainer(...)``
takes already-built models and rewards, so tests run the same trainer on tiny models and hand-written rewards. The
common loop (megaseg.training.common.loop) resumes, steps, evaluates (ppo.eval_every, and once before training) and
checkpoints (actor and critic in one step directory). One PPO step, each phase timed:

    rollout -> actor_forward -> reference_forward -> critic_forward -> segmentation -> score_segments -> normalize
    -> interpolate -> advantages -> update_critic -> update_actor

Metrics go to <out>/metrics.jsonl and TensorBoard (headline under train/, losses and the rest under ppo/, tokens/s
under speed/, phase seconds under time/), text samples with per-segment rewards to <out>/samples.jsonl.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from megaseg.algorithms.normalizer import Normalizer
from megaseg.algorithms.ppo import AdaptiveKLController, FixedKLController
from megaseg.checkpoint.sft import freeze
from megaseg.checkpoint.step_dirs import TrainedModel, TrainingProgress
from megaseg.config import MegasegConfig
from megaseg.data.encoding import TokenizedPrompt
from megaseg.generation.rollout import RolloutFn, generate_rollouts, rollout_generator
from megaseg.generation.settings import SamplingSettings
from megaseg.parallel.initialize import ParallelContext
from megaseg.training.common.loop import StepReport, Trainer, plan_steps, rank_sampler
from megaseg.training.common.optimizer import TrainingSetup, setup_training
from megaseg.training.ppo.evaluation import evaluate_policy
from megaseg.training.ppo.experience import Experience, ExperienceSources, make_experience
from megaseg.training.ppo.metrics import (
    experience_metrics,
    reduce_experience_statistics,
    segment_samples,
    throughput_metrics,
    update_metrics,
    write_samples,
)
from megaseg.training.ppo.reward_plan import RewardPlan
from megaseg.training.ppo.reward_shaping import SegmentScorer, SentenceMarker
from megaseg.training.ppo.update import train_batches, update_actor, update_critic

# Logged under train/ and shown on the progress line; everything else goes under ppo/ and speed/.
PROGRESS_KEYS = ("rm_score", "normalized_segment_reward", "kl", "response_length", "policy_loss", "value_loss")


def train_ppo(config: MegasegConfig, explicit_keys: frozenset[str] = frozenset()) -> int:
    """CLI entry: set up the process groups, run PPO, tear down. Returns the exit code. ``explicit_keys``: the
    settings the user gave (an explicit rm.aggregation must agree with the reward model's)."""
    from megaseg.parallel import parallel_session
    from megaseg.training.ppo.setup import build_ppo_trainer

    with parallel_session(config) as parallel_ctx:
        build_ppo_trainer(config, parallel_ctx, explicit_keys).run()
    return 0


def build_kl_controller(config: MegasegConfig, value: Optional[float] = None):
    """Fixed (the paper: beta 0.01) or adaptive (Ziegler et al.) KL coefficient, starting at ``value`` on resume."""
    ppo = config.ppo
    start = ppo.kl_coef if value is None else value
    if ppo.adaptive_kl:
        return AdaptiveKLController(start, ppo.kl_target, ppo.kl_horizon)
    return FixedKLController(start)


@dataclasses.dataclass(frozen=True)
class PolicyModels:
    """This rank's stages of the models PPO reads or trains (not yet wrapped for training)."""

    actor: torch.nn.Module      # GPTModel, from the SFT weights
    reference: torch.nn.Module  # GPTModel, frozen copy of the SFT weights
    critic: torch.nn.Module     # scalar-head model, SFT backbone + fresh head


class PPOTrainer(Trainer):
    config_sections = ("seed", "model", "data", "segmentation", "rm", "normalizer", "ppo")

    def __init__(self, config: MegasegConfig, parallel_ctx: ParallelContext, *, models: PolicyModels,
                 reward_plan: RewardPlan, scorer: SegmentScorer, normalizer: Normalizer,
                 prompts: Sequence[TokenizedPrompt], rollout_fn: RolloutFn, stop_token_ids: Sequence[int],
                 pad_token_id: int, sentence_marker: Optional[SentenceMarker] = None,
                 decode: Optional[Callable[[list[int]], str]] = None,
                 eval_prompts: Sequence[TokenizedPrompt] = ()) -> None:
        ppo = config.ppo
        dp_size = parallel_ctx.dp_size
        if ppo.train_batch_size % (dp_size * ppo.micro_batch_size):
            raise ValueError(f"ppo.train_batch_size={ppo.train_batch_size} must be a multiple of data-parallel size "
                             f"{dp_size} x ppo.micro_batch_size={ppo.micro_batch_size}; change the batch sizes or the "
                             "parallel layout")
        plan = plan_steps(section="ppo", num_samples=len(prompts), global_batch_size=ppo.rollout_batch_size,
                          micro_batch_size=1, dp_size=dp_size, epochs=ppo.episodes, max_steps=ppo.max_steps,
                          batch_key="rollout_batch_size", epochs_key="episodes", unit="prompts")
        super().__init__(config, parallel_ctx, plan=plan, sampler=rank_sampler(len(prompts), config, parallel_ctx))
        optimizer_steps = plan.schedule_steps * ppo.ppo_epochs * (ppo.rollout_batch_size // ppo.train_batch_size)
        self.actor = setup_training(models.actor, ppo.actor_optimizer, optimizer_steps, ppo.actor_train_top_layers)
        self.critic = setup_training(models.critic, ppo.critic_optimizer, optimizer_steps,
                                     ppo.critic_train_top_layers)
        self.sources = ExperienceSources(actor=self.actor.model, reference=freeze(models.reference), critic=self.critic.model,
                                         scorer=scorer, normalizer=normalizer, sentence_marker=sentence_marker)
        self.reward_plan = reward_plan
        self.prompts, self.eval_prompts = list(prompts), list(eval_prompts)
        self.rollout_fn, self.decode = rollout_fn, decode
        self.stop_token_ids = tuple(int(i) for i in stop_token_ids)
        self.pad_token_id = pad_token_id
        self.kl_controller = build_kl_controller(config)
        # The last step's rollouts with their rewards, their prompts and every metric (samples, tests).
        self.last_experience: Optional[Experience] = None
        self.last_prompt_ids: tuple[str, ...] = ()
        self.last_metrics: dict[str, float] = {}

    def trained_models(self) -> Mapping[str, TrainedModel]:
        return {"actor": self.actor, "critic": self.critic}

    def trainer_state(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_controller.value}

    def load_trainer_state(self, state: Mapping[str, Any]) -> None:
        self.kl_controller = build_kl_controller(self.config, state["kl_coef"])

    @property
    def eval_every(self) -> int:
        return self.config.ppo.eval_every

    @property
    def evaluates_at_start(self) -> bool:  # the baseline of the eval curve
        return self.config.ppo.eval_every > 0

    @property
    def evaluates_at_end(self) -> bool:
        return False

    def describe(self) -> str:
        ppo = self.config.ppo
        return (f"PPO: {self.reward_plan.describe()}; {self.plan.total_steps} steps of {ppo.rollout_batch_size} "
                f"prompts ({len(self.prompts)} prompts, {self.ctx.dp_size} data-parallel ranks)")

    def sampling_settings(self, greedy: bool = False) -> SamplingSettings:
        """The rollout settings of ppo (temperature, top-p/k, max_new_tokens) with the model's stop tokens."""
        settings = SamplingSettings.from_ppo_config(self.config.ppo, self.stop_token_ids)
        return dataclasses.replace(settings, greedy=greedy)

    def step(self, indices: list[int], progress: TrainingProgress) -> StepReport:
        """Rollout, experience and update of step ``progress.step + 1`` (collective over every rank)."""
        config, ctx, ppo = self.config, self.ctx, self.config.ppo
        prompts = [self.prompts[index] for index in indices]
        kl_coef = self.kl_controller.value
        with self.timer.phase("rollout"):
            generator = rollout_generator(config.seed, progress.step, ctx.dp_rank, ctx.device)
            rollout = generate_rollouts(self.rollout_fn, self.actor.model, prompts, self.sampling_settings(), ctx,
                                        generator=generator, micro_batch_size=ppo.micro_rollout_batch_size,
                                        pad_token_id=self.pad_token_id)
        experience = make_experience(rollout, self.sources, self.reward_plan, ppo, kl_coef, ctx, self.timer,
                                     config.segmentation.entropy_chunk_size, packing=config.data.packing)
        batches = train_batches(experience, rows_per_step=ppo.train_batch_size // ctx.dp_size,
                                micro_batch_size=ppo.micro_batch_size, num_epochs=ppo.ppo_epochs, seed=config.seed,
                                step=progress.step, parallel_ctx=ctx, packing=config.data.packing)
        with self.timer.phase("update_critic"):
            critic_stats = update_critic(self.critic, batches, ppo.value_clip, ppo.loss_aggregation, ctx)
        with self.timer.phase("update_actor"):
            actor_stats = update_actor(self.actor, batches, ppo.clip_eps, ppo.loss_aggregation, ctx)
        stats = reduce_experience_statistics(experience, self.reward_plan, ctx)
        metrics = experience_metrics(stats)
        self.kl_controller.update(metrics["kl"], ppo.rollout_batch_size)
        metrics.update(update_metrics(critic_stats, actor_stats))
        metrics.update(kl_coef=kl_coef, actor_lr=_lr(self.actor), critic_lr=_lr(self.critic))
        self.last_experience, self.last_prompt_ids = experience, tuple(prompt.id for prompt in prompts)
        self.last_metrics = dict(metrics)
        step = progress.step + 1
        if ctx.is_rank_zero and self.decode is not None and (step % ppo.sample_every == 0 or step == 1):
            rows = range(min(ppo.num_logged_samples, experience.batch_size))
            write_samples(Path(config.logging.out_dir),
                          segment_samples(experience, rows, self.decode, self.last_prompt_ids, self.reward_plan, step))
        speed = throughput_metrics(self.timer.seconds(), stats, ppo.ppo_epochs)
        headline = {key: metrics[key] for key in PROGRESS_KEYS if key in metrics}
        rest = {key: value for key, value in metrics.items() if key not in headline}
        return StepReport(train=headline, extra={"ppo": rest, "speed": speed})

    def evaluate(self, step: int) -> Optional[dict[str, float]]:
        return evaluate_policy(self, step)


def _lr(setup: TrainingSetup) -> float:
    return float(setup.optimizer.param_groups[0]["lr"])
