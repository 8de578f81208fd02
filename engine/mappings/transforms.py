"""Transforms an analyst can chain on a mapped value (`transform:` in a mapping file).

Each transform takes the current text value and its argument and returns the new value; ``None``
(no value) and ``NULL`` (explicit clear) pass through untouched except where noted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from engine.errors import RadBridgeError
from engine.hl7 import errors as E
from engine.hl7.message import NULL, Value


class TransformError(RadBridgeError, ValueError):
    """A value the transform cannot accept; ``code`` is the HL7 table 0357 condition it maps to."""

    def __init__(self, message: str, code: int = E.DATA_TYPE_ERROR) -> None:
        super().__init__(message)
        self.code = code
        self.where = ""  # the source path of the value, filled in by the mapping


@dataclass(frozen=True)
class Table:
    """A code table: source value -> target value, with an optional default and strictness."""

    name: str
    values: dict[str, str]
    default: str | None = None
    strict: bool = False
    case_sensitive: bool = False

    def lookup(self, value: str) -> str:
        key = value if self.case_sensitive else value.upper()
        found = self.values.get(key)
        if found is not None:
            return found
        if self.default is not None:
            return self.default
        if self.strict:
            raise TransformError(f"{value!r} is not in table {self.name!r}", E.TABLE_VALUE_NOT_FOUND)
        return value


_HL7_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?([+-]\d{4})?$")


def hl7_datetime_parts(text: str) -> tuple[list[int], str | None, str | None]:
    """Split an HL7 DT/DTM/TS value into its numbers, fraction and offset; raise on nonsense."""
    m = _HL7_TS.match(text.strip())
    if not m:
        raise TransformError(f"{text!r} is not an HL7 date/time (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ])")
    nums = [int(g) for g in m.groups()[:6] if g is not None]
    year, month, day = nums[0], nums[1] if len(nums) > 1 else 1, nums[2] if len(nums) > 2 else 1
    hour = nums[3] if len(nums) > 3 else 0
    minute = nums[4] if len(nums) > 4 else 0
    second = nums[5] if len(nums) > 5 else 0
    try:
        datetime(year, month, day, hour, minute, min(second, 59))
    except ValueError:
        raise TransformError(f"{text!r} is not a valid date/time ({year:04d}-{month:02d}-{day:02d})") from None
    if year < 1800:
        raise TransformError(f"{text!r}: year {year} is out of range")
    return nums, m.group(7), m.group(8)


def to_iso_date(value: str, fmt: str | None = None) -> str:
    if fmt:
        try:
            return datetime.strptime(value.strip(), fmt).date().isoformat()
        except ValueError:
            raise TransformError(f"{value!r} does not match date format {fmt!r}") from None
    nums, _, _ = hl7_datetime_parts(value)
    if len(nums) == 1:
        return f"{nums[0]:04d}"
    if len(nums) == 2:
        return f"{nums[0]:04d}-{nums[1]:02d}"
    return f"{nums[0]:04d}-{nums[1]:02d}-{nums[2]:02d}"


def to_iso_datetime(value: str, fmt: str | None = None) -> str:
    if fmt:
        try:
            return datetime.strptime(value.strip(), fmt).isoformat()
        except ValueError:
            raise TransformError(f"{value!r} does not match date/time format {fmt!r}") from None
    nums, frac, offset = hl7_datetime_parts(value)
    nums = nums + [1] * max(0, 3 - len(nums)) + [0] * max(0, 6 - max(len(nums), 3))
    out = f"{nums[0]:04d}-{nums[1]:02d}-{nums[2]:02d}T{nums[3]:02d}:{nums[4]:02d}:{nums[5]:02d}"
    if frac:
        out += "." + frac.ljust(6, "0")[:6]
    if offset:
        out += f"{offset[:3]}:{offset[3:]}"
    return out


TransformFn = Callable[[Value, Any], Value]


def _text(fn: Callable[[str, Any], Value]) -> TransformFn:
    def wrapper(value: Value, arg: Any) -> Value:
        if value is None or value is NULL or not isinstance(value, str):
            return value
        return fn(value, arg)
    return wrapper


def _default(value: Value, arg: Any) -> Value:
    return str(arg) if value is None or value is NULL else value


def _fmt(arg: Any) -> str | None:
    return arg.get("format") if isinstance(arg, dict) else None


TRANSFORMS: dict[str, TransformFn] = {
    "trim": _text(lambda v, _a: v.strip() or None),
    "upper": _text(lambda v, _a: v.upper()),
    "lower": _text(lambda v, _a: v.lower()),
    "title": _text(lambda v, _a: v.title()),
    "date": _text(lambda v, a: to_iso_date(v, _fmt(a))),
    "datetime": _text(lambda v, a: to_iso_datetime(v, _fmt(a))),
    "prefix": _text(lambda v, a: str(a) + v),
    "suffix": _text(lambda v, a: v + str(a)),
    "truncate": _text(lambda v, a: v[: int(a)]),
    "default": _default,
    # table and replace are bound at compile time (they need the file's tables or a compiled regex)
}

# The argument each transform takes: None (a bare name), or the Python type(s) of its argument.
TRANSFORM_ARGS: dict[str, tuple[type, ...] | None] = {
    "trim": None, "upper": None, "lower": None, "title": None,
    "date": (dict, type(None)), "datetime": (dict, type(None)),
    "prefix": (str, int), "suffix": (str, int), "truncate": (int,), "default": (str, int, float),
    "table": (str,), "replace": (dict,),
}


def make_replace(arg: dict[str, Any]) -> TransformFn:
    pattern = re.compile(str(arg["pattern"]))
    repl = str(arg.get("with", ""))

    def replace(value: Value, _a: Any) -> Value:
        if not isinstance(value, str):
            return value
        return pattern.sub(repl, value) or None
    return replace


def make_table(table: Table) -> TransformFn:
    def lookup(value: Value, _a: Any) -> Value:
        if not isinstance(value, str):
            return value
        return table.lookup(value)
    return lookup
