"""Core attention of the local layer spec through torch's fused ``scaled_dot_product_attention``.

megatron's local ``DotProductAttention`` computes attention as an unfused chain (baddbmm into a ``[b * heads, sq,
sk]`` score buffer, masked_fill, softmax, bmm), materialising the scores and the probabilities of every head.
``SDPAttention`` keeps its constructor (sizes, scale, dropout, process groups) and replaces the forward with one
``torch.nn.functional.scaled_dot_product_attention`` call, which picks the fastest kernel the backend has (flash /
memory-efficient on CUDA, the fused flash kernel on CPU) and never stores the full probabilities for backward.

Semantics kept from DotProductAttention:
- no mask and causal type: the causal mask when ``sq == sk`` (``sq == 1``: one new token attends to every cached key);
- a bool mask (True = masked out, megatron's convention): masked scores are *replaced* by -10000 in megatron, so a
  row with every key masked (a padding position) gets a uniform average rather than NaN. Here the mask becomes an
  additive -10000 bias; a fully masked row then averages with its own scores' weights instead of uniformly: only
  padding positions, whose outputs nothing reads, can differ, and neither is NaN;
- grouped-query attention without repeating keys and values (``enable_gqa``).
What it refuses (an error at construction): query-key layer scaling, softmax offsets, sliding windows; those stay
with DotProductAttention (``SDPAttention.supports(config)`` says which a config gets).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

# What megatron's attention_mask_func writes into masked scores.
MASKED_SCORE = -10000.0


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` with its forward on torch's fused scaled-dot-product attention (module docstring)."""

    @staticmethod
    def supports(config: TransformerConfig) -> bool:
        return (not config.apply_query_key_layer_scaling and config.softmax_type == "vanilla"
                and config.window_size is None)

    def __init__(self, config: TransformerConfig, *args, **kwargs) -> None:
        if not self.supports(config):
            raise ValueError("SDPAttention does not do query-key layer scaling, softmax offsets or sliding windows; "
                             "build those layers with megatron's DotProductAttention")
        super().__init__(config, *args, **kwargs)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        """query ``[sq, b, heads, d]``, key/value ``[sk, b, groups, d]`` -> context ``[sq, b, heads * d]``."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention takes neither packed sequences nor an attention bias")
        sq, batch, heads, _ = query.shape
        sk = key.shape[0]
        mask, causal = None, False
        if attention_mask is not None:
            bias = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
            mask = bias.masked_fill_(attention_mask, MASKED_SCORE)
        elif self.attn_mask_type == AttnMaskType.causal and sq > 1:
            if sq != sk:
                raise ValueError(f"a causal mask needs as many queries as keys (got {sq} and {sk})")
            causal = True
        dropout = self.attention_dropout.p if self.training else 0.0
        # Dropout draws from the tensor-parallel RNG stream, as DotProductAttention's does (each rank its own heads).
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if dropout and not self.config.sequence_parallel
               else contextlib.nullcontext())
        with rng:
            context = F.scaled_dot_product_attention(
                query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3), attn_mask=mask,
                dropout_p=dropout, is_causal=causal, scale=self.softmax_scale,
                enable_gqa=self.num_attention_heads_per_partition != self.num_query_groups_per_partition)
        # [b, heads, sq, d] -> [sq, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, self.hidden_size_per_partition)
