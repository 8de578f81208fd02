"""What an outbound mapping can read: one study with its patient, order, series, instances and report.

Built from the store when a delivery is rendered (not when it is queued), so a delivery that waited
through an EHR outage carries the study as it is now. Paths are listed in mapping.CONTEXT_FIELDS
and documented in docs/outbound.md.
"""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypedDict, TypeVar

from pydicom import dcmread
from sqlalchemy import Connection, Select, bindparam, select

from engine.dicom.headers import text_value
from engine.domain.records import IDENTIFIERS, ORDERS, PATIENTS
from engine.domain.studies import INSTANCES, SERIES, STUDIES
from engine.storage.base import ObjectStorage
from engine.store.types import JsonObject, utcnow

SR_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
}
PDF_CLASS = "1.2.840.10008.5.1.4.1.1.104.1"
REPORT_CLASSES = (*SR_CLASSES, PDF_CLASS)
RESULT_STATUS = {"study.reconciled": "F", "study.corrected": "C", "report.received": "F"}
MAX_REPORT_LINES = 2000  # a runaway SR tree cannot make an unbounded message


# --- the context's shape (its paths are mapping.CONTEXT_FIELDS / ITEM_FIELDS; tests/test_rows.py) ---

class InstanceContext(TypedDict):
    uid: str
    sop_class: str
    number: int | None
    frames: int | None


class SeriesContext(TypedDict):
    uid: str
    number: int | None
    modality: str | None
    description: str | None
    body_part: str | None
    station_name: str | None
    num_instances: int
    instances: list[InstanceContext]
    started: str | None


class StudyContext(TypedDict):
    uid: str
    accession: str | None
    id: str | None  # StudyID (0020,0010), not the index's id
    date: str | None
    time: str | None
    started: str | None  # DICOM DT of the study's start, for HL7 and FHIR
    description: str | None
    modalities: list[str]
    num_series: int
    num_instances: int
    referring_physician: str | None
    series: list[SeriesContext]
    state: str
    reconciliation: str
    times_reconciled: int
    matched_by: str | None
    size_bytes: int


class IdentifierContext(TypedDict):
    value: str
    issuer: str
    type_code: str | None
    kind: str
    system: str | None


class PatientContext(TypedDict, total=False):
    """Empty when the study has no patient."""

    id: str | None
    issuer: str | None
    system: str | None
    type_code: str | None
    family_name: str | None
    given_name: str | None
    middle_name: str | None
    prefix: str | None
    suffix: str | None
    name: str | None
    birth_date: str | None
    sex: str | None
    identifiers: list[IdentifierContext]
    extra: JsonObject


class OrderContext(TypedDict, total=False):
    """Empty when the study has no order."""

    accession: str | None
    placer_number: str | None
    placer_issuer: str | None
    filler_number: str | None
    status: str
    procedure_code: str | None
    procedure_text: str | None
    procedure_scheme: str | None
    modality: str | None
    requested_procedure_id: str | None
    sps_id: str | None
    ordering_provider: str | None
    reason: str | None
    priority: str | None
    scheduled_at: str | None  # ISO
    extra: JsonObject


class EventContext(TypedDict):
    kind: str
    at: str
    result_status: str  # F | C
    corrected: bool


class EngineContext(TypedDict):
    name: str
    facility: str
    aet: str
    dicomweb_base: str | None


class DeliveryContext(TypedDict):
    id: int
    control_id: str
    now: str


class ReportLine(TypedDict):
    index: int
    text: str


class ReportContext(TypedDict, total=False):
    """Empty unless the delivery is a report's (report.received)."""

    instance_uid: str
    sop_class: str
    kind: str  # sr | pdf
    title: str | None
    text: str | None
    lines: list[ReportLine]
    pdf_base64: str | None
    completion: str | None
    verification: str | None
    observer: str | None
    content_datetime: str | None
    series_uid: str | None


