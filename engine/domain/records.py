"""Rows for the hot path: loaded with prebuilt Core statements, changed in Python, written back as
one UPDATE of the columns that changed. Statements run through the store's prepared-statement
fast path (engine/store/prepared.py: SQLAlchemy's public compile API, the driver's cursor).

The ORM unit of work costs several times a durable commit per message (flush bookkeeping, and
building the same WHERE clauses again for every message). The domain rules read and write these
records instead; the ORM models stay the schema and the read side (admin API).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, Final, Literal, TypedDict, TypeVar, cast, overload

from sqlalchemy import (
    CompoundSelect,
    Connection,
    Select,
    Table,
    and_,
    bindparam,
    case,
    insert,
    literal_column,
    or_,
    select,
    union_all,
    update,
)

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
from engine.store.prepared import PreparedCache, column_defaults
from engine.store.states import MessageStatus

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
        """Write the changed columns; the record then holds what was written (updated_at too)."""
        if self.changed:
            self.values.update(update_row(conn, self.table, self.id, **self.changed))
            self.changed = {}


class _Lookup(Enum):
    NOT_DONE = "not looked up"


# For a domain function that finds a row itself unless the caller already did: ``found=NOT_LOOKED_UP``
# (the default) means look it up; a Record or None is the caller's answer (None: it is not there).
NOT_LOOKED_UP: Final = _Lookup.NOT_DONE
NotLookedUp = Literal[_Lookup.NOT_DONE]


_PREPARED = PreparedCache()
_DEFAULTS: dict[tuple[str, bool], tuple[tuple[str, Any], ...]] = {}


def _with_defaults(table: Table, values: dict[str, Any], *, on_update: bool = False) -> dict[str, Any]:
    """Column defaults (created_at, version ...) or, for an UPDATE, onupdate values (updated_at)
    that SQLAlchemy would have filled in at execution."""
    key = (table.name, on_update)
    defaults = _DEFAULTS.get(key)
    if defaults is None:
        defaults = _DEFAULTS[key] = column_defaults(table, on_update=on_update)
    out = dict(values)
    for name, default in defaults:
        if name not in out:
            out[name] = default.arg(None) if default.is_callable else default.arg
    return out


def add(conn: Connection, table: Table, **values: Any) -> int:
    """INSERT one row with its column defaults; returns its primary key."""
    values = _with_defaults(table, values)
    keys = tuple(sorted(values))
    returning = bool(conn.dialect.insert_returning)

    def build() -> Any:
        stmt = insert(table).values({k: bindparam(k) for k in keys})
        return stmt.returning(*table.primary_key.columns) if returning else stmt
    cursor = _PREPARED.statement(conn, ("insert", table.name, keys), build).execute(conn, values)
    if returning:
        return int(cursor.fetchone()[0])
    pk = table.primary_key.columns[0].name  # INTEGER PRIMARY KEY is the rowid, unless given
    return int(values[pk]) if pk in values else int(cursor.lastrowid)


def add_many(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """INSERT rows that all give the same columns, with their column defaults, in one driver call
    (``executemany``); their primary keys are not returned."""
    if not rows:
        return
    full = [_with_defaults(table, dict(r)) for r in rows]
    keys = tuple(sorted(full[0]))
    if any(tuple(sorted(r)) != keys for r in full):
        raise ValueError(f"add_many on {table.name}: every row must give the same columns")
    statement = _PREPARED.statement(conn, ("insert-many", table.name, keys),
                                    lambda: insert(table).values({k: bindparam(k) for k in keys}))
    if len(full) == 1:
        statement.execute(conn, full[0])
    else:
        statement.execute_many(conn, full)


def update_row(conn: Connection, table: Table, row_id: int, **values: Any) -> dict[str, Any]:
    """UPDATE one row by primary key: the columns given (and onupdate columns); returns what it wrote."""
    values = _with_defaults(table, values, on_update=True)
    _update(conn, table, row_id, {}, values)
    return values


def update_row_if(conn: Connection, table: Table, row_id: int, holds: Mapping[str, Any], **values: Any) -> bool:
    """UPDATE one row by primary key only while its columns still hold ``holds`` (a state another
    hand may have changed meanwhile); whether it did."""
    return _update(conn, table, row_id, holds, _with_defaults(table, values, on_update=True)) > 0


def _update(conn: Connection, table: Table, row_id: int, holds: Mapping[str, Any], values: dict[str, Any]) -> int:
    keys, checks = tuple(sorted(values)), tuple(sorted(holds))

    def build() -> Any:
        return (update(table).where(table.c.id == bindparam("row_id_"),
                                    *(table.c[k] == bindparam(f"holds_{k}") for k in checks))
                .values({k: bindparam(k) for k in keys}))
    prepared = _PREPARED.statement(conn, ("update", table.name, keys, checks), build)
    params = {**values, "row_id_": row_id, **{f"holds_{k}": v for k, v in holds.items()}}
    return int(prepared.execute(conn, params).rowcount or 0)


R = TypeVar("R", bound=Mapping[str, Any])
Query = Select[Any] | CompoundSelect[Any]


@overload
def fetch(conn: Connection, stmt: Query, /, **params: Any) -> dict[str, Any] | None: ...
@overload
def fetch(conn: Connection, stmt: Query, row: type[R], /, **params: Any) -> R | None: ...
def fetch(conn: Connection, stmt: Query, row: type[Mapping[str, Any]] | None = None, /,
          **params: Any) -> Any:
    """The first row of a prebuilt SELECT (module-level, so compiled once), typed as SQLAlchemy would.

    ``row`` (a TypedDict of engine/domain/rows.py, or one beside the statement) says which columns
    the statement selects, for the type checker only: the row is the same plain dict either way."""
    return _PREPARED.query(conn, stmt).first(conn, params)


@overload
def fetch_all(conn: Connection, stmt: Query, /, **params: Any) -> list[dict[str, Any]]: ...
@overload
def fetch_all(conn: Connection, stmt: Query, row: type[R], /, **params: Any) -> list[R]: ...
def fetch_all(conn: Connection, stmt: Query, row: type[Mapping[str, Any]] | None = None, /,
              **params: Any) -> Any:
    """Every row of a prebuilt SELECT, typed as SQLAlchemy would (``row``: as for ``fetch``)."""
    return _PREPARED.query(conn, stmt).all(conn, params)


def first_as(conn: Connection, stmt: Any, row: type[R]) -> R | None:
    """The first row of a statement built for this call (Core, not prepared) as a dict of its own,
    typed as ``row`` (the columns it selects)."""
    found = conn.execute(stmt).mappings().first()
    return None if found is None else cast(R, dict(found))


def all_as(conn: Connection, stmt: Any, row: type[R]) -> list[R]:
    """Every row of a statement built for this call, typed as ``row`` (as ``first_as``)."""
    return [cast(R, dict(found)) for found in conn.execute(stmt).mappings()]


def load(conn: Connection, table: Table, stmt: Select[Any], **params: Any) -> Record | None:
    """A row of any table as a Record (``Record.values`` stays a generic column dict: the domain
    changes columns by name, e.g. the demographics a message maps)."""
    row = fetch(conn, stmt, **params)
    return None if row is None else Record(table, row)


# --- prebuilt statements ---------------------------------------------------------------------------
PATIENT_BY_ID = select(PATIENTS).where(PATIENTS.c.id == bindparam("id"))
PATIENT_BY_IDENTIFIER = (
    select(PATIENTS)
    .select_from(PATIENTS.join(IDENTIFIERS, IDENTIFIERS.c.patient_id == PATIENTS.c.id))
    .where(IDENTIFIERS.c.value == bindparam("value"), IDENTIFIERS.c.issuer == bindparam("issuer"))
)
IDENTIFIER = select(IDENTIFIERS).where(IDENTIFIERS.c.value == bindparam("value"),
                                       IDENTIFIERS.c.issuer == bindparam("issuer"))
IDENTIFIER_OWNER = select(IDENTIFIERS.c.patient_id).where(IDENTIFIERS.c.value == bindparam("value"),
                                                          IDENTIFIERS.c.issuer == bindparam("issuer"))


class IdentifierOwner(TypedDict):
    """An IDENTIFIER_OWNER row."""

    patient_id: int


OWNERS_AT_ONCE = 8  # identifiers looked up per statement (a PID-3 lists a handful)
# The owners of up to n identifiers in one round trip: (value_i, issuer_i) for i < n.
IDENTIFIER_OWNERS = {n: select(IDENTIFIERS.c.value, IDENTIFIERS.c.issuer, IDENTIFIERS.c.patient_id).where(
    or_(*(and_(IDENTIFIERS.c.value == bindparam(f"value_{i}"), IDENTIFIERS.c.issuer == bindparam(f"issuer_{i}"))
          for i in range(n)))) for n in range(1, OWNERS_AT_ONCE + 1)}


class IdentifierOwners(TypedDict):
    """An IDENTIFIER_OWNERS row."""

    value: str
    issuer: str
    patient_id: int


def identifier_owners(conn: Connection, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """The patient each (value, issuer) belongs to, for those that exist: one statement per
    ``OWNERS_AT_ONCE`` identifiers."""
    owners: dict[tuple[str, str], int] = {}
    for start in range(0, len(keys), OWNERS_AT_ONCE):
        chunk = keys[start:start + OWNERS_AT_ONCE]
        params = {f"{part}_{i}": v for i, key in enumerate(chunk) for part, v in zip(("value", "issuer"), key, strict=True)}
        for row in fetch_all(conn, IDENTIFIER_OWNERS[len(chunk)], IdentifierOwners, **params):
            owners[(row["value"], row["issuer"])] = row["patient_id"]
    return owners


ORDER_KEYS = ("placer_number", "filler_number", "accession")  # how an order is found, in precedence order


def _newest_order_by(key: str, rank: int) -> Select[Any]:
    return (select(literal_column(str(rank)).label("rank_"), *ORDERS.c).where(ORDERS.c[key] == bindparam(key))
            .order_by(ORDERS.c.id.desc()).limit(1))


def _order_lookup(keys: tuple[str, ...]) -> Select[Any] | CompoundSelect[Any]:
    """The newest order carrying each of ``keys``, best-ranked first, in one round trip (one indexed
    lookup per key; at most one row each)."""
    parts = [_newest_order_by(k, ORDER_KEYS.index(k)) for k in keys]
    if len(parts) == 1:
        return parts[0]
    return union_all(*(select(*p.subquery().c) for p in parts)).order_by(literal_column("rank_"))


# For each set of identifiers a message can carry: the prebuilt statement (compiled once).
ORDER_LOOKUP = {keys: _order_lookup(keys)
                for keys in (tuple(k for i, k in enumerate(ORDER_KEYS) if mask & (1 << i)) for mask in range(1, 8))}
ORDER_IDS_OF_PATIENT = select(ORDERS.c.id).where(ORDERS.c.patient_id == bindparam("patient_id")).order_by(ORDERS.c.id)
# A resend of a message that was applied is re-ACKed, not applied again. One that failed (AE) is
# processed again: applying it cannot double anything, and the mapping may have been fixed since.
DEDUP_STATUSES = (MessageStatus.PROCESSED, MessageStatus.FILTERED)
# The newest earlier message with this control ID from this sender, one with the same content first:
# a resend is a duplicate of that one; when only other content matches, the ID was reused (a
# sender's counter restarted) and the message is new. Rows from before content_digest have none and
# count as the same content, as they did.
SAME_CONTENT = or_(MESSAGES.c.content_digest == bindparam("digest"), MESSAGES.c.content_digest.is_(None))
DUPLICATE = (
    select(MESSAGES.c.id, MESSAGES.c.ack_code, SAME_CONTENT.label("same_content"))
    .where(MESSAGES.c.control_id == bindparam("control_id"), MESSAGES.c.sending_app == bindparam("sending_app"),
           MESSAGES.c.sending_facility == bindparam("sending_facility"), MESSAGES.c.channel == bindparam("channel"),
           MESSAGES.c.received_at >= bindparam("since"),
           or_(*(MESSAGES.c.status == s for s in DEDUP_STATUSES)))  # not IN: no post-compile expansion
    .order_by(case((SAME_CONTENT, 0), else_=1), MESSAGES.c.id.desc()).limit(1)
)


class DuplicateOf(TypedDict):
    """A DUPLICATE row: the message a resend repeats, and how it was acknowledged."""

    id: int
    ack_code: str | None
    same_content: bool
