"""A PPO-shaped checkpoint (actor + critic) killed with SIGKILL at every point of its save, with keep_last 1 and 2:
afterwards every ``step_*`` directory is whole (both models, every file as its manifest lists it) and the resume
point (``latest``, or the newest intact step) loads, at the new step once ``latest`` was written and at the previous
one before. The save runs in a forked child of a rank that already built the models, so each kill is a real one
and a trial costs one save."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from fault_material import ROLES, build_trained, tiny_config
from megaseg.parallel.spawn import run_distributed

pytestmark = [pytest.mark.fault_injection, pytest.mark.distributed, pytest.mark.slow]

# The calls of save_training_checkpoint (by name in megaseg.checkpoint.step_dirs) after which the child dies;
# "rmtree:partial" dies half-way through pruning an old step (one file deleted).
HOOKED = ("save_model_state", "_save_rng", "write_json_atomic", "save_config", "write_manifest", "replace_dir",
          "write_text_atomic", "rmtree")


def _save_and_die(step_dirs, root: Path, models, config, keep_last: int, kill_at: int, partial_prune: bool) -> None:
    """In the forked child: save step 3, SIGKILLed after the ``kill_at``-th hooked call (-1: before the first), or,
    with ``partial_prune``, half-way through that call (a prune: one file of the old step deleted). The name of the
    call it died in goes to ``<root>/../died_in``."""
    calls = {"count": 0}

    def die(name: str) -> None:
        (root.parent / "died_in").write_text(name)
        os.kill(os.getpid(), signal.SIGKILL)

    def hooked(function, name):
        def call(*args, **kwargs):
            if partial_prune and calls["count"] == kill_at:
                assert name == "rmtree" and Path(args[0]).is_dir(), name
                next(p for p in Path(args[0]).rglob("*") if p.is_file()).unlink()
                die(name + ":partial")
            result = function(*args, **kwargs)
            if calls["count"] == kill_at:
                die(name)
            calls["count"] += 1
            return result
        return call

    if kill_at == -1:
        die("before the save")
    for name in HOOKED:
        if name == "rmtree":
            shutil.rmtree = hooked(shutil.rmtree, name)
        else:
            setattr(step_dirs, name, hooked(getattr(step_dirs, name), name))
    step_dirs.save_training_checkpoint(root, models=models, config=config,
                                       progress=step_dirs.TrainingProgress(step=3), keep_last=keep_last)


def _in_child(work) -> int:
    """Fork; the child (returning 0) starts its own single-process torch.distributed and megatron state, which a
    fork must not inherit (gloo's threads do not survive it). The parent gets the child's pid."""
    pid = os.fork()
    if pid == 0:
        from megaseg.parallel import initialize_parallel

        initialize_parallel(tiny_config(work / "run").parallel, seed=3, env={})
    return pid


def _models(config):
    return {role: build_trained(config, seed=7 + i) for i, role in enumerate(ROLES)}


def _finish(pid: int) -> int:
    """Wait for a forked child; its wait status."""
    return os.waitpid(pid, 0)[1]


def _check(step_dirs, root: Path, config, models=None) -> dict:
    """In a child: what a resuming run finds under ``root``."""
    from megaseg.checkpoint.resume import newest_intact_checkpoint

    steps = {path.name: _whole(step_dirs, path) for _, path in step_dirs.step_dirs(root)}
    resumed = newest_intact_checkpoint(tiny_config(root.parent, **{"checkpoint.on_damaged": "error"}))
    loaded = step_dirs.load_training_checkpoint(resumed, models=_models(config), model_cfg=config.model)
    return {"steps": steps, "latest": step_dirs.latest_checkpoint(root).name, "resumed": resumed.name,
            "resumed_step": loaded.progress.step}


def _child(work: Path, task) -> int:
    pid = _in_child(work)
    if pid == 0:
        code = 1
        try:
            task()
            code = 0
        finally:
            os._exit(code)
    return _finish(pid)


def _trials(rank, world_size, work: str):
    from megaseg.checkpoint import step_dirs

    work = Path(work)
    config = tiny_config(work / "run")
    outcomes = []
    for keep_last in (1, 2):
        template = work / f"template-{keep_last}"

        def write_template():
            models = _models(config)
            for step in (1, 2):
                step_dirs.save_training_checkpoint(template, models=models, config=config, keep_last=keep_last,
                                                   progress=step_dirs.TrainingProgress(step=step))

        assert _child(work, write_template) == 0
        trial, partial = 0, False
        while True:
            root = work / f"keep{keep_last}-kill{trial}-{int(partial)}" / "checkpoints"
            shutil.copytree(template, root)
            status = _child(work, lambda: _save_and_die(step_dirs, root, _models(config), config, keep_last,
                                                        trial - 1, partial))
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            died_in = (root.parent / "died_in").read_text() if killed else None
            outcomes.append({"keep_last": keep_last, "kill_at": trial - 1, "partial": partial, "killed": killed,
                             "died_in": died_in, "root": str(root)})
            if not killed:
                break
            # Pruning (the older step's removal, not the stale temporary's) is also killed half-way through.
            partial = died_in == "rmtree" and not partial and trial > 1
            trial += 0 if partial else 1

    def check_all():  # one process resumes from every trial's directory
        report.write_text(json.dumps([_check(step_dirs, Path(o["root"]), config) for o in outcomes]))

    report = work / "checks.json"
    assert _child(work, check_all) == 0, "checking the trials failed"
    return [{**outcome, **check} for outcome, check in zip(outcomes, json.loads(report.read_text()))]


def _whole(step_dirs, path: Path) -> str:
    try:
        step_dirs.verify_step_dir(path)
    except ValueError as error:
        return f"damaged: {error}"
    missing = [role for role in ROLES if not (path / role).is_dir()]
    return f"missing {missing}" if missing else "whole"


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_distributed(_trials, 1, str(tmp_path_factory.mktemp("kills")), timeout=600)[0]


def test_every_kill_point_was_reached(outcomes):
    for keep_last in (1, 2):
        trials = [o for o in outcomes if o["keep_last"] == keep_last]
        assert all(o["killed"] for o in trials[:-1]) and not trials[-1]["killed"]
        # models x2, rng, progress, config, manifest, rename, latest, prune (keep_last 1: step 2; 2: step 1)
        died_in = [o["died_in"] for o in trials if o["killed"]]
        assert died_in[:3] == ["before the save", "rmtree", "save_model_state"], died_in
        assert died_in.count("save_model_state") == 2 and "rmtree:partial" in died_in, died_in
        assert {"_save_rng", "write_json_atomic", "save_config", "write_manifest", "replace_dir",
                "write_text_atomic"} <= set(died_in), died_in


def test_after_any_kill_the_newest_checkpoint_is_whole_and_resumes(outcomes):
    for outcome in outcomes:
        latest, resumed = outcome["latest"], outcome["resumed"]
        assert latest == resumed, outcome  # the pointer never names a damaged or missing step
        assert outcome["steps"][latest] == "whole", outcome
        assert outcome["resumed_step"] == int(latest.split("_")[1]), outcome
        assert latest in ("step_000002", "step_000003"), outcome
        # Older steps are whole, or are the one being pruned when the kill came half-way through its removal.
        damaged = [name for name, state in outcome["steps"].items() if state != "whole"]
        assert damaged == [] or (outcome["partial"] and latest == "step_000003" and len(damaged) == 1), outcome


def test_the_new_step_is_the_resume_point_once_latest_is_written(outcomes):
    for outcome in outcomes:
        if not outcome["killed"]:
            assert outcome["latest"] == "step_000003" and len(outcome["steps"]) == outcome["keep_last"], outcome
