"""The queries behind the patient, order and study reads of the admin API (/api/patients, /api/orders,
/api/studies) and of the console's pages: one function each, run in a read session
(engine/web/reads.py), answering the API's JSON shapes (engine/web/serialize.py).

Every filter is on an indexed column (identifier value and issuer, order numbers, accession, study
state, reconciliation state, study date); lists are paged by id (``before``: the rows older than that
id, newest first), never by OFFSET, and never counted."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from sqlalchemy import Select, select
from sqlalchemy.orm import Session, selectinload

from engine.reconciliation.reconciler import EXCEPTION_STATES
from engine.store.models import (
    DomainEvent,
    Instance,
    Order,
    Patient,
    PatientIdentifier,
    ReconcileJob,
    Series,
    Study,
)
from engine.web.audit import record_read
from engine.web.reads import in_read_session
from engine.web.serialize import order_json, patient_json, study_json

MAX_LIMIT = 500
MODALITY = re.compile(r"[A-Z0-9 ]{1,16}")  # a Modality value (DICOM CS)


async def read_one(request: web.Request, resource_type: str, fn: Callable[[Session], dict[str, Any] | None],
                   patients: Callable[[dict[str, Any]], list[int]]) -> dict[str, Any] | None:
    """One record read by ``fn`` (None: not there), with its audit row (200 naming the patients
    ``patients`` finds in it, or 404) written before it is shown."""
    body = await in_read_session(request, fn)
    await record_read(request, "read", resource_type, 200 if body else 404, [body] if body else [],
                      patients(body) if body else [])
    return body


def split_identifier(text: str) -> tuple[str, str | None]:
    """``ID`` or ``ID^ISSUER`` (as the CLI and the API write a patient identifier)."""
    value, sep, issuer = text.partition("^")
    return value.strip(), (issuer.strip() if sep else None)


def _identified(value: str, issuer: str | None) -> Select[Any]:
    """The ids of the patients holding identifier ``value`` (of ``issuer`` when given), aliases included."""
    sub = select(PatientIdentifier.patient_id).where(PatientIdentifier.value == value)
    return sub.where(PatientIdentifier.issuer == issuer) if issuer is not None else sub


def with_studies(s: Session, p: Patient) -> dict[str, Any]:
    """The patient, with the studies linked to it and those whose headers carry one of its IDs."""
    out = patient_json(p)
    values = [i.value for i in p.identifiers]
    stmt = select(Study).where((Study.patient_id == p.id) | Study.dicom_patient_id.in_(values)).order_by(Study.id)
    out["studies"] = [study_json(st, series=False) for st in s.execute(stmt.limit(MAX_LIMIT)).scalars()]
    return out


@dataclass(frozen=True)
class PatientSearch:
    """What a patient search asks: an identifier (with its issuer or not), a family name (``*`` as
    a wildcard, any case), a birth date (as stored: ISO, maybe partial)."""

    identifier: str | None = None
    issuer: str | None = None
    name: str | None = None
    birth_date: str | None = None

    def given(self) -> bool:
        return bool(self.identifier or self.name or self.birth_date)


def find_patients(s: Session, q: PatientSearch, limit: int, *, before: int | None = None) -> list[dict[str, Any]]:
    """The patients that match every criterion of ``q``, by id (newest first when paging with ``before``)."""
    stmt = select(Patient).options(selectinload(Patient.identifiers), selectinload(Patient.orders),
                                   selectinload(Patient.history))
    if q.identifier:
        stmt = stmt.where(Patient.id.in_(_identified(q.identifier, q.issuer)))
    if q.name:
        stmt = stmt.where(Patient.family_name.ilike(q.name.replace("*", "%")))
    if q.birth_date:
        stmt = stmt.where(Patient.birth_date == q.birth_date)
    if before is not None:
        stmt = stmt.where(Patient.id < before).order_by(Patient.id.desc())
    else:
        stmt = stmt.order_by(Patient.id)
    return [with_studies(s, p) for p in s.execute(stmt.limit(limit)).scalars()]


def patient_detail(s: Session, pid: int) -> dict[str, Any] | None:
    """One patient as the API answers it, plus ``merged_from``: the patients merged into this one
    (from its history, so no scan of the patients table)."""
    p = s.get(Patient, pid)
    if p is None:
        return None
    out = with_studies(s, p)
    out["merged_from"] = sorted({h["changes"]["prior_patient"] for h in out["history"]
                                 if h["kind"] == "merged" and isinstance(h["changes"], dict)
                                 and isinstance(h["changes"].get("prior_patient"), int)})
    return out


ORDER_FILTERS = ("accession", "placer", "filler", "status", "patient_id", "patient")


def find_orders(s: Session, filters: dict[str, str], limit: int, *,
                before: int | None = None) -> list[dict[str, Any]]:
    """Orders matching every filter (``ORDER_FILTERS``; ``patient`` is an identifier, ``ID`` or
    ``ID^ISSUER``, of the order's patient), by id (newest first when paging with ``before``)."""
    stmt = select(Order).options(selectinload(Order.history),
                                 selectinload(Order.patient).selectinload(Patient.identifiers))
    cols = {"accession": Order.accession, "placer": Order.placer_number, "filler": Order.filler_number,
            "status": Order.status}
    for k, v in filters.items():
        if k in cols:
            stmt = stmt.where(cols[k] == v)
        elif k == "patient_id":
            stmt = stmt.where(Order.patient_id == (int(v) if v.isdigit() else -1))
        elif k == "patient":
            stmt = stmt.where(Order.patient_id.in_(_identified(*split_identifier(v))))
    if before is not None:
        stmt = stmt.where(Order.id < before).order_by(Order.id.desc())
    else:
        stmt = stmt.order_by(Order.id)
    return [order_json(o, patient=True) for o in s.execute(stmt.limit(limit)).scalars()]


def order_detail(s: Session, oid: int) -> dict[str, Any] | None:
    """One order with its status history, its patient (identifiers, aliases, name; no orders) and
    its studies (linked to it, or carrying its accession number)."""
    o = s.get(Order, oid)
    if o is None:
        return None
    out = order_json(o)
    out["patient"] = patient_json(o.patient, orders=False)
    linked = Study.order_id == o.id
    stmt = select(Study).where(linked | (Study.accession == o.accession) if o.accession else linked)
    out["studies"] = [study_json(st, series=False) for st in s.execute(stmt.order_by(Study.id).limit(MAX_LIMIT))
                      .scalars()]
    return out


@dataclass(frozen=True)
class StudySearch:
    """What a study search asks. ``patient_id`` is the headers' Patient ID; ``exceptions``: the
    studies in a state that needs an analyst (EXCEPTION_STATES); dates are DICOM DA (YYYYMMDD),
    inclusive; ``modality`` one of the study's modalities."""

    accession: str | None = None
    study_uid: str | None = None
    patient_id: str | None = None
    state: str | None = None
    reconciliation: str | None = None
    exceptions: bool = False
    date_from: str | None = None
    date_to: str | None = None
    modality: str | None = None

    def given(self) -> bool:
        return any(v for v in vars(self).values())


def find_studies(s: Session, q: StudySearch, limit: int, *, before: int | None = None,
                 details: bool = True) -> list[dict[str, Any]]:
    """Studies matching ``q`` (by id; newest first when paging with ``before``), with their findings,
    queue entry and (``details``) events."""
    stmt = select(Study).options(selectinload(Study.series), selectinload(Study.findings))
    for col, value in ((Study.accession, q.accession), (Study.study_uid, q.study_uid),
                       (Study.dicom_patient_id, q.patient_id), (Study.state, q.state),
                       (Study.recon_state, q.reconciliation)):
        if value:
            stmt = stmt.where(col == value)
    if q.exceptions:
        stmt = stmt.where(Study.recon_state.in_(EXCEPTION_STATES))
    if q.date_from:
        stmt = stmt.where(Study.study_date >= q.date_from)
    if q.date_to:
        stmt = stmt.where(Study.study_date <= q.date_to)
    if q.modality:
        m = q.modality  # a DICOM CS (MODALITY.fullmatch): nothing LIKE would read as a wildcard
        stmt = stmt.where((Study.modalities == m) | Study.modalities.like(f"{m}\\%", escape="!")
                          | Study.modalities.like(f"%\\{m}", escape="!")
                          | Study.modalities.like(f"%\\{m}\\%", escape="!"))
    if before is not None:
        stmt = stmt.where(Study.id < before).order_by(Study.id.desc())
    else:
        stmt = stmt.order_by(Study.id)
    found = list(s.execute(stmt.limit(limit)).scalars())
    return _studies_json(s, found, events=details)


def _studies_json(s: Session, found: list[Study], *, events: bool = True) -> list[dict[str, Any]]:
    by_study: dict[int, list[DomainEvent]] = {st.id: [] for st in found}
    jobs: dict[int, ReconcileJob] = {}
    if found:
        if events:
            for e in s.execute(select(DomainEvent).where(DomainEvent.study_id.in_(list(by_study)))
                               .order_by(DomainEvent.id)).scalars():
                by_study[e.study_id].append(e)  # type: ignore[index]
        jobs = {j.study_id: j for j in s.execute(select(ReconcileJob).where(
            ReconcileJob.study_id.in_(list(by_study)))).scalars()}
    return [study_json(st, events=by_study[st.id] if events else None, findings=True, job=jobs.get(st.id))
            for st in found]


def study_detail(s: Session, study_uid: str) -> dict[str, Any] | None:
    """One study (by Study Instance UID) with series, events, findings and queue entry, and the
    order and patient it is linked to (ids, accession, identifiers)."""
    st = s.execute(select(Study).where(Study.study_uid == study_uid)
                   .options(selectinload(Study.series), selectinload(Study.findings))).scalar_one_or_none()
    if st is None:
        return None
    [out] = _studies_json(s, [st])
    order = s.get(Order, st.order_id) if st.order_id else None
    patient = s.get(Patient, st.patient_id) if st.patient_id else None
    out["order"] = order_json(order, history=False) if order else None
    out["linked_patient"] = patient_json(patient, orders=False) if patient else None
    return out


@dataclass(frozen=True)
class StoredInstance:
    """Where one instance's file is, and what names its content."""

    sop_instance_uid: str
    storage_key: str
    sha256: str
    transfer_syntax: str


def middle_instance(s: Session, study_uid: str, series_uid: str) -> StoredInstance | None:
    """The series' middle instance (by Instance Number, then arrival), or None when the study has no
    such series."""
    series = s.execute(select(Series.id, Series.num_instances).join(Study, Series.study_id == Study.id)
                       .where(Study.study_uid == study_uid, Series.series_uid == series_uid)).first()
    if series is None:
        return None
    stmt = (select(Instance.sop_instance_uid, Instance.storage_key, Instance.sha256, Instance.transfer_syntax)
            .where(Instance.series_id == series.id)
            .order_by(Instance.instance_number.is_(None), Instance.instance_number, Instance.id))
    row = s.execute(stmt.offset(max(0, (series.num_instances or 0) // 2)).limit(1)).first()
    row = row or s.execute(stmt.limit(1)).first()  # the count was behind the rows
    return StoredInstance(*row) if row else None
