"""Invalid input records: one error type that names where the record is, and a tally of the ones skipped.

Every loader either raises `InvalidRecordError` for the first bad record (the default) or, with
`skip_invalid=True`, skips it and counts it by reason in `SkippedRecords`, so the trainer can log what was dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class InvalidRecordError(ValueError):
    """A record that cannot be used. `source` is "file:line" (jsonl) or "file:row N" (json, parquet, datasets dir)."""

    def __init__(self, source: str, reason: str, message: str, field_name: Optional[str] = None) -> None:
        self.source = source
        self.reason = reason
        self.field_name = field_name
        where = f"{source}: field {field_name!r}" if field_name else source
        super().__init__(f"{where}: {message} [{reason}]; fix or remove the record, or set data.skip_invalid=true "
                         "to skip such records")


@dataclass
class SkippedRecords:
    """Counts of skipped records by reason, with the first source of each reason for the log."""

    counts: dict[str, int] = field(default_factory=dict)
    first_source: dict[str, str] = field(default_factory=dict)

    def add(self, error: InvalidRecordError) -> None:
        self.counts[error.reason] = self.counts.get(error.reason, 0) + 1
        self.first_source.setdefault(error.reason, error.source)

    def merge(self, other: "SkippedRecords") -> None:
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
            self.first_source.setdefault(reason, other.first_source[reason])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no records skipped"
        parts = [f"{reason}: {count} (first at {self.first_source[reason]})"
                 for reason, count in sorted(self.counts.items())]
        return f"skipped {self.total} records: " + "; ".join(parts)


def handle_invalid(error: InvalidRecordError, skip_invalid: bool, skipped: SkippedRecords) -> None:
    """Raise the error, or count it when the user asked to skip invalid records."""
    if not skip_invalid:
        raise error
    skipped.add(error)
