"""How responses are cut into segments (the action definition of the paper's Table 1/4 and Fig. 3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megaseg.config._checks import check_choice, check_non_negative, check_positive

SEGMENTATION_MODES = ("entropy", "bandit", "token", "sentence", "ngram")


@dataclass(frozen=True)
class SegmentationConfig:
    mode: str = "entropy"
    # c_ent of the paper: 1.75 for Phi-3, 2.0 for Llama-3; model-specific.
    entropy_cutoff: float = 2.0
    ngram_size: int = 5
    # Positions per chunk when computing entropies, so memory stays at [chunk, vocab] instead of [batch, seq, vocab].
    entropy_chunk_size: Optional[int] = 1024
    cache_dir: str = "cache/segments"
    micro_batch_size: int = 4

    def __post_init__(self) -> None:
        check_choice("segmentation.mode", self.mode, SEGMENTATION_MODES)
        check_non_negative("segmentation.entropy_cutoff", self.entropy_cutoff)
        check_positive("segmentation.ngram_size", self.ngram_size)
        check_positive("segmentation.entropy_chunk_size", self.entropy_chunk_size, allow_none=True)
        check_positive("segmentation.micro_batch_size", self.micro_batch_size)
