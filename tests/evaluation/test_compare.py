"""`megaseg compare`: the win rate of one answer file over another scored by a reward model equals the pairwise
outcomes eval-rm reports for the same prompts and answers (eval-rm is itself tested against a slow reference); the
bootstrap interval behaves like the binomial one; the win rate and the length-controlled win rate equal alpaca_eval's
own functions on the same inputs (its length-controlled GLM without the downloaded instruction difficulties)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from megaseg.config import load_config
from megaseg.data.resources import shipped_path
from megaseg.evaluation.compare import (
    bootstrap_interval,
    length_controlled_win_rate,
    pair_answers,
    preferences_from_scores,
)
from scoring_test_helpers import command_fixture, last_json_line, run_cli

NUM_ITEMS = 8


def _alpaca_eval_lc(preferences: np.ndarray, model_lengths, baseline_lengths, tmp_path: Path, monkeypatch) -> dict:
    """alpaca_eval's get_length_controlled_winrate with its `length_controlled_minimal` GLM; the hub download it
    always makes (instruction difficulties, unused by that GLM) is replaced by a local table of zeros."""
    import pandas as pd
    import alpaca_eval.metrics.glm_winrate as glm

    n = len(preferences)
    table = tmp_path / "df_gamed.csv"
    pd.DataFrame({"model": ["m"] * n, "index": range(n), "instruction_difficulty": np.zeros(n)}).to_csv(table,
                                                                                                       index=False)
    monkeypatch.setattr(glm, "hf_hub_download", lambda **kwargs: str(table))
    # alpaca_eval's preference scale: 1 baseline wins, 2 model wins, 1.5 draw; output_1 is the baseline's.
    annotations = [{"index": i, "preference": 1.0 + preferences[i], "output_1": "b" * int(baseline_lengths[i]),
                    "output_2": "m" * int(model_lengths[i]), "generator_1": "base", "generator_2": "model",
                    "annotator": "rm"} for i in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return glm.get_length_controlled_winrate(annotations, glm_name="length_controlled_minimal",
                                                 save_weights_dir=None, is_warn_extreme_changes=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_win_rates_equal_alpaca_eval(seed, tmp_path, monkeypatch):
    rng = np.random.default_rng(seed)
    n = 60
    model_lengths = rng.integers(20, 900, n)
    baseline_lengths = rng.integers(20, 600, n)
    # A preference that partly follows length, partly a model effect, with ties.
    logits = 0.8 + 1.5 * np.tanh((model_lengths - baseline_lengths) / 300)
    preferences = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(float)
    preferences[rng.random(n) < 0.08] = 0.5
    theirs = _alpaca_eval_lc(preferences, model_lengths, baseline_lengths, tmp_path, monkeypatch)
    mine = length_controlled_win_rate(preferences, model_lengths, baseline_lengths)
    assert mine["length_controlled_win_rate"] == pytest.approx(theirs["length_controlled_winrate"], abs=1e-6)
    assert preferences.mean() * 100 == pytest.approx(theirs["win_rate"])
    # Longer answers win here, so controlling for length lowers the model's win rate.
    assert mine["w_length"] < 0 and mine["length_controlled_win_rate"] < theirs["win_rate"]


def test_preferences_and_bootstrap():
    model, baseline = np.array([1.0, 2.0, 0.5, 3.0]), np.array([0.0, 2.0, 1.0, 3.5])
    assert preferences_from_scores(model, baseline).tolist() == [1.0, 0.5, 0.0, 0.0]
    assert preferences_from_scores(model, baseline, ties="loss").tolist() == [1.0, 0.0, 0.0, 0.0]
    preferences = (np.random.default_rng(3).random(400) < 0.3).astype(float)
    low, high = bootstrap_interval(preferences, 4000, seed=0)
    p = preferences.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / len(preferences)) * 100  # the normal approximation's half-width
    assert low < p * 100 < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)


def _hh_items(n: int) -> list[tuple[str, str, str]]:
    """(a user question, a chosen answer, a rejected answer) from the shipped HH-RLHF pairs."""
    items = []
    for line in Path(shipped_path("hh_rlhf_harmless/pairs.jsonl")).read_text().splitlines():
        record = json.loads(line)
        question, chosen, rejected = (record["chosen"][-2]["content"], record["chosen"][-1]["content"],
                                      record["rejected"][-1]["content"])
        if chosen.strip() != rejected.strip() and chosen.strip() and rejected.strip():
            items.append((question, chosen, rejected))
        if len(items) == n:
            return items
    raise AssertionError("not enough pairs")


@pytest.mark.distributed
def test_compare_command_equals_eval_rm_outcomes(tmp_path_factory, tmp_path):
    root, _ = command_fixture(tmp_path_factory.getbasetemp())
    items = _hh_items(NUM_ITEMS)
    model = tmp_path / "model.json"
    baseline = tmp_path / "baseline.json"
    model.write_text(json.dumps([{"instruction": q, "output": a, "generator": "A", "dataset": "hh"}
                                 for q, a, _ in items]))
    # The baseline file lists the same instructions in another order: answers are matched by instruction.
    baseline.write_text(json.dumps([{"instruction": q, "output": b, "generator": "B", "dataset": "hh"}
                                    for q, _, b in reversed(items)]))
    out = tmp_path / "compare.json"
    result = run_cli("compare", "--answers", str(model), "--baseline", str(baseline), "--reward-model",
                     str(root / "rm"), "--out", str(out), "compare.num_bootstrap=500")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json_line(result.stdout)
    assert json.loads(out.read_text()) == summary

    flat = tmp_path / "flat.jsonl"
    flat.write_text("".join(json.dumps({"prompt": q, "chosen": a, "rejected": b}) + "\n" for q, a, b in items))
    details = tmp_path / "details.jsonl"
    result = run_cli("eval-rm", "--ckpt", str(root / "rm"), "--data", str(flat), "--details", str(details))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in details.read_text().splitlines()]
    margins = np.array([r["margin"] for r in records])
    preferences = (margins > 0) + 0.5 * (margins == 0)
    assert summary["num_comparisons"] == NUM_ITEMS and summary["bench"] == "alpaca_eval"
    assert summary["win_rate"] == pytest.approx(100 * preferences.mean())
    assert summary["mean_margin"] == pytest.approx(margins.mean(), rel=1e-4, abs=1e-6)
    assert summary["num_wins"] == int(np.sum(margins > 0))
    assert summary["win_rate_ci95"][0] <= summary["win_rate"] <= summary["win_rate_ci95"][1]
    assert summary["avg_length_chars"] == pytest.approx(np.mean([len(a) for _, a, _ in items]))
    assert summary["baseline_avg_length_chars"] == pytest.approx(np.mean([len(b) for _, _, b in items]))
    assert summary["avg_length_tokens"] == pytest.approx(np.mean([r["chosen"]["num_tokens"] for r in records]))
    lc = length_controlled_win_rate(preferences, [len(a) for _, a, _ in items], [len(b) for _, _, b in items])
    assert summary["length_controlled_win_rate"] == pytest.approx(lc["length_controlled_win_rate"])
    assert 0 < summary["win_rate"] < 100  # both outcomes occur: the comparison means something


def test_arena_hard_answers_pair_by_question_id(tmp_path):
    questions = [json.loads(line) for line in
                 Path(shipped_path("prompts/arena-hard-v0.1_question.jsonl")).read_text().splitlines()[:3]]

    def write(path, texts):
        path.write_text("".join(json.dumps({"uid": q["uid"], "question_id": q["uid"], "answer_id": "x",
                                            "model_id": path.stem, "tstamp": 0.0,
                                            "choices": [{"index": 0, "turns": [{"content": t, "token_len": 1}]}]})
                                + "\n" for q, t in zip(questions, texts)))
        return path

    a = write(tmp_path / "a.jsonl", ["a1", "a2", "a3"])
    b = write(tmp_path / "b.jsonl", ["b1", "b2"])
    bench, comparisons, unmatched = pair_answers(load_config(None, []), str(a), str(b))
    assert bench == "arena_hard" and unmatched == {"only_in_answers": 1, "only_in_baseline": 0}
    assert [(c.prompt, c.model_answer, c.baseline_answer) for c in comparisons] == [
        (questions[0]["prompt"], "a1", "b1"), (questions[1]["prompt"], "a2", "b2")]
    alpaca = tmp_path / "c.json"
    alpaca.write_text(json.dumps([{"instruction": "x", "output": "y", "generator": "c"}]))
    with pytest.raises(ValueError, match="holds arena_hard answers but --baseline .* holds alpaca_eval"):
        pair_answers(load_config(None, []), str(a), str(alpaca))


def test_a_hugging_face_sequence_classifier_judges_too(tmp_path_factory, tmp_path):
    """An ordinary HF reward model (``*ForSequenceClassification``) scores each conversation with its own chat
    template; the win rate and margin equal those of the model's own forward on the same conversations."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from material import smollm2_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir(tmp_path_factory)))
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, num_labels=1,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)).eval()
    rm_dir = tmp_path / "hf_rm"
    model.save_pretrained(str(rm_dir))
    tokenizer.save_pretrained(str(rm_dir))
    items = _hh_items(NUM_ITEMS)
    model_file, baseline_file = tmp_path / "model.json", tmp_path / "baseline.json"
    for path, side in ((model_file, 1), (baseline_file, 2)):
        path.write_text(json.dumps([{"instruction": item[0], "output": item[side], "generator": "x", "dataset": "hh"}
                                    for item in items]))
    result = run_cli("compare", "--answers", str(model_file), "--baseline", str(baseline_file), "--reward-model",
                     str(rm_dir), "compare.num_bootstrap=200")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json_line(result.stdout)

    def score(question, answer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return float(model(ids).logits[0, 0])

    margins = np.array([score(q, a) - score(q, b) for q, a, b in items])
    assert summary["num_comparisons"] == NUM_ITEMS
    assert summary["win_rate"] == pytest.approx(100 * ((margins > 0) + 0.5 * (margins == 0)).mean())
    assert summary["mean_margin"] == pytest.approx(margins.mean(), rel=1e-4, abs=1e-6)
