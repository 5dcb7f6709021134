"""What a PPO run's reward granularity means, resolved once from the config and checked against the reward model.

``ppo.reward_granularity`` names a row of the paper's Tables 1 and 4; it fixes three things:

| granularity        | rollouts are cut by (`segmentation.mode`) | the RM was trained with | reward placed on             |
|--------------------|-------------------------------------------|-------------------------|------------------------------|
| segment (ours)     | entropy (c_ent)                           | entropy, same c_ent     | each segment's tokens        |
| token              | token                                     | token                   | each content token           |
| sentence           | sentence                                  | sentence                | each sentence's tokens       |
| ngram              | ngram (n)                                 | ngram, same n           | each n-gram's tokens         |
| bandit             | bandit                                    | bandit                  | the last response token      |
| bandit_as_segment  | entropy (c_ent of this run)               | bandit                  | each segment's tokens        |
| segment_as_bandit  | entropy (the RM's c_ent)                  | entropy, same c_ent     | the last token, e(x, y) once |

"Sequence-level" granularities (bandit, segment_as_bandit) put one scalar on the last response token (EOS, or the
last token of a truncated response); they take the scalar normalizers (bandit, none) and no interpolation. The
others take the segment normalizers (location, none, global, last_segment) and any interpolation.

The normalizer file is checked against the reward model (megaseg.scoring.normalizer_file): its kind, and the
metadata it was calibrated with (model, segmentation, c_ent, aggregation). Without a matching file PPO does not
start; the error gives the exact ``megaseg fit-normalizer`` command that writes one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megaseg.algorithms.normalizer import Normalizer
from megaseg.config import MegasegConfig
from megaseg.config.segmentation import SegmentationConfig
from megaseg.scoring.normalizer_file import fit_normalizer_hint, load_matching_normalizer, normalizer_metadata
from megaseg.segmentation.cache_keys import segment_settings

# granularity -> (segmentation.mode of the rollouts, segmentation.mode the reward model was trained with)
MODES = {
    "segment": ("entropy", "entropy"),
    "token": ("token", "token"),
    "sentence": ("sentence", "sentence"),
    "ngram": ("ngram", "ngram"),
    "bandit": ("bandit", "bandit"),
    "bandit_as_segment": ("entropy", "bandit"),
    "segment_as_bandit": ("entropy", "entropy"),
}
SEQUENCE_LEVEL = frozenset({"bandit", "segment_as_bandit"})
SEGMENT_NORMALIZER_KINDS = ("location", "none", "global", "last_segment")
SEQUENCE_NORMALIZER_KINDS = ("bandit", "none")


@dataclass(frozen=True)
class RewardPlan:
    """How rewards are produced in one PPO run (everything the experience maker branches on)."""

    granularity: str
    segmentation: SegmentationConfig  # how rollouts are cut into the segments the reward model scores
    sequence_level: bool              # one scalar e(x, y) on the last token instead of per-segment rewards
    aggregation: str                  # e(x, y) = aggregation of segment rewards (segment_as_bandit, metrics)
    interpolation: str                # even | repeat | none (none for sequence-level granularities)
    normalizer_kind: str              # normalizer.kind of the config

    @property
    def entropy_needed(self) -> bool:
        return self.segmentation.mode == "entropy"

    def describe(self) -> str:
        cut = self.segmentation.mode
        if cut == "entropy":
            cut += f" c_ent={self.segmentation.entropy_cutoff:g}"
        elif cut == "ngram":
            cut += f" n={self.segmentation.ngram_size}"
        placed = "e(x, y) on the last token" if self.sequence_level else f"{self.interpolation} interpolation"
        return (f"reward granularity {self.granularity}: rollouts cut by {cut}, {placed}, normalizer "
                f"{self.normalizer_kind}")


def resolve_reward_plan(config: MegasegConfig) -> RewardPlan:
    """The plan of ``config``; ValueError naming the keys when the sections contradict each other."""
    ppo, segmentation = config.ppo, config.segmentation
    granularity = ppo.reward_granularity
    rollout_mode, _ = MODES[granularity]
    if segmentation.mode != rollout_mode:
        raise ValueError(
            f"ppo.reward_granularity={granularity!r} cuts rollouts with segmentation.mode={rollout_mode!r}, but "
            f"segmentation.mode={segmentation.mode!r}; set segmentation.mode={rollout_mode}")
    sequence_level = granularity in SEQUENCE_LEVEL
    allowed = SEQUENCE_NORMALIZER_KINDS if sequence_level else SEGMENT_NORMALIZER_KINDS
    if config.normalizer.kind not in allowed:
        what = ("one scalar per response" if sequence_level else "one reward per segment")
        raise ValueError(
            f"normalizer.kind={config.normalizer.kind!r} does not fit ppo.reward_granularity={granularity!r} "
            f"({what}); choose one of {list(allowed)}")
    if sequence_level and ppo.interpolation != "none":
        raise ValueError(
            f"ppo.reward_granularity={granularity!r} puts one reward on the last response token; "
            f"ppo.interpolation={ppo.interpolation!r} would spread it over the response. Set ppo.interpolation=none "
            "(the bandit baseline of the paper)")
    return RewardPlan(granularity=granularity, segmentation=segmentation, sequence_level=sequence_level,
                      aggregation=config.rm.aggregation, interpolation=ppo.interpolation,
                      normalizer_kind=config.normalizer.kind)


def check_reward_model(plan: RewardPlan, rm_config: MegasegConfig, rm_dir: str) -> None:
    """ValueError unless the reward model in ``rm_dir`` (its training config ``rm_config``) suits ``plan``."""
    _, rm_mode = MODES[plan.granularity]
    trained = rm_config.segmentation
    if trained.mode != rm_mode:
        # The hybrid that fits the reward model at hand, keyed by the mode it was trained with.
        hint = {"bandit": "ppo.reward_granularity=bandit_as_segment scores a bandit RM at segment ends",
                "entropy": "ppo.reward_granularity=segment_as_bandit uses a segment RM's e(x, y) as a bandit reward"}
        raise ValueError(
            f"ppo.reward_granularity={plan.granularity!r} needs a reward model trained with segmentation.mode="
            f"{rm_mode!r}, but {rm_dir} was trained with {trained.mode!r}; train one with that mode (megaseg "
            f"train-rm segmentation.mode={rm_mode}) or point rm.checkpoint at one"
            + (f" ({hint[trained.mode]})" if trained.mode in hint else ""))
    if plan.granularity != "bandit_as_segment" and segment_settings(trained) != segment_settings(plan.segmentation):
        raise ValueError(
            f"the reward model {rm_dir} was trained with segmentation {segment_settings(trained)}, this run cuts "
            f"rollouts with {segment_settings(plan.segmentation)}; use the same settings (e.g. "
            f"segmentation.entropy_cutoff={trained.entropy_cutoff:g}) or a reward model trained with yours")
    if rm_config.rm.aggregation != plan.aggregation:
        raise ValueError(
            f"rm.aggregation={plan.aggregation!r} but the reward model {rm_dir} was trained with "
            f"{rm_config.rm.aggregation!r}; drop the override (PPO uses the reward model's aggregation)")


def load_plan_normalizer(plan: RewardPlan, config: MegasegConfig, rm_config: MegasegConfig,
                         rm_dir: str | Path) -> Normalizer:
    """The normalizer the run uses, checked against the plan (the normalizer file's metadata rule); ValueError with
    the fit-normalizer command when it is missing or mismatched. ``rm_dir``: the reward-model directory itself."""
    expected = normalizer_metadata(rm_config.model.name, plan.segmentation, plan.aggregation)
    # A bandit RM is calibrated where PPO reads it: at entropy segment ends.
    calibrate_at = plan.segmentation if plan.granularity == "bandit_as_segment" else None
    hint = fit_normalizer_hint(config, rm_dir, rm_config, calibrate_at)
    return load_matching_normalizer(config, rm_dir, rm_config, expected=expected, hint=hint)
