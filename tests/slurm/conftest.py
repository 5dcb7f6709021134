"""A real single-node Slurm cluster for the tests in this folder, started by the project's own
scripts/slurm_cluster.sh (which installs slurm-wlm and munge where missing) and stopped after the session.

When Slurm cannot be started the tests fail with the script's reason; they never skip."""
from __future__ import annotations

import os
import subprocess

import pytest

from slurm_harness import CLUSTER_SCRIPT, SlurmCluster, free_port_pair


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    directory = tmp_path_factory.mktemp("slurm_cluster")
    env = {**os.environ, "SLURM_CLUSTER_PORT": str(free_port_pair())}
    stop = ["bash", str(CLUSTER_SCRIPT), "stop", str(directory)]
    started = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", str(directory)], env=env, capture_output=True,
                             text=True, timeout=900)
    if started.returncode:
        subprocess.run(stop, env=env, capture_output=True, timeout=120)
        pytest.fail(f"Slurm could not be started by {CLUSTER_SCRIPT} (exit {started.returncode}): "
                    f"{started.stderr.strip() or started.stdout.strip()}", pytrace=False)
    yield SlurmCluster(directory)
    subprocess.run(stop, env=env, capture_output=True, timeout=120)
