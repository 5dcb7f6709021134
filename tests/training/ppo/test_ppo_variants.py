"""Every row config of examples/paper runs one PPO step: its reward settings (granularity, segmentation, normalizer,
interpolation, value clip) applied to a tiny model, with a tiny reward model trained the way the row needs, and a
normalizer file fitted and checked the way `megaseg train-ppo` checks it.

All distinct variants run in one spawned rank (the rows of both backbones share them); each parametrized test then
checks its row's step.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from megaseg.config import load_config
from megaseg.parallel.spawn import run_distributed

from ppo_test_setup import tiny_config

pytestmark = pytest.mark.distributed

PAPER = Path(__file__).resolve().parents[3] / "examples" / "paper"
# PPO rows (Table 3's DPO baseline has its own trainer and tests).
ROW_FILES = sorted(path for path in PAPER.glob("*/*.yaml") if path.name != "common.yaml" and "dpo" not in path.stem)
# The rows' entropy cutoffs (1.5 - 2.25) are for real backbones; the tiny random model's entropies sit near log(128),
# so its steps use the tiny config's cutoff, and rows differing only in c_ent share one step.
VARIANT_KEYS = ("ppo.reward_granularity", "ppo.interpolation", "ppo.value_clip", "normalizer.kind",
                "segmentation.mode", "segmentation.ngram_size", "rm.aggregation")
SMALL = ("model.num_layers=1", "ppo.rollout_batch_size=2", "ppo.train_batch_size=2", "ppo.micro_rollout_batch_size=2",
         "ppo.max_new_tokens=4")


def variant_of(path: Path) -> tuple[str, ...]:
    config = load_config(path)
    return tuple(f"{key}={OmegaConf.select(OmegaConf.structured(config), key)}" for key in VARIANT_KEYS)


def _normalizer_file(plan, rm_config, rm_dir: Path) -> None:
    """Fit the row's normalizer kind on synthetic calibration rewards with the metadata fit-normalizer records."""
    import numpy as np

    from megaseg.algorithms.normalizer import (BanditNormalizer, GlobalNormalizer, LastSegmentNormalizer,
                                               LocationNormalizer)
    from megaseg.scoring.normalizer_file import normalizer_metadata

    if plan.normalizer_kind == "none":
        return
    rng = np.random.default_rng(1)
    p = np.concatenate([(np.arange(t) + 1) / t for t in rng.integers(1, 7, size=100)])
    r = 0.5 * np.log(p) + rng.normal(0.0, 1.0, p.size)
    metadata = normalizer_metadata(rm_config.model.name, plan.segmentation, plan.aggregation)
    cls = {"location": LocationNormalizer, "global": GlobalNormalizer, "last_segment": LastSegmentNormalizer,
           "bandit": BanditNormalizer}[plan.normalizer_kind]
    cls.fit(p, r, **metadata).save(rm_dir / "normalizer.json")


def _run_variants(rank, world_size, variants, work_dir):
    import dataclasses

    from megaseg.models.scalar_head import build_reward_model
    from megaseg.parallel import initialize_parallel
    from megaseg.training.ppo.experience import RewardModelScorer
    from megaseg.training.ppo.reward_plan import MODES, check_reward_model, load_plan_normalizer, resolve_reward_plan

    from ppo_test_setup import build_tiny_models, build_tiny_run, run_ppo_steps

    ctx = initialize_parallel(tiny_config().parallel, seed=3)
    small = tiny_config(*SMALL)
    reward_model = build_reward_model(small.model, small.parallel, seed=small.seed)
    results = {}
    for index, variant in enumerate(variants):
        config = tiny_config(*SMALL, *variant)
        plan = resolve_reward_plan(config)
        # The reward model this row reads was trained with the segmentation its granularity asks for.
        rm_config = tiny_config(*variant, f"segmentation.mode={MODES[plan.granularity][1]}")
        check_reward_model(plan, rm_config, "rm")
        rm_dir = Path(work_dir) / f"rm{index}"
        rm_dir.mkdir()
        _normalizer_file(plan, rm_config, rm_dir)
        normalizer = load_plan_normalizer(plan, config, rm_config, rm_dir)
        config = dataclasses.replace(config, normalizer=dataclasses.replace(config.normalizer, path=None))
        run = build_tiny_run(config, ctx, plan=plan, normalizer=normalizer, models=build_tiny_models(config),
                             scorer=RewardModelScorer(reward_model, ctx, micro_batch_size=2))
        (metrics,), _ = run_ppo_steps(run, 1)
        experience = run.last_experience
        results[variant] = (metrics, int(experience.reward_ends.sum()), int(experience.segment_ends.sum()),
                            experience.batch_size)
    return results


@pytest.fixture(scope="module")
def variant_results(tmp_path_factory):
    variants = sorted({variant_of(path) for path in ROW_FILES})
    (results,) = run_distributed(_run_variants, 1, variants, str(tmp_path_factory.mktemp("variants")), timeout=600)
    return results


def test_every_table_row_has_a_config():
    names = {path.stem for path in ROW_FILES if path.parent.name == "phi3-mini"}
    assert names == {path.stem for path in ROW_FILES if path.parent.name == "llama3-8b"}
    expected = {"table1-bandit", "table1-sentence", "table1-token", "table1-segment", "table1-bandit-as-segment",
                "table1-segment-as-bandit", "table4-ngram2", "table4-ngram5", "table4-ngram10", "table4-ngram20",
                "table5-norm-none", "table5-norm-global", "table5-norm-last", "table6-interp-none",
                "table6-interp-repeat", "fig3-cent1.5", "fig3-cent1.75", "fig3-cent2", "fig3-cent2.25"}
    assert names == expected


@pytest.mark.parametrize("path", ROW_FILES, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_row_config_runs_one_step(variant_results, path):
    metrics, num_rewards, num_segments, batch_size = variant_results[variant_of(path)]
    config = load_config(path)
    for key in ("rm_score", "kl", "policy_loss", "value_loss", "normalized_segment_reward", "entropy"):
        assert math.isfinite(metrics[key]), (path.name, key, metrics[key])
    if config.ppo.reward_granularity in ("bandit", "segment_as_bandit"):
        assert num_rewards == batch_size  # one reward per response, on its last token
    else:
        assert num_rewards == num_segments >= batch_size
