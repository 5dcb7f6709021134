"""The backbone's architecture and precision: everything needed to build the megatron-core GPT model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megaseg.config._checks import check_choice, check_positive

MODEL_FAMILIES = ("llama", "mistral", "qwen2", "phi3")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
ACTIVATIONS = ("swiglu", "gelu")
DTYPES = ("float32", "bfloat16", "float16")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
FP8_FORMATS = ("e4m3", "hybrid")
# megatron-core Fp8Recipe names that need no extra objects ("custom" needs a quantizer factory megaseg does not build).
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
# megatron-core's activation recompute (TransformerConfig fields of the same names).
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass(frozen=True)
class ModelConfig:
    """Defaults describe the tiny randomly initialised test model; model_configs/*.yaml set real backbones."""

    name: str = "tiny-llama"
    family: str = "llama"
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    # None means multi-head attention (as many key/value heads as query heads).
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    vocab_size: int = 128
    max_position_embeddings: int = 2048
    rotary_base: float = 10000.0
    # HF-style rope_scaling dict (e.g. Llama-3.1: rope_type, factor, low_freq_factor, ...); None = no scaling.
    rope_scaling: Optional[Dict[str, Any]] = None
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    activation: str = "swiglu"
    add_qkv_bias: bool = False
    tie_word_embeddings: bool = True
    init_method_std: float = 0.02
    params_dtype: str = "float32"
    # Where the weights and tokenizer come from (local paths only: megaseg never downloads).
    tokenizer: Optional[str] = None
    checkpoint: Optional[str] = None
    # Start from randomly initialised weights instead of model.checkpoint (tests and smoke runs only: such a model
    # knows no language). The trainers refuse to start without model.checkpoint unless this is true.
    random_init: bool = False
    # Token ids that end a response (the model's stop tokens; empty = the chat template's end-of-turn token, then
    # the tokenizer's EOS). Truncation writes back the response's own stop token, not the first of these.
    eos_token_ids: List[int] = field(default_factory=list)
    transformer_impl: str = "auto"
    fp8: Optional[str] = None
    fp8_recipe: str = "delayed"
    reward_head_dtype: str = "float32"
    # Activation recompute for every trained model built from this config (actor, critic, reward model, DPO
    # policy; frozen models run without autograd and store nothing). None: keep every activation. "selective":
    # recompute the core attention (softmax, its dropout, the attention-weighted values) of every layer in backward,
    # Korthikanti et al. 2022's choice. "full": keep only each recompute unit's input and rerun the layers in backward;
    # needs recompute_method ("uniform": units of recompute_num_layers layers; "block": the first
    # recompute_num_layers layers of each pipeline stage) and recompute_num_layers.
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None

    def __post_init__(self) -> None:
        self._check_recompute()
        check_choice("model.family", self.family, MODEL_FAMILIES)
        check_choice("model.normalization", self.normalization, NORMALIZATIONS)
        check_choice("model.activation", self.activation, ACTIVATIONS)
        check_choice("model.params_dtype", self.params_dtype, DTYPES)
        check_choice("model.reward_head_dtype", self.reward_head_dtype, DTYPES)
        check_choice("model.transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)
        if self.fp8 is not None:
            check_choice("model.fp8", self.fp8, FP8_FORMATS)
        check_choice("model.fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        if self.random_init and self.checkpoint is not None:
            raise ValueError(f"model.random_init=true and model.checkpoint={self.checkpoint!r} both choose the initial "
                             "weights; drop one of them")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                     "max_position_embeddings"):
            check_positive(f"model.{name}", getattr(self, name))
        if self.hidden_size % self.num_attention_heads and self.kv_channels is None:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
                f"{self.num_attention_heads}; set model.kv_channels explicitly")
        if self.num_query_groups is not None and self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={self.num_query_groups}")

    def _check_recompute(self) -> None:
        if self.recompute_granularity is None:
            if self.recompute_method is not None or self.recompute_num_layers is not None:
                raise ValueError(
                    f"model.recompute_method={self.recompute_method!r} / model.recompute_num_layers="
                    f"{self.recompute_num_layers!r} are set but model.recompute_granularity is null; set "
                    "model.recompute_granularity=full (or drop them)")
            return
        check_choice("model.recompute_granularity", self.recompute_granularity, RECOMPUTE_GRANULARITIES)
        if self.recompute_granularity == "selective":
            if self.recompute_method is not None or self.recompute_num_layers is not None:
                raise ValueError(
                    "model.recompute_granularity=selective recomputes the core attention of every layer; "
                    "model.recompute_method and model.recompute_num_layers must be null (they choose layers for full "
                    "recompute)")
            return
        if self.recompute_method is None or self.recompute_num_layers is None:
            raise ValueError(
                "model.recompute_granularity=full needs model.recompute_method (uniform or block) and "
                "model.recompute_num_layers (e.g. recompute_method=uniform recompute_num_layers=1: every layer)")
        check_choice("model.recompute_method", self.recompute_method, RECOMPUTE_METHODS)
        check_positive("model.recompute_num_layers", self.recompute_num_layers)
