"""Reward-model training (paper Table 8) and the location-aware normalizer fitted after it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megaseg.config._checks import check_choice, check_non_negative, check_positive
from megaseg.config.training import OptimizerConfig

AGGREGATIONS = ("mean", "sum", "last", "min")
# The "kind" of a normalizer, in the config and in the normalizer file alike (megaseg.algorithms.normalizer).
NORMALIZER_KINDS = ("location", "none", "global", "last_segment", "bandit")
FIT_METHODS = ("huber", "ols")


@dataclass(frozen=True)
class RewardModelConfig:
    # A trained reward model checkpoint (read by fit-normalizer, eval-rm and PPO).
    checkpoint: Optional[str] = None
    # f(.) of Eq. 3; the paper uses the average (Eq. 4).
    aggregation: str = "mean"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    global_batch_size: int = 128
    micro_batch_size: int = 1
    epochs: int = 1
    # Stop after this many optimizer steps (None: run the epochs). A stop point: the LR schedule spans the epochs
    # either way, so a resumed run may stop later or earlier.
    max_steps: Optional[int] = None
    # Train only the top N transformer layers and the head (None: all), for small machines.
    train_top_layers: Optional[int] = None
    # With train_top_layers set, one process and the whole model on it: keep the frozen bottom layers' output of
    # every sequence (taken from the entropy pass) in memory and run only the top layers + head in every epoch and
    # in the held-out scoring (exact; megaseg.training.reward_model.frozen_prefix). Elsewhere the normal path runs.
    # Off by default until the whole suite has run with it on (the quickstart turns it on); its batches are not packed.
    frozen_prefix: bool = False
    # Validate on the eval split every N optimizer steps (0: never during training).
    eval_every: int = 0
    # Validate once more after the last step (its metrics go into reward_model.json); off when a separate
    # evaluation follows anyway (the quickstart runs eval-rm's).
    validate_at_end: bool = True
    # Sequences per forward pass when scoring (fit-normalizer, eval-rm): inference only, so larger than training's.
    scoring_micro_batch_size: int = 8

    def __post_init__(self) -> None:
        check_choice("rm.aggregation", self.aggregation, AGGREGATIONS)
        check_positive("rm.scoring_micro_batch_size", self.scoring_micro_batch_size)
        check_positive("rm.global_batch_size", self.global_batch_size)
        check_positive("rm.micro_batch_size", self.micro_batch_size)
        check_positive("rm.epochs", self.epochs)
        check_positive("rm.max_steps", self.max_steps, allow_none=True)
        check_non_negative("rm.eval_every", self.eval_every)
        check_positive("rm.train_top_layers", self.train_top_layers, allow_none=True)


@dataclass(frozen=True)
class NormalizerConfig:
    # location = the paper's Mean(p)/Std(p) fitted on log p; none/global/last_segment = Table 5 ablations;
    # bandit = scalar statistics of sequence rewards.
    kind: str = "location"
    method: str = "huber"
    # Calibration pairs to score (the paper: 60,000); None = all of data.train_path.
    num_samples: Optional[int] = None
    # normalizer.json to use in PPO; None = <rm.checkpoint>/normalizer.json.
    path: Optional[str] = None

    def __post_init__(self) -> None:
        check_choice("normalizer.kind", self.kind, NORMALIZER_KINDS)
        check_choice("normalizer.method", self.method, FIT_METHODS)
        check_positive("normalizer.num_samples", self.num_samples, allow_none=True)
