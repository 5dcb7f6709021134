"""Tensor names and per-layer conversion between Hugging Face checkpoints and megatron-core's GPTModel.

Three vocabularies meet here:
- physical HF names, as stored in the architecture's safetensors (Phi-3 fuses q/k/v and gate/up);
- logical HF names: the Llama layout (`self_attn.q_proj.weight`, `mlp.gate_proj.weight`, ...), which every
  supported architecture is translated to and from, so megatron's layout is derived from one place;
- megatron names of GPTModel with the local layer spec (`self_attention.linear_qkv.weight`, ...). The
  TransformerEngine spec fuses each pre-norm into the next linear layer, so its norms are called
  `self_attention.linear_qkv.layer_norm_weight` and `mlp.linear_fc1.layer_norm_weight`: `MEGATRON_TE_NORM_NAMES`
  maps them to the local-spec names.

Conversion goes one decoder layer at a time so that at most one layer's tensors are in flight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional

import torch

from megaseg.config.model import ModelConfig
from megaseg.conversion.hf_architectures import HFArchitecture
from megaseg.conversion.tensor_layout import concat_rows, interleave_qkv, split_qkv, split_rows

HF_LAYER_PREFIX = "model.layers.{layer}."
MEGATRON_LAYER_PREFIX = "decoder.layers."

# megatron name -> HF name, for the tensors outside the decoder layers (output_layer only when untied).
EMBEDDING = ("embedding.word_embeddings.weight", "model.embed_tokens.weight")
FINAL_NORM = ("decoder.final_layernorm.weight", "model.norm.weight")
OUTPUT_LAYER = ("output_layer.weight", "lm_head.weight")

MEGATRON_TE_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
# HF buffers that are recomputed on load and carry no weights.
IGNORABLE_HF_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ModelShape:
    """The sizes every tensor shape follows from; derived from ModelConfig."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    qkv_bias: bool
    tied_embeddings: bool

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> "ModelShape":
        return cls(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
                   num_attention_heads=cfg.num_attention_heads,
                   num_query_groups=cfg.num_query_groups or cfg.num_attention_heads,
                   head_dim=cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads,
                   vocab_size=cfg.vocab_size, qkv_bias=cfg.add_qkv_bias, tied_embeddings=cfg.tie_word_embeddings)

    @property
    def q_rows(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_rows(self) -> int:
        return self.num_query_groups * self.head_dim


def logical_layer_shapes(shape: ModelShape) -> Dict[str, tuple[int, ...]]:
    """Llama-layout names (relative to `model.layers.N.`) -> shape."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    shapes = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (shape.q_rows, h),
        "self_attn.k_proj.weight": (shape.kv_rows, h),
        "self_attn.v_proj.weight": (shape.kv_rows, h),
        "self_attn.o_proj.weight": (h, shape.q_rows),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    if shape.qkv_bias:
        shapes.update({"self_attn.q_proj.bias": (shape.q_rows,), "self_attn.k_proj.bias": (shape.kv_rows,),
                       "self_attn.v_proj.bias": (shape.kv_rows,)})
    return shapes


def physical_layer_shapes(arch: HFArchitecture, shape: ModelShape) -> Dict[str, tuple[int, ...]]:
    """The architecture's stored names (relative to `model.layers.N.`) -> shape."""
    shapes = logical_layer_shapes(shape)
    if not arch.fused_projections:
        return shapes
    h, f = shape.hidden_size, shape.ffn_hidden_size
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight"):
        del shapes[name]
    shapes["self_attn.qkv_proj.weight"] = (shape.q_rows + 2 * shape.kv_rows, h)
    shapes["mlp.gate_up_proj.weight"] = (2 * f, h)
    return shapes


def hf_tensor_shapes(arch: HFArchitecture, shape: ModelShape) -> Dict[str, tuple[int, ...]]:
    """Every tensor a causal-LM checkpoint of this architecture must hold, full name -> shape."""
    shapes = {EMBEDDING[1]: (shape.vocab_size, shape.hidden_size), FINAL_NORM[1]: (shape.hidden_size,)}
    if not shape.tied_embeddings:
        shapes[OUTPUT_LAYER[1]] = (shape.vocab_size, shape.hidden_size)
    for layer in range(shape.num_layers):
        prefix = HF_LAYER_PREFIX.format(layer=layer)
        shapes.update({prefix + name: dims for name, dims in physical_layer_shapes(arch, shape).items()})
    return shapes


def logical_from_physical(arch: HFArchitecture, shape: ModelShape,
                          read: Callable[[str], torch.Tensor]) -> Dict[str, torch.Tensor]:
    """One layer's tensors in the Llama layout; `read` gets a stored name relative to `model.layers.N.`."""
    if not arch.fused_projections:
        return {name: read(name) for name in logical_layer_shapes(shape)}
    logical = {name: read(name) for name in ("input_layernorm.weight", "self_attn.o_proj.weight",
                                             "post_attention_layernorm.weight", "mlp.down_proj.weight")}
    q, k, v = split_rows(read("self_attn.qkv_proj.weight"), [shape.q_rows, shape.kv_rows, shape.kv_rows],
                         "self_attn.qkv_proj.weight")
    gate, up = split_rows(read("mlp.gate_up_proj.weight"), [shape.ffn_hidden_size] * 2, "mlp.gate_up_proj.weight")
    logical.update({"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
                    "mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up})
    return logical


def physical_from_logical(arch: HFArchitecture, logical: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Inverse of `logical_from_physical` (names relative to `model.layers.N.`)."""
    if not arch.fused_projections:
        return dict(logical)
    physical = {k: v for k, v in logical.items()
                if k not in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                             "mlp.gate_proj.weight", "mlp.up_proj.weight")}
    physical["self_attn.qkv_proj.weight"] = concat_rows(
        logical["self_attn.q_proj.weight"], logical["self_attn.k_proj.weight"], logical["self_attn.v_proj.weight"])
    physical["mlp.gate_up_proj.weight"] = concat_rows(logical["mlp.gate_proj.weight"], logical["mlp.up_proj.weight"])
    return physical


def megatron_from_logical(shape: ModelShape, logical: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """One layer: Llama-layout tensors -> megatron local-spec names (relative to `decoder.layers.N.`)."""
    groups, head_dim = shape.num_query_groups, shape.head_dim
    megatron = {
        "input_layernorm.weight": logical["input_layernorm.weight"],
        "self_attention.linear_qkv.weight": interleave_qkv(
            logical["self_attn.q_proj.weight"], logical["self_attn.k_proj.weight"],
            logical["self_attn.v_proj.weight"], groups, head_dim),
        "self_attention.linear_proj.weight": logical["self_attn.o_proj.weight"],
        "pre_mlp_layernorm.weight": logical["post_attention_layernorm.weight"],
        "mlp.linear_fc1.weight": concat_rows(logical["mlp.gate_proj.weight"], logical["mlp.up_proj.weight"]),
        "mlp.linear_fc2.weight": logical["mlp.down_proj.weight"],
    }
    if shape.qkv_bias:
        megatron["self_attention.linear_qkv.bias"] = interleave_qkv(
            logical["self_attn.q_proj.bias"], logical["self_attn.k_proj.bias"], logical["self_attn.v_proj.bias"],
            groups, head_dim)
    return megatron


def megatron_layer_names(shape: ModelShape) -> tuple[str, ...]:
    names = ("input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
             "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
    return names + (("self_attention.linear_qkv.bias",) if shape.qkv_bias else ())


def logical_from_megatron(shape: ModelShape, megatron: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Inverse of `megatron_from_logical`."""
    heads, groups, head_dim = shape.num_attention_heads, shape.num_query_groups, shape.head_dim
    q, k, v = split_qkv(megatron["self_attention.linear_qkv.weight"], heads, groups, head_dim)
    gate, up = split_rows(megatron["mlp.linear_fc1.weight"], [shape.ffn_hidden_size] * 2, "mlp.linear_fc1.weight")
    logical = {
        "input_layernorm.weight": megatron["input_layernorm.weight"],
        "self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
        "self_attn.o_proj.weight": megatron["self_attention.linear_proj.weight"],
        "post_attention_layernorm.weight": megatron["pre_mlp_layernorm.weight"],
        "mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up,
        "mlp.down_proj.weight": megatron["mlp.linear_fc2.weight"],
    }
    if shape.qkv_bias:
        qb, kb, vb = split_qkv(megatron["self_attention.linear_qkv.bias"], heads, groups, head_dim)
        logical.update({"self_attn.q_proj.bias": qb, "self_attn.k_proj.bias": kb, "self_attn.v_proj.bias": vb})
    return logical


def split_megatron_key(key: str) -> tuple[Optional[int], str]:
    """`decoder.layers.3.mlp.linear_fc1.weight` -> (3, `mlp.linear_fc1.weight`); a stacked checkpoint key
    (`decoder.layers.mlp.linear_fc1.weight`, layer index in a prepended axis) -> (None, `mlp.linear_fc1.weight`);
    anything else -> (None, key). TransformerEngine's fused norm names come back as local-spec names."""
    if not key.startswith(MEGATRON_LAYER_PREFIX):
        return None, key
    rest = key[len(MEGATRON_LAYER_PREFIX):]
    head, _, tail = rest.partition(".")
    layer = int(head) if head.isdigit() else None
    name = tail if layer is not None else rest
    return layer, MEGATRON_TE_NORM_NAMES.get(name, name)
