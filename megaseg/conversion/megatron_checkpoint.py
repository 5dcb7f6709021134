"""Moving whole (unsharded) tensors into and out of megatron-core dist checkpoints.

Writing: a model is built at the target TP/PP layout on every rank, each of its ShardedTensors (which record where
the local shard sits in the global tensor) is filled with its slice of the global tensor, and the model's own
`sharded_state_dict()` is saved with `dist_checkpointing.save`. Filling through the sharded state dict instead of by
parameter name keeps the TP/PP slicing rules (vocab rows, qkv groups, SwiGLU's split of fc1 into gate/up halves,
the tied output layer on the last pipeline stage) in megatron's hands, so they stay right across releases.

Reading: `DistCheckpointReader` needs no model. It asks `load_tensors_metadata` what the checkpoint holds and loads
one decoder layer at a time (a slice of megatron's layer-stacked tensors), in a single process, whatever TP/PP the
checkpoint was saved with: dist_checkpointing reassembles the shards.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional

import torch

from megaseg.conversion.weight_names import MEGATRON_LAYER_PREFIX, MEGATRON_TE_NORM_NAMES, split_megatron_key

# fc1 saved as two separate global tensors (gate, up) by megatron's `singleton_local_shards` SwiGLU layout.
FC1 = "mlp.linear_fc1.weight"
FC1_HALVES = {f"{FC1}_w": 0, f"{FC1}_v": 1}
TE_NAME_OF = {local: te for te, local in MEGATRON_TE_NORM_NAMES.items()}

# (layer index or None, megatron name) -> the whole global tensor for that name (unstacked).
GlobalTensorSource = Callable[[Optional[int], str], torch.Tensor]


def _local_sharded_tensors(sharded_state_dict: Mapping) -> Iterator:
    """Every ShardedTensor of a model's sharded state dict, with factories (SwiGLU fc1) built into views."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for value in nested_values(sharded_state_dict):
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            yield from (v for v in nested_values(built if isinstance(built, (dict, list)) else [built])
                        if isinstance(v, ShardedTensor))
        elif isinstance(value, ShardedTensor):
            yield value


def _layer_and_name(sharded: "object") -> tuple[Optional[int], str]:
    layer, name = split_megatron_key(sharded.key)
    if sharded.prepend_axis_num == 0:
        return layer, name
    if sharded.prepend_axis_num == 1 and layer is None and sharded.key.startswith(MEGATRON_LAYER_PREFIX):
        return sharded.global_offset[0], name  # layer-stacked key: the prepended axis is the global layer index
    raise ValueError(f"checkpoint tensor {sharded.key} has {sharded.prepend_axis_num} prepended axes; megaseg "
                     "converts dense GPT models without virtual pipeline stages or experts")


def _fc1_half(source: GlobalTensorSource, layer: Optional[int], name: str) -> torch.Tensor:
    return torch.chunk(source(layer, FC1), 2, dim=0)[FC1_HALVES[name]]


def fill_sharded_state_dict(sharded_state_dict: Mapping, source: GlobalTensorSource) -> int:
    """Copy into every local shard its region of the global tensor `source` gives; returns how many were filled.

    Raises ValueError when a global tensor's shape differs from what the model expects.
    """
    filled = 0
    with torch.no_grad():
        for sharded in _local_sharded_tensors(sharded_state_dict):
            if sharded.flattened_range is not None:
                raise ValueError(f"{sharded.key} is flattened (distributed-optimizer layout); fill a model's "
                                 "sharded_state_dict(), not an optimizer's")
            layer, name = _layer_and_name(sharded)
            whole = _fc1_half(source, layer, name) if name in FC1_HALVES else source(layer, name)
            expected = tuple(sharded.global_shape[sharded.prepend_axis_num:])
            if tuple(whole.shape) != expected:
                raise ValueError(f"{sharded.key} (layer {layer}): source tensor has shape {tuple(whole.shape)}, "
                                 f"the megatron model expects {expected}")
            region = tuple(slice(offset, offset + size) for offset, size in
                           zip(sharded.global_offset[sharded.prepend_axis_num:], sharded.local_shape))
            sharded.data.copy_(whole[region])
            filled += 1
    return filled


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def save_model_checkpoint(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Save `model` (this rank's TP/PP part) into the dist checkpoint `ckpt_dir`; collective over all ranks."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)  # dist_checkpointing.save does not create it
    _barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt_dir))
    _barrier()


