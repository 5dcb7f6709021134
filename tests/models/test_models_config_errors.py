"""ModelConfig + ParallelConfig -> TransformerConfig: every shipped backbone maps onto megatron's fields, and layouts
that cannot be built fail before any module exists, with the field, the value and the fix in the message."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megaseg.config import load_config
from megaseg.config.model import ModelConfig
from megaseg.config.parallel import ParallelConfig
from megaseg.models.architecture import architecture_differences, model_architecture
from megaseg.models.rotary import rotary_args
from megaseg.models.transformer_config import build_transformer_config

REPO = Path(__file__).resolve().parents[2]
TINY = ModelConfig()
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")


def _parallel(tp: int = 1, pp: int = 1, **kwargs) -> ParallelConfig:
    return ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, **kwargs)


@pytest.mark.parametrize("model_changes, parallel, message", [
    ({"num_attention_heads": 4}, _parallel(tp=3),
     r"model.num_attention_heads=4 is not divisible by parallel.tensor_model_parallel_size=3"),
    ({"num_attention_heads": 4, "num_query_groups": 2}, _parallel(tp=4),
     r"model.num_query_groups=2 is not divisible by parallel.tensor_model_parallel_size=4"),
    ({"num_layers": 3}, _parallel(pp=2),
     r"model.num_layers=3 is not divisible by parallel.pipeline_model_parallel_size=2"),
    ({"vocab_size": 130}, _parallel(tp=4), r"model.vocab_size=130 is not divisible .*pad the vocabulary"),
    ({"ffn_hidden_size": 250}, _parallel(tp=4), r"model.ffn_hidden_size=250 is not divisible"),
])
def test_layouts_that_do_not_split(model_changes, parallel, message):
    with pytest.raises(ValueError, match=message):
        build_transformer_config(dataclasses.replace(TINY, **model_changes), parallel)


@cpu_only
@pytest.mark.parametrize("model_changes, parallel, message", [
    ({"fp8": "e4m3"}, _parallel(), r"model.fp8='e4m3' needs the TransformerEngine layers.*CPU-only.*model.fp8=null"),
    ({"fp8": "hybrid", "transformer_impl": "local"}, _parallel(), r"model.fp8='hybrid' needs the TransformerEngine"),
    ({}, _parallel(tp=2, sequence_parallel=True),
     r"parallel.sequence_parallel=True is not possible on a CPU-only machine.*sequence_parallel=false"),
    ({"transformer_impl": "transformer_engine"}, _parallel(),
     r"model.transformer_impl='transformer_engine' needs a CUDA GPU.*transformer_impl=local"),
])
def test_gpu_only_features_are_refused_on_cpu(model_changes, parallel, message):
    with pytest.raises(ValueError, match=message):
        build_transformer_config(dataclasses.replace(TINY, **model_changes), parallel)


@cpu_only
def test_cpu_flags_and_tiny_model_fields():
    config = build_transformer_config(TINY, _parallel(tp=2, pp=2))
    assert config.use_cpu_initialization and not config.gradient_accumulation_fusion
    assert not (config.apply_rope_fusion or config.persist_layer_norm or config.sequence_parallel)
    assert (config.tensor_model_parallel_size, config.pipeline_model_parallel_size) == (2, 2)
    assert config.normalization == "RMSNorm" and config.gated_linear_unit and config.activation_func is torch.nn.functional.silu
    assert config.hidden_dropout == config.attention_dropout == 0.0
    assert config.params_dtype == config.pipeline_dtype == torch.float32 and config.fp8 is None


@pytest.mark.parametrize("name, expected", [
    ("smollm2-135m-instruct.yaml", dict(num_layers=30, hidden_size=576, num_query_groups=3, kv_channels=64,
                                        ffn_hidden_size=1536, add_qkv_bias=False, layernorm_epsilon=1e-5)),
    ("llama-3-8b-instruct.yaml", dict(num_layers=32, num_query_groups=8, kv_channels=128, ffn_hidden_size=14336)),
    ("llama-3-70b-instruct.yaml", dict(num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8)),
    ("qwen2-7b-instruct.yaml", dict(num_query_groups=4, kv_channels=128, add_qkv_bias=True, layernorm_epsilon=1e-6)),
    ("phi-3-mini-4k-instruct.yaml", dict(num_query_groups=32, kv_channels=96, ffn_hidden_size=8192)),
    ("mistral-7b-instruct-v0.2.yaml", dict(num_query_groups=8, ffn_hidden_size=14336)),
])
def test_shipped_backbones_map_onto_megatron(name, expected):
    config = load_config(REPO / "model_configs" / name)
    # The shipped layouts are GPU layouts; check the architecture mapping at TP=1 so it runs anywhere.
    megatron = build_transformer_config(dataclasses.replace(config.model, transformer_impl="local"), _parallel())
    for field, value in expected.items():
        assert getattr(megatron, field) == value, field


def test_rope_settings():
    llama31 = load_config(REPO / "model_configs" / "llama-3.1-8b-instruct.yaml").model
    args = rotary_args(llama31)
    assert (args.rotary_base, args.rope_scaling, args.rope_scaling_factor) == (500000.0, True, 8.0)
    assert rotary_args(TINY).rope_scaling is False
    assert rotary_args(dataclasses.replace(TINY, rope_scaling={"type": "linear", "factor": "2"})) \
        .seq_len_interpolation_factor == 2.0
    with pytest.raises(ValueError, match=r"rope_scaling type 'yarn' is not supported"):
        rotary_args(dataclasses.replace(TINY, rope_scaling={"rope_type": "yarn", "factor": "4"}))
    with pytest.raises(ValueError, match=r"model.rope_scaling.high_freq_factor=2 differs from 4"):
        rotary_args(dataclasses.replace(llama31, rope_scaling={**llama31.rope_scaling, "high_freq_factor": "2"}))


def test_architecture_record_compares_derived_values():
    explicit = dataclasses.replace(TINY, num_query_groups=4, kv_channels=16)
    assert architecture_differences(model_architecture(TINY), explicit) == {}
    wider = dataclasses.replace(TINY, hidden_size=128, rotary_base=500000.0)
    assert set(architecture_differences(model_architecture(TINY), wider)) == {"hidden_size", "kv_channels",
                                                                              "rotary_base"}


def test_building_without_parallel_state_says_what_to_call():
    from megatron.core import parallel_state

    from megaseg.models import build_reward_model

    if parallel_state.model_parallel_is_initialized():
        pytest.skip("another test left megatron's parallel state initialised in this process")
    with pytest.raises(ValueError, match=r"call megaseg.parallel.initialize_parallel"):
        build_reward_model(TINY, _parallel(), seed=7)


@pytest.mark.parametrize("rope_scaling", [
    None,
    {"rope_type": "llama3", "factor": "8.0", "low_freq_factor": "1.0", "high_freq_factor": "4.0",
     "original_max_position_embeddings": "8192"},
    {"rope_type": "linear", "factor": "4.0"},
])
def test_rotary_angles_equal_transformers(rope_scaling):
    """megatron's RotaryEmbedding built from rotary_args gives the angles HF's Llama computes (the reference)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model_cfg = dataclasses.replace(load_config(REPO / "model_configs" / "llama-3-8b-instruct.yaml").model,
                                    rope_scaling=rope_scaling)
    args = rotary_args(model_cfg)
    rope = RotaryEmbedding(kv_channels=128, rotary_percent=1.0, rotary_base=args.rotary_base,
                           rope_scaling=args.rope_scaling, rope_scaling_factor=args.rope_scaling_factor,
                           seq_len_interpolation_factor=args.seq_len_interpolation_factor,
                           use_cpu_initialization=True)
    hf_scaling = None if rope_scaling is None else {key: (value if key == "rope_type" else float(value))
                                                    for key, value in rope_scaling.items()}
    hf_cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=model_cfg.rotary_base,
                         max_position_embeddings=model_cfg.max_position_embeddings, rope_scaling=hf_scaling)
    if rope_scaling is None:
        hf_inv_freq = 1.0 / (model_cfg.rotary_base ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    else:
        hf_inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_scaling["rope_type"]](hf_cfg, "cpu")
    positions = torch.arange(4096, dtype=torch.float32)
    hf_angles = torch.outer(positions, hf_inv_freq.float())
    megatron_angles = rope.get_freqs_non_repeated(4096)  # [seq, dim / 2]; forward() would move it to CUDA
    torch.testing.assert_close(megatron_angles, hf_angles, rtol=1e-6, atol=1e-3)
