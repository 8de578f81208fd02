"""Dry runs of a mapping file on a sample: what `radbridge mappings try` prints and the console's
"try" shows (engine/web/console/mappings.py). Nothing is written or sent.

* an inbound HL7 v2 mapping on a message: the mapped fields (``orders`` per ORC group when it maps
  orders) and the values it could not accept, as the engine evaluates them on a route;
* a FHIR mapping on a resource (or each entry of a Bundle it reads), validated as R4;
* reconciliation rules on a DICOM file's headers, against the store: the match and its findings;
* an outbound mapping on a stored study: the message it would send.

Each returns a ``Tried``: the blocks to show (JSON text, or the rendered message) and whether it
failed (the command's exit status 1). A sample that cannot be used at all raises ``TryError``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, or_, select

from engine.errors import RadBridgeError
from engine.mappings.registry import SourceCompiler, load_mapping_file
from engine.mappings.spec import Mapping, MappingError
from engine.outbound.mapping import OutboundMapping, compile_outbound
from engine.pipeline.hl7_inbound import map_message
from engine.reconciliation.rules import ReconciliationRules, compile_rules
from engine.storage.base import ObjectStorage
from engine.yamlfile import ConfigProblem

# mapping files whose ``source:`` is compiled by a layer above the mapping core
MAPPING_SOURCES: dict[str, SourceCompiler] = {"reconciliation": compile_rules, "store": compile_outbound}


class TryError(RadBridgeError):
    """The sample cannot be used (not HL7, not FHIR, no such study...): the message says why;
    ``of_sample`` when it is about the sample itself (the command names the sample first)."""

    def __init__(self, message: str, *, of_sample: bool = True) -> None:
        super().__init__(message)
        self.of_sample = of_sample


@dataclass
class Tried:
    """What a dry run came to: blocks of output (JSON text or a rendered message) and whether the
    mapping failed on the sample (values it could not accept, no resource of its kind)."""

    blocks: list[str] = field(default_factory=list)
    failed: bool = False
    notes: list[str] = field(default_factory=list)  # said on the side (stderr for the command)
    errors: list[MappingError] = field(default_factory=list)


def load_for_try(path: Path, *, structure_version: str,
                 sources: dict[str, SourceCompiler] | None = None) -> tuple[Any, list[ConfigProblem]]:
    """A mapping file compiled as the engine compiles it (every ``source:``), with its problems."""
    return load_mapping_file(path, structure_version=structure_version,
                             sources=MAPPING_SOURCES if sources is None else sources)


def _dumps(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False)


def _errors(errors: list[MappingError]) -> list[dict[str, str]]:
    return [{"field": e.field, "path": e.path, "error": e.message} for e in errors]


def try_hl7(mapping: Mapping, raw: bytes) -> Tried:
    """An inbound HL7 v2 mapping on one message (segments may end with line breaks)."""
    from engine.hl7.errors import HL7ParseError
    from engine.hl7.message import parse_message
    try:
        msg = parse_message(raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r"))
    except HL7ParseError as exc:
        raise TryError(f"not an HL7 message: {exc}") from None
    mapped = map_message(msg, [mapping], order_action=mapping.maps_orders)
    out: dict[str, Any] = {"message": msg.message_type, "control_id": msg.control_id, "fields": mapped.values}
    if mapping.maps_orders:
        out["orders"] = mapped.groups
    if mapped.errors:
        out["errors"] = _errors(mapped.errors)
    return Tried([_dumps(out)], failed=bool(mapped.errors), errors=list(mapped.errors))


def try_fhir(mapping: Mapping, raw: bytes) -> Tried:
    """A FHIR mapping on a JSON resource (or on each entry of a Bundle it reads), validated as R4.
    References are shown as sent: the endpoint resolves Patient/<id> and urn:uuid ones first."""
    from engine.fhir.outcome import FhirError
    from engine.fhir.paths import FhirSource
    from engine.fhir.validate import check_resource, parse_json

    try:
        data = parse_json(raw)
        found: list[Any]
        if isinstance(data, dict) and data.get("resourceType") == "Bundle":
            found = [e.get("resource") for e in data.get("entry") or []
                     if isinstance(e, dict) and isinstance(e.get("resource"), dict)
                     and e["resource"].get("resourceType") == mapping.resource]
        else:
            found = [data]
        resources = [check_resource(r, mapping.resource) for r in found]
    except FhirError as exc:
        raise TryError(exc.diagnostics) from None
    tried = Tried()
    for r in resources:
        res = mapping.apply(FhirSource(r))
        out: dict[str, Any] = {"resource": f"{r['resourceType']}/{r.get('id', '(no id)')}", "fields": res.values}
        if res.errors:
            tried.failed = True
            tried.errors.extend(res.errors)
            out["errors"] = _errors(res.errors)
        subject: dict[str, Any] = r["subject"] if isinstance(r.get("subject"), dict) else {}
        if subject.get("reference") and not subject.get("identifier"):
            out["note"] = (f"subject is a reference ({subject['reference']}): the endpoint reads it as that "
                           "patient's identifier before mapping; here it is not resolved")
        tried.blocks.append(_dumps(out))
    if not resources:
        tried.failed = True
        tried.notes.append(f"no {mapping.resource} in it")
    return tried


def try_inbound(mapping: Mapping, raw: bytes) -> Tried:
    """An inbound mapping (``source: hl7v2`` or ``fhir``) on a sample of what it reads."""
    return try_fhir(mapping, raw) if mapping.source == "fhir" else try_hl7(mapping, raw)


def try_rules(rules: ReconciliationRules, ds: Any, conn: Connection) -> Tried:
    """Reconciliation rules on a DICOM data set's headers against the store: the match, what the
    order and patient say, and what would be coerced or flagged."""
    from engine.dicom.headers import text_value
    from engine.domain.studies import STUDY_ATTRS
    from engine.reconciliation.compare import authoritative, differences
    from engine.reconciliation.matching import StudyHeaders, match_study

    study: dict[str, Any] = {col: text_value(ds.get(kw)) for kw, col in STUDY_ATTRS.items()}
    study.update(id=0, study_uid=text_value(ds.get("StudyInstanceUID")))
    received = {r.keyword: text_value(ds.get(r.keyword)) for r in rules.attributes}
    m = match_study(conn, cast(StudyHeaders, study), rules)
    diffs = differences(rules, m.authority, received) if m.matched_by else {}
    out = {"rules": rules.name, "matched_by": m.matched_by, "order_id": m.order_id, "patient_id": m.patient_id,
           "held_as_exception": m.exception,
           "authoritative": {r.keyword: authoritative(r, m.authority) for r in rules.attributes},
           "header": received,
           "differences": {k: {"header": v[0], "expected": v[1]} for k, v in diffs.items()},
           "findings": [{"kind": f.kind, "severity": f.severity, "attribute": f.attribute, "detail": f.detail}
                        for f in m.findings]}
    return Tried([_dumps(out)])


def read_dicom(sample: Path | Any) -> Any:
    """The headers of a DICOM file (a path or a binary file object), without pixel data."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError
    try:
        return dcmread(sample, stop_before_pixels=True)
    except (OSError, InvalidDicomError) as exc:
        raise TryError(f"not a DICOM file: {exc}") from None


