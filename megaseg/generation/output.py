"""What a generate() call hands back: the rollouts as a right-padded SequenceBatch, ready for scoring.

Downstream phases (actor / reference log-probs, entropies, segmentation, reward-model scoring) consume
``GenerationOutput.sequences`` exactly like a collated preference batch: rows start at column 0, ``response_mask``
marks the sampled tokens, ``eos_mask`` the stop token of rows that produced one. A response cut at
``max_new_tokens`` has no EOS (method conventions: its final segment ends on its last token).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megaseg.data.batch import SequenceBatch
from megaseg.generation.token_buffer import TokenBuffer


@dataclass(frozen=True)
class GenerationOutput:
    sequences: SequenceBatch          # [B, S] prompt + response, right-padded with pad_token_id
    prompt_ids: tuple[str, ...]       # [B] the PromptBatch's prompt ids, same order
    prompt_lengths: torch.Tensor      # [B] long
    response_lengths: torch.Tensor    # [B] long, stop token included
    stopped_mask: torch.Tensor        # [B] bool, the response ends with a stop token (False: cut at max_new_tokens)

    def __post_init__(self) -> None:
        num_rows = self.sequences.batch_size
        assert len(self.prompt_ids) == num_rows
        for name in ("prompt_lengths", "response_lengths", "stopped_mask"):
            assert tuple(getattr(self, name).shape) == (num_rows,), f"{name} must be [{num_rows}]"

    @property
    def num_generated_tokens(self) -> int:
        return int(self.response_lengths.sum())

    def response_token_ids(self) -> list[list[int]]:
        """Each row's response as a python list (stop token included), for decoding to text."""
        rows = []
        for row, (start, length) in enumerate(zip(self.prompt_lengths.tolist(), self.response_lengths.tolist())):
            rows.append(self.sequences.input_ids[row, start:start + length].tolist())
        return rows


def build_output(buffer: TokenBuffer, prompt_ids: tuple[str, ...], pad_token_id: int,
                 pad_to_multiple_of: int = 1) -> GenerationOutput:
    """Cut the buffer to the longest finished row (rounded up to ``pad_to_multiple_of``) and derive the masks."""
    if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of!r} must be a positive integer")
    lengths = buffer.prompt_lengths + buffer.response_lengths
    longest = int(lengths.max())
    seq_length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    num_rows = buffer.tokens.shape[0]
    input_ids = torch.full((num_rows, seq_length), pad_token_id, dtype=torch.long, device=buffer.tokens.device)
    kept = min(seq_length, buffer.width)
    input_ids[:, :kept] = buffer.tokens_from_column_zero(pad_token_id)[:, :kept]
    columns = torch.arange(seq_length, device=input_ids.device)[None, :]
    attention_mask = columns < lengths[:, None]
    # Columns past a row's end hold pad already (the buffer starts as pad and only generating rows are written).
    response_mask = attention_mask & (columns >= buffer.prompt_lengths[:, None])
    eos_mask = (columns == (lengths - 1)[:, None]) & buffer.stopped_mask[:, None]
    position_ids = torch.where(attention_mask, columns.expand(num_rows, -1), 0)
    sequences = SequenceBatch(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                              eos_mask=eos_mask, position_ids=position_ids)
    return GenerationOutput(sequences=sequences, prompt_ids=tuple(prompt_ids),
                            prompt_lengths=buffer.prompt_lengths.clone(),
                            response_lengths=buffer.response_lengths.clone(),
                            stopped_mask=buffer.stopped_mask.clone())
