"""Compile a mapping file into an evaluator, collecting every problem with its line.

A mapping file::

    source: hl7v2
    description: ADT to patient
    tables:
      sex: {M: M, F: F, O: O, U: U}
    fields:
      patient.id: {from: PID-3.1, select: {5: MR}, fallback: first, required: true}
      patient.family_name: PID-5.1
      patient.birth_date: {from: PID-7, transform: [date]}

Field specs are described in docs/mapping-reference.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

from engine.errors import RadBridgeError
from engine.hl7 import errors as E
from engine.hl7.message import NULL, Value, component
from engine.hl7.paths import HL7Path, PathError, SegmentSource, parse_path, parse_relative
from engine.hl7.structure import segment_field_count
from engine.mappings.fields import LIST_FIELDS
from engine.mappings.transforms import (
    TRANSFORM_ARGS,
    TRANSFORMS,
    Table,
    TransformError,
    TransformFn,
    make_replace,
    make_table,
)
from engine.yamlfile import ConfigProblem, LineDict, LineList

P = TypeVar("P")
# What a mapping reads: an HL7 message (SegmentSource) or a FHIR resource (engine.fhir.paths.FhirSource);
# both answer read(path), and FhirSpec overrides the HL7-only parts (select:, each: components).
Source = Any
SOURCES = ("hl7v2", "fhir")
SPEC_KEYS = {"from", "select", "fallback", "each", "template", "value", "when", "transform", "required",
             "first_of", "description"}
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


class MappingError(RadBridgeError):
    """A value in the message that the mapping cannot accept (becomes AE with ERR). Collected per
    field while mapping (all of a message's problems are reported at once), or raised."""

    def __init__(self, field: str, path: str, message: str, code: int = E.DATA_TYPE_ERROR) -> None:
        super().__init__(message)
        self.field = field
        self.path = path
        self.message = message
        self.code = code

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MappingError) and (self.field, self.path, self.message, self.code) == (
            other.field, other.path, other.message, other.code)

    def __hash__(self) -> int:
        return hash((self.field, self.path, self.message, self.code))

    def __repr__(self) -> str:
        return f"MappingError({self.field!r}, {self.path!r}, {self.message!r}, {self.code})"


@dataclass
class MappingResult:
    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # target -> path the value came from
    declared: dict[str, str] = field(default_factory=dict)  # target -> first path the mapping names
    errors: list[MappingError] = field(default_factory=list)

    def json(self) -> dict[str, Any]:
        return dict(self.values)


# --- compiled parts ---------------------------------------------------------------------------------

@dataclass
class Condition:
    path: HL7Path
    op: str  # equals, not_equals, in, not_in, exists, matches
    arg: Any

    def holds(self, src: SegmentSource) -> bool:
        v = src.read(self.path)
        return condition_holds(self.op, self.arg, v if isinstance(v, str) else "")


def condition_holds(op: str, arg: Any, text: str) -> bool:
    """A ``when:`` test on a value as text ("" when there is none); outbound mappings use it too."""
    if op == "exists":
        return bool(text) == bool(arg)
    if op == "equals":
        return text == str(arg)
    if op == "not_equals":
        return text != str(arg)
    if op == "in":
        return text in arg
    if op == "not_in":
        return text not in arg
    if op == "matches":
        return bool(arg.search(text))
    return False


