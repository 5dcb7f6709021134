"""Data shipped in the package: reachable without ../shared, unchanged, with its licenses."""
import hashlib
from pathlib import Path

import pytest

from data_test_paths import SHARED_DATA
from megaseg.data.resources import (ARENA_HARD_V01_QUESTIONS, HH_RLHF_HARMLESS_PAIRS, MT_BENCH_QUESTIONS,
                                    list_shipped_files, resolve_data_path, shipped_path)


def test_shipped_files_live_inside_the_package():
    package_root = Path(__import__("megaseg").__file__).parent
    for name in (HH_RLHF_HARMLESS_PAIRS, MT_BENCH_QUESTIONS, ARENA_HARD_V01_QUESTIONS):
        path = shipped_path(name)
        assert path.is_file() and package_root in path.parents
    assert {"hh_rlhf_harmless/LICENSE", "prompts/LICENSE", "README.md"} <= set(list_shipped_files())
    assert "MIT License" in shipped_path("hh_rlhf_harmless/LICENSE").read_text()
    assert "Apache License" in shipped_path("prompts/LICENSE").read_text()


@pytest.mark.parametrize("shipped, original", [
    (HH_RLHF_HARMLESS_PAIRS, "hh-rlhf-harmless/pairs.jsonl"),
    (MT_BENCH_QUESTIONS, "prompts/mt_bench_question.jsonl"),
    (ARENA_HARD_V01_QUESTIONS, "prompts/arena-hard-v0.1_question.jsonl"),
])
def test_shipped_copies_are_byte_identical_to_the_sources(shipped, original):
    source = SHARED_DATA / original
    if not source.is_file():
        pytest.skip(f"{source} is not available")
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    assert digest(shipped_path(shipped)) == digest(source)


def test_unknown_shipped_file_lists_what_exists():
    with pytest.raises(ValueError, match="hh_rlhf_harmless/pairs.jsonl"):
        shipped_path("hh_rlhf_harmless/missing.jsonl")


def test_resolve_data_path_handles_the_shipped_prefix_only():
    assert resolve_data_path("shipped:" + MT_BENCH_QUESTIONS) == shipped_path(MT_BENCH_QUESTIONS)
    assert resolve_data_path("/tmp/some/file.jsonl") == Path("/tmp/some/file.jsonl")
