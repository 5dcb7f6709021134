"""The local spec's transformer layer: megatron-core's ``TransformerLayer`` with its KV-cache decode step inlined.

A decode step feeds one column per row, so each of its matrix products is small and what surrounds them counts:
megatron's layer runs every step through TransformerLayer's bias-dropout-add and offload contexts, Attention.forward
(its branches for flash decode, fused RoPE, CUDA graphs, dynamic batching, output gates) and MLP.forward, about 15
module calls per layer. Measured by benchmarks/decode_step.py (SmolLM2-135M, 8 rows, 147 cached columns, 1 CPU
thread, 16 interleaved rounds of 10 steps, three runs): megatron's layers took 1.020 / 1.013 / 1.047x the time of
this one per step (107.8-123.8 ms per step here), and transformers' forward 1.038 / 1.021 / 1.026x. Replacing
TransformerLayer's own glue alone measured no gain (0.996, an earlier experiment): the saving is in the Attention /
MLP / linear-module overheads.

``InlinedDecodeTransformerLayer.forward`` runs a decode step as the same operations in the same order, on the same
modules and tensors: the input norm module, the qkv product (``models.linear``'s plain path) and megatron's
[groups, (heads / groups + 2) * d] qkv layout split, the rotate-once KV-cache write of
``RotatedKeyCacheSelfAttention._adjust_key_value_for_inference`` (megatron's cache), the SDPAttention module, the
output projection, megatron's eval-mode bias-dropout-add (in place; no bias: megaseg builds its linears without), the
pre-MLP norm module, fc1, megatron's unfused GLU (``activation(x_glu) * (x_linear + glu_linear_offset)``), fc2 and
the second residual. Every other call is megatron's ``TransformerLayer.forward`` unchanged: training, autograd,
forwards without a static inference context, the prefill (more than one column), packed sequences, and any layer or
config outside what is written out here (``_layer_supported``: tensor parallelism, MoE, cross attention, q/k norms,
output gates, biases outside the qkv product, fused or TransformerEngine activations, GLU clamping, layers without
RoPE, chunked prefill MLPs, a megatron release whose signatures differ). tests/models/test_models_decode_layer.py
checks the inlined step against megatron's layer bitwise, step by step.
"""
from __future__ import annotations

import functools
import inspect

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from megaseg.models.attention import RotatedKeyCacheSelfAttention, SDPAttention, _rotation_arguments_match
from megaseg.models.linear import LocalColumnParallelLinear, LocalRowParallelLinear, _is_plain, _plain_forward

# The keyword arguments TransformerBlock passes a layer (megatron-core 0.16); a call with others goes to megatron.
_LAYER_KEYWORDS = frozenset({
    "hidden_states", "attention_mask", "context", "context_mask", "rotary_pos_emb", "rotary_pos_cos",
    "rotary_pos_sin", "rotary_pos_cos_sin", "attention_bias", "inference_context", "packed_seq_params",
    "sequence_len_offset", "padding_mask", "inference_params"})
# Arguments that must be None for the inlined step (their features are megatron's to handle).
_MUST_BE_NONE = ("context", "context_mask", "rotary_pos_cos", "rotary_pos_sin", "rotary_pos_cos_sin",
                 "attention_bias", "packed_seq_params", "inference_params")


@functools.cache
def _megatron_signatures_match() -> bool:
    """The cache-write call below passes megatron-core 0.16's argument list; another release goes to megatron."""
    adjust = list(inspect.signature(SelfAttention._adjust_key_value_for_inference).parameters)
    return _rotation_arguments_match() and adjust[:10] == [
        "self", "inference_context", "query", "key", "value", "rotary_pos_emb", "rotary_pos_cos", "rotary_pos_sin",
        "rotary_pos_cos_sin", "sequence_len_offset"]


def _layer_supported(layer: TransformerLayer) -> bool:
    """True when every part of ``layer`` is one the inlined step writes out (module docstring)."""
    config = layer.config
    attention, mlp = layer.self_attention, layer.mlp
    if not (type(attention) is RotatedKeyCacheSelfAttention and type(attention.core_attention) is SDPAttention
            and type(mlp) is MLP and not getattr(layer, "is_moe_layer", False)):
        return False
    linears = (attention.linear_qkv, attention.linear_proj, mlp.linear_fc1, mlp.linear_fc2)
    if [type(linear) for linear in linears] != [LocalColumnParallelLinear, LocalRowParallelLinear,
                                                 LocalColumnParallelLinear, LocalRowParallelLinear]:
        return False
    identities = (layer.pre_cross_attn_layernorm, layer.cross_attention)
    norms = (getattr(attention, "q_layernorm", None), getattr(attention, "k_layernorm", None))
    return (all(isinstance(module, IdentityOp) for module in identities)
            and all(norm is None or isinstance(norm, IdentityOp) for norm in norms)
            and not config.add_bias_linear  # (megaseg builds none: only the qkv product may have a bias)
            and config.tensor_model_parallel_size == 1 and not getattr(config, "flash_decode", False)
            and not getattr(config, "attention_output_gate", False) and not getattr(config, "no_rope_freq", None)
            and not getattr(config, "use_te_activation_func", False)
            and not getattr(config, "bias_activation_fusion", False)
            and getattr(config, "activation_func_clamp_value", None) is None
            and getattr(config, "mlp_chunks_for_prefill", 1) <= 1
            and not getattr(config, "inference_fuse_tp_communication", False)
            and not getattr(config, "fused_single_qkv_rope", False)
            and _megatron_signatures_match())


