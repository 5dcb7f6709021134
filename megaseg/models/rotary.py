"""RoPE settings of a backbone: base (theta) and the HF `rope_scaling` dict, in the form megatron-core takes.

megatron-core implements two of HF's scalings: Llama-3.1's frequency-dependent "llama3" scaling (with HF's defaults
low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192 hard-coded) and linear position
interpolation. Anything else (yarn, longrope/su of Phi-3-128k, dynamic NTK) is refused instead of silently ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

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
