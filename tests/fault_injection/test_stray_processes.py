"""No stray processes: a run killed with SIGKILL right after saving a checkpoint leaves nothing behind in its
process group (megatron's checkpoint writer would otherwise leave a multiprocessing Manager server and the resource
tracker running), and the process group is empty within a few seconds."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.fault_injection
HELPERS = Path(__file__).resolve().parent.parent / "helpers"


def _save_then_wait(out_dir: str) -> None:
    from fault_material import ROLES, build_trained, tiny_config
    from megaseg.checkpoint.step_dirs import TrainingProgress, save_training_checkpoint
    from megaseg.parallel import initialize_parallel

    config = tiny_config(out_dir)
    initialize_parallel(config.parallel, seed=config.seed, env={})
    models = {role: build_trained(config) for role in ROLES}
    save_training_checkpoint(Path(out_dir) / "checkpoints", models=models, config=config,
                             progress=TrainingProgress(step=1))
    print("SAVED", flush=True)
    time.sleep(120)


def _group_is_empty(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_kill_9_leaves_an_empty_process_group(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PYTHONWARNINGS="ignore")
    run = subprocess.Popen([sys.executable, __file__, str(tmp_path / "run")], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        for line in run.stdout:
            lines.append(line)
            if line.startswith("SAVED"):
                break
        assert lines and lines[-1].startswith("SAVED"), "".join(lines)
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
        deadline = time.monotonic() + 5
        while not _group_is_empty(run.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = subprocess.run(["ps", "-o", "pid,cmd", "-g", str(run.pid)], capture_output=True, text=True).stdout
        assert _group_is_empty(run.pid), f"processes left in the run's group 5 s after kill -9:\n{left}"
    finally:
        if not _group_is_empty(run.pid):
            os.killpg(run.pid, signal.SIGKILL)


if __name__ == "__main__":
    _save_then_wait(sys.argv[1])
