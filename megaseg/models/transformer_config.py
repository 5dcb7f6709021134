"""ModelConfig + ParallelConfig -> megatron-core TransformerConfig, after checking the layout can be built.

Every layout mistake (heads or layers that do not split over the parallel sizes, CPU-impossible options) is a
ValueError raised here, before any megatron module is constructed, naming the fields and the fix.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megaseg.config.model import ModelConfig
from megaseg.config.parallel import ParallelConfig
from megaseg.models.backend import TransformerImpl, resolve_transformer_impl

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def num_query_groups(model_cfg: ModelConfig) -> int:
    """Key/value heads; None in the config means multi-head attention (one group per head)."""
    return model_cfg.num_query_groups or model_cfg.num_attention_heads


def check_parallel_layout(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, impl: TransformerImpl) -> None:
    """Raise ValueError for a model that cannot be split over `parallel_cfg` with implementation `impl`."""
    tp = parallel_cfg.tensor_model_parallel_size
    pp = parallel_cfg.pipeline_model_parallel_size
    tp_splits = {
        # Attention heads and key/value groups are whole per tensor-parallel rank.
        "model.num_attention_heads": model_cfg.num_attention_heads,
        "model.num_query_groups": num_query_groups(model_cfg),
        # ColumnParallelLinear splits the MLP's inner dimension and VocabParallelEmbedding the vocabulary evenly.
        "model.ffn_hidden_size": model_cfg.ffn_hidden_size,
        "model.vocab_size": model_cfg.vocab_size,
    }
    for field, value in tp_splits.items():
        if value % tp:
            hint = " (pad the vocabulary when converting the checkpoint)" if field == "model.vocab_size" else ""
            raise ValueError(
                f"{field}={value} is not divisible by parallel.tensor_model_parallel_size={tp}; "
                f"choose a tensor-parallel size that divides it{hint}")
    if model_cfg.num_layers % pp:
        raise ValueError(
            f"model.num_layers={model_cfg.num_layers} is not divisible by parallel.pipeline_model_parallel_size={pp}; "
            "choose a pipeline-parallel size that divides the number of layers")
    if model_cfg.recompute_granularity == "full" and model_cfg.recompute_num_layers > model_cfg.num_layers // pp:
        raise ValueError(
            f"model.recompute_num_layers={model_cfg.recompute_num_layers} exceeds the "
            f"{model_cfg.num_layers // pp} layers of a pipeline stage (model.num_layers={model_cfg.num_layers} / "
            f"parallel.pipeline_model_parallel_size={pp}); choose at most that many")
    on_cpu = not torch.cuda.is_available()
    if parallel_cfg.sequence_parallel:
        if on_cpu:
            raise ValueError(
                "parallel.sequence_parallel=True is not possible on a CPU-only machine (torch norms refuse it and "
                "TransformerEngine needs CUDA); set parallel.sequence_parallel=false")
        if impl != "transformer_engine":
            raise ValueError(
                "parallel.sequence_parallel=True needs the TransformerEngine layers (the local torch norms refuse "
                "it); set model.transformer_impl=transformer_engine or parallel.sequence_parallel=false")
        if tp == 1:
            raise ValueError("parallel.sequence_parallel=True needs parallel.tensor_model_parallel_size > 1")


def _activation(model_cfg: ModelConfig) -> tuple[Any, bool]:
    """(activation function, gated): SwiGLU is silu on the gate times the up projection (Llama, Qwen2, Phi-3)."""
    if model_cfg.activation == "swiglu":
        return F.silu, True
    return F.gelu, False


def build_transformer_config(model_cfg: ModelConfig, parallel_cfg: ParallelConfig) -> TransformerConfig:
    """The TransformerConfig for `model_cfg` split as `parallel_cfg`; ValueError for an impossible layout."""
    impl = resolve_transformer_impl(model_cfg)
    check_parallel_layout(model_cfg, parallel_cfg, impl)
    on_cpu = not torch.cuda.is_available()
    dtype = TORCH_DTYPES[model_cfg.params_dtype]
    activation_func, gated = _activation(model_cfg)
    kwargs: dict[str, Any] = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=num_query_groups(model_cfg),
        kv_channels=model_cfg.kv_channels,
        normalization=model_cfg.normalization,
        layernorm_epsilon=model_cfg.norm_epsilon,
        activation_func=activation_func,
        gated_linear_unit=gated,
        add_bias_linear=False,
        add_qkv_bias=model_cfg.add_qkv_bias,
        # The supported HF families fine-tune without dropout, and PPO's ratio needs deterministic log-probs.
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model_cfg.init_method_std,
        attention_softmax_in_fp32=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=parallel_cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        context_parallel_size=parallel_cfg.context_parallel_size,
        sequence_parallel=parallel_cfg.sequence_parallel,
        # CPU initialisation draws every full weight from the default generator and slices it, so a seed gives the
        # same model at every tensor-parallel size; on a GPU it would be slow and memory-hungry for big models.
        use_cpu_initialization=on_cpu,
        # Fusions that need apex / TE CUDA kernels stay off on CPU; on GPU the TE spec provides its own fusions.
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        # The local spec's fused softmax needs megatron's compiled scaled_masked_softmax_cuda extension, which pip
        # installs lack; TransformerEngine's attention does its own fusion.
        masked_softmax_fusion=False,
        # torch.compile of the fused bias/activation costs ~16 s per process on CPU and the models have no biases.
        bias_activation_fusion=gated and not on_cpu,
        bias_dropout_fusion=not on_cpu,
        fp8=model_cfg.fp8,
        fp8_recipe=model_cfg.fp8_recipe,
        transformer_impl=impl,
        recompute_granularity=model_cfg.recompute_granularity,
        recompute_method=model_cfg.recompute_method,
        recompute_num_layers=model_cfg.recompute_num_layers,
    )
    return TransformerConfig(**_known_fields(kwargs))


# Fields that exist only in some megatron-core releases; anything else missing is a real incompatibility.
_VERSION_DEPENDENT_FIELDS = frozenset({"transformer_impl"})


def _known_fields(kwargs: dict[str, Any]) -> dict[str, Any]:
    known = {field.name for field in dataclasses.fields(TransformerConfig)}
    unknown = set(kwargs) - known
    if unknown - _VERSION_DEPENDENT_FIELDS:
        raise RuntimeError(
            f"this megatron-core's TransformerConfig has no fields {sorted(unknown - _VERSION_DEPENDENT_FIELDS)}; "
            "megaseg needs megatron-core >= 0.16.1")
    return {name: value for name, value in kwargs.items() if name in known}
