"""PPO checkpoints: actor and critic (weights, optimizer, LR schedule), RNG, KL controller and prompt position.

Layout under <logging.out_dir>/checkpoints:

    actor/step_000010/   a megaseg.checkpoint.step_dirs step directory (model + optimizer + schedule + RNG + progress)
    actor/latest
    critic/step_000010/  the same for the critic, written AFTER the actor's
    critic/latest

A PPO step N is complete when critic/step_N exists (the actor's is written first and both keep the same number of
steps), so resuming reads critic/latest and the actor's directory of the same step. The progress of both holds the
PPO state (``PPOState``): the prompt sampler's position and the KL coefficient. The rollouts' sampling generator
is derived from (seed, step, data-parallel rank), so nothing else is needed for an exact continuation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megaseg.config import MegasegConfig, load_config
from megaseg.checkpoint.step_dirs import (
    TrainingProgress,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_dir_name,
)
from megaseg.training.common.optimizer import TrainingSetup

CHECKPOINTS_DIR = "checkpoints"
ACTOR_DIR = "actor"
CRITIC_DIR = "critic"
# Settings a resumed run must share with the checkpoint: otherwise the continuation is another experiment.
RESUME_INVARIANTS = ("seed", "model.name", "ppo.reward_granularity", "ppo.rollout_batch_size", "ppo.train_batch_size",
                     "ppo.ppo_epochs", "ppo.interpolation", "normalizer.kind", "segmentation.mode",
                     "segmentation.entropy_cutoff", "data.prompt_path", "data.shuffle", "rm.checkpoint")


@dataclass(frozen=True)
class PPOState:
    """Where PPO stands after ``step`` PPO steps (one rollout batch each)."""

    step: int = 0
    consumed_prompts: int = 0      # over all data-parallel ranks
    sampler: Optional[dict] = None  # ResumableShardedSampler.state_dict(); None before the first step
    kl_coef: Optional[float] = None  # the KL controller's value; None: the configured initial one

    def as_progress(self) -> TrainingProgress:
        return TrainingProgress(step=self.step, consumed_samples=self.consumed_prompts,
                                epoch=(self.sampler or {}).get("epoch", 0),
                                data_state={"sampler": self.sampler, "kl_coef": self.kl_coef})

    @classmethod
    def from_progress(cls, progress: TrainingProgress) -> "PPOState":
        return cls(step=progress.step, consumed_prompts=progress.consumed_samples,
                   sampler=progress.data_state.get("sampler"), kl_coef=progress.data_state.get("kl_coef"))


def checkpoint_root(config: MegasegConfig) -> Path:
    return Path(config.logging.out_dir) / CHECKPOINTS_DIR


def save_ppo_checkpoint(root: str | Path, *, actor: TrainingSetup, critic: TrainingSetup, config: MegasegConfig,
                        state: PPOState, keep_last: Optional[int] = None) -> Path:
    """Write actor then critic step directories for ``state.step``; collective. Returns the critic's directory."""
    root = Path(root)
    progress = state.as_progress()
    save_checkpoint(root / ACTOR_DIR, model=actor.model, config=config, progress=progress, optimizer=actor.optimizer,
                    scheduler=actor.scheduler, keep_last=keep_last)
    return save_checkpoint(root / CRITIC_DIR, model=critic.model, config=config, progress=progress,
                           optimizer=critic.optimizer, scheduler=critic.scheduler, keep_last=keep_last)


def latest_ppo_step(root: str | Path) -> Optional[int]:
    """The newest complete PPO step under ``root`` (critic written, actor present), or None."""
    root = Path(root)
    critic_dir = latest_checkpoint(root / CRITIC_DIR)
    if critic_dir is None:
        return None
    step = int(critic_dir.name.split("_")[-1])
    if not (root / ACTOR_DIR / step_dir_name(step)).is_dir():
        raise ValueError(f"{critic_dir} has no actor checkpoint beside it ({root / ACTOR_DIR / step_dir_name(step)} "
                         "is missing); the checkpoint directory was edited by hand. Restore it or start a fresh run "
                         "(checkpoint.resume=false)")
    return step


def _value(config: MegasegConfig, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def check_resume_invariants(saved: MegasegConfig, config: MegasegConfig, where: Path) -> None:
    changed = [f"{key}: checkpoint {_value(saved, key)!r}, now {_value(config, key)!r}" for key in RESUME_INVARIANTS
               if _value(saved, key) != _value(config, key)]
    if changed:
        raise ValueError(f"cannot resume from {where}: {'; '.join(changed)}. Use the checkpoint's settings, or start "
                         "a fresh run (checkpoint.resume=false, or another logging.out_dir)")


def load_ppo_checkpoint(root: str | Path, step: int, *, actor: TrainingSetup, critic: TrainingSetup,
                        config: MegasegConfig) -> PPOState:
    """Restore actor, critic, their optimizers and schedules, the RNG states and the PPO state of ``step``."""
    root = Path(root)
    actor_dir = root / ACTOR_DIR / step_dir_name(step)
    critic_dir = root / CRITIC_DIR / step_dir_name(step)
    check_resume_invariants(load_config(critic_dir / "config.yaml"), config, critic_dir)
    load_checkpoint(actor_dir, model=actor.model, model_cfg=config.model, optimizer=actor.optimizer,
                    scheduler=actor.scheduler)
    loaded = load_checkpoint(critic_dir, model=critic.model, model_cfg=config.model, optimizer=critic.optimizer,
                             scheduler=critic.scheduler)
    return PPOState.from_progress(loaded.progress)


def state_with(state: PPOState, **changes: Any) -> PPOState:
    return dataclasses.replace(state, **changes)
