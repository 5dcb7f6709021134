"""megatron-core's static KV cache, behind the few calls the sampler makes, with the API differences guarded.

megatron-core keeps the cache inside the model's attention layers: every layer stores its keys/values in the
context object passed to ``GPTModel.forward`` (``inference_context=``; older releases call it ``inference_params=``),
at columns ``[sequence_len_offset, sequence_len_offset + n)``, and attends over columns ``[0, offset + n)``. One
context per pipeline stage: it only holds that stage's layers.

The sampler sets ``sequence_len_offset`` itself before each forward (rather than relying on the ``increment_*``
helpers some releases lack), so the cache position is always the column being fed.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


def _context_class() -> Any:
    try:
        from megatron.core.inference.contexts import StaticInferenceContext
        return StaticInferenceContext
    except ImportError:  # megatron-core < 0.13 calls it InferenceParams
        from megatron.core import InferenceParams
        return InferenceParams


@functools.lru_cache(maxsize=8)
def _forward_parameters(forward: Any) -> frozenset[str]:
    return frozenset(inspect.signature(forward).parameters)


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP / Float16Module wrappers (they keep it in ``.module``)."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


class StaticKVCache:
    """One stage's KV cache for a batch of ``batch_size`` rows and up to ``max_sequence_length`` columns."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_sequence_length: int):
        self._context = _context_class()(batch_size, max_sequence_length)
        parameters = _forward_parameters(type(_unwrapped(model)).forward)
        if "inference_context" in parameters:
            self._keyword = "inference_context"
        elif "inference_params" in parameters:
            self._keyword = "inference_params"
        else:
            raise RuntimeError(
                f"{type(_unwrapped(model)).__name__}.forward takes neither inference_context nor inference_params in "
                "this megatron-core release; use generation_backend='full_forward' (no KV cache)")
        # GPTModel asserts the logits are gathered over tensor-parallel ranks when it runs with a cache.
        self._gather_keyword = "runtime_gather_output" in parameters

    def forward_kwargs(self, start_column: int) -> dict[str, Any]:
        """Keyword arguments for a forward of the columns starting at ``start_column``."""
        self._context.sequence_len_offset = start_column
        kwargs: dict[str, Any] = {self._keyword: self._context}
        if self._gather_keyword:
            kwargs["runtime_gather_output"] = True
        return kwargs

    def prefill_done(self) -> None:
        """From now on every forward feeds one column (flash-decode kernels and CUDA graphs key on this)."""
        enable = getattr(self._context, "enable_decode_mode", None)
        if enable is not None:
            enable()
