"""Loading never executes code from a file: a payload (unpickling it creates a marker file) planted in each kind of
pickled file of a dist checkpoint is refused with an error naming the file, and the marker never appears. The
attacker is assumed to rewrite the integrity manifest too, so only the restricted loaders stand in the way.

Paths covered: a training checkpoint on resume (load_training_checkpoint: .metadata, common.pt, the RNG byte
object), a model state loaded as ``model.checkpoint`` (load_model_state), and a reward-model directory (what
eval-rm / fit-normalizer / PPO load)."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from fault_material import ROLES, Payload, build_trained, repickle_metadata, tiny_config
from megaseg.parallel.spawn import run_distributed

pytestmark = [pytest.mark.fault_injection, pytest.mark.distributed]


def _attempt(load) -> tuple[str, str]:
    try:
        load()
    except Exception as error:  # noqa: BLE001 -- the test reports whatever happened
        return type(error).__name__, str(error)
    return "loaded", ""


def _plant_and_load(rank, world_size, work: str):
    from megaseg.checkpoint import step_dirs
    from megaseg.checkpoint.reward_model_dir import load_reward_model, save_reward_model
    from megaseg.checkpoint.step_dirs import (
        TrainingProgress,
        load_model_state,
        load_training_checkpoint,
        save_training_checkpoint,
    )
    from megaseg.integrity import write_manifest
    from megaseg.parallel import initialize_parallel

    work = Path(work)
    config = tiny_config(work / "run")
    ctx = initialize_parallel(config.parallel, seed=config.seed)
    models = {role: build_trained(config, seed=7 + i) for i, role in enumerate(ROLES)}
    clean = save_training_checkpoint(work / "clean", models=models, config=config, progress=TrainingProgress(step=1))
    outcomes = {"clean checkpoint": _attempt(lambda: load_training_checkpoint(clean, models=models,
                                                                                model_cfg=config.model))}

    def planted_copy(name: str) -> Path:
        target = work / name / clean.name
        shutil.copytree(clean, target)
        return target

    step = planted_copy("metadata")
    repickle_metadata(step / "actor" / ".metadata", Payload(str(work / "marker-metadata")))
    write_manifest(step)
    outcomes["resume: actor/.metadata"] = _attempt(
        lambda: load_training_checkpoint(step, models=models, model_cfg=config.model))
    outcomes["model.checkpoint: .metadata"] = _attempt(
        lambda: load_model_state(step / "actor", model=models["actor"].model, model_cfg=config.model))

    step = planted_copy("common")
    common = torch.load(step / "critic" / "common.pt", weights_only=True)  # our own clean file
    common["planted"] = Payload(str(work / "marker-common"))
    torch.save(common, step / "critic" / "common.pt")
    write_manifest(step)
    outcomes["resume: critic/common.pt"] = _attempt(
        lambda: load_training_checkpoint(step, models=models, model_cfg=config.model))

    real_states = step_dirs._rng_states
    step_dirs._rng_states = lambda: {**real_states(), "planted": Payload(str(work / "marker-rng"))}
    try:
        step = save_training_checkpoint(work / "rng", models=models, config=config, progress=TrainingProgress(step=1))
    finally:
        step_dirs._rng_states = real_states
    outcomes["resume: rng object in .distcp"] = _attempt(
        lambda: load_training_checkpoint(step, models=models, model_cfg=config.model))

    rm_dir = save_reward_model(work / "rm" / "reward_model", model=models["critic"].model, config=config,
                               progress=TrainingProgress(step=1))
    outcomes["clean reward model"] = _attempt(lambda: load_reward_model(rm_dir, ctx))
    repickle_metadata(rm_dir / "state" / ".metadata", Payload(str(work / "marker-rm")))
    write_manifest(rm_dir)
    outcomes["reward model: state/.metadata"] = _attempt(lambda: load_reward_model(rm_dir, ctx))
    return outcomes


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    work = tmp_path_factory.mktemp("planted")
    return work, run_distributed(_plant_and_load, 1, str(work))[0]


def test_the_payload_is_real(tmp_path):
    # Control: plain unpickling of the payload does create the marker, so its absence below means refusal.
    pickle.loads(pickle.dumps(Payload(str(tmp_path / "marker"))))  # noqa: S301
    assert (tmp_path / "marker").exists()


def test_clean_files_load(outcomes):
    _, results = outcomes
    assert results["clean checkpoint"] == ("loaded", "")
    assert results["clean reward model"] == ("loaded", "")


@pytest.mark.parametrize("case, file_name, marker", [
    ("resume: actor/.metadata", "actor/.metadata", "marker-metadata"),
    ("model.checkpoint: .metadata", "actor/.metadata", "marker-metadata"),
    ("resume: critic/common.pt", "critic/common.pt", "marker-common"),
    ("resume: rng object in .distcp", "rng/", "marker-rng"),
    ("reward model: state/.metadata", "state/.metadata", "marker-rm"),
])
def test_a_planted_payload_is_refused_naming_the_file(outcomes, case, file_name, marker):
    work, results = outcomes
    kind, message = results[case]
    assert kind == "UnsafeCheckpointError", (case, kind, message)
    assert file_name in message and "refusing to load" in message, message
    # The global it refused: pathlib.Path itself (our unpickler), or the getattr torch's pickles of it start with.
    assert "pathlib.Path" in message or "getattr" in message, message
    assert not (work / marker).exists(), f"{case}: the payload ran"
