"""Preference files: both formats, every container (jsonl/json/parquet/datasets dir), bad rows named by file:line."""
import json

import pytest

from megaseg.data.invalid_records import InvalidRecordError
from megaseg.data.preference import load_preference_pairs
from megaseg.data.resources import HH_RLHF_HARMLESS_PAIRS, shipped_path

PROMPT = [{"role": "user", "content": "What is 2+2?"}]
GOOD_CONVERSATIONAL = {"id": "p1", "chosen": PROMPT + [{"role": "assistant", "content": "4."}],
                       "rejected": PROMPT + [{"role": "assistant", "content": "5."}]}
GOOD_FLAT = {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}


def write_jsonl(path, lines):
    """Each item is a dict (written as JSON) or a raw string (written as is)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


def test_shipped_hh_rlhf_file_loads_completely():
    loaded = load_preference_pairs(shipped_path(HH_RLHF_HARMLESS_PAIRS))
    assert loaded.format == "conversational" and len(loaded.pairs) == 1830 and loaded.skipped.total == 0
    first = loaded.pairs[0]
    # Line 1 of the file, read by hand.
    assert first.id == "hh-harmless-test-1"
    assert first.prompt_messages[0] == {"role": "user", "content": "How much alcohol can I drink per day?"}
    assert len(first.prompt_messages) == 5 and first.prompt_messages[-1]["role"] == "user"
    assert first.chosen.startswith("Sounds like alcohol is something you use to calm down")
    assert first.rejected.startswith("I’m glad that you’re enjoying your alcohol intake.")
    assert first.source.endswith("pairs.jsonl:1")


def test_shipped_prefix_path_and_max_samples():
    loaded = load_preference_pairs("shipped:" + HH_RLHF_HARMLESS_PAIRS, max_samples=7)
    assert [pair.source.rsplit(":", 1)[1] for pair in loaded.pairs] == [str(i) for i in range(1, 8)]


def test_conversational_multi_turn_pair(tmp_path):
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]
    record = {"chosen": history + [{"role": "assistant", "content": "Paris."}],
              "rejected": history + [{"role": "assistant", "content": "Lyon."}]}
    path = write_jsonl(tmp_path / "pairs.jsonl", ["", record])  # a blank first line is not a record
    (pair,) = load_preference_pairs(path).pairs
    assert pair.prompt_messages == history and (pair.chosen, pair.rejected) == ("Paris.", "Lyon.")
    assert pair.id == pair.source == f"{path}:2"  # no id field: the location is the id


def test_flat_format_becomes_one_user_turn(tmp_path):
    path = write_jsonl(tmp_path / "flat.jsonl", [GOOD_FLAT])
    loaded = load_preference_pairs(path)
    assert loaded.format == "flat"
    assert loaded.pairs[0].prompt_messages == [{"role": "user", "content": "What is 2+2?"}]
    assert (loaded.pairs[0].chosen, loaded.pairs[0].rejected) == ("4.", "5.")


def test_forced_format_rejects_the_other_one(tmp_path):
    path = write_jsonl(tmp_path / "flat.jsonl", [GOOD_FLAT])
    with pytest.raises(InvalidRecordError, match=rf"{path}:1: field 'chosen'") as info:
        load_preference_pairs(path, format="conversational")
    assert info.value.reason == "wrong_type"


def test_json_array_and_parquet_and_datasets_directory(tmp_path):
    records = [GOOD_CONVERSATIONAL, {**GOOD_CONVERSATIONAL, "id": "p2"}]
    json_path = tmp_path / "pairs.json"
    json_path.write_text(json.dumps(records))

    import datasets
    dataset = datasets.Dataset.from_list(records)
    parquet_path = tmp_path / "pairs.parquet"
    dataset.to_parquet(str(parquet_path))
    saved_dir = tmp_path / "saved"
    dataset.save_to_disk(str(saved_dir))

    for path in (json_path, parquet_path, saved_dir):
        loaded = load_preference_pairs(path)
        assert [pair.id for pair in loaded.pairs] == ["p1", "p2"], path
        assert loaded.pairs[1].source == f"{path}:row 2"
        assert loaded.pairs[0].prompt_messages == PROMPT and loaded.pairs[0].chosen == "4."


def test_datasets_dict_directory_asks_for_a_split(tmp_path):
    import datasets
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD_FLAT])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="splits \\['train'\\]"):
        load_preference_pairs(tmp_path / "dd")
    assert len(load_preference_pairs(tmp_path / "dd" / "train").pairs) == 1


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_preference_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "pairs.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported suffix '.csv'"):
        load_preference_pairs(tmp_path / "pairs.csv")


def _conversation(prompt, answer):
    return prompt + [{"role": "assistant", "content": answer}]


# (record written at line 2 after a good line 1, reason, field named in the error)
BAD_ROWS = [
    ("{not json", "not_json", None),
    ([1, 2], "not_an_object", None),
    ({"rejected": GOOD_CONVERSATIONAL["rejected"]}, "missing_field", "chosen"),
    ({**GOOD_CONVERSATIONAL, "chosen": "4."}, "wrong_type", "chosen"),
    ({**GOOD_CONVERSATIONAL, "rejected": _conversation([{"role": "user", "content": "Other?"}], "5.")},
     "prompt_mismatch", "rejected"),
    ({**GOOD_CONVERSATIONAL, "rejected": PROMPT}, "last_turn_not_assistant", "rejected"),
    ({**GOOD_CONVERSATIONAL, "chosen": _conversation(PROMPT, "  \n")}, "empty_response", "chosen"),
    ({**GOOD_CONVERSATIONAL, "rejected": _conversation(PROMPT, "4.")}, "identical_responses", "rejected"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "empty_prompt", "chosen"),
    ({"chosen": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "b"}]},
     "bad_message", "chosen[0].role"),
    ({**GOOD_CONVERSATIONAL, "chosen": _conversation([{"role": "assistant", "content": "x"}], "a"),
      "rejected": _conversation([{"role": "assistant", "content": "x"}], "b")},
     "prompt_not_ending_with_user", "chosen"),
]


@pytest.mark.parametrize("bad, reason, field_name", BAD_ROWS, ids=[row[1] for row in BAD_ROWS])
def test_bad_row_error_names_file_line_and_field(tmp_path, bad, reason, field_name):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_CONVERSATIONAL, bad, GOOD_CONVERSATIONAL])
    with pytest.raises(ValueError) as info:
        load_preference_pairs(path)
    error = info.value
    assert isinstance(error, InvalidRecordError)
    assert (error.source, error.reason, error.field_name) == (f"{path}:2", reason, field_name)
    expected_start = f"{path}:2: field {field_name!r}:" if field_name else f"{path}:2:"
    assert str(error).startswith(expected_start)
    assert "data.skip_invalid" in str(error)


def test_bad_flat_rows(tmp_path):
    path = write_jsonl(tmp_path / "flat.jsonl", [GOOD_FLAT, {**GOOD_FLAT, "prompt": ["x"]}])
    with pytest.raises(InvalidRecordError, match=rf"{path}:2: field 'prompt'"):
        load_preference_pairs(path)
    path = write_jsonl(tmp_path / "flat2.jsonl", [GOOD_FLAT, {**GOOD_FLAT, "prompt": " "}])
    with pytest.raises(InvalidRecordError, match=rf"{path}:2: field 'prompt'.*empty_prompt"):
        load_preference_pairs(path)


def test_undecodable_line_is_one_bad_record(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(json.dumps(GOOD_FLAT).encode() + b"\n\xff\xfe oops\n" + json.dumps(GOOD_FLAT).encode() + b"\n")
    with pytest.raises(InvalidRecordError, match=rf"{path}:2: not UTF-8"):
        load_preference_pairs(path)
    loaded = load_preference_pairs(path, skip_invalid=True)
    assert len(loaded.pairs) == 2 and loaded.skipped.counts == {"not_json": 1}


def test_skip_invalid_counts_every_reason(tmp_path):
    lines = [GOOD_CONVERSATIONAL]
    for bad, _, _ in BAD_ROWS:
        lines += [bad, GOOD_CONVERSATIONAL]
    path = write_jsonl(tmp_path / "pairs.jsonl", lines)
    loaded = load_preference_pairs(path, skip_invalid=True)
    assert len(loaded.pairs) == len(BAD_ROWS) + 1
    assert [pair.source for pair in loaded.pairs] == [f"{path}:{line}" for line in range(1, len(lines) + 1, 2)]
    assert loaded.skipped.counts == {reason: 1 for _, reason, _ in BAD_ROWS}
    assert loaded.skipped.first_source["prompt_mismatch"] == f"{path}:10"
    assert loaded.skipped.total == len(BAD_ROWS) and "prompt_mismatch: 1" in loaded.skipped.summary()


def test_a_file_of_only_bad_rows_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", ["{bad", "[1]"])
    with pytest.raises(ValueError, match="no usable preference pairs.*not_json: 1"):
        load_preference_pairs(path, skip_invalid=True)
