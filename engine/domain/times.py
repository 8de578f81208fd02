"""Comparing event times of messages (ISO text from the mapping's datetime transform)."""

from __future__ import annotations

from datetime import datetime


def parse_iso(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def is_older(candidate: str | None, current: str | None) -> bool:
    """True when ``candidate`` is strictly older than ``current`` (unknown times are never older)."""
    a, b = parse_iso(candidate), parse_iso(current)
    if a is None or b is None:
        return False
    if (a.tzinfo is None) != (b.tzinfo is None):  # one sender gave an offset, the other did not
        a, b = a.replace(tzinfo=None), b.replace(tzinfo=None)
    return a < b
