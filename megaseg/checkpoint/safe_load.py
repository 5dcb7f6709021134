"""Reading megatron dist checkpoints without running code from their files: the one way megaseg loads them.

A dist checkpoint (megatron ``torch_dist``) holds three kinds of pickled data, and each plain loader would execute
whatever a planted ``__reduce__`` asks for:

- ``.metadata``: torch.distributed.checkpoint's ``FileSystemReader.read_metadata`` uses ``pickle.load``. Here it is
  read by ``MetadataUnpickler``, which resolves only the classes torch and megatron write into it
  (``ALLOWED_METADATA_GLOBALS``) and refuses anything else;
- ``common.pt`` (LR schedule, architecture, layout) is read with ``torch.load(weights_only=True)``;
- the byte objects inside ``*.distcp`` (``ShardedObject`` values: the RNG states) go through the load planner's
  ``load_bytes``, which torch's default planner unpickles without restriction; ``SafeLoadPlanner`` reads them
  with ``weights_only=True``. Tensors are read by torch with ``weights_only=True`` already.

A refused file is an ``UnsafeCheckpointError`` naming it; a truncated or garbage file a ``DamagedCheckpointError``
naming it (both ValueErrors), never a raw ``EOFError`` from an unpickler.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing import load as megatron_load
from megatron.core.dist_checkpointing import load_tensors_metadata as megatron_load_tensors_metadata
from megatron.core.dist_checkpointing.strategies import torch as megatron_torch_strategy
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from torch.distributed.checkpoint import FileSystemReader, Metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

METADATA_FILE = ".metadata"

# module -> names that may appear in a .metadata pickle (found by pickling real ones: tensors, objects, the
# optimizer's state, TP/PP layouts); nothing callable beyond these constructors.
ALLOWED_METADATA_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    # megatron keeps the save plans in the metadata (to reuse them on the next save): plain dataclasses and an enum.
    "torch.distributed.checkpoint.planner": frozenset({"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                                       "BytesIOWriteData"}),
    # torch pickles a layout as _get_layout("torch.strided"): a lookup among torch's layouts.
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size", "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
                        "uint8", "bool", "strided", "float8_e4m3fn", "float8_e5m2", "contiguous_format",
                        "channels_last", "preserve_format", "channels_last_3d"}),
    "torch._utils": frozenset({"_type_to_dtype"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "tuple", "list", "dict", "slice"}),
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that would run code (or build objects outside what checkpoints hold) when loaded."""


class DamagedCheckpointError(ValueError):
    """A checkpoint file that is truncated, empty or not what its format says."""


def _refusal(path: Path, what: str) -> str:
    return (f"refusing to load {path}: it asks to build {what}, which megaseg's checkpoints never contain; loading it "
            "could run code planted in the file. Use a checkpoint written by megaseg / megatron-core that you trust")


class MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only ``ALLOWED_METADATA_GLOBALS``."""

    def __init__(self, handle: Any, path: Path) -> None:
        super().__init__(handle)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in ALLOWED_METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(_refusal(self.path, f"{module}.{name}"))


def read_metadata_file(path: Path) -> Metadata:
    """The torch.distributed.checkpoint ``Metadata`` in ``path``, through the restricted unpickler."""
    path = Path(path)
    if not path.is_file():
        raise DamagedCheckpointError(f"{path} is missing: the dist checkpoint {path.parent} is incomplete")
    try:
        with open(path, "rb") as handle:
            metadata = MetadataUnpickler(handle, path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as error:  # any decoding failure of a damaged file (EOFError, UnpicklingError, ...)
        raise DamagedCheckpointError(f"{path} is unreadable ({type(error).__name__}: {error}): the dist-checkpoint "
                                     "metadata is truncated or overwritten") from None
    if not isinstance(metadata, Metadata):
        raise DamagedCheckpointError(f"{path} holds a {type(metadata).__name__}, not dist-checkpoint metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader with the metadata read by ``read_metadata_file`` (and cached: megatron reads it
    again after a load)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise NotImplementedError("per-rank metadata files are not written by megatron's torch_dist format")
        if self._metadata is None:
            self._metadata = read_metadata_file(Path(self.path) / METADATA_FILE)
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


def torch_load_weights_only(source: Any, path: Path) -> Any:
    """``torch.load(source, weights_only=True)`` with refusals and decoding failures named by ``path``."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        found = re.search(r"GLOBAL (\S+) was not an allowed global|Unsupported global: GLOBAL (\S+)", text)
        if found:  # a class or function the file asks for; anything else is damage (random bytes, truncation)
            raise UnsafeCheckpointError(_refusal(path, next(name for name in found.groups() if name))) from None
        reason = next((line for line in text.splitlines() if "Unsupported operand" in line or "Failed" in line),
                      text.splitlines()[0] if text else "")
        raise DamagedCheckpointError(f"{path} is unreadable (not a torch file: {reason.strip()})") from None
    except Exception as error:  # a truncated zip archive, an empty file, random bytes
        raise DamagedCheckpointError(f"{path} is unreadable ({type(error).__name__}: "
                                     f"{str(error).splitlines()[0] if str(error) else ''})") from None


