"""Hypothesis strategies for the kernel tests: right-padded response batches with their segment ends (entropy
segmentation with all-high, all-low or mixed entropies, EOS present or absent) and logits blocks."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from megaseg.algorithms.segmentation import segment_ends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class ResponseBatch:
    response_mask: torch.Tensor  # [batch, seq] bool, one run per row
    eos_mask: torch.Tensor  # [batch, seq] bool
    ends: torch.Tensor  # [batch, seq] bool segment ends (entropy segmentation)
    values: torch.Tensor  # [batch, seq] float64, NaN off the segment ends


@st.composite
def response_batches(draw, max_batch: int = 4, max_seq: int = 40, long_rows: bool = True) -> ResponseBatch:
    batch = draw(st.integers(1, max_batch))
    # Now and then a long row (up to 2k), so a program walks many blocks; otherwise short rows.
    seq = draw(st.sampled_from([max_seq, 2048])) if long_rows and draw(st.integers(0, 7)) == 0 else draw(
        st.integers(1, max_seq))
    response = torch.zeros(batch, seq, dtype=torch.bool)
    eos = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(batch):
        prompt = draw(st.integers(0, seq - 1))
        length = draw(st.integers(1, seq - prompt))
        response[b, prompt:prompt + length] = True
        eos[b, prompt + length - 1] = draw(st.booleans())
    style = draw(st.sampled_from(["mixed", "all_high", "all_low"]))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    if style == "mixed":
        entropy = torch.rand(batch, seq, generator=generator) * 4
    else:
        entropy = torch.full((batch, seq), 9.0 if style == "all_high" else 0.0)
    ends = segment_ends("entropy", response, eos, entropy=entropy, cutoff=2.0)
    values = torch.randn(batch, seq, generator=generator, dtype=torch.float64) * draw(st.sampled_from([1.0, 100.0]))
    if draw(st.booleans()):  # ties, for min's shared gradient
        values = values.round()
    values = torch.where(ends, values, torch.full_like(values, float("nan")))
    return ResponseBatch(response.to(DEVICE), eos.to(DEVICE), ends.to(DEVICE), values.to(DEVICE))


@st.composite
def logits_blocks(draw, max_rows: int = 6, max_vocab: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits ``[rows, vocab]`` fp32, tokens ``[rows]``): wide, extreme or peaked rows, some -inf entries."""
    rows = draw(st.integers(1, max_rows))
    vocab = draw(st.integers(2, max_vocab))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.01, 1.0, 8.0, 1e3]))
    logits = torch.randn(rows, vocab, generator=generator) * scale
    if draw(st.booleans()):  # one near-deterministic row (entropy ~ 0) and one uniform row (entropy log V)
        logits[0] = -1e4
        logits[0, draw(st.integers(0, vocab - 1))] = 1e4
        logits[-1] = 3.0
    tokens = torch.randint(0, vocab, (rows,), generator=generator)
    if draw(st.booleans()) and vocab > 2:  # masked entries, never the target
        masked = torch.rand(rows, vocab, generator=generator) < 0.2
        masked[torch.arange(rows), tokens] = False
        logits = logits.masked_fill(masked, float("-inf"))
    return logits.to(DEVICE), tokens.to(DEVICE)
