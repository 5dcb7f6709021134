"""initialize_parallel: layout validation, CPU refusals, and real gloo start-ups from torchrun and Slurm variables."""

import os
import socket

import pytest
import torch

from megaseg.config.parallel import ParallelConfig
from megaseg.parallel.cpu_compat import is_cpu_only
from megaseg.parallel.initialize import check_parallel_sizes, initialize_parallel
from megaseg.parallel.launch_env import SLURM_PORT_BASE, SLURM_PORT_SPAN
from megaseg.parallel.spawn import run_distributed

cpu_only = pytest.mark.skipif(not is_cpu_only(), reason="checks the CPU-only refusals")
FOUR_RANKS = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


def test_size_mismatch_names_every_number():
    cfg = ParallelConfig(tensor_model_parallel_size=3)
    expected = (
        "parallel.tensor_model_parallel_size=3 x pipeline_model_parallel_size=1 x context_parallel_size=1 = 3 "
        "does not divide world size 4"
    )
    with pytest.raises(ValueError, match=expected):
        check_parallel_sizes(cfg, 4)
    # initialize_parallel checks before it touches torch.distributed (no rendezvous on port 1 is ever tried).
    with pytest.raises(ValueError, match=expected):
        initialize_parallel(cfg, seed=0, env=FOUR_RANKS)


@pytest.mark.parametrize("tp, pp, cp, world, dp", [(1, 1, 1, 1, 1), (2, 1, 1, 4, 2), (2, 2, 1, 8, 2), (1, 2, 1, 4, 2)])
def test_data_parallel_size_is_derived(tp, pp, cp, world, dp):
    cfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp)
    assert check_parallel_sizes(cfg, world) == dp


@cpu_only
@pytest.mark.parametrize(
    "cfg, fp8, message",
    [
        (ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), None, "sequence_parallel=true needs CUDA"),
        (ParallelConfig(), "hybrid", "model.fp8='hybrid' needs a CUDA GPU"),
        (ParallelConfig(backend="nccl"), None, "backend='nccl' needs CUDA"),
    ],
)
def test_gpu_only_features_are_refused_on_cpu(cfg, fp8, message):
    with pytest.raises(ValueError, match=message):
        initialize_parallel(cfg, seed=0, fp8=fp8, env=FOUR_RANKS)


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_is_refused_everywhere(cp):
    # Refused by the config itself, CPU or GPU, before any process group or model exists.
    with pytest.raises(ValueError, match=rf"parallel.context_parallel_size={cp}: context parallelism is not "
                                         r"supported yet.*set parallel.context_parallel_size=1"):
        ParallelConfig(context_parallel_size=cp)


def test_config_rejects_a_non_positive_timeout():
    with pytest.raises(ValueError, match="parallel.distributed_timeout_minutes=0"):
        ParallelConfig(distributed_timeout_minutes=0)


# --- real start-ups in spawned gloo processes --------------------------------------------------------------------


def _describe(context):
    import torch.distributed as dist

    # One all-reduce per group proves the groups are wired to the right peers.
    sums = {}
    for name in ("tp_group", "pp_group", "dp_group", "cp_group"):
        value = torch.tensor([float(context.rank)])
        dist.all_reduce(value, group=getattr(context, name))
        sums[name] = float(value)
    return {
        "rank": context.rank, "world": context.world_size, "local": context.local_rank, "launcher": context.launcher,
        "backend": context.backend, "tp": (context.tp_size, context.tp_rank), "pp": (context.pp_size, context.pp_rank),
        "dp": (context.dp_size, context.dp_rank), "cp": (context.cp_size, context.cp_rank),
        "first_stage": context.is_first_pipeline_stage, "last_stage": context.is_last_pipeline_stage, "sums": sums,
        "random": float(torch.rand(1)),
    }


