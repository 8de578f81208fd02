"""Searching the messages: the one query behind GET /api/messages and the console's /messages.

Every filter is an equality or a range on an indexed column (a time range also bounds the ids,
see ``_first_id_from``), and a page is "the newest ``limit``
messages older than ``before_id``" (or newer than ``after_id``): keyset paging by id, never OFFSET
nor COUNT(*), so a page costs the same on the first and the thousandth (docs/console.md, Messages).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CTE, ScalarSelect, Select, select

from engine.store.models import Message, Order, OrderStatusChange, Patient, PatientIdentifier

# Messages get their received_at and their id from one writer in order, so times and ids rise
# together; between engine processes sharing a database the clocks may differ by this much at most.
CLOCK_SLACK = timedelta(minutes=5)


@dataclass(frozen=True)
class MessageFilter:
    """What to look for; None: any. ``identifier`` (optionally with ``issuer``) is a patient's,
    resolved through patient_identifiers (aliases of merged patients included) to patient ids;
    ``accession`` an order's, through the order's history to the messages that changed it."""

    control_id: str | None = None
    status: str | None = None
    channel: str | None = None
    message_type: str | None = None
    patient_id: int | None = None
    identifier: str | None = None
    issuer: str | None = None
    accession: str | None = None
    received_from: datetime | None = None  # inclusive
    received_to: datetime | None = None  # exclusive
    before_id: int | None = None  # a page of older messages
    after_id: int | None = None  # a page of newer messages (shown newest first all the same)

    def any(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self)
                   if f.name not in ("before_id", "after_id", "issuer"))

    def page(self, *, before_id: int | None = None, after_id: int | None = None) -> MessageFilter:
        return replace(self, before_id=before_id, after_id=after_id)


def _first_id_from(at: datetime) -> ScalarSelect[Any]:
    """The id where messages received from ``at`` start (CLOCK_SLACK earlier, for clocks of several
    engines): one step of ix_messages_received. The exact received_at test stays in the query; this
    bound turns "status X between two times" from a scan of every newer X into an id range."""
    return (select(Message.id).where(Message.received_at >= at - CLOCK_SLACK)
            .order_by(Message.received_at.asc(), Message.id.asc()).limit(1).scalar_subquery())


def _last_id_before(at: datetime) -> ScalarSelect[Any]:
    return (select(Message.id).where(Message.received_at < at + CLOCK_SLACK)
            .order_by(Message.received_at.desc(), Message.id.desc()).limit(1).scalar_subquery())


def _patients_of(value: str, issuer: str | None) -> CTE:
    """The patient holding the identifier (an alias too: merges move the prior patient's identifiers
    to the survivor) and every patient merged into it, however many merges deep: the messages of a
    merged patient keep its old id."""
    holder = select(PatientIdentifier.patient_id.label("id")).where(PatientIdentifier.value == value)
    if issuer is not None:
        holder = holder.where(PatientIdentifier.issuer == issuer)
    found = holder.cte("found_patients", recursive=True)
    return found.union(select(Patient.id).where(Patient.merged_into_id == found.c.id))


def search_statement(f: MessageFilter, limit: int) -> Select[Any]:
    """SELECT of the messages matching ``f``, at most ``limit``: newest first, or with ``after_id``
    oldest first (the caller reverses that page)."""
    stmt = select(Message)
    if f.control_id is not None:
        stmt = stmt.where(Message.control_id == f.control_id)
    for value, col in ((f.status, Message.status), (f.channel, Message.channel),
                       (f.message_type, Message.message_type), (f.patient_id, Message.patient_id)):
        if value is not None:
            stmt = stmt.where(col == value)
    if f.identifier is not None:
        stmt = stmt.where(Message.patient_id.in_(select(_patients_of(f.identifier, f.issuer).c.id)))
    if f.accession is not None:
        changed = (select(OrderStatusChange.message_id).join(Order, Order.id == OrderStatusChange.order_id)
                   .where(Order.accession == f.accession, OrderStatusChange.message_id.is_not(None)))
        stmt = stmt.where(Message.id.in_(changed))
    if f.received_from is not None:
        stmt = stmt.where(Message.received_at >= f.received_from, Message.id >= _first_id_from(f.received_from))
    if f.received_to is not None:
        stmt = stmt.where(Message.received_at < f.received_to, Message.id <= _last_id_before(f.received_to))
    if f.after_id is not None:
        return stmt.where(Message.id > f.after_id).order_by(Message.id.asc()).limit(limit)
    if f.before_id is not None:
        stmt = stmt.where(Message.id < f.before_id)
    return stmt.order_by(Message.id.desc()).limit(limit)
