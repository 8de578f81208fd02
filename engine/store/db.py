"""Database engines and sessions.

SQLite runs in WAL mode with ``synchronous=FULL`` (a commit is on disk when it returns, which is
what an AA/CA promises) and the driver's own transaction handling switched off so SAVEPOINTs work.
Writers open transactions with ``BEGIN IMMEDIATE`` (no lock upgrades, so no SQLITE_BUSY surprises
mid-transaction); readers use plain ``BEGIN`` and never wait for writers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


@dataclass
class Database:
    url: str
    writer: Engine
    reader: Engine
    write_session: sessionmaker[Session]
    read_session: sessionmaker[Session]

    @property
    def is_sqlite(self) -> bool:
        return self.writer.dialect.name == "sqlite"

    @property
    def is_postgres(self) -> bool:
        return self.writer.dialect.name == "postgresql"

    def dispose(self) -> None:
        self.writer.dispose()
        if self.reader is not self.writer:
            self.reader.dispose()


def _sqlite_engine(url: str, *, immediate: bool, synchronous: str, busy_timeout_ms: int,
                   hide_parameters: bool) -> Engine:
    eng = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
                        hide_parameters=hide_parameters)

    @event.listens_for(eng, "connect")
    def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (SAVEPOINT support)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        # SAVEPOINT journals (every message is applied inside one or two) in memory, not in a temp
        # file that SQLite spills to past 64 KiB: they never need to survive a crash (the WAL does)
        cur.execute("PRAGMA temp_store=MEMORY")
        cur.close()

    begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"

    @event.listens_for(eng, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)

    return eng


def create_private_file(path: Path, text: str = "") -> bool:
    """Create ``path`` readable and writable by its owner only (0600) from the first byte, holding
    ``text``; False when it exists already (left as it is). The SQLite file is made so before SQLite
    opens it, since SQLite gives the -wal and -shm files the database file's permissions."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return True


def open_database(url: str, *, sqlite_synchronous: str = "FULL", busy_timeout_ms: int = 5000,
                  pool_size: int = 5, hide_parameters: bool = True) -> Database:
    """Open (not create) the database at ``url``; call :func:`engine.store.migrate.upgrade` to create it.

    ``hide_parameters``: errors (and their log lines) name the statement but not the values bound to
    it, which on the ingest path are patient data; False (log_patient_details) shows them."""
    sqlite_synchronous = sqlite_synchronous.upper()
    if sqlite_synchronous not in SQLITE_SYNCHRONOUS:
        raise ValueError(f"sqlite synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS)}")
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
            create_private_file(Path(u.database))
        writer = _sqlite_engine(url, immediate=True, synchronous=sqlite_synchronous,
                                busy_timeout_ms=busy_timeout_ms, hide_parameters=hide_parameters)
        reader = _sqlite_engine(url, immediate=False, synchronous=sqlite_synchronous,
                                busy_timeout_ms=busy_timeout_ms, hide_parameters=hide_parameters)
    else:
        writer = create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True,
                               hide_parameters=hide_parameters)
        reader = writer
    return Database(
        url=url, writer=writer, reader=reader,
        write_session=sessionmaker(writer, expire_on_commit=False),
        read_session=sessionmaker(reader, expire_on_commit=False),
    )
