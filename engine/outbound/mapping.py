"""Outbound mapping files: what the EHR gets, written by analysts (docs/outbound.md).

A file with ``source: store`` builds one outbound message from what the engine knows about a
study (its patient, order, series, instances and report)::

    source: store
    target: hl7v2                 # or fhir
    message: ORU^R01              # hl7v2: MSH-9; fhir: resource: ImagingStudy
    segments:                     # hl7v2: segments in order, each with HL7 paths to values
      - segment: PID
        fields:
          PID-3.1: patient.id
          PID-5: {template: "{patient.family_name}^{patient.given_name}"}
      - segment: OBX
        each: report.lines        # one segment per item; the item is "item" (or as: NAME)
        fields:
          OBX-1: item.index
          OBX-5: item.text
    fields:                       # fhir: element paths to values; each: builds a list
      identifier[0].value: {template: "urn:oid:{study.uid}"}
      series: {each: study.series, as: s, fields: {uid: s.uid}}

A value is a store path (``study.accession``), or ``{from: PATH | [PATHS], value: TEXT,
template: "...{PATH}...", transform: [...], when: {...}, required: true}``. Every path is checked
against the store's fields when the file loads, so a typo is an error with its line, not an empty
field at 3 a.m.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.errors import RadBridgeError
from engine.hl7.paths import HL7Path, PathError, parse_path
from engine.hl7.structure import Layout, segment_layout
from engine.mappings.spec import Compiler as InboundCompiler
from engine.mappings.spec import condition_holds
from engine.mappings.transforms import Table, TransformError
from engine.yamlfile import ConfigProblem, LineDict, LineList

TARGETS = ("hl7v2", "fhir")
FHIR_RESOURCES = ("ImagingStudy", "DiagnosticReport")
_ELEMENT = re.compile(r"^[a-z][A-Za-z0-9]*(\[\d+\])?$")

# What a store path can name (docs/outbound.md lists them with examples). ``extra.NAME`` reaches
# site-specific values kept from inbound mappings (patient.extra.X, order.extra.X).
CONTEXT_FIELDS: dict[str, tuple[str, ...]] = {
    "study": ("uid", "accession", "id", "date", "time", "started", "description", "modalities",
              "num_series", "num_instances", "referring_physician", "series", "state", "reconciliation",
              "times_reconciled", "matched_by", "size_bytes"),
    "patient": ("id", "issuer", "system", "type_code", "family_name", "given_name", "middle_name", "prefix",
                "suffix", "name", "birth_date", "sex", "identifiers", "extra"),
    "order": ("accession", "placer_number", "placer_issuer", "filler_number", "status", "procedure_code",
              "procedure_text", "procedure_scheme", "modality", "requested_procedure_id", "sps_id",
              "ordering_provider", "reason", "priority", "scheduled_at", "extra"),
    "event": ("kind", "at", "result_status", "corrected"),
    "report": ("instance_uid", "sop_class", "kind", "title", "text", "lines", "pdf_base64", "completion",
               "verification", "observer", "content_datetime", "series_uid"),
    "engine": ("name", "facility", "aet", "dicomweb_base"),
    "delivery": ("id", "control_id", "now"),
}
ITEM_FIELDS: dict[str, tuple[str, ...]] = {  # what the items of a list hold (each:)
    "study.series": ("uid", "number", "modality", "description", "body_part", "num_instances", "instances",
                     "station_name", "started"),
    "instances": ("uid", "sop_class", "number", "frames"),
    "report.lines": ("index", "text"),
    "study.modalities": (),  # the items are the codes themselves
    "patient.identifiers": ("value", "issuer", "system", "type_code", "kind"),
}


class RenderError(RadBridgeError, ValueError):
    """The store lacks what the mapping requires, or the result is not a valid message."""


# --- transforms that format store values for the EHR -------------------------------------------------

def _digits_date(v: str) -> str:
    """ISO (1970-01-31) or DICOM DA (19700131) -> the digits; partial ISO dates keep their precision."""
    text = v.strip()
    if re.fullmatch(r"\d{4}(-\d{2}(-\d{2})?)?", text):
        return text.replace("-", "")
    if re.fullmatch(r"\d{8}", text):
        return text
    raise TransformError(f"{v!r} is not a date (YYYY-MM-DD or YYYYMMDD)")


def _hl7_datetime(v: str) -> str:
    text = v.strip()
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        if re.fullmatch(r"\d{4,14}(\.\d{1,6})?([+-]\d{4})?", text):
            return text
        raise TransformError(f"{v!r} is not a date/time") from None
    out = dt.strftime("%Y%m%d%H%M%S")
    if dt.utcoffset() is not None:
        out += dt.strftime("%z")
    return out


def _fhir_date(v: str) -> str:
    d = _digits_date(v)
    return "-".join(p for p in (d[:4], d[4:6], d[6:8]) if p)


def _fhir_datetime(v: str) -> str:
    text = v.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}T.*", text):
        return text
    m = re.fullmatch(r"(\d{4})(\d{2})(\d{2})(\d{2})?(\d{2})?(\d{2})?(?:\.\d+)?([+-]\d{4})?", text)
    if not m:
        raise TransformError(f"{v!r} is not a date/time")
    y, mo, d, hh, mi, ss, tz = m.groups()
    if hh is None:
        return f"{y}-{mo}-{d}"
    # DICOM times carry no zone: they are the site's local time, which is the engine's
    tz = tz or datetime.now().astimezone().strftime("%z")
    zone = "Z" if tz in ("+0000", "-0000") else f"{tz[:3]}:{tz[3:]}"
    return f"{y}-{mo}-{d}T{hh}:{mi or '00'}:{ss or '00'}{zone}"


def _text_only(fn: Callable[[str], str]) -> Callable[[Any, Any], Any]:
    def apply(value: Any, _arg: Any) -> Any:
        if value is None:
            return None
        return fn(str(value))
    return apply


OUT_TRANSFORMS: dict[str, Callable[[Any, Any], Any]] = {
    "hl7_date": _text_only(_digits_date),
    "hl7_datetime": _text_only(_hl7_datetime),
    "fhir_date": _text_only(_fhir_date),
    "fhir_datetime": _text_only(_fhir_datetime),
    "integer": lambda v, _a: None if v in (None, "") else int(v),
}
OUT_TRANSFORM_ARGS: dict[str, Any] = {name: None for name in OUT_TRANSFORMS}


# --- compiled values --------------------------------------------------------------------------------

@dataclass
class Condition:
    path: str
    op: str
    arg: Any

    def holds(self, ctx: Scope) -> bool:
        v = ctx.get(self.path)
        return condition_holds(self.op, self.arg, "" if v in (None, []) else str(v))


@dataclass
class ValueSpec:
    target: str
    line: int
    paths: list[str] = field(default_factory=list)
    constant: Any = None
    has_constant: bool = False
    template: list[tuple[str, str | None]] | None = None
    transforms: list[tuple[str, Callable[[Any, Any], Any], Any]] = field(default_factory=list)
    when: list[Condition] = field(default_factory=list)
    required: bool = False

    def evaluate(self, ctx: Scope, escape: Callable[[str], str] | None = None) -> Any:
        """The value, or None. ``escape`` (HL7) applies to store values, not to text the analyst wrote."""
        if self.when and not all(c.holds(ctx) for c in self.when):
            return None
        written = True  # text the analyst wrote goes in as written (^ separates components)
        if self.has_constant:
            value: Any = self.constant
        elif self.template is not None:
            parts, any_value = [], False
            for literal, path in self.template:
                if path is None:
                    parts.append(literal)
                    continue
                v = _single(ctx.get(path))
                if v not in (None, ""):
                    any_value = True
                    parts.append(escape(str(v)) if escape else str(v))
            value = "".join(parts) if any_value else None
        else:
            written = False
            value = None
            for p in self.paths:
                value = ctx.get(p)
                if value not in (None, "", []):
                    break
            if escape is not None:  # one HL7 field: a list (study.modalities) gives its first item
                value = _single(value)
        try:
            for _name, fn, arg in self.transforms:
                value = fn(value, arg)
        except (TransformError, ValueError) as exc:
            raise RenderError(f"{self.target} (line {self.line}): {exc}") from None
        if not written and isinstance(value, str) and escape is not None:
            value = escape(value)
        if value in (None, "", []) and self.required:
            source = self.paths[0] if self.paths else "its template"
            raise RenderError(f"{self.target} (line {self.line}) is required but {source} is empty")
        return value


def _single(value: Any) -> Any:
    if isinstance(value, list):
        return value[0] if value and not isinstance(value[0], (dict, list)) else None
    return value


class Scope:
    """Store values by dotted path, with the current list items (each:) by their names."""

    def __init__(self, data: Mapping[str, Any], items: dict[str, Any] | None = None) -> None:
        """``data``: a context.RenderContext (or, in tests, any nested dict of the same paths)."""
        self.data = data
        self.items = items or {}

    def child(self, name: str, item: Any) -> Scope:
        return Scope(self.data, {**self.items, name: item})

    def get(self, path: str) -> Any:
        head, _, rest = path.partition(".")
        cur: Any = self.items[head] if head in self.items else self.data.get(head)
        for part in rest.split(".") if rest else ():
            if not isinstance(cur, dict):
                return None
            cur = cur.get(part)
        return cur


@dataclass
class SegmentSpec:
    name: str
    line: int
    fields: list[tuple[HL7Path, ValueSpec]]
    each: str | None = None
    alias: str = "item"
    when: list[Condition] = field(default_factory=list)
    # hl7apy's field layouts for the mapping's version, read when the mapping loads (None: a Z-segment)
    layout: dict[int, Layout] | None = None


@dataclass
class ElementSpec:
    """One FHIR element path (identifier[0].system) and its value, or a list built with each:."""

    path: list[tuple[str, int | None]]
    text: str
    line: int
    value: ValueSpec | None = None
    each: str | None = None
    alias: str = "item"
    children: list[ElementSpec] = field(default_factory=list)
    when: list[Condition] = field(default_factory=list)


@dataclass
class OutboundMapping:
    name: str
    path: Path | None
    target: str  # hl7v2 | fhir
    description: str
    message: str = ""  # hl7v2: ORU^R01
    version: str = "2.5.1"
    resource: str = ""  # fhir: ImagingStudy
    conditional: list[tuple[str, str | None]] | None = None  # fhir: the conditional-update query template
    segments: list[SegmentSpec] = field(default_factory=list)
    elements: list[ElementSpec] = field(default_factory=list)
    tables: dict[str, Table] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return f"fhir:{self.resource}" if self.target == "fhir" else f"hl7v2:{self.message}"

    def conditional_query(self, ctx: Scope) -> str | None:
        if not self.conditional:
            return None
        from urllib.parse import quote
        out = []
        for literal, path in self.conditional:
            if path is None:
                out.append(literal)
            else:
                v = ctx.get(path)
                if v in (None, ""):
                    raise RenderError(f"the conditional-update key needs {path}, which is empty")
                out.append(quote(str(v), safe=":.|"))
        return "".join(out)


# --- compilation ------------------------------------------------------------------------------------

class OutboundCompiler(InboundCompiler):
    """Tables, transforms and problem reporting as inbound mappings have them; store paths instead
    of HL7 paths as sources."""

    extra_transforms = tuple(OUT_TRANSFORMS)

    def check_path(self, path: Any, line: int, where: str, items: dict[str, str]) -> str | None:
        """A store path: a known top-level field, or a field of a list item in scope."""
        if not isinstance(path, str) or not path.strip():
            self.problem(line, where, f"expected a store path such as study.accession, got {path!r}")
            return None
        path = path.strip()
        head, _, rest = path.partition(".")
        first = rest.split(".")[0] if rest else ""
        if head in items:
            allowed = ITEM_FIELDS.get(items[head], ())
            if rest and first not in allowed:
                self.problem(line, where, f"{path!r}: items of {items[head]} have {', '.join(allowed)}")
                return None
            return path
        if head not in CONTEXT_FIELDS:
            scope = sorted([*CONTEXT_FIELDS, *items])
            self.problem(line, where, f"{path!r}: unknown source; paths start with {', '.join(scope)}")
            return None
        if not rest or first not in CONTEXT_FIELDS[head]:
            self.problem(line, where, f"{path!r}: {head} has {', '.join(CONTEXT_FIELDS[head])}")
            return None
        if first != "extra" and "." in rest:
            self.problem(line, where, f"{path!r}: {head}.{first} has no parts (only extra.NAME does)")
            return None
        return path

    def when(self, raw: Any, line: int, where: str, items: dict[str, str]) -> list[Condition]:
        out = []
        for item in raw if isinstance(raw, list) else [raw]:
            ops = [k for k in item if k != "path"] if isinstance(item, dict) else []
            if not isinstance(item, dict) or "path" not in item or len(ops) != 1 \
                    or ops[0] not in ("equals", "not_equals", "in", "not_in", "exists"):
                self.problem(line, f"{where}.when", "a condition is {path: PATH, equals|not_equals|in|not_in|exists: ...}")
                continue
            p = self.check_path(item["path"], line, f"{where}.when", items)
            arg = item[ops[0]]
            if ops[0] in ("in", "not_in"):
                if not isinstance(arg, list):
                    self.problem(line, f"{where}.when", f"{ops[0]} takes a list")
                    continue
                arg = [str(a) for a in arg]
            if p is not None:
                out.append(Condition(p, ops[0], arg))
        return out

    def transforms(self, spec: ValueSpec, raw: Any, line: int, where: str) -> None:
        """The inbound transforms (mappings/spec.py), plus the output formats of OUT_TRANSFORMS."""
        items = raw if isinstance(raw, list) else [raw]
        for i, item in enumerate(items):
            name = item if isinstance(item, str) else None
            if name in OUT_TRANSFORMS:
                spec.transforms.append((name, OUT_TRANSFORMS[name], None))
            elif name is None and isinstance(item, dict) and len(item) == 1 and next(iter(item)) in OUT_TRANSFORMS:
                self.problem(raw.line_of(i) if isinstance(raw, LineList) else line, f"{where}.transform",
                             f"{next(iter(item))} takes no argument")
            else:
                iline = raw.line_of(i) if isinstance(raw, LineList) else line
                self.compile_transforms(spec, [item], iline, where)  # type: ignore[arg-type]

    def template(self, raw: Any, line: int, where: str, items: dict[str, str]) -> list[tuple[str, str | None]] | None:
        return self.split_template(raw, line, where, lambda text: self.check_path(text, line, where, items))

    def value(self, target: str, raw: Any, line: int, items: dict[str, str]) -> ValueSpec | None:
        spec = ValueSpec(target, line)
        if isinstance(raw, str):
            p = self.check_path(raw, line, target, items)
            spec.paths = [p] if p else []
            return spec if p else None
        if isinstance(raw, list):
            spec.paths = [p for p in (self.check_path(x, line, target, items) for x in raw) if p]
            return spec
        if not isinstance(raw, dict):
            self.problem(line, target, "expected a store path, a list of paths, or {from:|value:|template:, ...}")
            return None
        allowed = ("from", "value", "template", "transform", "when", "required", "description")
        for key in raw:
            if key not in allowed:
                self.problem(raw.line_of(key) if isinstance(raw, LineDict) else line, f"{target}.{key}",
                             f"unknown key; expected one of {', '.join(allowed)}")
        kinds = [k for k in ("from", "value", "template") if k in raw]
        if len(kinds) != 1:
            self.problem(line, target, "give exactly one of from:, value: or template:")
            return None
        if "from" in raw:
            src = raw["from"]
            spec.paths = [p for p in (self.check_path(x, line, f"{target}.from", items)
                                      for x in (src if isinstance(src, list) else [src])) if p]
        elif "value" in raw:
            spec.constant, spec.has_constant = raw["value"], True
            if not isinstance(spec.constant, (str, int, float, bool)):
                self.problem(line, f"{target}.value", "a constant is text, a number or true/false")
        else:
            spec.template = self.template(raw["template"], line, f"{target}.template", items)
        if "transform" in raw:
            self.transforms(spec, raw["transform"], line, target)
        if "when" in raw:
            spec.when = self.when(raw["when"], line, target, items)
        spec.required = bool(raw.get("required", False))
        return spec

    def each(self, raw: dict[str, Any], line: int, where: str, items: dict[str, str]
             ) -> tuple[str | None, str, dict[str, str]]:
        """(list path, item name, items in scope for the body)."""
        src = raw.get("each")
        alias = str(raw.get("as", "item"))
        if not isinstance(src, str):
            self.problem(line, f"{where}.each", "each: names a list such as study.series or report.lines")
            return None, alias, items
        head, _, rest = src.partition(".")
        if head in items:  # a list inside the current item (s.instances)
            kind = rest
            if rest not in ITEM_FIELDS or rest not in ITEM_FIELDS.get(items[head], ()):
                self.problem(line, f"{where}.each", f"{src!r} is not a list of {items[head]} items")
                return None, alias, items
        else:
            kind = src
            if src not in ITEM_FIELDS:
                self.problem(line, f"{where}.each", f"{src!r} is not a list; lists: {', '.join(ITEM_FIELDS)}")
                return None, alias, items
        if not re.fullmatch(r"[a-z][a-z0-9_]*", alias) or alias in CONTEXT_FIELDS:
            self.problem(line, f"{where}.as", f"{alias!r}: an item name is lower-case and not one of "
                         f"{', '.join(CONTEXT_FIELDS)}")
        return src, alias, {**items, alias: kind}

    # --- hl7v2 ---------------------------------------------------------------------------------------
    def segments(self, raw: Any, line: int, version: str) -> list[SegmentSpec]:
        if not isinstance(raw, list) or not raw:
            self.problem(line, "segments", "segments: lists the message's segments in order, MSH first")
            return []
        out = []
        for i, body in enumerate(raw):
            sline = raw.line_of(i) if isinstance(raw, LineList) else line
            where = f"segments[{i + 1}]"
            if not isinstance(body, dict) or not isinstance(body.get("segment"), str):
                self.problem(sline, where, "a segment is {segment: PID, fields: {PID-3.1: patient.id, ...}}")
                continue
            for key in body:
                if key not in ("segment", "fields", "each", "as", "when"):
                    self.problem(body.line_of(key) if isinstance(body, LineDict) else sline, f"{where}.{key}",
                                 "unknown key; expected segment, fields, each, as, when")
            name = body["segment"].strip().upper()
            if not re.fullmatch(r"[A-Z][A-Z0-9]{2}", name):
                self.problem(sline, f"{where}.segment", f"{name!r} is not a segment name")
                continue
            items: dict[str, str] = {}
            each, alias = None, "item"
            if "each" in body:
                each, alias, items = self.each(body, sline, where, {})
            seg = SegmentSpec(name, sline, [], each, alias, layout=segment_layout(name, version))
            if seg.layout is None and not name.startswith("Z"):
                self.problem(sline, f"{where}.segment", f"segment {name} is not defined in HL7 v{version}")
                continue
            if "when" in body:
                seg.when = self.when(body["when"], sline, where, items)
            fields_ = body.get("fields") or {}
            if not isinstance(fields_, dict):
                self.problem(sline, f"{where}.fields", "fields: maps HL7 paths (PID-5.1) to values")
                continue
            for target, spec_raw in fields_.items():
                fline = fields_.line_of(target) if isinstance(fields_, LineDict) else sline
                try:
                    path = parse_path(str(target))
                except PathError as exc:
                    self.problem(fline, str(target), str(exc))
                    continue
                if path.segment != name or path.occurrence != 1 or path.all_repetitions:
                    self.problem(fline, str(target), f"inside segment {name}, write {name}-N[.C[.S]] (optionally (R))")
                    continue
                if name == "MSH" and path.field in (1, 2):
                    self.problem(fline, str(target), "MSH-1 and MSH-2 are the separators; the engine writes them")
                    continue
                if seg.layout is not None and path.field not in seg.layout:
                    self.problem(fline, str(target), f"{name} has {max(seg.layout, default=0)} fields in HL7 v{version}")
                    continue
                v = self.value(str(target), spec_raw, fline, items)
                if v is not None:
                    seg.fields.append((path, v))
            out.append(seg)
        if out and out[0].name != "MSH":
            self.problem(out[0].line, "segments[1]", "the first segment is MSH")
        return out

    # --- fhir ----------------------------------------------------------------------------------------
    def element_path(self, text: str, line: int) -> list[tuple[str, int | None]] | None:
        steps: list[tuple[str, int | None]] = []
        for part in text.split("."):
            if not _ELEMENT.match(part):
                self.problem(line, text, f"{text!r} is not an element path; write it like identifier[0].system")
                return None
            name, _, idx = part.partition("[")
            steps.append((name, int(idx[:-1]) if idx else None))
        return steps

    def elements(self, raw: Any, line: int, items: dict[str, str], where: str = "fields") -> list[ElementSpec]:
        if not isinstance(raw, dict) or not raw:
            self.problem(line, where, "fields: maps element paths (identifier[0].system) to values")
            return []
        out = []
        for target, body in raw.items():
            fline = raw.line_of(target) if isinstance(raw, LineDict) else line
            steps = self.element_path(str(target), fline)
            if steps is None:
                continue
            if isinstance(body, dict) and "each" in body:
                for key in body:
                    if key not in ("each", "as", "fields", "when"):
                        self.problem(body.line_of(key) if isinstance(body, LineDict) else fline, f"{target}.{key}",
                                     "unknown key; a list is {each: LIST, as: NAME, fields: {...}}")
                src, alias, inner = self.each(body, fline, str(target), items)
                el = ElementSpec(steps, str(target), fline, each=src, alias=alias)
                if steps[-1][1] is not None:
                    self.problem(fline, str(target), "a list built with each: takes the whole element (no [n])")
                el.children = self.elements(body.get("fields"), fline, inner, f"{target}.fields")
                if "when" in body:
                    el.when = self.when(body["when"], fline, str(target), items)
                out.append(el)
                continue
            v = self.value(str(target), body, fline, items)
            if v is not None:
                out.append(ElementSpec(steps, str(target), fline, value=v))
        return out


def compile_outbound(data: Any, file: str, name: str) -> tuple[OutboundMapping | None, list[ConfigProblem]]:
    c = OutboundCompiler(file)
    line_of = data.line_of if isinstance(data, LineDict) else (lambda _k: 0)
    target = data.get("target")
    allowed = {"source", "target", "description", "tables", "message", "version", "segments", "resource",
               "conditional", "fields"}
    for key in data:
        if key not in allowed:
            c.problem(line_of(key), str(key), f"unknown top-level key; expected {', '.join(sorted(allowed))}")
    if target not in TARGETS:
        c.problem(line_of("target") or 1, "target", f"target must be one of {', '.join(TARGETS)}, got {target!r}")
        return None, c.problems
    c.compile_tables(data.get("tables"), line_of("tables"))
    m = OutboundMapping(name=name, path=Path(file), target=str(target), description=str(data.get("description") or ""),
                        tables=c.tables)
    if target == "hl7v2":
        msg = data.get("message")
        if not isinstance(msg, str) or not re.fullmatch(r"[A-Z]{3}\^[A-Z0-9]{3}(\^[A-Z0-9_]+)?", msg):
            c.problem(line_of("message") or 1, "message", "message: is MSH-9, e.g. ORU^R01")
        else:
            m.message = msg
        version = str(data.get("version", "2.5.1"))
        if version not in ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8"):
            c.problem(line_of("version"), "version", f"unsupported HL7 version {version!r}")
        m.version = version
        m.segments = c.segments(data.get("segments"), line_of("segments"), version)
        for key in ("resource", "conditional", "fields"):
            if key in data:
                c.problem(line_of(key), key, f"{key}: is for target: fhir")
    else:
        resource = data.get("resource")
        if resource not in FHIR_RESOURCES:
            c.problem(line_of("resource") or 1, "resource", f"resource must be one of {', '.join(FHIR_RESOURCES)}")
        else:
            m.resource = str(resource)
        cond = data.get("conditional")
        if cond is not None:
            m.conditional = c.template(cond, line_of("conditional"), "conditional", {})
        m.elements = c.elements(data.get("fields"), line_of("fields"), {})
        for key in ("message", "segments"):
            if key in data:
                c.problem(line_of(key), key, f"{key}: is for target: hl7v2")
    errors = [p for p in c.problems if p.severity == "error"]
    return (None if errors else m), c.problems
