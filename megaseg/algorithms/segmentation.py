"""Split responses into segments: entropy (the method), bandit, token, n-gram and sentence baselines.

Every function takes right-padded ``[batch, seq]`` masks and returns ``ends``, a ``[batch, seq]`` bool mask that is True
on the last token of each segment. Conventions (docs/method.md):

- ``response_mask`` marks the response tokens (one contiguous run per row, never empty); ``eos_mask`` marks the EOS
  token, at most one per row and on the row's last response token. A row without EOS is a truncated response.
- Only response tokens end segments. The *content* tokens are the response tokens other than EOS.
- Bandit mode: one segment per response, ending on EOS (scored there) or on the last token of a truncated response.
- All other modes never score EOS: a boundary rule picks content tokens, and the final segment is forced to end on the
  last content token (EOS - 1, or the last token of a truncated response). A boundary that would have fallen on EOS is
  thereby moved to EOS - 1, and nothing is added when EOS - 1 already ends a segment. EOS then belongs to no segment.
- A response made of EOS alone has no content token to score. Rather than fail a PPO step on a policy that stopped
  immediately, its single segment ends on EOS (as in bandit mode), so every row has at least one segment (T >= 1).
  A row with no response token at all is a ValueError.

``segment_ids``, ``segment_positions``, ``segment_lengths`` and friends (re-exported from ``segments.py``) turn ``ends``
into per-token indices, locations p = (t + 1) / T and lengths; ``SegmentLayout`` computes those index products once for
a pipeline that needs several of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megaseg.algorithms.masking import any_true
from megaseg.algorithms.segments import (  # noqa: F401  (re-exported: part of this module's public API)
    SegmentLayout,
    broadcast_from_segment_end,
    num_segments,
    pack_segment_ends,
    segment_ids,
    segment_index_at_ends,
    segment_lengths,
    segment_positions,
)
from megaseg.algorithms.validation import (
    check_finite,
    check_masks,
    check_nonnegative_float,
    check_positive_int,
    check_shape,
)

SEGMENTATION_MODES = ("entropy", "bandit", "token", "sentence", "ngram")

# Token texts that end a sentence-level segment: ASCII and full-width sentence/clause punctuation and newline.
# "..." is listed for completeness; it is already covered by ".".
SENTENCE_END_MARKS = (".", "!", "?", "\n", ";", "...", ",", ":", "。", "！", "？", "；", "，", "：")


def last_response_token(response_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` bool: True on the last response token of each row (EOS if present)."""
    followed = torch.zeros_like(response_mask)
    followed[:, :-1] = response_mask[:, 1:]
    return response_mask & ~followed


def _content_ends(boundary: torch.Tensor, response_mask: torch.Tensor, eos_mask: torch.Tensor) -> torch.Tensor:
    """Common tail of the non-bandit modes.

    Keeps ``boundary`` on content tokens, forces an end on the last content token, and ends EOS-only rows on EOS.
    ``boundary`` is the mode's per-token rule and may be True anywhere; only content positions are read.
    """
    content = response_mask & ~eos_mask
    no_content = ~any_true(content, dim=1, keepdim=True)  # [batch, 1]
    # uint8 multiply for "and" with a per-row flag: a bool op with a broadcast operand is a scalar loop on CPU.
    eos_only = (eos_mask.view(torch.uint8) * no_content.view(torch.uint8)).view(torch.bool)
    ends = content & boundary
    ends |= last_response_token(content)
    ends |= eos_only
    return ends


def entropy_segment_ends(
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    eos_mask: torch.Tensor,
    cutoff: float,
    validate: bool = True,
) -> torch.Tensor:
    """Entropy segmentation (paper Sec. 2.2): content token j ends a segment iff ``entropy[j] > cutoff``.

    Args:
        entropy: ``[batch, seq]`` float; ``entropy[j]`` is the entropy of the distribution predicting token j + 1.
        response_mask, eos_mask: ``[batch, seq]`` bool (module docstring).
        cutoff: c_ent >= 0. The comparison is strict, so cutoff 0 still leaves out zero-entropy tokens; use
            ``token_segment_ends`` for token-level segments.

    Returns:
        ``[batch, seq]`` bool segment ends.
    """
    check_masks(response_mask, eos_mask, validate)
    check_shape("entropy", entropy, response_mask.shape, "response_mask")
    check_nonnegative_float("cutoff", cutoff)
    check_finite("entropy", entropy, where=response_mask & ~eos_mask, validate=validate)
    return _content_ends(entropy > cutoff, response_mask, eos_mask)


