"""Which Hugging Face architectures megaseg converts, and their config.json <-> megaseg ModelConfig.

`model_config_from_hf` is pure: a config.json dict in, a ModelConfig out. The dict is first read through the
architecture's own transformers config class, so a key missing from the file takes the same default that
transformers would give it when loading the model (e.g. Mistral's head_dim, Qwen2's tie_word_embeddings), and both
rope layouts are understood: `rope_theta` + `rope_scaling` (transformers 4) and `rope_parameters` (transformers 5).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from megaseg.config.model import ModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HFArchitecture:
    """One supported decoder family and how its checkpoint differs from the Llama layout."""

    model_type: str  # config.json "model_type"
    family: str  # ModelConfig.family
    causal_lm_class: str
    token_classification_class: str  # what reward models / critics are exported as
    # Phi-3 stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`.
    fused_projections: bool
    # Qwen2 has biases on q/k/v (and nowhere else).
    qkv_bias: bool


ARCHITECTURES: Dict[str, HFArchitecture] = {
    arch.model_type: arch
    for arch in (
        HFArchitecture("llama", "llama", "LlamaForCausalLM", "LlamaForTokenClassification", False, False),
        HFArchitecture("mistral", "mistral", "MistralForCausalLM", "MistralForTokenClassification", False, False),
        HFArchitecture("qwen2", "qwen2", "Qwen2ForCausalLM", "Qwen2ForTokenClassification", False, True),
        HFArchitecture("phi3", "phi3", "Phi3ForCausalLM", "Phi3ForTokenClassification", True, False),
    )
}
SUPPORTED_CLASSES = tuple(
    name for arch in ARCHITECTURES.values() for name in (arch.causal_lm_class, arch.token_classification_class))

# Rope types megatron-core's GPTModel can reproduce: plain, Llama-3.1 scaling, and linear position interpolation.
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
TORCH_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                     "torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


def architecture_for_family(family: str) -> HFArchitecture:
    for arch in ARCHITECTURES.values():
        if arch.family == family:
            return arch
    raise ValueError(f"model.family={family!r} has no Hugging Face export; supported: "
                     f"{[a.family for a in ARCHITECTURES.values()]}")


def resolve_architecture(hf_config: Mapping[str, Any]) -> HFArchitecture:
    """The architecture of a config.json dict; ValueError listing the supported classes otherwise."""
    classes = list(hf_config.get("architectures") or [])
    model_type = hf_config.get("model_type")
    unknown = [name for name in classes if name not in SUPPORTED_CLASSES]
    if unknown or model_type not in ARCHITECTURES:
        found = unknown[0] if unknown else f"model_type={model_type!r}"
        raise ValueError(f"unsupported Hugging Face architecture {found}; megaseg converts "
                         f"{', '.join(SUPPORTED_CLASSES)}")
    return ARCHITECTURES[model_type]


def _hf_config_object(hf_config: Mapping[str, Any], arch: HFArchitecture) -> Any:
    from transformers import AutoConfig

    # deepcopy: transformers standardises rope dicts in place, and the caller's dict must stay as it was.
    settings = {k: copy.deepcopy(v) for k, v in hf_config.items() if k not in ("model_type", "quantization_config")}
    return AutoConfig.for_model(arch.model_type, **settings)


def rope_settings(hf_config_object: Any) -> tuple[float, Optional[Dict[str, Any]]]:
    """(rope theta, scaling dict or None) from either transformers' v4 or v5 attribute layout."""
    parameters = getattr(hf_config_object, "rope_parameters", None)
    if parameters is not None:  # transformers >= 5: one dict holding rope_theta and the scaling
        parameters = dict(parameters)
        theta = float(parameters.pop("rope_theta"))
        scaling = parameters if parameters.get("rope_type", "default") != "default" else None
    else:
        theta = float(hf_config_object.rope_theta)
        scaling = dict(hf_config_object.rope_scaling) if hf_config_object.rope_scaling else None
    if scaling is not None:
        scaling.pop("partial_rotary_factor", None)  # checked separately: megaseg has no rotary_percent field
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type!r} cannot be reproduced by megatron-core's GPTModel; "
                             f"supported: {list(SUPPORTED_ROPE_TYPES)}")
        scaling["rope_type"] = scaling.pop("type", rope_type)
        if scaling["rope_type"] == "default":
            scaling = None
    return theta, scaling


def _check_supported_features(hf: Any, arch: HFArchitecture) -> None:
    if hf.hidden_act != "silu":
        raise ValueError(f"hidden_act={hf.hidden_act!r}: megaseg converts SwiGLU (silu) MLPs only")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf, flag, False):
            raise ValueError(f"{arch.model_type} with {flag}=true is not supported: megaseg's ModelConfig has only "
                             "add_qkv_bias (biases on q/k/v), not biases on every linear layer")
    rope_parameters = getattr(hf, "rope_parameters", None) or {}
    partial = rope_parameters.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported: megaseg's ModelConfig has no "
                         "rotary_percent field yet (ask for one in megaseg/config/model.py)")
    sliding_window = getattr(hf, "sliding_window", None)
    uses_window = getattr(hf, "use_sliding_window", True)
    if sliding_window and uses_window:
        logger.warning("%s: sliding_window=%s is ignored: megaseg attends over the whole sequence, which equals "
                       "the original model only for sequences up to %s tokens", arch.model_type, sliding_window,
                       sliding_window)


