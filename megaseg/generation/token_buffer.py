"""The token buffer of a generation: every row's prompt from column 0, its response right after, pad after that.

Why rows start at column 0 although ``PromptBatch`` arrives left-padded: megatron's GPTModel applies RoPE by
column (0..seq-1), not by ``position_ids``, and its static KV cache appends every row at the same column. With
left padding a row's tokens would sit at shifted columns behind pad tokens that a key-padding mask must hide; the
fused softmax and TransformerEngine attention with a causal mask type ignore such a mask on GPU, so a padded row
would silently attend to padding there. Starting every row at column 0 needs only the causal mask, which every
attention backend applies, gives each token its true rotary position, and is already the right-padded layout of
``SequenceBatch``. The cost (megatron's legacy static generation pays it too): rows with longer prompts are fed
their remaining prompt tokens one decode step at a time while shorter rows already generate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megaseg.data.batch import PromptBatch


def right_aligned_prompts(prompts: PromptBatch, width: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens ``[B, width]`` long with row i's prompt in columns ``[0, L_i)`` and pad after, lengths ``[B]``).

    ValueError for an empty prompt or a row that is not left-padded the way ``collate_prompts`` pads.
    """
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
    # Row i's token j sits at column (prompt_width - L_i) + j of the left-padded input.
    source = (columns[None, :] + (prompt_width - lengths)[:, None]).clamp(max=prompt_width - 1)
    shifted = prompts.input_ids.gather(1, source)
    tokens = torch.full((num_rows, width), pad_token_id, dtype=torch.long, device=mask.device)
    tokens[:, :prompt_width] = torch.where(columns[None, :] < lengths[:, None], shifted, pad_token_id)
    return tokens, lengths


@dataclass
class TokenBuffer:
    """Mutable decoding state; every rank of a model-parallel group holds an identical copy.

    ``record`` is called once per column, in order, with the token each row would take there.
    """

    tokens: torch.Tensor            # [B, W] long: prompt, then response, then pad
    prompt_lengths: torch.Tensor    # [B] long
    response_lengths: torch.Tensor  # [B] long, tokens generated so far (the stop token included)
    stopped_mask: torch.Tensor      # [B] bool, the row sampled one of the stop tokens (its last response token)
    done_mask: torch.Tensor         # [B] bool, stopped or reached max_new_tokens
    stop_token_ids: torch.Tensor    # [num_stop] long
    max_new_tokens: int

    @classmethod
    def from_prompts(cls, prompts: PromptBatch, max_new_tokens: int, stop_token_ids: tuple[int, ...],
                     pad_token_id: int) -> "TokenBuffer":
        longest = int(prompts.attention_mask.sum(dim=1).max()) if prompts.attention_mask.numel() else 0
        tokens, lengths = right_aligned_prompts(prompts, longest + max_new_tokens, pad_token_id)
        num_rows = tokens.shape[0]
        device = tokens.device
        return cls(tokens=tokens, prompt_lengths=lengths,
                   response_lengths=torch.zeros(num_rows, dtype=torch.long, device=device),
                   stopped_mask=torch.zeros(num_rows, dtype=torch.bool, device=device),
                   done_mask=torch.zeros(num_rows, dtype=torch.bool, device=device),
                   stop_token_ids=torch.tensor(stop_token_ids, dtype=torch.long, device=device),
                   max_new_tokens=max_new_tokens)

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def first_column_to_predict(self) -> int:
        """The shortest prompt's length: every column before it is prompt on every row (the prefill)."""
        return int(self.prompt_lengths.min())

    def all_done(self) -> bool:
        return bool(self.done_mask.all())

    def generating_mask(self, column: int) -> torch.Tensor:
        """[B] bool: rows whose token at ``column`` is sampled (past their prompt and not finished)."""
        return (column >= self.prompt_lengths) & ~self.done_mask

    def record(self, column: int, next_tokens: torch.Tensor) -> None:
        """Write ``next_tokens`` [B] at ``column`` for the generating rows; prompt rows keep their prompt token and
        finished rows their pad, whatever was sampled for them."""
        generating = self.generating_mask(column)
        self.tokens[:, column] = torch.where(generating, next_tokens, self.tokens[:, column])
        hit_stop = generating & torch.isin(next_tokens, self.stop_token_ids)
        self.response_lengths += generating.long()
        self.stopped_mask |= hit_stop
        self.done_mask |= hit_stop | (self.response_lengths >= self.max_new_tokens)
