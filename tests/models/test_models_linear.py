"""The local spec's linears (megaseg.models.linear) equal megatron-core's Column/RowParallelLinear, the layers they
extend: outputs with and without bias (``skip_bias_add`` too), under no_grad and with frozen weights (their plain
``F.linear`` path, which must really be taken) and with trainable weights (megatron's own path: same gradients);
at TP=2 every call goes to megatron's path. GPTModel's output layer is one of them (tied weight handed in), and a
wide linear on CPU, computed in blocks of output features, equals one F.linear."""
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
    linear._plain_forward = lambda *args: plain_calls.append(1) or original_plain(*args)
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


def _wide_layers(rank, world_size):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from megaseg.config import load_config
    from megaseg.models import linear
    from megaseg.models.transformer_config import build_transformer_config
    from megaseg.parallel import initialize_parallel

    config = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                                "model.ffn_hidden_size=64"])
    initialize_parallel(config.parallel, seed=1)
    transformer_config = build_transformer_config(config.model, config.parallel)
    # 9000 output features: above the blocking width, and not a multiple of the block (a short last block).
    rows = 9000
    assert rows >= linear._CPU_BLOCKED_MIN_ROWS and rows % linear._CPU_OUTPUT_BLOCK
    inputs = torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(3))
    errors = []
    for bias in (False, True):
        for skip_bias_add in (False, True):
            local = linear.LocalColumnParallelLinear(32, rows, config=transformer_config,
                                                     init_method=torch.nn.init.normal_, bias=bias,
                                                     gather_output=False, skip_bias_add=skip_bias_add)
            if bias:
                with torch.no_grad():
                    local.bias.copy_(torch.arange(rows, dtype=torch.float32) / 1000)
            with torch.no_grad():
                out, out_bias = local(inputs)
                # the slow reference: one output feature at a time
                expected = torch.stack([inputs @ local.weight[j] for j in range(rows)], dim=-1)
                if bias and not skip_bias_add:
                    expected = expected + local.bias
            errors.append(float((out - expected).abs().max()))
            assert (out_bias is not None) == (bias and skip_bias_add)

    # An output layer with its weight handed in (tied embeddings), as GPTModel calls it; megatron's layer is the
    # reference, without and with gradients (the latter takes megatron's path).
    weight = torch.nn.Parameter(torch.randn(rows, 32, generator=torch.Generator().manual_seed(5)))
    layers = {}
    for name, cls in (("megatron", ColumnParallelLinear), ("local", linear.LocalColumnParallelLinear)):
        layers[name] = cls(32, rows, config=transformer_config, init_method=torch.nn.init.normal_, bias=False,
                           gather_output=False, skip_weight_param_allocation=True)
    tied = {}
    for grad in (False, True):
        for name, layer in layers.items():
            weight.grad = None
            x = inputs.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                out, _ = layer(x, weight=weight, runtime_gather_output=True)
            if grad:
                out.square().sum().backward()
                tied[(name, grad)] = (out.detach(), x.grad, weight.grad)
            else:
                tied[(name, grad)] = (out,)
    tied_errors = [float((a - b).abs().max()) for grad in (False, True)
                   for a, b in zip(tied[("local", grad)], tied[("megatron", grad)])]
    return errors, tied_errors


def test_wide_linears_in_blocks_equal_the_slow_reference_and_the_tied_output_layer_megatrons():
    (errors, tied_errors), = run_distributed(_wide_layers, 1)
    assert max(errors) < 1e-4, errors
    assert max(tied_errors) < 1e-4, tied_errors


def _output_layer_kind(rank, world_size):
    from megaseg.config import load_config
    from megaseg.models.gpt import build_gpt_model
    from megaseg.models.linear import LocalColumnParallelLinear
    from megaseg.parallel import initialize_parallel

    config = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                                "model.ffn_hidden_size=64"])
    initialize_parallel(config.parallel, seed=1)
    model = build_gpt_model(config.model, config.parallel)
    return type(model.output_layer) is LocalColumnParallelLinear, sorted(model.state_dict())


def test_gpt_models_output_layer_is_local_and_keeps_its_state_dict_keys():
    (is_local, keys), = run_distributed(_output_layer_kind, 1)
    assert is_local
    assert not any(key.startswith("output_layer.weight") for key in keys)  # tied in the default model: no copy
