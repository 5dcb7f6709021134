"""The fields of ModelConfig that define a checkpoint's weights: shapes, and the numerics those weights assume.

Saved with every checkpoint and compared on load, so that loading weights into a model of another architecture is
an error naming the fields instead of a shape error deep in torch (or, for RoPE theta or the norm, no error at all
and a silently wrong model).
"""
from __future__ import annotations

from typing import Any, Mapping

from megaseg.config.model import ModelConfig
from megaseg.models.transformer_config import num_query_groups

ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "vocab_size", "normalization", "norm_epsilon", "activation", "add_qkv_bias", "tie_word_embeddings",
    "rotary_base", "rope_scaling",
)


def model_architecture(model_cfg: ModelConfig) -> dict[str, Any]:
    """Plain-python architecture record (derived defaults made explicit, so MHA written as None or as the head
    count compare equal)."""
    record = {name: getattr(model_cfg, name) for name in ARCHITECTURE_FIELDS}
    record["num_query_groups"] = num_query_groups(model_cfg)
    record["kv_channels"] = model_cfg.kv_channels or model_cfg.hidden_size // model_cfg.num_attention_heads
    record["rotary_base"] = float(model_cfg.rotary_base)
    record["norm_epsilon"] = float(model_cfg.norm_epsilon)
    record["rope_scaling"] = dict(model_cfg.rope_scaling) if model_cfg.rope_scaling else None
    return record


def architecture_differences(saved: Mapping[str, Any], model_cfg: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """{field: (saved value, configured value)} for every architecture field that differs."""
    current = model_architecture(model_cfg)
    return {name: (saved.get(name), current[name]) for name in ARCHITECTURE_FIELDS
            if _normalised(saved.get(name)) != _normalised(current[name])}


def _normalised(value: Any) -> Any:
    # rope_scaling values come back from YAML as strings ("8.0") or numbers (8.0).
    if isinstance(value, Mapping):
        return {key: _normalised(item) for key, item in value.items()}
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value