def stored_study(conn: Connection, ref: str) -> tuple[int, str] | None:
    """(index id, Study Instance UID) of the newest stored study with that UID, accession or id."""
    from engine.domain.studies import STUDIES
    cond = or_(STUDIES.c.study_uid == ref, STUDIES.c.accession == ref)
    if ref.isdigit():
        cond = or_(cond, STUDIES.c.id == int(ref))
    row = conn.execute(select(STUDIES.c.id, STUDIES.c.study_uid).where(cond).order_by(STUDIES.c.id.desc())).first()
    return (int(row.id), str(row.study_uid)) if row is not None else None


def try_outbound(mapping: OutboundMapping, conn: Connection, ref: str, storage: ObjectStorage | None,
                 settings: Any) -> Tried:
    """The message ``mapping`` makes for a stored study (by Study Instance UID, accession or index
    id), validated; nothing is written or sent."""
    from engine.domain.studies import INSTANCES
    from engine.outbound.context import REPORT_CLASSES, EngineInfo, build_context
    from engine.outbound.mapping import RenderError
    from engine.outbound.render import render

    found = stored_study(conn, ref)
    if found is None:
        raise TryError("no stored study with that Study Instance UID, accession or id")
    study_id, study_uid = found
    report = None
    if any("report." in repr(x) for x in (mapping.segments or mapping.elements)):
        report = conn.execute(select(INSTANCES.c.id).where(
            INSTANCES.c.study_id == study_id, INSTANCES.c.sop_class_uid.in_(REPORT_CLASSES))
            .order_by(INSTANCES.c.id.desc())).scalar()
    event = "report.received" if report is not None else "study.reconciled"
    ctx = build_context(conn, study_id, event=event, delivery_id=0, instance_id=report, storage=storage,
                        engine=EngineInfo.of(settings))
    try:
        out = render(mapping, ctx)
    except RenderError as exc:
        raise TryError(f"{mapping.name}: study {study_uid}: {exc}", of_sample=False) from None
    head = (f"# {mapping.name} ({mapping.kind}) for study {study_uid}, as event {event}"
            + (f"; conditional update: {out.resource}?{out.conditional}" if out.conditional else ""))
    body = out.payload.replace("\r", "\n") if mapping.target == "hl7v2" else _dumps(json.loads(out.payload))
    return Tried([head + "\n" + body])


def spec_line(mappings: list[Mapping], target: str) -> tuple[str, int] | None:
    """(mapping name, line) of the field spec that fills ``target``, in the first of ``mappings``
    defining it: where a mapping error is fixed."""
    for m in mappings:
        for spec in m.specs:
            if spec.target == target:
                return m.name, spec.line
    return None
