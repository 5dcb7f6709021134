"""Rollouts: batched sampling from the megatron actor with a KV cache, under tensor and pipeline parallelism.

``generate`` and ``GenerationOutput`` import megatron-core (4 s) on first use; ``SamplingSettings`` and
``megaseg.generation.sampling`` do not.
"""
from typing import Any

from megaseg.generation.settings import SamplingSettings

__all__ = ["generate", "GenerationOutput", "SamplingSettings"]


def __getattr__(name: str) -> Any:
    if name == "generate":
        from megaseg.generation.sampler import generate
        return generate
    if name == "GenerationOutput":
        from megaseg.generation.output import GenerationOutput
        return GenerationOutput
    raise AttributeError(f"module 'megaseg.generation' has no attribute {name!r}")
