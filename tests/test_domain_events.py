"""Typed domain events: what applying ADT and order messages raises, written to domain_events and
handed to subscribers in the message's transaction, and the reconciliation queue rows the
reconciliation triggers make of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, delete, select

from engine.channels import Channel
from engine.domain.errors import DomainError
from engine.domain.events import Event as DomainEventPayload
from engine.domain.events import (
    EventBus,
    EventKind,
    IdentifierAdded,
    OrderCancelled,
    OrderChanged,
    OrderPlaced,
    PatientCreated,
    PatientMerged,
    PatientUpdated,
    StudyStable,
    from_row,
)
from engine.domain.patients import Outcome, find_patient
from engine.domain.records import add
from engine.domain.studies import REPORT_SOP_CLASSES, STUDIES, mark_stable
from engine.outbound.context import REPORT_CLASSES
from engine.pipeline.actions import apply_action
from engine.pipeline.hl7_inbound import HL7Inbound
from engine.reconciliation import triggers
from engine.reconciliation.queue import QUEUE
from engine.store.db import Database
from engine.store.models import DomainEvent
from engine.store.prepared import savepoint
from engine.store.types import utcnow
from tests.hl7util import adt, orm


@dataclass
class Domain:
    db: Database
    inbound: HL7Inbound
    channel: Channel
    seen: list[DomainEventPayload] = field(default_factory=list)

    def bus(self) -> EventBus:
        """The engine's reconciliation triggers, and a subscriber that keeps what it is handed."""
        bus = EventBus()
        triggers.subscribe(bus)
        for kind in (EventKind.PATIENT_CREATED, EventKind.PATIENT_UPDATED, EventKind.PATIENT_MERGED,
                     EventKind.IDENTIFIER_ADDED, EventKind.ORDER_PLACED, EventKind.ORDER_CHANGED,
                     EventKind.ORDER_CANCELLED, EventKind.STUDY_STABLE):
            bus.subscribe(kind, lambda _conn, ev: self.seen.append(ev))
        return bus

    def apply(self, conn: Connection, raw: str, bus: EventBus) -> Outcome:
        p = self.inbound.prepare(raw.encode())
        assert p.route is not None and not p.mapping_errors, (p.reject, p.mapping_errors)
        return apply_action(conn, p.route.action, p.values, p.groups, self.channel.options, None, bus=bus)

    def events(self, after: int = 0) -> list[tuple[int, DomainEventPayload]]:
        with self.db.read_session() as s:
            rows = s.execute(select(DomainEvent).where(DomainEvent.id > after).order_by(DomainEvent.id)).scalars()
            return [(r.id, from_row(r.kind, r.study_id, r.patient_id, r.order_id, r.detail)) for r in rows]

    def queue(self) -> dict[int, str]:
        with self.db.read_session() as s:
            return {r.study_id: r.reasons for r in s.execute(select(QUEUE.c.study_id, QUEUE.c.reasons))}


@pytest.fixture
def domain(hl7_stage: tuple[Database, HL7Inbound]) -> Domain:
    db, stage = hl7_stage
    return Domain(db, stage, stage.channel)


def step(d: Domain, raw: str, bus: EventBus) -> tuple[Outcome, list[DomainEventPayload]]:
    """Apply one message in its own transaction; (its outcome, the events it wrote)."""
    last = max((i for i, _ in d.events()), default=0)
    d.seen.clear()
    with d.db.write_session() as s, s.begin():
        out = d.apply(s.connection(), raw, bus)
    written = [ev for _, ev in d.events(last)]
    assert written == out.events == d.seen  # in the table, typed, and handed to the subscriber
    return out, written


