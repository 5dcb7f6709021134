"""PPO (paper Table 9) and DPO (Table 3) settings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megaseg.config._checks import check_choice, check_non_negative, check_positive, check_range
from megaseg.config.training import OptimizerConfig

REWARD_GRANULARITIES = ("segment", "bandit", "token", "sentence", "ngram",
                        "bandit_as_segment", "segment_as_bandit")
INTERPOLATIONS = ("even", "repeat", "none")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
# How rollouts run the actor (megaseg.generation): megatron's static KV cache, or a full forward per step.
GENERATION_BACKENDS = ("kv_cache", "full_forward")
# How token losses reduce to the update's loss (megaseg.algorithms.ppo.aggregate_loss; veRL's names).
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


@dataclass(frozen=True)
class PPOConfig:
    reward_granularity: str = "segment"
    interpolation: str = "even"
    reward_clip: float = 10.0
    kl_coef: float = 0.01
    kl_estimator: str = "k1"
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    # 0.25 for segment/token rewards, 0.2 for bandit in the paper.
    value_clip: float = 0.25
    # token-mean: every token of the train batch weighs the same; seq-mean-token-mean: every response does (the
    # paper's released code, used by examples/paper); seq-mean-token-sum: response token sums, averaged.
    loss_aggregation: str = "token-mean"
    ppo_epochs: int = 1
    episodes: int = 1
    rollout_batch_size: int = 1024
    train_batch_size: int = 128
    micro_batch_size: int = 1
    max_prompt_length: int = 1024
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    generation_backend: str = "kv_cache"
    actor_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=5e-7))
    critic_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=9e-6))
    sample_every: int = 10
    # Rollouts whose generated text and per-segment rewards go to <out>/samples.jsonl every sample_every steps.
    num_logged_samples: int = 2
    # Stop after this many PPO steps (None: `episodes` passes over the prompts). A stop point: the LR schedules span
    # the episodes either way, so a resumed run may stop later or earlier.
    max_steps: Optional[int] = None
    # Sequences per forward pass of generation and of the experience forwards (actor, reference, critic, RM),
    # per data-parallel rank; inference only, so it can be larger than micro_batch_size.
    micro_rollout_batch_size: int = 16
    # Whiten advantages with mean/std over the whole rollout batch (all data-parallel ranks).
    whiten_advantages: bool = True
    # Train only the top N transformer layers (+ final norm and head / output layer); None: all. For small machines.
    actor_train_top_layers: Optional[int] = None
    critic_train_top_layers: Optional[int] = None
    # Held-out evaluation every N PPO steps (0: never): responses to data.eval_prompt_path scored by the reward
    # model (mean segment reward e(x, y), raw) and their KL to the reference; greedy unless eval_greedy=false.
    eval_every: int = 0
    eval_max_prompts: Optional[int] = None
    eval_greedy: bool = True

    def __post_init__(self) -> None:
        check_choice("ppo.reward_granularity", self.reward_granularity, REWARD_GRANULARITIES)
        check_choice("ppo.interpolation", self.interpolation, INTERPOLATIONS)
        check_choice("ppo.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice("ppo.loss_aggregation", self.loss_aggregation, LOSS_AGGREGATIONS)
        check_choice("ppo.generation_backend", self.generation_backend, GENERATION_BACKENDS)
        check_positive("ppo.reward_clip", self.reward_clip)
        check_non_negative("ppo.kl_coef", self.kl_coef)
        check_range("ppo.gamma", self.gamma, 0.0, 1.0)
        check_range("ppo.lam", self.lam, 0.0, 1.0)
        check_positive("ppo.clip_eps", self.clip_eps)
        check_positive("ppo.value_clip", self.value_clip)
        for name in ("ppo_epochs", "episodes", "rollout_batch_size", "train_batch_size", "micro_batch_size",
                     "max_prompt_length", "max_new_tokens"):
            check_positive(f"ppo.{name}", getattr(self, name))
        check_positive("ppo.temperature", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"ppo.top_p={self.top_p!r} must lie in (0, 1]")
        check_non_negative("ppo.top_k", self.top_k)
        check_positive("ppo.sample_every", self.sample_every)
        check_non_negative("ppo.num_logged_samples", self.num_logged_samples)
        check_positive("ppo.max_steps", self.max_steps, allow_none=True)
        check_positive("ppo.micro_rollout_batch_size", self.micro_rollout_batch_size)
        check_positive("ppo.actor_train_top_layers", self.actor_train_top_layers, allow_none=True)
        check_positive("ppo.critic_train_top_layers", self.critic_train_top_layers, allow_none=True)
        check_non_negative("ppo.eval_every", self.eval_every)
        check_positive("ppo.eval_max_prompts", self.eval_max_prompts, allow_none=True)
        if self.rollout_batch_size % self.train_batch_size:
            raise ValueError(f"ppo.rollout_batch_size={self.rollout_batch_size} must be a multiple of "
                             f"ppo.train_batch_size={self.train_batch_size} (each rollout is cut into whole train "
                             "batches)")
        if self.train_batch_size % self.micro_batch_size:
            raise ValueError(f"ppo.train_batch_size={self.train_batch_size} must be a multiple of "
                             f"ppo.micro_batch_size={self.micro_batch_size}")


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    label_smoothing: float = 0.0
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=5e-7))
    global_batch_size: int = 128
    micro_batch_size: int = 1
    epochs: int = 1
    # Stop after this many optimizer steps (None: run the epochs). A stop point: the LR schedule spans the epochs
    # either way, so a resumed run may stop later or earlier.
    max_steps: Optional[int] = None
    # Loss / accuracy / implicit rewards on the held-out pairs (data.eval_path or data.eval_fraction) every N steps
    # (0: only at the end, when there is an eval split).
    eval_every: int = 0

    def __post_init__(self) -> None:
        check_positive("dpo.max_steps", self.max_steps, allow_none=True)
        check_non_negative("dpo.eval_every", self.eval_every)
        check_positive("dpo.beta", self.beta)
        # 0.5 would make the conservative-DPO loss ignore the preference label entirely.
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing={self.label_smoothing!r} must lie in [0, 0.5)")
        check_positive("dpo.global_batch_size", self.global_batch_size)
        check_positive("dpo.micro_batch_size", self.micro_batch_size)
        check_positive("dpo.epochs", self.epochs)
