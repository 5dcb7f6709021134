"""Checkpoints: written at TP=2, resumed at TP=1 (model + Adam state + LR schedule continue exactly) and loaded at
PP=2 with identical outputs; step directories appear atomically with every model of the step, `latest` and
keep_last prune; RNG states come back at the same layout; a checkpoint of another architecture is refused naming the
fields."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megaseg.config import load_config
from megaseg.parallel.spawn import run_distributed
from megaseg.checkpoint.step_dirs import LATEST_FILE, RNG_DIR, latest_checkpoint
from megaseg.integrity import MANIFEST_FILE

ROLE = "reward_model"

SEQ = 16
OPTIMIZER = dict(lr=1e-2, warmup_ratio=0.0, weight_decay=0.01, grad_clip=1.0)
TOTAL_STEPS = 6


def _config(tp: int = 1, pp: int = 1):
    return load_config(None, [f"parallel.tensor_model_parallel_size={tp}",
                              f"parallel.pipeline_model_parallel_size={pp}", "seed=11"])


def _batch(step: int):
    from megaseg.models import MicroBatch

    input_ids = torch.randint(0, 128, (4, SEQ), generator=torch.Generator().manual_seed(100 + step))
    return MicroBatch(input_ids, torch.arange(SEQ).expand(4, SEQ).contiguous())


def _probe_values(model):
    from megaseg.models import forward_only

    outputs = forward_only(model, [_batch(-1)])
    return outputs[0] if outputs else None


def _loss(values, batch):
    # Any differentiable function of every position will do: the test is about state, not the objective.
    loss = (values[:2] - values[2:]).pow(2).mean() + values.mean()
    return loss, {}


def _setup(config):
    from megaseg.config.training import OptimizerConfig
    from megaseg.models import build_reward_model
    from megaseg.parallel import initialize_parallel
    from megaseg.training.common.optimizer import setup_training

    initialize_parallel(config.parallel, seed=config.seed)
    model = build_reward_model(config.model, config.parallel, seed=7)
    return setup_training(model, OptimizerConfig(**OPTIMIZER), total_steps=TOTAL_STEPS)


def _train_step(training, step: int) -> None:
    from megaseg.models import forward_backward

    training.zero_grads()
    forward_backward(training.model, [_batch(step)], _loss)
    assert training.step().updated


def _save_at_tp2(rank, world_size, root):
    from megaseg.checkpoint.step_dirs import TrainingProgress, load_training_checkpoint, save_training_checkpoint

    config = _config(tp=2)
    training = _setup(config)
    values = {}
    for step in (1, 2, 3):
        _train_step(training, step)
        values[step] = _probe_values(training.model)
        save_training_checkpoint(root, models={ROLE: training}, config=config, keep_last=2,
                                 progress=TrainingProgress(step=step, consumed_samples=4 * step,
                                                           data_state={"index": step}))
    draws_after_save = (torch.rand(3), torch.randint(0, 1000, (3,)))
    _train_step(training, 99)  # move the RNG and the weights on, then come back
    loaded = load_training_checkpoint(latest_checkpoint(root), models={ROLE: training}, model_cfg=config.model)
    draws_after_load = (torch.rand(3), torch.randint(0, 1000, (3,)))
    return {"values": values, "draws": (draws_after_save, draws_after_load), "loaded": loaded,
            "values_after_load": _probe_values(training.model)}


def _resume_at_tp1(rank, world_size, root):
    from megaseg.checkpoint.step_dirs import load_model_state, load_training_checkpoint

    config = _config()
    training = _setup(config)
    wider = dataclasses.replace(config.model, hidden_size=128, num_layers=3)
    try:
        load_model_state(Path(root) / "step_000002" / ROLE, model=training.model, model_cfg=wider)
        architecture_error = None
    except ValueError as error:
        architecture_error = str(error)
    loaded = load_training_checkpoint(Path(root) / "step_000002", models={ROLE: training}, model_cfg=config.model)
    values_at_2 = _probe_values(training.model)
    _train_step(training, 3)
    return {"loaded": loaded, "values_at_2": values_at_2, "values_at_3": _probe_values(training.model),
            "architecture_error": architecture_error}


def _load_at_pp2(rank, world_size, root):
    from megaseg.models import build_reward_model
    from megaseg.parallel import initialize_parallel
    from megaseg.checkpoint.step_dirs import load_model_state

    config = _config(pp=2)
    initialize_parallel(config.parallel, seed=config.seed)
    model = build_reward_model(config.model, config.parallel, seed=7)
    latest = latest_checkpoint(root)
    load_model_state(latest / ROLE, model=model, model_cfg=config.model)  # weights only
    return {"latest": latest, "values": _probe_values(model)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    results = run_distributed(_save_at_tp2, 2, str(root))
    return root, results[0]


@pytest.mark.distributed
def test_step_directories_latest_and_pruning(saved):
    root, _ = saved
    assert sorted(path.name for path in root.iterdir()) == [LATEST_FILE, "step_000002", "step_000003"]
    assert (root / LATEST_FILE).read_text().strip() == "step_000003"
    assert latest_checkpoint(root) == root / "step_000003"
    assert load_config(root / "step_000003" / "config.yaml") == _config(tp=2)
    assert {path.name for path in (root / "step_000003").iterdir()} == {ROLE, RNG_DIR, "progress.json", "config.yaml",
                                                                      MANIFEST_FILE}


@pytest.mark.distributed
def test_reload_at_the_same_layout_restores_weights_rng_and_progress(saved):
    _, result = saved
    loaded = result["loaded"]
    assert loaded.path.name == "step_000003" and loaded.restored_rng
    assert (loaded.progress.step, loaded.progress.consumed_samples, loaded.progress.data_state) == (3, 12, {"index": 3})
    draws_after_save, draws_after_load = result["draws"]
    for saved_draw, loaded_draw in zip(draws_after_save, draws_after_load):
        assert torch.equal(saved_draw, loaded_draw)
    assert torch.equal(result["values_after_load"], result["values"][3])


@pytest.mark.distributed
def test_resume_at_tp1_continues_the_tp2_run(saved):
    root, tp2 = saved
    (result,) = run_distributed(_resume_at_tp1, 1, str(root))
    assert result["loaded"].progress.step == 2 and not result["loaded"].restored_rng  # other layout
    torch.testing.assert_close(result["values_at_2"], tp2["values"][2], rtol=1e-5, atol=1e-5)
    # Step 3 from the loaded Adam moments and schedule lands where the TP=2 run's step 3 did.
    torch.testing.assert_close(result["values_at_3"], tp2["values"][3], rtol=1e-5, atol=1e-5)
    message = result["architecture_error"]
    assert "was written for another architecture" in message
    assert "model.num_layers: checkpoint 2, config 3" in message and "model.hidden_size: checkpoint 64, config 128" in message


@pytest.mark.distributed
def test_load_at_pp2_gives_identical_outputs(saved):
    root, tp2 = saved
    first, last = run_distributed(_load_at_pp2, 2, str(root))
    assert first["values"] is None
    assert last["latest"].name == "step_000003"
    torch.testing.assert_close(last["values"], tp2["values"][3], rtol=1e-5, atol=1e-5)


def test_latest_discovery_without_a_pointer(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for name in ("step_000010", "step_000002", ".tmp_step_000011"):
        (tmp_path / name / "state").mkdir(parents=True)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000010"  # the half-written .tmp_ one is not a checkpoint
    (tmp_path / LATEST_FILE).write_text("step_000007\n")
    with pytest.warns(UserWarning, match="names step_000007, which does not exist"):
        assert latest_checkpoint(tmp_path) == tmp_path / "step_000010"
