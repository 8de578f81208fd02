"""C-FIND attribute matching (PS3.4 C.2.2.2): universal, single value, wildcard, list of UIDs or
values, and date/time ranges. One parsed :class:`Match` turns into an SQL condition (the index)
or tests a Python value (the worklist's derived fields).

Case: matching is case-sensitive except person names, which ignore case when the channel says so
(``names_case_insensitive``, the default: modalities type names in any case).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, func, literal, or_


@dataclass(frozen=True)
class Match:
    kind: str  # universal | single | wildcard | list | range
    values: tuple[str, ...] = ()
    low: str | None = None
    high: str | None = None
    fold_case: bool = False

    @property
    def universal(self) -> bool:
        return self.kind == "universal"


def parse(raw: Any, vr: str, *, fold_case: bool = False) -> Match:
    """A query key's value as sent (already decoded to text) into a Match."""
    text = "" if raw is None else str(raw)
    text = text.strip(" \0")
    if text in ("", "*"):
        return Match("universal")
    if vr == "UI":
        return Match("list" if "\\" in text else "single", tuple(v.strip() for v in text.split("\\") if v.strip()))
    if vr in ("DA", "TM", "DT") and "-" in text.replace("\\", ""):
        low, _, high = text.partition("-")
        return Match("range", low=low.strip() or None, high=high.strip() or None)
    if "\\" in text and vr != "PN":
        return Match("list", tuple(v for v in text.split("\\")), fold_case=fold_case)
    if "*" in text or "?" in text:
        return Match("wildcard", (text,), fold_case=fold_case)
    return Match("single", (text,), fold_case=fold_case)


def _like_pattern(pattern: str) -> str:
    out = []
    for ch in pattern:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def _glob_pattern(pattern: str) -> str:
    return pattern.replace("[", "[[]")


def _range_bounds(m: Match, vr: str) -> tuple[str | None, str | None]:
    """Bounds comparable with stored text: dates as YYYYMMDD, times as HHMMSS[.frac]."""
    low, high = m.low, m.high
    if vr == "TM":
        low = low.replace(":", "") if low else None
        high = (high.replace(":", "") + "\uffff") if high else None  # 1200 includes 120059.99
    if vr == "DA":
        low = low.replace(".", "") if low else None
        high = high.replace(".", "") if high else None
    return low, high


def sql_condition(column: Any, m: Match, vr: str, dialect: str) -> ColumnElement[bool] | None:
    """The WHERE condition for one key, or None for universal matching."""
    if m.universal:
        return None
    if m.kind == "range":
        low, high = _range_bounds(m, vr)
        parts = []
        if low:
            parts.append(column >= low)
        if high:
            parts.append(column <= high)
        return and_(*parts) if parts else None
    values = m.values
    if m.kind == "list":
        return _list_condition(column, m, vr, dialect)
    value = values[0]
    if m.kind == "wildcard":
        if m.fold_case:
            return func.lower(column).like(_like_pattern(value.lower()), escape="\\")
        if dialect == "sqlite":  # SQLite's LIKE ignores ASCII case; GLOB does not
            return column.op("GLOB")(literal(_glob_pattern(value)))
        return column.like(_like_pattern(value), escape="\\")
    if vr == "DA" and m.kind == "single":
        return column == value.replace(".", "")
    if m.fold_case:
        return func.lower(column) == value.lower()
    return column == value


IN_CHUNK = 1000  # values per IN (...): a list of 40,000 UIDs is 40 of them, not 40,000 ORs


def _list_condition(column: Any, m: Match, vr: str, dialect: str) -> ColumnElement[bool] | None:
    """List matching: plain values become IN lists of literals (no bound parameter per value, so no
    limit on how many SQLite or PostgreSQL take), wildcards and ranges their own conditions."""
    exact: list[str] = []
    others: list[ColumnElement[bool]] = []
    for v in m.values:
        one = parse(v, vr, fold_case=m.fold_case)
        if one.universal:
            return None  # one value matches everything: so does the list
        if one.kind == "single":
            value = one.values[0]
            exact.append(value.replace(".", "") if vr == "DA" else value.lower() if one.fold_case else value)
        else:
            cond = sql_condition(column, one, vr, dialect)
            if cond is not None:
                others.append(cond)
    target = func.lower(column) if m.fold_case else column
    unique = list(dict.fromkeys(exact))
    ins = [target.in_(bindparam(f"list_{i}", unique[i:i + IN_CHUNK], expanding=True, literal_execute=True,
                                unique=True))
           for i in range(0, len(unique), IN_CHUNK)]
    return or_(*ins, *others)


def _regex(pattern: str, fold_case: bool) -> re.Pattern[str]:
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(f"^{body}$", re.IGNORECASE | re.DOTALL if fold_case else re.DOTALL)


def matches(value: Any, m: Match, vr: str) -> bool:
    """The same rules on a Python value (None or '' matches only universal matching)."""
    if m.universal:
        return True
    text = "" if value is None else str(value)
    if not text:
        return False
    if m.kind == "range":
        low, high = _range_bounds(m, vr)
        if vr == "TM":
            text = text.replace(":", "")
        return (low is None or text >= low) and (high is None or text <= high)
    if m.kind == "list":
        return any(matches(value, parse(v, vr, fold_case=m.fold_case), vr) for v in m.values)
    if m.kind == "wildcard":
        return bool(_regex(m.values[0], m.fold_case).match(text))
    if m.fold_case:
        return text.lower() == m.values[0].lower()
    return text == m.values[0]
