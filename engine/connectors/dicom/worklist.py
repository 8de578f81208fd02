"""Modality Worklist (C-FIND, PS3.4 K.6): scheduled procedure steps built from orders.

One order is one requested procedure with one scheduled procedure step. Orders whose status is
not in the channel's ``worklist_statuses`` (by default SC and IP) are not offered, so cancelled,
discontinued and completed orders drop out. Coarse filters (status, date range, modality, station
AE, accession) run in SQL; the rest of the keys are matched on the built items.

An order without a Study Instance UID gets one derived from its id and accession number, the same
on every query, so images made from the worklist carry a UID the engine can recognise.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import TypedDict, cast

from pydicom.dataset import Dataset
from sqlalchemy import Connection, select

from engine.dicom.matching import Match, matches, parse
from engine.domain.records import IDENTIFIERS, ORDERS, PATIENTS
from engine.domain.rows import OrderRow

SPS = "ScheduledProcedureStepSequence"
TOP_KEYS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
            "AccessionNumber", "RequestedProcedureID", "RequestedProcedureDescription", "StudyInstanceUID",
            "ReferringPhysicianName", "RequestedProcedurePriority", "AdmissionID", "ReasonForTheRequestedProcedure")
SPS_KEYS = ("Modality", "ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
            "ScheduledProcedureStepStartTime", "ScheduledProcedureStepDescription", "ScheduledProcedureStepID",
            "ScheduledPerformingPhysicianName", "ScheduledProcedureStepStatus", "ScheduledStationName")
VR = {"PatientBirthDate": "DA", "ScheduledProcedureStepStartDate": "DA", "ScheduledProcedureStepStartTime": "TM",
      "StudyInstanceUID": "UI", "PatientName": "PN", "ReferringPhysicianName": "PN",
      "ScheduledPerformingPhysicianName": "PN"}
STATUS_TO_SPS = {"SC": "SCHEDULED", "IP": "STARTED", "HD": "SCHEDULED"}


class Demographics(TypedDict):
    """The patients columns a worklist item shows."""

    family_name: str | None
    given_name: str | None
    middle_name: str | None
    prefix: str | None
    suffix: str | None
    birth_date: str | None
    sex: str | None


class ScheduledOrder(OrderRow, Demographics):
    """A row of the worklist query: the order with its patient's demographics."""


# A scheduled procedure step as C-FIND answers it: {keyword: value} (and _code / _scheme for the
# code sequences), matched against the query's keys by keyword.
WorklistItem = dict[str, str | None]


def order_study_uid(order_id: int, accession: str | None) -> str:
    """A stable Study Instance UID for an order that has none (UUID-derived, PS3.5 B.2)."""
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, f"radbridge-order:{order_id}:{accession or ''}").int)


def _value(keys: Dataset, kw: str) -> str:
    if kw not in keys:
        return ""
    v = keys[kw].value
    if v is None:
        return ""
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return "\\".join(str(x) for x in v)
    return str(v)


def _sps_keys(identifier: Dataset) -> Dataset:
    seq = identifier.get(SPS)
    return seq[0] if seq else Dataset()


def _person_name(p: Demographics) -> str:
    parts = [p.get("family_name") or "", p.get("given_name") or "", p.get("middle_name") or "",
             p.get("prefix") or "", p.get("suffix") or ""]
    return "^".join(parts).rstrip("^")


def _item(order: OrderRow, patient: Demographics, ident: tuple[str, str] | None) -> WorklistItem:
    sched: datetime | None = order.get("scheduled_at")
    accession = order.get("accession")
    return {
        "PatientName": _person_name(patient), "PatientID": ident[0] if ident else "",
        "IssuerOfPatientID": ident[1] if ident else "",
        "PatientBirthDate": (patient.get("birth_date") or "").replace("-", ""),
        "PatientSex": {"M": "M", "F": "F", "O": "O"}.get((patient.get("sex") or "").upper()[:1], ""),
        "AccessionNumber": accession or "",
        "RequestedProcedureID": order.get("requested_procedure_id") or accession or str(order["id"]),
        "RequestedProcedureDescription": order.get("procedure_text") or "",
        "StudyInstanceUID": order.get("study_uid") or order_study_uid(order["id"], accession),
        "ReferringPhysicianName": (order.get("ordering_provider") or "").replace(" ", "^"),
        "RequestedProcedurePriority": {"S": "STAT", "A": "HIGH", "R": "ROUTINE"}.get(
            (order.get("priority") or "").upper()[:1], "") if order.get("priority") else "",
        "ReasonForTheRequestedProcedure": order.get("reason") or "",
        "AdmissionID": "",
        "Modality": order.get("modality") or "",
        "ScheduledStationAETitle": order.get("station_aet") or "",
        "ScheduledProcedureStepStartDate": sched.strftime("%Y%m%d") if sched else "",
        "ScheduledProcedureStepStartTime": sched.strftime("%H%M%S") if sched else "",
        "ScheduledProcedureStepDescription": order.get("procedure_text") or "",
        "ScheduledProcedureStepID": order.get("sps_id") or order.get("requested_procedure_id") or accession or "",
        "ScheduledPerformingPhysicianName": "",
        "ScheduledProcedureStepStatus": STATUS_TO_SPS.get(order["status"], ""),
        "ScheduledStationName": "",
        "_code": order.get("procedure_code"), "_scheme": order.get("procedure_scheme"),
    }


