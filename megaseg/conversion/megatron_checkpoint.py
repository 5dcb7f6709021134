"""Moving whole (unsharded) tensors into and out of megatron-core dist checkpoints.

Writing: a model is built at the target TP/PP layout on every rank, each of its ShardedTensors (which record where
the local shard sits in the global tensor) is filled with its slice of the global tensor, and the model's own
`sharded_state_dict()` is saved with `dist_checkpointing.save`. Filling through the sharded state dict instead of by
parameter name keeps the TP/PP slicing rules (vocab rows, qkv groups, SwiGLU's split of fc1 into gate/up halves,
the tied output layer on the last pipeline stage) in megatron's hands, so they stay right across releases.

Reading: `DistCheckpointReader` needs no model and no torch.distributed world. It reads the checkpoint's
torch.distributed.checkpoint metadata and loads one decoder layer at a time (a slice of megatron's layer-stacked
tensors), whatever TP/PP the checkpoint was saved with: the DCP planner reassembles the shards.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megaseg.checkpoint.safe_load import SafeFileSystemReader
from megaseg.conversion.weight_names import MEGATRON_LAYER_PREFIX, MEGATRON_TE_NORM_NAMES, split_megatron_key

# fc1 saved as two separate global tensors (gate, up) by megatron's `singleton_local_shards` SwiGLU layout.
FC1 = "mlp.linear_fc1.weight"
FC1_HALVES = {f"{FC1}_w": 0, f"{FC1}_v": 1}
OPTIMIZER_KEY_PREFIX = "optimizer."
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
            # getattr: newer megatron-core releases drop flattened ShardedTensors (and the attribute) altogether.
            if getattr(sharded, "flattened_range", None) is not None:
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
    from megaseg.checkpoint.safe_load import load_dist_checkpoint

    state = load_dist_checkpoint(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state, strict=strict)


class RegionLoadPlanner(DefaultLoadPlanner):
    """A torch.distributed.checkpoint load planner that reads one region of each requested stored tensor.

    megatron's own loader cannot do this in a single process: for a partial request it marks the other shards as
    belonging to rank (rank + 1) % world_size, which is this rank again when the world has one process.
    `regions` maps a stored key to (offsets, sizes) of the region; the state dict holds a buffer of `sizes` per key.
    """

    def __init__(self, regions: Dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.regions = regions

    def create_local_plan(self) -> LoadPlan:
        requests = []
        for key, (offsets, sizes) in self.regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            requests += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(requests)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        """The part of the key's buffer this read fills (offsets are relative to the requested region)."""
        target = self.state_dict[read_item.dest_index.fqn]
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, offset, length)
        return target