def load_model_checkpoint(model: torch.nn.Module, ckpt_dir: Path, strict: bool = True) -> None:
    """Load a dist checkpoint saved at any TP/PP into `model` (this rank's part); collective over all ranks."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt_dir))
    model.load_state_dict(state, strict=strict)


class DistCheckpointReader:
    """Whole tensors of a GPT-style dist checkpoint, by megatron local-spec name, in one process.

    Needs torch.distributed initialised (a world of one is enough). Keys may carry a prefix (a model wrapped by a
    trainer); it is found from the final norm's key.
    """

    def __init__(self, ckpt_dir: Path) -> None:
        from megatron.core import dist_checkpointing

        self.ckpt_dir = Path(ckpt_dir)
        if not (self.ckpt_dir / "metadata.json").is_file():
            raise ValueError(f"{self.ckpt_dir} is not a megatron dist checkpoint (no metadata.json)")
        self.metadata = dict(dist_checkpointing.load_tensors_metadata(str(self.ckpt_dir)))
        self.prefix = self._find_prefix()

    def _find_prefix(self) -> str:
        final_norm = "decoder.final_layernorm.weight"
        found = [key[: -len(final_norm)] for key in self.metadata if key.endswith(final_norm)]
        if len(found) != 1:
            raise ValueError(f"{self.ckpt_dir}: expected one `*{final_norm}` tensor, found {len(found)} "
                             f"(keys: {sorted(self.metadata)[:8]}...); is this a GPT model checkpoint?")
        return found[0]

    def has(self, name: str) -> bool:
        return self.prefix + name in self.metadata

    def global_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.metadata[self.prefix + name].global_shape)

    def _stacked_key(self, name: str) -> Optional[str]:
        for candidate in (name, TE_NAME_OF.get(name)):
            if candidate and self.has(MEGATRON_LAYER_PREFIX + candidate):
                return self.prefix + MEGATRON_LAYER_PREFIX + candidate
        return None

    def _request(self, key: str, layer: Optional[int]) -> "object":
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        meta = self.metadata[key]
        if layer is None:
            return ShardedTensor.from_rank_offsets(key, torch.empty(meta.global_shape, dtype=meta.dtype))
        num_layers, *shape = meta.global_shape
        return ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=meta.dtype), (0, layer, num_layers),
                                               prepend_axis_num=1)

    def _load(self, requests: Dict[str, "object"]) -> Dict[str, torch.Tensor]:
        from megatron.core import dist_checkpointing

        loaded = dist_checkpointing.load(requests, str(self.ckpt_dir), validate_access_integrity=False)
        return {name: loaded[name] for name in requests}

    def tensors(self, names: List[str]) -> Dict[str, torch.Tensor]:
        """Whole non-layer tensors (e.g. `embedding.word_embeddings.weight`)."""
        missing = [name for name in names if not self.has(name)]
        if missing:
            raise ValueError(f"{self.ckpt_dir} lacks {missing}")
        return self._load({name: self._request(self.prefix + name, None) for name in names})

    def layer_tensors(self, layer: int, names: List[str]) -> Dict[str, torch.Tensor]:
        """One decoder layer's tensors by local-spec name (TE's fused norm names are found too)."""
        requests: Dict[str, object] = {}
        for name in names:
            stacked = self._stacked_key(name)
            per_layer = [self.prefix + f"{MEGATRON_LAYER_PREFIX}{layer}.{n}" for n in (name, TE_NAME_OF.get(name))
                         if n and self.prefix + f"{MEGATRON_LAYER_PREFIX}{layer}.{n}" in self.metadata]
            if stacked is not None:
                requests[name] = self._request(stacked, layer)
            elif per_layer:
                requests[name] = self._request(per_layer[0], None)
            elif name == FC1 and self._stacked_key(f"{FC1}_w") is not None:
                requests[f"{FC1}_w"] = self._request(self._stacked_key(f"{FC1}_w"), layer)
                requests[f"{FC1}_v"] = self._request(self._stacked_key(f"{FC1}_v"), layer)
            else:
                raise ValueError(f"{self.ckpt_dir} has no tensor for layer {layer} {name}")
        loaded = self._load(requests)
        if f"{FC1}_w" in loaded:
            loaded[FC1] = torch.cat([loaded.pop(f"{FC1}_w"), loaded.pop(f"{FC1}_v")], dim=0)
        return loaded
