"""The group-commit writer: what a failing job leaves behind, alone and inside a batch."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg.errors
import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from engine.domain.records import PATIENTS, add
from engine.pipeline.writer import (
    FINAL_ATTEMPT,
    IngestWriter,
    InlineWriter,
    RedoJob,
    StorageUnavailable,
    WriterStats,
)
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


def writes(family: str, fail: bool = False) -> Callable[[Session], int]:
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
        assert sorted(n or "" for n in s.execute(select(Patient.family_name)).scalars()) == ["A", "C"]


def _batch(w: IngestWriter, jobs: list[Callable[[Session], object]]) -> list[object]:
    """Run ``jobs`` as one batch of the writer; each one's result, or the exception it ended with."""
    gate = threading.Event()
    first = w.submit(lambda _s: gate.wait(10))  # holds the writer so the next jobs form one batch
    futures = [w.submit(job) for job in jobs]
    gate.set()
    assert first.result(10) is True
    out: list[object] = []
    for f in futures:
        try:
            out.append(f.result(10))
        except Exception as exc:
            out.append(exc)
    return out


def counted(work: Callable[[Session], int], runs: list[str], name: str) -> Callable[[Session], int]:
    def job(session: Session) -> int:
        runs.append(name)
        return work(session)
    return job


def test_a_batch_that_succeeds_runs_each_job_once_without_savepoints(db: Database) -> None:
    statements: list[str] = []

    @event.listens_for(db.writer, "before_cursor_execute")
    def seen(_conn: object, _cursor: object, sql: str, *_args: object) -> None:
        statements.append(sql)
    runs: list[str] = []
    w = IngestWriter(db.writer)
    w.start()
    try:
        results = _batch(w, [counted(writes(n), runs, n) for n in ("A", "B", "C")])
        assert w.stats.largest_batch >= 3 and w.stats.redone_batches == 0
    finally:
        w.stop()
        event.remove(db.writer, "before_cursor_execute", seen)
    assert all(isinstance(r, int) for r in results) and runs == ["A", "B", "C"]
    assert not [s for s in statements if "SAVEPOINT" in s.upper()]
    assert sorted(n or "" for n in patient_names(db)) == ["A", "B", "C"]


def test_a_failing_job_in_a_batch_leaves_the_others_applied_once(db: Database) -> None:
    """The optimistic run stops at B and is rolled back; the batch runs again with a SAVEPOINT per job,
    without B (its error stands, it is not run twice): A and C are stored once each."""
    runs: list[str] = []
    w = IngestWriter(db.writer)
    w.start()
    try:
        results = _batch(w, [counted(writes("A"), runs, "A"), counted(writes("B", fail=True), runs, "B"),
                             counted(writes("C"), runs, "C")])
        assert w.stats.redone_batches == 1
    finally:
        w.stop()
    assert isinstance(results[0], int) and isinstance(results[2], int) and isinstance(results[1], ValueError)
    assert runs == ["A", "B", "A", "C"]
    assert sorted(n or "" for n in patient_names(db)) == ["A", "C"]
    with db.read_session() as s:  # the ids handed back are the committed rows
        ids = {name: pid for name, pid in s.execute(select(Patient.family_name, Patient.id))}
    assert (ids["A"], ids["C"]) == (results[0], results[2])


def test_a_job_asking_to_be_redone_in_a_batch_runs_again_in_its_savepoint(db: Database) -> None:
    """RedoJob (HL7's path for a message whose apply failed): the batch runs again with SAVEPOINTs,
    the job once more on a final attempt, where it stores what it remembered; A and C once each."""
    runs: list[str] = []
    attempts: list[bool] = []

    def redo_then_store(session: Session) -> int:
        attempts.append(bool(session.info[FINAL_ATTEMPT]))
        if not attempts[-1]:
            add(session.connection(), PATIENTS, family_name="Half-written")
            raise RedoJob("not applied; kept as an error next run")
        return add(session.connection(), PATIENTS, family_name="Kept as error")
    w = IngestWriter(db.writer, integrity_retries=1)
    w.start()
    try:
        results = _batch(w, [counted(writes("A"), runs, "A"), redo_then_store, counted(writes("C"), runs, "C")])
    finally:
        w.stop()
    assert all(isinstance(r, int) for r in results)
    assert attempts == [False, False, True]  # optimistic run, then its SAVEPOINT: not final, final
    assert runs == ["A", "A", "C"]
    assert sorted(n or "" for n in patient_names(db)) == ["A", "C", "Kept as error"]


def patient_names(db: Database) -> list[str | None]:
    with db.read_session() as s:
        return list(s.execute(select(Patient.family_name)).scalars())


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


def _sqlite_temp_files() -> list[str]:
    """SQLite's temporary files this process holds open (unlinked at once, still in /proc/self/fd)."""
    out = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if "etilqs_" in target:
            out.append(target)
    return out


def test_savepoint_journals_stay_in_memory(db: Database) -> None:
    """Every message is applied inside SAVEPOINTs (the batch's, the message's, a FHIR entry's). SQLite
    keeps the pages a savepoint may have to restore in a statement journal, which it spills to a temp
    file past 64 KiB: a Bundle then wrote ~85 KB of temp file besides its WAL frames. The engine's
    connections keep that journal in memory (PRAGMA temp_store=MEMORY)."""
    if db.is_postgres:
        pytest.skip("SQLite's statement journal")
    with db.writer.connect() as conn, conn.begin():
        for i in range(400):  # pages that exist before the savepoint, so it has to journal them
            add(conn, PATIENTS, family_name=f"Before{i}", given_name="x" * 200)
        with conn.begin_nested():
            conn.execute(PATIENTS.update().values(given_name="y" * 200))  # rewrites every page
            assert _sqlite_temp_files() == []


