"""The local spec's linears (megaseg.models.linear) equal megatron-core's Column/RowParallelLinear, the layers they
extend: outputs with and without bias (``skip_bias_add`` too), under no_grad and with frozen weights (their plain
``F.linear`` path, which must really be taken) and with trainable weights (megatron's own path: same gradients);
at TP=2 every call goes to megatron's path."""
from __future__ import annotations

import pytest
import torch

from megaseg.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed


def _compare(rank, world_size):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megaseg.config import load_config
    from megaseg.models import linear
    from megaseg.models.transformer_config import build_transformer_config
    from megaseg.parallel import initialize_parallel

    config = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                                "model.ffn_hidden_size=64", f"parallel.tensor_model_parallel_size={world_size}"])
    initialize_parallel(config.parallel, seed=1)
    transformer_config = build_transformer_config(config.model, config.parallel)
    plain_calls = []
    original_plain = linear._plain_forward
    linear._plain_forward = lambda layer, input_: plain_calls.append(1) or original_plain(layer, input_)
    results = []
    init = torch.nn.init.normal_
    for bias in (False, True):
        for skip_bias_add in (False, True):
            pairs = [(ColumnParallelLinear(32, 48, config=transformer_config, init_method=init, bias=bias,
                                           gather_output=False, skip_bias_add=skip_bias_add),
                      linear.LocalColumnParallelLinear(32, 48, config=transformer_config, init_method=init,
                                                       bias=bias, gather_output=False, skip_bias_add=skip_bias_add)),
                     (RowParallelLinear(48, 32, config=transformer_config, init_method=init, bias=bias,
                                        input_is_parallel=True, skip_bias_add=skip_bias_add),
                      linear.LocalRowParallelLinear(48, 32, config=transformer_config, init_method=init, bias=bias,
                                                    input_is_parallel=True, skip_bias_add=skip_bias_add))]
            for reference, local in pairs:
                local.load_state_dict(reference.state_dict())
                if bias:
                    with torch.no_grad():
                        for layer in (reference, local):
                            layer.bias.copy_(torch.arange(layer.bias.numel(), dtype=torch.float32) / 7)
                inputs = torch.randn(5, 3, reference.weight.shape[1], generator=torch.Generator().manual_seed(7))
                for mode in ("no_grad", "frozen", "trainable"):
                    for layer in (reference, local):
                        layer.requires_grad_(mode != "frozen")
                        layer.zero_grad(set_to_none=True)
                    outputs = []
                    for layer in (reference, local):
                        x = inputs.clone().requires_grad_(mode == "trainable")
                        with torch.set_grad_enabled(mode != "no_grad"):
                            out, out_bias = layer(x)
                        if mode == "trainable":
                            (out.sum() * 1.5).backward()
                            grads = (x.grad, layer.weight.grad)
                        else:
                            grads = None
                        outputs.append((out.detach(), out_bias, grads))
                    (ref_out, ref_bias, ref_grads), (out, out_bias, grads) = outputs
                    results.append(bool(torch.allclose(out, ref_out, atol=1e-5)) and
                                   (out_bias is None) == (ref_bias is None) and
                                   (ref_bias is None or torch.equal(out_bias.detach(), ref_bias.detach())) and
                                   (grads is None or all(torch.allclose(a, b, atol=1e-5)
                                                         for a, b in zip(grads, ref_grads))))
    return results, len(plain_calls)


def test_local_linears_equal_megatrons_and_take_the_plain_path_at_tp1():
    (results, plain_calls), = run_distributed(_compare, 1)
    assert results and all(results), results
    # 2 bias settings x 2 skip_bias_add x 2 layers x (no_grad + frozen)
    assert plain_calls == 16


def test_tensor_parallel_calls_go_to_megatron():
    per_rank = run_distributed(_compare, 2)
    for results, plain_calls in per_rank:
        assert results and all(results), results
        assert plain_calls == 0
