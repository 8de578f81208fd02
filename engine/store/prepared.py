"""Prepared statements: the documented fast path for the hot path's ~10 statements a message.

SQLAlchemy's per-execution layer costs ~50 us a statement on this kind of machine against ~6 us
in the driver, which is most of the Python time of a durable message. So the hot path compiles
each statement once per dialect with SQLAlchemy and runs the compiled SQL on the DBAPI cursor.

Only SQLAlchemy's public API is used, so a new release cannot break it silently:

- ``ClauseElement.compile(dialect=...)`` and the compiled form's documented attributes
  (``string``, ``positiontup``, ``binds``, ``params``);
- ``TypeEngine.dialect_impl(dialect).bind_processor(dialect)`` / ``.result_processor(...)``, so
  values are converted exactly as SQLAlchemy would (JSON, UTCDateTime, Boolean on SQLite ...);
- ``Connection.connection.driver_connection`` (the driver's own connection, inside the
  Connection's transaction: statements here commit or roll back with the ORM's and Core's);
- ``DBAPIError.instance``, so a driver error surfaces as the same SQLAlchemy exception class
  (IntegrityError, OperationalError ...) that Core would raise, and callers' handling does not
  depend on which path ran the statement.

What it does not do: expanding IN lists (``post-compile`` parameters) and server-side defaults
computed at execution. A statement that needs them is refused when it is prepared, with its SQL,
rather than run wrongly; write such statements with Core (``conn.execute``) instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Dialect, Table
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.expression import CompoundSelect, Select

from engine.errors import RadBridgeError

Processor = Callable[[Any], Any]


class UnpreparableStatement(RadBridgeError, ValueError):
    """The statement needs per-execution work of SQLAlchemy's (e.g. an expanding IN)."""


