"""The three benchmarks' question files in, their judges' answer files out (the formats, not the generation).

- mt_bench (FastChat ``llm_judge``): questions ``{"question_id", "category", "turns": [q1, q2]}``; answers
  ``model_answer/<model_id>.jsonl``, one line per question: ``question_id``, ``answer_id``, ``model_id``,
  ``choices: [{"index": 0, "turns": [answer_1, answer_2]}]``, ``tstamp``. The second answer is generated from the
  first question, the model's own first answer and the second question (``turn_messages``).
- arena_hard (arena-hard-auto v0.1): questions ``{"uid" | "question_id", "category", "cluster", "prompt"}`` (the
  shipped file) or ``turns: [{"content": ...}]`` (upstream); answers ``model_answer/<model_id>.jsonl`` with ``uid``
  and ``question_id`` (the same id), ``answer_id``, ``model_id``, ``choices: [{"index": 0, "turns": [{"content",
  "token_len"}]}]``, ``tstamp``. ``token_len`` counts the answer's tokens with the generating model's tokenizer
  (arena-hard-auto counts with tiktoken's cl100k_base, which needs a download; its length column is a length, not an
  identity, so either serves).
- alpaca_eval: questions ``{"instruction", "dataset", ...}`` per record (a JSON list or JSONL, AlpacaEval's
  evaluation set); answers ``model_outputs/<model_id>.json``, one JSON list of ``{"instruction", "output",
  "generator", "dataset"}`` in prompt order, what ``alpaca_eval --model_outputs FILE`` reads.

``answer_id`` is derived from (model_id, question id, answers), so two runs that generate the same answers write the
same ids; only ``tstamp`` (the time each answer was generated) differs between them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megaseg.data.chat_messages import Message
from megaseg.data.record_files import read_records
from megaseg.data.resources import resolve_data_path

SHIPPED_QUESTIONS = {"mt_bench": "shipped:prompts/mt_bench_question.jsonl",
                     "arena_hard": "shipped:prompts/arena-hard-v0.1_question.jsonl"}
NUM_TURNS = {"mt_bench": 2, "arena_hard": 1, "alpaca_eval": 1}
# FastChat llm_judge's temperature_config (common.py) for MT-Bench categories.
MT_BENCH_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                         "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
MT_BENCH_DEFAULT_TEMPERATURE = 0.7
DEFAULT_MAX_NEW_TOKENS = {"mt_bench": 1024, "arena_hard": 4096, "alpaca_eval": 2048}
DEFAULT_TEMPERATURE = {"arena_hard": 0.0, "alpaca_eval": 0.7}


@dataclass(frozen=True)
class Question:
    id: Any                  # the file's own id value (int for MT-Bench), written back unchanged
    turns: tuple[str, ...]   # the user turns to answer, in order
    category: Optional[str]
    source: str              # "file:line"
    extra: dict[str, Any]    # fields the answer file carries over (alpaca_eval: dataset)

    @property
    def key(self) -> str:
        return str(self.id)


class QuestionFileError(ValueError):
    pass


def _text(value: Any, source: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise QuestionFileError(f"{source}: field {name!r} must be a non-empty string, got {value!r:.80}")
    return value


def _parse(bench: str, fields: dict, source: str, row: int) -> Question:
    if bench == "mt_bench":
        turns = fields.get("turns")
        if not isinstance(turns, list) or not turns:
            raise QuestionFileError(f"{source}: an MT-Bench question needs 'turns', a list of user turns "
                                    f"(keys: {sorted(fields)})")
        if "question_id" not in fields:
            raise QuestionFileError(f"{source}: an MT-Bench question needs 'question_id' (keys: {sorted(fields)})")
        return Question(fields["question_id"], tuple(_text(t, source, f"turns[{i}]") for i, t in enumerate(turns)),
                        fields.get("category"), source, {})
    if bench == "arena_hard":
        question_id = fields.get("uid", fields.get("question_id"))
        if question_id is None:
            raise QuestionFileError(f"{source}: an Arena-Hard question needs 'uid' or 'question_id' "
                                    f"(keys: {sorted(fields)})")
        if "prompt" in fields:
            prompt = _text(fields["prompt"], source, "prompt")
        else:
            turns = fields.get("turns")
            first = turns[0].get("content") if isinstance(turns, list) and turns and isinstance(turns[0], dict) \
                else None
            prompt = _text(first, source, "turns[0].content")
        return Question(question_id, (prompt,), fields.get("category"), source, {})
    instruction = _text(fields.get("instruction"), source, "instruction")
    # AlpacaEval matches outputs to its references by instruction; the row number only orders them.
    return Question(row, (instruction,), fields.get("dataset"), source, {"dataset": fields.get("dataset")})


def load_questions(bench: str, path: Optional[str], max_prompts: Optional[int] = None) -> tuple[list[Question], str]:
    """(the questions of ``path`` in file order, the resolved path); the shipped MT-Bench / Arena-Hard sets when
    ``path`` is None. QuestionFileError (a ValueError) names file:line and field."""
    if path is None:
        if bench not in SHIPPED_QUESTIONS:
            raise ValueError(f"--bench {bench} ships no question file: pass --prompts FILE (AlpacaEval's evaluation "
                             "set, a JSON list or JSONL of {\"instruction\", \"dataset\"} records)")
        path = SHIPPED_QUESTIONS[bench]
    resolved = resolve_data_path(path)
    questions: list[Question] = []
    for row, record in enumerate(read_records(resolved)):
        if max_prompts is not None and len(questions) >= max_prompts:
            break
        if record.parse_error is not None:
            raise QuestionFileError(f"{record.source}: not JSON ({record.parse_error})")
        if not isinstance(record.value, dict):
            raise QuestionFileError(f"{record.source}: expected a JSON object, got {type(record.value).__name__}")
        questions.append(_parse(bench, record.value, record.source, row))
    if not questions:
        raise ValueError(f"{resolved} holds no questions")
    keys = [q.key for q in questions]
    duplicated = sorted({k for k in keys if keys.count(k) > 1}) if bench != "alpaca_eval" else []
    if duplicated:
        raise QuestionFileError(f"{resolved}: question ids {duplicated[:5]} appear more than once")
    return questions, str(resolved)


def question_temperature(bench: str, question: Question, configured: Optional[float]) -> float:
    if configured is not None:
        return float(configured)
    if bench == "mt_bench":
        return MT_BENCH_TEMPERATURES.get(question.category or "", MT_BENCH_DEFAULT_TEMPERATURE)
    return DEFAULT_TEMPERATURE[bench]


def turn_messages(question: Question, answers: list[str]) -> list[Message]:
    """The conversation to answer for turn ``len(answers)``: every earlier user turn followed by the model's own
    answer to it, then the next user turn."""
    messages: list[Message] = []
    for turn, answer in zip(question.turns, answers):
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": question.turns[len(answers)]}]


def answer_id(model_id: str, question: Question, answers: list[str]) -> str:
    digest = hashlib.sha256(json.dumps([model_id, question.key, answers]).encode("utf-8")).hexdigest()
    return digest[:22]


def answer_path(bench: str, out_dir: Path, model_id: str) -> Path:
    if bench == "alpaca_eval":
        return out_dir / "model_outputs" / f"{model_id}.json"
    return out_dir / "model_answer" / f"{model_id}.jsonl"


def answer_file_text(bench: str, model_id: str, questions: list[Question],
                     answers: dict[str, dict[str, Any]]) -> str:
    """The answer file of the answered questions, in question order. ``answers[key]``: ``{"turns": [text, ...],
    "token_lens": [n, ...], "tstamp": float}``."""
    done = [q for q in questions if q.key in answers]
    if bench == "alpaca_eval":
        rows = [{"instruction": q.turns[0], "output": answers[q.key]["turns"][0], "generator": model_id,
                 "dataset": q.extra.get("dataset")} for q in done]
        return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    lines = []
    for q in done:
        answer = answers[q.key]
        if bench == "mt_bench":
            record = {"question_id": q.id, "answer_id": answer_id(model_id, q, answer["turns"]), "model_id": model_id,
                      "choices": [{"index": 0, "turns": list(answer["turns"])}], "tstamp": answer["tstamp"]}
        else:
            turns = [{"content": text, "token_len": n} for text, n in zip(answer["turns"], answer["token_lens"])]
            record = {"uid": q.id, "question_id": q.id, "answer_id": answer_id(model_id, q, answer["turns"]),
                      "model_id": model_id, "choices": [{"index": 0, "turns": turns}], "tstamp": answer["tstamp"]}
        lines.append(json.dumps(record, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


# --- reading answer files back (for `megaseg compare`) ----------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    key: str                 # the question id (MT-Bench / Arena-Hard) or the instruction (AlpacaEval)
    prompt: Optional[str]    # the instruction when the file carries it (AlpacaEval)
    text: str                # the (first-turn) answer
    model_id: str


def read_answer_file(path: str | Path) -> tuple[str, list[Answer]]:
    """(the bench the file's layout belongs to, its answers): an AlpacaEval outputs list (.json) or an MT-Bench /
    Arena-Hard model_answer .jsonl. Only the first turn of an MT-Bench answer is read (the second turn's prompt
    holds each model's own first answer, so two models' second answers do not answer the same prompt)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"answer file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
        answers = []
        for index, row in enumerate(rows):
            if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) \
                    or not isinstance(row.get("output"), str):
                raise ValueError(f"{path}: entry {index} is not an AlpacaEval output "
                                 "{\"instruction\", \"output\", \"generator\"}")
            answers.append(Answer(row["instruction"], row["instruction"], row["output"], str(row.get("generator"))))
        return "alpaca_eval", answers
    answers, bench = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            first = row["choices"][0]["turns"][0]
            kind = "arena_hard" if isinstance(first, dict) else "mt_bench"
            content = first["content"] if isinstance(first, dict) else first
            key = row.get("uid", row.get("question_id")) if kind == "arena_hard" else row["question_id"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
            raise ValueError(f"{path}:{number} is not an MT-Bench / Arena-Hard answer record ({error!r}); expected "
                             "question_id, model_id and choices[0].turns") from None
        if bench is not None and kind != bench:
            raise ValueError(f"{path}:{number} mixes MT-Bench and Arena-Hard answer layouts")
        bench = kind
        answers.append(Answer(str(key), None, content, str(row.get("model_id"))))
    if not answers:
        raise ValueError(f"{path} holds no answers")
    return bench, answers