class SafeLoadPlanner(megatron_torch_strategy.MCoreLoadPlanner):
    """megatron's load planner with byte objects read ``weights_only``."""

    def __init__(self, *args: Any, checkpoint_dir: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoint_dir = checkpoint_dir

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        # DefaultLoadPlanner.load_bytes, with weights_only=True.
        from torch.distributed.checkpoint._traverse import set_element

        stored = self.metadata.storage_data.get(read_item.storage_index) if self.metadata is not None else None
        where = self.checkpoint_dir / (stored.relative_path if stored is not None else "?")
        loaded = torch_load_weights_only(value, Path(f"{where} (object {read_item.dest_index.fqn!r})"))
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class SafeTorchDistLoadStrategy(megatron_torch_strategy.TorchDistLoadShardedStrategy):
    """megatron's torch_dist load strategy reading through ``SafeFileSystemReader`` and ``SafeLoadPlanner``."""

    def load(self, sharded_state_dict: Any, checkpoint_dir: Path) -> Any:
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from torch.distributed import checkpoint

        m = megatron_torch_strategy
        tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
        original = sharded_state_dict
        sharded_state_dict, flat_mapping, rename_mapping = m._replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict)
        pyt_state_dict = m.mcore_to_pyt_state_dict(sharded_state_dict, True)
        reader = SafeFileSystemReader(checkpoint_dir)
        planner = SafeLoadPlanner(
            shapes_validation_sharded_tensors=[t for t in tensors if not t.allow_shape_mismatch],
            allow_shape_mismatch_sharded_tensors={t.key: t for t in tensors if t.allow_shape_mismatch},
            checkpoint_dir=Path(checkpoint_dir))
        checkpoint.load_state_dict(pyt_state_dict, reader, planner=planner)
        self.cached_global_metadata = reader.read_metadata()
        state = {key: m._unwrap_pyt_sharded_tensor(value) for key, value in pyt_state_dict.items()}
        state = m._replace_sharded_keys_with_state_dict_keys(state, flat_mapping, rename_mapping)
        m._restore_dict_types(state, original)
        return state

    def load_tensors_metadata(self, checkpoint_dir: Path, metadata: Metadata = None) -> Any:
        if metadata is None:
            metadata = SafeFileSystemReader(checkpoint_dir).read_metadata()
        return super().load_tensors_metadata(checkpoint_dir, metadata)

    def load_sharded_metadata(self, checkpoint_dir: Path) -> Any:
        raise NotImplementedError("megaseg loads with strict checks of its own (check_tensor_shapes)")


class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """``common.pt`` read weights_only; ShardedObjects are left to the sharded strategy (it handles them)."""

    def load_common(self, checkpoint_dir: str | Path) -> Any:
        path = Path(checkpoint_dir) / COMMON_STATE_FNAME
        if not path.is_file():
            raise DamagedCheckpointError(f"{path} is missing: the dist checkpoint {checkpoint_dir} is incomplete")
        return torch_load_weights_only(path, path)

    def load_sharded_objects(self, sharded_objects_state_dict: Any, checkpoint_dir: str | Path) -> Any:
        raise NotImplementedError("ShardedObjects are read by SafeTorchDistLoadStrategy")


def _unwrap_checkpoint_exception(error: CheckpointException) -> BaseException:
    """The first ValueError a rank raised inside torch.distributed.checkpoint (it wraps them per rank)."""
    for failure in error.failures.values():
        original = failure[0] if isinstance(failure, tuple) else failure  # (exception, stack summary)
        if isinstance(original, ValueError):
            return original
    return error


def load_dist_checkpoint(sharded_state_dict: dict[str, Any], checkpoint_dir: str | Path) -> dict[str, Any]:
    """``dist_checkpointing.load`` of ``sharded_state_dict`` from ``checkpoint_dir``, executing nothing from its
    files. Collective."""
    try:
        return megatron_load(sharded_state_dict, str(checkpoint_dir), sharded_strategy=SafeTorchDistLoadStrategy(),
                             common_strategy=SafeCommonLoadStrategy())
    except CheckpointException as error:
        raised = _unwrap_checkpoint_exception(error)
        if raised is error:
            raise DamagedCheckpointError(f"dist checkpoint {checkpoint_dir} could not be read: {error}") from None
        raise raised from None


def load_common_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The non-tensor part of a dist checkpoint (``common.pt``), weights_only."""
    return SafeCommonLoadStrategy().load_common(checkpoint_dir)


def load_tensors_metadata(checkpoint_dir: str | Path) -> dict[str, Any]:
    """key -> ShardedTensor without data (global shapes) of every tensor stored in ``checkpoint_dir``."""
    return megatron_load_tensors_metadata(str(checkpoint_dir), sharded_strategy=SafeTorchDistLoadStrategy())
