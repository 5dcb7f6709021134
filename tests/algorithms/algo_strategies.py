"""Hypothesis strategies for right-padded [batch, seq] response batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

# A small set of entropy values makes ties with the cutoffs (entropy == cutoff, must not split) common.
ENTROPY_VALUES = [0.0, 0.5, 1.0, 1.5, 1.75, 2.0, 3.0, 7.5]
CUTOFFS = [0.0, 0.5, 1.75, 2.0, 1000.0]


@dataclass
class Batch:
    response_mask: torch.Tensor  # [batch, seq] bool
    eos_mask: torch.Tensor  # [batch, seq] bool
    entropy: torch.Tensor  # [batch, seq] float32
    values: torch.Tensor  # [batch, seq] float64 (reward-head output)
    texts: list[list[str]]  # decoded token texts

    def row(self, b: int) -> tuple[list[bool], list[bool]]:
        return self.response_mask[b].tolist(), self.eos_mask[b].tolist()


TEXTS = ["Hello", " world", ".", " ok", "!", "\n", "?", ";", ",", ":", "...", "。", "，", " and", ". ", "a:", "x\t"]


@st.composite
def batches(draw, max_batch: int = 4, max_seq: int = 20) -> Batch:
    batch = draw(st.integers(1, max_batch))
    seq = draw(st.integers(1, max_seq))
    entropy_style = draw(st.sampled_from(["mixed", "all_high", "all_low"]))
    response, eos = [], []
    for _ in range(batch):
        prompt = draw(st.integers(0, seq - 1))
        length = draw(st.integers(1, seq - prompt))
        has_eos = draw(st.booleans())
        row = [prompt <= j < prompt + length for j in range(seq)]
        response.append(row)
        eos.append([has_eos and j == prompt + length - 1 for j in range(seq)])
    if entropy_style == "mixed":
        ent = draw(st.lists(st.sampled_from(ENTROPY_VALUES), min_size=batch * seq, max_size=batch * seq))
    else:
        ent = [9.0 if entropy_style == "all_high" else 0.0] * (batch * seq)
    values = draw(
        st.lists(st.floats(-5, 5, allow_nan=False, allow_infinity=False), min_size=batch * seq, max_size=batch * seq)
    )
    texts = draw(st.lists(st.lists(st.sampled_from(TEXTS), min_size=seq, max_size=seq), min_size=batch, max_size=batch))
    return Batch(
        response_mask=torch.tensor(response, dtype=torch.bool),
        eos_mask=torch.tensor(eos, dtype=torch.bool),
        entropy=torch.tensor(ent, dtype=torch.float32).view(batch, seq),
        values=torch.tensor(values, dtype=torch.float64).view(batch, seq),
        texts=texts,
    )
