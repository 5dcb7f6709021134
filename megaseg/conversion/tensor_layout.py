"""The two reshuffles between Hugging Face and megatron-core weight layouts, and their exact inverses.

megatron-core keeps q, k and v in one `linear_qkv` whose output rows are grouped per key/value head
(query group): for group g, the rows of its q heads, then k_g, then v_g. Tensor parallelism splits that weight by
contiguous rows, so each rank gets whole query groups with their q, k and v together. Hugging Face keeps q, k, v as
three separate projections (Phi-3: concatenated, not interleaved).

The MLP's `linear_fc1` is cat([gate, up]) along the output rows: megatron's SwiGLU applies silu to the first half.

Every function here works on weights [out, in] and on biases [out] alike, and only reorders rows, so a round trip
is bit-exact.
"""
from __future__ import annotations

import torch


def _check_rows(name: str, tensor: torch.Tensor, expected_rows: int) -> None:
    if tensor.shape[0] != expected_rows:
        raise ValueError(f"{name} has {tensor.shape[0]} output rows, expected {expected_rows} "
                         f"(shape {tuple(tensor.shape)}); the config.json does not describe these weights")


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int,
                   head_dim: int) -> torch.Tensor:
    """[heads*d, ...], [groups*d, ...], [groups*d, ...] -> [(heads + 2*groups)*d, ...] in megatron's group order."""
    _check_rows("k", k, num_query_groups * head_dim)
    _check_rows("v", v, num_query_groups * head_dim)
    if q.shape[0] % (num_query_groups * head_dim):
        raise ValueError(f"q has {q.shape[0]} rows, not a multiple of num_query_groups*head_dim="
                         f"{num_query_groups * head_dim}")
    rest = q.shape[1:]
    grouped = torch.cat([
        q.reshape(num_query_groups, -1, *rest),
        k.reshape(num_query_groups, head_dim, *rest),
        v.reshape(num_query_groups, head_dim, *rest),
    ], dim=1)
    return grouped.reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_attention_heads: int, num_query_groups: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `interleave_qkv`: megatron's [(heads + 2*groups)*d, ...] -> (q, k, v), each contiguous."""
    heads_per_group = num_attention_heads // num_query_groups
    _check_rows("linear_qkv", qkv, (num_attention_heads + 2 * num_query_groups) * head_dim)
    rest = qkv.shape[1:]
    grouped = qkv.reshape(num_query_groups, (heads_per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(grouped, [heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())


def concat_rows(*parts: torch.Tensor) -> torch.Tensor:
    """cat along output rows: gate/up -> linear_fc1, and Phi-3's q/k/v -> qkv_proj, gate/up -> gate_up_proj."""
    return torch.cat(parts, dim=0)


def split_rows(fused: torch.Tensor, sizes: list[int], name: str) -> list[torch.Tensor]:
    """Inverse of `concat_rows` for known part sizes; ValueError when the rows do not add up."""
    _check_rows(name, fused, sum(sizes))
    return [part.contiguous() for part in torch.split(fused, sizes, dim=0)]
