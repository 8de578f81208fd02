"""Rows for the hot path: loaded with prebuilt Core statements, changed in Python, written back as
one UPDATE of the columns that changed.

The ORM unit of work costs several times a durable commit per message (flush bookkeeping, and
building the same WHERE clauses again for every message). The domain rules read and write these
records instead; the ORM models stay the schema and the read side (admin API).
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Connection, CursorResult, Table, bindparam, insert, select, update

from engine.store.models import (
    Message,
    MessageContent,
    MessageEvent,
    Order,
    OrderStatusChange,
    Patient,
    PatientChange,
    PatientIdentifier,
)

PATIENTS: Table = Patient.__table__  # type: ignore[assignment]
IDENTIFIERS: Table = PatientIdentifier.__table__  # type: ignore[assignment]
PATIENT_HISTORY: Table = PatientChange.__table__  # type: ignore[assignment]
ORDERS: Table = Order.__table__  # type: ignore[assignment]
ORDER_HISTORY: Table = OrderStatusChange.__table__  # type: ignore[assignment]
MESSAGES: Table = Message.__table__  # type: ignore[assignment]
CONTENT: Table = MessageContent.__table__  # type: ignore[assignment]
EVENTS: Table = MessageEvent.__table__  # type: ignore[assignment]


class Record:
    """One row as a mutable mapping that remembers which columns changed."""

    __slots__ = ("table", "values", "changed")

    def __init__(self, table: Table, values: dict[str, Any]) -> None:
        self.table = table
        self.values = values
        self.changed: dict[str, Any] = {}

    @property
    def id(self) -> int:
        return int(self.values["id"])

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set(self, key: str, value: Any) -> bool:
        """Set a column; True when the value changed."""
        if self.values.get(key) == value and key in self.values:
            return False
        self.values[key] = value
        self.changed[key] = value
        return True

    def save(self, conn: Connection) -> None:
        if self.changed:
            conn.execute(update(self.table).where(self.table.c.id == self.id).values(**self.changed))
            self.changed = {}


_INSERTS: dict[str, Any] = {}


def add(conn: Connection, table: Table, **values: Any) -> int:
    """INSERT one row (a prebuilt statement per table; columns not given take their defaults)."""
    stmt = _INSERTS.get(table.name)
    if stmt is None:
        stmt = _INSERTS[table.name] = insert(table)
    result = cast(CursorResult[Any], conn.execute(stmt, values))
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def load(conn: Connection, table: Table, stmt: Any, **params: Any) -> Record | None:
    row = conn.execute(stmt, params).mappings().first()
    return None if row is None else Record(table, dict(row))


# --- prebuilt statements ---------------------------------------------------------------------------
PATIENT_BY_ID = select(PATIENTS).where(PATIENTS.c.id == bindparam("id"))
PATIENT_BY_IDENTIFIER = (
    select(PATIENTS)
    .select_from(PATIENTS.join(IDENTIFIERS, IDENTIFIERS.c.patient_id == PATIENTS.c.id))
    .where(IDENTIFIERS.c.value == bindparam("value"), IDENTIFIERS.c.issuer == bindparam("issuer"))
)
IDENTIFIER = select(IDENTIFIERS).where(IDENTIFIERS.c.value == bindparam("value"),
                                       IDENTIFIERS.c.issuer == bindparam("issuer"))
IDENTIFIER_OWNERS = select(IDENTIFIERS.c.value, IDENTIFIERS.c.issuer, IDENTIFIERS.c.patient_id).where(
    IDENTIFIERS.c.value.in_(bindparam("values", expanding=True)))
ORDER_BY = {
    "placer_number": select(ORDERS).where(ORDERS.c.placer_number == bindparam("value")).order_by(ORDERS.c.id.desc()).limit(1),
    "filler_number": select(ORDERS).where(ORDERS.c.filler_number == bindparam("value")).order_by(ORDERS.c.id.desc()).limit(1),
    "accession": select(ORDERS).where(ORDERS.c.accession == bindparam("value")).order_by(ORDERS.c.id.desc()).limit(1),
}
ORDER_IDS_OF_PATIENT = select(ORDERS.c.id).where(ORDERS.c.patient_id == bindparam("patient_id")).order_by(ORDERS.c.id)
# A resend of a message that was applied is re-ACKed, not applied again. One that failed (AE) is
# processed again: applying it cannot double anything, and the mapping may have been fixed since.
DEDUP_STATUSES = ("processed", "filtered")
DUPLICATE = (
    select(MESSAGES.c.id, MESSAGES.c.ack_code)
    .where(MESSAGES.c.control_id == bindparam("control_id"), MESSAGES.c.sending_app == bindparam("sending_app"),
           MESSAGES.c.sending_facility == bindparam("sending_facility"), MESSAGES.c.channel == bindparam("channel"),
           MESSAGES.c.received_at >= bindparam("since"), MESSAGES.c.status.in_(DEDUP_STATUSES))
    .order_by(MESSAGES.c.id.desc()).limit(1)
)
