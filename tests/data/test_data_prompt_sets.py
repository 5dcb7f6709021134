"""Prompt files: the shipped MT-Bench and Arena-Hard sets, UltraFeedback-style prompts, bad rows."""
import json

import pytest

from megaseg.data.invalid_records import InvalidRecordError
from megaseg.data.prompts import load_prompts
from megaseg.data.resources import ARENA_HARD_V01_QUESTIONS, MT_BENCH_QUESTIONS, shipped_path


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_mt_bench_keeps_the_first_turn():
    loaded = load_prompts(shipped_path(MT_BENCH_QUESTIONS))
    assert loaded.format == "mt_bench" and len(loaded.prompts) == 80
    first = loaded.prompts[0]
    # Line 1 of the file, read by hand.
    assert first.id == "81" and first.category == "writing"
    assert first.messages == [{"role": "user", "content": "Compose an engaging travel blog post about a recent trip "
                               "to Hawaii, highlighting cultural experiences and must-see attractions."}]


def test_arena_hard_v01_prompt_field():
    loaded = load_prompts("shipped:" + ARENA_HARD_V01_QUESTIONS)
    assert loaded.format == "arena_hard" and len(loaded.prompts) == 500
    first = loaded.prompts[0]
    assert first.id == "328c149ed45a41c0b9d6f14659e63599" and first.category == "arena-hard-v0.1"
    assert first.messages == [{"role": "user",
                               "content": "Use ABC notation to write a melody in the style of a folk tune."}]


def test_arena_hard_upstream_turns_layout(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question_id": "q7", "category": "c",
                                               "turns": [{"content": "Explain monads."}]}])
    loaded = load_prompts(path)
    assert loaded.format == "arena_hard"
    assert loaded.prompts[0].id == "q7" and loaded.prompts[0].messages[0]["content"] == "Explain monads."


def test_ultrafeedback_string_and_message_list(tmp_path):
    conversation = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello?"}]
    path = write_jsonl(tmp_path / "uf.jsonl", [{"prompt_id": "a", "prompt": "Write a haiku."},
                                               {"prompt": conversation}])
    loaded = load_prompts(path)
    assert loaded.format == "ultrafeedback"
    assert loaded.prompts[0].id == "a" and loaded.prompts[0].messages == [{"role": "user",
                                                                          "content": "Write a haiku."}]
    assert loaded.prompts[1].id == f"{path}:2" and loaded.prompts[1].messages == conversation
    assert loaded.prompts[1].category is None


@pytest.mark.parametrize("bad, reason, field_name", [
    ("not json", "not_json", None),
    ({"question": "x"}, "missing_field", "prompt"),
    ({"prompt": 3}, "wrong_type", "prompt"),
    ({"prompt": ""}, "empty_prompt", "prompt"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "prompt_not_ending_with_user", "prompt"),
])
def test_bad_prompt_rows_name_file_and_line(tmp_path, bad, reason, field_name):
    path = write_jsonl(tmp_path / "uf.jsonl", [{"prompt": "fine"}, bad])
    with pytest.raises(InvalidRecordError) as info:
        load_prompts(path)
    assert (info.value.source, info.value.reason, info.value.field_name) == (f"{path}:2", reason, field_name)
    skipped = load_prompts(path, skip_invalid=True)
    assert len(skipped.prompts) == 1 and skipped.skipped.counts == {reason: 1}


def test_mt_bench_row_without_turns(tmp_path):
    path = write_jsonl(tmp_path / "mt.jsonl", [{"question_id": 1, "turns": ["a", "b"]},
                                               {"question_id": 2, "turns": []}])
    with pytest.raises(InvalidRecordError, match=rf"{path}:2: field 'turns'"):
        load_prompts(path)


def test_unknown_layout_and_format_name(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "hello"}])
    with pytest.raises(InvalidRecordError, match="neither 'prompt' nor 'turns'"):
        load_prompts(path)
    with pytest.raises(ValueError, match="not one of"):
        load_prompts(path, format="sharegpt")
