"""RoPE settings of a backbone: base (theta) and the HF `rope_scaling` dict, in the form megatron-core takes; and
megatron's unfused RoPE application with its cos/sin computed once per forward (``install_cached_rope``, below).

megatron-core implements two of HF's scalings: Llama-3.1's frequency-dependent "llama3" scaling (with HF's defaults
low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192 hard-coded) and linear position
interpolation. Anything else (yarn, longrope/su of Phi-3-128k, dynamic NTK) is refused instead of silently ignored.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from megaseg.config.model import ModelConfig

# What megatron-core's RotaryEmbedding._apply_scaling assumes; a checkpoint with other values would be mis-rotated.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.0}


@dataclass(frozen=True)
class RotaryArgs:
    """Keyword arguments of megatron's GPTModel / RotaryEmbedding for the rotary position embedding."""

    rotary_base: float
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    seq_len_interpolation_factor: Optional[float] = None


def _number(scaling: Mapping[str, object], key: str) -> float:
    try:
        return float(scaling[key])  # type: ignore[arg-type]
    except KeyError:
        raise ValueError(f"model.rope_scaling={dict(scaling)} lacks {key!r}") from None
    except (TypeError, ValueError):
        raise ValueError(f"model.rope_scaling.{key}={scaling[key]!r} is not a number") from None


def rotary_args(model_cfg: ModelConfig) -> RotaryArgs:
    """RotaryArgs for `model_cfg`; ValueError naming the scaling type megatron-core cannot reproduce."""
    scaling = model_cfg.rope_scaling
    if not scaling:
        return RotaryArgs(rotary_base=model_cfg.rotary_base)
    # HF configs spell the kind "rope_type" (newer) or "type" (older).
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        for key, expected in _LLAMA3_FIXED.items():
            if key in scaling and _number(scaling, key) != expected:
                raise ValueError(
                    f"model.rope_scaling.{key}={scaling[key]} differs from {expected:g}, the value megatron-core's "
                    "Llama-3.1 RoPE scaling hard-codes; this checkpoint cannot be reproduced exactly")
        return RotaryArgs(rotary_base=model_cfg.rotary_base, rope_scaling=True,
                          rope_scaling_factor=_number(scaling, "factor"))
    if kind == "linear":
        return RotaryArgs(rotary_base=model_cfg.rotary_base, seq_len_interpolation_factor=_number(scaling, "factor"))
    if kind == "default":
        return RotaryArgs(rotary_base=model_cfg.rotary_base)
    raise ValueError(
        f"model.rope_scaling type {kind!r} is not supported (megatron-core implements 'llama3' and 'linear'); "
        "use a checkpoint without it (e.g. Phi-3-mini-4k instead of -128k) or set model.rope_scaling=null "
        "if you accept different positions beyond the original context")


# --- applying RoPE: megatron's unfused path with its cos/sin computed once per forward --------------------------
#
# Without TransformerEngine's fused RoPE (the local spec, every CPU run), megatron-core applies RoPE in
# rope_utils._apply_rotary_pos_emb_bshd, which recomputes cos(freqs) and sin(freqs) in every call (twice per layer:
# query and key, from the same freqs tensor) and spends five full-size copies on the rotation (chunk, neg, cat,
# add, and a final cat with an empty pass-through part). Measured on SmolLM2-135M decoding 8 rows on 2 CPU cores:
# 1.73 s of a 10.0 s generate call (64 tokens), against 0.42 s for transformers' RoPE.
# ``install_cached_rope`` replaces that one function (process-wide, idempotent) with ``cached_rotary_pos_emb_bshd``:
# cos and sin (with rotate_half's sign folded into sin) are computed once per distinct freqs tensor and the rotation
# is one cat + mul + addcmul. Same arithmetic up to float rounding order (tests/models/test_models_rotary.py).

_ROPE_CACHE_ENTRIES = 64
_rope_cache: dict[tuple, tuple] = {}
_megatron_bshd = None


def _freqs_key(freqs, dtype, mscale: float) -> Optional[tuple]:
    """A key that identifies the VALUES of ``freqs`` while the cache holds a reference to it: the same live storage,
    offset, shape and strides, and no in-place write since (the version counter). None: do not cache."""
    if freqs.requires_grad or freqs.is_inference():  # inference tensors have no version counter
        return None
    return (freqs.device, freqs.untyped_storage().data_ptr(), freqs.storage_offset(), tuple(freqs.shape),
            freqs.stride(), freqs._version, dtype, float(mscale))


def _cos_and_signed_sin(freqs, dtype, mscale: float):
    half = freqs.shape[-1] // 2
    cos = (torch.cos(freqs) * mscale).to(dtype)
    sin = (torch.sin(freqs) * mscale).to(dtype)
    # rotate_half(t) * sin == cat(t2, t1) * cat(-sin1, sin2) for t = cat(t1, t2)
    return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def cached_rotary_pos_emb_bshd(t, freqs, rotary_interleaved: bool = False, multi_latent_attention: bool = False,
                               mscale: float = 1.0):
    """megatron-core's ``_apply_rotary_pos_emb_bshd(t [s, ..., d], freqs [s, ..., rot_dim])`` with cos/sin cached
    (see above). Interleaved RoPE, multi-latent attention and a partial rotary dimension go to megatron's own."""
    rot_dim = freqs.shape[-1]
    if rotary_interleaved or multi_latent_attention or t.shape[-1] != rot_dim or rot_dim % 2:
        return _megatron_bshd(t, freqs, rotary_interleaved, multi_latent_attention, mscale)
    key = _freqs_key(freqs, t.dtype, mscale)
    cached = _rope_cache.get(key) if key is not None else None
    if cached is None:
        cos, signed_sin = _cos_and_signed_sin(freqs, t.dtype, mscale)
        if key is not None:
            if len(_rope_cache) >= _ROPE_CACHE_ENTRIES:
                _rope_cache.clear()
            # freqs stays referenced so that its storage (hence the key's address) cannot be reused while cached.
            _rope_cache[key] = (freqs, cos, signed_sin)
    else:
        _, cos, signed_sin = cached
    half = rot_dim // 2
    swapped = torch.cat([t[..., half:], t[..., :half]], dim=-1)
    return torch.addcmul(t * cos, swapped, signed_sin)


def install_cached_rope() -> bool:
    """Route megatron-core's unfused RoPE through ``cached_rotary_pos_emb_bshd``; False (and nothing changed) when
    this megatron-core release's function has another signature than the one it replaces."""
    global _megatron_bshd
    from megatron.core.models.common.embeddings import rope_utils

    current = rope_utils._apply_rotary_pos_emb_bshd
    if current is cached_rotary_pos_emb_bshd:
        return True
    expected = ["t", "freqs", "rotary_interleaved", "multi_latent_attention", "mscale"]
    if list(inspect.signature(current).parameters) != expected:
        return False
    _megatron_bshd = current
    rope_utils._apply_rotary_pos_emb_bshd = cached_rotary_pos_emb_bshd
    return True
