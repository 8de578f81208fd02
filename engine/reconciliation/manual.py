"""What an analyst does to a study by hand (CLI ``radbridge studies`` and the admin API).

Each action is written in one transaction with a domain event naming who asked and why; the
reconciler then does the work (coercion included) like for any other trigger. The API and the CLI
that call these hold no event bus: the events are recorded, and queue the study themselves
(nobody can subscribe to them: engine/domain/events.py RECORDED_ONLY).
"""

from __future__ import annotations

from typing import TypedDict

from sqlalchemy import Connection, select, update

from engine.domain.events import (
    FindingAccepted,
    ManualMatchCleared,
    ManualMatchSet,
    ReconcileRequested,
    record_events,
)
from engine.domain.patients import find_patient
from engine.domain.records import ORDERS, first_as
from engine.domain.studies import FINDINGS, STUDIES
from engine.errors import RadBridgeError
from engine.reconciliation.queue import enqueue
from engine.store.states import FindingStatus
from engine.store.types import utcnow


class ManualError(RadBridgeError, ValueError):
    """The request names something that is not there; the message says what."""

    status = 404


class ManualConflict(ManualError):
    """The request contradicts the current state (a finding no longer open)."""

    status = 409


class StudyRef(TypedDict):
    id: int
    study_uid: str
    recon_state: str


class _ManualLink(TypedDict):
    """The studies columns an analyst's match sets (one of them, the other cleared)."""

    manual_order_id: int | None
    manual_patient_id: int | None


class _MatchDetail(TypedDict, total=False):
    by: str
    note: str | None
    study_uid: str
    order: int
    accession: str
    patient: int
    identifier: str


class ManualResult(_MatchDetail, total=False):
    """What the API and the CLI answer: the study, queued, and for a match who asked and what it names."""

    study_id: int
    queued: bool


def find_study(conn: Connection, ref: str) -> StudyRef:
    """A study by Study Instance UID, or by the index's numeric id."""
    stmt = select(STUDIES.c.id, STUDIES.c.study_uid, STUDIES.c.recon_state)
    row = first_as(conn, stmt.where(STUDIES.c.study_uid == ref), StudyRef)
    if row is None and ref.isdigit():
        row = first_as(conn, stmt.where(STUDIES.c.id == int(ref)), StudyRef)
    if row is None:
        raise ManualError(f"no study {ref!r} (give its Study Instance UID or index id)")
    return row


def match(conn: Connection, ref: str, *, accession: str | None = None, patient: str | None = None,
          by: str = "analyst", note: str | None = None) -> ManualResult:
    """Match a study to an order (by accession) or to a patient (``ID^ISSUER``) and queue it."""
    if bool(accession) == bool(patient):
        raise ManualError("give either an order (accession number) or a patient (ID^ISSUER)")
    study = find_study(conn, ref)
    values: _ManualLink = {"manual_order_id": None, "manual_patient_id": None}
    detail: _MatchDetail = {"by": by, "note": note, "study_uid": study["study_uid"]}
    if accession:
        order_id = conn.execute(select(ORDERS.c.id).where(ORDERS.c.accession == accession)
                                .order_by(ORDERS.c.id.desc()).limit(1)).scalar()
        if order_id is None:
            raise ManualError(f"no order with accession number {accession!r}")
        values["manual_order_id"] = order_id
        detail["order"], detail["accession"] = order_id, accession
    else:
        assert patient is not None
        value, _, issuer = patient.partition("^")
        found = find_patient(conn, value, issuer)
        if found is None:
            raise ManualError(f"no patient with identifier {value!r} and issuer {issuer!r}")
        values["manual_patient_id"] = found.id
        detail["patient"], detail["identifier"] = found.id, patient
    conn.execute(update(STUDIES).where(STUDIES.c.id == study["id"]).values(**values))
    record_events(conn, [ManualMatchSet(study_id=study["id"], order_id=values["manual_order_id"],
                                        patient_id=values["manual_patient_id"], study_uid=study["study_uid"], by=by,
                                        note=note, accession=accession or None,
                                        identifier=patient if not accession else None)])
    enqueue(conn, study["id"], "manual")
    return {"study_id": study["id"], "study_uid": study["study_uid"], "queued": True, **detail}


def clear_match(conn: Connection, ref: str, *, by: str = "analyst", note: str | None = None) -> ManualResult:
    """Drop an analyst's match: the study is matched from its headers again (which, once coerced,
    carry the values the manual match wrote)."""
    study = find_study(conn, ref)
    conn.execute(update(STUDIES).where(STUDIES.c.id == study["id"]).values(manual_order_id=None,
                                                                          manual_patient_id=None))
    record_events(conn, [ManualMatchCleared(study_id=study["id"], by=by, note=note)])
    enqueue(conn, study["id"], "manual")
    return {"study_id": study["id"], "study_uid": study["study_uid"], "queued": True}


def request(conn: Connection, ref: str, *, by: str = "analyst") -> ManualResult:
    """Reconcile a study again (after a rules or policy change)."""
    study = find_study(conn, ref)
    enqueue(conn, study["id"], "requested")
    record_events(conn, [ReconcileRequested(study_id=study["id"], by=by)])
    return {"study_id": study["id"], "study_uid": study["study_uid"], "queued": True}


def accept_finding(conn: Connection, finding_id: int, *, by: str = "analyst", note: str | None = None) -> None:
    """An analyst accepts a finding as it is: it stops flagging (or quarantining) the study, and the
    same finding is not raised again for it."""
    row = conn.execute(select(FINDINGS.c.study_id, FINDINGS.c.status).where(FINDINGS.c.id == finding_id)).first()
    if row is None:
        raise ManualError(f"no finding {finding_id}")
    if row.status != FindingStatus.OPEN:
        raise ManualConflict(f"finding {finding_id} is already {row.status}")
    conn.execute(update(FINDINGS).where(FINDINGS.c.id == finding_id).values(
        status=FindingStatus.ACCEPTED, resolved_at=utcnow(), resolution=f"accepted by {by}" + (f": {note}" if note else "")))
    record_events(conn, [FindingAccepted(study_id=row.study_id, finding_id=finding_id, by=by, note=note)])
    enqueue(conn, row.study_id, "requested")  # the study's state follows its open findings