class RenderContext(TypedDict):
    """Everything an outbound mapping can read of one study."""

    study: StudyContext
    patient: PatientContext
    order: OrderContext
    event: EventContext
    engine: EngineContext
    delivery: DeliveryContext
    report: ReportContext


@dataclass(frozen=True)
class EngineInfo:
    name: str = "RADBRIDGE"
    facility: str = ""
    aet: str = "RADBRIDGE"
    dicomweb_base: str = ""

    @classmethod
    def of(cls, settings: Any) -> EngineInfo:
        """What the engine says about itself in outbound messages, from its settings."""
        return cls(settings.name, settings.facility, settings.dicom.aet, settings.dicomweb_base())


def control_id(delivery_id: int) -> str:
    """MSH-10 of a delivery: the same for every attempt, so the EHR can drop a resend it already has."""
    return f"RB{delivery_id:010d}"


def system_of(issuer: str | None) -> str | None:
    if not issuer:
        return None
    if re.fullmatch(r"[0-2](\.\d+)+", issuer):
        return f"urn:oid:{issuer}"
    return issuer


def _started(date: str | None, time: str | None) -> str | None:
    if not date or not re.fullmatch(r"\d{8}", date):
        return None
    t = re.sub(r"[^0-9.]", "", time or "")
    return date + t.split(".")[0][:6] if t else date


# prebuilt; a batch of deliveries reads its studies with one statement a table (an IN list), not
# six statements a delivery: each statement is a hop out of Python and back, which a busy process
# pays for in waits for the interpreter
IN_CHUNK = 500  # ids in one IN list
T = TypeVar("T")
STUDIES_BY_ID = select(*(STUDIES.c[k] for k in (
    "id", "study_uid", "accession", "study_id", "study_date", "study_time", "description", "modalities",
    "referring_physician", "state", "recon_state", "times_reconciled", "matched_by", "size_bytes", "patient_id",
    "order_id"))).where(STUDIES.c.id.in_(bindparam("ids", expanding=True)))  # the columns the context reads
SERIES_OF_STUDIES = (
    select(*(SERIES.c[k] for k in ("id", "study_id", "series_uid", "series_number", "modality", "description",
                                   "body_part", "station_name")))
    .where(SERIES.c.study_id.in_(bindparam("ids", expanding=True))).order_by(SERIES.c.series_number, SERIES.c.id))
INSTANCES_OF_STUDIES = (
    select(INSTANCES.c.id, INSTANCES.c.study_id, INSTANCES.c.series_id, INSTANCES.c.sop_instance_uid,
           INSTANCES.c.sop_class_uid, INSTANCES.c.instance_number, INSTANCES.c.number_of_frames,
           INSTANCES.c.storage_key)
    .where(INSTANCES.c.study_id.in_(bindparam("ids", expanding=True)))
    .order_by(INSTANCES.c.instance_number, INSTANCES.c.id))
PATIENTS_BY_ID = select(*(PATIENTS.c[k] for k in (
    "id", "family_name", "given_name", "middle_name", "prefix", "suffix", "birth_date", "sex", "extra"))).where(
    PATIENTS.c.id.in_(bindparam("ids", expanding=True)))
IDENTIFIERS_OF_PATIENTS = (
    select(IDENTIFIERS.c.patient_id, IDENTIFIERS.c.value, IDENTIFIERS.c.issuer, IDENTIFIERS.c.type_code,
           IDENTIFIERS.c.kind)
    .where(IDENTIFIERS.c.patient_id.in_(bindparam("ids", expanding=True))).order_by(IDENTIFIERS.c.id))
ORDERS_BY_ID = select(*(ORDERS.c[k] for k in (
    "id", "accession", "placer_number", "placer_issuer", "filler_number", "status", "procedure_code",
    "procedure_text", "procedure_scheme", "modality", "requested_procedure_id", "sps_id", "ordering_provider",
    "reason", "priority", "scheduled_at", "extra"))).where(ORDERS.c.id.in_(bindparam("ids", expanding=True)))


