"""Every kind of file megaseg writes for later reading, damaged four ways (truncated, emptied, random bytes,
deleted): each gives one error naming the file and the command that repairs it, or heals.

- checkpoint step directories: every file of a real two-model step (dist-checkpoint shards, .metadata, common.pt,
  metadata.json, progress.json, config.yaml, the manifest itself);
- a dist checkpoint without a megaseg manifest (a converted SFT model): .metadata and common.pt are named when
  unreadable, never a raw EOFError;
- the reward-model directory; the normalizer file;
- resume with a damaged latest step: checkpoint.on_damaged=previous continues from the step before, error stops.
Cache shards: tests/fault_injection/test_cache_healing.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fault_material import FAULTS, ROLES, apply_fault, build_trained, tiny_config
from megaseg.parallel.spawn import run_distributed

pytestmark = pytest.mark.fault_injection


def _write(rank, world_size, work: str):
    from megaseg.checkpoint.reward_model_dir import save_reward_model
    from megaseg.checkpoint.step_dirs import TrainingProgress, save_training_checkpoint
    from megaseg.parallel import initialize_parallel

    work = Path(work)
    config = tiny_config(work / "run")
    initialize_parallel(config.parallel, seed=config.seed)
    models = {role: build_trained(config, seed=7 + i) for i, role in enumerate(ROLES)}
    for step in (1, 2):
        save_training_checkpoint(work / "run" / "checkpoints", models=models, config=config, keep_last=None,
                                 progress=TrainingProgress(step=step, consumed_samples=4 * step))
    save_reward_model(work / "run" / "reward_model", model=models["critic"].model, config=config,
                      progress=TrainingProgress(step=2))


def _resume(rank, world_size, run_dir: str, on_damaged: str):
    from megaseg.checkpoint.resume import resume_latest
    from megaseg.parallel import initialize_parallel

    config = tiny_config(run_dir, **{"checkpoint.on_damaged": on_damaged})
    initialize_parallel(config.parallel, seed=config.seed)
    models = {role: build_trained(config, seed=7 + i) for i, role in enumerate(ROLES)}
    try:
        loaded = resume_latest(config, sections=("seed", "model"), models=models)
    except ValueError as error:
        return "error", str(error)
    return loaded.path.name, loaded.progress.step


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    work = tmp_path_factory.mktemp("written")
    run_distributed(_write, 1, str(work))
    return work / "run"


def _step_files(step: Path) -> list[str]:
    return sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file())


@pytest.mark.parametrize("fault", FAULTS)
def test_every_file_of_a_step_directory(written, tmp_path, fault):
    from megaseg.checkpoint.step_dirs import verify_step_dir
    from megaseg.integrity import MANIFEST_FILE

    source = written / "checkpoints" / "step_000002"
    names = _step_files(source)
    kinds = {Path(name).suffix or Path(name).name for name in names}
    assert {".distcp", ".metadata", ".pt", ".json", ".yaml", MANIFEST_FILE.split(".")[-1]} <= kinds | {"json"}, kinds
    for index, name in enumerate(names):
        step = shutil.copytree(source, tmp_path / f"{index}" / "step_000002")
        apply_fault(step / name, fault, seed=index)
        with pytest.raises(ValueError) as raised:
            verify_step_dir(step)
        message = str(raised.value)
        assert name.split("/")[-1] in message and "checkpoint.on_damaged=previous" in message, (name, message)


@pytest.mark.parametrize("fault", FAULTS)
def test_dist_checkpoint_files_without_a_manifest_are_named(written, tmp_path, fault):
    from megaseg.checkpoint.safe_load import load_common_state, read_metadata_file

    for name, read in ((".metadata", lambda d: read_metadata_file(d / ".metadata")),
                       ("common.pt", load_common_state)):
        state = shutil.copytree(written / "checkpoints" / "step_000001" / "actor", tmp_path / name)
        apply_fault(state / name, fault)
        with pytest.raises(ValueError, match=rf"{state / name}.* (unreadable|missing|holds)"):
            read(state)


@pytest.mark.parametrize("fault", FAULTS)
def test_reward_model_directory(written, tmp_path, fault):
    from megaseg.checkpoint.reward_model_dir import read_reward_model_config, verify_reward_model_dir

    source = written / "reward_model"
    for index, name in enumerate(_step_files(source)):
        rm_dir = shutil.copytree(source, tmp_path / f"{index}" / "reward_model")
        apply_fault(rm_dir / name, fault, seed=index)
        with pytest.raises(ValueError) as raised:
            read_reward_model_config(rm_dir)
            verify_reward_model_dir(rm_dir)
        message = str(raised.value)
        assert name.split("/")[-1] in message, (name, message)
        if name != "reward_model.json" or fault != "delete":  # without its marker it is no reward model at all
            assert "megaseg train-rm --config" in message, (name, message)


@pytest.mark.parametrize("fault", FAULTS + ("edit",))
def test_normalizer_file(tmp_path, fault):
    from megaseg.algorithms.normalizer import GlobalNormalizer
    from megaseg.scoring.normalizer_file import read_normalizer_file, write_normalizer

    path = write_normalizer(tmp_path / "normalizer.json", GlobalNormalizer(
        mean=0.5, std=2.0, model="m", c_ent=2.0, aggregation="mean", segmentation="entropy", num_samples=10), {})
    assert read_normalizer_file(path, "REPAIR").mean == 0.5
    if fault == "edit":  # valid JSON, another value: only the checksum notices
        content = json.loads(path.read_text())
        path.write_text(json.dumps({**content, "mean": 0.7}))
    else:
        apply_fault(path, fault)
    with pytest.raises(ValueError, match=rf"{path}.*REPAIR"):
        read_normalizer_file(path, "REPAIR")


@pytest.mark.distributed
def test_resume_skips_a_damaged_latest_step_or_stops(written, tmp_path):
    run = shutil.copytree(written, tmp_path / "run")
    apply_fault(next((run / "checkpoints" / "step_000002" / "critic").glob("*.distcp")), "truncate")
    assert run_distributed(_resume, 1, str(run), "previous")[0] == ("step_000001", 1)
    kind, message = run_distributed(_resume, 1, str(run), "error")[0]
    assert kind == "error" and "step_000002/critic/" in message and ".distcp" in message
