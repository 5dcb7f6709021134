"""Small validators shared by the config sections: each raises ValueError naming the field."""
from __future__ import annotations

from typing import Iterable


def check_choice(field: str, value: object, allowed: Iterable[object]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not allowed; choose one of {list(allowed)}")


def check_positive(field: str, value: float | int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"{field}={value!r} must be > 0")


def check_non_negative(field: str, value: float | int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 0:
        raise ValueError(f"{field}={value!r} must be >= 0")


def check_range(field: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):
        raise ValueError(f"{field}={value!r} must lie in [{low}, {high}]")
