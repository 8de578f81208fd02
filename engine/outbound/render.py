"""Turn an outbound mapping and a study's context into the bytes that are sent.

HL7 v2 messages are assembled segment by segment from the mapping's paths: each value goes to its
field, repetition, component and subcomponent, written as hl7apy's to_er7 wrote it (its field layouts
are read once, when the mapping loads: mapping.SegmentSpec.layout); FHIR resources are built as JSON
and validated with fhir.resources' R4B classes (R4B's ImagingStudy has the R4 shape; the default R5
classes do not).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from engine.hl7.message import escape
from engine.hl7.structure import Layout
from engine.outbound.context import RenderContext
from engine.outbound.mapping import ElementSpec, OutboundMapping, RenderError, Scope, SegmentSpec
from engine.store.types import JsonObject

HL7_CONTENT_TYPE = "application/hl7-v2; charset=utf-8"
FHIR_CONTENT_TYPE = "application/fhir+json"


@dataclass
class Rendered:
    payload: str
    content_type: str
    resource: str | None = None  # fhir: resource type
    conditional: str | None = None  # fhir: the conditional-update query (identifier=system|value)
    control_id: str | None = None


def render(mapping: OutboundMapping, ctx: RenderContext) -> Rendered:
    scope = Scope(ctx)
    if mapping.target == "hl7v2":
        return Rendered(render_hl7(mapping, scope), HL7_CONTENT_TYPE, control_id=ctx["delivery"]["control_id"])
    resource = build_resource(mapping, scope)
    validate_resource(resource)
    return Rendered(json.dumps(resource, ensure_ascii=False, separators=(",", ":")), FHIR_CONTENT_TYPE,
                    resource=mapping.resource, conditional=mapping.conditional_query(scope),
                    control_id=ctx["delivery"]["control_id"])


# --- HL7 v2 -------------------------------------------------------------------------------------------

def render_hl7(mapping: OutboundMapping, scope: Scope) -> str:
    return "\r".join(_segment_er7(spec, values) for spec, values in placed_segments(mapping, scope))


def placed_segments(mapping: OutboundMapping, scope: Scope) -> list[tuple[SegmentSpec, FieldValues]]:
    """The segments the message has, in order, each with its values placed by field, repetition,
    component and subcomponent (MSH with its defaults; other segments with no value are left out)."""
    out: list[tuple[SegmentSpec, FieldValues]] = []
    for spec in mapping.segments:
        for sc in _occurrences(spec, scope):
            values = _segment_values(spec, sc)
            if spec.name == "MSH":
                _msh_defaults(values, mapping, scope)
            elif not values:
                continue
            out.append((spec, values))
    return out


def _segment_er7(spec: SegmentSpec, values: FieldValues) -> str:
    """One segment's text: each field's repetitions placed by its number, as hl7apy's to_er7 wrote them."""
    layout = spec.layout or {}
    msh = spec.name == "MSH"
    parts = [spec.name, "^~\\&"] if msh else [spec.name]
    for n in range(3 if msh else 1, max(values, default=0) + 1):
        reps = values.get(n)
        parts.append("~".join(er7_field(r, layout.get(n)) for r in field_repetitions(reps)) if reps else "")
    return "|".join(parts)


def _occurrences(spec: SegmentSpec, scope: Scope) -> list[Scope]:
    if spec.each is None:
        scopes = [scope]
    else:
        items = scope.get(spec.each) or []
        scopes = [scope.child(spec.alias, item) for item in items]
    return [s for s in scopes if all(c.holds(s) for c in spec.when)]


# field -> repetition -> component (0: the whole field) -> subcomponent (0: the whole component)
FieldValues = dict[int, dict[int, dict[int, dict[int, str]]]]


def _segment_values(spec: SegmentSpec, scope: Scope) -> FieldValues:
    values: FieldValues = {}
    for path, v in spec.fields:
        value = v.evaluate(scope, escape)
        if value in (None, "", []):
            continue
        text = str(value) if not isinstance(value, bool) else ("Y" if value else "N")
        rep = values.setdefault(path.field, {}).setdefault(path.repetition or 1, {})
        rep.setdefault(path.component or 0, {})[path.subcomponent or 0] = text
    return values


def _msh_defaults(values: FieldValues, mapping: OutboundMapping, scope: Scope) -> None:
    structure = mapping.message.replace("^", "_") if mapping.message.count("^") == 1 else ""
    defaults = {7: scope.get("delivery.now"), 9: mapping.message + (f"^{structure}" if structure else ""),
                10: scope.get("delivery.control_id"), 11: "P", 12: mapping.version, 18: "UNICODE UTF-8"}
    for n, v in defaults.items():
        if n not in values and v:
            values[n] = {1: {0: {0: str(v)}}}


def field_repetitions(reps: dict[int, dict[int, dict[int, str]]]) -> list[str]:
    """A field's repetitions as text, its components joined by ^ and subcomponents by &."""
    out = []
    for r in range(1, max(reps) + 1):
        comps = reps.get(r, {})
        if 0 in comps:  # the whole field was given (a template may carry its own ^)
            out.append(comps[0].get(0, ""))
            continue
        parts = []
        for c in range(1, max(comps, default=0) + 1):
            subs = comps.get(c, {})
            if 0 in subs:
                parts.append(subs[0])
            else:
                parts.append("&".join(subs.get(s, "") for s in range(1, max(subs, default=0) + 1)))
        out.append("^".join(parts).rstrip("^"))
    return out


