"""Validation of chat message lists ([{"role": ..., "content": ...}, ...]) read from data files."""
from __future__ import annotations

from megaseg.data.invalid_records import InvalidRecordError

CHAT_ROLES = ("system", "user", "assistant")
Message = dict[str, str]


def parse_messages(value: object, source: str, field_name: str) -> list[Message]:
    """A clean copy of a message list holding only `role` and `content`; raises InvalidRecordError otherwise."""
    if not isinstance(value, list):
        raise InvalidRecordError(source, "wrong_type", f"expected a list of messages, got {type(value).__name__}",
                                 field_name)
    messages = []
    for index, message in enumerate(value):
        where = f"{field_name}[{index}]"
        if not isinstance(message, dict):
            raise InvalidRecordError(source, "bad_message", f"expected a message object, got "
                                     f"{type(message).__name__}", where)
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise InvalidRecordError(source, "bad_message", f"role {role!r} is not one of {list(CHAT_ROLES)}",
                                     f"{where}.role")
        if not isinstance(content, str):
            raise InvalidRecordError(source, "bad_message", f"content must be a string, got "
                                     f"{type(content).__name__}", f"{where}.content")
        messages.append({"role": role, "content": content})
    return messages


def check_prompt_messages(messages: list[Message], source: str, field_name: str) -> None:
    """A prompt must be non-empty and end with a user turn (the model answers it)."""
    if not messages:
        raise InvalidRecordError(source, "empty_prompt", "the prompt has no messages", field_name)
    if messages[-1]["role"] != "user":
        raise InvalidRecordError(source, "prompt_not_ending_with_user",
                                 f"the prompt's last turn has role {messages[-1]['role']!r}; it must be 'user'",
                                 field_name)
    if not any(message["content"].strip() for message in messages if message["role"] == "user"):
        raise InvalidRecordError(source, "empty_prompt", "every user turn of the prompt is empty", field_name)
