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
    # None: <logging.out_dir>/cache/segments (made absolute when the config is loaded), never the working directory.
    cache_dir: Optional[str] = None
    micro_batch_size: int = 4
    # Preference pairs per cache shard: the unit of resumption after a kill and of data-parallel work sharing.
    shard_size: int = 256
    # Read by `megaseg segment` only: pick the c_ent whose mean segment length (tokens) on the data is closest to
    # this, print it with a sweep of cutoffs, and segment with it. Training reads entropy_cutoff, never this.
    target_mean_segment_length: Optional[float] = None

    def __post_init__(self) -> None:
        check_choice("segmentation.mode", self.mode, SEGMENTATION_MODES)
        check_non_negative("segmentation.entropy_cutoff", self.entropy_cutoff)
        check_positive("segmentation.ngram_size", self.ngram_size)
        check_positive("segmentation.entropy_chunk_size", self.entropy_chunk_size, allow_none=True)
        check_positive("segmentation.micro_batch_size", self.micro_batch_size)
        check_positive("segmentation.shard_size", self.shard_size)
        if self.target_mean_segment_length is not None and self.target_mean_segment_length < 1:
            raise ValueError(f"segmentation.target_mean_segment_length={self.target_mean_segment_length!r} must be "
                             ">= 1 token (or null)")
        if self.target_mean_segment_length is not None and self.mode != "entropy":
            raise ValueError(f"segmentation.target_mean_segment_length picks an entropy cutoff, but "
                             f"segmentation.mode={self.mode!r}; set segmentation.mode=entropy or drop the target")