@dataclass
class Spec:
    target: str
    line: int
    paths: list[HL7Path] = field(default_factory=list)
    select: Any = None  # "first" | "last" | int | tuple[(comp, sub, allowed values)]
    fallback: str | None = None
    each: dict[str, list[Any]] | None = None  # item key -> relative paths (HL7: (component, sub))
    template: list[tuple[str, HL7Path | None]] | None = None
    constant: Any = None
    has_constant: bool = False
    when: list[Condition] = field(default_factory=list)
    transforms: list[tuple[str, TransformFn, Any]] = field(default_factory=list)
    required: bool = False
    first_of: list[Spec] | None = None

    @cached_property
    def source_path(self) -> str:
        if self.paths:
            return str(self.paths[0])
        if self.first_of:
            return self.first_of[0].source_path
        if self.template:
            for _lit, p in self.template:
                if p is not None:
                    return str(p)
        return ""

    # --- evaluation --------------------------------------------------------------------------------
    def _pick_repetitions(self, src: SegmentSource, path: HL7Path, *, many: bool = False) -> list[str]:
        """The repetitions ``path`` selects: one, or with ``many`` (each:) every match."""
        reps = src.repetitions(path)
        if not reps:
            return []
        if path.repetition:
            return reps[path.repetition - 1: path.repetition]
        sel = self.select
        if sel is None and many:
            return reps
        if sel is None or sel == "first":
            return reps[:1]
        if sel == "last":
            return reps[-1:]
        if sel == "all":
            return reps
        if isinstance(sel, int):
            return reps[sel - 1: sel]
        key = (path.segment, path.occurrence, path.field, sel)  # several fields select alike (PID-3 by MR)
        matched = src.memo.get(key)
        if matched is None:
            seps = src.message.seps
            matched = src.memo[key] = [r for r in reps
                                       if all((component(r, c, s, seps) or "") in allowed for c, s, allowed in sel)]
        if matched:
            return matched if many else matched[:1]
        if self.fallback == "first":
            return reps[:1]
        if self.fallback == "last":
            return reps[-1:]
        return []

    def _read(self, src: SegmentSource, path: HL7Path) -> Value:
        if self.select is None and not path.all_repetitions:
            return src.read(path)
        reps = self._pick_repetitions(src, path)
        if not reps:
            return None
        return component(reps[0], path.component, path.subcomponent, src.message.seps)

    def raw_value(self, src: Source) -> tuple[Any, str]:
        """The value before transforms, and the path it came from (for error locations)."""
        if self.first_of is not None:
            for sub in self.first_of:
                v, where = sub.evaluate(src)
                if v is not None:
                    return v, where
            return None, self.source_path
        if self.has_constant:
            return self.constant, ""
        if self.each is not None:
            return self._each(src), self.source_path
        if self.template is not None:
            return self._template(src), self.source_path
        for p in self.paths:
            v = self._read(src, p)
            if v is not None:
                return v, str(p)
        return None, self.source_path

    def _each(self, src: SegmentSource) -> list[dict[str, str]] | None:
        seps = src.message.seps
        out: list[dict[str, str]] = []
        assert self.each is not None
        for p in self.paths:
            for rep in self._pick_repetitions(src, p, many=True):
                item: dict[str, str] = {}
                for key, rels in self.each.items():
                    for comp, sub in rels:
                        v = component(rep, comp, sub, seps)
                        if isinstance(v, str):
                            item[key] = v
                            break
                if item:
                    out.append(item)
        return out or None

    def _template(self, src: SegmentSource) -> str | None:
        assert self.template is not None
        parts: list[str] = []
        any_value = False
        for literal, path in self.template:
            if path is None:
                parts.append(literal)
                continue
            v = src.read(path)
            if isinstance(v, str) and v:
                any_value = True
                parts.append(v)
        if not any_value:
            return None
        text = " ".join("".join(parts).split())
        return text.strip(" ,;/-") or None

    def evaluate(self, src: Source) -> tuple[Any, str]:
        """(value, source path); raises TransformError carrying the source path as ``where``."""
        if self.when and not all(c.holds(src) for c in self.when):
            return None, self.source_path
        value, where = self.raw_value(src)
        try:
            for _name, fn, arg in self.transforms:
                value = fn(value, arg)
        except TransformError as exc:
            exc.where = where
            raise
        return value, where


@dataclass
class Mapping:
    name: str
    path: Path | None
    source: str
    description: str
    specs: list[Spec]
    tables: dict[str, Table]
    resource: str = ""  # source: fhir - the resource type the mapping reads (Patient, ServiceRequest)

    def apply(self, src: Source, only: tuple[str, ...] | None = None,
              exclude: tuple[str, ...] = ()) -> MappingResult:
        """Evaluate every field, or those whose target starts with one of ``only`` and none of ``exclude``."""
        result = MappingResult()
        for spec in self.specs:
            if only is not None and not spec.target.startswith(only):
                continue
            if exclude and spec.target.startswith(exclude):
                continue
            result.declared.setdefault(spec.target, spec.source_path)
            try:
                value, where = spec.evaluate(src)
            except TransformError as exc:
                result.errors.append(MappingError(spec.target, exc.where or spec.source_path, str(exc), exc.code))
                continue
            if value is None or (value is NULL and spec.required):
                if spec.required:
                    result.errors.append(MappingError(
                        spec.target, spec.source_path,
                        f"{spec.target} is required but {spec.source_path or 'its source'} is empty",
                        E.REQUIRED_FIELD_MISSING))
                continue
            result.values[spec.target] = None if value is NULL else value
            result.sources[spec.target] = where or spec.source_path
        return result

    def targets(self) -> list[str]:
        return [s.target for s in self.specs]

    @property
    def maps_orders(self) -> bool:
        """An order mapping: its order.* and message.* fields are evaluated once per ORC group."""
        return any(s.target.startswith("order.") for s in self.specs)


