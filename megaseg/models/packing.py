"""Sequence packing: the real tokens of a micro-batch's rows back to back in one ``[1, T]`` row, no padding computed.

megatron's THD format carries it through the model: ``PackedSeqParams(qkv_format="thd", cu_seqlens_q/kv,
max_seqlen_q/kv)`` goes from GPTModel / ScalarHeadModel through every layer to the core attention; megatron's
Attention squeezes the batch dimension and rotates each sequence's queries and keys from position 0 (RoPE by
``cu_seqlens``), and the core attention keeps every sequence to itself (TransformerEngine's on GPUs,
megaseg.models.attention.SDPAttention on the local spec). So a packed row gives, at every real token, the output the
sequence would get alone in a right-padded batch (to float tolerance).

Trainers keep their row layout: a micro-batch carries its ``[b, S]`` right-padded fields as before plus a
``packing: PackedRows``; megaseg.models.pipeline feeds the model the packed inputs and hands the loss / output
functions ``PackedRows.unpack(output)`` in the ``[b, S, ...]`` layout, so losses, entropies and segment code have one
path. Padding columns of the unpacked rows repeat the row's last real token's output (finite; nothing reads them).

Each micro-batch is packed to its own total, rounded up to ``PACKED_LENGTH_MULTIPLE`` (``packed_lengths``), except
under pipeline parallelism, which sends fixed-size activations ``[T, 1, hidden]`` between stages: then all
micro-batches of one schedule call are packed to one length ``T``, the largest. A tail of padding tokens forms one
extra sequence of its own in ``cu_seqlens`` (it attends only to itself; its outputs are never unpacked). Measured on
the rm_training benchmark's 8 HH-RLHF pairs (2 micro-batches): one common length ran 2528 tokens for 2268 real ones,
each its own length 2288.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams

# Packed lengths are rounded up to this, so fewer distinct shapes reach the kernels (and T divides by the TP size
# that sequence parallelism on GPUs needs).
PACKED_LENGTH_MULTIPLE = 16


@dataclass(frozen=True)
class PackedRows:
    """The packed model inputs of ``b`` right-padded rows and the way back to them."""

    input_ids: torch.Tensor                 # [1, T] long: row 0's tokens, row 1's, ..., then tail padding
    position_ids: torch.Tensor              # [1, T] long, 0.. from each sequence's first token (padding too)
    packed_seq_params: PackedSeqParams      # thd, cu_seqlens [num_sequences + 1] int32 (tail padding included)
    gather_index: torch.Tensor              # [b, S] long: packed position of row r's column s (clamped to its last)
    lengths: tuple[int, ...]                # [b] real tokens per row

    @property
    def packed_length(self) -> int:
        return self.input_ids.shape[1]

    def unpack(self, output: torch.Tensor) -> torch.Tensor:
        """The model's last-stage output ``[1, T, ...]`` (values, logits) -> ``[b, S, ...]`` in the rows' layout
        (differentiable: the gradient of each real position flows back to its packed position)."""
        if output.shape[0] != 1 or output.shape[1] != self.packed_length:
            raise ValueError(f"a packed output must be [1, {self.packed_length}, ...], got {tuple(output.shape)}")
        return output[0][self.gather_index]


def row_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Real tokens per row of a right-padded ``[b, S]`` bool mask; ValueError when a row is not right-padded
    (packing keeps only each row's prefix)."""
    lengths = attention_mask.long().sum(dim=1)
    prefix = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :] < lengths[:, None]
    if not torch.equal(prefix, attention_mask.bool()):
        raise ValueError("packing needs right-padded rows (real tokens first, then padding)")
    return lengths.tolist()


def packed_lengths(lengths_per_batch: Sequence[Sequence[int]], multiple: int = PACKED_LENGTH_MULTIPLE) -> list[int]:
    """The packed length of each micro-batch of one schedule call (its rows' real lengths given): its own total
    rounded up to ``multiple``, or under pipeline parallelism the largest of them for all (module docstring)."""
    totals = [-(-sum(lengths) // multiple) * multiple for lengths in lengths_per_batch]
    if pipeline_parallel():
        return [max(totals)] * len(totals)
    return totals


def pipeline_parallel() -> bool:
    """True when this process runs one of several pipeline stages (their sends need one micro-batch shape)."""
    from megatron.core import parallel_state

    return (parallel_state.model_parallel_is_initialized()
            and parallel_state.get_pipeline_model_parallel_world_size() > 1)


def pack_rows(input_ids: torch.Tensor, lengths: Sequence[int], packed_length: int, pad_id: int = 0) -> PackedRows:
    """Rows ``input_ids [b, S]`` (right-padded, row r's first ``lengths[r]`` tokens real) -> one packed row of
    ``packed_length`` tokens (>= the sum of the lengths)."""
    num_rows, seq_length = input_ids.shape
    if len(lengths) != num_rows or any(not 1 <= length <= seq_length for length in lengths):
        raise ValueError(f"row lengths {list(lengths)} must be 1..{seq_length}, one per row of {num_rows}")
    total = sum(lengths)
    if packed_length < total:
        raise ValueError(f"packed_length={packed_length} is shorter than the {total} real tokens to pack")
    device = input_ids.device
    # A tail of padding is a sequence of its own, so no real token attends to it and RoPE restarts there too.
    sequence_lengths = list(lengths) + ([packed_length - total] if packed_length > total else [])
    bounds = [0]
    for length in sequence_lengths:
        bounds.append(bounds[-1] + length)
    lengths_t = torch.tensor(lengths, dtype=torch.long, device=device)
    starts = torch.tensor(bounds[:num_rows], dtype=torch.long, device=device)
    columns = torch.arange(seq_length, device=device)
    real = columns[None, :] < lengths_t[:, None]  # [b, S]
    packed_ids = torch.full((packed_length,), pad_id, dtype=torch.long, device=device)
    packed_ids[:total] = input_ids[real]
    position_ids = torch.cat([torch.arange(length, device=device) for length in sequence_lengths])
    gather_index = starts[:, None] + torch.minimum(columns[None, :], lengths_t[:, None] - 1)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max(sequence_lengths)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    return PackedRows(input_ids=packed_ids[None, :], position_ids=position_ids[None, :], packed_seq_params=params,
                      gather_index=gather_index, lengths=tuple(int(length) for length in lengths))
