#!/usr/bin/env python
"""Make megaseg's shipped HH-RLHF pairs from the upstream conversion (../shared/data/hh-rlhf-harmless/pairs.jsonl).

The upstream conversion of Anthropic's "Human: ... Assistant: ..." transcripts leaves the next turn's speaker tag at
the end of the last user message (every one of the 1,830 pairs ends its prompt with "\\n\\nAssistant:"). A chat
template then writes its own assistant header after it, so the tag is noise in every prompt: this strips it and
changes nothing else.

    python tools/prepare_hh_rlhf.py SOURCE.jsonl megaseg/resources/data/hh_rlhf_harmless/pairs.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LEFTOVER_SPEAKER_TAG = "\n\nAssistant:"


def strip_leftover_tag(messages: list[dict]) -> list[dict]:
    cleaned = []
    for message in messages:
        content = message["content"]
        if message["role"] == "user" and content.endswith(LEFTOVER_SPEAKER_TAG):
            content = content[: -len(LEFTOVER_SPEAKER_TAG)].rstrip()
        cleaned.append({**message, "content": content})
    return cleaned


def prepare(source: Path, target: Path) -> int:
    lines = []
    for line_number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}:{line_number}: not JSON: {error}") from None
        record["chosen"] = strip_leftover_tag(record["chosen"])
        record["rejected"] = strip_leftover_tag(record["rejected"])
        lines.append(json.dumps(record, ensure_ascii=False))
    tmp = target.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(target)
    return len(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    print(f"wrote {prepare(args.source, args.target)} pairs to {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
