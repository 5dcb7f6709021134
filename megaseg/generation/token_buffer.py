"""The token buffer of a generation: every row's prompt from column 0, its response right after, pad after that.

Why rows start at column 0 although ``PromptBatch`` arrives left-padded: megatron's GPTModel applies RoPE by
column (0..seq-1), not by ``position_ids``, and its static KV cache appends every row at the same column. With
left padding a row's tokens would sit at shifted columns behind pad tokens that a key-padding mask must hide; the
fused softmax and TransformerEngine attention with a causal mask type ignore such a mask on GPU, so a padded row
would silently attend to padding there. Starting every row at column 0 needs only the causal mask, which every
attention backend applies, gives each token its true rotary position, and is already the right-padded layout of
``SequenceBatch``. The cost (megatron's legacy static generation pays it too): rows with longer prompts are fed
their remaining prompt tokens one decode step at a time while shorter rows already generate.

That cost is large for prompts of mixed lengths (8 MT-Bench prompts of 52-87 tokens: 35 extra decode steps before
the first response token of the longest row, 67 forwards for 32 new tokens instead of 33). So where the attention
kernel honours an explicit mask (megaseg's ``SDPAttention``, the local spec's attention), the buffer instead aligns
the prompts' ENDS (``align_prompt_ends=True``): row i's prompt occupies columns ``[start_i, P)`` with ``P`` the
longest prompt, one prefill forward covers every prompt, and every row samples from column ``P`` on. The sampler then
passes a mask hiding the ``start_i`` leading pad keys of each row, and per-row positions ``column - start_i``. RoPE
scores depend on ``query column - key column`` only, which the shift leaves unchanged, so a row computes the same
function as at column 0 (equal up to float rounding of the rotary angles). The output is moved back to column 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megaseg.data.batch import PromptBatch


def _prompt_lengths(prompts: PromptBatch, width: int) -> torch.Tensor:
    """``[B]`` prompt lengths; ValueError for an empty prompt, a row that is not left-padded the way
    ``collate_prompts`` pads, or a prompt longer than ``width``."""
    mask = prompts.attention_mask.bool()
    num_rows, prompt_width = mask.shape
    lengths = mask.sum(dim=1)
    columns = torch.arange(prompt_width, device=mask.device)
    left_padded = columns[None, :] >= (prompt_width - lengths)[:, None]
    if not torch.equal(mask, left_padded):
        bad = [prompts.prompt_ids[i] for i in torch.nonzero((mask != left_padded).any(dim=1)).flatten().tolist()]
        raise ValueError(f"prompts {bad[:5]} are not left-padded (padding first, then one run of prompt tokens); "
                         "build the batch with megaseg.data.batch.collate_prompts")
    empty = torch.nonzero(lengths == 0).flatten().tolist()
    if empty:
        raise ValueError(f"prompts {[prompts.prompt_ids[i] for i in empty][:5]} are empty; a response needs at least "
                         "one prompt token to condition on (drop empty prompts before generation)")
    if width < int(lengths.max()):
        raise ValueError(f"buffer width {width} is shorter than the longest prompt ({int(lengths.max())} tokens)")
    return lengths


def right_aligned_prompts(prompts: PromptBatch, width: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens ``[B, width]`` long with row i's prompt in columns ``[0, L_i)`` and pad after, lengths ``[B]``).

    ValueError for an empty prompt or a row that is not left-padded the way ``collate_prompts`` pads.
    """
    lengths = _prompt_lengths(prompts, width)
    mask = prompts.attention_mask.bool()
    num_rows, prompt_width = mask.shape
    columns = torch.arange(prompt_width, device=mask.device)
    # Row i's token j sits at column (prompt_width - L_i) + j of the left-padded input.
    source = (columns[None, :] + (prompt_width - lengths)[:, None]).clamp(max=prompt_width - 1)
    shifted = prompts.input_ids.gather(1, source)
    tokens = torch.full((num_rows, width), pad_token_id, dtype=torch.long, device=mask.device)
    tokens[:, :prompt_width] = torch.where(columns[None, :] < lengths[:, None], shifted, pad_token_id)
    return tokens, lengths