def test_a_job_its_caller_gave_up_on_does_not_stop_the_writer(db: Database) -> None:
    """A listener cancelled while its job waits (connection closed, engine stopping) cancels the
    job's future; the writer still stores the job and goes on with the next ones."""
    w = IngestWriter(db.writer)
    w.start()
    gate = threading.Event()
    try:
        holding = w.submit(lambda _s: gate.wait(10))  # keeps the next job queued, its future pending
        abandoned = w.submit(writes("Abandoned"))
        assert abandoned.cancel()
        gate.set()
        assert holding.result(10) is True
        assert w.run_sync(writes("Next"), timeout=10) > 0
    finally:
        gate.set()
        w.stop()
    with db.read_session() as s:
        assert sorted(str(n) for n in s.execute(select(Patient.family_name)).scalars()) == ["Abandoned", "Next"]


def test_the_inline_writer_answers_only_after_the_commit_and_batches_what_came_meanwhile(db: Database) -> None:
    """A batch of several commits in the committer thread; jobs submitted meanwhile wait for it and
    form the next batch; a job's future is answered only once its row is committed (another
    connection sees it); a lone job commits on the loop thread. stop() finishes what is queued."""
    seen_committed: dict[str, bool] = {}

    def committed(name: str) -> bool:
        with db.read_session() as s:
            return s.execute(select(func.count()).select_from(Patient).where(Patient.family_name == name)).scalar() == 1

    async def run() -> tuple[list[int], WriterStats]:
        w = InlineWriter(db.writer)
        w.start()
        try:
            first = [asyncio.wrap_future(w.submit(writes(n))) for n in ("A", "B", "C")]
            await asyncio.sleep(0)  # the batch runs; its COMMIT goes to the committer thread
            assert w.stats.batches == 1 and w.commit_under_way
            later = [asyncio.wrap_future(w.submit(writes(n))) for n in ("D", "E")]
            ids = []
            for name, f in zip("ABCDE", [*first, *later], strict=True):
                ids.append(await f)
                seen_committed[name] = committed(name)
            alone = await asyncio.wrap_future(w.submit(writes("F")))
            assert not w.commit_under_way  # F committed on the loop thread
            queued = w.submit(writes("G"))
        finally:
            w.stop()
        assert queued.result(0) > alone > 0
        return ids, w.stats
    ids, stats = asyncio.run(run())
    assert all(seen_committed.values()) and len(seen_committed) == 5 and len(set(ids)) == 5
    assert (stats.batches, stats.largest_batch) == (4, 3)  # ABC, DE, F, G
    assert sorted(n or "" for n in patient_names(db)) == list("ABCDEFG")


def test_stopping_the_inline_writer_during_a_commit_answers_everything_queued_before_it_returns(db: Database) -> None:
    """stop() while a batch's COMMIT runs in the committer thread and more jobs wait: it waits for that
    COMMIT, then commits the waiting jobs itself; when it returns every job is answered and stored, and
    no COMMIT is still running on the connection it has closed."""
    commits_in_thread: list[str] = []

    @event.listens_for(db.writer, "commit")
    def slow_commit(_conn: object) -> None:
        name = threading.current_thread().name
        if name.startswith("radbridge-commit"):
            commits_in_thread.append(name)
            threading.Event().wait(0.3)  # a slow fsync: stop() comes while it runs

    async def run() -> list[concurrent.futures.Future[int]]:
        w = InlineWriter(db.writer)
        w.start()
        first = [w.submit(writes(n)) for n in ("A", "B", "C")]
        await asyncio.sleep(0)  # the batch runs; its COMMIT goes to the committer thread
        assert w.commit_under_way
        waiting = [w.submit(writes(n)) for n in ("D", "E")]
        w.stop()
        return first + waiting

    futures = asyncio.run(run())
    assert all(f.done() and f.exception() is None for f in futures)
    assert len(commits_in_thread) == 1  # D and E were committed by stop(), not handed to the thread again
    assert sorted(n or "" for n in patient_names(db)) == list("ABCDE")


def deadlocks_once(family: str, raised: list[str]) -> Callable[[Session], int]:
    """Writes, and the first time it runs fails as PostgreSQL fails a deadlock's victim (SQLSTATE
    40P01: the whole transaction is aborted; PostgreSQL's advice is to run it again)."""
    def work(session: Session) -> int:
        pid = add(session.connection(), PATIENTS, family_name=family)
        if not raised:
            raised.append(family)
            raise OperationalError("UPDATE ...", {}, psycopg.errors.DeadlockDetected("deadlock detected"))
        return pid
    return work


@pytest.mark.parametrize("batch_of", [1, 3])
def test_a_batch_chosen_as_a_deadlock_victim_runs_again_and_is_stored_once(db: Database, batch_of: int) -> None:
    """Two engine processes on one PostgreSQL may lock rows in opposite orders; the one aborted as the
    deadlock's victim is run again, not answered 'not stored' (the sender's resend, a NAK CE)."""
    raised: list[str] = []
    w = IngestWriter(db.writer)
    w.start()
    try:
        jobs: list[Callable[[Session], object]] = [deadlocks_once("Victim", raised)]
        jobs += [writes(f"Mate{i}") for i in range(batch_of - 1)]
        results = _batch(w, jobs)
    finally:
        w.stop()
    assert raised == ["Victim"] and all(isinstance(r, int) for r in results), results
    assert sorted(n or "" for n in patient_names(db)) == sorted(["Victim"] + [f"Mate{i}" for i in range(batch_of - 1)])
    assert w.stats.commit_failures == 0
