"""The local spec's layer (models/decode_layer.py: InlinedDecodeTransformerLayer) runs each KV-cache decode step
inlined, and its logits equal megatron's TransformerLayer's bitwise, step by step: on the default tiny Llama with
grouped-query attention, with a qkv bias (Qwen2), and with LayerNorm + a non-gated GELU MLP; the inlined step is
really taken in every decode step of every layer (and never in the prefill), and configs it does not write out go to
megatron's layer."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megaseg.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed

ROWS, PROMPT, STEPS = 3, 6, 5
CONFIGS = {
    "llama_gqa": dict(num_query_groups=2),
    "qkv_bias": dict(num_query_groups=2, add_qkv_bias=True),
    "layernorm_gelu": dict(normalization="LayerNorm", activation="gelu"),
}


def _decode_logits(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Logits of the prefill ([:, :PROMPT]) and of each later column fed alone through megatron's static cache."""
    from megaseg.generation.kv_cache import StaticKVCache

    cache = StaticKVCache(model, ROWS, tokens.shape[1])
    positions = torch.arange(tokens.shape[1]).expand(ROWS, -1)
    logits = []
    with torch.no_grad():
        logits.append(model(tokens[:, :PROMPT], positions[:, :PROMPT], None, **cache.forward_kwargs(0))[:, -1])
        cache.prefill_done()
        for column in range(PROMPT, tokens.shape[1]):
            out = model(tokens[:, column:column + 1], positions[:, column:column + 1], None,
                        **cache.forward_kwargs(column))
            logits.append(out[:, -1])
    return logits


def _compare(rank, world_size, overrides):
    from megaseg.config.model import ModelConfig
    from megaseg.config.parallel import ParallelConfig
    from megaseg.models import decode_layer
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import initialize_parallel

    initialize_parallel(ParallelConfig(), seed=3)
    model_cfg = dataclasses.replace(ModelConfig(), init_method_std=0.3, **overrides)
    model = build_gpt_model(model_cfg, ParallelConfig())
    model.eval()
    if model_cfg.add_qkv_bias:  # megatron initialises biases to zero: make them count
        with torch.no_grad():
            for layer in model.decoder.layers:
                layer.self_attention.linear_qkv.bias.normal_(0, 0.5)
    tokens = torch.randint(1, 127, (ROWS, PROMPT + STEPS), generator=torch.Generator().manual_seed(9))
    layers = list(model.decoder.layers)
    inlined_steps = []
    original = decode_layer.InlinedDecodeTransformerLayer._decode_step

    def counting(self, **kwargs):
        inlined_steps.append(kwargs["hidden_states"].shape[0])
        return original(self, **kwargs)

    decode_layer.InlinedDecodeTransformerLayer._decode_step = counting
    try:
        inlined = _decode_logits(model, tokens)
        supported = [layer.__dict__.get("_inlined_supported") for layer in layers]
        for layer in layers:  # megatron's TransformerLayer.forward for every call
            layer.__dict__["_inlined_supported"] = False
        reference = _decode_logits(model, tokens)
    finally:
        decode_layer.InlinedDecodeTransformerLayer._decode_step = original
    return {"equal": [bool(torch.equal(a, b)) for a, b in zip(inlined, reference)],
            "max_difference": max(float((a - b).abs().max()) for a, b in zip(inlined, reference)),
            "inlined_steps": inlined_steps, "supported": supported,
            "layer_class": type(layers[0]).__name__,
            "varied": len({int(step.argmax(-1)[0]) for step in reference}) > 1}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_inlined_decode_steps_equal_megatrons_layer_bitwise(name):
    (result,) = run_distributed(_compare, 1, CONFIGS[name])
    assert result["layer_class"] == "InlinedDecodeTransformerLayer"
    assert result["supported"] == [True, True]
    # every decode step of both layers, one column each; the prefill (PROMPT columns) went to megatron's layer
    assert result["inlined_steps"] == [1] * (2 * STEPS), result["inlined_steps"]
    assert all(result["equal"]), result
    assert result["varied"]  # the greedy tokens of the reference change along the steps: the model is not inert


def _unsupported(rank, world_size):
    from megaseg.config.model import ModelConfig
    from megaseg.config.parallel import ParallelConfig
    from megaseg.models.decode_layer import _layer_supported
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import initialize_parallel

    initialize_parallel(ParallelConfig(), seed=3)
    model = build_gpt_model(ModelConfig(), ParallelConfig())
    layer = model.decoder.layers[0]
    verdicts = {"default": _layer_supported(layer)}
    for field, value in (("flash_decode", True), ("bias_activation_fusion", True), ("add_bias_linear", True),
                         ("activation_func_clamp_value", 5.0), ("no_rope_freq", [1, 1])):
        saved = getattr(layer.config, field)
        setattr(layer.config, field, value)
        verdicts[field] = _layer_supported(layer)
        setattr(layer.config, field, saved)
    return verdicts


def test_configs_the_inlined_step_does_not_write_out_go_to_megatron():
    (verdicts,) = run_distributed(_unsupported, 1)
    assert verdicts.pop("default") is True
    assert not any(verdicts.values()), verdicts