def end_aligned_prompts(prompts: PromptBatch, width: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens ``[B, width]`` long with row i's prompt in columns ``[P - L_i, P)``, P the longest prompt, and pad
    elsewhere, lengths ``[B]``): the left-padded prompts without the columns that are padding on every row."""
    lengths = _prompt_lengths(prompts, width)
    longest = int(lengths.max())
    tokens = torch.full((lengths.shape[0], width), pad_token_id, dtype=torch.long, device=lengths.device)
    tokens[:, :longest] = prompts.input_ids[:, prompts.input_ids.shape[1] - longest:]
    return tokens, lengths


@dataclass
class TokenBuffer:
    """Mutable decoding state; every rank of a model-parallel group holds an identical copy.

    ``record`` is called once per column, in order, with the token each row would take there.
    """

    tokens: torch.Tensor            # [B, W] long: pad (start_columns of it), prompt, response, pad
    start_columns: torch.Tensor     # [B] long, the column of each row's first prompt token
    prompt_lengths: torch.Tensor    # [B] long
    response_lengths: torch.Tensor  # [B] long, tokens generated so far (the stop token included)
    stopped_mask: torch.Tensor      # [B] bool, the row sampled one of the stop tokens (its last response token)
    done_mask: torch.Tensor         # [B] bool, stopped or reached max_new_tokens
    stop_token_ids: torch.Tensor    # [num_stop] long
    max_new_tokens: int

    @classmethod
    def from_prompts(cls, prompts: PromptBatch, max_new_tokens: int, stop_token_ids: tuple[int, ...],
                     pad_token_id: int, align_prompt_ends: bool = False) -> "TokenBuffer":
        """Prompts from column 0, or (``align_prompt_ends``) ending together at the longest prompt's length."""
        longest = int(prompts.attention_mask.sum(dim=1).max()) if prompts.attention_mask.numel() else 0
        layout = end_aligned_prompts if align_prompt_ends else right_aligned_prompts
        tokens, lengths = layout(prompts, longest + max_new_tokens, pad_token_id)
        num_rows = tokens.shape[0]
        device = tokens.device
        starts = longest - lengths if align_prompt_ends else torch.zeros_like(lengths)
        return cls(tokens=tokens, start_columns=starts, prompt_lengths=lengths,
                   response_lengths=torch.zeros(num_rows, dtype=torch.long, device=device),
                   stopped_mask=torch.zeros(num_rows, dtype=torch.bool, device=device),
                   done_mask=torch.zeros(num_rows, dtype=torch.bool, device=device),
                   stop_token_ids=torch.tensor(stop_token_ids, dtype=torch.long, device=device),
                   max_new_tokens=max_new_tokens)

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    @property
    def response_columns(self) -> torch.Tensor:
        """[B] long: the column of each row's first response token."""
        return self.start_columns + self.prompt_lengths

    def first_column_to_predict(self) -> int:
        """The first column some row samples: every column before it is prompt (or leading pad) on every row, so
        one forward (the prefill) covers them all."""
        return int(self.response_columns.min())

    def leading_pad_mask(self, num_columns: int) -> Optional[torch.Tensor]:
        """``[B, num_columns]`` bool, True on the pad before a row's prompt (keys attention must skip); None when no
        row has any (prompts from column 0, or all of one length)."""
        if not bool(self.start_columns.any()):
            return None
        columns = torch.arange(num_columns, device=self.tokens.device)
        return columns[None, :] < self.start_columns[:, None]

    def positions(self, start_column: int, num_columns: int) -> torch.Tensor:
        """``[B, num_columns]`` long: each row's token positions (column - start_i; 0 on leading pad)."""
        columns = torch.arange(start_column, start_column + num_columns, device=self.tokens.device)
        return (columns[None, :] - self.start_columns[:, None]).clamp(min=0)

    def tokens_from_column_zero(self, pad_token_id: int) -> torch.Tensor:
        """``[B, W]`` the tokens with each row moved left by its ``start_columns`` and pad after: the layout of
        ``SequenceBatch``."""
        if not bool(self.start_columns.any()):
            return self.tokens
        columns = torch.arange(self.width, device=self.tokens.device)
        source = columns[None, :] + self.start_columns[:, None]
        moved = self.tokens.gather(1, source.clamp(max=self.width - 1))
        return moved.masked_fill(source >= self.width, pad_token_id)

    def all_done(self) -> bool:
        return bool(self.done_mask.all())

    def generating_mask(self, column: int) -> torch.Tensor:
        """[B] bool: rows whose token at ``column`` is sampled (past their prompt and not finished)."""
        return (column >= self.response_columns) & ~self.done_mask

    def record(self, column: int, next_tokens: torch.Tensor) -> None:
        """Write ``next_tokens`` [B] at ``column`` for the generating rows; prompt rows keep their prompt token and
        finished rows their pad, whatever was sampled for them."""
        generating = self.generating_mask(column)
        self.tokens[:, column] = torch.where(generating, next_tokens, self.tokens[:, column])
        hit_stop = generating & torch.isin(next_tokens, self.stop_token_ids)
        self.response_lengths += generating.long()
        self.stopped_mask |= hit_stop
        self.done_mask |= hit_stop | (self.response_lengths >= self.max_new_tokens)
