"""Tiny randomly initialised Hugging Face models of every supported architecture, and megatron forwards over them.

Every parameter is redrawn (norm weights around 1, biases and weights with std 0.1) so that the logits are O(1) and
a swapped norm, a mis-ordered q/k/v row or a missing bias moves them far beyond the 1e-4 tolerance.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Tuple

import torch

VOCAB_SIZE = 128
COMMON_HF_SETTINGS = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=256,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclasses.dataclass(frozen=True)
class ArchCase:
    name: str
    config_class: str
    model_class: str
    settings: Dict[str, object]


ARCH_CASES = {
    case.name: case for case in (
        ArchCase("llama_tied", "LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True, "rope_theta": 5e5}),
        ArchCase("llama_untied", "LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
        ArchCase("mistral", "MistralConfig", "MistralForCausalLM", {"tie_word_embeddings": False,
                                                                   "sliding_window": None}),
        ArchCase("qwen2", "Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False, "rope_theta": 1e6}),
        ArchCase("phi3", "Phi3Config", "Phi3ForCausalLM", {"tie_word_embeddings": False}),
    )
}


def make_hf_model(case: ArchCase, seed: int = 0) -> torch.nn.Module:
    import transformers

    config = getattr(transformers, case.config_class)(**COMMON_HF_SETTINGS, **case.settings)
    torch.manual_seed(seed)
    model = getattr(transformers, case.model_class)(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise)
    return model


def save_tiny_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over VOCAB_SIZE tokens with a chat template, built locally (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB_SIZE)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
    tokenizer.save_pretrained(str(directory))


def save_hf_case(case: ArchCase, directory: Path, seed: int = 0) -> torch.nn.Module:
    model = make_hf_model(case, seed)
    model.save_pretrained(str(directory))
    save_tiny_tokenizer(directory)
    return model


def sample_input_ids(batch: int = 2, seq: int = 12, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (batch, seq), generator=torch.Generator().manual_seed(seed))


def positions_for(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(input_ids.shape[1]).expand_as(input_ids).contiguous()


def hf_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def megatron_logits_in_process(ckpt_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Build the GPT model at TP=1 from the checkpoint's megaseg_model.yaml, load it and return logits."""
    from megaseg.config.parallel import ParallelConfig
    from megaseg.conversion.megatron_checkpoint import load_model_checkpoint
    from megaseg.conversion.model_yaml import find_model_config
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import destroy_parallel, initialize_parallel

    model_cfg = find_model_config(ckpt_dir)[0]
    initialize_parallel(ParallelConfig(), seed=0)
    try:
        model = build_gpt_model(model_cfg, ParallelConfig()).eval()
        load_model_checkpoint(model, ckpt_dir)
        with torch.no_grad():
            return model(input_ids, positions_for(input_ids), None)
    finally:
        destroy_parallel()


def megatron_logits_on_ranks(rank: int, world_size: int, jobs: List[Tuple[str, torch.Tensor]],
                             tp: int) -> List[torch.Tensor]:
    """Spawned rank: load each checkpoint into a TP=`tp` model and return its full (gathered) logits."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megaseg.config.parallel import ParallelConfig
    from megaseg.conversion.megatron_checkpoint import load_model_checkpoint
    from megaseg.conversion.model_yaml import find_model_config
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import initialize_parallel

    parallel_cfg = ParallelConfig(tensor_model_parallel_size=tp)
    initialize_parallel(parallel_cfg, seed=0)
    results = []
    for ckpt_dir, input_ids in jobs:
        model = build_gpt_model(find_model_config(Path(ckpt_dir))[0], parallel_cfg).eval()
        load_model_checkpoint(model, Path(ckpt_dir))
        with torch.no_grad():
            results.append(gather_from_tensor_model_parallel_region(
                model(input_ids, positions_for(input_ids), None)))
    return results
