"""Deliveries as operators see them (admin API, console and `radbridge deliveries`): list, show, and
what their retry and discard actions record on the audit trail."""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict, cast

from sqlalchemy import Connection, func, literal, select, union_all

from engine.domain.records import ORDER_HISTORY
from engine.domain.studies import STUDIES
from engine.outbound.outbox import ATTEMPTS, DELIVERIES, KeptRendering
from engine.store.audit import Subject, delivery_subject
from engine.store.states import DeliveryState

SUMMARY = (DELIVERIES.c.id, DELIVERIES.c.created_at, DELIVERIES.c.channel, DELIVERIES.c.destination,
           DELIVERIES.c.mapping, DELIVERIES.c.event, DELIVERIES.c.state, DELIVERIES.c.attempts, DELIVERIES.c.next_at,
           DELIVERIES.c.delivered_at, DELIVERIES.c.last_error, DELIVERIES.c.control_id, DELIVERIES.c.target,
           DELIVERIES.c.patient_id, DELIVERIES.c.order_id, DELIVERIES.c.instance_id, DELIVERIES.c.order_key,
           STUDIES.c.study_uid, STUDIES.c.accession)


class DeliverySummary(TypedDict):
    """A delivery as listed (times as ISO text)."""

    id: int
    created_at: str
    channel: str
    destination: str
    mapping: str
    event: str
    state: str
    attempts: int
    next_at: NotRequired[str]  # only while pending
    delivered_at: str | None
    last_error: str | None
    control_id: str | None
    target: str | None
    patient_id: int | None
    order_id: int | None
    instance_id: int | None
    order_key: str
    study_uid: str | None
    accession: str | None


class AttemptSummary(TypedDict):
    at: str
    duration_ms: int
    outcome: str
    status: str | None
    response: str | None
    error: str | None
    worker: str | None


class DeliveryDetail(DeliverySummary):
    """A delivery as shown: what is sent, and every attempt."""

    payload: str | None
    content_type: str | None
    detail: KeptRendering | None
    leased_by: str | None  # while being sent: who holds it, host:pid:start
    leased_until: str | None
    attempts_made: list[AttemptSummary]


def _json(row: Any) -> dict[str, Any]:
    """A row as JSON: times as ISO text, next_at only while pending."""
    out = dict(row)
    for k in ("created_at", "next_at", "delivered_at", "at", "leased_until"):
        if out.get(k) is not None:
            out[k] = out[k].isoformat()
    if out.get("state") != DeliveryState.PENDING:
        out.pop("next_at", None)
    return out


def list_deliveries(conn: Connection, *, state: str | None = None, destination: str | None = None,
                    study_uid: str | None = None, limit: int = 100, before: int | None = None,
                    after: int | None = None, message_id: int | None = None) -> list[DeliverySummary]:
    """Deliveries newest first, filtered; keyset paging by id: ``before`` (older than that id) or
    ``after`` (the ``limit`` just newer than it, still newest first). ``message_id``: those for the
    studies of the orders that message placed or changed."""
    stmt = select(*SUMMARY).select_from(DELIVERIES.outerjoin(STUDIES, STUDIES.c.id == DELIVERIES.c.study_id))
    if state:
        stmt = stmt.where(DELIVERIES.c.state == state)
    if destination:
        stmt = stmt.where(DELIVERIES.c.destination == destination)
    if study_uid:
        stmt = stmt.where(STUDIES.c.study_uid == study_uid)
    if message_id is not None:
        orders = select(ORDER_HISTORY.c.order_id).where(ORDER_HISTORY.c.message_id == message_id)
        stmt = stmt.where(DELIVERIES.c.study_id.in_(select(STUDIES.c.id).where(STUDIES.c.order_id.in_(orders))))
    if before is not None:
        stmt = stmt.where(DELIVERIES.c.id < before)
    if after is not None:
        rows = conn.execute(stmt.where(DELIVERIES.c.id > after).order_by(DELIVERIES.c.id).limit(limit)).mappings()
        return [cast(DeliverySummary, _json(r)) for r in reversed(list(rows))]
    return [cast(DeliverySummary, _json(r)) for r in conn.execute(stmt.order_by(DELIVERIES.c.id.desc())
                                                                  .limit(limit)).mappings()]


