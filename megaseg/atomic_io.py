"""Files and directories that appear whole or not at all: every file megaseg writes for later reading goes through
here (configs, markers, manifests, normalizers, plots, cache shards, checkpoint pointers, finished directories).

A file is written to a hidden temporary sibling (same directory, so the same filesystem), flushed to disk and renamed
onto its name; a reader, or a run killed half-way, never sees part of it. A directory is staged under another name
and renamed into place (``replace_dir``).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

TMP_PREFIX = ".tmp-"


def temporary_sibling(path: Path) -> Path:
    """The hidden name a file is written under before its rename (pid-unique: two writers never share one)."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")


def write_bytes_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(handle)`` on a temporary sibling of ``path``, fsync it and rename it onto ``path``."""
    target = Path(path)
    tmp = temporary_sibling(target)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json_atomic(path: str | os.PathLike, content: Mapping[str, Any] | list, *, sort_keys: bool = False) -> Path:
    return write_text_atomic(path, json.dumps(content, indent=2, sort_keys=sort_keys, default=str) + "\n")


def replace_dir(source: Path, target: Path) -> None:
    """Move a finished directory into place by rename, replacing an existing one (e.g. a step saved again after
    resuming at it): the old one is swapped aside first and deleted only once the new one is in place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        source.rename(target)
        return
    trash = target.with_name(f".old_{target.name}")
    shutil.rmtree(trash, ignore_errors=True)
    target.rename(trash)
    source.rename(target)
    shutil.rmtree(trash)
