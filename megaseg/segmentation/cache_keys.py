"""What identifies a model's weights for cache keys: its checkpoint on disk, or its weights when it has none.

A checkpoint is identified by its absolute path and the names, sizes and modification times of its files (cheap for
a 140 GB checkpoint, and any rewrite changes it). A model built in memory without a checkpoint (tests, a tiny random
model) is identified by a digest of its weights as laid out at this TP/PP, so the same weights at another layout
count as another model (a recomputation, never a wrong reuse).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megaseg.config.model import ModelConfig
from megaseg.models.architecture import model_architecture


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


def weights_fingerprint(model: torch.nn.Module, parallel_ctx: Any) -> str:
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
                   parallel_ctx: Any = None) -> dict[str, Any]:
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
