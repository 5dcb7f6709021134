"""The single-node Slurm cluster of the tests in this folder (started by the project's own scripts/slurm_cluster.sh,
which installs slurm-wlm and munge where missing), as a module of its own name: test modules and the ranks they
spawn import it by that name (a module named ``conftest`` would resolve to tests/conftest.py in a whole-suite run)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


def free_port_pair() -> int:
    """A port p with p and p + 1 both free (slurmctld, slurmd)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as second:
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free TCP ports found for slurmctld and slurmd")


@dataclass
class SlurmCluster:
    directory: Path

    @property
    def conf(self) -> Path:
        return self.directory / "slurm.conf"

    def env(self, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        """The caller's environment pointed at this cluster, with this interpreter's bin/ (megaseg, torchrun) first
        on PATH: sbatch exports it to the job (--export=ALL), so `megaseg` in a script is this checkout's."""
        env = {**os.environ, "SLURM_CONF": str(self.conf),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        for name in [name for name in env if name.startswith(("SLURM_JOB", "SLURM_PROCID", "SLURM_NTASKS"))]:
            del env[name]  # a test run inside a Slurm job must not hand its own job's variables on
        env.update(extra or {})
        return env

    def command(self, *args: str, env: Optional[Mapping[str, str]] = None, cwd: Optional[Path] = None,
                check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), env=self.env(env), cwd=cwd, capture_output=True, text=True, timeout=60)
        if check and result.returncode:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}: {result.stdout}{result.stderr}")
        return result

    def sbatch(self, *args: str, cwd: Path, env: Optional[Mapping[str, str]] = None) -> int:
        return int(self.command("sbatch", "--parsable", *args, cwd=cwd, env=env).stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` of ``job_id`` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        text = self.command("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(?:^|\s)([A-Za-z][\w:/]*)=(\S*)", text))

    def state(self, job_id: int) -> str:
        return self.job(job_id)["JobState"]

    def wait_until_idle(self, timeout: float = 120) -> None:
        """Until the node is idle: a requeued job's previous run has been torn down (released too early, slurmd
        refuses to launch it again: "Job N already killed, do not launch batch job")."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.command("sinfo", "-h", "-o", "%T").stdout.split()
            if states and all(state.rstrip("*") == "idle" for state in states):
                return
            assert time.monotonic() < deadline, f"the node did not become idle in {timeout:.0f} s: {states}"
            time.sleep(0.2)

    def wait(self, job_id: int, timeout: float, until: frozenset[str] = frozenset(FINISHED_STATES)) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in until:
                return info
            if time.monotonic() > deadline:
                self.command("scancel", str(job_id), check=False)
                raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout:.0f} s "
                                     f"(waiting for {sorted(until)}); cancelled it")
            time.sleep(0.5)


