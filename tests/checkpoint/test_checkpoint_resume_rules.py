"""The resume rule for settings: a changed reward-model learning rate is refused (the LR schedule comes back from
the checkpoint, so an accepted change would be silently ignored); where-and-how settings may change. The default
segmentation cache lives under the run's output directory, not the working directory."""
from __future__ import annotations

from pathlib import Path

from megaseg.checkpoint.resume import changed_settings
from megaseg.config import load_config
from megaseg.config.loader import absolute_local_paths
from megaseg.segmentation.cache import cache_root

RM_SECTIONS = ("seed", "model", "data", "segmentation", "rm")  # RewardModelTrainer.config_sections


def test_a_changed_rm_learning_rate_is_refused_not_ignored():
    saved = load_config(None, ["rm.optimizer.lr=1e-5"])
    changed = changed_settings(saved, load_config(None, ["rm.optimizer.lr=3e-5"]), RM_SECTIONS)
    assert changed == {"rm.optimizer.lr": (1e-5, 3e-5)}
    resumable = load_config(None, ["rm.optimizer.lr=1e-5", "rm.max_steps=99", "checkpoint.on_damaged=error"])
    assert changed_settings(saved, resumable, RM_SECTIONS) == {}


def test_the_default_cache_is_under_the_output_dir_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, [f"logging.out_dir={tmp_path / 'run'}"])
    assert cache_root(config) == tmp_path / "run" / "cache" / "segments"
    monkeypatch.chdir(tmp_path.parent)
    assert Path(absolute_local_paths(config).segmentation.cache_dir) == tmp_path / "run" / "cache" / "segments"
