"""A conversion killed with SIGKILL leaves its hidden `.partial` staging directory; the next conversion into the
same place removes it (its writer is gone) and leaves a live writer's staging directory alone."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megaseg.conversion.staged_output import staged_output_dir

pytestmark = pytest.mark.fault_injection


def test_abandoned_partial_dirs_are_removed(tmp_path):
    out = tmp_path / "converted"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f".converted.partial-{int(dead.stdout)}-deadbeef"
    (abandoned / "sub").mkdir(parents=True)
    live = tmp_path / f".converted.partial-{os.getppid()}-cafecafe"  # a running process (pytest's parent)
    live.mkdir()
    with staged_output_dir(out) as staging:
        (staging / "weights").write_text("w")
    assert (out / "weights").read_text() == "w"
    assert not abandoned.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "converted"])
