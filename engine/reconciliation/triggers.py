"""What domain events ask of reconciliation: handlers on the event bus (``subscribe``).

They run in the transaction that raised the event, so the queue rows commit (or roll back) with
the change that caused them:

* a study's first instance (``study.received``): the order can move to in progress;
* a study became stable (``study.stable``): match, compare, coerce;
* a patient created, updated, merged, or given an identifier: their reconciled studies are coerced
  again (A08/A31, A40), and studies still waiting for a patient under one of their identifiers are
  matched again;
* an order placed, changed or cancelled: studies carrying its accession, or already linked to it,
  are matched again (a late order; a cancel after images arrived becomes a finding).
"""

from __future__ import annotations

from typing import TypedDict

from sqlalchemy import Connection, bindparam, select

from engine.domain.events import (
    ORDER_EVENTS,
    PATIENT_EVENTS,
    Event,
    EventBus,
    EventKind,
    StudyReceived,
    StudyStable,
)
from engine.domain.records import IDENTIFIERS, ORDERS, fetch_all
from engine.domain.studies import STUDIES
from engine.reconciliation.queue import enqueue, enqueue_many
from engine.store.states import ReconState

WAITING = (ReconState.PENDING, ReconState.UNMATCHED, ReconState.FLAGGED, ReconState.QUARANTINED)
# the queue row's reasons (reconcile_queue.reasons, shown in /api/studies)
PATIENT_REASONS = {EventKind.PATIENT_CREATED: "patient.created", EventKind.PATIENT_UPDATED: "patient.updated",
                   EventKind.IDENTIFIER_ADDED: "patient.updated", EventKind.PATIENT_MERGED: "patient.merged"}
ORDER_KINDS = (EventKind.ORDER_PLACED, EventKind.ORDER_CHANGED, EventKind.ORDER_CANCELLED)


def subscribe(bus: EventBus) -> None:
    for kind in PATIENT_REASONS:
        bus.subscribe(kind, on_patient)
    for kind in ORDER_KINDS:
        bus.subscribe(kind, on_order)
    bus.subscribe(EventKind.STUDY_RECEIVED, on_study)
    bus.subscribe(EventKind.STUDY_STABLE, on_study)


def on_study(conn: Connection, event: Event) -> None:
    if isinstance(event, StudyReceived):
        enqueue(conn, event.study_id, "received")
    elif isinstance(event, StudyStable):
        enqueue(conn, event.study_id, "stable")


def on_patient(conn: Connection, event: Event) -> None:
    if isinstance(event, PATIENT_EVENTS):
        _patient_changed(conn, event.patient_id, PATIENT_REASONS[event.kind])


class _StudyId(TypedDict):
    id: int


class _StudyLink(TypedDict):
    id: int
    patient_id: int | None
    recon_state: str


def on_order(conn: Connection, event: Event) -> None:
    if isinstance(event, ORDER_EVENTS):
        enqueue_many(conn, [r["id"] for r in fetch_all(conn, STUDIES_OF_ORDER, _StudyId, order_id=event.order_id)], "order")


# Prebuilt (compiled once, run on the driver: these run for every ADT and order message that changes something).
STUDIES_OF_PATIENT = select(STUDIES.c.id, STUDIES.c.patient_id, STUDIES.c.recon_state).where(
    (STUDIES.c.patient_id == bindparam("patient_id"))
    | STUDIES.c.dicom_patient_id.in_(select(IDENTIFIERS.c.value)
                                     .where(IDENTIFIERS.c.patient_id == bindparam("patient_id")).scalar_subquery()))
STUDIES_OF_ORDER = select(STUDIES.c.id).where(
    (STUDIES.c.order_id == bindparam("order_id"))
    | (STUDIES.c.accession == select(ORDERS.c.accession)
       .where(ORDERS.c.id == bindparam("order_id")).scalar_subquery()))


def _patient_changed(conn: Connection, patient_id: int, reason: str) -> None:
    """The patient's studies, and those still waiting for a patient under one of its identifiers
    (a study reconciled to someone else under the same ID value is left alone)."""
    rows = fetch_all(conn, STUDIES_OF_PATIENT, _StudyLink, patient_id=patient_id)
    enqueue_many(conn, [r["id"] for r in rows if r["patient_id"] == patient_id or r["recon_state"] in WAITING],
                 reason)
