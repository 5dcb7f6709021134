"""Parallel setup: torch.distributed + megatron parallel_state from torchrun/Slurm, the CPU shim, vocab-parallel ops,
and the collectives every layer above uses (``collectives``: rank 0, barriers, sums across ranks).

Importing this package does not import megatron-core (4 s); the functions that need it import it when called.

Typical use, in a command or a distributed test (``run_distributed`` spawns gloo ranks with torchrun variables)::

    with parallel_session(config) as context:     # initialize_parallel + destroy_parallel; CPU shim if no CUDA
        model = build_gpt_model(config.model, config.parallel)
        entropy = vocab_parallel_entropy(logits_shard, context.tp_group)

The megatron code paths that hard-code CUDA (pipeline schedules, the optimizer) run inside ``cuda_device_redirect``
in megaseg.models, the layer that drives megatron; nothing above it imports the shim.
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