class DistCheckpointReader:
    """Whole tensors of a GPT-style dist checkpoint (megatron's torch_dist format), by megatron local-spec name.

    Reads the torch.distributed.checkpoint files directly, one region at a time, in this process alone (no
    torch.distributed world needed). Keys may carry a prefix (a model wrapped by a trainer); it is found from the
    final norm's key.
    """

    def __init__(self, ckpt_dir: Path) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        config_path = self.ckpt_dir / "metadata.json"
        if not config_path.is_file():
            raise ValueError(f"{self.ckpt_dir} is not a megatron dist checkpoint (no metadata.json)")
        backend = json.loads(config_path.read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise ValueError(f"{self.ckpt_dir} uses the {backend!r} dist-checkpoint backend; megaseg reads "
                             "'torch_dist' (megatron-core's default)")
        self._storage = SafeFileSystemReader(self.ckpt_dir)  # executes nothing from the metadata pickle
        stored = self._storage.read_metadata().state_dict_metadata
        self.metadata = {key: md for key, md in stored.items() if isinstance(md, TensorStorageMetadata)}
        self.prefix = self._find_prefix()

    def _find_prefix(self) -> str:
        final_norm = "decoder.final_layernorm.weight"
        # A training checkpoint also holds optimizer moments under keys like `optimizer.state.exp_avg.<param key>`.
        found = [key[: -len(final_norm)] for key in self.metadata
                 if key.endswith(final_norm) and not key.startswith(OPTIMIZER_KEY_PREFIX)]
        if len(found) != 1:
            raise ValueError(f"{self.ckpt_dir}: expected one `*{final_norm}` model tensor, found {found}; "
                             "is this a GPT model checkpoint?")
        return found[0]

    def has(self, name: str) -> bool:
        return self.prefix + name in self.metadata

    def global_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.metadata[self.prefix + name].size)

    def _stacked_key(self, name: str) -> Optional[str]:
        for candidate in (name, TE_NAME_OF.get(name)):
            if candidate and self.has(MEGATRON_LAYER_PREFIX + candidate):
                return self.prefix + MEGATRON_LAYER_PREFIX + candidate
        return None

    def _per_layer_keys(self, name: str) -> Dict[int, str]:
        """layer -> key, for checkpoints that store each layer under its own `decoder.layers.N.` key."""
        wanted = {name, TE_NAME_OF.get(name, name)}
        found: Dict[int, str] = {}
        for key in self.metadata:
            if not key.startswith(self.prefix + MEGATRON_LAYER_PREFIX):
                continue
            head, _, local = key[len(self.prefix + MEGATRON_LAYER_PREFIX):].partition(".")
            if head.isdigit() and local in wanted:
                found[int(head)] = key
        return found

    def layer_shape(self, name: str) -> Optional[tuple[int, ...]]:
        """(num_layers, *tensor shape) of a decoder layer tensor, or None when the checkpoint lacks it."""
        stacked = self._stacked_key(name)
        if stacked is not None:
            return tuple(self.metadata[stacked].size)
        per_layer = self._per_layer_keys(name)
        if per_layer:
            return (len(per_layer), *self.metadata[per_layer[min(per_layer)]].size)
        halves = [self.layer_shape(f"{FC1}_w"), self.layer_shape(f"{FC1}_v")] if name == FC1 else [None]
        if all(halves):
            return (halves[0][0], halves[0][1] + halves[1][1], *halves[0][2:])
        return None

    def _load(self, requests: Dict[str, tuple[str, Optional[int]]]) -> Dict[str, torch.Tensor]:
        """name -> (stored key, layer index on the stacking axis or None for the whole tensor) -> tensors."""
        buffers, regions = {}, {}
        for key, layer in requests.values():
            md = self.metadata[key]
            size = tuple(md.size)
            offsets, sizes = ((layer,) + (0,) * (len(size) - 1), (1,) + size[1:]) if layer is not None \
                else ((0,) * len(size), size)
            buffers[key] = torch.empty(sizes, dtype=md.properties.dtype)
            regions[key] = (offsets, sizes)
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": a single process is the intent
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp_load(buffers, storage_reader=self._storage, planner=RegionLoadPlanner(regions), no_dist=True)
        return {name: buffers[key][0] if layer is not None else buffers[key]
                for name, (key, layer) in requests.items()}

    def tensors(self, names: List[str]) -> Dict[str, torch.Tensor]:
        """Whole non-layer tensors (e.g. `embedding.word_embeddings.weight`)."""
        missing = [name for name in names if not self.has(name)]
        if missing:
            raise ValueError(f"{self.ckpt_dir} lacks {missing}")
        return self._load({name: (self.prefix + name, None) for name in names})

    def layer_tensors(self, layer: int, names: List[str]) -> Dict[str, torch.Tensor]:
        """One decoder layer's tensors by local-spec name (TE's fused norm names are found too)."""
        requests: Dict[str, tuple[str, Optional[int]]] = {}
        for name in names:
            stacked, per_layer = self._stacked_key(name), self._per_layer_keys(name)
            if stacked is not None:
                requests[name] = (stacked, layer)
            elif layer in per_layer:
                requests[name] = (per_layer[layer], None)
            elif name == FC1 and self._stacked_key(f"{FC1}_w") is not None:
                requests[f"{FC1}_w"] = (self._stacked_key(f"{FC1}_w"), layer)
                requests[f"{FC1}_v"] = (self._stacked_key(f"{FC1}_v"), layer)
            else:
                raise ValueError(f"{self.ckpt_dir} has no tensor for layer {layer} {name}")
        loaded = self._load(requests)
        if f"{FC1}_w" in loaded:
            loaded[FC1] = torch.cat([loaded.pop(f"{FC1}_w"), loaded.pop(f"{FC1}_v")], dim=0)
        return loaded
