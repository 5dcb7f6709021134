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
Packed sequences (megatron's THD format, ``PackedSeqParams(qkv_format="thd")``, megaseg.models.packing): query
``[t, heads, d]`` and key/value ``[t, groups, d]`` hold several sequences back to back (megatron's Attention has
already squeezed the batch dimension and rotated each sequence from position 0); each sequence attends causally to
itself only, by one causal SDPA call per sequence of ``cu_seqlens``. Measured on 2 CPU cores (9 heads, 3 groups,
d 64): 8 / 32 sequences of 50-400 tokens took 122 / 1538 ms per call this way against 544 / 18620 ms with one
block-diagonal causal mask over the whole pack (the mask costs t^2 and loses the fused causal kernel); only for
many short sequences (32 of 50-100 tokens) was the mask slightly faster (1335 against 1572 ms).
What it refuses (an error at construction): query-key layer scaling, softmax offsets, sliding windows; those stay
with DotProductAttention (``SDPAttention.supports(config)`` says which a config gets).

Also here: ``RotatedKeyCacheSelfAttention``, the local spec's self-attention, whose static KV cache holds keys
already rotated, so a decode step rotates its new column only (see the section at the end).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

# What megatron's attention_mask_func writes into masked scores.
MASKED_SCORE = -10000.0

# The additive bias of the last bool mask seen: GPTModel hands the same mask tensor to every layer of a forward, so
# it is converted once per forward instead of once per layer (a decode step's share of small ops). Keyed by the mask
# object itself (held, so it stays alive), its version counter (no in-place write since) and the dtype; only small
# masks (a decode step's [b, 1, 1, columns]) are kept, so a long training mask is never held past its forward.
_MAX_CACHED_MASK_ELEMENTS = 1 << 20
_last_mask_bias: Optional[tuple[torch.Tensor, int, torch.dtype, torch.Tensor]] = None


def additive_mask_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask (True = masked out) -> the additive bias: 0 where attended, MASKED_SCORE where masked."""
    global _last_mask_bias
    cached = _last_mask_bias
    if (cached is not None and cached[0] is attention_mask and cached[1] == attention_mask._version
            and cached[2] == dtype):
        return cached[3]
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    bias.masked_fill_(attention_mask, MASKED_SCORE)
    # (inference tensors have no version counter)
    if attention_mask.numel() <= _MAX_CACHED_MASK_ELEMENTS and not attention_mask.is_inference():
        _last_mask_bias = (attention_mask, attention_mask._version, dtype, bias)
    return bias


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

    def _dropout_and_rng(self):
        dropout = self.attention_dropout.p if self.training else 0.0
        # Dropout draws from the tensor-parallel RNG stream, as DotProductAttention's does (each rank its own heads).
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if dropout and not self.config.sequence_parallel
               else contextlib.nullcontext())
        return dropout, rng

    def _packed_forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        packed_seq_params) -> torch.Tensor:
        # The padded offsets when given, as megatron's RoPE uses them: they are where the sequences lie in the pack.
        cu_seqlens = (packed_seq_params.cu_seqlens_q_padded if packed_seq_params.cu_seqlens_q_padded is not None
                      else packed_seq_params.cu_seqlens_q)
        if packed_seq_params.cu_seqlens_kv is not None and not torch.equal(
                cu_seqlens, packed_seq_params.cu_seqlens_kv_padded if packed_seq_params.cu_seqlens_kv_padded
                is not None else packed_seq_params.cu_seqlens_kv):
            raise ValueError("SDPAttention packs self-attention only: cu_seqlens_q and cu_seqlens_kv must be equal")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != query.shape[0]:
            raise ValueError(f"cu_seqlens {bounds} do not cover the {query.shape[0]} packed tokens")
        dropout, rng = self._dropout_and_rng()
        gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        # [t, heads, d] -> [1, heads, t, d]: one causal call per sequence, so no score crosses a sequence boundary.
        # The batch dimension of 1 matters: torch's fused CPU kernel (flash) takes 4-D inputs only, and 3-D ones
        # fall back to the unfused math path (measured: a SmolLM2 packed step spent ~1 s there).
        q, k, v = (tensor.transpose(0, 1).unsqueeze(0) for tensor in (query, key, value))
        contexts = []
        with rng:
            for start, end in zip(bounds[:-1], bounds[1:]):
                contexts.append(F.scaled_dot_product_attention(
                    q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], dropout_p=dropout,
                    is_causal=end - start > 1, scale=self.softmax_scale, enable_gqa=gqa))
        # [1, heads, t, d] -> [t, heads * d]
        return torch.cat(contexts, dim=2)[0].transpose(0, 1).reshape(query.shape[0], self.hidden_size_per_partition)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        """query ``[sq, b, heads, d]``, key/value ``[sk, b, groups, d]`` -> context ``[sq, b, heads * d]``; packed
        (THD): query ``[t, heads, d]``, key/value ``[t, groups, d]`` -> ``[t, heads * d]``."""
        if attention_bias is not None:
            raise ValueError("SDPAttention takes no attention bias")
        if packed_seq_params is not None:
            if attention_mask is not None or packed_seq_params.qkv_format != "thd":
                raise ValueError(f"SDPAttention takes packed sequences in the 'thd' format without an attention "
                                 f"mask (got qkv_format={packed_seq_params.qkv_format!r}, a mask: "
                                 f"{attention_mask is not None})")
            return self._packed_forward(query, key, value, packed_seq_params)
        sq, batch, heads, _ = query.shape
        sk = key.shape[0]
        mask, causal = None, False
        if attention_mask is not None:
            mask = additive_mask_bias(attention_mask, query.dtype)
        elif self.attn_mask_type == AttnMaskType.causal and sq > 1:
            if sq != sk:
                raise ValueError(f"a causal mask needs as many queries as keys (got {sq} and {sk})")
            causal = True
        dropout, rng = self._dropout_and_rng()
        with rng:
            context = F.scaled_dot_product_attention(
                query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3), attn_mask=mask,
                dropout_p=dropout, is_causal=causal, scale=self.softmax_scale,
                enable_gqa=self.num_attention_heads_per_partition != self.num_query_groups_per_partition)
        # [b, heads, sq, d] -> [sq, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, self.hidden_size_per_partition)


# --- decoding: every key rotated once, as it enters the static KV cache ----------------------------------------
#
# megatron-core's static-batching KV cache stores keys before RoPE and rotates the whole cache, columns
# [0, offset + n), in every decode step of every layer (Attention.forward applies k_pos_emb[:sequence_end] to the
# keys _adjust_key_value_for_inference returns): O(length) rotation work and three cache-sized temporaries per layer
# and step, where transformers rotates the new key alone and caches it rotated. ``RotatedKeyCacheSelfAttention``
# does the latter: it rotates the fed columns' queries and keys (positions [offset, offset + n)) before megatron
# writes them into the cache, and hands megatron no RoPE, so nothing is rotated twice. RoPE is elementwise per
# position, so the keys attended to are the same values (up to float rounding order). Only static batching without
# flash decoding takes this path (megatron's flash decode already rotates the new columns alone); training, scoring
# and every forward without an inference context are megatron's unchanged. Not used with packed sequences: no
# generation packs its rows.

@functools.cache
def _rotation_arguments_match() -> bool:
    """True when this megatron-core's signatures are the ones the override below relies on."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer.attention import Attention

    adjust = list(inspect.signature(Attention._adjust_key_value_for_inference).parameters)[:6]
    rotate = list(inspect.signature(apply_rotary_pos_emb).parameters)
    return (adjust == ["self", "inference_context", "query", "key", "value", "rotary_pos_emb"]
            and rotate[:3] == ["t", "freqs", "config"] and "mscale" in rotate)


class RotatedKeyCacheSelfAttention(SelfAttention):
    """megatron's ``SelfAttention`` whose static KV cache holds rotated keys (see above)."""

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb, *args,
                                        **kwargs):
        if (not _rotation_arguments_match() or rotary_pos_emb is None or inference_context is None
                or not inference_context.is_static_batching() or self.config.flash_decode):
            return super()._adjust_key_value_for_inference(inference_context, query, key, value, rotary_pos_emb,
                                                           *args, **kwargs)
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        q_pos_emb, k_pos_emb = rotary_pos_emb
        start = inference_context.sequence_len_offset
        end = start + key.size(0)
        mscale = _rope_mscale(self.config)
        if q_pos_emb is not None:
            query = apply_rotary_pos_emb(query, q_pos_emb[start:end], config=self.config, mscale=mscale)
        if k_pos_emb is not None:
            key = apply_rotary_pos_emb(key, k_pos_emb[start:end], config=self.config, mscale=mscale)
        # With no RoPE passed, megatron stores these keys and returns none, so Attention.forward rotates nothing.
        return super()._adjust_key_value_for_inference(inference_context, query, key, value, None, *args, **kwargs)


def _rope_mscale(config: TransformerConfig) -> float:
    """The scale megatron's Attention.forward passes to apply_rotary_pos_emb (YaRN's concentration factor)."""
    try:
        from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
            _yarn_get_concentration_factor_from_config)
    except ImportError:  # pragma: no cover - releases before YaRN pass no mscale
        return 1.0
    return _yarn_get_concentration_factor_from_config(config)
