"""Load every mapping in mappings/, check paths against HL7 structures, and reload changed files.

A file that fails to compile on reload does not replace the working version: the engine keeps
mapping with the last good one and reports the problem (logs, /api/channels, `radbridge check`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from collections.abc import Mapping as MappingOf
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from engine.mappings.fhir import RESOURCES, FhirCompiler
from engine.mappings.fields import is_known_field
from engine.mappings.spec import SOURCES, Compiler, Mapping, Spec, check_paths
from engine.yamlfile import ConfigFileError, ConfigProblem, LineDict, load_yaml

log = logging.getLogger(__name__)
T = TypeVar("T")
# compiles a parsed file of one ``source:`` (data, file, name) into what its users run
SourceCompiler = Callable[[Any, str, str], tuple[Any, list[ConfigProblem]]]


@dataclass
class _Entry:
    mapping: Any  # a Mapping (hl7v2, fhir) or what a registered source compiles to; None: unusable
    mtime_ns: int
    problems: list[ConfigProblem] = field(default_factory=list)
    inode: int = 0  # a file replaced by rename (the console's save) is another inode, whatever its mtime


def compile_mapping(data: Any, file: str, name: str, *, other_sources: tuple[str, ...] = ()
                    ) -> tuple[Mapping | None, list[ConfigProblem]]:
    """An inbound mapping (source: hl7v2 or fhir); ``other_sources`` are only named in the error for an
    unknown source (the registry compiles those itself)."""
    source = data.get("source") if isinstance(data, dict) else None
    top_keys: tuple[str, ...] = ("source", "description", "tables", "fields")
    c: Compiler
    if source == "fhir":
        c, top_keys = FhirCompiler(file), (*top_keys, "resource")
    else:
        c = Compiler(file)
    if not isinstance(data, dict):
        c.problem(1, "", "a mapping file is a YAML mapping with source: and fields:")
        return None, c.problems
    line_of = data.line_of if isinstance(data, LineDict) else (lambda _k: 0)
    for key in data:
        if key not in top_keys:
            c.problem(line_of(key), str(key), f"unknown top-level key; expected {', '.join(top_keys)}")
    if source not in SOURCES:
        c.problem(line_of("source") or 1, "source", f"source must be one of {', '.join((*SOURCES, *other_sources))}, got {source!r}")
    resource = ""
    if source == "fhir":
        resource = str(data.get("resource") or "")
        if resource not in RESOURCES:
            c.problem(line_of("resource") or line_of("source") or 1, "resource",
                      f"a FHIR mapping names the resource it reads: resource: {' or '.join(RESOURCES)}")
    c.compile_tables(data.get("tables"), line_of("tables"))
    fields = data.get("fields")
    specs: list[Spec] = []
    if not isinstance(fields, dict) or not fields:
        c.problem(line_of("fields") or 1, "fields", "fields: must map domain fields to sources")
    else:
        for target, raw in fields.items():
            fline = fields.line_of(target) if isinstance(fields, LineDict) else 0
            if not is_known_field(str(target)):
                c.problem(fline, str(target), "unknown domain field; see docs/mapping-reference.md for the list "
                          "(site-specific fields go under patient.extra.NAME or order.extra.NAME)")
                continue
            spec = c.compile_spec(str(target), raw, fline)
            if spec is not None:
                specs.append(spec)
    mapping = Mapping(name=name, path=Path(file), source=str(source), description=str(data.get("description") or ""),
                      specs=specs, tables=c.tables, resource=resource)
    errors = [p for p in c.problems if p.severity == "error"]
    return (None if errors else mapping), c.problems


def load_mapping_file(path: Path, name: str | None = None, *, structure_version: str = "2.5",
                      sources: MappingOf[str, SourceCompiler] | None = None) -> tuple[Any, list[ConfigProblem]]:
    """Compile one mapping file; problems include structure warnings (unknown segment, field too high).
    Inbound mappings (``source: hl7v2`` or ``fhir``) are compiled here; other sources by the compiler
    their layer registers (``sources``: reconciliation rules, outbound ``store`` mappings)."""
    name = name or path.stem
    try:
        data = load_yaml(path)
    except ConfigFileError as exc:
        return None, exc.problems
    source = data.get("source") if isinstance(data, dict) else None
    if isinstance(source, str) and sources and source in sources:
        return sources[source](data, str(path), name)
    mapping, problems = compile_mapping(data, str(path), name, other_sources=tuple(sources or ()))
    if mapping is not None and mapping.source == "hl7v2":
        problems = problems + check_paths(mapping, str(path), structure_version)
    return mapping, problems


class MappingRegistry:
    """The mappings of one directory, by name (file name without .yaml)."""

    def __init__(self, directory: Path, *, structure_version: str = "2.5",
                 sources: MappingOf[str, SourceCompiler] | None = None) -> None:
        self.directory = directory
        self.structure_version = structure_version
        self.sources = dict(sources or {})
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self.reloads = 0

    def _files(self) -> dict[str, Path]:
        if not self.directory.is_dir():
            return {}
        return {p.stem: p for p in sorted(self.directory.glob("*.yaml"))}

    def load_all(self) -> list[ConfigProblem]:
        problems: list[ConfigProblem] = []
        for name, path in self._files().items():
            mapping, probs = load_mapping_file(path, name, structure_version=self.structure_version,
                                                sources=self.sources)
            st = path.stat()
            self._entries[name] = _Entry(mapping, st.st_mtime_ns, probs, st.st_ino)
            problems.extend(probs)
        return problems

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Mapping | None:
        entry = self._entries.get(name)
        return entry.mapping if entry and isinstance(entry.mapping, Mapping) else None

    def get_as(self, name: str, kind: type[T]) -> T | None:
        """The compiled file ``name`` when it is a ``kind`` (e.g. ReconciliationRules), else None."""
        entry = self._entries.get(name)
        return entry.mapping if entry and isinstance(entry.mapping, kind) else None

    def names_of(self, kind: type[Any]) -> list[str]:
        return sorted(n for n, e in self._entries.items() if isinstance(e.mapping, kind))

    def problems(self, name: str | None = None) -> list[ConfigProblem]:
        if name is not None:
            entry = self._entries.get(name)
            return list(entry.problems) if entry else []
        return [p for e in self._entries.values() for p in e.problems]

    def reload_changed(self) -> list[str]:
        """Recompile files whose modification time changed; returns the names reloaded."""
        changed: list[str] = []
        with self._lock:
            for name, path in self._files().items():
                try:
                    st = path.stat()
                except OSError:
                    continue
                mtime = st.st_mtime_ns
                entry = self._entries.get(name)
                if entry is not None and entry.mtime_ns == mtime and entry.inode in (0, st.st_ino):
                    continue
                mapping, probs = load_mapping_file(path, name, structure_version=self.structure_version,
                                                sources=self.sources)
                errors = [p for p in probs if p.severity == "error"]
                if mapping is None or errors:
                    for p in errors:
                        log.error("mapping %s not reloaded, keeping the previous version: %s", name, p)
                    keep = entry.mapping if entry else None
                    self._entries[name] = _Entry(keep, mtime, probs, st.st_ino)
                else:
                    log.info("mapping %s reloaded from %s", name, path)
                    self._entries[name] = _Entry(mapping, mtime, probs, st.st_ino)
                    self.reloads += 1
                changed.append(name)
        return changed
