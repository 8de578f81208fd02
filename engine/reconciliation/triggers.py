"""What an applied ADT or order message asks of reconciliation.

Called inside the message's transaction, so the queue rows commit (or roll back) with the change
that caused them:

* a patient created, updated or merged: their reconciled studies are coerced again (A08/A31,
  A40), and studies still waiting for a patient under one of their identifiers are matched again;
* an order created or changed: studies carrying its accession, or already linked to it, are
  matched again (a late order; a cancel after images arrived becomes a finding).
"""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, select

from engine.domain.patients import Outcome
from engine.domain.records import IDENTIFIERS, ORDERS, fetch_all
from engine.domain.studies import STUDIES
from engine.reconciliation.queue import enqueue_many

WAITING = ("pending", "unmatched", "flagged", "quarantined")
PATIENT_CHANGES = ("patient.", "identifier ")  # Outcome.changes prefixes that matter to headers


def after_message(conn: Connection, action: str, out: Outcome) -> None:
    if action.startswith("patient.") and out.patient_id is not None:
        if any(c.startswith(PATIENT_CHANGES) or " created" in c or " merged into " in c or "now identified" in c
               for c in out.changes):
            _patient_changed(conn, out.patient_id, "patient.merged" if action == "patient.merge"
                             else "patient.updated")
    elif action == "order":
        for order_id in dict.fromkeys(out.order_ids):
            _order_changed(conn, order_id)
        if out.patient_id is not None and any(c.startswith("patient ") and c.endswith(" created")
                                              for c in out.changes):
            _patient_changed(conn, out.patient_id, "patient.created")


# Prebuilt (compiled once, run on the driver: these run for every ADT and order message).
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
    rows = fetch_all(conn, STUDIES_OF_PATIENT, patient_id=patient_id)
    enqueue_many(conn, [r["id"] for r in rows if r["patient_id"] == patient_id or r["recon_state"] in WAITING],
                 reason)


def _order_changed(conn: Connection, order_id: int) -> None:
    enqueue_many(conn, [r["id"] for r in fetch_all(conn, STUDIES_OF_ORDER, order_id=order_id)], "order")
