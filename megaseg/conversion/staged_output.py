"""Write an output directory completely or not at all.

Everything is written into a hidden sibling (`.<name>.partial-<pid>-<random>`, same filesystem) that is renamed
onto the requested path only when the conversion finished; on any error it is removed. A reader therefore never
sees a half-written checkpoint. A run killed with SIGKILL cannot remove its staging directory; the next conversion
into the same parent removes the `.partial` siblings of `out` whose writer process is gone.
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
    remove_abandoned_staging_dirs(out)
    staging = staging_dir_for(out)
    staging.mkdir()
    try:
        yield staging
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_abandoned_staging_dirs(out: Path) -> list[Path]:
    """Delete `.<name>.partial-<pid>-*` siblings of `out` whose process no longer runs (a killed conversion's)."""
    removed = []
    for candidate in Path(out).parent.glob(f".{Path(out).name}.partial-*"):
        pid_text = candidate.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if pid_text.isdigit() and not _process_exists(int(pid_text)):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(staging: Path, out: Path) -> None:
    """Rename `staging` onto `out` (an empty directory at `out` is replaced); ValueError if `out` appeared."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    try:
        os.rename(staging, out)
    except OSError as error:  # another writer published first: its output stands, ours is dropped
        raise ValueError(f"output {out} appeared while converting ({error}); not overwriting it") from None
