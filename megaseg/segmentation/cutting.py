"""Encoded sequences (+ cached entropies or token texts) -> segment end positions, through megaseg.algorithms.

The boundary rules themselves live in ``megaseg.algorithms.segmentation`` (tested against per-sequence loops); this
module only lays a group of sequences out as the right-padded ``[rows, seq]`` masks those functions take and reads
the end positions back, so the cache and a trainer's batch can never disagree about a convention.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

from megaseg.algorithms.segmentation import SEGMENTATION_MODES, segment_ends
from megaseg.data.batch import collate_sequences
from megaseg.data.encoding import TokenizedSequence

# Padding sits after every real token and is masked out of every rule, so any valid id does.
PAD_ID = 0
# How many preceding tokens are decoded with a token whose own text is an incomplete UTF-8 sequence (byte-level
# BPE splits a full-width mark such as "。" over up to 3 byte tokens; the last of them completes the character).
UTF8_WINDOW = 3
REPLACEMENT_CHARACTER = "\ufffd"


def response_token_texts(tokenizer: Any, response_ids: Sequence[int], cache: Optional[dict] = None) -> list[str]:
    """The text each response token ends with, for sentence segmentation.

    A token decoded alone gives its own text; when that is an incomplete UTF-8 sequence (the replacement character)
    the token is decoded together with up to ``UTF8_WINDOW`` tokens before it, so the text ends with the character it
    completes. ``cache`` (id -> text) may be shared across calls.
    """
    cache = {} if cache is None else cache
    texts = []
    for index, token_id in enumerate(response_ids):
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id])
        text = cache[token_id]
        if REPLACEMENT_CHARACTER in text:
            text = tokenizer.decode(list(response_ids[max(0, index - UTF8_WINDOW):index + 1]))
        texts.append(text)
    return texts


def _entropy_rows(sequences: Sequence[TokenizedSequence], entropies: Sequence[np.ndarray],
                  seq_length: int) -> torch.Tensor:
    table = torch.zeros(len(sequences), seq_length, dtype=torch.float32)
    for row, (sequence, values) in enumerate(zip(sequences, entropies)):
        start = len(sequence.prompt_ids)
        if len(values) != len(sequence.response_ids):
            raise ValueError(f"row {row}: {len(values)} cached entropies for a response of "
                             f"{len(sequence.response_ids)} tokens; the cache does not belong to these sequences")
        table[row, start:start + len(values)] = torch.from_numpy(np.asarray(values, dtype=np.float32))
    return table


def _text_rows(sequences: Sequence[TokenizedSequence], response_texts: Sequence[Sequence[str]],
               seq_length: int) -> list[list[str]]:
    rows = []
    for sequence, texts in zip(sequences, response_texts):
        prompt_length = len(sequence.prompt_ids)
        row = [""] * seq_length
        row[prompt_length:prompt_length + len(texts)] = list(texts)
        rows.append(row)
    return rows


def cut_sequences(sequences: Sequence[TokenizedSequence], mode: str, *,
                  response_entropies: Optional[Sequence[np.ndarray]] = None, cutoff: Optional[float] = None,
                  ngram_size: Optional[int] = None,
                  response_texts: Optional[Sequence[Sequence[str]]] = None) -> list[np.ndarray]:
    """Ascending int32 segment end positions (in prompt+response ids) of each sequence.

    Args:
        mode: one of ``SEGMENTATION_MODES``; entropy needs ``response_entropies`` (one fp32 value per response token,
            the entropy of the distribution predicting the next token) and ``cutoff``; ngram needs ``ngram_size``;
            sentence needs ``response_texts`` (``response_token_texts`` per sequence).
    """
    if mode not in SEGMENTATION_MODES:
        raise ValueError(f"segmentation mode {mode!r} is not one of {list(SEGMENTATION_MODES)}")
    if not sequences:
        return []
    batch = collate_sequences(sequences, PAD_ID)
    entropy = token_texts = None
    if mode == "entropy":
        if response_entropies is None or cutoff is None:
            raise ValueError("entropy segmentation needs the response entropies and a cutoff")
        entropy = _entropy_rows(sequences, response_entropies, batch.seq_length)
    if mode == "sentence":
        if response_texts is None:
            raise ValueError("sentence segmentation needs the decoded response token texts")
        token_texts = _text_rows(sequences, response_texts, batch.seq_length)
    ends = segment_ends(mode, batch.response_mask, batch.eos_mask, entropy=entropy, cutoff=cutoff, n=ngram_size,
                        token_texts=token_texts)
    rows, columns = ends.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=len(sequences)).tolist()
    return [part.numpy().astype(np.int32) for part in torch.split(columns, counts)]