# --- compilation ------------------------------------------------------------------------------------

class Compiler:
    extra_transforms: tuple[str, ...] = ()  # more names a subclass handles (outbound output formats)
    spec_class: type[Spec] = Spec  # FHIR mappings read with FhirSpec (mappings/fhir.py)

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[ConfigProblem] = []
        self.tables: dict[str, Table] = {}

    def problem(self, line: int, fld: str, message: str, severity: str = "error") -> None:
        self.problems.append(ConfigProblem(self.file, line, fld, message, severity))

    def path(self, text: Any, line: int, fld: str) -> HL7Path | None:
        if not isinstance(text, str):
            self.problem(line, fld, f"expected an HL7 path such as PID-5.1, got {text!r}")
            return None
        try:
            return parse_path(text)
        except PathError as exc:
            self.problem(line, fld, str(exc))
            return None

    def compile_tables(self, raw: Any, line: int) -> None:
        if raw is None:
            return
        if not isinstance(raw, dict):
            self.problem(line, "tables", "must be a mapping of table name to {code: value}")
            return
        for name, body in raw.items():
            tline = raw.line_of(name) if isinstance(raw, LineDict) else line
            if not isinstance(body, dict):
                self.problem(tline, f"tables.{name}", "a table is a mapping of source code to target value")
                continue
            if "values" in body:
                values = body.get("values")
                if not isinstance(values, dict):
                    self.problem(tline, f"tables.{name}.values", "must be a mapping of code to value")
                    continue
                unknown = set(body) - {"values", "default", "strict", "case_sensitive"}
                for k in sorted(unknown):
                    self.problem(body.line_of(k) if isinstance(body, LineDict) else tline,
                                 f"tables.{name}.{k}", "unknown key (expected values, default, strict, case_sensitive)")
                cs = bool(body.get("case_sensitive", False))
                default = body.get("default")
                self.tables[str(name)] = Table(
                    str(name), {(str(k) if cs else str(k).upper()): str(v) for k, v in values.items()},
                    None if default is None else str(default), bool(body.get("strict", False)), cs)
            else:
                self.tables[str(name)] = Table(str(name), {str(k).upper(): str(v) for k, v in body.items()})

    def compile_select(self, spec: Spec, raw: Any, line: int, fld: str) -> None:
        if raw in ("first", "last", "all") or isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
            spec.select = raw
        elif isinstance(raw, dict) and raw:
            conds: list[tuple[int, int | None, tuple[str, ...]]] = []
            for k, v in raw.items():
                try:
                    comp, sub = parse_relative(str(k))
                except PathError as exc:
                    self.problem(line, f"{fld}.select", str(exc))
                    continue
                allowed = tuple(str(x) for x in v) if isinstance(v, list) else (str(v),)
                conds.append((comp, sub, allowed))
            spec.select = tuple(conds)  # hashable: the selection is kept per message source (SegmentSource.memo)
        else:
            self.problem(line, f"{fld}.select",
                         "select takes first, last, all, a repetition number, or {component: value}")

    def compile_transforms(self, spec: Spec, raw: Any, line: int, fld: str) -> None:
        items = raw if isinstance(raw, list) else [raw]
        for i, item in enumerate(items):
            iline = raw.line_of(i) if isinstance(raw, LineList) else line
            if isinstance(item, str):
                name, arg = item, None
            elif isinstance(item, dict) and len(item) == 1:
                name, arg = next(iter(item.items()))
            else:
                self.problem(iline, f"{fld}.transform", f"each transform is a name or {{name: argument}}, got {item!r}")
                continue
            if name not in TRANSFORM_ARGS:
                self.problem(iline, f"{fld}.transform",
                             f"unknown transform {name!r}; known: "
                             f"{', '.join(sorted([*TRANSFORM_ARGS, *self.extra_transforms]))}")
                continue
            expected = TRANSFORM_ARGS[name]
            if expected is None and arg is not None:
                self.problem(iline, f"{fld}.transform", f"{name} takes no argument")
                continue
            if expected is not None and not isinstance(arg, expected):
                self.problem(iline, f"{fld}.transform", f"{name} needs an argument ({name}: ...)")
                continue
            if name == "table":
                table = self.tables.get(str(arg))
                if table is None:
                    self.problem(iline, f"{fld}.transform", f"table {arg!r} is not defined under tables:")
                    continue
                spec.transforms.append((name, make_table(table), arg))
            elif name == "replace":
                if not isinstance(arg, dict) or "pattern" not in arg:
                    self.problem(iline, f"{fld}.transform", "replace needs {pattern: REGEX, with: TEXT}")
                    continue
                try:
                    spec.transforms.append((name, make_replace(arg), arg))
                except re.error as exc:
                    self.problem(iline, f"{fld}.transform", f"bad regular expression: {exc}")
            else:
                spec.transforms.append((name, TRANSFORMS[name], arg))

    def compile_when(self, spec: Spec, raw: Any, line: int, fld: str) -> None:
        items = raw if isinstance(raw, list) else [raw]
        for item in items:
            if not isinstance(item, dict) or "path" not in item:
                self.problem(line, f"{fld}.when", "a condition is {path: PATH, equals|not_equals|in|not_in|exists|matches: ...}")
                continue
            p = self.path(item["path"], line, f"{fld}.when")
            ops = [k for k in item if k != "path"]
            if len(ops) != 1 or ops[0] not in ("equals", "not_equals", "in", "not_in", "exists", "matches"):
                self.problem(line, f"{fld}.when", "give exactly one of equals, not_equals, in, not_in, exists, matches")
                continue
            op = ops[0]
            arg = item[op]
            if op in ("in", "not_in"):
                if not isinstance(arg, list):
                    self.problem(line, f"{fld}.when", f"{op} takes a list")
                    continue
                arg = [str(a) for a in arg]
            if op == "matches":
                try:
                    arg = re.compile(str(arg))
                except re.error as exc:
                    self.problem(line, f"{fld}.when", f"bad regular expression: {exc}")
                    continue
            if p is not None:
                spec.when.append(Condition(p, op, arg))

    def compile_spec(self, target: str, raw: Any, line: int) -> Spec | None:
        spec = self.spec_class(target=target, line=line)
        if target in LIST_FIELDS and not (isinstance(raw, dict) and "each" in raw):
            self.problem(line, target, f"{target} is a list: write {{from: PATH, each: "
                         f"{{{', '.join(f'{k}: N' for k in LIST_FIELDS[target])}}}}}")
            return None
        if isinstance(raw, dict) and "each" in raw and target not in LIST_FIELDS:
            self.problem(raw.line_of("each") if isinstance(raw, LineDict) else line, f"{target}.each",
                         f"each: makes a list; {target} holds one value (list fields: {', '.join(LIST_FIELDS)})")
            return None
        if isinstance(raw, str):
            p = self.path(raw, line, target)
            if p is None:
                return None
            spec.paths = [p]
            return spec
        if isinstance(raw, list):  # shorthand: first non-empty of these paths
            spec.paths = [p for p in (self.path(x, line, target) for x in raw) if p is not None]
            return spec
        if not isinstance(raw, dict):
            self.problem(line, target, "expected a path, a list of paths, or a mapping with from:/value:/template:")
            return None
        for key in raw:
            if key not in SPEC_KEYS:
                kline = raw.line_of(key) if isinstance(raw, LineDict) else line
                self.problem(kline, f"{target}.{key}", f"unknown key; expected one of {', '.join(sorted(SPEC_KEYS))}")
        kinds = [k for k in ("from", "value", "template", "first_of") if k in raw]
        if len(kinds) != 1:
            self.problem(line, target, "give exactly one of from:, value:, template: or first_of:")
            return None
        if "from" in raw:
            src = raw["from"]
            srcs = src if isinstance(src, list) else [src]
            spec.paths = [p for p in (self.path(x, line, f"{target}.from") for x in srcs) if p is not None]
        elif "value" in raw:
            spec.constant, spec.has_constant = raw["value"], True
            if spec.constant is not None and not isinstance(spec.constant, (str, int, float, bool)):
                self.problem(line, f"{target}.value", "a constant must be text or a number")
            elif spec.constant is not None:
                spec.constant = str(spec.constant)
        elif "template" in raw:
            spec.template = self.compile_template(raw["template"], line, target)
        else:
            alts = raw["first_of"]
            if not isinstance(alts, list) or not alts:
                self.problem(line, f"{target}.first_of", "first_of takes a list of field specs")
                return None
            subs = [self.compile_spec(target, a, alts.line_of(i) if isinstance(alts, LineList) else line)
                    for i, a in enumerate(alts)]
            spec.first_of = [s for s in subs if s is not None]
        if "select" in raw:
            self.compile_select(spec, raw["select"], line, target)
            for p in spec.paths:
                if p.repetition is not None:
                    self.problem(line, f"{target}.select", f"{p} names a repetition already; drop select or the (n)")
        if "fallback" in raw:
            if raw["fallback"] not in ("first", "last", None):
                self.problem(line, f"{target}.fallback", "fallback is first or last")
            spec.fallback = raw["fallback"]
        if "each" in raw:
            spec.each = self.compile_each(raw["each"], line, target)
        if "transform" in raw:
            self.compile_transforms(spec, raw["transform"], line, target)
        if "when" in raw:
            self.compile_when(spec, raw["when"], line, target)
        spec.required = bool(raw.get("required", False))
        return spec

    def compile_each(self, raw: Any, line: int, target: str) -> dict[str, list[Any]] | None:
        if not isinstance(raw, dict):
            self.problem(line, f"{target}.each", "each is a mapping of item key to component path (e.g. value: 1)")
            return None
        out: dict[str, list[Any]] = {}
        allowed = LIST_FIELDS.get(target)
        for key, rel in raw.items():
            if allowed and key not in allowed:
                self.problem(line, f"{target}.each.{key}", f"unknown item key; expected {', '.join(allowed)}")
            rels = rel if isinstance(rel, list) else [rel]
            parsed: list[Any] = []
            for r in rels:
                item = self.relative_path(r, line, f"{target}.each.{key}")
                if item is not None:
                    parsed.append(item)
            out[str(key)] = parsed
        return out

    def relative_path(self, raw: Any, line: int, where: str) -> Any:
        """A path inside one item of an each: list (HL7: component[.subcomponent])."""
        try:
            return parse_relative(str(raw))
        except PathError as exc:
            self.problem(line, where, str(exc))
            return None

    def compile_template(self, raw: Any, line: int, target: str) -> list[tuple[str, HL7Path | None]] | None:
        return self.split_template(raw, line, f"{target}.template",
                                   lambda text: self.path(text, line, f"{target}.template"))

    def split_template(self, raw: Any, line: int, where: str, resolve: Callable[[str], P | None]
                       ) -> list[tuple[str, P | None]] | None:
        """Text with {placeholders} as (literal, None) and ("", resolved placeholder) parts; ``resolve``
        reads a placeholder (an HL7 path here, a store path in outbound mappings) or reports it."""
        if not isinstance(raw, str):
            self.problem(line, where, "a template is text with {PATH} placeholders")
            return None
        parts: list[tuple[str, P | None]] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(raw):
            if m.start() > pos:
                parts.append((raw[pos:m.start()], None))
            p = resolve(m.group(1))
            if p is not None:
                parts.append(("", p))
            pos = m.end()
        if pos < len(raw):
            parts.append((raw[pos:], None))
        if not any(p for _l, p in parts):
            self.problem(line, where, "a template needs at least one {PATH} placeholder")
        return parts


def check_paths(mapping: Mapping, file: str, version: str = "2.5") -> list[ConfigProblem]:
    """Warnings for HL7 paths past a segment's defined fields or in an unknown segment (hl7apy's tables)."""
    problems: list[ConfigProblem] = []
    for spec in mapping.specs:
        paths = list(spec.paths)
        for sub in spec.first_of or []:
            paths.extend(sub.paths)
        for cond in spec.when:
            paths.append(cond.path)
        for _lit, p in spec.template or []:
            if p is not None:
                paths.append(p)
        for p in paths:
            if p.segment.startswith("Z"):
                continue
            count = segment_field_count(p.segment, version)
            if count is None:
                problems.append(ConfigProblem(file, spec.line, spec.target,
                                              f"{p}: segment {p.segment} is not defined in HL7 v{version}", "warning"))
            elif p.field > count:
                problems.append(ConfigProblem(file, spec.line, spec.target,
                                              f"{p}: {p.segment} has {count} fields in HL7 v{version}", "warning"))
    return problems
