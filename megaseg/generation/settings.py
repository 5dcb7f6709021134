"""How to sample a response: the knobs of one generate() call, checked once, with the paper's PPO values as source.

Kept apart from megaseg.config.PPOConfig because evaluation and tests generate with other settings (greedy decoding,
a handful of tokens) than the PPO rollouts, and because the stop tokens come from the chat template / tokenizer
(``ChatTemplateRenderer.stop_token_ids``), not from the PPO section.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from megaseg.config.policy import PPOConfig


@dataclass(frozen=True)
class SamplingSettings:
    """Decoding rule for every row of a batch.

    Order of the filters (as HF generate): logits / temperature -> keep the top_k largest -> keep the nucleus of
    mass top_p of what is left -> sample. ``temperature == 0`` or ``greedy=True`` means argmax (the filters are moot).
    """

    max_new_tokens: int
    # A row ends when it samples any of these (the model's stop tokens, e.g. Llama-3 <|eot_id|> and <|end_of_text|>).
    stop_token_ids: tuple[int, ...]
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 = no top-k filter.
    top_k: int = 0
    greedy: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer")
        stop_ids = tuple(self.stop_token_ids)
        if not stop_ids:
            raise ValueError(
                "stop_token_ids=() is empty: every response would run to max_new_tokens and none would end with a "
                "stop token; pass the model's stop tokens (model.eos_token_ids, or "
                "ChatTemplateRenderer.stop_token_ids)")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in stop_ids):
            raise ValueError(f"stop_token_ids={stop_ids!r} must be non-negative integer token ids")
        object.__setattr__(self, "stop_token_ids", stop_ids)
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 means greedy decoding)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must lie in (0, 1] (1 disables nucleus filtering)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be a non-negative integer (0 disables top-k filtering)")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0

    @classmethod
    def from_ppo_config(cls, ppo_cfg: PPOConfig, stop_token_ids: Sequence[int]) -> "SamplingSettings":
        """The rollout settings of a PPO run (paper: temperature 1, top-p 1) with the model's stop tokens."""
        return cls(max_new_tokens=ppo_cfg.max_new_tokens, stop_token_ids=tuple(int(i) for i in stop_token_ids),
                   temperature=ppo_cfg.temperature, top_p=ppo_cfg.top_p, top_k=ppo_cfg.top_k)
