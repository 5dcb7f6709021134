"""The real SmolLM2-135M-Instruct, GGUF -> HF -> megatron: on chat-templated prompts the megatron model's logits
equal transformers', 16 greedy tokens (a plain argmax loop without KV cache, run on both) are identical, and the
answer to the first prompt is right."""
from __future__ import annotations

import pytest
import torch

from conversion_models import positions_for
from megaseg.config.parallel import ParallelConfig
from megaseg.conversion import convert_hf_to_megatron, load_model_checkpoint
from megaseg.conversion.model_yaml import find_model_config

pytestmark = pytest.mark.slow

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name three prime numbers."}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
]
# 16 tokens: enough for the first answer's "Paris" and for greedy paths to diverge if the models differed; each token
# re-runs both whole models, so this sets the test's time.
NUM_NEW_TOKENS = 16
# Logits reach ~40; fp32 summation order differs between the implementations (measured max difference 6e-5).
LOGITS_ATOL = 1e-4


def _greedy(next_logits, input_ids: torch.Tensor, num_tokens: int) -> list[int]:
    """Append the argmax token `num_tokens` times, re-running the whole sequence each step (no KV cache)."""
    ids = input_ids
    for _ in range(num_tokens):
        next_token = next_logits(ids)[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
    return ids[0, input_ids.shape[1]:].tolist()


def test_megatron_smollm2_matches_transformers(smollm2_hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import destroy_parallel, initialize_parallel

    ckpt = convert_hf_to_megatron(smollm2_hf_dir, tmp_path / "smollm2_megatron")
    model_cfg = find_model_config(ckpt)[0]
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer)  # the copy written beside the checkpoint
    hf_model = AutoModelForCausalLM.from_pretrained(str(smollm2_hf_dir), dtype=torch.float32).eval()
    initialize_parallel(ParallelConfig(), seed=0)
    try:
        megatron_model = build_gpt_model(model_cfg, ParallelConfig()).eval()
        load_model_checkpoint(megatron_model, ckpt)
        answers = []
        with torch.no_grad():
            for messages in PROMPTS:
                input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                          return_dict=True)["input_ids"]
                hf_next = lambda ids: hf_model(ids, use_cache=False).logits  # noqa: E731
                megatron_next = lambda ids: megatron_model(ids, positions_for(ids), None)  # noqa: E731
                torch.testing.assert_close(megatron_next(input_ids), hf_next(input_ids), atol=LOGITS_ATOL, rtol=0)
                megatron_tokens = _greedy(megatron_next, input_ids, NUM_NEW_TOKENS)
                assert megatron_tokens == _greedy(hf_next, input_ids, NUM_NEW_TOKENS), tokenizer.decode(
                    megatron_tokens)
                answers.append(tokenizer.decode(megatron_tokens))
        assert "Paris" in answers[0]  # the dequantized, un-permuted model still knows the answer
    finally:
        destroy_parallel()
