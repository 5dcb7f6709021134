"""Prompt sets for generation (PPO rollouts, evaluation): UltraFeedback-style, MT-Bench and Arena-Hard files.

- ultrafeedback: `prompt` is a string (one user turn) or a message list ending with a user turn; id from
  `prompt_id`, else `id`.
- mt_bench: `turns` is a list of user turns (two in MT-Bench). megaseg generates single-turn answers, so a Prompt
  holds the FIRST turn only; the second turn needs the model's first answer and is left to a multi-turn evaluator.
  id from `question_id`.
- arena_hard: the shipped v0.1 file has `prompt` (a string) and `uid`; the upstream arena-hard-auto layout with
  `turns: [{"content": ...}]` and `question_id` is read too (first turn). id from `uid`, else `question_id`.

`format="auto"` decides from the first record (`turns` of strings -> mt_bench; `uid`, or `turns` of objects ->
arena_hard; `prompt` -> ultrafeedback) and holds every record to it. Without an id field the source location is the id.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megaseg.config.data import PROMPT_FORMATS
from megaseg.data.chat_messages import Message, check_prompt_messages, parse_messages
from megaseg.data.invalid_records import InvalidRecordError, SkippedRecords, handle_invalid
from megaseg.data.record_files import read_records
from megaseg.data.resources import resolve_data_path
_ID_FIELDS = {"ultrafeedback": ("prompt_id", "id"), "mt_bench": ("question_id",),
              "arena_hard": ("uid", "question_id")}


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[Message]    # the conversation to answer, ending with a user turn
    source: str                # "file:line" (jsonl) or "file:row N"
    category: Optional[str]    # MT-Bench / Arena-Hard category, None when the file has none


@dataclass(frozen=True)
class LoadedPrompts:
    prompts: list[Prompt]
    format: str                # the format actually read
    skipped: SkippedRecords = field(default_factory=SkippedRecords)


def load_prompts(path: str | Path, *, format: str = "auto", skip_invalid: bool = False,
                 max_samples: Optional[int] = None) -> LoadedPrompts:
    """Read every prompt of `path` (a file, datasets directory or `shipped:` path).

    Bad records raise InvalidRecordError (naming file:line) or, with skip_invalid, are counted by reason.
    """
    if format not in PROMPT_FORMATS:
        raise ValueError(f"prompt format {format!r} is not one of {list(PROMPT_FORMATS)}")
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"max_samples={max_samples} must be > 0 (or None for all)")
    resolved_path = resolve_data_path(path)
    prompts: list[Prompt] = []
    skipped = SkippedRecords()
    chosen_format = None if format == "auto" else format
    for record in read_records(resolved_path):
        if max_samples is not None and len(prompts) >= max_samples:
            break
        try:
            if record.parse_error is not None:
                raise InvalidRecordError(record.source, "not_json", record.parse_error)
            if not isinstance(record.value, dict):
                raise InvalidRecordError(record.source, "not_an_object",
                                         f"expected a JSON object, got {type(record.value).__name__}")
            if chosen_format is None:
                chosen_format = _detect_format(record.value, record.source)
            prompts.append(_parse_prompt(record.value, record.source, chosen_format))
        except InvalidRecordError as error:
            handle_invalid(error, skip_invalid, skipped)
    if not prompts:
        raise ValueError(f"{resolved_path} holds no usable prompts ({skipped.summary()})")
    return LoadedPrompts(prompts=prompts, format=chosen_format, skipped=skipped)


def _detect_format(fields: dict, source: str) -> str:
    turns = fields.get("turns")
    if isinstance(turns, list) and turns:
        return "arena_hard" if isinstance(turns[0], dict) else "mt_bench"
    if "uid" in fields and "prompt" in fields:
        return "arena_hard"
    if "prompt" in fields:
        return "ultrafeedback"
    raise InvalidRecordError(source, "missing_field", "cannot detect the prompt format: the record has neither "
                             f"'prompt' nor 'turns' (keys: {sorted(fields)})", "prompt")


def _parse_prompt(fields: dict, source: str, format: str) -> Prompt:
    if format == "mt_bench":
        messages = [{"role": "user", "content": _first_turn_text(fields, source, object_turns=False)}]
    elif format == "arena_hard" and "turns" in fields:
        messages = [{"role": "user", "content": _first_turn_text(fields, source, object_turns=True)}]
    else:
        messages = _prompt_field_messages(fields, source)
    check_prompt_messages(messages, source, "turns" if format == "mt_bench" else "prompt")
    record_id = next((fields[name] for name in _ID_FIELDS[format] if fields.get(name) is not None), None)
    category = fields.get("category")
    return Prompt(id=str(record_id) if record_id is not None else source, messages=messages, source=source,
                  category=str(category) if category is not None else None)


def _prompt_field_messages(fields: dict, source: str) -> list[Message]:
    if fields.get("prompt") is None:
        raise InvalidRecordError(source, "missing_field", f"the record has no 'prompt' (keys: {sorted(fields)})",
                                 "prompt")
    prompt = fields["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return parse_messages(prompt, source, "prompt")


def _first_turn_text(fields: dict, source: str, object_turns: bool) -> str:
    turns = fields.get("turns")
    if not isinstance(turns, list) or not turns:
        raise InvalidRecordError(source, "missing_field", "expected a non-empty list of turns", "turns")
    first = turns[0]
    if object_turns:
        first = first.get("content") if isinstance(first, dict) else None
    if not isinstance(first, str):
        expected = '{"content": str}' if object_turns else "a string"
        raise InvalidRecordError(source, "wrong_type", f"the first turn must be {expected}", "turns[0]")
    return first