def _rows(conn: Connection, stmt: Select[Any], ids: Iterable[int]) -> list[dict[str, Any]]:
    """The rows of ``stmt`` for ``ids`` (bound as ``ids``), IN_CHUNK ids a statement, in its order
    within each chunk."""
    wanted = sorted(set(ids))
    out: list[dict[str, Any]] = []
    for start in range(0, len(wanted), IN_CHUNK):
        out.extend(dict(r) for r in conn.execute(stmt, {"ids": wanted[start:start + IN_CHUNK]}).mappings())
    return out


@dataclass
class StudyRows:
    """What the store holds of some studies, their series, instances, patients and orders, read with
    one statement a table: a batch of deliveries is rendered from one of these."""

    studies: dict[int, dict[str, Any]] = field(default_factory=dict)
    series: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # by study id, in series order
    instances: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # by study id, in instance order
    patients: dict[int, PatientContext] = field(default_factory=dict)
    orders: dict[int, OrderContext] = field(default_factory=dict)
    _given: set[tuple[str, Any]] = field(default_factory=set)

    def patient(self, patient_id: int | None) -> PatientContext:
        found = self.patients.get(patient_id) if patient_id is not None else None
        return self._once("patient", patient_id, found) if found is not None else {}

    def order(self, order_id: int | None) -> OrderContext:
        found = self.orders.get(order_id) if order_id is not None else None
        return self._once("order", order_id, found) if found is not None else {}

    def _once(self, kind: str, key: Any, value: T) -> T:
        """``value`` to the first delivery that asks, a copy to any other (two studies of one patient
        in a batch): what one delivery's rendering does to its context never reaches another's."""
        if (kind, key) in self._given:
            return copy.deepcopy(value)
        self._given.add((kind, key))
        return value

    @classmethod
    def read(cls, conn: Connection, study_ids: Iterable[int]) -> StudyRows:
        out = cls()
        out.studies = {r["id"]: r for r in _rows(conn, STUDIES_BY_ID, study_ids)}
        if not out.studies:
            return out
        for r in _rows(conn, SERIES_OF_STUDIES, out.studies):
            out.series.setdefault(r["study_id"], []).append(r)
        for r in _rows(conn, INSTANCES_OF_STUDIES, out.studies):
            out.instances.setdefault(r["study_id"], []).append(r)
        patient_ids = {s["patient_id"] for s in out.studies.values() if s["patient_id"] is not None}
        if patient_ids:
            identifiers: dict[int, list[IdentifierContext]] = {}
            for r in _rows(conn, IDENTIFIERS_OF_PATIENTS, patient_ids):
                identifiers.setdefault(r["patient_id"], []).append(
                    {"value": r["value"], "issuer": r["issuer"], "type_code": r["type_code"], "kind": r["kind"],
                     "system": system_of(r["issuer"])})
            out.patients = {p["id"]: _patient(p, identifiers.get(p["id"], []))
                            for p in _rows(conn, PATIENTS_BY_ID, patient_ids)}
        order_ids = {s["order_id"] for s in out.studies.values() if s["order_id"] is not None}
        if order_ids:
            out.orders = {o["id"]: _order(o) for o in _rows(conn, ORDERS_BY_ID, order_ids)}
        return out


