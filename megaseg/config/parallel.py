"""Parallel layout. The data-parallel size is derived: world_size / (tp * pp * cp)."""
from __future__ import annotations

from dataclasses import dataclass

from megaseg.config._checks import check_choice, check_positive

BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    # auto: nccl when CUDA is available, else gloo.
    backend: str = "auto"
    # How long a collective (and the initial rendezvous) may wait before torch.distributed raises instead of hanging.
    distributed_timeout_minutes: int = 30

    def __post_init__(self) -> None:
        check_choice("parallel.backend", self.backend, BACKENDS)
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                     "distributed_timeout_minutes"):
            check_positive(f"parallel.{name}", getattr(self, name))
        if self.context_parallel_size > 1:
            # Nothing in megaseg splits sequences across ranks yet (batches, losses, generation and the segment
            # passes all assume whole sequences per rank): accepting it would train on wrong results silently.
            raise ValueError(
                f"parallel.context_parallel_size={self.context_parallel_size}: context parallelism is not supported "
                "yet (nothing splits sequences across ranks); set parallel.context_parallel_size=1 and use tensor, "
                "pipeline or data parallelism (`megaseg plan` proposes layouts that fit)")
