"""Read raw records (one dict per example) from a local jsonl / json / parquet file or a `datasets` directory.

Each record carries its location for error messages: "file:LINE" for jsonl (1-based line, blank lines counted),
"file:row N" (1-based) for the formats without lines. A line that is not JSON comes back with `parse_error` set, so
the caller can raise or skip it like any other invalid record; a file that cannot be read at all raises ValueError.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class RawRecord:
    source: str                 # "file:line" or "file:row N"
    value: object               # the decoded record (a dict when the file is well formed), None on parse_error
    parse_error: Optional[str]  # why the line could not be decoded, else None


def read_records(path: str | Path) -> Iterator[RawRecord]:
    path = Path(path)
    if path.is_dir():
        yield from _read_datasets_dir(path)
    elif not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist; give a local .jsonl/.json/.parquet file or a "
                         "directory written by datasets' save_to_disk (megaseg never downloads data)")
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix == ".json":
        yield from _read_json_array(path)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise ValueError(f"data file {str(path)!r} has an unsupported suffix {path.suffix!r}; supported: "
                         f"{list(SUPPORTED_SUFFIXES)} or a datasets save_to_disk directory")


def _read_jsonl(path: Path) -> Iterator[RawRecord]:
    # Bytes, not text mode: one undecodable line must be reported (or skipped) on its own, not end the file.
    with path.open("rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            source = f"{path}:{line_number}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                yield RawRecord(source, None, f"not UTF-8 ({error.reason} at byte {error.start})")
                continue
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            try:
                yield RawRecord(source, json.loads(line), None)
            except json.JSONDecodeError as error:
                yield RawRecord(source, None, f"not JSON ({error.msg} at column {error.colno})")


def _read_json_array(path: Path) -> Iterator[RawRecord]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); a .json data file must hold one "
                         "array of records (use .jsonl for one record a line)") from error
    if not isinstance(records, list):
        raise ValueError(f"{path}: top-level JSON value is a {type(records).__name__}; a .json data file must hold "
                         "one array of records (use .jsonl for one record a line)")
    for row_number, record in enumerate(records, start=1):
        yield RawRecord(f"{path}:row {row_number}", record, None)


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as parquet

    parquet_file = parquet.ParquetFile(path)
    row_number = 0
    for batch in parquet_file.iter_batches():
        for record in batch.to_pylist():
            row_number += 1
            yield RawRecord(f"{path}:row {row_number}", record, None)


def _read_datasets_dir(path: Path) -> Iterator[RawRecord]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise ValueError(f"directory {str(path)!r} is not a datasets save_to_disk directory ({error}); give a "
                         "local .jsonl/.json/.parquet file or such a directory") from error
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded.keys())
        raise ValueError(f"{path} holds a DatasetDict with splits {splits}; point the path at one split's "
                         f"directory, e.g. {path / splits[0]}")
    for row_number, record in enumerate(loaded, start=1):
        yield RawRecord(f"{path}:row {row_number}", record, None)
