"""Integrity of what megaseg writes for later reading: a manifest of sizes and sha256 checksums, recorded when a
directory or file is finished and checked before it is read.

A *directory manifest* (``megaseg-manifest.json`` inside the directory: checkpoint step directories, model states,
the reward-model directory) lists every file under the directory at the moment it was finished. A *file record*
(size + sha256 of one file, kept by whoever owns the file: a cache entry's manifest lists its shards, a normalizer
file carries the checksum of its own content) covers files written one at a time.

Every failure is one ``DamagedFileError`` (a ValueError) naming the file, what is wrong with it and the command that
repairs it (``repair``: given by the caller, who knows which command wrote the file).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from megaseg.atomic_io import TMP_PREFIX, write_json_atomic

MANIFEST_FILE = "megaseg-manifest.json"
MANIFEST_FORMAT = "megaseg-manifest"
MANIFEST_VERSION = 1
_CHUNK = 1 << 22


class DamagedFileError(ValueError):
    """A file megaseg wrote is missing, truncated, changed or unreadable. ``path``: the file; ``repair``: the command
    (or action) that makes it good again."""

    def __init__(self, path: Path, problem: str, repair: str) -> None:
        self.path, self.problem, self.repair = Path(path), problem, repair
        super().__init__(f"{path}: {problem}. {repair}")


def file_checksum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """{"size", "sha256"} of one file, as a manifest lists it."""
    return {"size": Path(path).stat().st_size, "sha256": file_checksum(Path(path))}


def check_file(path: Path, record: dict[str, Any], repair: str) -> None:
    """DamagedFileError unless ``path`` exists with the recorded size and checksum."""
    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(path, "is missing", repair)
    size = path.stat().st_size
    if size != record["size"]:
        what = "is empty" if size == 0 else f"has {size} bytes"
        raise DamagedFileError(path, f"{what}, {record['size']} were written (truncated or overwritten)", repair)
    if file_checksum(path) != record["sha256"]:
        raise DamagedFileError(path, "does not hold the bytes that were written (its sha256 differs from the "
                                     "manifest's)", repair)


def _listed_files(directory: Path) -> Iterable[Path]:
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST_FILE and not path.name.startswith(TMP_PREFIX):
            yield path


def write_manifest(directory: str | os.PathLike) -> Path:
    """Record every file under ``directory`` (sizes and sha256) in its ``megaseg-manifest.json``, atomically. Call it
    once the directory is complete, on one process."""
    directory = Path(directory)
    files = {path.relative_to(directory).as_posix(): file_record(path) for path in _listed_files(directory)}
    return write_json_atomic(directory / MANIFEST_FILE,
                             {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": files},
                             sort_keys=True)


def read_json_file(path: Path, what: str, repair: str) -> Any:
    """The JSON content of ``path``; DamagedFileError naming the file when it is missing or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(path, f"is missing ({what})", repair)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedFileError(path, f"is not valid JSON ({what}: {error})", repair) from None


def read_manifest(directory: Path, repair: str) -> dict[str, dict[str, Any]]:
    path = Path(directory) / MANIFEST_FILE
    manifest = read_json_file(path, "the directory's manifest of file sizes and checksums", repair)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict)
            or not all(isinstance(r, dict) and {"size", "sha256"} <= set(r) for r in files.values())):
        raise DamagedFileError(path, f"is not a {MANIFEST_FORMAT} (no \"files\" with sizes and checksums)", repair)
    if manifest.get("version", 0) > MANIFEST_VERSION:
        raise DamagedFileError(path, f"has version {manifest.get('version')}, newer than this megaseg's "
                                     f"{MANIFEST_VERSION}", "Use the megaseg version that wrote it")
    return files


def verify_manifest(directory: str | os.PathLike, repair: str, *,
                    selected: Optional[Callable[[str], bool]] = None) -> bool:
    """Check every file the manifest of ``directory`` lists (those whose relative name ``selected`` accepts, when
    given). False when the directory has no manifest (written by another tool: nothing to check against);
    DamagedFileError otherwise.

    A directory checked once in this process is not hashed again while no listed file's size or modification time
    has changed (a reward model is checked before segmentation and again when its weights load)."""
    directory = Path(directory)
    if not (directory / MANIFEST_FILE).exists():
        return False
    files = read_manifest(directory, repair)
    names = [name for name in sorted(files) if selected is None or selected(name)]
    signature = _signature(directory, names)
    if signature is not None and _VERIFIED.get(str(directory.absolute())) == signature:
        return True
    for name in names:
        check_file(directory / name, files[name], repair)
    if signature is not None:
        _VERIFIED[str(directory.absolute())] = signature
    return True


_VERIFIED: dict[str, tuple] = {}


def _signature(directory: Path, names: list[str]) -> Optional[tuple]:
    try:
        stats = [(directory / name).stat() for name in [MANIFEST_FILE, *names]]
    except OSError:
        return None  # a file is missing: check_file names it
    return tuple(names), tuple((stat.st_size, stat.st_mtime_ns, stat.st_ino) for stat in stats)


def check_on_rank_zero(check: Callable[[], Any]) -> Any:
    """Run ``check`` on rank 0 only (reading every byte once, not once per rank) and raise its ValueError on every
    rank, so that no rank walks into a collective load the others have refused. Collective. Returns its value."""
    from megaseg.parallel.collectives import gather_objects, is_rank_zero

    error: Optional[ValueError] = None
    value: Any = None
    if is_rank_zero():
        try:
            value = check()
        except ValueError as raised:
            error = raised
    # Sent as plain fields: any ValueError subclass crosses, and rank 0 keeps its own traceback.
    sent = None if error is None else (
        (str(error.path), error.problem, error.repair) if isinstance(error, DamagedFileError) else str(error))
    received, value = gather_objects((sent, value))[0]
    if error is not None:
        raise error
    if isinstance(received, tuple):
        raise DamagedFileError(Path(received[0]), received[1], received[2])
    if received is not None:
        raise ValueError(received)
    return value
