"""Choosing c_ent for a model from cached entropies: the mean segment length at any cutoff, and the cutoff for a target.

The cutoff is model-specific (SmolLM2-135M at c_ent = 2.0 cuts HH-RLHF answers into segments of a few tokens; Phi-3
at 1.75 into 10-22 tokens). Entropy segmentation (docs/method.md) makes every response's last content
token an end and adds one end per other content token whose entropy exceeds c_ent; a response made of EOS alone is
one segment of one token. Hence, over a set of N responses with C content tokens in total,

    segments(c) = N + #{non-final content tokens with entropy > c},    mean segment length(c) = C / segments(c),

which is monotone in c and computed for any number of cutoffs with one sort and a binary search. ``megaseg segment``
uses it when ``segmentation.target_mean_segment_length`` is set.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# The cutoffs of the paper's Fig. 3, printed next to any pick for comparison.
PAPER_CUTOFFS = (1.5, 1.75, 2.0, 2.25)


@dataclass(frozen=True)
class CutoffTable:
    """What the segment count depends on: sorted candidate entropies, the responses and their content tokens."""

    candidates: np.ndarray  # [K] float32 ascending: entropies of non-final content tokens
    num_responses: int
    num_covered_tokens: int  # tokens inside segments over all responses

    def num_segments(self, cutoffs: np.ndarray) -> np.ndarray:
        above = len(self.candidates) - np.searchsorted(self.candidates, cutoffs, side="right")
        return self.num_responses + above

    def mean_segment_length(self, cutoffs: Sequence[float] | np.ndarray) -> np.ndarray:
        # float32 like the cached entropies, so the comparisons match the cut itself bit for bit.
        return self.num_covered_tokens / self.num_segments(np.asarray(cutoffs, dtype=np.float32))

    def segments_per_response(self, cutoffs: Sequence[float] | np.ndarray) -> np.ndarray:
        return self.num_segments(np.asarray(cutoffs, dtype=np.float32)) / self.num_responses


def cutoff_table(response_entropies: Sequence[np.ndarray], ends_with_eos: Sequence[bool]) -> CutoffTable:
    """From each response's entropies (one per response token, EOS included when present) and its EOS flag."""
    if not response_entropies:
        raise ValueError("no responses to choose an entropy cutoff from")
    candidates, covered = [], 0
    for entropies, has_eos in zip(response_entropies, ends_with_eos):
        num_content = len(entropies) - int(bool(has_eos))
        if num_content <= 0:
            covered += 1  # EOS alone: one segment ending on it
            continue
        covered += num_content
        candidates.append(np.asarray(entropies[:num_content - 1], dtype=np.float32))
    values = np.sort(np.concatenate(candidates)) if candidates else np.zeros(0, np.float32)
    return CutoffTable(candidates=values, num_responses=len(response_entropies), num_covered_tokens=covered)


@dataclass(frozen=True)
class CutoffChoice:
    target_mean_segment_length: float
    entropy_cutoff: float
    mean_segment_length: float
    segments_per_response: float


def pick_cutoff(table: CutoffTable, target_mean_segment_length: float, decimals: int = 3) -> CutoffChoice:
    """The cutoff (rounded to ``decimals``) whose mean segment length is closest to the target.

    With k boundaries wanted, a cutoff between the k-th and (k+1)-th largest candidate gives exactly k; of the
    cutoffs on a ``10**-decimals`` grid, the one closest to the target is returned.
    """
    if target_mean_segment_length < 1:
        raise ValueError(f"target mean segment length {target_mean_segment_length} must be >= 1 token")
    if len(table.candidates) == 0:
        raise ValueError("every response has a single content token, so no cutoff changes the segmentation")
    step = 10.0 ** -decimals
    low = max(0.0, np.floor(float(table.candidates[0]) / step) * step - step)
    high = np.ceil(float(table.candidates[-1]) / step) * step + step
    grid = np.round(np.arange(low, high + step / 2, step), decimals)
    lengths = table.mean_segment_length(grid)
    best = int(np.argmin(np.abs(lengths - target_mean_segment_length)))
    cutoff = float(grid[best])
    return CutoffChoice(target_mean_segment_length=float(target_mean_segment_length), entropy_cutoff=cutoff,
                        mean_segment_length=float(lengths[best]),
                        segments_per_response=float(table.segments_per_response([cutoff])[0]))


def cutoff_sweep(table: CutoffTable, cutoffs: Sequence[float] = PAPER_CUTOFFS) -> list[dict[str, float]]:
    """Mean segment length and segments per response at each cutoff (the paper's Fig. 3a axis)."""
    lengths = table.mean_segment_length(cutoffs)
    per_response = table.segments_per_response(cutoffs)
    return [{"entropy_cutoff": float(c), "mean_segment_length": float(length), "segments_per_response": float(n)}
            for c, length, n in zip(cutoffs, lengths, per_response)]
