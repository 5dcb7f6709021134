"""The reward-model directory: a model saved at TP=1 loads at TP=2 (spawned gloo ranks) and scores the same; the
saved config travels with it; a wrong directory is a ValueError naming the path."""
import dataclasses
import json

import pytest
import torch

from megaseg.config import MegasegConfig
from megaseg.config.parallel import ParallelConfig
from megaseg.parallel.spawn import run_distributed
from megaseg.checkpoint.reward_model_dir import MARKER_FILE, read_reward_model_config, resolve_reward_model_dir

pytestmark = pytest.mark.distributed


def _inputs():
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, 128, (3, 12), generator=generator)
    return input_ids, torch.arange(12).expand(3, 12).contiguous()


def _save_tp1(rank, world_size, rm_dir):
    from megaseg.models.scalar_head import build_reward_model
    from megaseg.parallel import initialize_parallel
    from megaseg.checkpoint.step_dirs import TrainingProgress
    from megaseg.checkpoint.reward_model_dir import save_reward_model

    config = dataclasses.replace(MegasegConfig(), segmentation=dataclasses.replace(
        MegasegConfig().segmentation, mode="ngram", ngram_size=3))
    initialize_parallel(config.parallel, seed=5)
    model = build_reward_model(config.model, config.parallel, seed=7)
    with torch.no_grad():
        model.head.weight.normal_()  # not the init: the load must bring these values back
        values = model(*_inputs(), None)
    save_reward_model(rm_dir, model=model, config=config, progress=TrainingProgress(step=4, consumed_samples=32),
                      metrics={"eval/accuracy": 0.75})
    return values


def _load(rank, world_size, rm_dir, tp):
    from megaseg.parallel import initialize_parallel
    from megaseg.checkpoint.reward_model_dir import load_reward_model

    ctx = initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp), seed=99)
    model, config = load_reward_model(rm_dir, ctx)
    with torch.no_grad():
        values = model(*_inputs(), None)
    return values, config.parallel.tensor_model_parallel_size, config.segmentation.mode, model.training


def test_saved_at_tp1_scores_the_same_at_tp2(tmp_path):
    rm_dir = tmp_path / "run" / "reward_model"
    (expected,) = run_distributed(_save_tp1, 1, str(rm_dir))
    info = json.loads((rm_dir / MARKER_FILE).read_text())
    assert info["step"] == 4 and info["segmentation"]["mode"] == "ngram" and info["metrics"] == {"eval/accuracy": 0.75}
    for values, tp, mode, training in run_distributed(_load, 2, str(rm_dir), 2):
        torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)
        assert (tp, mode, training) == (2, "ngram", False)
    # A train-rm run directory resolves to its reward_model/; the config names the directory it was read from.
    assert resolve_reward_model_dir(tmp_path / "run") == rm_dir
    assert read_reward_model_config(tmp_path / "run").rm.checkpoint == str(rm_dir.absolute())
    assert not list(rm_dir.parent.glob(".staging_*"))


def test_not_a_reward_model_names_the_path(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path) + ".*is not a megaseg reward model"):
        resolve_reward_model_dir(tmp_path)
