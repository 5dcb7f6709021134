"""PPO's reward plan: which granularity needs which segmentation, reward model and normalizer, and the refusals
(with the fit-normalizer command that fixes a missing or mismatched normalizer)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from megaseg.algorithms.normalizer import GlobalNormalizer, LocationNormalizer
from megaseg.training.ppo.reward_plan import (
    check_reward_model,
    load_plan_normalizer,
    resolve_reward_plan,
)

from ppo_test_setup import tiny_config


def _rm_config(*overrides):
    return tiny_config(*overrides)


def _location(**metadata):
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 9, size=200)
    p = np.concatenate([(np.arange(t) + 1) / t for t in counts])
    r = 0.7 * np.log(p) + 0.4 + rng.normal(0, 1.0, p.size)
    return LocationNormalizer.fit(p, r, **metadata)


def test_segment_plan_and_matching_normalizer_loads(tmp_path):
    config = tiny_config("segmentation.entropy_cutoff=2.0")
    plan = resolve_reward_plan(config)
    assert (plan.granularity, plan.segmentation.mode, plan.sequence_level) == ("segment", "entropy", False)
    rm_config = _rm_config("segmentation.entropy_cutoff=2.0")
    check_reward_model(plan, rm_config, "rm")
    _location(model="tiny-llama", c_ent=2.0, aggregation="mean", segmentation="entropy").save(
        tmp_path / "normalizer.json")
    normalizer = load_plan_normalizer(plan, config, rm_config, tmp_path)
    assert normalizer.kind == "location"


def test_missing_normalizer_names_the_command(tmp_path):
    config = tiny_config("segmentation.entropy_cutoff=1.75")
    rm_config = _rm_config("segmentation.entropy_cutoff=1.75", "data.train_path=/data/prefs.jsonl")
    plan = resolve_reward_plan(config)
    with pytest.raises(ValueError) as error:
        load_plan_normalizer(plan, config, rm_config, tmp_path)
    message = str(error.value)
    assert f"megaseg fit-normalizer --ckpt {tmp_path} --data /data/prefs.jsonl normalizer.kind=location" in message
    assert "does not exist" in message


def test_custom_path_command_writes_there(tmp_path):
    path = tmp_path / "normalizer_global.json"
    config = tiny_config("normalizer.kind=global", f"normalizer.path={path}")
    plan = resolve_reward_plan(config)
    with pytest.raises(ValueError, match=rf"normalizer.kind=global normalizer.path={path}$"):
        load_plan_normalizer(plan, config, _rm_config(), tmp_path)


@pytest.mark.parametrize("saved,needed", [
    (dict(c_ent=1.5, aggregation="mean", segmentation="entropy"), "c_ent"),
    (dict(c_ent=2.0, aggregation="sum", segmentation="entropy"), "aggregation"),
    (dict(c_ent=None, aggregation="mean", segmentation="bandit"), "segmentation"),
])
def test_mismatched_normalizer_is_refused(tmp_path, saved, needed):
    config = tiny_config("segmentation.entropy_cutoff=2.0")
    _location(model="tiny-llama", **saved).save(tmp_path / "normalizer.json")
    with pytest.raises(ValueError, match=f"(?s)calibrated for other settings.*{needed}.*megaseg fit-normalizer"):
        load_plan_normalizer(resolve_reward_plan(config), config, _rm_config("segmentation.entropy_cutoff=2.0"),
                                 tmp_path)


def test_ngram_normalizer_must_match_n(tmp_path):
    """A normalizer of 2-gram segment rewards does not describe 5-gram ones (the statistics depend on n)."""
    settings = ("segmentation.mode=ngram", "segmentation.ngram_size=5")
    config = tiny_config(*settings, "ppo.reward_granularity=ngram")
    plan, rm_config = resolve_reward_plan(config), _rm_config(*settings)
    _location(model="tiny-llama", c_ent=None, aggregation="mean", segmentation="ngram-2").save(
        tmp_path / "normalizer.json")
    with pytest.raises(ValueError, match="segmentation: file has 'ngram-2', run needs 'ngram-5'"):
        load_plan_normalizer(plan, config, rm_config, tmp_path)
    _location(model="tiny-llama", c_ent=None, aggregation="mean", segmentation="ngram-5").save(
        tmp_path / "normalizer.json")
    assert load_plan_normalizer(plan, config, rm_config, tmp_path).segmentation == "ngram-5"


def test_wrong_kind_and_bad_json_are_refused(tmp_path):
    config = tiny_config("segmentation.entropy_cutoff=2.0")
    GlobalNormalizer(mean=0.0, std=1.0, model="tiny-llama", c_ent=2.0, aggregation="mean",
                     segmentation="entropy").save(tmp_path / "normalizer.json")
    plan = resolve_reward_plan(config)
    with pytest.raises(ValueError, match="holds a 'global' normalizer, but normalizer.kind='location'"):
        load_plan_normalizer(plan, config, _rm_config("segmentation.entropy_cutoff=2.0"), tmp_path)
    (tmp_path / "normalizer.json").write_text(json.dumps({"kind": "location"}))
    with pytest.raises(ValueError, match="not a valid normalizer"):
        load_plan_normalizer(plan, config, _rm_config("segmentation.entropy_cutoff=2.0"), tmp_path)
    # A count the fit must have recorded, edited to null: the error names the file and the field.
    _location(model="tiny-llama", c_ent=2.0, aggregation="mean", segmentation="entropy").save(
        tmp_path / "normalizer.json")
    saved = json.loads((tmp_path / "normalizer.json").read_text())
    saved.pop("content_sha256", None)  # an edit by hand, not damage
    (tmp_path / "normalizer.json").write_text(json.dumps({**saved, "num_samples": None}))
    with pytest.raises(ValueError, match=r"normalizer\.json is not a valid normalizer \(normalizer field "
                                         r"'num_samples' must be a count >= 0, got None\)"):
        load_plan_normalizer(plan, config, _rm_config("segmentation.entropy_cutoff=2.0"), tmp_path)


def test_normalizer_kind_none_needs_no_file(tmp_path):
    config = tiny_config("normalizer.kind=none")
    normalizer = load_plan_normalizer(resolve_reward_plan(config), config, _rm_config(), tmp_path)
    assert normalizer.kind == "none"


@pytest.mark.parametrize("overrides,message", [
    (["ppo.reward_granularity=bandit"], "segmentation.mode='bandit'"),
    (["ppo.reward_granularity=bandit", "segmentation.mode=bandit", "normalizer.kind=bandit"],
     "ppo.interpolation=none"),
    (["ppo.reward_granularity=bandit", "segmentation.mode=bandit", "ppo.interpolation=none"],
     "normalizer.kind='location' does not fit"),
    (["normalizer.kind=bandit"], "normalizer.kind='bandit' does not fit"),
    (["ppo.reward_granularity=token"], "segmentation.mode=token"),
])
def test_contradicting_sections_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        resolve_reward_plan(tiny_config(*overrides))


def test_reward_model_must_fit_the_granularity():
    plan = resolve_reward_plan(tiny_config("segmentation.entropy_cutoff=2.0"))
    with pytest.raises(ValueError, match="trained with 'bandit'.*bandit_as_segment"):
        check_reward_model(plan, _rm_config("segmentation.mode=bandit"), "rm")
    with pytest.raises(ValueError, match="entropy_cutoff=1.75"):
        check_reward_model(plan, _rm_config("segmentation.entropy_cutoff=1.75"), "rm")
    hybrid = resolve_reward_plan(tiny_config("ppo.reward_granularity=bandit_as_segment",
                                             "segmentation.entropy_cutoff=2.0"))
    check_reward_model(hybrid, _rm_config("segmentation.mode=bandit"), "rm")  # any c_ent: the RM has none
    as_bandit = resolve_reward_plan(tiny_config("ppo.reward_granularity=segment_as_bandit", "normalizer.kind=bandit",
                                                "ppo.interpolation=none", "segmentation.entropy_cutoff=2.0"))
    assert as_bandit.sequence_level
    with pytest.raises(ValueError, match="trained with 'bandit'"):
        check_reward_model(as_bandit, _rm_config("segmentation.mode=bandit"), "rm")
    ngram = resolve_reward_plan(tiny_config("ppo.reward_granularity=ngram", "segmentation.mode=ngram",
                                            "segmentation.ngram_size=5"))
    with pytest.raises(ValueError, match="ngram_size"):
        check_reward_model(ngram, _rm_config("segmentation.mode=ngram", "segmentation.ngram_size=10"), "rm")


def test_ppo_takes_the_reward_models_aggregation_and_refuses_a_conflicting_one():
    from megaseg.config.loader import explicit_keys
    from megaseg.training.ppo.setup import with_reward_model_aggregation

    rm_config = _rm_config("rm.aggregation=sum")
    # Not given: the run takes (and so saves) the reward model's aggregation, although its config holds "mean".
    config = with_reward_model_aggregation(tiny_config(), rm_config, "rm", explicit_keys(None, []))
    assert config.rm.aggregation == "sum"
    # Given explicitly, even as the schema default: an error naming both values.
    with pytest.raises(ValueError, match=r"rm.aggregation='mean' was set, but the reward model rm was trained with "
                                         r"rm.aggregation='sum'"):
        with_reward_model_aggregation(tiny_config("rm.aggregation=mean"), rm_config, "rm",
                                      explicit_keys(None, ["rm.aggregation=mean"]))
    agreeing = explicit_keys(None, ["rm.aggregation=sum"])
    assert with_reward_model_aggregation(tiny_config("rm.aggregation=sum"), rm_config, "rm", agreeing).rm.aggregation \
        == "sum"