def _params_dtype(hf_config: Mapping[str, Any]) -> str:
    raw = hf_config.get("dtype", hf_config.get("torch_dtype")) or "float32"
    name = TORCH_DTYPE_NAMES.get(str(raw))
    if name is None:
        raise ValueError(f"config.json dtype={raw!r} is not one of {sorted(set(TORCH_DTYPE_NAMES.values()))}")
    return name


def eos_ids(value: Any) -> list[int]:
    """config.json / generation_config.json `eos_token_id` (None, an int or a list) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def model_config_from_hf(hf_config_dict: Mapping[str, Any]) -> ModelConfig:
    """The megaseg ModelConfig of a Hugging Face config.json dict (tokenizer/checkpoint paths left unset).

    Raises ValueError for an unsupported architecture or a feature megatron-core (or ModelConfig) cannot express.
    """
    arch = resolve_architecture(hf_config_dict)
    hf = _hf_config_object(hf_config_dict, arch)
    _check_supported_features(hf, arch)
    theta, scaling = rope_settings(hf)
    num_heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
    return ModelConfig(
        name=str(hf_config_dict.get("_name_or_path") or arch.model_type).rstrip("/").split("/")[-1],
        family=arch.family,
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=num_heads,
        num_query_groups=hf.num_key_value_heads or num_heads,
        kv_channels=head_dim,
        vocab_size=hf.vocab_size,
        max_position_embeddings=hf.max_position_embeddings,
        rotary_base=theta,
        rope_scaling=scaling,
        normalization="RMSNorm",
        norm_epsilon=float(hf.rms_norm_eps),
        activation="swiglu",
        add_qkv_bias=arch.qkv_bias,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        init_method_std=float(getattr(hf, "initializer_range", 0.02)),
        params_dtype=_params_dtype(hf_config_dict),
        eos_token_ids=eos_ids(hf_config_dict.get("eos_token_id")),
    )


def _numeric(value: Any) -> Any:
    """A number written as a string in a hand-made YAML (e.g. factor: "8.0") is read as the number."""
    if not isinstance(value, str):
        return value
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


# Recomputed from ModelConfig (or describing another head / another transformers) rather than copied from `base`.
_FIELDS_NOT_TAKEN_FROM_BASE = ("model_type", "architectures", "quantization_config", "transformers_version",
                               "torch_dtype", "rope_theta", "rope_scaling", "rope_parameters", "id2label", "label2id",
                               "num_labels")


def hf_config_from_model_config(model_cfg: ModelConfig, base: Optional[Mapping[str, Any]] = None,
                                token_classification: bool = False) -> Dict[str, Any]:
    """A config.json dict for `model_cfg`; `base` (the source model's config.json, when known) supplies what
    ModelConfig does not hold (bos/pad token ids, Phi-3's original_max_position_embeddings, ...)."""
    arch = architecture_for_family(model_cfg.family)
    from transformers import AutoConfig

    settings: Dict[str, Any] = {k: copy.deepcopy(v) for k, v in (base or {}).items()
                                if k not in _FIELDS_NOT_TAKEN_FROM_BASE}
    scaling = {k: _numeric(v) for k, v in (model_cfg.rope_scaling or {}).items()}
    head_dim = model_cfg.kv_channels or model_cfg.hidden_size // model_cfg.num_attention_heads
    settings.update(
        vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.ffn_hidden_size, num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=model_cfg.num_query_groups or model_cfg.num_attention_heads,
        max_position_embeddings=model_cfg.max_position_embeddings, rms_norm_eps=model_cfg.norm_epsilon,
        tie_word_embeddings=model_cfg.tie_word_embeddings, hidden_act="silu", dtype=model_cfg.params_dtype,
        # The transformers-4 spelling: transformers 5 still accepts it and folds it into rope_parameters.
        rope_theta=model_cfg.rotary_base, rope_scaling=scaling or None,
        initializer_range=model_cfg.init_method_std,
    )
    default_head_dim = model_cfg.hidden_size // model_cfg.num_attention_heads
    if head_dim != default_head_dim or "head_dim" in settings:
        if arch.model_type == "phi3":  # Phi3Config derives head_dim itself
            raise ValueError(f"Phi-3 requires kv_channels == hidden_size / num_attention_heads = {default_head_dim}, "
                             f"got {head_dim}")
        settings["head_dim"] = head_dim
    if model_cfg.eos_token_ids:
        eos = model_cfg.eos_token_ids
        settings["eos_token_id"] = eos[0] if len(eos) == 1 else list(eos)
    if token_classification:
        settings["num_labels"] = 1
    hf = AutoConfig.for_model(arch.model_type, **settings)
    hf.architectures = [arch.token_classification_class if token_classification else arch.causal_lm_class]
    return hf.to_diff_dict()
