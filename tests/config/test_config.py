"""The config tree: defaults, YAML layering with `base:`, dotted overrides, validation and saving."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megaseg.config import MegasegConfig, config_to_yaml, load_config, save_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_papers_hyper_parameters():
    config = load_config()
    assert isinstance(config, MegasegConfig)
    # Table 8 / 9 of the paper.
    assert config.rm.optimizer.lr == 1e-6 and config.rm.global_batch_size == 128
    assert (config.rm.optimizer.adam_beta1, config.rm.optimizer.adam_beta2) == (0.9, 0.95)
    assert config.ppo.actor_optimizer.lr == 5e-7 and config.ppo.critic_optimizer.lr == 9e-6
    assert (config.ppo.kl_coef, config.ppo.gamma, config.ppo.lam, config.ppo.clip_eps) == (0.01, 1.0, 0.95, 0.2)
    assert config.normalizer.method == "huber"


def test_yaml_layers_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"num_layers": 4, "hidden_size": 128}}))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "model": {"num_layers": 6}}))
    config = load_config(tmp_path / "run.yaml", ["model.hidden_size=256", "segmentation.entropy_cutoff=1.75"])
    assert config.model.num_layers == 6  # the file beats its base
    assert config.model.hidden_size == 256  # the command line beats both
    assert config.segmentation.entropy_cutoff == 1.75


def test_config_is_frozen():
    config = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize("override, message", [
    ("model.family=gpt9", r"model.family='gpt9' is not allowed; choose one of \['llama'"),
    ("segmentation.mode=words", r"segmentation.mode='words' is not allowed"),
    ("ppo.interpolation=linear", r"ppo.interpolation='linear' is not allowed; choose one of \['even', 'repeat', 'none'\]"),
    ("model.nonsense=1", r"bad config key 'model.nonsense'"),
    ("rm.optimizer.lr=fast", r"bad config key 'rm.optimizer.lr'"),
    ("segmentation.entropy_cutoff=-1", r"segmentation.entropy_cutoff=-1.0 must be >= 0"),
    ("data.max_prompt_length=4096", r"data.max_prompt_length=4096 must be < data.max_length=2048"),
    ("ppo.top_p=0", r"ppo.top_p=0.0 must lie in \(0, 1\]"),
    ("no_equals_sign", r"must look like section.key=value"),
    # One optimizer type in four places: the error names which one.
    ("ppo.critic_optimizer.lr=-1", r"^ppo\.critic_optimizer\.lr=-1.0 must be > 0"),
    ("ppo.actor_optimizer.lr=-1", r"^ppo\.actor_optimizer\.lr=-1.0 must be > 0"),
    ("rm.optimizer.lr=-1", r"^rm\.optimizer\.lr=-1.0 must be > 0"),
    ("dpo.optimizer.warmup_ratio=2", r"^dpo\.optimizer\.warmup_ratio=2.0 must lie in"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {num_layers: 2\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  layers: 2\n")
    with pytest.raises(ValueError, match=r"unknown.yaml: bad config key 'model.layers'"):
        load_config(unknown)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_loads_back_identically(tmp_path):
    config = load_config(None, ["model.num_layers=3", "ppo.reward_granularity=ngram", "model.eos_token_ids=[2,7]"])
    path = save_config(config, tmp_path / "run")
    assert path.name == "config.yaml"
    assert load_config(path) == config
    assert config_to_yaml(load_config(path)) == path.read_text()


def test_every_shipped_yaml_loads():
    shipped = sorted((REPO / "model_configs").glob("*.yaml")) + sorted((REPO / "examples").rglob("*.yaml"))
    for path in shipped:
        load_config(path)


def test_paper_recipes_reduce_the_ppo_loss_as_the_released_code():
    recipes = sorted((REPO / "examples" / "paper").glob("*/*.yaml"))
    assert recipes
    for path in recipes:
        assert load_config(path).ppo.loss_aggregation == "seq-mean-token-mean", path


def test_cli_print_config_and_errors():
    run = lambda *a: subprocess.run([sys.executable, "-m", "megaseg.cli", *a], capture_output=True, text=True)
    printed = run("fit-normalizer", "--ckpt", "/some/rm", "--method", "ols", "--print-config", "seed=7")
    assert printed.returncode == 0, printed.stderr
    resolved = yaml.safe_load(printed.stdout)
    assert resolved["rm"]["checkpoint"] == "/some/rm"
    assert resolved["normalizer"]["method"] == "ols" and resolved["seed"] == 7
    bad = run("train-rm", "model.family=gpt9")
    assert bad.returncode == 2 and "model.family='gpt9' is not allowed" in bad.stderr


def test_every_config_the_docs_name_exists():
    # The README and the Dockerfile tell users which YAML to pass; each one must be in the repo and load.
    import re

    named = set()
    for document in ("README.md", "Dockerfile", "examples/paper/README.md"):
        named |= set(re.findall(r"--config ((?:model_configs|examples)/[\w./-]+\.yaml)", (REPO / document).read_text()))
    assert named, "no --config FILE found in the docs"
    for path in sorted(named):
        assert (REPO / path).is_file(), f"{path} is named in the docs but does not exist"
        load_config(REPO / path)


def test_explicit_keys_are_what_the_user_gave_not_what_differs_from_the_defaults(tmp_path):
    from megaseg.config.loader import explicit_keys

    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"rm": {"aggregation": "mean"}, "model": {
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}}))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "seed": 1234}))
    given = explicit_keys(tmp_path / "run.yaml", ["data.max_length=2048"])
    # Every one of these equals its schema default except rope_scaling, and every one counts as given.
    assert given == {"rm.aggregation", "model.rope_scaling", "seed", "data.max_length"}
    assert explicit_keys(None, []) == frozenset()
