"""The one place that starts torch.distributed and megatron's parallel_state, and hands back the process groups.

``initialize_parallel`` reads the launcher's environment (torchrun, Slurm or none, see ``launch_env``), checks the
requested layout against the world size and the hardware, starts the process group (NCCL on GPU, gloo on CPU),
builds megatron's tensor / pipeline / context / data-parallel groups, seeds every RNG the way megatron's own
training loop does, and returns a frozen ``ParallelContext``. Code below this layer takes the groups it needs from
that object as arguments instead of reaching into ``parallel_state`` globals.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from megaseg.config.parallel import ParallelConfig
from megaseg.kernels.dispatch import select_kernels
from megaseg.parallel.cpu_compat import apply_cpu_compat, is_cpu_only
from megaseg.parallel.launch_env import LaunchEnv, read_launch_env

if TYPE_CHECKING:
    from megaseg.config import MegasegConfig

logger = logging.getLogger(__name__)

# Megatron's training loop offsets the seed per pipeline stage so that stages draw different dropout masks.
PIPELINE_STAGE_SEED_STRIDE = 100


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place in the parallel layout and the process groups it communicates over.

    Ranks are 0-based positions inside the respective group. ``dp`` excludes context parallelism; ``dp_cp_group``
    (data x context) is the group gradients are reduced over when context parallelism is on.
    """

    world_size: int
    rank: int
    local_rank: int
    device: torch.device
    backend: str
    launcher: str
    tp_size: int
    pp_size: int
    cp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    cp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    dp_cp_group: dist.ProcessGroup
    model_parallel_group: dist.ProcessGroup
    seed: int

    @property
    def is_first_pipeline_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pipeline_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0


def resolve_backend(parallel_cfg: ParallelConfig) -> str:
    """``auto`` -> nccl on CUDA, else gloo; an explicit nccl without CUDA is a user error."""
    cuda = not is_cpu_only()
    if parallel_cfg.backend == "auto":
        return "nccl" if cuda else "gloo"
    if parallel_cfg.backend == "nccl" and not cuda:
        raise ValueError(
            "parallel.backend='nccl' needs CUDA, but this machine has none; "
            "use parallel.backend=gloo (or auto) on CPU"
        )
    return parallel_cfg.backend


def check_parallel_sizes(parallel_cfg: ParallelConfig, world_size: int) -> int:
    """Return the data-parallel size ``world_size / (tp * pp * cp)``; raise if the product does not divide it."""
    tp = parallel_cfg.tensor_model_parallel_size
    pp = parallel_cfg.pipeline_model_parallel_size
    cp = parallel_cfg.context_parallel_size
    model_parallel = tp * pp * cp
    if world_size % model_parallel != 0:
        raise ValueError(
            f"parallel.tensor_model_parallel_size={tp} x pipeline_model_parallel_size={pp} x "
            f"context_parallel_size={cp} = {model_parallel} does not divide world size {world_size}; "
            f"choose sizes whose product divides the number of processes"
        )
    return world_size // model_parallel


def check_hardware_support(parallel_cfg: ParallelConfig, fp8: Optional[str]) -> None:
    """Refuse features that need CUDA (and TransformerEngine) on a CPU-only machine."""
    if not is_cpu_only():
        return
    if parallel_cfg.sequence_parallel:
        raise ValueError(
            "parallel.sequence_parallel=true needs CUDA (megatron's torch LayerNorm refuses it on CPU); "
            "set parallel.sequence_parallel=false on this CPU-only machine"
        )
    if fp8 is not None:
        raise ValueError(
            f"model.fp8={fp8!r} needs a CUDA GPU with TransformerEngine; set model.fp8=null on this CPU-only machine"
        )


def _select_device(launch: LaunchEnv) -> torch.device:
    if is_cpu_only():
        return torch.device("cpu")
    num_devices = torch.cuda.device_count()
    if launch.local_rank >= num_devices:
        raise ValueError(
            f"local rank {launch.local_rank} has no GPU: only {num_devices} are visible on this node; "
            f"launch at most {num_devices} processes per node"
        )
    torch.cuda.set_device(launch.local_rank)
    return torch.device("cuda", launch.local_rank)


# One TCPStore per rendezvous address, kept for the life of the process, and a generation counter. Re-initialising
# after destroy_parallel() (tests do) on a fresh store would race: a fast rank can reach the previous server before
# rank 0 has torn it down and read the previous round's gloo addresses. A persistent store with one key prefix per
# generation avoids both. Every rank initialises the same number of times, so the generations agree.
_rendezvous_stores: dict[tuple, Any] = {}
_generation = 0


