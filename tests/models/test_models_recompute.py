"""Activation recompute (model.recompute_*): the same loss and gradients as without it, for the language model and
the scalar-head model, and the recompute really happens (layers / core attention run again in backward). Bad
combinations are refused naming the fields."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megaseg.config.model import ModelConfig
from megaseg.parallel.spawn import run_distributed

SETTINGS = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full-uniform-1": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "full-block-1": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
}


def _loss_grads_and_calls(rank, world_size, kind):
    from megaseg.config.parallel import ParallelConfig
    from megaseg.models import build_gpt_model, build_reward_model
    from megaseg.parallel import initialize_parallel

    parallel_cfg = ParallelConfig()
    initialize_parallel(parallel_cfg, seed=3)
    results = {}
    for name, changes in SETTINGS.items():
        model_cfg = dataclasses.replace(ModelConfig(), **changes)
        torch.manual_seed(0)
        model = (build_gpt_model(model_cfg, parallel_cfg) if kind == "gpt"
                 else build_reward_model(model_cfg, parallel_cfg, seed=7))
        model.train()
        calls = {"layers": 0, "core_attention": 0}
        for layer in model.decoder.layers:
            layer.register_forward_hook(lambda *_: calls.__setitem__("layers", calls["layers"] + 1))
            layer.self_attention.core_attention.register_forward_hook(
                lambda *_: calls.__setitem__("core_attention", calls["core_attention"] + 1))
        input_ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
        position_ids = torch.arange(24).expand(2, 24)
        output = model(input_ids, position_ids, None)
        loss = output.float().pow(2).mean()
        loss.backward()
        results[name] = {"loss": loss.detach(), "calls": dict(calls),
                         "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["gpt", "reward_model"])
def test_recompute_gives_the_same_loss_and_gradients(kind):
    results = run_distributed(_loss_grads_and_calls, 1, kind)[0]
    reference = results["none"]
    assert reference["calls"] == {"layers": 2, "core_attention": 2}
    # selective reruns only core attention in backward; full reruns whole layers (and so their attention too).
    assert results["selective"]["calls"] == {"layers": 2, "core_attention": 4}
    for name in ("full-uniform-1", "full-block-1"):
        assert results[name]["calls"]["layers"] == 2 * 2 - (1 if name == "full-block-1" else 0), name
    for name, result in results.items():
        torch.testing.assert_close(result["loss"], reference["loss"], rtol=0, atol=0, msg=name)
        assert result["grads"].keys() == reference["grads"].keys()
        for param, grad in reference["grads"].items():
            torch.testing.assert_close(result["grads"][param], grad, rtol=1e-6, atol=1e-7, msg=f"{name}: {param}")


@pytest.mark.parametrize("changes, message", [
    ({"recompute_granularity": "full"}, r"recompute_granularity=full needs model.recompute_method"),
    ({"recompute_granularity": "selective", "recompute_num_layers": 1}, r"selective.*must be null"),
    ({"recompute_method": "uniform"}, r"recompute_granularity is null"),
    ({"recompute_granularity": "partial"}, r"model.recompute_granularity"),
    ({"recompute_granularity": "full", "recompute_method": "every", "recompute_num_layers": 1},
     r"model.recompute_method"),
])
def test_bad_recompute_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**changes)


def test_recompute_num_layers_beyond_a_pipeline_stage_is_refused():
    from megaseg.config.parallel import ParallelConfig
    from megaseg.models.transformer_config import build_transformer_config

    model_cfg = ModelConfig(recompute_granularity="full", recompute_method="block", recompute_num_layers=2)
    with pytest.raises(ValueError, match=r"model.recompute_num_layers=2 exceeds the 1 layers of a pipeline stage"):
        build_transformer_config(model_cfg, ParallelConfig(pipeline_model_parallel_size=2))
    assert build_transformer_config(model_cfg, ParallelConfig()).recompute_num_layers == 2
