"""Benchmark question files and answer-file layouts (no model): the shipped sets load, MT-Bench temperatures follow
FastChat's table by category, batches group by temperature and never depend on what was answered, bad files are
errors naming file:line, answer files read back."""
from __future__ import annotations

import json

import pytest

from megaseg.config import load_config
from megaseg.evaluation.benchmarks import (
    answer_file_text,
    load_questions,
    question_temperature,
    read_answer_file,
    turn_messages,
)
from megaseg.evaluation.generate import GenerationPlan, default_model_id, turn_batches


def test_shipped_sets_and_temperatures():
    mt, _ = load_questions("mt_bench", None)
    arena, _ = load_questions("arena_hard", None)
    assert len(mt) == 80 and all(len(q.turns) == 2 for q in mt)
    assert len(arena) == 500 and all(len(q.turns) == 1 for q in arena)
    # FastChat llm_judge's temperature_config, by category
    expected = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
                "stem": 0.1, "humanities": 0.1}
    assert {q.category for q in mt} == set(expected)
    for q in mt:
        assert question_temperature("mt_bench", q, None) == expected[q.category]
        assert question_temperature("mt_bench", q, 0.3) == 0.3
    assert question_temperature("arena_hard", arena[0], None) == 0.0
    with pytest.raises(ValueError, match="ships no question file"):
        load_questions("alpaca_eval", None)


def test_second_turn_conversation():
    mt, _ = load_questions("mt_bench", None, max_prompts=1)
    assert turn_messages(mt[0], []) == [{"role": "user", "content": mt[0].turns[0]}]
    assert turn_messages(mt[0], ["A1"]) == [{"role": "user", "content": mt[0].turns[0]},
                                            {"role": "assistant", "content": "A1"},
                                            {"role": "user", "content": mt[0].turns[1]}]


def test_batches_group_by_temperature(tmp_path):
    mt, path = load_questions("mt_bench", None)
    config = load_config(None, ["generate.micro_batch_size=7"])
    plan = GenerationPlan("mt_bench", "m", mt, path, 16, 100, tmp_path)
    batches = turn_batches(plan, config, 0, mt)
    assert [b.index for b in batches] == list(range(len(batches)))
    assert sorted(q.key for b in batches for q in b.questions) == sorted(q.key for q in mt)
    for batch in batches:
        assert 1 <= len(batch.questions) <= 7
        assert {question_temperature("mt_bench", q, None) for q in batch.questions} == {batch.temperature}


def test_bad_question_files(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "turns": ["a", "b"]}) + "\n" + json.dumps({"turns": ["x"]}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl:2: an MT-Bench question needs 'question_id'"):
        load_questions("mt_bench", str(bad))
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "ok"}, {"instruction": ""}]))
    with pytest.raises(ValueError, match=r"a.json:row 2: field 'instruction' must be a non-empty string"):
        load_questions("alpaca_eval", str(alpaca))


def test_answer_files_read_back(tmp_path):
    mt, _ = load_questions("mt_bench", None, max_prompts=2)
    answers = {q.key: {"turns": [f"{q.key}-1", f"{q.key}-2"], "token_lens": [1, 1], "tstamp": 1.5} for q in mt}
    file = tmp_path / "m.jsonl"
    file.write_text(answer_file_text("mt_bench", "m", mt, answers))
    bench, read = read_answer_file(file)
    assert bench == "mt_bench" and [(a.key, a.text) for a in read] == [(q.key, f"{q.key}-1") for q in mt]


def test_default_model_id():
    assert default_model_id("/x/models/SmolLM2-megatron") == "SmolLM2-megatron"
    assert default_model_id("/x/runs/ppo1/checkpoints/step_000100/actor") == "ppo1-step_000100-actor"
