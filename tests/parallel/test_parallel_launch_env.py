"""Reading torchrun / Slurm / empty environments and expanding Slurm hostlists (pure, no processes)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megaseg.parallel.launch_env import (
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    expand_hostlist,
    first_host,
    read_launch_env,
)

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"}
SLURM = {
    "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu-a[07-09,12],gpu-b3", "SLURM_JOB_ID": "123456",
}


@pytest.mark.parametrize(
    "hostlist, expected",
    [
        ("node01", ["node01"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("node[01-03,07],login5", ["node01", "node02", "node03", "node07", "login5"]),
        ("nid[0008-0010]", ["nid0008", "nid0009", "nid0010"]),
        ("a,b,c", ["a", "b", "c"]),
        ("rack[1-2]-n[8-9]", ["rack1-n8", "rack1-n9", "rack2-n8", "rack2-n9"]),
        ("n[9-11]", ["n9", "n10", "n11"]),
        ("10.1.0.[3-4]", ["10.1.0.3", "10.1.0.4"]),
        (" node[1] ", ["node1"]),
    ],
)
def test_expand_hostlist(hostlist, expected):
    assert expand_hostlist(hostlist) == expected
    assert first_host(hostlist) == expected[0]


@pytest.mark.parametrize(
    "hostlist, message",
    [("", "empty"), ("node[01-03", "unmatched '\\['"), ("node01]", "unmatched '\\]'"), ("node[1-x]", "bad range"),
     ("node[5-3]", "backwards"), ("a,,b", "empty entry"), ("n[[1]]", "nested")],
)
def test_expand_hostlist_rejects_malformed_lists(hostlist, message):
    with pytest.raises(ValueError, match=message):
        expand_hostlist(hostlist)


@settings(max_examples=50, deadline=None)
@given(prefix=st.sampled_from(["node", "gpu-", "x"]), numbers=st.sets(st.integers(0, 300), min_size=1, max_size=12),
       width=st.integers(1, 4))
def test_expand_hostlist_inverts_slurm_compression(prefix, numbers, width):
    """Compress a host set the way Slurm prints it (sorted, runs joined by '-'), expand it, get the hosts back."""
    ordered = sorted(numbers)
    runs, start = [], ordered[0]
    for previous, current in zip(ordered, ordered[1:] + [None]):
        if current != previous + 1:
            runs.append(f"{start:0{width}d}" if start == previous else f"{start:0{width}d}-{previous:0{width}d}")
            start = current
    compressed = f"{prefix}[{','.join(runs)}]"
    assert expand_hostlist(compressed) == [f"{prefix}{n:0{width}d}" for n in ordered]


def test_torchrun_environment():
    launch = read_launch_env(TORCHRUN)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (3, 4, 1, "torchrun")
    assert (launch.master_addr, launch.master_port) == ("10.0.0.7", 29500)


def test_torchrun_wins_over_slurm_under_srun_torchrun():
    launch = read_launch_env({**SLURM, **TORCHRUN})
    assert launch.launcher == "torchrun" and launch.rank == 3


def test_slurm_environment_derives_host_and_port():
    launch = read_launch_env(SLURM)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (5, 8, 1, "slurm")
    assert launch.master_addr == "gpu-a07"
    assert launch.master_port == SLURM_PORT_BASE + 123456 % SLURM_PORT_SPAN


def test_slurm_exported_master_addr_and_port_win():
    launch = read_launch_env({**SLURM, "MASTER_ADDR": "head", "MASTER_PORT": "4000"})
    assert (launch.master_addr, launch.master_port) == ("head", 4000)


def test_slurm_nodelist_fallback():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}
    assert read_launch_env({**env, "SLURM_NODELIST": "cn[3-4]"}).master_addr == "cn3"


def test_empty_environment_is_a_single_process():
    launch = read_launch_env({})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (0, 1, 0, "single")
    assert launch.master_addr is None and launch.master_port is None


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, r"\['LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'\] are not set"),
        ({**TORCHRUN, "RANK": "4"}, "RANK=4 must be < WORLD_SIZE=4"),
        ({**TORCHRUN, "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({**TORCHRUN, "MASTER_PORT": "70000"}, "not a TCP port"),
        ({**TORCHRUN, "MASTER_ADDR": " "}, "MASTER_ADDR is empty"),
        ({"SLURM_PROCID": "0"}, "SLURM_NTASKS"),
        ({**SLURM, "SLURM_PROCID": "8"}, "SLURM_PROCID=8 must be < SLURM_NTASKS=8"),
        ({k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}, "set MASTER_ADDR"),
        ({k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"}, "export MASTER_PORT"),
    ],
)
def test_bad_environments_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        read_launch_env(env)
