"""`megaseg generate` (real CLI processes) on a tiny random model that reads real SmolLM2 token ids with SmolLM2's
chat template, on the shipped MT-Bench and Arena-Hard questions and an AlpacaEval-format file:

- the answers equal a slow reference (Hugging Face's own chat template, one full forward per token, argmax; MT-Bench's
  second turn from the first question, the reference's own first answer and the second question);
- the files have exactly the fields FastChat's llm_judge, arena-hard-auto v0.1 and AlpacaEval read, and FastChat's and
  alpaca_eval's own loaders read them (both installed in the test environment: the `eval` extra);
- SIGKILL in the middle of a run, then the same command again, gives the same answer file as an uninterrupted run
  (every field but the generation time stamps), and no answer file exists while the run is incomplete;
- over-long prompts are skipped and reported (or refused); a progress file of other settings is refused.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from material import smollm2_tokenizer_dir
from megaseg.data.resources import shipped_path
from megaseg.parallel.spawn import run_distributed
from scoring_test_helpers import last_json_line

pytestmark = pytest.mark.distributed

MAX_NEW_TOKENS = 10
NUM_MT_BENCH = 4
TINY = {"vocab_size": 49152, "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
        "max_position_embeddings": 512}


def _build_sft(rank: int, world_size: int, work: str, tokenizer_dir: str) -> None:
    import dataclasses

    from megaseg.config import MegasegConfig
    from megaseg.conversion.megatron_checkpoint import save_model_checkpoint
    from megaseg.conversion.model_yaml import write_model_yaml
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import initialize_parallel

    config = MegasegConfig()
    model_cfg = dataclasses.replace(config.model, name="tiny-smollm2-ids", tokenizer=tokenizer_dir,
                                    checkpoint=str(Path(work) / "sft"), **TINY)
    initialize_parallel(config.parallel, seed=5)
    model = build_gpt_model(model_cfg, config.parallel)
    with __import__("torch").no_grad():
        model.embedding.word_embeddings.weight.mul_(8.0)  # peaked logits: a clear argmax at every step
    save_model_checkpoint(model, Path(work) / "sft")
    write_model_yaml(model_cfg, Path(work) / "sft")


def _template_ids(tokenizer, messages: list) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _reference_answers(rank: int, world_size: int, work: str, tokenizer_dir: str, conversations: list,
                       max_new_tokens: int) -> list:
    """Greedy answers of every conversation (a list of user turns): the HF tokenizer's chat template, a full forward
    of the whole sequence per new token, stop at <|im_end|> / the EOS token."""
    import dataclasses

    import torch
    from transformers import AutoTokenizer

    from megaseg.config import MegasegConfig
    from megaseg.conversion.megatron_checkpoint import load_model_checkpoint
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import initialize_parallel

    config = MegasegConfig()
    initialize_parallel(config.parallel, seed=5)
    model = build_gpt_model(dataclasses.replace(config.model, **TINY), config.parallel)
    load_model_checkpoint(model, Path(work) / "sft")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    stops = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    results = []
    for turns in conversations:
        messages, answers, lengths = [], [], []
        for turn in turns:
            messages.append({"role": "user", "content": turn})
            ids = _template_ids(tokenizer, messages)
            response = []
            with torch.no_grad():
                for _ in range(max_new_tokens):
                    sequence = torch.tensor([ids + response])
                    token = int(model(sequence, torch.arange(sequence.shape[1])[None], None)[0, -1].argmax())
                    if token in stops:
                        break
                    response.append(token)
            text = tokenizer.decode(response, skip_special_tokens=True).strip()
            answers.append(text)
            lengths.append(len(response))
            messages.append({"role": "assistant", "content": text})
        results.append({"answers": answers, "token_lens": lengths})
    return results


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("generate")
    tokenizer_dir = smollm2_tokenizer_dir(tmp_path_factory)
    (root / "tokenizer").write_text(str(tokenizer_dir))
    run_distributed(_build_sft, 1, str(root), str(tokenizer_dir), timeout=300)
    return root


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megaseg.cli", "generate", *args]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(_cli(*args), capture_output=True, text=True, timeout=timeout, env=env)


def _mt_bench_args(work: Path, out: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(work / "sft"), "--bench", "mt_bench", "--out", str(out), "--model-id", "tiny",
            "--max-new-tokens", str(MAX_NEW_TOKENS), "--max-prompts", str(NUM_MT_BENCH),
            "generate.temperature=0", "generate.micro_batch_size=1", *extra]


def _mt_bench_questions(n: int) -> list[dict]:
    lines = Path(shipped_path("prompts/mt_bench_question.jsonl")).read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def _without_tstamp(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "tstamp"} for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def mt_bench_run(work, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted single-process MT-Bench run: (its out dir, its summary)."""
    out = tmp_path_factory.mktemp("mt_bench_single")
    result = _run(*_mt_bench_args(work, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, last_json_line(result.stdout)


def test_mt_bench_answers_equal_the_reference_and_fastchat_reads_them(work, mt_bench_run):
    out, summary = mt_bench_run
    path = out / "model_answer" / "tiny.jsonl"
    assert summary["answers"] == str(path) and summary["num_answered"] == NUM_MT_BENCH and summary["skipped"] == {}
    questions = _mt_bench_questions(NUM_MT_BENCH)
    (reference,) = run_distributed(_reference_answers, 1, str(work), (work / "tokenizer").read_text(),
                                   [q["turns"] for q in questions], MAX_NEW_TOKENS, timeout=300)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == NUM_MT_BENCH
    for record, question, want in zip(records, questions, reference):
        assert set(record) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert record["question_id"] == question["question_id"] and isinstance(record["question_id"], int)
        assert record["model_id"] == "tiny" and isinstance(record["tstamp"], float)
        assert record["choices"] == [{"index": 0, "turns": want["answers"]}]
    assert len({r["answer_id"] for r in records}) == NUM_MT_BENCH

    from fastchat.llm_judge.common import load_model_answers, load_questions

    answers = load_model_answers(str(out / "model_answer"))
    fastchat_questions = load_questions(shipped_path("prompts/mt_bench_question.jsonl"), 0, NUM_MT_BENCH)
    for question in fastchat_questions:  # what gen_judgment does: answers[model][question_id]["choices"][0]["turns"]
        assert len(answers["tiny"][question["question_id"]]["choices"][0]["turns"]) == len(question["turns"]) == 2


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_file(work, mt_bench_run, tmp_path):
    uninterrupted, _ = mt_bench_run
    out = tmp_path / "killed"
    progress = out / ".progress" / "tiny.mt_bench.json"
    final = out / "model_answer" / "tiny.jsonl"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    process = subprocess.Popen(_cli(*_mt_bench_args(work, out)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and not progress.is_file():
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert progress.is_file(), "the run ended (or timed out) before saving any progress"
    saved = json.loads(progress.read_text())
    answered = sum(len(a["turns"]) for a in saved["answers"].values())
    assert 0 < answered < 2 * NUM_MT_BENCH, f"killed after {answered} answers: not mid-run"
    assert not final.exists(), "an answer file appeared before every question was answered"

    result = _run(*_mt_bench_args(work, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    assert _without_tstamp(final) == _without_tstamp(uninterrupted / "model_answer" / "tiny.jsonl")
    # The answers saved before the kill were kept, not generated again (their time stamps survive).
    first_key = next(iter(saved["answers"]))
    resumed = json.loads(progress.read_text())["answers"][first_key]
    assert resumed["turns"][:len(saved["answers"][first_key]["turns"])] == saved["answers"][first_key]["turns"]

    # The same directory with other decoding settings is refused, naming the setting.
    result = _run(*_mt_bench_args(work, out, "generate.top_k=5"))
    assert result.returncode == 2 and "holds answers generated with other settings (settings)" in result.stderr


def _generate_in_rank(rank: int, world_size: int, args: list) -> dict:
    """`megaseg generate` on one rank of a torchrun-style launch (the CLI's own argument handling)."""
    from megaseg.cli import main

    code = main(["generate", *args])
    assert code == 0
    return {"rank": rank}


def test_data_parallel_run_writes_the_single_process_file(work, mt_bench_run, tmp_path):
    """Two data-parallel ranks share the batches (batch i on rank i % 2) and gather the answers: the same file."""
    single, _ = mt_bench_run
    out = tmp_path / "dp2"
    run_distributed(_generate_in_rank, 2, _mt_bench_args(work, out), timeout=400)
    assert _without_tstamp(out / "model_answer" / "tiny.jsonl") == _without_tstamp(
        single / "model_answer" / "tiny.jsonl")


@pytest.mark.slow
def test_alpaca_eval_and_arena_hard_files(work, tmp_path):
    tokenizer_dir = (work / "tokenizer").read_text()
    instructions = ["Name three primary colours.", "What is 2 + 2?", "Write a haiku about autumn leaves."]
    questions = tmp_path / "alpaca_eval.json"
    questions.write_text(json.dumps([{"instruction": text, "dataset": f"set{i}", "output": "reference answer",
                                      "generator": "gpt4_turbo"} for i, text in enumerate(instructions)]))
    out = tmp_path / "out"
    result = _run("--ckpt", str(work / "sft"), "--bench", "alpaca_eval", "--prompts", str(questions), "--out",
                  str(out), "--model-id", "tiny", "--max-new-tokens", str(MAX_NEW_TOKENS), "generate.temperature=0")
    assert result.returncode == 0, result.stderr[-3000:]
    path = out / "model_outputs" / "tiny.json"
    rows = json.loads(path.read_text())
    (reference,) = run_distributed(_reference_answers, 1, str(work), tokenizer_dir, [[t] for t in instructions],
                                   MAX_NEW_TOKENS, timeout=300)
    assert rows == [{"instruction": t, "output": r["answers"][0], "generator": "tiny", "dataset": f"set{i}"}
                    for i, (t, r) in enumerate(zip(instructions, reference))]
    from alpaca_eval.utils import load_or_convert_to_dataframe

    frame = load_or_convert_to_dataframe(str(path))
    assert list(frame["instruction"]) == instructions and list(frame["generator"].unique()) == ["tiny"]
    assert list(frame["output"]) == [r["answers"][0] for r in reference]

    # Arena-Hard: the longest of three prompts over generate.max_prompt_length is skipped and reported.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    arena = [json.loads(line) for line in
             Path(shipped_path("prompts/arena-hard-v0.1_question.jsonl")).read_text().splitlines()[:3]]
    lengths = [len(_template_ids(tokenizer, [{"role": "user", "content": q["prompt"]}])) for q in arena]
    order = sorted(range(3), key=lambda i: lengths[i])
    assert lengths[order[1]] < lengths[order[2]]
    limit = lengths[order[1]]
    args = ["--ckpt", str(work / "sft"), "--bench", "arena_hard", "--out", str(tmp_path / "arena"), "--model-id",
            "tiny", "--max-new-tokens", str(MAX_NEW_TOKENS), "--max-prompts", "3", f"generate.max_prompt_length={limit}"]
    result = _run(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json_line(result.stdout)
    skipped_uid = arena[order[2]]["uid"]
    assert list(summary["skipped"]) == [skipped_uid] and summary["num_answered"] == 2
    assert f"skipping question {skipped_uid}" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "arena" / "model_answer" / "tiny.jsonl").read_text()
               .splitlines()]
    kept = [q for i, q in enumerate(arena) if i != order[2]]
    (reference,) = run_distributed(_reference_answers, 1, str(work), tokenizer_dir, [[q["prompt"]] for q in kept],
                                   MAX_NEW_TOKENS, timeout=300)
    for record, question, want in zip(records, kept, reference):
        # arena-hard-auto v0.1 reads question_id (uid in later releases), model_id, choices[0].turns[0].content.
        assert set(record) == {"uid", "question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert record["uid"] == record["question_id"] == question["uid"]
        assert record["choices"] == [{"index": 0, "turns": [{"content": want["answers"][0],
                                                             "token_len": want["token_lens"][0]}]}]

    result = _run(*args[:5], str(tmp_path / "arena-refuse"), *args[6:], "generate.overlong_prompt=refuse")
    assert result.returncode == 2
    assert f"question {skipped_uid}" in result.stderr and "generate.overlong_prompt=refuse" in result.stderr
