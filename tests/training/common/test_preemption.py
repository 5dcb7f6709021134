"""The preemption flag of the common loop: a signal that reaches only one rank stops every rank at the same step
(the agreement is a sum over the world), the previous handlers come back after the loop, and on the way out of a
preempted run the signals are ignored. The whole path under a real Slurm (scancel --signal=USR1, requeue, exact
resume) is tests/slurm/test_sbatch_recipes.py."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from megaseg.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed


def _agree(rank, world_size):
    from megaseg.config import load_config
    from megaseg.parallel import initialize_parallel
    from megaseg.training.common.loop import Preempted, PreemptionFlag

    ctx = initialize_parallel(load_config(None, []).parallel, seed=1)
    flag = PreemptionFlag()
    with flag.installed():
        before = flag.agreed(ctx)
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        after = flag.agreed(ctx)
    restored = signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    with pytest.raises(Preempted) as stopped, PreemptionFlag().installed():
        raise Preempted(3, Path("step_000003"))
    ignored = all(signal.getsignal(s) is signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGUSR1))
    return before, after, flag.signal_name, restored, ignored, stopped.value.code


def test_one_rank_signalled_stops_all_ranks():
    results = run_distributed(_agree, 2, timeout=120)
    assert results == [(False, True, None, True, True, 75), (False, True, "SIGUSR1", True, True, 75)]