def destinations(conn: Connection) -> list[str]:
    """Every destination that has deliveries, by a walk over the (destination, ...) index: one
    lookup per destination, however many deliveries there are."""
    found: list[str] = []
    d = DELIVERIES.c.destination
    nxt = conn.execute(select(func.min(d))).scalar()
    for _ in range(1000):  # destinations are a handful; bounded all the same
        if nxt is None:
            break
        found.append(nxt)
        nxt = conn.execute(select(func.min(d)).where(d > nxt)).scalar()
    return found


def capped_counts(conn: Connection, cap: int = 10_000) -> dict[str, dict[str, int]]:
    """Deliveries per destination and state, each count stopping at ``cap`` + 1 (shown as "10000+"),
    so a page that shows them reads at most that many index entries per cell, never the whole table."""
    dests = destinations(conn)
    if not dests:
        return {}
    parts = []
    for dest in dests:
        for st in DeliveryState:
            inner = (select(literal(1).label("one")).select_from(DELIVERIES)
                     .where(DELIVERIES.c.destination == dest, DELIVERIES.c.state == st).limit(cap + 1).subquery())
            parts.append(select(literal(dest).label("destination"), literal(str(st)).label("state"),
                                select(func.count()).select_from(inner).scalar_subquery().label("n")))
    out: dict[str, dict[str, int]] = {dest: {} for dest in dests}
    for dest, st, n in conn.execute(union_all(*parts)):
        if n:
            out[dest][st] = int(n)
    return out


def message_of(conn: Connection, order_id: int | None) -> int | None:
    """The message that placed the order (the first of its history that came with a message)."""
    if order_id is None:
        return None
    return conn.execute(select(ORDER_HISTORY.c.message_id).where(
        ORDER_HISTORY.c.order_id == order_id, ORDER_HISTORY.c.message_id.is_not(None))
        .order_by(ORDER_HISTORY.c.id).limit(1)).scalar()


def show_delivery(conn: Connection, delivery_id: int) -> DeliveryDetail | None:
    row = conn.execute(select(*SUMMARY, DELIVERIES.c.payload, DELIVERIES.c.content_type, DELIVERIES.c.detail,
                              DELIVERIES.c.leased_by, DELIVERIES.c.leased_until)
                       .select_from(DELIVERIES.outerjoin(STUDIES, STUDIES.c.id == DELIVERIES.c.study_id))
                       .where(DELIVERIES.c.id == delivery_id)).mappings().first()
    if row is None:
        return None
    out = cast(DeliveryDetail, _json(row))
    out["attempts_made"] = [cast(AttemptSummary, _json(a)) for a in conn.execute(
        select(ATTEMPTS.c.at, ATTEMPTS.c.duration_ms, ATTEMPTS.c.outcome, ATTEMPTS.c.status, ATTEMPTS.c.response,
               ATTEMPTS.c.error, ATTEMPTS.c.worker).where(ATTEMPTS.c.delivery_id == delivery_id)
        .order_by(ATTEMPTS.c.id)).mappings()]
    return out



# --- what the actions record (the same words from the API, the console and the CLI) -------------------

def retry_subject(conn: Connection, delivery_id: int, rebuild: bool) -> Subject:
    """The audit subject of retrying one delivery: whose, which study, and "rebuild" when asked."""
    found = delivery_subject(conn, delivery_id)
    if rebuild:
        found.detail = f"{found.detail or ''} rebuild".strip()
    return found


def retry_dead_subject(n: int, destination: str | None, rebuild: bool) -> Subject:
    """The audit subject of retrying every dead delivery (of ``destination``): how many."""
    return Subject("Delivery", count=n, detail="every dead delivery" + (f" to {destination}" if destination else "")
                   + (" rebuild" if rebuild else ""))


def discard_subject(conn: Connection, delivery_id: int, note: str) -> Subject:
    """The audit subject of discarding one delivery, with the operator's note."""
    found = delivery_subject(conn, delivery_id)
    if note:
        found.detail = f"{found.detail or ''}: {note}".strip(": ")
    return found
