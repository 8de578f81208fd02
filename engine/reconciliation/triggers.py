"""What an applied ADT or order message asks of reconciliation.

Called inside the message's transaction, so the queue rows commit (or roll back) with the change
that caused them:

* a patient created, updated or merged: their reconciled studies are coerced again (A08/A31,
  A40), and studies still waiting for a patient under one of their identifiers are matched again;
* an order created or changed: studies carrying its accession, or already linked to it, are
  matched again (a late order; a cancel after images arrived becomes a finding).
"""

from __future__ import annotations

from sqlalchemy import Connection, select

from engine.domain.patients import Outcome
from engine.domain.records import IDENTIFIERS, ORDERS
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


def _patient_changed(conn: Connection, patient_id: int, reason: str) -> None:
    values = list(conn.execute(select(IDENTIFIERS.c.value).where(IDENTIFIERS.c.patient_id == patient_id)).scalars())
    linked = select(STUDIES.c.id).where(STUDIES.c.patient_id == patient_id)
    stmt = linked.union(select(STUDIES.c.id).where(STUDIES.c.dicom_patient_id.in_(values),
                                                   STUDIES.c.recon_state.in_(WAITING))) if values else linked
    enqueue_many(conn, list(conn.execute(stmt).scalars()), reason)


def _order_changed(conn: Connection, order_id: int) -> None:
    accession = conn.execute(select(ORDERS.c.accession).where(ORDERS.c.id == order_id)).scalar()
    linked = select(STUDIES.c.id).where(STUDIES.c.order_id == order_id)
    stmt = linked.union(select(STUDIES.c.id).where(STUDIES.c.accession == accession)) if accession else linked
    enqueue_many(conn, list(conn.execute(stmt).scalars()), "order")
