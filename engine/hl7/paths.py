"""HL7 field paths as analysts write them: ``PID-5.1``, ``PID-3(2).4.1``, ``OBX[2]-5``, ``PID-3(*)``.

Grammar: ``SEG[occurrence]-FIELD(repetition).COMPONENT.SUBCOMPONENT`` where everything after the
field number is optional, occurrence and repetition are 1-based and repetition ``*`` means all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from engine.errors import RadBridgeError
from engine.hl7.message import NULL, Message, Segment, Value, component

_PATH = re.compile(
    r"^(?P<seg>[A-Z][A-Z0-9]{2})(?:\[(?P<occ>\d+)\])?-(?P<field>\d+)(?:\((?P<rep>\d+|\*)\))?"
    r"(?:\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?)?$"
)
_RELATIVE = re.compile(r"^(?P<comp>\d+)(?:\.(?P<sub>\d+))?$")


class PathError(RadBridgeError, ValueError):
    pass


@dataclass(frozen=True, slots=True)
class HL7Path:
    segment: str
    field: int
    occurrence: int = 1
    repetition: int | None = None  # None = first repetition (or "the" value); 0 = all
    component: int | None = None
    subcomponent: int | None = None
    text: str = ""

    @property
    def all_repetitions(self) -> bool:
        return self.repetition == 0

    def __str__(self) -> str:
        return self.text


def parse_path(text: str) -> HL7Path:
    m = _PATH.match(text.strip())
    if not m:
        raise PathError(f"{text!r} is not an HL7 path; write it like PID-5.1, PID-3(2).4.1 or OBX[2]-5")
    rep = m["rep"]
    field = int(m["field"])
    if field < 1:
        raise PathError(f"{text!r}: field numbers start at 1")
    comp = int(m["comp"]) if m["comp"] else None
    sub = int(m["sub"]) if m["sub"] else None
    if comp == 0 or sub == 0 or m["occ"] == "0" or rep == "0":
        raise PathError(f"{text!r}: occurrences, repetitions, components and subcomponents start at 1")
    return HL7Path(segment=m["seg"], field=field, occurrence=int(m["occ"]) if m["occ"] else 1,
                   repetition=0 if rep == "*" else (int(rep) if rep else None),
                   component=comp, subcomponent=sub, text=text.strip())


def parse_relative(text: str) -> tuple[int, int | None]:
    """A component path inside one repetition: ``5`` or ``4.1``."""
    m = _RELATIVE.match(str(text).strip())
    if not m:
        raise PathError(f"{text!r} is not a component path; write it like 5 or 4.1")
    comp = int(m["comp"])
    sub = int(m["sub"]) if m["sub"] else None
    if comp < 1 or sub == 0:
        raise PathError(f"{text!r}: components start at 1")
    return comp, sub


class SegmentSource:
    """Where paths are read from: a message, optionally with some segments scoped to one group.

    An ORM with two ORC/OBR groups is mapped once per group; inside a group ``OBR-2`` means the
    group's OBR, while ``PID-3`` still comes from the message.
    """

    __slots__ = ("message", "scope", "scoped_names", "_repetitions", "memo")

    def __init__(self, message: Message, scope: list[Segment] | None = None,
                 scoped_names: frozenset[str] | set[str] = frozenset()) -> None:
        """``scoped_names``: segment names that belong to a group; inside a group they are read from
        the group only, never from another group (an order without TQ1 has no TQ1)."""
        self.message = message
        self.scope: dict[str, list[Segment]] = {}
        for seg in scope or []:
            self.scope.setdefault(seg.name, []).append(seg)
        self.scoped_names = scoped_names if scope is not None else frozenset()
        # a mapping reads the same fields again and again (PID-3 for the identity, its issuer, its
        # type, every identifier): each field's repetitions are split once per source
        self._repetitions: dict[tuple[str, int, int], list[str]] = {}
        self.memo: dict[Any, Any] = {}  # what evaluators worked out from this source (Spec: selected repetitions)

    def segment(self, name: str, occurrence: int = 1) -> Segment | None:
        segs = self.scope.get(name)
        if segs is not None:
            return segs[occurrence - 1] if occurrence <= len(segs) else None
        if name in self.scoped_names:
            return None
        return self.message.segment(name, occurrence)

    def absolute(self, path_text: str) -> str:
        """A path as seen inside the group, rewritten to the segment's occurrence in the whole
        message (the second order's ORC-7 is ORC[2]-7), for error locations."""
        try:
            p = parse_path(path_text)
        except PathError:
            return path_text
        seg = self.segment(p.segment, p.occurrence) if p.segment in self.scope else None
        if seg is None:
            return path_text
        n = next(i for i, s in enumerate(self.message.all(p.segment), 1) if s is seg)
        rest = path_text.split("-", 1)[1]
        return f"{p.segment}[{n}]-{rest}" if n > 1 else f"{p.segment}-{rest}"

    def repetitions(self, path: HL7Path) -> list[str]:
        """The field's repetitions (the list is shared: do not change it)."""
        key = (path.segment, path.occurrence, path.field)
        found = self._repetitions.get(key)
        if found is None:
            seg = self.segment(path.segment, path.occurrence)
            found = self._repetitions[key] = [] if seg is None else seg.repetitions(path.field)
        return found

    def read(self, path: HL7Path) -> Value:
        """The value at ``path`` (first repetition unless the path names one)."""
        reps = self.repetitions(path)
        if not reps:
            return None
        idx = (path.repetition or 1) - 1
        if idx >= len(reps):
            return None
        return component(reps[idx], path.component, path.subcomponent, self.message.seps)

    def read_all(self, path: HL7Path) -> list[Value]:
        return [component(r, path.component, path.subcomponent, self.message.seps)
                for r in self.repetitions(path)]


__all__ = ["HL7Path", "NULL", "PathError", "SegmentSource", "parse_path", "parse_relative"]
