"""Deliveries as operators see them (admin API and `radbridge deliveries`): list, show, retry, discard."""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict, cast

from sqlalchemy import Connection, select

from engine.domain.studies import STUDIES
from engine.outbound.outbox import ATTEMPTS, DELIVERIES, KeptRendering
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
                    study_uid: str | None = None, limit: int = 100) -> list[DeliverySummary]:
    stmt = (select(*SUMMARY).select_from(DELIVERIES.outerjoin(STUDIES, STUDIES.c.id == DELIVERIES.c.study_id))
            .order_by(DELIVERIES.c.id.desc()).limit(limit))
    if state:
        stmt = stmt.where(DELIVERIES.c.state == state)
    if destination:
        stmt = stmt.where(DELIVERIES.c.destination == destination)
    if study_uid:
        stmt = stmt.where(STUDIES.c.study_uid == study_uid)
    return [cast(DeliverySummary, _json(r)) for r in conn.execute(stmt).mappings()]


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

