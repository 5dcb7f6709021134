"""Pick the next token of every row from full-vocabulary logits: greedy, temperature, top-k, top-p (nucleus).

Pure torch, batched over rows. The sampler hands these functions the FULL vocabulary: megatron's GPTModel gathers the
tensor-parallel logit shards itself whenever it runs with a KV cache (it asserts ``runtime_gather_output``), and the
gather is one position per row ([batch, vocab], tens of MB at most), not the [batch, seq, vocab] that scoring a
whole sequence would need. Nucleus filtering needs a sort over the whole vocabulary anyway.

Filtered-out tokens get logit -inf (probability exactly 0). Filters keep at least one token per row, so a row
always has something to sample.
"""
from __future__ import annotations

from typing import Optional

import torch

from megaseg.generation.settings import SamplingSettings


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [batch, vocab] with a non-empty vocabulary, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")


def keep_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """``[batch, vocab]`` logits with everything below each row's k-th largest logit set to -inf.

    Ties with the k-th largest value are all kept (HF's rule), so a row can keep more than k tokens only when
    logits tie exactly. ``top_k`` 0 or >= vocab returns the logits unchanged.
    """
    _check_logits(logits)
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def nucleus_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``[batch, vocab]`` bool: the smallest set of most likely tokens whose total probability reaches ``top_p``.

    A token is kept iff the probability of all strictly more likely tokens (in sorted order) is < top_p, so the
    most likely token is always kept and the kept mass is >= top_p. Computed in fp32 (the boundary is fuzzy at
    that precision; exact ties at the boundary are split by sort order).
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be [batch, vocab], got {tuple(probs.shape)}")
    sorted_probs, order = torch.sort(probs.float(), dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    # The first sorted token is kept whatever top_p is (mass_before is 0 there up to rounding).
    keep_sorted = mass_before < top_p
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def keep_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``[batch, vocab]`` logits outside each row's nucleus of mass ``top_p`` set to -inf; 1.0 returns them as is."""
    _check_logits(logits)
    if top_p >= 1.0:
        return logits
    keep = nucleus_mask(torch.softmax(logits.float(), dim=-1), top_p)
    return logits.masked_fill(~keep, float("-inf"))


def filtered_logits(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """fp32 ``[batch, vocab]`` logits after temperature, top-k and top-p: the distribution ``sample`` draws from."""
    _check_logits(logits)
    if settings.is_greedy:
        raise ValueError("filtered_logits is for sampling; greedy decoding (temperature 0 / greedy=True) takes argmax")
    scaled = logits.float() / settings.temperature
    return keep_top_p(keep_top_k(scaled, settings.top_k), settings.top_p)


def sample_next_tokens(logits: torch.Tensor, settings: SamplingSettings,
                       generator: Optional[torch.Generator]) -> torch.Tensor:
    """``[batch]`` long: the next token of each row.

    Greedy takes the first maximal index (torch.argmax's documented rule). Sampling draws from
    ``softmax(filtered_logits)`` with ``generator``, so a seeded generator gives the same tokens for the same logits.
    """
    _check_logits(logits)
    if settings.is_greedy:
        return logits.argmax(dim=-1)
    if generator is None:
        raise ValueError("sampling needs a torch.Generator (seeded by the caller) for reproducible rollouts; "
                         "pass generator=torch.Generator(device).manual_seed(seed)")
    probs = torch.softmax(filtered_logits(logits, settings), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
