"""Reading and writing Hugging Face model directories one tensor at a time.

Reading goes through `safetensors.safe_open`, which memory-maps the files and materialises only the tensor asked
for, so converting a model never holds a second full copy of the HF weights. Writing collects tensors up to
`max_shard_bytes` and flushes a shard, so the writer holds at most one shard (default 5 GiB, like `save_pretrained`).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# Everything AutoTokenizer may read (fast and slow tokenizers, chat templates of transformers 4 and 5).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def write_json(path: Path, content: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


class HFSafetensorsReader:
    """Lazy, per-tensor access to the safetensors of a Hugging Face model directory."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self._file_of = self._weight_map()
        self._handles: Dict[str, Any] = {}

    def _weight_map(self) -> Dict[str, str]:
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            return dict(read_json(index)["weight_map"])
        files = sorted(p.name for p in self.model_dir.glob("*.safetensors"))
        if not files:
            stored = sorted(p.name for p in self.model_dir.glob("*.bin")) or "no weight files"
            raise ValueError(f"{self.model_dir} holds no safetensors weights ({stored}); megaseg reads safetensors "
                             "only: re-save the model with save_pretrained(dir, safe_serialization=True)")
        weight_map: Dict[str, str] = {}
        for file in files:
            with safe_open(self.model_dir / file, framework="pt") as handle:
                weight_map.update({name: file for name in handle.keys()})
        return weight_map

    def _handle(self, name: str) -> Any:
        if name not in self._file_of:
            raise KeyError(name)
        file = self._file_of[name]
        if file not in self._handles:
            path = self.model_dir / file
            if not path.is_file():
                raise ValueError(f"{self.model_dir / INDEX_FILE} names {file}, which does not exist")
            self._handles[file] = safe_open(path, framework="pt")
        return self._handles[file]

    @property
    def names(self) -> List[str]:
        return sorted(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The stored dtype as safetensors spells it: "F32", "BF16", "F16", ..."""
        return self._handle(name).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "HFSafetensorsReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_tensor_shapes(reader: HFSafetensorsReader, expected: Mapping[str, tuple[int, ...]],
                        ignorable: Iterable[str]) -> None:
    """ValueError listing missing, unexpected and wrongly shaped tensors; `ignorable` names may be present."""
    present = set(reader.names)
    ignorable = set(ignorable)
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected) - ignorable)
    mismatched = [f"{name}: stored {reader.shape(name)}, config.json implies {expected[name]}"
                  for name in sorted(set(expected) & present) if reader.shape(name) != tuple(expected[name])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors, e.g. {missing[:6]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:6]}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches, e.g. {mismatched[:4]}")
    if problems:
        raise ValueError(f"{reader.model_dir}: the weights do not match its config.json: " + "; ".join(problems))


class HFSafetensorsWriter:
    """Writes `model.safetensors`, or `model-0000i-of-0000N.safetensors` + index when over one shard."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: List[tuple[Path, List[str]]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._shards):
            raise AssertionError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        tensor = tensor.detach().contiguous()
        if tensor.untyped_storage().nbytes() != size:
            # a view into a bigger buffer (a split of fused q/k/v, a layer of a stacked tensor): safetensors refuses
            # tensors that share storage, and the buffer must not stay alive through the pending shard.
            tensor = tensor.clone()
        self._pending[name] = tensor
        self._pending_bytes += size

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self._shards):05d}.safetensors.part"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._total_bytes += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> List[Path]:
        if self._pending:
            self._flush()
        if len(self._shards) == 1:
            final = self.out_dir / SINGLE_FILE
            self._shards[0][0].rename(final)
            return [final]
        weight_map, finals = {}, []
        for i, (path, names) in enumerate(self._shards):
            final = self.out_dir / f"model-{i + 1:05d}-of-{len(self._shards):05d}.safetensors"
            path.rename(final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        write_json(self.out_dir / INDEX_FILE, {"metadata": {"total_size": self._total_bytes},
                                               "weight_map": weight_map})
        return finals


def copy_tokenizer_files(src_dir: Path, dst_dir: Path) -> List[str]:
    """Copy the tokenizer files found in `src_dir`; returns their names (empty when there are none)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            dst_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(src_dir) / name, dst_dir / name)
            copied.append(name)
    return copied


def read_generation_config(model_dir: Path) -> Optional[Dict[str, Any]]:
    path = Path(model_dir) / GENERATION_CONFIG_FILE
    return read_json(path) if path.is_file() else None
