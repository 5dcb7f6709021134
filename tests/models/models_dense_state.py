"""Test helpers: a model shard's parameters under dense single-process names, and the way back for pipeline stages.

Used inside spawned ranks only (they need torch.distributed and megatron's parallel_state).
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _layer_offset(module: torch.nn.Module) -> int:
    layers = module.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def _global_name(name: str, offset: int) -> str:
    return _LAYER.sub(lambda match: f"decoder.layers.{int(match.group(1)) + offset}.", name)


def _gather_tp(shard: torch.Tensor, dim: int, stride: int, group) -> torch.Tensor:
    """The dense tensor from tensor-parallel shards; stride 2 is SwiGLU's fc1, where each rank holds
    [gate_r; up_r] and the dense weight is [gate_0; gate_1; ...; up_0; up_1; ...]."""
    size = dist.get_world_size(group)
    parts = [torch.empty_like(shard) for _ in range(size)]
    dist.all_gather(parts, shard.contiguous(), group=group)
    chunks = [part.chunk(stride, dim) for part in parts]
    return torch.cat([chunks[rank][s] for s in range(stride) for rank in range(size)], dim)


def dense_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters, tensor-parallel shards gathered, layers renamed to their global index. Collective
    over the tensor-parallel group. The tied output-layer copy of a last pipeline stage is left out."""
    from megatron.core import parallel_state

    module = _unwrap(model)
    group = parallel_state.get_tensor_model_parallel_group()
    offset = _layer_offset(module)
    dense = {}
    for name, param in module.named_parameters():
        if getattr(param, "shared", False) and name.startswith("output_layer."):
            continue
        tensor = param.detach()
        if getattr(param, "tensor_model_parallel", False) and dist.get_world_size(group) > 1:
            tensor = _gather_tp(tensor, param.partition_dim, param.partition_stride, group)
        dense[_global_name(name, offset)] = tensor.clone()
    return dense


def load_dense_state(model: torch.nn.Module, dense: dict[str, torch.Tensor]) -> None:
    """Copy dense single-process weights into a pipeline stage's parameters (tensor-parallel size 1 only)."""
    from megatron.core import parallel_state

    assert parallel_state.get_tensor_model_parallel_world_size() == 1, "slicing for TP > 1 is not implemented"
    module = _unwrap(model)
    offset = _layer_offset(module)
    with torch.no_grad():
        for name, param in module.named_parameters():
            source = _global_name(name, offset)
            if source not in dense and name == "output_layer.weight":
                source = "embedding.word_embeddings.weight"  # the last stage's copy of tied embeddings
            param.copy_(dense[source])
