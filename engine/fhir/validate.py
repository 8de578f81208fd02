"""Reading a request body as an R4 resource: JSON, resourceType, and fhir.resources (R4B classes,
which have R4's shape for the resources served here) with errors an EHR developer can act on."""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

import pydantic
from fhir.resources.R4B import get_fhir_model_class

from engine.fhir.outcome import FhirError, issue

FHIR_VERSION = "4.0.1"
# Elements a FHIR R5 sender uses where R4 has others: named in the error so the sender knows why.
R5_ELEMENTS: dict[str, dict[str, str]] = {
    "ServiceRequest": {"reason": "reasonCode / reasonReference", "focus": "(nothing)",
                       "bodyStructure": "bodySite", "location": "locationCode / locationReference"},
    "ImagingStudy": {"procedure": "procedureCode / procedureReference", "reason": "reasonCode / reasonReference"},
    "Bundle": {"issues": "(nothing)"},
    "Patient": {},
}
MAX_ISSUES = 20


MAX_DEPTH = 100  # objects and arrays inside each other; a real resource (even a Bundle) stays under 30
MAX_ID_DIGITS = 18  # ids are the store's BIGINTs: a longer number is none of ours (and overflows the driver)


def local_id(text: str) -> int | None:
    """A resource id of this server as its number, or None when ``text`` cannot be one."""
    return int(text) if text.isdigit() and len(text) <= MAX_ID_DIGITS else None


def parse_json(body: bytes) -> Any:
    try:
        data = json.loads(body)
    except UnicodeDecodeError as exc:
        raise FhirError(400, f"the body is not UTF-8 text: {exc}", "structure") from None
    except json.JSONDecodeError as exc:
        raise FhirError(400, f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                        "structure") from None
    except RecursionError:  # deeper than the parser goes
        data = None
        too_deep: bool | None = True
    else:  # validation and mapping walk it recursively: refuse it here
        too_deep = text_deeper_than(body, MAX_DEPTH)
        if too_deep is None:
            too_deep = nesting_depth(data) > MAX_DEPTH
    if too_deep:
        raise FhirError(400, f"the body nests objects or arrays deeper than {MAX_DEPTH} levels", "structure")
    if b"\\u00" in body:  # JSON carries a control character only as an escape (\\u, lower-case u)
        found = control_character_at(data)
        if found is not None:
            loc, char = found
            what = "a NUL character (U+0000)" if char == "\x00" else f"the control character U+{ord(char):04X}"
            where = expression(str(data.get("resourceType") or "body"), loc) if isinstance(data, dict) else "body"
            raise FhirError(400, f"{where} contains {what}: FHIR strings may not hold characters below U+0020"
                            " other than tab, CR and LF", "value", where)
    return data


FORBIDDEN_CHARACTER = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


def control_character_at(data: Any) -> tuple[tuple[Any, ...], str] | None:
    """The first string (or key) holding a character FHIR forbids (below U+0020 but tab, CR, LF):
    its location and the character; None when there is none. A loop, not recursion."""
    todo: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    while todo:
        node, loc = todo.pop()
        if isinstance(node, str):
            m = FORBIDDEN_CHARACTER.search(node)
            if m:
                return loc, m.group()
        elif isinstance(node, dict):
            for key, child in node.items():
                m = FORBIDDEN_CHARACTER.search(key)
                if m:
                    return (*loc, "?"), m.group()
                todo.append((child, (*loc, key)))
        elif isinstance(node, list):
            todo.extend((child, (*loc, i)) for i, child in enumerate(node))
    return None


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string, escapes and all
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"{}[]")))
_BRACKET_STEP = bytes.maketrans(b"{[}]", b"\x01\x01\xff\xff")  # opening +1, closing -1 (as a signed byte)


def text_deeper_than(body: bytes, limit: int) -> bool | None:
    """Whether the JSON text ``body`` (json.loads has read it) nests objects and arrays deeper than
    ``limit``, as ``nesting_depth`` counts, told from its bytes in C rather than by a walk over the
    parsed objects; None when the text is not UTF-8 (json.loads reads UTF-16 and UTF-32 too)."""
    if b"\x00" in body:
        return None  # UTF-16 or UTF-32: in UTF-8 JSON a NUL is always escaped
    if body.count(b"{") + body.count(b"[") <= limit:
        return False  # nothing nests deeper than it has brackets (those in strings count here too)
    steps = _STRING.sub(b"", body).translate(None, _NOT_BRACKET).translate(_BRACKET_STEP)
    return max(accumulate(memoryview(steps).cast("b")), default=0) > limit


def nesting_depth(data: Any) -> int:
    """How deep objects and arrays nest in parsed JSON (a loop, not recursion; stops past MAX_DEPTH)."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(data, 1)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            break
        todo.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def expression(resource_type: str, loc: tuple[Any, ...]) -> str:
    out = resource_type
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _r5_hint(resource_type: str, loc: tuple[Any, ...]) -> str:
    if not loc:
        return ""
    head = str(loc[0])
    r4 = R5_ELEMENTS.get(resource_type, {}).get(head)
    if r4 is not None:
        return f" ({head} is FHIR R5; R4 has {r4})"
    if "concept" in loc:
        return " (a CodeableReference {concept: ...} is FHIR R5; R4 has a CodeableConcept here)"
    return ""


def check_resource(data: Any, expected: str | tuple[str, ...] | None = None, where: str = "") -> dict[str, Any]:
    """The resource as a dict, validated; FhirError 400 naming every element that is wrong."""
    if not isinstance(data, dict):
        raise FhirError(400, f"{where}expected a JSON object (a FHIR resource), got {type(data).__name__}", "structure")
    rtype = data.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise FhirError(400, f"{where}the resource has no resourceType", "required", "resourceType")
    wanted = (expected,) if isinstance(expected, str) else expected
    if wanted and rtype not in wanted:
        raise FhirError(400, f"{where}resourceType is {rtype!r}, expected {' or '.join(wanted)}", "structure",
                        "resourceType")
    try:
        model = get_fhir_model_class(rtype)
    except (KeyError, ValueError):
        raise FhirError(400, f"{where}{rtype!r} is not a FHIR R4 resource type", "not-supported",
                        "resourceType") from None
    try:
        model.model_validate(data)
    except pydantic.ValidationError as exc:
        issues = []
        for err in exc.errors()[:MAX_ISSUES]:
            loc = tuple(err.get("loc") or ())
            expr = expression(rtype, loc)
            kind = err.get("type", "")
            if kind == "extra_forbidden":
                text = f"{where}{expr}: unknown element (not in FHIR R4 {rtype}){_r5_hint(rtype, loc)}"
            elif kind == "missing":
                text = f"{where}{expr}: required element is missing"
            else:
                text = f"{where}{expr}: {err.get('msg', 'invalid')}{_r5_hint(rtype, loc)}"
            issues.append(issue(text, "required" if kind == "missing" else "structure", expression=expr))
        first = issues[0]
        raise FhirError(400, str(first["diagnostics"]), str(first["code"]), first["expression"][0],
                        more=issues[1:]) from None
    except Exception as exc:  # a model that cannot even be built from this (odd nesting)
        raise FhirError(400, f"{where}{rtype} could not be read: {type(exc).__name__}: {exc}", "structure") from None
    return data
