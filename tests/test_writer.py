"""The group-commit writer: what a failing job leaves behind, alone and inside a batch."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from engine.domain.records import PATIENTS, add
from engine.pipeline.writer import IngestWriter, StorageUnavailable
from engine.store import migrate
from engine.store.db import Database, open_database
from engine.store.models import Patient


@pytest.fixture
def db(db_url: str, tmp_path: Path) -> Iterator[Database]:
    database = open_database(db_url)
    migrate.upgrade(database)
    yield database
    database.dispose()


def patient_count(db: Database) -> int:
    with db.read_session() as s:
        return int(s.execute(select(func.count()).select_from(Patient)).scalar() or 0)


def writes(family: str, fail: bool = False):  # type: ignore[no-untyped-def]
    def work(session: Session) -> int:
        pid = add(session.connection(), PATIENTS, family_name=family)
        if fail:
            raise ValueError(f"{family} failed after writing")
        return pid
    return work


def test_a_failing_solo_job_leaves_nothing(db: Database) -> None:
    w = IngestWriter(db.writer)
    w.start()
    try:
        with pytest.raises(ValueError):
            w.run_sync(writes("Ghost", fail=True))
        assert w.run_sync(writes("Real")) > 0
    finally:
        w.stop()
    with db.read_session() as s:
        assert list(s.execute(select(Patient.family_name)).scalars()) == ["Real"]


def test_a_failing_job_in_a_batch_does_not_undo_the_others(db: Database) -> None:
    w = IngestWriter(db.writer)
    w.start()
    gate = threading.Event()
    try:
        first = w.submit(lambda _s: gate.wait(10))  # holds the writer so the next jobs form one batch
        futures = [w.submit(writes("A")), w.submit(writes("B", fail=True)), w.submit(writes("C"))]
        gate.set()
        assert first.result(10) is True
        assert futures[0].result(10) > 0 and futures[2].result(10) > 0
        with pytest.raises(ValueError):
            futures[1].result(10)
        assert w.stats.largest_batch >= 3  # A, B and C shared one transaction
    finally:
        w.stop()
    with db.read_session() as s:
        assert sorted(s.execute(select(Patient.family_name)).scalars()) == ["A", "C"]


def test_a_failed_commit_fails_every_job_in_the_batch(db: Database) -> None:
    w = IngestWriter(db.writer)
    w.start()
    try:
        def breaks_the_connection(session: Session) -> None:
            from sqlalchemy.exc import OperationalError
            add(session.connection(), PATIENTS, family_name="Lost")
            raise OperationalError("COMMIT", {}, Exception("disk I/O error"))
        with pytest.raises(StorageUnavailable):
            w.run_sync(breaks_the_connection)
        assert w.stats.commit_failures == 1
    finally:
        w.stop()
    assert patient_count(db) == 0
