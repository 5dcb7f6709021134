"""The pure reshuffles: megatron's per-group q/k/v interleave against a loop over groups, fc1 = [gate; up], Phi-3's
fused projections, llama.cpp's q/k row permutation against its own formula, and config.json <-> ModelConfig."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megaseg.conversion.gguf_to_hf import unpermute_rope_rows
from megaseg.conversion.hf_architectures import ARCHITECTURES, hf_config_from_model_config, model_config_from_hf
from megaseg.conversion.tensor_layout import interleave_qkv, split_qkv
from megaseg.conversion.weight_names import (ModelShape, logical_from_megatron, logical_from_physical,
                                             logical_layer_shapes, megatron_from_logical, physical_from_logical,
                                             split_megatron_key)


def _interleave_by_loop(q, k, v, groups, head_dim):
    """megatron's linear_qkv rows, written out: for each group, its q heads, then its k head, then its v head."""
    heads_per_group = q.shape[0] // head_dim // groups
    rows = []
    for g in range(groups):
        for h in range(heads_per_group):
            rows.append(q[(g * heads_per_group + h) * head_dim:(g * heads_per_group + h + 1) * head_dim])
        rows.append(k[g * head_dim:(g + 1) * head_dim])
        rows.append(v[g * head_dim:(g + 1) * head_dim])
    return torch.cat(rows)


@settings(max_examples=30, deadline=None)
@given(groups=st.integers(1, 4), heads_per_group=st.integers(1, 4), head_dim=st.sampled_from([2, 4, 6]),
       columns=st.sampled_from([None, 3]))
def test_qkv_interleave_matches_the_loop_and_splits_back(groups, heads_per_group, head_dim, columns):
    rest = () if columns is None else (columns,)  # biases and weights alike
    q = torch.randn(groups * heads_per_group * head_dim, *rest)
    k, v = torch.randn(groups * head_dim, *rest), torch.randn(groups * head_dim, *rest)
    fused = interleave_qkv(q, k, v, groups, head_dim)
    assert torch.equal(fused, _interleave_by_loop(q, k, v, groups, head_dim))
    q2, k2, v2 = split_qkv(fused, groups * heads_per_group, groups, head_dim)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_wrong_row_counts_are_named():
    with pytest.raises(ValueError, match="k has 6 output rows, expected 8"):
        interleave_qkv(torch.zeros(16, 2), torch.zeros(6, 2), torch.zeros(8, 2), 2, 4)


def _shape(qkv_bias: bool) -> ModelShape:
    return ModelShape(num_layers=1, hidden_size=8, ffn_hidden_size=12, num_attention_heads=4, num_query_groups=2,
                      head_dim=2, vocab_size=10, qkv_bias=qkv_bias, tied_embeddings=True)


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_layer_mapping_round_trips_and_puts_gate_before_up(model_type):
    arch, shape = ARCHITECTURES[model_type], _shape(ARCHITECTURES[model_type].qkv_bias)
    logical = {name: torch.randn(dims) for name, dims in logical_layer_shapes(shape).items()}
    physical = physical_from_logical(arch, logical)
    megatron = megatron_from_logical(shape, logical_from_physical(arch, shape, physical.__getitem__))
    assert torch.equal(megatron["mlp.linear_fc1.weight"][:12], logical["mlp.gate_proj.weight"])
    assert torch.equal(megatron["mlp.linear_fc1.weight"][12:], logical["mlp.up_proj.weight"])
    if arch.fused_projections:  # Phi-3: gate_up_proj is already megatron's fc1; qkv_proj is q|k|v, not grouped
        assert torch.equal(physical["mlp.gate_up_proj.weight"], megatron["mlp.linear_fc1.weight"])
        assert torch.equal(physical["self_attn.qkv_proj.weight"][:8], logical["self_attn.q_proj.weight"])
    back = physical_from_logical(arch, logical_from_megatron(shape, megatron))
    assert sorted(back) == sorted(physical)
    assert all(torch.equal(back[name], physical[name]) for name in physical)


def test_megatron_keys_in_every_spelling():
    assert split_megatron_key("decoder.layers.3.mlp.linear_fc1.weight") == (3, "mlp.linear_fc1.weight")
    assert split_megatron_key("decoder.layers.mlp.linear_fc1.layer_norm_weight") == (None, "pre_mlp_layernorm.weight")
    assert split_megatron_key("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight") == \
        (0, "input_layernorm.weight")
    assert split_megatron_key("embedding.word_embeddings.weight") == (None, "embedding.word_embeddings.weight")


def _llama_cpp_permute(weights, n_head, n_head_kv):
    # convert_hf_to_gguf.py, LlamaModel.permute
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@pytest.mark.parametrize("heads,kv_heads", [(9, 9), (9, 3), (4, 2)])
def test_unpermute_inverts_llama_cpp_permute(heads, kv_heads):
    q, k = torch.randn(heads * 8, 5), torch.randn(kv_heads * 8, 5)
    assert torch.equal(unpermute_rope_rows(_llama_cpp_permute(q, heads, heads), heads), q)
    assert torch.equal(unpermute_rope_rows(_llama_cpp_permute(k, heads, kv_heads), kv_heads), k)


def _hf_config(model_type: str, **settings) -> dict:
    from transformers import AutoConfig

    base = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = AutoConfig.for_model(model_type, **{**base, **settings})
    config.architectures = [ARCHITECTURES[model_type].causal_lm_class]
    return config.to_diff_dict()


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_model_config_from_hf_and_back(model_type):
    hf = _hf_config(model_type, tie_word_embeddings=model_type == "llama")
    cfg = model_config_from_hf(hf)
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (model_type, 2, 64, 128)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels, cfg.vocab_size) == (4, 2, 16, 128)
    assert cfg.add_qkv_bias == (model_type == "qwen2") and cfg.tie_word_embeddings == (model_type == "llama")
    assert cfg.eos_token_ids == [2] and cfg.normalization == "RMSNorm" and cfg.activation == "swiglu"
    assert model_config_from_hf(hf_config_from_model_config(cfg, base=hf)) == cfg


def test_both_rope_layouts_and_scalings_are_read():
    llama31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    v4_style = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 128,
                "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": llama31,
                "torch_dtype": "bfloat16"}
    cfg = model_config_from_hf(v4_style)
    assert cfg.rotary_base == 500000.0 and cfg.rope_scaling == llama31 and cfg.params_dtype == "bfloat16"
    assert cfg.num_query_groups == 4 and cfg.tie_word_embeddings is False  # transformers' defaults for absent keys
    v5_style = _hf_config("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    assert model_config_from_hf(v5_style).rope_scaling == {"rope_type": "linear", "factor": 2.0}
    # A YAML round trip turns the scaling numbers into strings; the HF config gets numbers back.
    stringly = dataclasses.replace(cfg, rope_scaling={key: str(value) for key, value in llama31.items()})
    rope = hf_config_from_model_config(stringly)["rope_parameters"]
    assert rope["factor"] == 8.0 and rope["original_max_position_embeddings"] == 8192


@pytest.mark.parametrize("change,message", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unsupported Hugging Face architecture"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"hidden_act": "gelu"}, "silu"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn' cannot be reproduced"),
])
def test_unsupported_features_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        model_config_from_hf({**_hf_config("llama"), **change})


def test_partial_rotary_phi_is_refused():
    with pytest.raises(ValueError, match="partial_rotary_factor=0.75"):
        model_config_from_hf(_hf_config("phi3", rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                  "partial_rotary_factor": 0.75}))
