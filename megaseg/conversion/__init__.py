"""Checkpoint conversion: GGUF -> HF, HF <-> megatron-core dist checkpoints, reward-model export (see README.md)."""
from megaseg.conversion.gguf_to_hf import convert_gguf_to_hf, ensure_smollm2_hf
from megaseg.conversion.hf_architectures import hf_config_from_model_config, model_config_from_hf
from megaseg.conversion.hf_to_megatron import convert_hf_to_megatron, plan_hf_to_megatron
from megaseg.conversion.megatron_checkpoint import load_model_checkpoint, save_model_checkpoint
from megaseg.conversion.megatron_to_hf import convert_megatron_to_hf, plan_megatron_to_hf

__all__ = [
    "convert_gguf_to_hf",
    "ensure_smollm2_hf",
    "model_config_from_hf",
    "hf_config_from_model_config",
    "convert_hf_to_megatron",
    "plan_hf_to_megatron",
    "convert_megatron_to_hf",
    "plan_megatron_to_hf",
    "save_model_checkpoint",
    "load_model_checkpoint",
]
