"""Write an output directory completely or not at all.

Everything is written into a hidden sibling (`.<name>.partial-<pid>-<random>`, same filesystem) that is renamed
onto the requested path only when the conversion finished; on any error it is removed. A reader therefore never
sees a half-written checkpoint, and a crashed run leaves at most a hidden `.partial` directory behind.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def check_output_dir_free(out: Path) -> None:
    """ValueError when `out` exists and is not an empty directory (converters never overwrite)."""
    out = Path(out)
    if out.is_dir() and not any(out.iterdir()):
        return
    if out.exists():
        raise ValueError(f"output {out} already exists; remove it or pass another --out")


def staging_dir_for(out: Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def staged_output_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh staging directory; on success it becomes `out`, on error it is deleted."""
    out = Path(out).absolute()
    check_output_dir_free(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir_for(out)
    staging.mkdir()
    try:
        yield staging
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish(staging: Path, out: Path) -> None:
    """Rename `staging` onto `out` (an empty directory at `out` is replaced); ValueError if `out` appeared."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    try:
        os.rename(staging, out)
    except OSError as error:  # another writer published first: its output stands, ours is dropped
        raise ValueError(f"output {out} appeared while converting ({error}); not overwriting it") from None
