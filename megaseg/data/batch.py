"""Typed batches of token ids: right-padded prompt+response sequences, preference pairs, left-padded prompts.

Padding sides:
- SequenceBatch (training, scoring) is RIGHT-padded: every row starts at column 0, so position j of a row is token j
  of its sequence, and "logits at j predict token j+1" holds without per-row offsets.
- PromptBatch (generation) is LEFT-padded: every row's last prompt token sits in the last column, so all rows
  append their next token in the same column, step after step (the convention of HF generate and megatron
  inference). Position ids count from each row's first real token, so padding does not shift rotary positions.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megaseg.data.encoding import TokenizedPair, TokenizedPrompt, TokenizedSequence


@dataclass(frozen=True)
class SequenceBatch:
    input_ids: torch.Tensor       # [B, S] long, prompt then response then pad_id
    attention_mask: torch.Tensor  # [B, S] bool, True on prompt and response tokens
    response_mask: torch.Tensor   # [B, S] bool, True on response tokens, EOS included
    eos_mask: torch.Tensor        # [B, S] bool, True on the EOS of rows whose response ends with one (its last token)
    position_ids: torch.Tensor    # [B, S] long, 0.. along each row's real tokens, 0 on padding

    def __post_init__(self) -> None:
        shape = self.input_ids.shape
        assert self.input_ids.dim() == 2, f"input_ids must be [batch, seq], got {tuple(shape)}"
        for name in ("attention_mask", "response_mask", "eos_mask", "position_ids"):
            assert getattr(self, name).shape == shape, f"{name} {tuple(getattr(self, name).shape)} != {tuple(shape)}"

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_length(self) -> int:
        return self.input_ids.shape[1]

    def prompt_lengths(self) -> torch.Tensor:
        """[B] long: tokens before the response."""
        return (self.attention_mask & ~self.response_mask).sum(dim=1)

    def response_lengths(self) -> torch.Tensor:
        """[B] long: response tokens, EOS included."""
        return self.response_mask.sum(dim=1)

    def select_rows(self, rows: slice) -> "SequenceBatch":
        return SequenceBatch(self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows],
                             self.eos_mask[rows], self.position_ids[rows])

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(*(tensor.to(device) for tensor in (self.input_ids, self.attention_mask,
                                                                  self.response_mask, self.eos_mask,
                                                                  self.position_ids)))


@dataclass(frozen=True)
class PreferenceBatch:
    """Chosen and rejected sequences in ONE batch, chosen rows first: row i and row num_pairs + i are pair i.

    One forward pass scores both answers (as the paper does); split the per-row outputs with `split_rows`.
    """

    sequences: SequenceBatch      # [2P, S]
    pair_ids: tuple[str, ...]     # [P]

    def __post_init__(self) -> None:
        assert self.sequences.batch_size == 2 * len(self.pair_ids), (
            f"{self.sequences.batch_size} rows for {len(self.pair_ids)} pairs")

    @property
    def num_pairs(self) -> int:
        return len(self.pair_ids)

    def split_rows(self, per_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[2P, ...] -> ([P, ...] chosen, [P, ...] rejected)."""
        if per_row.shape[0] != 2 * self.num_pairs:
            raise ValueError(f"expected {2 * self.num_pairs} rows (chosen then rejected), got {per_row.shape[0]}")
        return per_row[:self.num_pairs], per_row[self.num_pairs:]

    def chosen(self) -> SequenceBatch:
        return self.sequences.select_rows(slice(0, self.num_pairs))

    def rejected(self) -> SequenceBatch:
        return self.sequences.select_rows(slice(self.num_pairs, 2 * self.num_pairs))

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        return PreferenceBatch(self.sequences.to(device), self.pair_ids)


@dataclass(frozen=True)
class PromptBatch:
    input_ids: torch.Tensor       # [B, P] long, pad_id then prompt (left-padded)
    attention_mask: torch.Tensor  # [B, P] bool, True on prompt tokens
    position_ids: torch.Tensor    # [B, P] long, 0.. from each row's first prompt token, 0 on padding
    prompt_ids: tuple[str, ...]   # [B] the prompts' ids

    def __post_init__(self) -> None:
        shape = self.input_ids.shape
        assert self.input_ids.dim() == 2 and len(self.prompt_ids) == shape[0]
        assert self.attention_mask.shape == shape and self.position_ids.shape == shape

    def prompt_lengths(self) -> torch.Tensor:
        """[B] long."""
        return self.attention_mask.sum(dim=1)

    def to(self, device: torch.device | str) -> "PromptBatch":
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                           self.prompt_ids)


def _padded_length(longest: int, pad_to_multiple_of: int) -> int:
    if pad_to_multiple_of <= 0:
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} must be > 0")
    return -(-longest // pad_to_multiple_of) * pad_to_multiple_of


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return torch.where(attention_mask, attention_mask.long().cumsum(dim=1) - 1, 0)


def collate_sequences(sequences: Sequence[TokenizedSequence], pad_id: int,
                      pad_to_multiple_of: int = 1) -> SequenceBatch:
    """Right-pad prompt+response rows to the longest row (rounded up to pad_to_multiple_of, e.g. the TP size)."""
    if not sequences:
        raise ValueError("cannot collate an empty list of sequences")
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in sequences]
    seq_length = _padded_length(max(lengths), pad_to_multiple_of)
    input_ids = torch.full((len(sequences), seq_length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), seq_length), dtype=torch.bool)
    response_mask = torch.zeros_like(attention_mask)
    eos_mask = torch.zeros_like(attention_mask)
    for row, (sequence, length) in enumerate(zip(sequences, lengths)):
        prompt_length = len(sequence.prompt_ids)
        input_ids[row, :length] = torch.tensor(sequence.prompt_ids + sequence.response_ids, dtype=torch.long)
        attention_mask[row, :length] = True
        response_mask[row, prompt_length:length] = True
        if sequence.ends_with_eos:
            eos_mask[row, length - 1] = True
    return SequenceBatch(input_ids, attention_mask, response_mask, eos_mask, _positions(attention_mask))


def collate_pairs(tokenized_pairs: Sequence[TokenizedPair], pad_id: int,
                  pad_to_multiple_of: int = 1) -> PreferenceBatch:
    """All chosen rows, then all rejected rows, right-padded to one length."""
    if not tokenized_pairs:
        raise ValueError("cannot collate an empty list of pairs")
    rows = [pair.chosen for pair in tokenized_pairs] + [pair.rejected for pair in tokenized_pairs]
    return PreferenceBatch(collate_sequences(rows, pad_id, pad_to_multiple_of),
                           tuple(pair.id for pair in tokenized_pairs))


def collate_prompts(prompts: Sequence[TokenizedPrompt], pad_id: int, pad_to_multiple_of: int = 1) -> PromptBatch:
    """Left-pad prompts for generation (see the module docstring for why left)."""
    if not prompts:
        raise ValueError("cannot collate an empty list of prompts")
    width = _padded_length(max(len(p.prompt_ids) for p in prompts), pad_to_multiple_of)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        length = len(prompt.prompt_ids)
        if length:
            input_ids[row, width - length:] = torch.tensor(prompt.prompt_ids, dtype=torch.long)
            attention_mask[row, width - length:] = True
    return PromptBatch(input_ids, attention_mask, _positions(attention_mask), tuple(p.id for p in prompts))
