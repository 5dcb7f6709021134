"""Data shipped in the package: reachable without ../shared, as made from the sources, with its licenses."""
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from material import shared_file
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


REPO = Path(__file__).resolve().parents[2]


def test_shipped_hh_rlhf_is_the_source_without_the_leftover_speaker_tag(tmp_path):
    source = shared_file("hh-rlhf-harmless/pairs.jsonl")
    shipped = [json.loads(line) for line in shipped_path(HH_RLHF_HARMLESS_PAIRS).read_text().splitlines()]
    original = [json.loads(line) for line in source.read_text().splitlines()]
    assert len(shipped) == len(original) == 1830
    for ours, theirs in zip(shipped, original):
        # Independent of tools/prepare_hh_rlhf.py: only the last user turn changes, losing its trailing tag.
        for side in ("chosen", "rejected"):
            last_user = max(i for i, m in enumerate(theirs[side]) if m["role"] == "user")
            for index, (mine, upstream) in enumerate(zip(ours[side], theirs[side])):
                expected = upstream["content"]
                if index == last_user:
                    assert expected.endswith("\n\nAssistant:")
                    expected = expected[: -len("\n\nAssistant:")]
                assert mine == {**upstream, "content": expected}
    spec = importlib.util.spec_from_file_location("prepare_hh_rlhf", REPO / "tools/prepare_hh_rlhf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.prepare(source, tmp_path / "pairs.jsonl")
    assert (tmp_path / "pairs.jsonl").read_bytes() == shipped_path(HH_RLHF_HARMLESS_PAIRS).read_bytes()


@pytest.mark.parametrize("shipped, original", [
    (MT_BENCH_QUESTIONS, "prompts/mt_bench_question.jsonl"),
    (ARENA_HARD_V01_QUESTIONS, "prompts/arena-hard-v0.1_question.jsonl"),
])
def test_shipped_copies_are_byte_identical_to_the_sources(shipped, original):
    source = shared_file(original)
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    assert digest(shipped_path(shipped)) == digest(source)


def test_unknown_shipped_file_lists_what_exists():
    with pytest.raises(ValueError, match="hh_rlhf_harmless/pairs.jsonl"):
        shipped_path("hh_rlhf_harmless/missing.jsonl")


def test_resolve_data_path_handles_the_shipped_prefix_only():
    assert resolve_data_path("shipped:" + MT_BENCH_QUESTIONS) == shipped_path(MT_BENCH_QUESTIONS)
    assert resolve_data_path("/tmp/some/file.jsonl") == Path("/tmp/some/file.jsonl")