@dataclass(frozen=True)
class Prepared:
    """One statement compiled for one dialect."""

    sql: str
    names: tuple[str, ...] | None  # positional parameter order (qmark, format), or None for named styles
    processors: tuple[tuple[str, Processor], ...]  # the bind processors of the parameters' types
    literals: Mapping[str, Any]  # values the statement carries itself (LIMIT 1, a literal in WHERE ...)

    @classmethod
    def of(cls, stmt: ClauseElement, dialect: Dialect) -> Prepared:
        compiled = stmt.compile(dialect=dialect)
        sql = compiled.string
        if "POSTCOMPILE" in sql:
            raise UnpreparableStatement(f"needs SQLAlchemy's execution (expanding parameters): {sql}")
        binds = getattr(compiled, "binds", {})
        procs: list[tuple[str, Processor]] = []
        for name, bind in binds.items():
            proc = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if proc is not None:
                procs.append((name, proc))
        positions = getattr(compiled, "positiontup", None)
        return cls(sql, tuple(positions) if positions else None, tuple(procs), dict(compiled.params))

    def arguments(self, params: Mapping[str, Any]) -> Any:
        """The DBAPI parameters for ``params`` (a tuple or a dict, as the driver's style wants)."""
        values = {**self.literals, **params} if self.literals else dict(params)
        for name, proc in self.processors:
            v = values.get(name)
            if v is not None:
                values[name] = proc(v)
        if self.names is not None:
            return tuple(values[n] for n in self.names)
        return values

    def execute(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        """Run on the driver's cursor; returns the cursor (for fetchone / lastrowid)."""
        return execute_driver(conn, self.sql, self.arguments(params))

    def execute_many(self, conn: Connection, rows: Iterable[Mapping[str, Any]]) -> None:
        """Run once per row in one driver call (``executemany``: one round trip with psycopg 3,
        which pipelines it); for statements whose results are not read (an INSERT of several rows)."""
        execute_driver(conn, self.sql, [self.arguments(r) for r in rows], many=True)


@dataclass(frozen=True)
class PreparedQuery:
    """A prepared SELECT whose rows come back as dicts, typed as SQLAlchemy would type them."""

    prepared: Prepared
    columns: tuple[str, ...]
    results: tuple[Processor | None, ...]  # each column type's result processor

    @classmethod
    def of(cls, stmt: Select[Any] | CompoundSelect[Any], dialect: Dialect) -> PreparedQuery:
        cols = tuple(stmt.selected_columns)
        return cls(Prepared.of(stmt, dialect), tuple(str(c.key) for c in cols),
                   tuple(c.type.dialect_impl(dialect).result_processor(dialect, None) for c in cols))

    def _row(self, row: Iterable[Any]) -> dict[str, Any]:
        return {name: (proc(v) if proc is not None else v)
                for name, proc, v in zip(self.columns, self.results, row, strict=True)}

    def first(self, conn: Connection, params: Mapping[str, Any]) -> dict[str, Any] | None:
        row = self.prepared.execute(conn, params).fetchone()
        return None if row is None else self._row(row)

    def all(self, conn: Connection, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [self._row(row) for row in self.prepared.execute(conn, params).fetchall()]


class PreparedCache:
    """Prepared statements by (dialect, key): each is compiled the first time it is asked for."""

    def __init__(self) -> None:
        self._statements: dict[tuple[str, str, Hashable], Prepared] = {}
        self._queries: dict[tuple[str, str, int], PreparedQuery] = {}

    def statement(self, conn: Connection, key: Hashable, build: Callable[[], ClauseElement]) -> Prepared:
        dialect = conn.dialect
        full = (dialect.name, dialect.driver, key)
        found = self._statements.get(full)
        if found is None:
            found = self._statements[full] = Prepared.of(build(), dialect)
        return found

    def query(self, conn: Connection, stmt: Select[Any] | CompoundSelect[Any]) -> PreparedQuery:
        """``stmt`` must live as long as the process (a module-level constant): it is keyed by identity."""
        dialect = conn.dialect
        full = (dialect.name, dialect.driver, id(stmt))
        found = self._queries.get(full)
        if found is None:
            found = self._queries[full] = PreparedQuery.of(stmt, dialect)
        return found


def execute_driver(conn: Connection, sql: str, args: Any = (), *, many: bool = False) -> Any:
    """Run SQL on the DBAPI cursor of ``conn`` (inside its transaction), raising SQLAlchemy's
    exception classes as Core's execution would. ``many``: ``args`` is a list of parameter sets
    for one ``executemany``."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    dbapi = conn.dialect.loaded_dbapi
    try:
        if many:
            cursor.executemany(sql, args)
        else:
            cursor.execute(sql, args)
    except dbapi.Error as err:
        raise DBAPIError.instance(sql, args, err, dbapi.Error, dialect=conn.dialect) from err
    return cursor


@contextlib.contextmanager
def pipelined(conn: Connection) -> Iterator[None]:
    """Statements whose results are not read, sent together: with psycopg 3 in pipeline mode, one
    round trip for all of them at the end of the block (other drivers run them as they come).

    An error of any of them is raised when the block ends, as SQLAlchemy's exception class; do not
    read a result (fetchone, rowcount) inside the block."""
    if conn.dialect.driver != "psycopg":
        yield
        return
    dbapi = conn.dialect.loaded_dbapi
    try:
        with conn.connection.driver_connection.pipeline():  # type: ignore[union-attr]
            yield
    except dbapi.Error as err:
        raise DBAPIError.instance("(pipelined statements)", None, err, dbapi.Error, dialect=conn.dialect) from err


def column_defaults(table: Table, *, on_update: bool = False) -> tuple[tuple[str, Any], ...]:
    """The Python-side column defaults (or onupdate values) Core would fill in at execution."""
    found = []
    for col in table.c:
        default: Any = col.onupdate if on_update else col.default
        if default is not None and not col.primary_key:
            found.append((col.name, default))
    return tuple(found)


class savepoint:  # noqa: N801 - used as a context manager, like SQLAlchemy's begin_nested()
    """SAVEPOINT / RELEASE / ROLLBACK TO on the driver (Core builds these clauses again each time)."""

    def __init__(self, conn: Connection, name: str = "rb_apply") -> None:
        self.conn, self.name = conn, name

    def __enter__(self) -> savepoint:
        execute_driver(self.conn, f"SAVEPOINT {self.name}")
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            execute_driver(self.conn, f"RELEASE SAVEPOINT {self.name}")
        else:
            execute_driver(self.conn, f"ROLLBACK TO SAVEPOINT {self.name}")
            execute_driver(self.conn, f"RELEASE SAVEPOINT {self.name}")
