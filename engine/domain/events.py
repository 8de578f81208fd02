"""Typed domain events: the one seam between the domain and what reacts to it.

The domain says what happened as a frozen dataclass per kind (``PatientMerged``, ``OrderPlaced``,
``StudyStable`` ...) and never who cares. The caller that completes the unit of work publishes the
events on an :class:`EventBus`, which

1. writes them to ``domain_events`` (one INSERT for all the events of a message), and
2. calls the handlers subscribed to each kind, synchronously, on the same connection,

so a reaction (a reconciliation queue row, an outbound delivery) commits or rolls back with the
change that caused it. The bus is an object the runtime creates and wires at start-up
(``Engine._wire_events``): reconciliation's triggers and the outbox subscribe to it.

``domain_events.detail`` is the payload's fields as JSON, without the ones kept in the
``study_id`` / ``patient_id`` / ``order_id`` columns; :func:`from_row` reads a row back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol

from sqlalchemy import Connection, Table, bindparam, insert

from engine.store.models import DomainEvent
from engine.store.prepared import execute_driver
from engine.store.types import JsonObject, utcnow

DOMAIN_EVENTS: Table = DomainEvent.__table__  # type: ignore[assignment]


class EventKind(StrEnum):
    """``domain_events.kind``. The values are stored and named in channel files
    (channels/ehr-outbound.yaml routes take study.reconciled, study.corrected, report.received):
    they do not change."""

    PATIENT_CREATED = "patient.created"
    PATIENT_UPDATED = "patient.updated"
    PATIENT_MERGED = "patient.merged"
    IDENTIFIER_ADDED = "identifier.added"
    ORDER_PLACED = "order.placed"
    ORDER_CHANGED = "order.changed"
    ORDER_CANCELLED = "order.cancelled"
    ORDER_STATUS = "order.status"  # images moved the order on (IP, CM)
    STUDY_RECEIVED = "study.received"
    STUDY_STABLE = "study.stable"
    STUDY_REOPENED = "study.reopened"
    STUDY_RECONCILED = "study.reconciled"
    STUDY_CORRECTED = "study.corrected"
    STUDY_UNMATCHED = "study.unmatched"
    STUDY_QUARANTINED = "study.quarantined"
    STUDY_MANUAL_MATCH = "study.manual_match"
    STUDY_MANUAL_MATCH_CLEARED = "study.manual_match_cleared"
    STUDY_RECONCILE_REQUESTED = "study.reconcile_requested"
    FINDING_ACCEPTED = "finding.accepted"
    REPORT_RECEIVED = "report.received"
    INSTANCE_DUPLICATE_IGNORED = "instance.duplicate_ignored"
    INSTANCE_DUPLICATE_REJECTED = "instance.duplicate_rejected"
    INSTANCE_OVERWRITTEN = "instance.overwritten"
    INSTANCE_RECEIVED = "instance.received"  # not recorded (TRANSIENT): the instances row is its record


# An analyst's actions (engine/reconciliation/manual.py) are written by the admin API and the CLI,
# which hold no bus: they are recorded (record_events) and nobody can subscribe to them, so a
# handler registered for one fails at start-up instead of never being called.
RECORDED_ONLY = frozenset({EventKind.STUDY_MANUAL_MATCH, EventKind.STUDY_MANUAL_MATCH_CLEARED,
                           EventKind.STUDY_RECONCILE_REQUESTED, EventKind.FINDING_ACCEPTED})
# Told to subscribers, never written to domain_events: a new instance (the index row says it, and a row
# per instance would cost every C-STORE an INSERT); dicom-forward routes with when: instance.received.
TRANSIENT = frozenset({EventKind.INSTANCE_RECEIVED})
COLUMNS = ("study_id", "patient_id", "order_id")  # payload fields kept in their own columns


@dataclass(frozen=True)
class Event:
    """A payload; each subclass knows its ``kind``."""

    kind: ClassVar[EventKind]

    def columns(self) -> tuple[int | None, int | None, int | None]:
        """(study_id, patient_id, order_id) for the row."""
        return (getattr(self, "study_id", None), getattr(self, "patient_id", None), getattr(self, "order_id", None))

    def detail(self) -> JsonObject:
        """The other fields, for ``domain_events.detail``."""
        return {name: getattr(self, name) for name in _detail_names(type(self))}


_DETAIL_NAMES: dict[type[Event], tuple[str, ...]] = {}


def _detail_names(cls: type[Event]) -> tuple[str, ...]:
    names = _DETAIL_NAMES.get(cls)
    if names is None:
        names = _DETAIL_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls) if f.name not in COLUMNS)
    return names


# --- patients ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class PatientCreated(Event):
    kind = EventKind.PATIENT_CREATED
    patient_id: int
    identifier: str  # value^issuer, the primary one
    fields: JsonObject = field(default_factory=dict)  # demographics set: {name: value}
    identifiers_added: tuple[str, ...] = ()  # other identifiers the message carried (value^issuer)


@dataclass(frozen=True, kw_only=True)
class PatientUpdated(Event):
    kind = EventKind.PATIENT_UPDATED
    patient_id: int
    fields: dict[str, list[Any]]  # demographics changed: {name: [old, new]}


@dataclass(frozen=True, kw_only=True)
class IdentifierAdded(Event):
    kind = EventKind.IDENTIFIER_ADDED
    patient_id: int
    identifiers: tuple[str, ...]  # value^issuer
    replaces: str | None = None  # an identifier change (merge into an unknown ID): the old one, now an alias


@dataclass(frozen=True, kw_only=True)
class PatientMerged(Event):
    kind = EventKind.PATIENT_MERGED
    patient_id: int  # the survivor
    merged_patient_id: int | None  # the patient retired into it; None when the prior ID was not known
    alias: str  # the prior identifier (value^issuer), an alias of the survivor now
    orders_moved: tuple[int, ...] = ()
    studies_moved: tuple[int, ...] = ()


PATIENT_EVENTS = (PatientCreated, PatientUpdated, IdentifierAdded, PatientMerged)


# --- orders ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class OrderPlaced(Event):
    """A new order (an order first heard of by its cancel is placed with status CA)."""

    kind = EventKind.ORDER_PLACED
    order_id: int
    patient_id: int
    accession: str | None
    status: str
    control: str | None = None


@dataclass(frozen=True, kw_only=True)
class OrderChanged(Event):
    kind = EventKind.ORDER_CHANGED
    order_id: int
    patient_id: int
    accession: str | None
    from_status: str
    status: str
    fields: tuple[str, ...] = ()  # columns the message changed
    moved_from_patient: int | None = None  # the order now belongs to patient_id
    control: str | None = None


@dataclass(frozen=True, kw_only=True)
class OrderCancelled(Event):
    """Cancelled (CA) or discontinued (DC)."""

    kind = EventKind.ORDER_CANCELLED
    order_id: int
    patient_id: int
    accession: str | None
    from_status: str
    status: str
    control: str | None = None


@dataclass(frozen=True, kw_only=True)
class OrderStatusAdvanced(Event):
    """Images moved the order forward (IP when they arrive, CM when the study is stable)."""

    kind = EventKind.ORDER_STATUS
    order_id: int
    study_id: int
    from_status: str
    status: str
    note: str


ORDER_EVENTS = (OrderPlaced, OrderChanged, OrderCancelled)


# --- studies -----------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class StudyReceived(Event):
    """The first instance of a new study is in the index."""

    kind = EventKind.STUDY_RECEIVED
    study_id: int
    study_uid: str
    accession: str | None = None
    channel: str | None = None
    calling_aet: str | None = None


@dataclass(frozen=True, kw_only=True)
class StudyStable(Event):
    kind = EventKind.STUDY_STABLE
    study_id: int
    study_uid: str
    accession: str | None
    instances: int
    times_stable: int


@dataclass(frozen=True, kw_only=True)
class StudyReopened(Event):
    """An instance arrived for a stable study."""

    kind = EventKind.STUDY_REOPENED
    study_id: int
    study_uid: str
    sop_instance_uid: str


@dataclass(frozen=True, kw_only=True)
class InstanceDuplicate(Event):
    """The same SOP Instance UID again (policy: ignore, reject, overwrite)."""

    study_id: int | None
    sop_instance_uid: str
    identical: bool
    policy: str
    calling_aet: str | None
    sha256: str
    stored_sha256: str


@dataclass(frozen=True, kw_only=True)
class DuplicateIgnored(InstanceDuplicate):
    kind = EventKind.INSTANCE_DUPLICATE_IGNORED


@dataclass(frozen=True, kw_only=True)
class DuplicateRejected(InstanceDuplicate):
    kind = EventKind.INSTANCE_DUPLICATE_REJECTED


@dataclass(frozen=True, kw_only=True)
class InstanceOverwritten(InstanceDuplicate):
    kind = EventKind.INSTANCE_OVERWRITTEN


@dataclass(frozen=True, kw_only=True)
class InstanceReceived(Event):
    """A new instance is in the index (TRANSIENT: subscribers are told, nothing is recorded). What a
    subscriber filters on is here, so it needs no query of its own."""

    kind = EventKind.INSTANCE_RECEIVED
    study_id: int
    instance_id: int
    sop_instance_uid: str
    modality: str | None
    accession: str | None
    calling_aet: str | None
    channel: str


@dataclass(frozen=True, kw_only=True)
class ReconcileOutcome(Event):
    """What a reconciliation run decided about a study (the subclass says which outcome)."""

    study_id: int
    patient_id: int | None
    order_id: int | None
    study_uid: str
    state: str
    matched_by: str | None
    policy: str
    rules: str
    accession: str | None
    coerced_instances: int = 0
    changes: dict[str, str] = field(default_factory=dict)  # index columns the coerced headers changed: {column: value}
    findings: tuple[int, ...] = ()
    reasons: tuple[str, ...] = ()  # why it was queued


@dataclass(frozen=True, kw_only=True)
class StudyReconciled(ReconcileOutcome):
    """Placed (reconciled or flagged) for the first time, or stable again."""

    kind = EventKind.STUDY_RECONCILED


@dataclass(frozen=True, kw_only=True)
class StudyCorrected(ReconcileOutcome):
    """Placed before; a later change altered its files or links."""

    kind = EventKind.STUDY_CORRECTED


@dataclass(frozen=True, kw_only=True)
class StudyUnmatched(ReconcileOutcome):
    kind = EventKind.STUDY_UNMATCHED


@dataclass(frozen=True, kw_only=True)
class StudyQuarantined(ReconcileOutcome):
    kind = EventKind.STUDY_QUARANTINED


@dataclass(frozen=True, kw_only=True)
class ReportReceived(Event):
    """A report (SR, encapsulated PDF) of a study just reconciled or corrected: the outbox sends
    each one once per route."""

    kind = EventKind.REPORT_RECEIVED
    study_id: int
    instance_id: int
    patient_id: int | None
    order_id: int | None
    sop_class_uid: str


# --- an analyst's hand (recorded only: see RECORDED_ONLY) ----------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ManualMatchSet(Event):
    kind = EventKind.STUDY_MANUAL_MATCH
    study_id: int
    order_id: int | None
    patient_id: int | None
    study_uid: str
    by: str
    note: str | None
    accession: str | None = None
    identifier: str | None = None  # value^issuer when matched to a patient


@dataclass(frozen=True, kw_only=True)
class ManualMatchCleared(Event):
    kind = EventKind.STUDY_MANUAL_MATCH_CLEARED
    study_id: int
    by: str
    note: str | None


@dataclass(frozen=True, kw_only=True)
class ReconcileRequested(Event):
    kind = EventKind.STUDY_RECONCILE_REQUESTED
    study_id: int
    by: str


@dataclass(frozen=True, kw_only=True)
class FindingAccepted(Event):
    kind = EventKind.FINDING_ACCEPTED
    study_id: int
    finding_id: int
    by: str
    note: str | None


def _concrete(cls: type[Event]) -> Iterable[type[Event]]:
    for sub in cls.__subclasses__():
        if "kind" in sub.__dict__:
            yield sub
        yield from _concrete(sub)


EVENT_TYPES: dict[EventKind, type[Event]] = {c.kind: c for c in _concrete(Event)}
assert set(EVENT_TYPES) == set(EventKind), set(EventKind) - set(EVENT_TYPES)


def from_row(kind: str, study_id: int | None, patient_id: int | None, order_id: int | None,
             detail: JsonObject | None) -> Event:
    """The typed event a ``domain_events`` row holds (JSON lists come back as tuples where the
    field is one)."""
    cls = EVENT_TYPES[EventKind(kind)]
    values: dict[str, Any] = dict(detail or {})
    names = {f.name for f in dataclasses.fields(cls)}
    for name, value in zip(COLUMNS, (study_id, patient_id, order_id), strict=True):
        if name in names:
            values[name] = value
    for f in dataclasses.fields(cls):
        if isinstance(values.get(f.name), list) and str(f.type).startswith("tuple"):
            values[f.name] = tuple(values[f.name])
    return cls(**values)


# --- writing ------------------------------------------------------------------------------------------------
_ROW = ("at", "kind", "study_id", "patient_id", "order_id", "detail")
MAX_ROWS = 32  # events per INSERT statement (a message raises a handful)


@dataclass(frozen=True)
class _Insert:
    sql: str
    keys: tuple[str, ...] | None  # parameter names for named styles (pyformat), None for positional (qmark)
    processors: tuple[tuple[int, Callable[[Any], Any]], ...]  # (column index in _ROW, bind processor)


_INSERTS: dict[tuple[str, str, int], _Insert] = {}


def _insert(conn: Connection, n: int) -> _Insert:
    """``INSERT ... VALUES (...), (...)`` for ``n`` rows, compiled once per dialect and size and run
    on the driver like the rest of the hot path (engine/domain/records.py): one statement, one
    round trip, for all the events of a message."""
    dialect = conn.dialect
    key = (dialect.name, dialect.driver, n)
    found = _INSERTS.get(key)
    if found is None:
        names = [f"{c}_{i}" for i in range(n) for c in _ROW]  # row by row, columns in _ROW order
        stmt = insert(DOMAIN_EVENTS).values([{c: bindparam(f"{c}_{i}") for c in _ROW} for i in range(n)])
        compiled = stmt.compile(dialect=dialect)
        if compiled.positiontup is not None and list(compiled.positiontup) != names:
            raise RuntimeError(f"unexpected parameter order for domain_events on {dialect.name}")
        procs = ((i, DOMAIN_EVENTS.c[c].type.dialect_impl(dialect).bind_processor(dialect)) for i, c in enumerate(_ROW))
        found = _INSERTS[key] = _Insert(compiled.string, None if compiled.positiontup is not None else tuple(names),
                                        tuple((i, p) for i, p in procs if p is not None))
    return found


def record_events(conn: Connection, events: Sequence[Event]) -> None:
    """Write events to ``domain_events`` without telling anyone (EventBus.publish does both)."""
    now = utcnow()
    width = len(_ROW)
    for start in range(0, len(events), MAX_ROWS):
        chunk = events[start:start + MAX_ROWS]
        stmt = _insert(conn, len(chunk))
        values: list[Any] = []
        for ev in chunk:
            values.extend((now, ev.kind.value, *ev.columns(), ev.detail()))
        for col, proc in stmt.processors:
            for k in range(col, len(values), width):
                if values[k] is not None:
                    values[k] = proc(values[k])
        execute_driver(conn, stmt.sql, tuple(values) if stmt.keys is None else dict(zip(stmt.keys, values, strict=True)))


# --- the bus ------------------------------------------------------------------------------------------------
Handler = Callable[[Connection, Event], None]


class Subscriber(Protocol):
    """Something that subscribes its own handlers (the outbox, for instance)."""

    def subscribe(self, bus: EventBus) -> None: ...


class EventBus:
    """Records events and calls their subscribers in the publisher's transaction.

    Subscribe at start-up, before anything publishes; a handler runs on the publishing thread
    with the publishing connection, and an exception from it fails (rolls back) the unit of work
    like any other error in it."""

    def __init__(self) -> None:
        self._handlers: dict[EventKind, tuple[Handler, ...]] = {}

    def subscribe(self, kind: EventKind, handler: Handler) -> None:
        kind = EventKind(kind)
        if kind in RECORDED_ONLY:
            raise ValueError(f"{kind} is recorded by the admin API and CLI without a bus; nobody can subscribe to it")
        # a new tuple, not an append: a thread publishing meanwhile sees the old list or the new one
        self._handlers[kind] = (*self._handlers.get(kind, ()), handler)

    def handlers(self, kind: EventKind) -> tuple[Handler, ...]:
        return self._handlers.get(kind, ())

    def publish(self, conn: Connection, event: Event) -> None:
        self.publish_all(conn, (event,))

    def publish_all(self, conn: Connection, events: Sequence[Event]) -> None:
        """Write the events (one INSERT; TRANSIENT ones are not written), then call each one's handlers,
        in order."""
        if not events:
            return
        recorded = [ev for ev in events if ev.kind not in TRANSIENT]
        if recorded:
            record_events(conn, recorded)
        for ev in events:
            for handler in self._handlers.get(ev.kind, ()):
                handler(conn, ev)
