"""`megaseg generate` (benchmark answer files) and `megaseg compare` (judge-free pairwise proxy) settings.

Decoding defaults follow each benchmark's own answer generator when a value is left at None:
- mt_bench (FastChat llm_judge gen_model_answer): max_new_token 1024; temperature by category, FastChat's
  ``temperature_config``: writing / roleplay 0.7, stem / humanities 0.1, extraction / math / coding / reasoning 0.0
  (greedy); an unknown category 0.7.
- arena_hard (arena-hard-auto v0.1 gen_answer_config.yaml): temperature 0.0, max_tokens 4096.
- alpaca_eval (its Hugging Face model configs): temperature 0.7, top_p 1.0, max_new_tokens 2048.
A temperature of 0 means greedy decoding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megaseg.config._checks import check_choice, check_non_negative, check_positive

BENCHMARKS = ("mt_bench", "arena_hard", "alpaca_eval")
# What `megaseg generate` does with a prompt longer than its limit: leave it out of the answer file (reported in
# the summary and on stderr), or stop with an error naming it.
OVERLONG_GENERATION_PROMPTS = ("skip", "refuse")
COMPARE_TIES = ("half", "loss")


@dataclass(frozen=True)
class GenerateConfig:
    bench: Optional[str] = None
    # The answer files' model_id / generator (default: the checkpoint directory's name).
    model_id: Optional[str] = None
    # None: the benchmark's default (module docstring).
    max_new_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: float = 1.0
    top_k: int = 0
    # Prompts per sampler call, per data-parallel rank.
    micro_batch_size: int = 8
    # Longest rendered prompt in tokens (the second MT-Bench turn's includes the first exchange); None: whatever
    # fits the model, model.max_position_embeddings - max_new_tokens.
    max_prompt_length: Optional[int] = None
    overlong_prompt: str = "skip"
    # Answer only the first N prompts of the file (None: all).
    max_prompts: Optional[int] = None
    backend: str = "kv_cache"

    def __post_init__(self) -> None:
        if self.bench is not None:
            check_choice("generate.bench", self.bench, BENCHMARKS)
        check_positive("generate.max_new_tokens", self.max_new_tokens, allow_none=True)
        check_non_negative("generate.temperature", self.temperature, allow_none=True)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"generate.top_p={self.top_p!r} must lie in (0, 1]")
        check_non_negative("generate.top_k", self.top_k)
        check_positive("generate.micro_batch_size", self.micro_batch_size)
        check_positive("generate.max_prompt_length", self.max_prompt_length, allow_none=True)
        check_choice("generate.overlong_prompt", self.overlong_prompt, OVERLONG_GENERATION_PROMPTS)
        check_positive("generate.max_prompts", self.max_prompts, allow_none=True)
        check_choice("generate.backend", self.backend, ("kv_cache", "full_forward"))


@dataclass(frozen=True)
class CompareConfig:
    # Bootstrap resamples of the questions for the 95% intervals (seeded by the run's seed).
    num_bootstrap: int = 1000
    # An exact tie of e(x, y): half a win (AlpacaEval's convention) or a loss.
    ties: str = "half"

    def __post_init__(self) -> None:
        check_positive("compare.num_bootstrap", self.num_bootstrap)
        check_choice("compare.ties", self.ties, COMPARE_TIES)
