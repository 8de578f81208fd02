"""Turn an outbound mapping and a study's context into the bytes that are sent.

HL7 v2 messages are assembled segment by segment with hl7apy (its field definitions place
repetitions and components); FHIR resources are built as JSON and validated with fhir.resources'
R4B classes (R4B's ImagingStudy has the R4 shape; the default R5 classes do not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.hl7.message import escape
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
    from hl7apy.core import Segment
    from hl7apy.exceptions import HL7apyException

    out: list[str] = []
    for spec in mapping.segments:
        for sc in _occurrences(spec, scope):
            values = _segment_values(spec, sc)
            if spec.name == "MSH":
                _msh_defaults(values, mapping, scope)
            elif not values:
                continue
            try:
                seg = Segment(spec.name, version=_hl7apy_version(mapping.version))
                if spec.name == "MSH":
                    seg.msh_1, seg.msh_2 = "|", "^~\\&"
                for n in sorted(values):
                    if spec.name == "MSH" and n in (1, 2):
                        continue
                    for rep in _field_repetitions(values[n]):
                        seg.add_field(f"{spec.name.lower()}_{n}").value = rep
                out.append(seg.to_er7())
            except HL7apyException as exc:
                raise RenderError(f"segment {spec.name} (line {spec.line}): {exc}") from None
    return "\r".join(out)


def _hl7apy_version(version: str) -> str:
    return version if version in ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8") else "2.5"


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


def _field_repetitions(reps: dict[int, dict[int, dict[int, str]]]) -> list[str]:
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