def _residual_add(output: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """megatron's eval-mode bias-dropout-add without a bias (``_bias_dropout_add_func``, training=False, nothing
    requiring grad): the residual, in the product's dtype, added in place on the product; dropout is the identity."""
    residual = residual if residual.dtype == output.dtype else residual.to(output.dtype)
    return output.add_(residual)


class InlinedDecodeTransformerLayer(TransformerLayer):
    """``TransformerLayer`` whose KV-cache decode steps run inlined (module docstring)."""

    def forward(self, *args, **kwargs):
        if not args and self._takes_inlined_step(kwargs):
            return self._decode_step(**kwargs)
        return super().forward(*args, **kwargs)

    def _takes_inlined_step(self, kwargs: dict) -> bool:
        supported = self.__dict__.get("_inlined_supported")
        if supported is None:  # the layer's structure never changes: checked once
            supported = self.__dict__["_inlined_supported"] = _layer_supported(self)
        if not supported or self.training or torch.is_grad_enabled() or not set(kwargs) <= _LAYER_KEYWORDS:
            return False
        hidden_states, context = kwargs.get("hidden_states"), kwargs.get("inference_context")
        return (hidden_states is not None and hidden_states.shape[0] == 1 and context is not None
                and context.is_static_batching() and all(kwargs.get(name) is None for name in _MUST_BE_NONE)
                and self.layer_number in context.key_value_memory_dict
                and _is_plain(self.self_attention.linear_qkv, hidden_states))

    def _decode_step(self, hidden_states: torch.Tensor, attention_mask=None, rotary_pos_emb=None,
                     inference_context=None, sequence_len_offset=None, **_unused_nones):
        attention, mlp, config = self.self_attention, self.mlp, self.config
        # --- attention (Attention.forward on the static-batching, split-qkv path) ---
        residual = hidden_states
        mixed_qkv, _ = _plain_forward(attention.linear_qkv, self.input_layernorm(hidden_states))
        groups = attention.num_query_groups_per_partition
        heads_per_group = attention.num_attention_heads_per_partition // groups
        head_dim = attention.hidden_size_per_attention_head
        mixed_qkv = mixed_qkv.view(*mixed_qkv.shape[:-1], groups, (heads_per_group + 2) * head_dim)
        query, key, value = torch.split(mixed_qkv, [heads_per_group * head_dim, head_dim, head_dim], dim=3)
        query = query.reshape(query.size(0), query.size(1), -1, head_dim)
        if rotary_pos_emb is not None and not isinstance(rotary_pos_emb, tuple):
            rotary_pos_emb = (rotary_pos_emb,) * 2
        # (query, key, value, rotary_pos_emb, attn_mask_type, block_table): keys/values of every cached column
        adjusted = attention._adjust_key_value_for_inference(
            inference_context, query, key, value, rotary_pos_emb, None, None, None, sequence_len_offset)
        (query, key, value), attn_mask_type = adjusted[:3], adjusted[4]
        context_layer = attention.core_attention(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                                 attention_bias=None, packed_seq_params=None)
        output, _ = _plain_forward(attention.linear_proj, context_layer)  # no bias: add_bias_linear is off
        hidden_states = _residual_add(output, residual)
        # --- MLP (MLP.forward's unfused activation path) ---
        residual = hidden_states
        intermediate, _ = _plain_forward(mlp.linear_fc1, self.pre_mlp_layernorm(hidden_states))
        if config.gated_linear_unit:
            x_glu, x_linear = torch.chunk(intermediate, 2, dim=-1)
            intermediate = config.activation_func(x_glu) * (x_linear + getattr(config, "glu_linear_offset", 0.0))
        else:
            intermediate = mlp.activation_func(intermediate)
        output, _ = _plain_forward(mlp.linear_fc2, intermediate)
        output = _residual_add(output, residual)
        return make_viewless_tensor(inp=output, requires_grad=False, keep_graph=True), None