def test_adt_and_orm_messages_raise_typed_events(domain: Domain) -> None:
    bus = domain.bus()
    out, evs = step(domain, adt("A01", "EV1", "Smith", "Ann", ts="20240401080000"), bus)
    p1 = out.patient_id
    assert p1 is not None and len(evs) == 1 and isinstance(evs[0], PatientCreated)
    assert (evs[0].patient_id, evs[0].identifier) == (p1, "EV1^GENHOSP")
    assert evs[0].fields["family_name"] == "Smith" and evs[0].kind == "patient.created"

    _, evs = step(domain, adt("A08", "EV1", "Jones", "Ann", ts="20240401090000"), bus)
    assert evs == [PatientUpdated(patient_id=p1, fields={"family_name": ["Smith", "Jones"]})]

    # the same demographics again: nothing happened, nothing is written
    _, evs = step(domain, adt("A08", "EV1", "Jones", "Ann", ts="20240401091000"), bus)
    assert evs == []

    # a second identifier (PID-3 repetition) on an update
    _, evs = step(domain, adt("A08", "EV1", "Jones", "Ann", ts="20240401092000",
                              pid_extra="~555-11-2222^^^SSA^SS"), bus)
    assert evs == [IdentifierAdded(patient_id=p1, identifiers=("555-11-2222^SSA",))]

    out, _ = step(domain, adt("A01", "EV2", "Jones", "Ann", ts="20240401093000"), bus)
    p2 = out.patient_id
    _, evs = step(domain, adt("A40", "EV1", "Jones", "Ann", ts="20240401100000", mrg="EV2"), bus)
    assert evs == [PatientMerged(patient_id=p1, merged_patient_id=p2, alias="EV2^GENHOSP")]

    out, evs = step(domain, orm("NW", "PLEV1", "ACCEV1", "EV1", ts="20240401110000"), bus)
    order_id = out.order_ids[0]
    assert evs == [OrderPlaced(order_id=order_id, patient_id=p1, accession="ACCEV1", status="SC", control="NW")]
    _, evs = step(domain, orm("XO", "PLEV1", "ACCEV1", "EV1", status="IP", ts="20240401120000"), bus)
    assert evs == [OrderChanged(order_id=order_id, patient_id=p1, accession="ACCEV1", from_status="SC",
                                status="IP", control="XO")]
    _, evs = step(domain, orm("CA", "PLEV1", "ACCEV1", "EV1", ts="20240401130000"), bus)
    assert evs == [OrderCancelled(order_id=order_id, patient_id=p1, accession="ACCEV1", from_status="IP",
                                  status="CA", control="CA")]
    # a stale message changes nothing and raises nothing
    _, evs = step(domain, orm("XO", "PLEV1", "ACCEV1", "EV1", status="SC", ts="20240401010000"), bus)
    assert evs == []

    # an order for a patient not known yet: the patient first, then the order
    out, evs = step(domain, orm("NW", "PLEV2", "ACCEV2", "EV3", ts="20240401140000"), bus)
    assert [type(e) for e in evs] == [PatientCreated, OrderPlaced]
    assert evs[1].columns() == (None, out.patient_id, out.order_ids[0])


def _two_orders(second_control: str) -> str:
    """An ORM with two order groups; the second's control code decides whether it applies."""
    first = orm("NW", "PLRB1", "ACCRB1", "RB1", ts="20240402080000")
    other = orm(second_control, "PLRB2", "ACCRB2", "RB1", ts="20240402080000").split("\r")
    return first + "\r".join(s for s in other if s.startswith(("ORC", "OBR"))) + "\r"


def test_a_failed_message_leaves_neither_change_nor_event(domain: Domain) -> None:
    bus = domain.bus()
    # a domain error in the second order group, inside the message's savepoint (as the pipeline applies it)
    with domain.db.write_session() as s, s.begin():
        conn = s.connection()
        with pytest.raises(DomainError), savepoint(conn):
            domain.apply(conn, _two_orders("ZZ"), bus)
    # a subscriber that fails fails the transaction: the patient, the order and their events go together
    failing = domain.bus()

    def refuse(_conn: Connection, _ev: DomainEventPayload) -> None:
        raise RuntimeError("subscriber failed")
    failing.subscribe(EventKind.ORDER_PLACED, refuse)
    with pytest.raises(RuntimeError), domain.db.write_session() as s, s.begin():
        domain.apply(s.connection(), _two_orders("NW"), failing)
    with domain.db.read_session() as s:
        assert find_patient(s.connection(), "RB1", "GENHOSP") is None
    assert domain.events() == []
    # and the same message, applied, commits both
    _, evs = step(domain, _two_orders("NW"), bus)
    assert [type(e) for e in evs] == [PatientCreated, OrderPlaced, OrderPlaced]


