"""Rows for the hot path: loaded with prebuilt Core statements, changed in Python, written back as
one UPDATE of the columns that changed.

The ORM unit of work costs several times a durable commit per message (flush bookkeeping, and
building the same WHERE clauses again for every message). The domain rules read and write these
records instead; the ORM models stay the schema and the read side (admin API).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table, bindparam, insert, or_, select, update
from sqlalchemy.exc import DBAPIError

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
            update_row(conn, self.table, self.id, **self.changed)
            self.changed = {}


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...] | None  # positional parameter order (qmark), or None for named styles
    processors: dict[str, Any]  # the column types' bind processors (JSON, UTCDateTime, Boolean ...)
    literals: dict[str, Any]  # values the statement carries itself (e.g. an IN list)


_COMPILED: dict[tuple[Any, ...], _Compiled] = {}


def _compile(conn: Connection, key: tuple[Any, ...], build: Any) -> _Compiled:
    """Compile a statement once per dialect with SQLAlchemy, then run it on the DBAPI cursor.

    SQLAlchemy's per-execution layer costs ~50 us a statement here against ~6 us in the driver;
    the hot path runs ~10 inserts and updates a message. Type handling stays SQLAlchemy's: the
    compiled statement's bind processors are applied to the parameters."""
    full = (conn.dialect.name, *key)
    found = _COMPILED.get(full)
    if found is None:
        stmt = build()
        compiled = stmt.compile(dialect=conn.dialect)
        names = tuple(compiled.positiontup) if compiled.positiontup else None
        found = _COMPILED[full] = _Compiled(compiled.string, names, dict(compiled._bind_processors),
                                            dict(compiled.params))
    return found


def _execute(conn: Connection, compiled: _Compiled, params: dict[str, Any]) -> Any:
    procs = compiled.processors
    if compiled.literals:
        params = {**compiled.literals, **params}
    for k in procs.keys() & params.keys():
        v = params[k]
        if v is not None:
            params[k] = procs[k](v)
    args: Any = tuple(params[n] for n in compiled.names) if compiled.names is not None else params
    return driver_execute(conn, compiled.sql, args)


def driver_execute(conn: Connection, sql: str, args: Any = ()) -> Any:
    """Run SQL on the DBAPI cursor, raising SQLAlchemy's exception classes as its own execution
    would (IntegrityError for a unique violation, OperationalError for a lost connection ...), so
    callers' error handling does not depend on which path ran the statement."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    dbapi = conn.dialect.loaded_dbapi
    try:
        cursor.execute(sql, args)
    except dbapi.Error as err:
        raise DBAPIError.instance(sql, args, err, dbapi.Error, dialect=conn.dialect) from err
    return cursor


_DEFAULTS: dict[tuple[str, bool], tuple[tuple[str, Any], ...]] = {}


def _with_defaults(table: Table, values: dict[str, Any], *, on_update: bool = False) -> dict[str, Any]:
    """Column defaults (created_at, version ...) or, for an UPDATE, onupdate values (updated_at)
    that SQLAlchemy would have filled in at execution."""
    key = (table.name, on_update)
    defaults = _DEFAULTS.get(key)
    if defaults is None:
        found = []
        for col in table.c:
            default: Any = col.onupdate if on_update else col.default
            if default is not None and not col.primary_key:
                found.append((col.name, default))
        defaults = _DEFAULTS[key] = tuple(found)
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
    compiled = _compile(conn, ("insert", table.name, keys), build)
    cursor = _execute(conn, compiled, values)
    if returning:
        return int(cursor.fetchone()[0])
    pk = table.primary_key.columns[0].name  # INTEGER PRIMARY KEY is the rowid, unless given
    return int(values[pk]) if pk in values else int(cursor.lastrowid)


def update_row(conn: Connection, table: Table, row_id: int, **values: Any) -> None:
    """UPDATE one row by primary key: the columns given (and onupdate columns)."""
    values = _with_defaults(table, values, on_update=True)
    keys = tuple(sorted(values))
    compiled = _compile(conn, ("update", table.name, keys),
                        lambda: update(table).where(table.c.id == bindparam("row_id_"))
                        .values({k: bindparam(k) for k in keys}))
    _execute(conn, compiled, {**values, "row_id_": row_id})


@dataclass(frozen=True)
class _Query:
    compiled: _Compiled
    columns: tuple[str, ...]
    results: tuple[Any, ...]  # each column type's result processor (or None)


_QUERIES: dict[tuple[str, int], _Query] = {}


def _query(conn: Connection, stmt: Any) -> _Query:
    key = (conn.dialect.name, id(stmt))
    found = _QUERIES.get(key)
    if found is None:
        compiled = _compile(conn, ("select", id(stmt)), lambda: stmt)
        cols = tuple(c.key for c in stmt.selected_columns)
        procs = tuple(c.type._cached_result_processor(conn.dialect, None) for c in stmt.selected_columns)
        found = _QUERIES[key] = _Query(compiled, cols, procs)
    return found


def fetch(conn: Connection, stmt: Any, **params: Any) -> dict[str, Any] | None:
    """The first row of a prebuilt SELECT (module-level, so compiled once), typed as SQLAlchemy would."""
    q = _query(conn, stmt)
    row = _execute(conn, q.compiled, params).fetchone()
    if row is None:
        return None
    return {name: (proc(v) if proc is not None else v) for name, proc, v in zip(q.columns, q.results, row,
                                                                                  strict=True)}


def fetch_all(conn: Connection, stmt: Any, **params: Any) -> list[dict[str, Any]]:
    """Every row of a prebuilt SELECT, typed as SQLAlchemy would."""
    q = _query(conn, stmt)
    return [{name: (proc(v) if proc is not None else v) for name, proc, v in zip(q.columns, q.results, row,
                                                                                 strict=True)}
            for row in _execute(conn, q.compiled, params).fetchall()]


def load(conn: Connection, table: Table, stmt: Any, **params: Any) -> Record | None:
    row = fetch(conn, stmt, **params)
    return None if row is None else Record(table, row)


class savepoint:  # noqa: N801 - used as a context manager, like SQLAlchemy's begin_nested()
    """SAVEPOINT / RELEASE / ROLLBACK TO on the driver: SQLAlchemy recompiles these clauses each time."""

    def __init__(self, conn: Connection, name: str = "rb_apply") -> None:
        self.conn, self.name = conn, name

    def _run(self, sql: str) -> None:
        driver_execute(self.conn, sql)

    def __enter__(self) -> savepoint:
        self._run(f"SAVEPOINT {self.name}")
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self._run(f"RELEASE SAVEPOINT {self.name}")
        else:
            self._run(f"ROLLBACK TO SAVEPOINT {self.name}")
            self._run(f"RELEASE SAVEPOINT {self.name}")


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
           MESSAGES.c.received_at >= bindparam("since"),
           or_(*(MESSAGES.c.status == s for s in DEDUP_STATUSES)))  # not IN: no post-compile expansion
    .order_by(MESSAGES.c.id.desc()).limit(1)
)
