"""FHIR paths in mapping files: a small, FHIRPath-like subset that reads values out of a resource.

    birthDate                                         an element
    name.where(use='official').family                 only the items whose use is official
    name.given[0]                                     the first item (0-based, as FHIRPath)
    identifier.where(type.coding.code='MR').value     conditions look below the item
    identifier.where(system!='urn:oid:1.2.3').value   != as well as =
    link.where(type='replaced-by').other.identifier.value
    extension.where(url='http://example.org/ext').valueString
    code.coding.first().code                          first() / last()

Every step works on a collection, as FHIRPath does: ``name.given`` is every given name of every
name. A mapping reads the first value the path finds (``each:`` takes every item). A path that
names no value reads as "not there", never as an error: FHIR leaves out what it does not know.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from engine.errors import RadBridgeError

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_INDEX = re.compile(r"\[(\d+)\]")


class FhirPathError(RadBridgeError, ValueError):
    """A path that does not parse; the message says where."""


@dataclass(frozen=True)
class Test:
    path: tuple[Step, ...]
    op: str  # "=" | "!=" | "exists"
    literal: str = ""

    def holds(self, item: Any) -> bool:
        values = [_text(v) for v in walk([item], self.path)]
        if self.op == "exists":
            return bool(values)
        if self.op == "=":
            return self.literal in values
        return self.literal not in values


@dataclass(frozen=True)
class Step:
    name: str = ""  # an element name; "" for a function step
    index: int | None = None
    where: tuple[Test, ...] = ()
    function: str = ""  # first | last | where


@dataclass(frozen=True)
class FhirPath:
    text: str
    steps: tuple[Step, ...] = field(default=())
    # what the HL7 mapping code asks of a path (a FHIR path has no repetition syntax)
    repetition: int | None = None
    all_repetitions: bool = False

    def __str__(self) -> str:
        return self.text

    def values(self, resource: Any) -> list[Any]:
        return walk([resource], self.steps)


def walk(items: list[Any], steps: tuple[Step, ...]) -> list[Any]:
    for step in steps:
        if step.function == "first":
            items = items[:1]
        elif step.function == "last":
            items = items[-1:]
        elif step.function == "where":
            items = [i for i in items if all(t.holds(i) for t in step.where)]
        else:
            nxt: list[Any] = []
            for item in items:
                if not isinstance(item, dict):
                    continue
                v = item.get(step.name)
                if isinstance(v, list):
                    nxt.extend(x for x in v if x is not None)
                elif v is not None:
                    nxt.append(v)
            items = nxt
            if step.index is not None:
                items = items[step.index: step.index + 1]
        if not items:
            return []
    return items


def _text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    return None


def first_text(values: list[Any]) -> str | None:
    """The first primitive value as text (true/false for booleans); None when there is none."""
    for v in values:
        t = _text(v)
        if t is not None:
            return t
    return None


# --- parsing ------------------------------------------------------------------------------------------

class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> FhirPathError:
        return FhirPathError(f"FHIR path {self.text!r}: {what} at character {self.pos + 1}")

    def path(self, stop: str = "") -> tuple[Step, ...]:
        steps: list[Step] = []
        while True:
            steps.append(self.step())
            if self.pos < len(self.text) and self.text[self.pos] == ".":
                self.pos += 1
                continue
            if self.pos >= len(self.text) or self.text[self.pos] in stop:
                return tuple(steps)
            raise self.fail(f"unexpected {self.text[self.pos]!r}")

    def step(self) -> Step:
        m = _NAME.match(self.text, self.pos)
        if not m:
            raise self.fail("expected an element name")
        name = m.group(0)
        self.pos = m.end()
        if self.text.startswith("(", self.pos):
            return self.function(name)
        index = None
        im = _INDEX.match(self.text, self.pos)
        if im:
            index = int(im.group(1))
            self.pos = im.end()
        return Step(name=name, index=index)

    def function(self, name: str) -> Step:
        self.pos += 1  # (
        if name in ("first", "last", "exists"):
            if not self.text.startswith(")", self.pos):
                raise self.fail(f"{name}() takes no argument")
            self.pos += 1
            return Step(function=name)
        if name != "where":
            raise self.fail(f"unknown function {name}(); known: where(), first(), last(), exists() in where()")
        tests = [self.test()]
        while self.text.startswith(" and ", self.pos):
            self.pos += len(" and ")
            tests.append(self.test())
        if not self.text.startswith(")", self.pos):
            raise self.fail("expected ) or ' and '")
        self.pos += 1
        return Step(function="where", where=tuple(tests))

    def test(self) -> Test:
        while self.text.startswith(" ", self.pos):
            self.pos += 1
        steps = self.path(stop="=!) ")
        if steps[-1].function == "exists":
            return Test(steps[:-1], "exists")
        m = re.match(r"\s*(!=|=)\s*'((?:[^'\\]|\\.)*)'", self.text[self.pos:])
        if not m:
            raise self.fail("a where() condition is element='text', element!='text' or element.exists()")
        self.pos += m.end()
        return Test(steps, m.group(1), m.group(2).replace("\\'", "'"))


def parse_fhir_path(text: Any) -> FhirPath:
    if not isinstance(text, str) or not text.strip():
        raise FhirPathError(f"expected a FHIR path such as name.family, got {text!r}")
    parser = _Parser(text.strip())
    steps = parser.path()
    if any(s.function == "exists" for s in steps):
        raise FhirPathError(f"FHIR path {text!r}: exists() is a test; use it inside where()")
    return FhirPath(parser.text, steps)


class FhirSource:
    """A resource as a mapping's source: what ``Spec`` asks of an HL7 message, for FHIR paths."""

    def __init__(self, resource: dict[str, Any]) -> None:
        self.resource = resource

    def read(self, path: FhirPath) -> str | None:
        return first_text(path.values(self.resource))

    def items(self, path: FhirPath) -> list[Any]:
        return path.values(self.resource)
