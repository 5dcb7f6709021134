"""Where this process sits in the job: rank, world size, local rank and rendezvous address, from the launcher's env.

Three launchers are understood, in this order of precedence:
1. torchrun (or any launcher that exports its variables): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
   ``srun torchrun ...`` sets both kinds; torchrun's variables describe the actual worker, so they win.
2. Slurm ``srun``: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the rendezvous host is MASTER_ADDR if exported,
   else the first host of SLURM_JOB_NODELIST (or SLURM_NODELIST), a compressed hostlist such as ``node[01-03,07]``;
   the port is MASTER_PORT if exported, else derived from SLURM_JOB_ID so that two jobs sharing a node do not collide.
3. Nothing set: a single process (world size 1), which needs no rendezvous address.

Only reads a mapping (``os.environ`` by default) and never writes to it, so it can be tested with fake environments.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Mapping, Optional

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")

# MASTER_PORT for a Slurm job that does not export one: SLURM_PORT_BASE + job id mod SLURM_PORT_SPAN. The range sits
# below the Linux ephemeral ports (32768+), so an outgoing connection cannot already hold the port.
SLURM_PORT_BASE = 12000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class LaunchEnv:
    """How the launcher placed this process. ``master_addr``/``master_port`` are None for a single process."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: Optional[str]
    master_port: Optional[int]
    launcher: str  # "torchrun" | "slurm" | "single"


def _read_int(env: Mapping[str, str], name: str, minimum: int) -> int:
    raw = env.get(name)
    if raw is None:
        raise ValueError(f"environment variable {name} is not set")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={value} must be >= {minimum}")
    return value


def _read_port(env: Mapping[str, str], name: str) -> int:
    port = _read_int(env, name, minimum=1)
    if port > 65535:
        raise ValueError(f"environment variable {name}={port} is not a TCP port (1..65535)")
    return port


def _check_rank(launcher: str, rank: int, local_rank: int, world_size: int, names: tuple[str, str, str]) -> None:
    rank_name, local_name, world_name = names
    if rank >= world_size:
        raise ValueError(f"{launcher}: {rank_name}={rank} must be < {world_name}={world_size}")
    if local_rank > rank:
        raise ValueError(f"{launcher}: {local_name}={local_rank} cannot exceed {rank_name}={rank}")


def _from_torchrun(env: Mapping[str, str]) -> LaunchEnv:
    missing = [name for name in TORCHRUN_VARIABLES if name not in env]
    if missing:
        raise ValueError(
            f"RANK is set, so this looks like a torchrun launch, but {missing} are not set; "
            f"a torchrun-style launch must export all of {list(TORCHRUN_VARIABLES)}"
        )
    rank = _read_int(env, "RANK", minimum=0)
    world_size = _read_int(env, "WORLD_SIZE", minimum=1)
    local_rank = _read_int(env, "LOCAL_RANK", minimum=0)
    _check_rank("torchrun", rank, local_rank, world_size, ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    master_addr = env["MASTER_ADDR"].strip()
    if not master_addr:
        raise ValueError("environment variable MASTER_ADDR is empty")
    return LaunchEnv(rank, world_size, local_rank, master_addr, _read_port(env, "MASTER_PORT"), "torchrun")


def _slurm_master_addr(env: Mapping[str, str]) -> str:
    if env.get("MASTER_ADDR", "").strip():
        return env["MASTER_ADDR"].strip()
    for name in ("SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if env.get(name, "").strip():
            return first_host(env[name])
    raise ValueError(
        "Slurm launch without a rendezvous host: set MASTER_ADDR, or run under srun so that "
        "SLURM_JOB_NODELIST is set"
    )


def _slurm_master_port(env: Mapping[str, str]) -> int:
    if "MASTER_PORT" in env:
        return _read_port(env, "MASTER_PORT")
    if "SLURM_JOB_ID" not in env:
        raise ValueError("Slurm launch without MASTER_PORT or SLURM_JOB_ID to derive it from: export MASTER_PORT")
    return SLURM_PORT_BASE + _read_int(env, "SLURM_JOB_ID", minimum=0) % SLURM_PORT_SPAN


def _from_slurm(env: Mapping[str, str]) -> LaunchEnv:
    missing = [name for name in SLURM_VARIABLES if name not in env]
    if missing:
        raise ValueError(
            f"SLURM_PROCID is set, so this looks like an srun launch, but {missing} are not set; "
            f"srun exports all of {list(SLURM_VARIABLES)}"
        )
    rank = _read_int(env, "SLURM_PROCID", minimum=0)
    world_size = _read_int(env, "SLURM_NTASKS", minimum=1)
    local_rank = _read_int(env, "SLURM_LOCALID", minimum=0)
    _check_rank("slurm", rank, local_rank, world_size, ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"))
    if world_size == 1:
        return LaunchEnv(0, 1, 0, None, None, "slurm")
    return LaunchEnv(rank, world_size, local_rank, _slurm_master_addr(env), _slurm_master_port(env), "slurm")


def read_launch_env(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Rank, world size, local rank and rendezvous address of this process (see the module docstring)."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        return _from_torchrun(env)
    if "SLURM_PROCID" in env:
        return _from_slurm(env)
    return LaunchEnv(0, 1, 0, None, None, "single")


# --- Slurm hostlists ----------------------------------------------------------------------------------------------


def _split_outside_brackets(text: str, separator: str = ",") -> list[str]:
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"hostlist {text!r} has nested brackets")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"hostlist {text!r} has an unmatched ']'")
        elif char == separator and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    if depth != 0:
        raise ValueError(f"hostlist {text!r} has an unmatched '['")
    parts.append(text[start:])
    return parts


def _expand_range_set(body: str, hostlist: str) -> list[str]:
    """``01-03,07`` -> ``['01', '02', '03', '07']``; the zero padding of the lower bound is kept."""
    values = []
    for item in body.split(","):
        low, dash, high = item.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"hostlist {hostlist!r}: bad range {item!r} inside brackets")
        if not dash:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"hostlist {hostlist!r}: range {item!r} runs backwards")
        values.extend(str(number).zfill(len(low)) for number in range(int(low), int(high) + 1))
    return values


def _expand_host_pattern(pattern: str, hostlist: str) -> list[str]:
    """``rack[1-2]-n[01-02]`` -> the cartesian product of the bracket groups, in Slurm's order."""
    pieces: list[list[str]] = []
    rest = pattern
    while "[" in rest:
        prefix, _, tail = rest.partition("[")
        body, closed, rest = tail.partition("]")
        if not closed:
            raise ValueError(f"hostlist {hostlist!r} has an unmatched '['")
        pieces.extend([[prefix], _expand_range_set(body, hostlist)])
    if "]" in rest:
        raise ValueError(f"hostlist {hostlist!r} has an unmatched ']'")
    pieces.append([rest])
    return ["".join(combination) for combination in itertools.product(*pieces)]


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm compressed hostlist: ``"node[01-03,07],gpu5"`` -> ``node01 node02 node03 node07 gpu5``."""
    if not hostlist or not hostlist.strip():
        raise ValueError(f"hostlist {hostlist!r} is empty")
    hosts: list[str] = []
    for pattern in _split_outside_brackets(hostlist.strip()):
        pattern = pattern.strip()
        if not pattern:
            raise ValueError(f"hostlist {hostlist!r} has an empty entry")
        hosts.extend(_expand_host_pattern(pattern, hostlist))
    return hosts


def first_host(hostlist: str) -> str:
    """The first host of a Slurm hostlist: rank 0 of a block-distributed srun step runs there."""
    return expand_hostlist(hostlist)[0]
