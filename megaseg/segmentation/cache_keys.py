"""The keys of segmentation cache entries: what identifies the data, the model whose entropies are cached, the
tokenizer and the segmentation settings, so an entry can never be read for anything else.

What identifies a model's weights: its checkpoint on disk, or its weights when it has none.

A checkpoint is identified by its absolute path and the names, sizes and modification times of its files (cheap for
a 140 GB checkpoint, and any rewrite changes it). A model built in memory without a checkpoint (tests, a tiny random
model) is identified by a digest of its weights as laid out at this TP/PP, so the same weights at another layout
count as another model (a recomputation, never a wrong reuse).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megaseg.config import MegasegConfig
from megaseg.config.model import ModelConfig
from megaseg.config.segmentation import SegmentationConfig
from megaseg.data.encoding import TokenizedPair
from megaseg.models.architecture import model_architecture
from megaseg.parallel.initialize import ParallelContext


def path_fingerprint(path: str | os.PathLike, what: str) -> str:
    """sha256 over (relative name, size, mtime) of every file under ``path`` (or of the file itself)."""
    root = Path(path)
    if not root.exists():
        raise ValueError(f"{what}={str(path)!r} does not exist; give a local path")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(root) if file != root else file.name}\0{stat.st_size}\0"
                      f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def weights_fingerprint(model: torch.nn.Module, parallel_ctx: ParallelContext) -> str:
    """sha256 of every rank's weight shards (one data-parallel replica), the same on every rank. Collective."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if isinstance(tensor, torch.Tensor):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    local = (parallel_ctx.tp_rank, parallel_ctx.pp_rank, digest.hexdigest()) if parallel_ctx.dp_rank == 0 else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Optional[tuple]] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    combined = hashlib.sha256()
    for part in sorted(item for item in gathered if item is not None):
        combined.update(repr(part).encode())
    return combined.hexdigest()


def model_identity(model_cfg: ModelConfig, *, model: Optional[torch.nn.Module] = None,
                   parallel_ctx: Optional[ParallelContext] = None) -> dict[str, Any]:
    """The cache-key description of the model whose outputs are cached (its entropies). Collective when the
    model has no checkpoint (its weights are hashed on every rank)."""
    identity: dict[str, Any] = {"name": model_cfg.name, "architecture": model_architecture(model_cfg),
                                "params_dtype": model_cfg.params_dtype}
    if model_cfg.checkpoint is not None:
        identity["checkpoint"] = str(Path(model_cfg.checkpoint).absolute())
        identity["checkpoint_files"] = path_fingerprint(model_cfg.checkpoint, "model.checkpoint")
    elif model is not None:
        identity["weights"] = weights_fingerprint(model, parallel_ctx)
        identity["layout"] = {"tp": parallel_ctx.tp_size, "pp": parallel_ctx.pp_size}
    else:
        raise ValueError("model.checkpoint is not set, and no model was passed: entropy segmentation needs the frozen "
                         "SFT model; set model.checkpoint to its megatron checkpoint (megaseg convert hf-to-megatron)")
    return identity


def data_fingerprint(pairs: Sequence[TokenizedPair]) -> str:
    """sha256 of every pair's token ids and EOS flags, in order: any change of data, template, tokenizer or
    truncation changes it, so a cache entry can never be read for other sequences."""
    digest = hashlib.sha256()
    for pair in pairs:
        for sequence in (pair.chosen, pair.rejected):
            header = np.array([len(sequence.prompt_ids), len(sequence.response_ids), sequence.ends_with_eos],
                              dtype=np.int64)
            digest.update(header.tobytes())
            digest.update(np.asarray(sequence.prompt_ids + sequence.response_ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


def key_digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def entropy_cache_key(config: MegasegConfig, pairs: Sequence[TokenizedPair], identity: dict) -> dict[str, Any]:
    data = config.data
    tokenizer = config.model.tokenizer
    return {"model": identity,
            "tokenizer": None if tokenizer is None else {"path": str(Path(tokenizer).absolute()),
                                                         "files": path_fingerprint(tokenizer, "model.tokenizer")},
            "max_length": data.max_length, "max_prompt_length": data.max_prompt_length,
            "overlong_prompt": data.overlong_prompt, "data": data_fingerprint(pairs),
            "shard_size": config.segmentation.shard_size,
            "entropy": "fp32 nats, logits[j] predicts token j+1, one value per response token"}


def segment_settings(seg: SegmentationConfig) -> dict[str, Any]:
    """The settings that decide where segments end (the cache key's part, and what a reward model records)."""
    settings: dict[str, Any] = {"mode": seg.mode}
    if seg.mode == "entropy":
        settings["entropy_cutoff"] = float(seg.entropy_cutoff)
    if seg.mode == "ngram":
        settings["ngram_size"] = int(seg.ngram_size)
    return settings


def segment_cache_key(config: MegasegConfig, pairs: Sequence[TokenizedPair],
                       entropy_entry: Optional[Path]) -> dict[str, Any]:
    key: dict[str, Any] = {**segment_settings(config.segmentation), "shard_size": config.segmentation.shard_size}
    if entropy_entry is not None:
        key["entropies"] = entropy_entry.name
    else:
        key["data"] = data_fingerprint(pairs)
        key["max_length"], key["max_prompt_length"] = config.data.max_length, config.data.max_prompt_length
        tokenizer = config.model.tokenizer
        if config.segmentation.mode == "sentence":  # only sentence mode reads token texts
            if tokenizer is None:
                raise ValueError("sentence segmentation decodes tokens, but model.tokenizer is not set; give the "
                                 "model's local tokenizer directory or GGUF file")
            key["tokenizer"] = {"path": str(Path(tokenizer).absolute()),
                                "files": path_fingerprint(tokenizer, "model.tokenizer")}
    return key
