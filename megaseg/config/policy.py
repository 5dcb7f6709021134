"""PPO (paper Table 9) and DPO (Table 3) settings."""
from __future__ import annotations

from dataclasses import dataclass, field

from megaseg.config._checks import check_choice, check_non_negative, check_positive, check_range
from megaseg.config.training import OptimizerConfig

REWARD_GRANULARITIES = ("segment", "bandit", "token", "sentence", "ngram",
                        "bandit_as_segment", "segment_as_bandit")
INTERPOLATIONS = ("even", "repeat", "none")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


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
    actor_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=5e-7))
    critic_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=9e-6))
    sample_every: int = 10

    def __post_init__(self) -> None:
        check_choice("ppo.reward_granularity", self.reward_granularity, REWARD_GRANULARITIES)
        check_choice("ppo.interpolation", self.interpolation, INTERPOLATIONS)
        check_choice("ppo.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
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


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    label_smoothing: float = 0.0
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=5e-7))
    global_batch_size: int = 128
    micro_batch_size: int = 1
    epochs: int = 1

    def __post_init__(self) -> None:
        check_positive("dpo.beta", self.beta)
        check_range("dpo.label_smoothing", self.label_smoothing, 0.0, 0.5)
        check_positive("dpo.global_batch_size", self.global_batch_size)
        check_positive("dpo.micro_batch_size", self.micro_batch_size)
        check_positive("dpo.epochs", self.epochs)