def _rendezvous_store(launch: LaunchEnv, timeout: timedelta) -> Any:
    key = (launch.master_addr, launch.master_port, launch.world_size, launch.rank)
    if key not in _rendezvous_stores:
        # Under torchrun's elastic agent the agent already hosts the store at MASTER_PORT: every rank is a client.
        agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        _rendezvous_stores[key] = dist.TCPStore(
            host_name=launch.master_addr,
            port=launch.master_port,
            world_size=launch.world_size,
            is_master=launch.rank == 0 and not agent_hosts_store,
            timeout=timeout,
            multi_tenant=True,
        )
    return _rendezvous_stores[key]


def _start_process_group(launch: LaunchEnv, backend: str, timeout: timedelta) -> None:
    global _generation
    if dist.is_initialized():
        if dist.get_world_size() != launch.world_size or dist.get_rank() != launch.rank:
            raise RuntimeError(
                f"torch.distributed is already initialised as rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"but the launcher says rank {launch.rank} of {launch.world_size}; call destroy_parallel() first"
            )
        logger.info("torch.distributed already initialised (%s); reusing it", dist.get_backend())
        return
    if launch.master_addr is None:
        # A single process needs no rendezvous: an in-memory store avoids picking (and colliding on) a port.
        store = dist.HashStore()
    else:
        _generation += 1
        store = dist.PrefixStore(f"megaseg/init{_generation}", _rendezvous_store(launch, timeout))
    dist.init_process_group(backend, store=store, rank=launch.rank, world_size=launch.world_size, timeout=timeout)


def seed_everything(seed: int, pp_rank: int) -> int:
    """Seed python, numpy, torch and megatron's model-parallel RNG tracker as megatron's training loop does.

    The tracker gives each tensor-parallel rank its own stream (``seed + 2718 + tp_rank``) for dropout inside
    tensor-parallel regions, and the default generator the same stream on all of them. Returns the stage seed.
    """
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    stage_seed = seed + PIPELINE_STAGE_SEED_STRIDE * pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)
    return stage_seed


def _build_context(launch: LaunchEnv, device: torch.device, backend: str, seed: int) -> ParallelContext:
    from megatron.core import parallel_state as ps

    return ParallelContext(
        world_size=launch.world_size,
        rank=launch.rank,
        local_rank=launch.local_rank,
        device=device,
        backend=backend,
        launcher=launch.launcher,
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        cp_size=ps.get_context_parallel_world_size(),
        dp_size=ps.get_data_parallel_world_size(with_context_parallel=False),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(with_context_parallel=False),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        dp_group=ps.get_data_parallel_group(with_context_parallel=False),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        model_parallel_group=ps.get_model_parallel_group(),
        seed=seed,
    )


def initialize_parallel(
    parallel_cfg: ParallelConfig,
    seed: int,
    *,
    fp8: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
) -> ParallelContext:
    """Start torch.distributed and megatron's parallel_state for this process; seed every RNG.

    Args:
        parallel_cfg: the ``parallel`` section of the config (sizes, backend, timeout).
        seed: the run's seed; pipeline stage ``s`` uses ``seed + 100 * s`` (megatron's convention).
        fp8: ``model.fp8`` of the config, only to refuse it on a CPU-only machine.
        env: the launcher's variables; ``os.environ`` when None (tests pass fake torchrun / Slurm environments).

    Returns:
        The frozen ``ParallelContext``. Call ``destroy_parallel()`` before initialising again.
    """
    launch = read_launch_env(env)
    check_hardware_support(parallel_cfg, fp8)
    backend = resolve_backend(parallel_cfg)
    check_parallel_sizes(parallel_cfg, launch.world_size)
    # Imported after the checks above, so that a user mistake is reported without the 4 s megatron import.
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel_state is already initialised; call destroy_parallel() first")
    device = _select_device(launch)
    apply_cpu_compat()
    _start_process_group(launch, backend, timedelta(minutes=parallel_cfg.distributed_timeout_minutes))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel_cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        context_parallel_size=parallel_cfg.context_parallel_size,
        distributed_timeout_minutes=parallel_cfg.distributed_timeout_minutes,
    )
    seed_everything(seed, ps.get_pipeline_model_parallel_rank())
    return _build_context(launch, device, backend, seed)


@contextlib.contextmanager
def parallel_session(config: MegasegConfig, parallel_ctx: Optional[ParallelContext] = None
                     ) -> Iterator[ParallelContext]:
    """``parallel_ctx`` itself when given (the caller owns it and tears it down); else ``initialize_parallel`` from
    the config's parallel section, seed and fp8, and ``destroy_parallel`` when the block exits, however it exits.
    Every command starts here, so the config's ``kernels`` choice is applied here too."""
    select_kernels(config.kernels)
    if parallel_ctx is not None:
        yield parallel_ctx
        return
    context = initialize_parallel(config.parallel, config.seed, fp8=config.model.fp8)
    try:
        yield context
    finally:
        destroy_parallel()


def destroy_parallel() -> None:
    """Tear down megatron's parallel_state and the default process group; safe to call when nothing is initialised."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
