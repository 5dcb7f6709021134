"""GGUF -> HF on the real SmolLM2-135M-Instruct GGUF: every tensor equals what transformers' own GGUF loader
(an independent dequantize + q/k un-permute) produces, the logits match, the tokenizer and chat
template survive, and ensure_smollm2_hf converts only once. (That the model still answers is checked by the slow
megatron test, test_conversion_smollm2.py.)"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from megaseg.conversion import ensure_smollm2_hf
from megaseg.conversion.gguf_to_hf import SMOLLM2_GGUF_NAME, default_smollm2_gguf

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _transformers_gguf_reference():
    """transformers' GGUF reading path (config + dequantized, un-permuted tensors) into a LlamaForCausalLM."""
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = default_smollm2_gguf()
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with torch.device("meta"):  # only names and shapes are read from it
        skeleton = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    return tensors, model


def _chat_ids(tokenizer) -> torch.Tensor:
    encoded = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    return encoded["input_ids"]


def test_weights_and_logits_equal_transformers_gguf_loading(smollm2_hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference_tensors, reference = _transformers_gguf_reference()
    converted = AutoModelForCausalLM.from_pretrained(str(smollm2_hf_dir)).eval()
    state = converted.state_dict()
    assert set(reference_tensors) == set(state) - {"lm_head.weight"}
    for name, tensor in reference_tensors.items():
        assert torch.equal(state[name], tensor), name
    input_ids = _chat_ids(AutoTokenizer.from_pretrained(str(smollm2_hf_dir)))
    with torch.no_grad():
        assert torch.equal(converted(input_ids).logits, reference(input_ids).logits)


def test_config_tokenizer_and_chat_template(smollm2_hf_dir):
    from transformers import AutoTokenizer

    config = json.loads((smollm2_hf_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert config["tie_word_embeddings"] is True and config["rms_norm_eps"] == 1e-5
    assert json.loads((smollm2_hf_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    gguf = default_smollm2_gguf()
    from_gguf = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    converted = AutoTokenizer.from_pretrained(str(smollm2_hf_dir))
    assert converted.chat_template == from_gguf.chat_template and "<|im_start|>" in converted.chat_template
    assert converted.eos_token == "<|im_end|>"
    texts = ["Hello world!", "  leading spaces and ünïcödé, numbers 12345", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert converted(text)["input_ids"] == from_gguf(text)["input_ids"]
    assert _chat_ids(converted).tolist() == _chat_ids(from_gguf).tolist()


def test_ensure_smollm2_hf_converts_once(smollm2_hf_dir):
    weights = smollm2_hf_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.monotonic()
    assert ensure_smollm2_hf(smollm2_hf_dir.parent) == smollm2_hf_dir
    assert time.monotonic() - started < 1.0 and weights.stat().st_mtime_ns == before
    assert default_smollm2_gguf().name == SMOLLM2_GGUF_NAME
    assert not [p for p in Path(smollm2_hf_dir.parent).iterdir() if ".partial" in p.name]