def build_context(conn: Connection, study_id: int, *, event: str, delivery_id: int = 0,
                  instance_id: int | None = None, storage: ObjectStorage | None = None,
                  engine: EngineInfo = EngineInfo(), rows: StudyRows | None = None) -> RenderContext:
    """The context of one study; ``rows``: read already (a batch's StudyRows.read), else read now."""
    if rows is None:
        rows = StudyRows.read(conn, [study_id])
    study = rows.studies.get(study_id)
    if study is None:
        raise LookupError(f"study {study_id} is no longer in the store")
    series_rows = rows.series.get(study_id, [])
    inst_rows = rows.instances.get(study_id, [])
    by_series: dict[int, list[InstanceContext]] = {}
    for r in inst_rows:
        by_series.setdefault(r["series_id"], []).append(
            {"uid": r["sop_instance_uid"], "sop_class": r["sop_class_uid"], "number": r["instance_number"],
             "frames": r["number_of_frames"]})
    started = _started(study["study_date"], study["study_time"])
    series: list[SeriesContext] = [{"uid": s["series_uid"], "number": s["series_number"], "modality": s["modality"],
               "description": s["description"], "body_part": s["body_part"], "station_name": s["station_name"],
               "num_instances": len(by_series.get(s["id"], [])), "instances": by_series.get(s["id"], []),
               "started": started} for s in series_rows]
    modalities = [m for m in (study["modalities"] or "").split("\\") if m]
    ctx: RenderContext = {
        "study": {"uid": study["study_uid"], "accession": study["accession"], "id": study["study_id"],
                  "date": study["study_date"], "time": study["study_time"], "started": started,
                  "description": study["description"], "modalities": modalities,
                  "num_series": len(series), "num_instances": len(inst_rows),
                  "referring_physician": study["referring_physician"], "series": series, "state": study["state"],
                  "reconciliation": study["recon_state"], "times_reconciled": study["times_reconciled"],
                  "matched_by": study["matched_by"], "size_bytes": study["size_bytes"]},
        "patient": rows.patient(study["patient_id"]),
        "order": rows.order(study["order_id"]),
        "event": {"kind": event, "at": utcnow().isoformat(), "result_status": RESULT_STATUS.get(event, "F"),
                  "corrected": event == "study.corrected"},
        "engine": {"name": engine.name, "facility": engine.facility, "aet": engine.aet,
                   "dicomweb_base": engine.dicomweb_base or None},
        "delivery": {"id": delivery_id, "control_id": control_id(delivery_id),
                     "now": datetime.now().astimezone().strftime("%Y%m%d%H%M%S%z")},  # local, with its offset
        "report": {},
    }
    if instance_id is not None:
        row = next((r for r in inst_rows if r["id"] == instance_id), None)
        if row is None:
            raise LookupError(f"report instance {instance_id} is no longer in study {study['study_uid']}")
        if storage is None:
            raise LookupError("no DICOM storage configured to read the report from")
        series_uid = next((s["series_uid"] for s in series_rows if s["id"] == row["series_id"]), None)
        report = read_report(storage, row["storage_key"], row["sop_class_uid"])
        report["series_uid"] = series_uid
        ctx["report"] = report
    return ctx


def _patient(p: dict[str, Any], ids: list[IdentifierContext]) -> PatientContext:
    live = [i for i in ids if i["kind"] != "alias"]
    primary = next((i for i in live if i["kind"] == "primary"), live[0] if live else None)
    name = "^".join(x or "" for x in (p["family_name"], p["given_name"], p["middle_name"])).rstrip("^")
    return {"id": primary["value"] if primary else None, "issuer": primary["issuer"] if primary else None,
            "system": system_of(primary["issuer"]) if primary else None,
            "type_code": primary["type_code"] if primary else None,
            "family_name": p["family_name"], "given_name": p["given_name"], "middle_name": p["middle_name"],
            "prefix": p["prefix"], "suffix": p["suffix"], "name": name or None, "birth_date": p["birth_date"],
            "sex": p["sex"], "identifiers": ids, "extra": p["extra"] or {}}


def _order(o: dict[str, Any]) -> OrderContext:
    return {"accession": o["accession"], "placer_number": o["placer_number"], "placer_issuer": o["placer_issuer"],
            "filler_number": o["filler_number"], "status": o["status"], "procedure_code": o["procedure_code"],
            "procedure_text": o["procedure_text"], "procedure_scheme": o["procedure_scheme"],
            "modality": o["modality"], "requested_procedure_id": o["requested_procedure_id"], "sps_id": o["sps_id"],
            "ordering_provider": o["ordering_provider"], "reason": o["reason"], "priority": o["priority"],
            "scheduled_at": o["scheduled_at"].isoformat() if o["scheduled_at"] else None,
            "extra": o["extra"] or {}}