# What hl7apy made of a field's text (it parsed it into its data type and wrote it back), without its
# object tree: a composite type drops trailing empty components (and a composite component trailing
# empty subcomponents), a blank one counts as empty, one past the type's is kept only with a value;
# each piece is escaped as a text value (| ~ and a backslash that starts no escape sequence), numbers
# (NM, SI) are written as numbers when they are.
# A line break, read in as \.br\ (engine.hl7.message.escape), stays one (hl7apy escaped it to \E\.br\E\).
_STRAY_ESCAPE = re.compile(r"(?<!\\[HNFSTRE])(?<!\\\.br)\\(?![HNFSTRE]\\)(?!\.br\\)")


def er7_field(text: str, layout: Layout | None) -> str:
    """One repetition of a field as it goes on the wire; ``layout``: the field's (None: a Z-segment's)."""
    if layout is None or layout.parts is None:
        datatype = layout.datatype if layout is not None else None
        if "^" not in text and "&" not in text:
            return _er7_text(text, datatype)
        return "^".join("&".join(_er7_text(s, datatype) for s in c.split("&")) for c in text.split("^"))
    if "^" not in text and "&" not in text:  # one value (most fields): its first component's first piece
        if not text or text.isspace():
            return ""
        first = layout.part(0)
        if first is None or first.parts is None:
            return _er7_text(text, first.datatype if first is not None else None)
        return _er7_text(text, _datatype(first.part(0)))
    comps: list[str | None] = [None if c.isspace() or not c else c for c in text.split("^")]
    defined = len(layout.parts)
    if len(comps) > defined:  # components past the type's: only those with a value, after the others
        comps[defined:] = [c for c in comps[defined:] if c is not None]
    while comps and comps[-1] is None:
        comps.pop()
    out = []
    for i, c in enumerate(comps):
        if c is None:
            out.append("")
            continue
        part = layout.part(i)
        if part is None or part.parts is None:
            dt = part.datatype if part is not None else None
            out.append("&".join(_er7_text(s, dt) for s in c.split("&")) if "&" in c else _er7_text(c, dt))
            continue
        pieces = c.split("&")
        if len(pieces) > len(part.parts or ()):  # more subcomponents than the type has: none dropped
            out.append("&".join("" if s.isspace() else _er7_text(s, _datatype(part.part(j)))
                                for j, s in enumerate(pieces)))
            continue
        subs: list[str | None] = [None if s.isspace() or not s else s for s in pieces]
        while subs and subs[-1] is None:
            subs.pop()
        out.append("&".join("" if s is None else _er7_text(s, _datatype(part.part(j))) for j, s in enumerate(subs)))
    return "^".join(out)


def _datatype(layout: Layout | None) -> str | None:
    return layout.datatype if layout is not None else None


def _er7_text(text: str, datatype: str | None) -> str:
    if datatype == "SI" and text:
        with contextlib.suppress(ValueError):
            return str(int(text))
    elif datatype == "NM" and text:
        with contextlib.suppress(InvalidOperation):
            return str(Decimal(text))
    if "|" in text or "~" in text:
        text = text.replace("|", "\\F\\").replace("~", "\\R\\")
    return _STRAY_ESCAPE.sub(r"\\E\\", text) if "\\" in text else text


# --- FHIR -------------------------------------------------------------------------------------------------

def build_resource(mapping: OutboundMapping, scope: Scope) -> JsonObject:
    resource: JsonObject = {"resourceType": mapping.resource}
    _fill(resource, mapping.elements, scope)
    return resource


def _fill(node: JsonObject, elements: list[ElementSpec], scope: Scope) -> None:
    for el in elements:
        if el.when and not all(c.holds(scope) for c in el.when):
            continue
        if el.each is not None:
            items = []
            for item in scope.get(el.each) or []:
                child: JsonObject = {}
                _fill(child, el.children, scope.child(el.alias, item))
                if child:
                    items.append(child)
            if items:
                _set(node, el.path, items)
            continue
        assert el.value is not None
        value = el.value.evaluate(scope)
        if value in (None, "", []):
            continue
        _set(node, el.path, value)


def _set(node: JsonObject, path: list[tuple[str, int | None]], value: Any) -> None:
    cur: Any = node
    for i, (name, index) in enumerate(path):
        last = i == len(path) - 1
        if index is None:
            if last:
                cur[name] = value
            else:
                cur = cur.setdefault(name, {})
            continue
        lst = cur.setdefault(name, [])
        while len(lst) <= index:
            lst.append({})
        if last:
            lst[index] = value
        else:
            cur = lst[index]


def validate_resource(resource: JsonObject) -> None:
    """Check the resource against the R4 (R4B) definitions; RenderError names what is wrong.

    Empty objects left by fields that had no value (an identifier whose value was empty) are
    removed first: FHIR forbids empty elements."""
    prune_empty(resource)
    try:
        from fhir.resources.R4B import get_fhir_model_class
        cls = get_fhir_model_class(resource["resourceType"])
        cls.model_validate(resource)
    except Exception as exc:  # pydantic's ValidationError, or an unknown resource type
        lines = str(exc).splitlines()
        raise RenderError(f"not a valid R4 {resource.get('resourceType')}: " + " ".join(lines[:6])) from None


def prune_empty(node: Any) -> bool:
    """Drop empty dicts and lists in place; True when ``node`` itself is empty."""
    if isinstance(node, dict):
        for k in list(node):
            if prune_empty(node[k]):
                del node[k]
        return not node
    if isinstance(node, list):
        node[:] = [x for x in node if not prune_empty(x)]
        return not node
    return node in (None, "")