def bandit_segment_ends(response_mask: torch.Tensor, eos_mask: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """One segment per response, ending on its last token (EOS, or the last token of a truncated response)."""
    check_masks(response_mask, eos_mask, validate)
    return last_response_token(response_mask)


def token_segment_ends(response_mask: torch.Tensor, eos_mask: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """Token-level segments: every content token (response token but EOS) is its own segment."""
    check_masks(response_mask, eos_mask, validate)
    return _content_ends(torch.ones_like(response_mask), response_mask, eos_mask)


def ngram_segment_ends(
    response_mask: torch.Tensor, eos_mask: torch.Tensor, n: int, validate: bool = True
) -> torch.Tensor:
    """Fixed n-gram segments: every n consecutive content tokens form a segment; the last may be shorter."""
    check_masks(response_mask, eos_mask, validate)
    check_positive_int("n", n)
    content = response_mask & ~eos_mask
    # 1-based rank of each token among the content tokens of its row.
    rank = content.view(torch.uint8).cumsum(dim=1, dtype=torch.int32)
    return _content_ends(rank % n == 0, response_mask, eos_mask)


def _ends_sentence(text: str) -> bool:
    # Strip trailing spaces/tabs only: a token like ". " still ends a sentence, but "\n" is a mark, not padding.
    return text.rstrip(" \t").endswith(SENTENCE_END_MARKS)


def sentence_end_mask(
    token_texts: Sequence[Sequence[str]], shape: tuple[int, int], device: torch.device | str | None = None
) -> torch.Tensor:
    """``[batch, seq]`` bool: True where the decoded token text ends with one of ``SENTENCE_END_MARKS``.

    This is the only part of sentence segmentation that looks at strings (a Python loop over them is unavoidable);
    the data pipeline can compute it once per sample and cache it.

    Args:
        token_texts: ``batch`` lists of ``seq`` strings, the decoded text of each token (any string for prompt and
            padding positions, e.g. "").
        shape: ``(batch, seq)`` the texts must match.
    """
    batch, seq = shape
    if len(token_texts) != batch:
        raise ValueError(f"token_texts has {len(token_texts)} rows but the masks have batch size {batch}")
    bad = [(b, len(row)) for b, row in enumerate(token_texts) if len(row) != seq]
    if bad:
        raise ValueError(f"token_texts rows must each have seq={seq} entries; (row, length) mismatches: {bad[:8]}")
    flags = [[_ends_sentence(text) for text in row] for row in token_texts]
    return torch.tensor(flags, dtype=torch.bool, device=device).reshape(batch, seq)


def sentence_segment_ends(
    token_texts: Sequence[Sequence[str]] | torch.Tensor,
    response_mask: torch.Tensor,
    eos_mask: torch.Tensor,
    validate: bool = True,
) -> torch.Tensor:
    """Sentence-level segments: a content token ends a segment if its text ends with a sentence mark.

    Args:
        token_texts: decoded token texts aligned with ``[batch, seq]`` (see ``sentence_end_mask``), or a precomputed
            ``[batch, seq]`` bool mask from ``sentence_end_mask``.
    """
    check_masks(response_mask, eos_mask, validate)
    if isinstance(token_texts, torch.Tensor):
        marks = token_texts
        check_shape("token_texts mask", marks, response_mask.shape, "response_mask")
        if marks.dtype != torch.bool:
            raise ValueError(f"a precomputed sentence mark mask must be bool, got dtype {marks.dtype}")
    else:
        marks = sentence_end_mask(token_texts, tuple(response_mask.shape), device=response_mask.device)
    return _content_ends(marks, response_mask, eos_mask)


def segment_ends(
    mode: str,
    response_mask: torch.Tensor,
    eos_mask: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    cutoff: float | None = None,
    n: int | None = None,
    token_texts: Sequence[Sequence[str]] | torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Dispatch on a mode name from ``SEGMENTATION_MODES``; each mode requires its own inputs and no others are read.

    entropy: ``entropy`` and ``cutoff``; ngram: ``n``; sentence: ``token_texts``; bandit and token: nothing more.
    """
    if mode not in SEGMENTATION_MODES:
        raise ValueError(f"segmentation mode {mode!r} is not supported; choose one of {list(SEGMENTATION_MODES)}")
    needed = {
        "entropy": {"entropy": entropy, "cutoff": cutoff},
        "ngram": {"n": n},
        "sentence": {"token_texts": token_texts},
    }
    missing = [name for name, value in needed.get(mode, {}).items() if value is None]
    if missing:
        raise ValueError(f"segmentation mode {mode!r} needs {missing}")
    if mode == "entropy":
        return entropy_segment_ends(entropy, response_mask, eos_mask, cutoff, validate)
    if mode == "ngram":
        return ngram_segment_ends(response_mask, eos_mask, n, validate)
    if mode == "sentence":
        return sentence_segment_ends(token_texts, response_mask, eos_mask, validate)
    if mode == "token":
        return token_segment_ends(response_mask, eos_mask, validate)
    return bandit_segment_ends(response_mask, eos_mask, validate)
