"""Preference pairs from local files: the conversational format and the flat format.

conversational (preference_700K, the shipped HH-RLHF file): `chosen` and `rejected` are full conversations (message
lists) that share every message but the last, which is the assistant's answer.
flat: `prompt`, `chosen` and `rejected` are strings (one user turn, one answer each).

`format="auto"` decides from the first record (`chosen` a list -> conversational, a string -> flat) and then holds
every record to that format. A pair's `id` is the record's `id` field when present, else its source location.
Whether a prompt is too long is only known after tokenisation (see megaseg.data.pair_encoding).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megaseg.config.data import PREFERENCE_FORMATS
from megaseg.data.chat_messages import Message, check_prompt_messages, parse_messages
from megaseg.data.invalid_records import InvalidRecordError, SkippedRecords, handle_invalid
from megaseg.data.record_files import RawRecord, read_records
from megaseg.data.resources import resolve_data_path


@dataclass(frozen=True)
class PreferencePair:
    id: str
    prompt_messages: list[Message]  # the shared conversation, ending with a user turn
    chosen: str                     # the preferred assistant answer
    rejected: str                   # the dispreferred assistant answer
    source: str                     # "file:line" (jsonl) or "file:row N"


@dataclass(frozen=True)
class LoadedPairs:
    pairs: list[PreferencePair]
    format: str                     # the format actually read: "conversational" or "flat"
    skipped: SkippedRecords = field(default_factory=SkippedRecords)


def load_preference_pairs(path: str | Path, *, format: str = "auto", skip_invalid: bool = False,
                          max_samples: Optional[int] = None) -> LoadedPairs:
    """Read every pair of `path` (jsonl/json/parquet file or datasets directory; `shipped:` paths allowed).

    Raises InvalidRecordError (a ValueError naming file:line and field) on the first bad record, unless
    `skip_invalid`, in which case bad records are counted by reason in the result. Stops after `max_samples` pairs.
    """
    if format not in PREFERENCE_FORMATS:
        raise ValueError(f"preference format {format!r} is not one of {list(PREFERENCE_FORMATS)}")
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"max_samples={max_samples} must be > 0 (or None for all)")
    resolved_path = resolve_data_path(path)
    pairs: list[PreferencePair] = []
    skipped = SkippedRecords()
    chosen_format = None if format == "auto" else format
    for record in read_records(resolved_path):
        if max_samples is not None and len(pairs) >= max_samples:
            break
        try:
            fields = _record_fields(record)
            if chosen_format is None:
                chosen_format = _detect_format(fields, record.source)
            pairs.append(_parse_pair(fields, record.source, chosen_format))
        except InvalidRecordError as error:
            handle_invalid(error, skip_invalid, skipped)
    if not pairs:
        raise ValueError(f"{resolved_path} holds no usable preference pairs ({skipped.summary()})")
    return LoadedPairs(pairs=pairs, format=chosen_format, skipped=skipped)


def _record_fields(record: RawRecord) -> dict:
    if record.parse_error is not None:
        raise InvalidRecordError(record.source, "not_json", record.parse_error)
    if not isinstance(record.value, dict):
        raise InvalidRecordError(record.source, "not_an_object",
                                 f"expected a JSON object, got {type(record.value).__name__}")
    return record.value


def _detect_format(fields: dict, source: str) -> str:
    chosen = _require(fields, "chosen", source)
    if isinstance(chosen, list):
        return "conversational"
    if isinstance(chosen, str):
        return "flat"
    raise InvalidRecordError(source, "wrong_type", "cannot detect the format: expected a message list "
                             f"(conversational) or a string (flat), got {type(chosen).__name__}", "chosen")


def _require(fields: dict, name: str, source: str) -> object:
    if name not in fields or fields[name] is None:
        raise InvalidRecordError(source, "missing_field", f"the record has no {name!r} (keys: {sorted(fields)})",
                                 name)
    return fields[name]


def _parse_pair(fields: dict, source: str, format: str) -> PreferencePair:
    if format == "conversational":
        prompt_messages, chosen, rejected = _parse_conversational(fields, source)
    else:
        prompt_messages, chosen, rejected = _parse_flat(fields, source)
    check_prompt_messages(prompt_messages, source, "chosen" if format == "conversational" else "prompt")
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response.strip():
            raise InvalidRecordError(source, "empty_response", "the response is empty", name)
    if chosen.strip() == rejected.strip():
        raise InvalidRecordError(source, "identical_responses",
                                 "chosen and rejected are the same text, so the pair carries no preference",
                                 "rejected")
    record_id = fields.get("id")
    return PreferencePair(id=str(record_id) if record_id is not None else source, prompt_messages=prompt_messages,
                          chosen=chosen, rejected=rejected, source=source)


def _parse_conversational(fields: dict, source: str) -> tuple[list[Message], str, str]:
    conversations = {}
    for name in ("chosen", "rejected"):
        messages = parse_messages(_require(fields, name, source), source, name)
        if not messages or messages[-1]["role"] != "assistant":
            last_role = messages[-1]["role"] if messages else None
            raise InvalidRecordError(source, "last_turn_not_assistant",
                                     f"the last message has role {last_role!r}; it must be the assistant's answer",
                                     name)
        conversations[name] = messages
    chosen, rejected = conversations["chosen"], conversations["rejected"]
    if chosen[:-1] != rejected[:-1]:
        turn = next((i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b),
                    min(len(chosen), len(rejected)) - 1)
        raise InvalidRecordError(source, "prompt_mismatch",
                                 f"chosen and rejected must share every turn but the last; they differ at turn "
                                 f"{turn} ({len(chosen) - 1} vs {len(rejected) - 1} prompt turns)", "rejected")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _parse_flat(fields: dict, source: str) -> tuple[list[Message], str, str]:
    values = {}
    for name in ("prompt", "chosen", "rejected"):
        value = _require(fields, name, source)
        if not isinstance(value, str):
            raise InvalidRecordError(source, "wrong_type", f"the flat format needs a string, got "
                                     f"{type(value).__name__} (message lists mean the conversational format)", name)
        values[name] = value
    return [{"role": "user", "content": values["prompt"]}], values["chosen"], values["rejected"]
