"""Where preference pairs and prompts come from, and how they are cut to length."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megaseg.config._checks import check_choice, check_positive, check_range

PREFERENCE_FORMATS = ("auto", "conversational", "flat")
PROMPT_FORMATS = ("auto", "ultrafeedback", "mt_bench", "arena_hard")
OVERLONG_PROMPT_POLICIES = ("truncate", "reject")
# Names a data file shipped inside the megaseg package (megaseg.data.resources), e.g. shipped:hh_rlhf_harmless/pairs.jsonl.
SHIPPED_PREFIX = "shipped:"


@dataclass(frozen=True)
class DataConfig:
    train_path: Optional[str] = None
    eval_path: Optional[str] = None
    format: str = "auto"
    prompt_path: Optional[str] = None
    eval_prompt_path: Optional[str] = None
    prompt_format: str = "auto"
    # Paths may be local files / datasets directories, or `shipped:<file>` for data shipped with megaseg
    # (e.g. shipped:hh_rlhf_harmless/pairs.jsonl).
    # The paper's truncation: prompt left-truncated to max_prompt_length, response right-truncated to max_length.
    max_length: int = 2048
    max_prompt_length: int = 1792
    # A rendered prompt longer than max_prompt_length: "truncate" keeps its last tokens (the paper), "reject" makes
    # the record invalid (an error naming file:line, or skipped and counted with skip_invalid).
    overlong_prompt: str = "truncate"
    max_samples: Optional[int] = None
    eval_max_samples: Optional[int] = None
    # When no eval_path is given, this fraction of train_path is held out.
    eval_fraction: float = 0.0
    skip_invalid: bool = False
    shuffle: bool = True
    # Sequence packing (megaseg.models.packing): the forwards over variable-length rows (reward-model training,
    # scoring and validation, the entropy pass, DPO, the PPO experience forwards and updates) run the real tokens of
    # a micro-batch back to back in one row, each sequence attending to itself only, instead of right-padding every
    # row to the longest. Same outputs to float tolerance; off runs the padded path.
    packing: bool = True

    def __post_init__(self) -> None:
        check_choice("data.format", self.format, PREFERENCE_FORMATS)
        check_choice("data.prompt_format", self.prompt_format, PROMPT_FORMATS)
        check_choice("data.overlong_prompt", self.overlong_prompt, OVERLONG_PROMPT_POLICIES)
        check_positive("data.max_length", self.max_length)
        check_positive("data.max_prompt_length", self.max_prompt_length)
        check_positive("data.max_samples", self.max_samples, allow_none=True)
        check_positive("data.eval_max_samples", self.eval_max_samples, allow_none=True)
        check_range("data.eval_fraction", self.eval_fraction, 0.0, 0.9)
        if self.eval_path is not None and self.eval_fraction > 0:
            raise ValueError(
                f"data.eval_path={self.eval_path!r} and data.eval_fraction={self.eval_fraction} both choose the eval "
                "set; set data.eval_fraction=0 to use the file, or drop data.eval_path to hold out a fraction")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"data.max_prompt_length={self.max_prompt_length} must be < data.max_length={self.max_length} "
                "(the response needs room)")
