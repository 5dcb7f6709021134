"""Data files shipped inside the megaseg package (megaseg/resources/data/), so demos run without a download.

A config may name a shipped file with the `shipped:` prefix, e.g.
`data.train_path=shipped:hh_rlhf_harmless/pairs.jsonl`;
`resolve_data_path` turns that into a real path and leaves every other path alone.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

from megaseg.config.data import SHIPPED_PREFIX

HH_RLHF_HARMLESS_PAIRS = "hh_rlhf_harmless/pairs.jsonl"
MT_BENCH_QUESTIONS = "prompts/mt_bench_question.jsonl"
ARENA_HARD_V01_QUESTIONS = "prompts/arena-hard-v0.1_question.jsonl"


def shipped_data_root() -> Path:
    root = importlib.resources.files("megaseg").joinpath("resources", "data")
    # Traversables from a zipped install are not paths; megaseg is always installed unzipped (wheel or editable),
    # and downstream readers (pyarrow, datasets) need a real file system path.
    if not isinstance(root, Path):
        raise ValueError(f"megaseg's resources are not on the file system ({root!r}); install megaseg unzipped")
    return root


def list_shipped_files() -> list[str]:
    root = shipped_data_root()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def shipped_path(relative_path: str) -> Path:
    """The path of a shipped data file, e.g. `shipped_path("hh_rlhf_harmless/pairs.jsonl")`."""
    path = shipped_data_root() / relative_path
    if not path.is_file():
        raise ValueError(
            f"{relative_path!r} is not a data file shipped with megaseg; shipped files: {list_shipped_files()}")
    return path


def resolve_data_path(path: str | Path) -> Path:
    """`shipped:<relative path>` -> the shipped file; any other string -> that local path, unchanged."""
    text = str(path)
    if text.startswith(SHIPPED_PREFIX):
        return shipped_path(text[len(SHIPPED_PREFIX):])
    return Path(text)
