"""run_distributed: values per rank, errors with the rank's traceback, deaths and hangs reported instead of hanging."""

import os
import time

import pytest

from megaseg.parallel.spawn import DistributedRunError, run_distributed


def _rank_env_and_sum(rank, world_size, offset):
    import torch
    import torch.distributed as dist

    env = {name: os.environ[name] for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # A raw gloo group from the exported variables, as torchrun would allow; run_distributed tears it down.
    dist.init_process_group("gloo", init_method="env://")
    value = torch.tensor([rank + offset], dtype=torch.float64)
    dist.all_reduce(value)
    return {"rank": rank, "env": env, "sum": float(value), "threads": torch.get_num_threads()}


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError(f"bad value on rank {rank}")
    return rank


def _rank_one_blocks_in_a_collective(rank, world_size):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    if rank == 0:
        raise KeyError("rank 0 gives up before the all-reduce")
    dist.all_reduce(torch.zeros(1))  # waits for rank 0 until gloo notices it is gone (or the default 30 min timeout)
    return rank


def _die_silently(rank, world_size):
    os._exit(7)


def _sleep_forever(rank, world_size):
    time.sleep(600)


@pytest.mark.distributed
def test_values_come_back_ordered_by_rank_with_torchrun_variables():
    results = run_distributed(_rank_env_and_sum, 2, 10)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["sum"] == 21.0 for r in results)
    assert results[0]["env"]["MASTER_PORT"] == results[1]["env"]["MASTER_PORT"]
    assert [r["env"]["RANK"] for r in results] == ["0", "1"]
    assert all(r["env"]["WORLD_SIZE"] == "2" and r["env"]["MASTER_ADDR"] == "127.0.0.1" for r in results)
    assert all(r["threads"] == max(1, (os.cpu_count() or 1) // 2) for r in results)


@pytest.mark.distributed
def test_an_exception_carries_the_rank_and_its_traceback():
    with pytest.raises(DistributedRunError) as caught:
        run_distributed(_fail_on_rank_one, 2, timeout=60)
    error = caught.value
    assert set(error.rank_errors) == {1}
    assert "bad value on rank 1" in error.rank_errors[1] and "_fail_on_rank_one" in error.rank_errors[1]
    assert isinstance(error.exceptions[1], ValueError)
    assert "rank 1" in str(error)


@pytest.mark.distributed
def test_a_failure_does_not_wait_for_peers_stuck_in_a_collective():
    started = time.monotonic()
    with pytest.raises(DistributedRunError) as caught:
        run_distributed(_rank_one_blocks_in_a_collective, 2, timeout=120)
    assert time.monotonic() - started < 60
    assert "rank 0 gives up" in caught.value.rank_errors[0]
    # Rank 1 either sees the closed connection (gloo raises) or is terminated; either way it is accounted for.
    assert 1 in caught.value.rank_errors


def test_a_silent_death_is_reported_with_its_exit_code():
    with pytest.raises(DistributedRunError, match="exit code 7"):
        run_distributed(_die_silently, 1, timeout=60)


def test_a_hang_times_out():
    started = time.monotonic()
    with pytest.raises(DistributedRunError, match="did not finish within 4 s"):
        run_distributed(_sleep_forever, 1, timeout=4)
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("world_size", [0, -1, 1.5, True])
def test_bad_world_size(world_size):
    with pytest.raises(ValueError, match="world_size must be a positive integer"):
        run_distributed(_fail_on_rank_one, world_size)


def _exit_cleanly_without_reporting(rank, world_size):
    os._exit(0)


def test_a_clean_exit_without_a_report_is_not_waited_for():
    started = time.monotonic()
    with pytest.raises(DistributedRunError, match="exit code 0 without reporting"):
        run_distributed(_exit_cleanly_without_reporting, 1, timeout=60)
    assert time.monotonic() - started < 30


def _start_helper_process(rank, world_size):
    import subprocess

    # Stands in for dist_checkpointing's Manager: a process the rank starts and does not stop itself.
    return subprocess.Popen(["sleep", "120"]).pid


def test_helper_processes_of_ranks_do_not_outlive_the_run():
    import psutil

    pids = run_distributed(_start_helper_process, 2)
    # SIGKILL is delivered asynchronously: on a loaded machine the helper may not have been scheduled to die yet when
    # run_distributed returns, so give the kernel a moment. A helper nobody signalled would sleep on for 120 s.
    deadline = time.monotonic() + 10
    for pid in pids:
        while True:
            try:
                status = psutil.Process(pid).status()
            except psutil.NoSuchProcess:
                break
            if status == psutil.STATUS_ZOMBIE:
                break
            assert time.monotonic() < deadline, f"helper {pid} of a rank is still running ({status})"
            time.sleep(0.1)
