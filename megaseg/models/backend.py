"""Which transformer implementation builds the layers: megatron-core's local modules or TransformerEngine's.

The local spec (torch norms, megatron's own parallel linears with a plain path where no gradient or communication is
needed: models/linear.py, core attention on torch's fused SDPA: models/attention.py) is the only one that works on a
CPU; TransformerEngine needs CUDA and is the only way to FP8, sequence parallelism with RMSNorm and context
parallelism. `model.transformer_impl=auto` picks TransformerEngine when it imports and a GPU is visible.
"""
from __future__ import annotations

import functools
import importlib
from typing import Literal

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from megaseg.config.model import ModelConfig
from megaseg.models.attention import RotatedKeyCacheSelfAttention, SDPAttention
from megaseg.models.decode_layer import InlinedDecodeTransformerLayer
from megaseg.models.linear import LocalColumnParallelLinear, LocalRowParallelLinear
from megaseg.models.rotary import install_cached_rope

TransformerImpl = Literal["local", "transformer_engine"]


@functools.lru_cache(maxsize=1)
def transformer_engine_importable() -> bool:
    """True when `transformer_engine.pytorch` imports (a CPU wheel of TE installs but fails to import)."""
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # ImportError, OSError (missing cudnn .so) and friends all mean "not usable here"
        return False
    return True


def resolve_transformer_impl(model_cfg: ModelConfig) -> TransformerImpl:
    """The implementation `model.transformer_impl` asks for on this machine; ValueError when it cannot be had."""
    has_cuda = torch.cuda.is_available()
    has_te = transformer_engine_importable()
    requested = model_cfg.transformer_impl
    if requested == "transformer_engine" and not (has_cuda and has_te):
        missing = "a CUDA GPU" if not has_cuda else "an importable transformer_engine (pip install megaseg[gpu])"
        raise ValueError(
            f"model.transformer_impl='transformer_engine' needs {missing}; "
            "set model.transformer_impl=local (or auto) to use megatron-core's own layers")
    if requested == "auto":
        impl: TransformerImpl = "transformer_engine" if (has_cuda and has_te) else "local"
    else:
        impl = requested  # type: ignore[assignment]
    if model_cfg.fp8 is not None and impl != "transformer_engine":
        where = "on a CPU-only machine" if not has_cuda else f"with model.transformer_impl={requested!r}"
        raise ValueError(
            f"model.fp8={model_cfg.fp8!r} needs the TransformerEngine layers, which are not available {where}; "
            "unset model.fp8 (model.fp8=null) or run on a GPU with transformer_engine installed")
    return impl


def build_layer_spec(model_cfg: ModelConfig, impl: TransformerImpl) -> ModuleSpec:
    """The ModuleSpec of one transformer layer (attention + MLP with their norms) for `impl`.

    Every model megaseg builds (GPTModel and the scalar-head reward model / critic) gets its layers here, so this is
    where megatron's unfused RoPE is routed through the cached one (models/rotary.py): installed anywhere else, a
    reward model's numbers would depend on whether a GPTModel had been built earlier in the process.
    """
    install_cached_rope()  # process-wide and idempotent; used where RoPE is not fused (no TransformerEngine fusion)
    if impl == "transformer_engine":
        # TE fuses the pre-attention / pre-MLP norms into its LayerNormLinear modules; FP8 is set on the config.
        return get_gpt_layer_with_transformer_engine_spec()
    # Told RMSNorm, the local spec uses torch's RMSNorm even where apex is installed (its FusedLayerNorm has none).
    spec = get_gpt_layer_local_spec(normalization=model_cfg.normalization)
    # Its attention through torch's fused scaled-dot-product kernel instead of megatron's unfused chain, and decode
    # steps that rotate the new keys only (models/attention.py).
    spec.submodules.self_attention.module = RotatedKeyCacheSelfAttention
    # Its KV-cache decode steps inlined, megatron's layer for everything else (models/decode_layer.py).
    spec.module = InlinedDecodeTransformerLayer
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    # Its linears with a plain F.linear where no gradient or communication is needed (models/linear.py).
    attention, mlp = spec.submodules.self_attention.submodules, spec.submodules.mlp.submodules
    attention.linear_qkv = mlp.linear_fc1 = LocalColumnParallelLinear
    attention.linear_proj = mlp.linear_fc2 = LocalRowParallelLinear
    return spec