def test_a_message_writes_its_events_in_one_insert(domain: Domain) -> None:
    if domain.db.is_postgres:
        pytest.skip("statements are counted with SQLite's trace callback")
    bus = domain.bus()
    statements: list[str] = []
    with domain.db.write_session() as s, s.begin():
        conn = s.connection()
        conn.connection.driver_connection.set_trace_callback(statements.append)  # type: ignore[union-attr]
        try:
            out = domain.apply(conn, _two_orders("NW"), bus)
        finally:
            conn.connection.driver_connection.set_trace_callback(None)  # type: ignore[union-attr]
    assert len(out.events) == 3
    assert len([q for q in statements if q.lstrip().upper().startswith("INSERT INTO DOMAIN_EVENTS")]) == 1


def _study(conn: Connection, uid: str, **values: Any) -> int:
    now = utcnow()
    return add(conn, STUDIES, study_uid=uid, state=values.pop("state", "stable"), first_received_at=now,
               last_received_at=values.pop("last_received_at", now), num_series=1, num_instances=1, size_bytes=1,
               times_stable=1, **values)


def test_reconciliation_queue_rows_for_patient_update_merge_and_late_order(domain: Domain) -> None:
    bus = domain.bus()
    p1 = step(domain, adt("A01", "RQ1", "Smith", ts="20240403080000"), bus)[0].patient_id
    p2 = step(domain, adt("A01", "RQ2", "Smith", ts="20240403080000"), bus)[0].patient_id
    p3 = step(domain, adt("A01", "RQ3", "Other", ts="20240403080000"), bus)[0].patient_id
    with domain.db.write_session() as s, s.begin():
        c = s.connection()
        mine = _study(c, "1.2.3.1", dicom_patient_id="RQ1", patient_id=p1, recon_state="reconciled")
        theirs = _study(c, "1.2.3.2", dicom_patient_id="RQ2", patient_id=p2, recon_state="reconciled")
        waiting = _study(c, "1.2.3.3", dicom_patient_id="RQ2", recon_state="unmatched")
        # reconciled to someone else under the same ID value: left alone
        _study(c, "1.2.3.4", dicom_patient_id="RQ1", patient_id=p3, recon_state="reconciled")
        late = _study(c, "1.2.3.5", dicom_patient_id="NOSUCH", accession="ACCRQ", recon_state="unmatched")
        due = _study(c, "1.2.3.6", state="receiving", last_received_at=utcnow() - timedelta(hours=1))
        c.execute(delete(QUEUE))

    def clear() -> None:
        with domain.db.write_session() as s, s.begin():
            s.connection().execute(delete(QUEUE))

    step(domain, adt("A08", "RQ1", "Smyth", ts="20240403090000"), bus)
    assert domain.queue() == {mine: "patient.updated"}
    clear()
    # A40: the prior patient's studies move to the survivor; those waiting under its ID come too
    step(domain, adt("A40", "RQ1", "Smyth", ts="20240403100000", mrg="RQ2"), bus)
    assert domain.queue() == {mine: "patient.merged", theirs: "patient.merged", waiting: "patient.merged"}
    clear()
    # a late order: the study carrying its accession is matched again
    step(domain, orm("NW", "PLRQ", "ACCRQ", "RQ1", family="Smyth", ts="20240403110000"), bus)
    assert domain.queue() == {late: "order"}
    clear()
    # stability, published by its caller as check_stability does
    with domain.db.write_session() as s, s.begin():
        c = s.connection()
        event = mark_stable(c, due, utcnow())
        assert isinstance(event, StudyStable) and event.study_id == due
        bus.publish(c, event)
        assert mark_stable(c, due, utcnow()) is None  # claimed once
    assert domain.queue() == {due: "stable"}
    assert [ev for _, ev in domain.events()][-1] == event


def test_the_analysts_kinds_are_recorded_only() -> None:
    with pytest.raises(ValueError, match="nobody can subscribe"):
        EventBus().subscribe(EventKind.STUDY_MANUAL_MATCH, lambda _c, _e: None)


def test_report_classes_agree_with_the_outbound_context() -> None:
    assert set(REPORT_SOP_CLASSES) == set(REPORT_CLASSES)