def _init_from_torchrun(rank, world_size, tp, pp):
    from megaseg.parallel import destroy_parallel

    cfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    first = _describe(initialize_parallel(cfg, seed=11))
    destroy_parallel()
    # A second initialisation after destroy_parallel must work in the same process (tests reuse processes).
    second = _describe(initialize_parallel(cfg, seed=11))
    return first, second


@pytest.mark.distributed
def test_torchrun_env_two_ranks_tensor_parallel():
    results = run_distributed(_init_from_torchrun, 2, 2, 1, timeout=120)
    for rank, (first, second) in enumerate(results):
        assert first == second
        assert first["rank"] == rank and first["world"] == 2 and first["local"] == rank
        assert (first["launcher"], first["backend"]) == ("torchrun", "gloo")
        assert first["tp"] == (2, rank) and first["pp"] == (1, 0) and first["dp"] == (1, 0) and first["cp"] == (1, 0)
        assert first["first_stage"] and first["last_stage"]
        assert first["sums"] == {"tp_group": 1.0, "pp_group": rank, "dp_group": rank, "cp_group": rank}
    # The default generator is seeded identically on the tensor-parallel ranks (megatron's data-parallel seed).
    assert results[0][0]["random"] == results[1][0]["random"]


@pytest.mark.distributed
def test_torchrun_env_four_ranks_tp2_pp2():
    results = run_distributed(_init_from_torchrun, 4, 2, 2, timeout=180)
    for rank, (first, _) in enumerate(results):
        # megatron's default order tp-cp-ep-dp-pp: tp varies fastest, pp slowest.
        assert first["tp"] == (2, rank % 2) and first["pp"] == (2, rank // 2) and first["dp"] == (1, 0)
        assert first["first_stage"] == (rank < 2) and first["last_stage"] == (rank >= 2)
        assert first["sums"]["tp_group"] == (0 + 1 if rank < 2 else 2 + 3)
        assert first["sums"]["pp_group"] == rank % 2 + (rank % 2 + 2)
    # Pipeline stages are seeded seed + 100 * stage: different streams on different stages.
    assert results[0][0]["random"] != results[2][0]["random"]


def _init_from_fake_slurm(rank, world_size, job_id):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name)
    os.environ.update({
        "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world_size), "SLURM_LOCALID": str(rank),
        # Only the first host is contacted (rank 0 runs there); the other names need not resolve.
        "SLURM_JOB_NODELIST": "localhost,node[02-03]", "SLURM_JOB_ID": str(job_id),
    })
    context = initialize_parallel(ParallelConfig(), seed=3)
    return _describe(context)


def _free_port_in_slurm_range() -> int:
    for port in range(SLURM_PORT_BASE + os.getpid() % 5000, SLURM_PORT_BASE + SLURM_PORT_SPAN):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in the Slurm-derived range")


@pytest.mark.distributed
def test_fake_slurm_env_two_ranks():
    # Choose a job id whose derived MASTER_PORT is free right now on this machine.
    job_id = _free_port_in_slurm_range() - SLURM_PORT_BASE + 7 * SLURM_PORT_SPAN
    results = run_distributed(_init_from_fake_slurm, 2, job_id, timeout=120)
    for rank, result in enumerate(results):
        assert (result["rank"], result["world"], result["local"], result["launcher"]) == (rank, 2, rank, "slurm")
        assert result["dp"] == (2, rank) and result["sums"]["dp_group"] == 1.0


def _init_without_env(rank, world_size):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name)
    context = initialize_parallel(ParallelConfig(), seed=3)
    error = None
    try:
        initialize_parallel(ParallelConfig(), seed=3)
    except RuntimeError as exc:
        error = str(exc)
    return _describe(context), error


def test_no_env_is_a_single_process_and_double_init_is_refused():
    ((result, error),) = run_distributed(_init_without_env, 1, timeout=120)
    assert (result["rank"], result["world"], result["launcher"]) == (0, 1, "single")
    assert error is not None and "destroy_parallel() first" in error