def _date_bounds(m: Match) -> tuple[datetime | None, datetime | None]:
    def day(text: str | None) -> datetime | None:
        if not text:
            return None
        try:
            return datetime.strptime(text.replace(".", "")[:8], "%Y%m%d")
        except ValueError:
            return None
    if m.kind == "range":
        low, high = day(m.low), day(m.high)
        return low, (high + timedelta(days=1)) if high else None
    if m.kind == "single":
        d = day(m.values[0])
        return d, (d + timedelta(days=1)) if d else None
    return None, None


def find_worklist(conn: Connection, identifier: Dataset, *, statuses: list[str], fold_names: bool = True,
                  limit: int = 500) -> Iterator[Dataset]:
    sps_keys = _sps_keys(identifier)
    stmt = select(ORDERS, PATIENTS.c.family_name, PATIENTS.c.given_name, PATIENTS.c.middle_name,
                  PATIENTS.c.prefix, PATIENTS.c.suffix, PATIENTS.c.birth_date, PATIENTS.c.sex).select_from(
        ORDERS.join(PATIENTS, ORDERS.c.patient_id == PATIENTS.c.id)).where(ORDERS.c.status.in_(statuses))
    date_m = parse(_value(sps_keys, "ScheduledProcedureStepStartDate"), "DA")
    low, high = _date_bounds(date_m)
    if low:
        stmt = stmt.where(ORDERS.c.scheduled_at >= low)
    if high:
        stmt = stmt.where(ORDERS.c.scheduled_at < high)
    for kw, col in (("Modality", ORDERS.c.modality), ("ScheduledStationAETitle", ORDERS.c.station_aet)):
        m = parse(_value(sps_keys, kw), "CS")
        if m.kind == "single":
            stmt = stmt.where(col == m.values[0])
        elif m.kind == "list":
            stmt = stmt.where(col.in_(m.values))
    acc = parse(_value(identifier, "AccessionNumber"), "SH")
    if acc.kind == "single":
        stmt = stmt.where(ORDERS.c.accession == acc.values[0])
    checks: list[tuple[str, Match]] = []
    for kw in TOP_KEYS:
        if kw in identifier and kw != "StudyInstanceUID":
            checks.append((kw, parse(_value(identifier, kw), VR.get(kw, "LO"),
                                     fold_case=fold_names and VR.get(kw) == "PN")))
    if "StudyInstanceUID" in identifier:
        checks.append(("StudyInstanceUID", parse(_value(identifier, "StudyInstanceUID"), "UI")))
    for kw in SPS_KEYS:
        if kw in sps_keys:
            checks.append((kw, parse(_value(sps_keys, kw), VR.get(kw, "LO"),
                                     fold_case=fold_names and VR.get(kw) == "PN")))
    sent = 0
    for row in conn.execute(stmt.order_by(ORDERS.c.scheduled_at, ORDERS.c.id)).mappings():
        if sent >= limit:
            break
        order = cast(ScheduledOrder, dict(row))
        ident = conn.execute(select(IDENTIFIERS.c.value, IDENTIFIERS.c.issuer)
                             .where(IDENTIFIERS.c.patient_id == order["patient_id"], IDENTIFIERS.c.kind != "alias")
                             .order_by(IDENTIFIERS.c.kind != "primary", IDENTIFIERS.c.id).limit(1)).first()
        item = _item(order, order, (ident[0], ident[1]) if ident else None)
        if all(_match_item(item, kw, m) for kw, m in checks):
            sent += 1
            yield _answer(identifier, sps_keys, item)


def _match_item(item: WorklistItem, kw: str, m: Match) -> bool:
    if m.kind == "list" and VR.get(kw) == "UI":
        return item[kw] in m.values
    return matches(item.get(kw), m, VR.get(kw, "LO"))


def _answer(identifier: Dataset, sps_keys: Dataset, item: WorklistItem) -> Dataset:
    ds = Dataset()
    for elem in identifier:
        kw = elem.keyword
        if kw in ("SpecificCharacterSet", SPS) or not kw:
            continue
        if kw == "RequestedProcedureCodeSequence":
            ds.RequestedProcedureCodeSequence = _code_seq(item)
        elif kw in item:
            setattr(ds, kw, item[kw] or None)
        else:
            setattr(ds, kw, [] if elem.VR == "SQ" else None)
    if SPS in identifier:
        sps = Dataset()
        for elem in sps_keys:
            kw = elem.keyword
            if kw == "ScheduledProtocolCodeSequence":
                sps.ScheduledProtocolCodeSequence = _code_seq(item)
            elif kw in item:
                setattr(sps, kw, item[kw] or None)
            elif kw:
                setattr(sps, kw, [] if elem.VR == "SQ" else None)
        ds.ScheduledProcedureStepSequence = [sps]
    if any(isinstance(v, str) and not v.isascii() for v in item.values()):
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _code_seq(item: WorklistItem) -> list[Dataset]:
    if not item.get("_code"):
        return []
    code = Dataset()
    code.CodeValue = str(item["_code"])[:16]
    code.CodingSchemeDesignator = str(item.get("_scheme") or "L")[:16]
    code.CodeMeaning = str(item.get("RequestedProcedureDescription") or item["_code"])[:64]
    return [code]
