"""Mapping files with ``source: fhir``: FHIR paths instead of HL7 paths, everything else as in HL7.

    source: fhir
    resource: Patient
    tables:
      issuer: {"urn:oid:1.2.36.146.595.217.0.1": HOSP}
    fields:
      patient.id: {from: "identifier.where(type.coding.code='MR').value", required: true}
      patient.issuer: {from: "identifier.where(type.coding.code='MR').system", transform: [{table: issuer}]}
      patient.family_name: name.where(use='official').family
      patient.identifiers: {from: identifier, each: {value: value, issuer: system, type: type.coding.code}}

Tables, transforms, templates, ``first_of``, ``when`` and ``required`` work as in HL7 mappings
(mappings/spec.py compiles them); ``select:`` has no meaning here: a path filters with where().
The path syntax is in engine/fhir/paths.py and docs/fhir.md.
"""

from __future__ import annotations

from typing import Any

from engine.channels import FHIR_ROUTE_RESOURCES
from engine.fhir.paths import FhirPath, FhirPathError, FhirSource, first_text, parse_fhir_path, walk
from engine.mappings.spec import Compiler, Spec
from engine.yamlfile import LineDict

RESOURCES = FHIR_ROUTE_RESOURCES


class FhirSpec(Spec):
    """A field read from a FHIR resource (a ``FhirSource``): the path itself does the selecting."""

    def _read(self, src: Any, path: Any) -> Any:
        return src.read(path)

    def _each(self, src: Any) -> list[dict[str, str]] | None:
        out: list[dict[str, str]] = []
        assert self.each is not None
        for p in self.paths:
            for item in src.items(p):
                entry: dict[str, str] = {}
                for key, rels in self.each.items():
                    for rel in rels:
                        if isinstance(rel, Spec):  # {from: ..., transform: [...]} inside the item
                            v, _where = rel.evaluate(FhirSource(item))
                        else:
                            v = first_text(walk([item], rel.steps))
                        if v is not None:
                            entry[key] = v
                            break
                if entry:
                    out.append(entry)
        return out or None


class FhirCompiler(Compiler):
    spec_class = FhirSpec

    def path(self, text: Any, line: int, fld: str) -> Any:
        try:
            return parse_fhir_path(text)
        except FhirPathError as exc:
            self.problem(line, fld, str(exc))
            return None

    def relative_path(self, raw: Any, line: int, where: str) -> FhirPath | None:
        path: FhirPath | None = self.path(raw, line, where)
        return path

    def compile_each(self, raw: Any, line: int, target: str) -> dict[str, list[Any]] | None:
        """As for HL7, plus an item key may be a whole field spec read inside the item
        (``issuer: {from: system, transform: [{table: issuer}]}``)."""
        if not isinstance(raw, dict):
            return super().compile_each(raw, line, target)
        plain = {k: v for k, v in raw.items() if not isinstance(v, dict)}
        out = super().compile_each(plain, line, target) or {}
        for key, spec_raw in raw.items():
            if isinstance(spec_raw, dict):
                kline = raw.line_of(key) if isinstance(raw, LineDict) else line
                sub = self.compile_spec(f"{target}.each.{key}", spec_raw, kline)
                if sub is not None:
                    out[str(key)] = [sub]
        return {str(k): out[str(k)] for k in raw if str(k) in out}

    def compile_select(self, spec: Spec, raw: Any, line: int, fld: str) -> None:
        self.problem(line, f"{fld}.select", "select: picks HL7 repetitions; in a FHIR path filter with "
                     "where(), e.g. identifier.where(type.coding.code='MR').value")
