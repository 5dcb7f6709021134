"""Parallel setup: torch.distributed + megatron parallel_state from torchrun/Slurm, the CPU shim, vocab-parallel ops.

Importing this package does not import megatron-core (4 s); the functions that need it import it when called.

Typical use, in a trainer or a distributed test (``run_distributed`` spawns gloo ranks with torchrun variables)::

    context = initialize_parallel(cfg.parallel, cfg.seed, fp8=cfg.model.fp8)  # applies the CPU shim if no CUDA
    model = build_model(..., pg_collection=context.process_group_collection())
    with cuda_device_redirect():        # megatron optimizer / pipeline schedules hard-code device="cuda"
        optimizer = get_megatron_optimizer(...)
    entropy = vocab_parallel_entropy(logits_shard, context.tp_group)
    destroy_parallel()
"""
from megaseg.parallel.cpu_compat import apply_cpu_compat, cuda_device_redirect, is_cpu_only
from megaseg.parallel.initialize import ParallelContext, destroy_parallel, initialize_parallel, parallel_session
from megaseg.parallel.launch_env import LaunchEnv, expand_hostlist, first_host, read_launch_env
from megaseg.parallel.vocab_parallel import vocab_parallel_entropy, vocab_parallel_log_probs

__all__ = [
    "apply_cpu_compat",
    "cuda_device_redirect",
    "is_cpu_only",
    "ParallelContext",
    "initialize_parallel",
    "destroy_parallel",
    "parallel_session",
    "LaunchEnv",
    "read_launch_env",
    "expand_hostlist",
    "first_host",
    "vocab_parallel_entropy",
    "vocab_parallel_log_probs",
]