# --- reports ------------------------------------------------------------------------------------------

def read_report(storage: ObjectStorage, key: str, sop_class: str) -> ReportContext:
    """The text of a structured report (its content tree, one line per item) or a PDF's bytes."""
    with storage.open(key) as f:
        ds = dcmread(f)
    title = _title(ds)
    out: ReportContext = {
        "instance_uid": str(ds.SOPInstanceUID), "sop_class": sop_class, "title": title,
        "completion": text_value(ds.get("CompletionFlag")), "verification": text_value(ds.get("VerificationFlag")),
        "content_datetime": (text_value(ds.get("ContentDate")) or "") + (text_value(ds.get("ContentTime")) or "")
        or None, "observer": _observer(ds), "text": None, "lines": [], "pdf_base64": None,
    }
    if sop_class == PDF_CLASS:
        out["kind"] = "pdf"
        data = bytes(ds.EncapsulatedDocument)
        length = ds.get("EncapsulatedDocumentLength")
        if length and int(length) <= len(data):  # the element is padded to an even length
            data = data[: int(length)]
        out["pdf_base64"] = base64.b64encode(data).decode("ascii")
        return out
    out["kind"] = "sr"
    lines: list[str] = []
    _walk(ds.get("ContentSequence") or [], 0, lines)
    out["lines"] = [{"index": i + 1, "text": t} for i, t in enumerate(lines)]
    out["text"] = "\n".join(lines)
    return out


def _title(ds: Any) -> str | None:
    seq = ds.get("ConceptNameCodeSequence")
    if seq:
        return text_value(seq[0].get("CodeMeaning"))
    return text_value(ds.get("DocumentTitle"))


def _observer(ds: Any) -> str | None:
    for seq_name in ("VerifyingObserverSequence", "AuthorObserverSequence"):
        seq = ds.get(seq_name)
        if seq:
            name = seq[0].get("VerifyingObserverName") or seq[0].get("PersonName")
            if name:
                return str(name.value)
    return None


def _walk(items: Any, depth: int, lines: list[str]) -> None:
    """Content items in document order: a container's heading, then its children, indented."""
    for item in items:
        if len(lines) >= MAX_REPORT_LINES or depth > 16:
            return
        name_seq = item.get("ConceptNameCodeSequence")
        concept = text_value(name_seq[0].get("CodeMeaning")) if name_seq else None
        vtype = text_value(item.get("ValueType"))
        value: str | None = None
        if vtype == "TEXT":
            value = text_value(item.get("TextValue"))
        elif vtype == "CODE":
            cs = item.get("ConceptCodeSequence")
            value = text_value(cs[0].get("CodeMeaning")) if cs else None
        elif vtype == "NUM":
            mv = item.get("MeasuredValueSequence")
            if mv:
                units = mv[0].get("MeasurementUnitsCodeSequence")
                unit = text_value(units[0].get("CodeValue")) if units else ""
                value = f"{text_value(mv[0].get('NumericValue'))} {unit}".strip()
        elif vtype in ("DATE", "TIME", "DATETIME", "PNAME", "UIDREF"):
            kw = {"DATE": "Date", "TIME": "Time", "DATETIME": "DateTime", "PNAME": "PersonName",
                  "UIDREF": "UID"}[vtype]
            value = text_value(item.get(kw))
        indent = "  " * depth
        if vtype == "CONTAINER":
            if concept:
                lines.append(f"{indent}{concept}")
        elif value is not None:
            for k, part in enumerate(value.splitlines() or [""]):
                label = f"{concept}: " if concept and k == 0 else ""
                lines.append(f"{indent}{label}{part}")
        children = item.get("ContentSequence")
        if children:
            _walk(children, depth + 1 if vtype == "CONTAINER" else depth, lines)
