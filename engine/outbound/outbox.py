"""The transactional outbox: delivery rows, written with the domain change that causes them.

    Outbox.subscribe(bus)                 handlers on the domain event bus, called in the
                                          reconciler's closing transaction: for study.reconciled /
                                          study.corrected one row per enabled route that takes the
                                          event; for report.received (one per SR/PDF instance of
                                          such a study) a row per report route not sent it before
    claim(conn, destination, ...)         a worker leases due rows: FOR UPDATE SKIP LOCKED on
                                          PostgreSQL, and never a row whose patient has an older
                                          row still pending for that destination (per-patient order)
    settle(conn, attempted, ...)          a batch's attempts are recorded (one INSERT); each delivery is
                                          delivered, retried later, or dead
    retry / discard                       an operator's hand (CLI, API)

A row is leased while it is being sent (engine/store/leases.py: short, renewed while the batch is
worked, naming its holder host:pid:start); a process that dies mid-send leaves a lease that lapses
within [database] lease_seconds, or is taken back at once when an engine starts on its host, and
the row is sent again (at least once: the MSH-10 and the conditional-update key are stable, so the
EHR sees a resend, not a second result).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypedDict

from sqlalchemy import (
    Connection,
    Integer,
    Select,
    Table,
    and_,
    bindparam,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.orm import aliased

from engine.channels import Channel, Destination, OutboundRoute
from engine.domain.events import Event, EventBus, EventKind, ReportReceived, StudyCorrected, StudyReconciled
from engine.domain.records import add, fetch_all, update_row_if
from engine.outbound.render import Rendered
from engine.store.leases import LEASE_SECONDS
from engine.store.models import Delivery, DeliveryAttempt
from engine.store.states import AttemptOutcome, DeliveryState
from engine.store.types import utcnow

DELIVERIES: Table = Delivery.__table__  # type: ignore[assignment]
ATTEMPTS: Table = DeliveryAttempt.__table__  # type: ignore[assignment]
STATES = tuple(DeliveryState)


class KeptRendering(TypedDict, total=False):
    """deliveries.detail: what a retry needs, besides the payload, to send the same message again."""

    resource: str | None  # fhir: the resource type
    conditional: str | None  # fhir: the conditional-update query
    # dicom-forward (no payload: the stored instances are sent): the instances (ids) the destination
    # acknowledged so far, which a retry does not send again; emptied once every one was taken
    acknowledged: list[int]
    instances: int  # how many the last attempt selected
    sent: int  # acknowledged in all, over every attempt
    # dicom-forward with storage_commitment: every instance stored, commitment owed; the transaction
    # asked for (storage_commitments.transaction_uid) while its report is awaited
    stored: bool
    commitment: str


class DeliveryValues(TypedDict, total=False):
    """deliveries (engine/store/models.py Delivery): the columns an attempt or an operator changes,
    any subset of them."""

    id: int
    created_at: datetime
    channel: str
    destination: str
    mapping: str
    event: str
    study_id: int | None
    instance_id: int | None
    patient_id: int | None
    order_id: int | None
    order_key: str
    state: str  # DeliveryState
    attempts: int
    next_at: datetime
    leased_until: datetime | None
    leased_by: str | None
    payload: str | None
    content_type: str | None
    control_id: str | None
    target: str | None
    last_error: str | None
    delivered_at: datetime | None
    detail: KeptRendering | None


@dataclass(frozen=True)
class Claimed:
    id: int
    destination: str
    mapping: str
    event: str
    study_id: int | None
    instance_id: int | None
    attempts: int
    payload: str | None
    content_type: str | None
    created_at: datetime
    detail: KeptRendering | None = None
    control_id: str | None = None

    def kept(self) -> Rendered | None:
        """The message built at the first attempt, which every retry sends again."""
        if self.payload is None:
            return None
        d = self.detail or {}
        return Rendered(self.payload, self.content_type or "", d.get("resource"), d.get("conditional"),
                        self.control_id)


@dataclass
class Outcome:
    """What one attempt came to: delivered, retry (with the earliest next try), or dead."""

    outcome: AttemptOutcome
    status: str | None = None  # AA, AE, 201, 503, timeout, refused ...
    response: str | None = None
    error: str | None = None
    duration_ms: int = 0
    retry_after: float | None = None  # seconds the destination asked us to wait (Retry-After)
    target: str | None = None
    detail: KeptRendering | None = None  # kept for the next attempt (dicom-forward: what was acknowledged)
    # whether the destination itself failed (the worker pauses); None: judged by ``status``
    # (engine/outbound/worker.py DESTINATION_FAILURES)
    destination_failure: bool | None = None


class Outbox:
    """The outbound channels' routes, for writing deliveries in the transaction that causes them
    (subscribed to the domain event bus)."""

    def __init__(self, channels: list[Channel], enabled: set[str], supersede: set[str] | None = None) -> None:
        """``enabled``: destination names that have an address configured ([ehr] mllp / fhir_base);
        ``supersede``: mappings whose messages carry state (FHIR resources), so a newer one replaces an
        older one not yet sent."""
        self.supersede = supersede or set()
        self.routes: list[tuple[Channel, OutboundRoute]] = [
            (ch, r) for ch in channels if ch.connector == "outbound" and ch.enabled
            for r in ch.outbound_routes if r.enabled and r.to in enabled]
        self.report_routes = [(ch, r) for ch, r in self.routes if EventKind.REPORT_RECEIVED in r.events]
        self._queued = 0
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.routes)

    # --- subscribers -----------------------------------------------------------------------------------
    def subscribe(self, bus: EventBus) -> None:
        bus.subscribe(EventKind.STUDY_RECONCILED, self.on_event)
        bus.subscribe(EventKind.STUDY_CORRECTED, self.on_event)
        bus.subscribe(EventKind.REPORT_RECEIVED, self.on_event)

    def on_event(self, conn: Connection, event: Event) -> None:
        if isinstance(event, StudyReconciled | StudyCorrected):
            ids = self.on_study(conn, str(event.kind), study_id=event.study_id, patient_id=event.patient_id,
                                order_id=event.order_id)
        elif isinstance(event, ReportReceived):
            ids = self.on_report(conn, study_id=event.study_id, instance_id=event.instance_id,
                                 patient_id=event.patient_id, order_id=event.order_id)
        else:
            return
        if ids:
            with self._lock:
                self._queued += len(ids)

    def take_queued(self) -> int:
        """Deliveries queued since the last call (to wake the workers). Counted when written: a
        transaction that rolled back afterwards makes a wake-up that finds nothing, no harm."""
        with self._lock:
            n, self._queued = self._queued, 0
        return n

    # --- rows -----------------------------------------------------------------------------------------------
    def on_study(self, conn: Connection, event: str, *, study_id: int, patient_id: int | None,
                 order_id: int | None) -> list[int]:
        """Queue what a study event owes the EHR: a row per route that takes it."""
        ids: list[int] = []
        now = utcnow()
        order_key = _order_key(study_id, patient_id)
        for ch, route in self.routes:
            if event not in route.events:
                continue
            if route.mapping in self.supersede:  # a state resource: a newer one replaces an unsent older one
                conn.execute(update(DELIVERIES).where(
                    DELIVERIES.c.study_id == study_id, DELIVERIES.c.destination == route.to,
                    DELIVERIES.c.mapping == route.mapping, DELIVERIES.c.state == DeliveryState.PENDING,
                    DELIVERIES.c.instance_id.is_(None), DELIVERIES.c.attempts == 0,
                    DELIVERIES.c.leased_until.is_(None)).values(state=DeliveryState.SUPERSEDED))
            ids.append(_add(conn, ch.name, route, event, study_id, None, patient_id, order_id, order_key, now))
        return ids

    def on_report(self, conn: Connection, *, study_id: int, instance_id: int, patient_id: int | None,
                  order_id: int | None) -> list[int]:
        """A report of a placed study: a row per report route that has not had this instance."""
        if not self.report_routes:
            return []
        sent = {(r.destination, r.mapping) for r in conn.execute(
            select(DELIVERIES.c.destination, DELIVERIES.c.mapping)
            .where(DELIVERIES.c.instance_id == instance_id, DELIVERIES.c.study_id == study_id))}
        now = utcnow()
        order_key = _order_key(study_id, patient_id)
        return [_add(conn, ch.name, route, str(EventKind.REPORT_RECEIVED), study_id, instance_id, patient_id, order_id,
                     order_key, now)
                for ch, route in self.report_routes if (route.to, route.mapping) not in sent]


def _order_key(study_id: int, patient_id: int | None) -> str:
    return f"patient:{patient_id}" if patient_id is not None else f"study:{study_id}"


def _add(conn: Connection, channel: str, route: OutboundRoute, event: str, study_id: int, instance_id: int | None,
         patient_id: int | None, order_id: int | None, order_key: str, now: datetime) -> int:
    return add(conn, DELIVERIES, created_at=now, channel=channel, destination=route.to, mapping=route.mapping,
               event=event, study_id=study_id, instance_id=instance_id, patient_id=patient_id, order_id=order_id,
               order_key=order_key, state=DeliveryState.PENDING, attempts=0, next_at=now)


# --- workers ------------------------------------------------------------------------------------------

def _claim_query(skip_locked: bool) -> Select[Any]:
    d = DELIVERIES
    older = aliased(d)
    blocked = exists().where(older.c.destination == d.c.destination, older.c.order_key == d.c.order_key,
                             older.c.state == DeliveryState.PENDING, older.c.id < d.c.id)
    stmt = (select(d.c.id, d.c.destination, d.c.mapping, d.c.event, d.c.study_id, d.c.instance_id, d.c.attempts,
                   d.c.payload, d.c.content_type, d.c.created_at, d.c.detail, d.c.control_id)
            .where(d.c.destination == bindparam("destination"), d.c.state == DeliveryState.PENDING,
                   d.c.next_at <= bindparam("now"), (d.c.leased_until.is_(None)) | (d.c.leased_until < bindparam("now")),
                   ~blocked)
            .order_by(d.c.next_at, d.c.id).limit(bindparam("limit", type_=Integer)))
    return stmt.with_for_update(of=d, skip_locked=True) if skip_locked else stmt


# prebuilt (compiled once per dialect, engine/store/prepared.py): a worker claims once per batch
CLAIMABLE = _claim_query(skip_locked=False)
CLAIMABLE_SKIP_LOCKED = _claim_query(skip_locked=True)  # PostgreSQL: two engines never take the same row


def claim(conn: Connection, destination: str, worker: str, limit: int = 20,
          lease_seconds: float = LEASE_SECONDS) -> list[Claimed]:
    """Lease due deliveries of one destination, oldest first, at most one per patient, and never
    one whose patient has an older delivery still pending there (it waits its turn)."""
    now = utcnow()
    d = DELIVERIES
    query = CLAIMABLE_SKIP_LOCKED if conn.dialect.name == "postgresql" else CLAIMABLE
    rows = fetch_all(conn, query, destination=destination, now=now, limit=limit)
    if not rows:
        return []
    conn.execute(update(d).where(d.c.id.in_([r["id"] for r in rows]))
                 .values(leased_until=now + timedelta(seconds=lease_seconds), leased_by=worker[:64]))
    return [Claimed(r["id"], r["destination"], r["mapping"], r["event"], r["study_id"], r["instance_id"], r["attempts"],
                    r["payload"], r["content_type"], r["created_at"], r["detail"], r["control_id"]) for r in rows]


@dataclass
class Attempted:
    """One delivery's attempt, to be recorded: ``rendered``, the message built for it (kept for the
    next attempts); ``next_delay``, the backoff before the next try (the worker computes it)."""

    claimed: Claimed
    outcome: Outcome
    rendered: Rendered | None = None
    next_delay: float = 0.0


def settle(conn: Connection, attempted: list[Attempted], dest: Destination, *, worker: str) -> list[str]:
    """Record a batch's attempts (one INSERT for all) and move each delivery on; returns their new
    states, in order."""
    now = utcnow()
    rows: list[dict[str, Any]] = []
    changes: list[tuple[int, DeliveryValues]] = []
    for a in attempted:
        c, o = a.claimed, a.outcome
        attempts = c.attempts + 1
        outcome = o.outcome
        if outcome == AttemptOutcome.RETRY and attempts >= dest.max_attempts:
            outcome = AttemptOutcome.DEAD
            o.error = f"{o.error or o.status or 'failed'}; gave up after {attempts} attempts"
        rows.append({"delivery_id": c.id, "at": now, "duration_ms": o.duration_ms, "outcome": outcome,
                     "status": o.status, "response": (o.response or "")[:4000] or None,
                     "error": (o.error or "")[:2000] or None, "worker": worker[:64]})
        values: DeliveryValues = {"attempts": attempts, "leased_until": None, "leased_by": None}
        if a.rendered is not None:
            r = a.rendered
            values.update({"payload": r.payload, "content_type": r.content_type, "control_id": r.control_id,
                           "detail": {"resource": r.resource, "conditional": r.conditional}})
        if o.detail is not None:
            values["detail"] = o.detail
        if o.target:
            values["target"] = o.target[:512]
        if outcome == AttemptOutcome.DELIVERED:
            values.update({"state": DeliveryState.DELIVERED, "delivered_at": now, "last_error": None})
        elif outcome == AttemptOutcome.DEAD:
            values.update({"state": DeliveryState.DEAD, "last_error": (o.error or o.status or "")[:2000]})
        else:
            delay = max(a.next_delay, o.retry_after or 0.0)
            values.update({"next_at": now + timedelta(seconds=delay), "last_error": (o.error or o.status or "")[:2000]})
        changes.append((c.id, values))
    if rows:
        conn.execute(insert(ATTEMPTS), rows)
    states = []
    for delivery_id, values in changes:
        # an operator may have discarded it while it was in flight: that decision stands
        moved = update_row_if(conn, DELIVERIES, delivery_id, {"state": DeliveryState.PENDING}, **values)
        states.append(str(values.get("state", DeliveryState.PENDING)) if moved else DeliveryState.DISCARDED)
    return states


def release(conn: Connection, ids: list[int]) -> None:
    """Give back leases not worked (engine stopping)."""
    if ids:
        conn.execute(update(DELIVERIES).where(DELIVERIES.c.id.in_(ids), DELIVERIES.c.state == DeliveryState.PENDING)
                     .values(leased_until=None, leased_by=None))


# --- operators ------------------------------------------------------------------------------------------

def retry(conn: Connection, ids: list[int] | None = None, *, destination: str | None = None,
          rebuild: bool = False, states: tuple[str, ...] = (DeliveryState.DEAD,)) -> int:
    """Put deliveries back in the queue (dead ones, or the ids given, which may be pending in
    backoff: they go now). ``rebuild`` renders the message again (a mapping was fixed)."""
    now = utcnow()
    in_flight = (DELIVERIES.c.state == DeliveryState.PENDING) & DELIVERIES.c.leased_until.is_not(None) \
        & (DELIVERIES.c.leased_until >= now)
    cond: list[Any] = [DELIVERIES.c.state.in_(states if ids is None else (DeliveryState.DEAD, DeliveryState.PENDING,
                                                                        DeliveryState.DISCARDED)),
                       ~in_flight]  # one being sent now is not sent twice
    if ids is not None:
        cond.append(DELIVERIES.c.id.in_(ids))
    if destination:
        cond.append(DELIVERIES.c.destination == destination)
    values: DeliveryValues = {"state": DeliveryState.PENDING, "attempts": 0, "next_at": now, "leased_until": None,
                              "leased_by": None}
    if rebuild:
        values.update({"payload": None, "content_type": None, "detail": None})
    return int(conn.execute(update(DELIVERIES).where(and_(*cond)).values(**values)).rowcount or 0)


def discard(conn: Connection, ids: list[int], note: str = "") -> int:
    """Give up on deliveries an operator knows the EHR does not need (pending or dead ones)."""
    now = utcnow()
    found = [r[0] for r in conn.execute(select(DELIVERIES.c.id).where(
        DELIVERIES.c.id.in_(ids), DELIVERIES.c.state.in_((DeliveryState.PENDING, DeliveryState.DEAD))))]
    n = conn.execute(update(DELIVERIES).where(DELIVERIES.c.id.in_(found))
                     .values(state=DeliveryState.DISCARDED, leased_until=None, leased_by=None,
                             last_error=("discarded" + (f": {note}" if note else ""))[:2000])).rowcount or 0
    for i in found:
        add(conn, ATTEMPTS, delivery_id=i, at=now, duration_ms=0, outcome=AttemptOutcome.DISCARDED, status=None, response=None,
            error=note or "discarded by an operator", worker="operator")
    return int(n)


def counts(conn: Connection) -> dict[str, dict[str, int]]:
    """Deliveries per destination and state."""
    out: dict[str, dict[str, int]] = {}
    for dest, state, n in conn.execute(select(DELIVERIES.c.destination, DELIVERIES.c.state, func.count())
                                       .group_by(DELIVERIES.c.destination, DELIVERIES.c.state)):
        out.setdefault(dest, {})[state] = n
    return out
