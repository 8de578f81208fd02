"""The ingest writer: one thread that owns write transactions, with group commit.

Listeners hand it jobs (a function of a Session). It takes every job waiting, runs them in one
transaction, commits once, and only then resolves the jobs' futures, which is when listeners send
their ACKs. On one connection that is one commit per message; with many busy connections a single
commit acknowledges many messages.

One job's failure never undoes another's. The batch is first run optimistically, without a
SAVEPOINT per job (two statements a job, the most of a message's SQL after its own): almost every
batch succeeds whole. If a job fails (an exception, an integrity conflict, RedoJob), the whole
transaction is rolled back and the batch runs again, each job inside its own SAVEPOINT, so the
others are applied once and the failing one is retried or reported. A job may therefore run more
than once before its transaction commits: it must keep its effects inside the transaction (rows
written through the session; nothing sent, moved or deleted outside it), and what it remembers
between runs must be safe to remember (HL7 inbound keeps why an apply failed, on purpose).

If the commit fails (database down, disk full) every job in the batch fails: nothing in it is
acknowledged as stored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Engine, RootTransaction
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from engine.errors import RadBridgeError, report_failure

log = logging.getLogger(__name__)
T = TypeVar("T")

_STOP = object()
# session.info key: True on a job's last attempt (a job may then give up on an integrity conflict)
FINAL_ATTEMPT = "radbridge.final_attempt"


class RedoJob(RadBridgeError):  # noqa: N818 - a request to the writer, not an error to report
    """Raised by a job to have its work undone and the job run once more: inside a batch its
    SAVEPOINT is rolled back, alone its transaction. The job must remember why, so that the next
    run differs (HL7 inbound: a message whose apply failed is then stored as AE, not applied). A
    job raises it only while ``session.info[FINAL_ATTEMPT]`` is false: there is a next run."""


class StorageUnavailable(RadBridgeError, RuntimeError):
    """The batch could not be committed; nothing in it was stored."""


TRANSIENT_RETRIES = 3  # a batch aborted as a deadlock's victim (or a serialization failure) is run again
TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock_detected, serialization_failure


def is_transient(exc: OperationalError) -> bool:
    """The database aborted the transaction and asks for it to be run again (PostgreSQL SQLSTATE
    class 40); the database being down, full or unreachable is not."""
    return getattr(exc.orig, "sqlstate", None) in TRANSIENT_SQLSTATES


@dataclass
class _Job(Generic[T]):
    work: Callable[[Session], T]
    future: concurrent.futures.Future[T] = field(default_factory=concurrent.futures.Future)
    result: Any = None
    error: BaseException | None = None


@dataclass
class WriterStats:
    jobs: int = 0
    batches: int = 0
    commit_failures: int = 0
    retried: int = 0
    redone_batches: int = 0  # batches run again with a SAVEPOINT per job, after one of their jobs failed
    transient_retries: int = 0  # batches run again after the database aborted them (a deadlock's victim)
    largest_batch: int = 0
    commit_seconds: float = 0.0


class IngestWriter:
    def __init__(self, engine: Engine, *, max_batch: int = 256,
                 integrity_retries: int = 2, name: str = "radbridge-writer") -> None:
        self._engine = engine
        self._conn: Connection | None = None  # kept across batches: no pool checkout, reset and BEGIN dance
        self._queue: queue.Queue[Any] = queue.Queue()
        self._max_batch = max_batch
        self._integrity_retries = integrity_retries
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.stats = WriterStats()
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the jobs already queued, then stop."""
        if self._started:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._started = False

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def submit(self, work: Callable[[Session], T]) -> concurrent.futures.Future[T]:
        if not self._started:
            raise RuntimeError("the ingest writer is not running")
        job: _Job[T] = _Job(work)
        self._queue.put(job)
        return job.future

    async def run(self, work: Callable[[Session], T]) -> T:
        return await asyncio.wrap_future(self.submit(work))

    def run_sync(self, work: Callable[[Session], T], timeout: float | None = 60.0) -> T:
        return self.submit(work).result(timeout)

    # --- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch: list[_Job[Any]] = [first]
            while len(batch) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                batch.append(nxt)
            try:
                self._process(batch)
            except Exception as exc:  # the thread must outlive any one batch, or every listener waits forever
                log.exception("the ingest writer failed on a batch")
                self._fail(batch, StorageUnavailable(f"storage unavailable ({type(exc).__name__})"))
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _run_job(self, session: Session, job: _Job[Any], *, isolate: bool) -> None:
        """Run one job; with ``isolate`` inside a SAVEPOINT, so its failure leaves the batch intact
        (an integrity conflict, another engine process creating the same patient, is retried there).
        Without, its pending ORM changes are flushed here, so that their failure is its own."""
        attempts = self._integrity_retries + 1 if isolate else 1
        for attempt in range(attempts):
            if isolate:
                session.info[FINAL_ATTEMPT] = attempt == attempts - 1
            try:
                if isolate:
                    with session.begin_nested():
                        job.result = job.work(session)
                else:
                    job.result = job.work(session)
                    session.flush()
                job.error = None
                return
            except IntegrityError as exc:
                job.error = exc
                self.stats.retried += 1
                log.debug("integrity conflict (attempt %d): %s", attempt + 1, exc)
            except RedoJob as exc:
                job.error = exc
            except OperationalError:
                raise  # the database itself is in trouble: fail the whole batch
            except Exception as exc:  # one bad job must not take the others down
                job.error = exc
                log.exception("ingest job failed")
                return

    def _commit(self, batch: list[_Job[Any]]) -> None:
        """Run the batch (``_apply``) and commit what it leaves to commit."""
        trans = self._apply(batch)
        if trans is not None:
            self._commit_transaction(trans)

    def _apply(self, batch: list[_Job[Any]]) -> RootTransaction | None:
        """``_apply_once``; run again when the database aborted the transaction as a deadlock's victim
        or for a serialization failure (two engine processes locking rows in opposite orders): the
        jobs are re-runnable, and PostgreSQL's advice is to retry. Any other database failure, or the
        same one ``TRANSIENT_RETRIES`` times, fails the batch (nothing in it acknowledged)."""
        for attempt in range(TRANSIENT_RETRIES + 1):
            try:
                return self._apply_once(batch)
            except OperationalError as exc:
                if not is_transient(exc) or attempt == TRANSIENT_RETRIES:
                    raise
                self.stats.transient_retries += 1
                log.info("the database aborted a batch of %d job(s) (%s); running it again",
                         len(batch), getattr(exc.orig, "sqlstate", "?"))
        raise AssertionError("unreachable")  # the loop returns or raises

    def _apply_once(self, batch: list[_Job[Any]]) -> RootTransaction | None:
        """Run the batch's jobs in one transaction, optimistically: no SAVEPOINT per job. If a job
        fails, that transaction is rolled back; a batch of one is run again (an integrity conflict or
        a RedoJob, up to ``integrity_retries`` times), a larger batch runs again with a SAVEPOINT per
        job, so that the failing job cannot take the others down and each of them is applied once.
        Returns the transaction to commit (None: nothing to commit, the solo job failed)."""
        for attempt in range(self._integrity_retries + 1):
            last = attempt == self._integrity_retries
            failed, trans = self._transaction(batch, final=len(batch) == 1 and last)
            if failed is None:
                return trans
            retry = isinstance(failed.error, IntegrityError | RedoJob)
            if len(batch) > 1:
                # A job that failed otherwise failed in the same state as it would inside its SAVEPOINT
                # (the same jobs before it): its error stands and it is not run (nor logged) again.
                self.stats.redone_batches += 1
                return self._transaction(batch, isolate=True, skip=None if retry else failed)[1]
            if not retry or last:
                return None
        return None

    def _transaction(self, batch: list[_Job[Any]], *, isolate: bool = False, final: bool = True,
                     skip: _Job[Any] | None = None) -> tuple[_Job[Any] | None, RootTransaction | None]:
        """Run the batch in one transaction, left open for the caller to commit. Without ``isolate``,
        stop at the first job that fails, roll everything back and return that job; with it, each job
        in a SAVEPOINT (all stay, failed or not), ``skip`` left out. ``final``: FINAL_ATTEMPT for the jobs."""
        if self._conn is None:
            self._conn = self._engine.connect()
        conn = self._conn
        try:
            trans = conn.begin()
            # Jobs get a Session joined to this transaction (ORM jobs such as reprocess flush into it)
            session = Session(bind=conn, expire_on_commit=False, autoflush=True)
            session.info[FINAL_ATTEMPT] = final
            try:
                for job in batch:
                    if job is skip:
                        continue
                    self._run_job(session, job, isolate=isolate)
                    if not isolate and job.error is not None:
                        trans.rollback()
                        return job, None
                session.flush()
            finally:
                session.close()
        except BaseException:
            self._discard_connection()
            raise
        return None, trans

    def _commit_transaction(self, trans: RootTransaction) -> None:
        """COMMIT; if it fails, the connection is given up (the batch fails: nothing acknowledged)."""
        try:
            trans.commit()
        except BaseException:
            self._discard_connection()
            raise

    def _discard_connection(self) -> None:
        """After a failure the connection may be broken: the next batch connects afresh."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except Exception:  # closing a dead connection may fail too
                log.debug("discarding the writer's connection failed", exc_info=True)

    def _process(self, batch: list[_Job[Any]]) -> None:
        self._count(batch)
        self._settle(batch, lambda: self._commit(batch))

    def _settle(self, batch: list[_Job[Any]], commit: Callable[[], None]) -> None:
        """Run ``commit`` on this thread, then answer the batch's jobs (if it failed: as not stored)."""
        t0 = time.perf_counter()
        try:
            commit()
        except Exception as exc:
            self._storage_failed(batch, exc)
            return
        self.stats.commit_seconds += time.perf_counter() - t0
        self._resolve(batch)

    def _count(self, batch: list[_Job[Any]]) -> None:
        self.stats.batches += 1
        self.stats.jobs += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))

    def _storage_failed(self, batch: list[_Job[Any]], exc: Exception) -> None:
        self.stats.commit_failures += 1
        reason = report_failure(log, exc, "storage unavailable, %d message(s) not stored", len(batch))
        self._fail(batch, StorageUnavailable(f"storage unavailable ({reason})"))

    @staticmethod
    def _resolve(batch: list[_Job[Any]]) -> None:
        """Tell each job's caller (only after the COMMIT: this is when ACKs go out)."""
        for job in batch:
            # A caller that gave up (its task cancelled) has cancelled the future: the job is stored
            # all the same, and no one is told.
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                if job.error is not None:
                    job.future.set_exception(job.error)
                else:
                    job.future.set_result(job.result)

    @staticmethod
    def _fail(batch: list[_Job[Any]], err: BaseException) -> None:
        for job in batch:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                job.future.set_exception(err)


class InlineWriter(IngestWriter):
    """The same batching and guarantees, the jobs run on the event loop's own thread.

    Jobs submitted during one loop iteration (every connection whose data arrived in the same
    epoll round) form one batch, run by a callback scheduled after them. No second Python thread
    runs jobs, so there is no contention for the GIL. When several jobs are about (a batch of more
    than one, or more waiting), the COMMIT (SQLite's fsync, without the GIL) is handed to a thread
    of its own: meanwhile the loop reads, parses and maps the messages that arrive, whose jobs wait
    for it and then form the next batch, so that a busy engine commits many messages at once. A
    lone job (one connection) commits on the loop thread: no hand-over to pay for. The jobs'
    futures are resolved after the COMMIT returned, whichever thread ran it. For a database
    across a network (PostgreSQL), where a job's statements would stall every listener, use the
    threaded writer.
    """

    def __init__(self, engine: Engine, *, max_batch: int = 256, integrity_retries: int = 2) -> None:
        super().__init__(engine, max_batch=max_batch, integrity_retries=integrity_retries)
        self._pending: list[_Job[Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._committer: concurrent.futures.ThreadPoolExecutor | None = None
        # the batch whose COMMIT runs in the committer thread: (jobs, the COMMIT's future, start time)
        self._committing: tuple[list[_Job[Any]], concurrent.futures.Future[None], float] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._committer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="radbridge-commit")
        self._started = True

    def stop(self, timeout: float = 30.0) -> None:
        """Wait for the COMMIT under way, then run what is queued, committing on this thread."""
        self._started = False  # from here no batch goes to the committer thread (_committed drains nothing)
        committing = self._committing
        if committing is not None:
            with contextlib.suppress(Exception):  # its outcome is what _committed reports
                committing[1].exception(timeout)
            if not committing[1].done():  # a COMMIT stuck past the timeout: not known to be stored
                self._committing = None
                self._conn = None  # still the committer thread's; never used again
                self._storage_failed(committing[0], TimeoutError(f"COMMIT still running after {timeout:.0f}s"))
            else:
                self._committed(committing[1])
        while self._pending:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch:]
            self._process(batch)
        if self._committer is not None:
            self._committer.shutdown(wait=False)  # idle (or stuck past the timeout, see above)
            self._committer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def backlog(self) -> int:
        return len(self._pending)

    @property
    def commit_under_way(self) -> bool:
        """A batch's COMMIT runs in the committer thread (its jobs are not answered yet)."""
        return self._committing is not None

    def submit(self, work: Callable[[Session], T]) -> concurrent.futures.Future[T]:
        if not self._started or self._loop is None:
            raise RuntimeError("the ingest writer is not running")
        job: _Job[T] = _Job(work)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._enqueue(job)
        else:  # from another thread (CLI tools, tests): hand it to the loop
            self._loop.call_soon_threadsafe(self._enqueue, job)
        return job.future

    def _enqueue(self, job: _Job[Any]) -> None:
        self._pending.append(job)
        if not self._scheduled and self._committing is None:
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Run the next batch; its COMMIT goes to the committer thread (one at a time: the next batch
        runs on the same connection once it returned, see _committed)."""
        self._scheduled = False
        while self._pending and self._committing is None and self._started:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch:]
            self._count(batch)
            try:
                trans = self._apply(batch)
            except Exception as exc:
                self._storage_failed(batch, exc)
                continue
            if trans is None:  # nothing to commit (its one job failed and was rolled back)
                self._resolve(batch)
                continue
            if len(batch) == 1 and not self._pending:
                # Nobody else is sending (one connection): the thread would only add its hand-over.
                # Should others send meanwhile, their jobs form a batch of several, committed aside.
                self._settle(batch, functools.partial(self._commit_transaction, trans))
                continue
            assert self._committer is not None and self._loop is not None
            future = self._committer.submit(self._commit_transaction, trans)
            self._committing = (batch, future, time.perf_counter())
            future.add_done_callback(self._wake)

    def _wake(self, future: concurrent.futures.Future[None]) -> None:
        """In the committer thread: have the loop take the COMMIT's outcome."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: stop() has taken it
            self._loop.call_soon_threadsafe(self._committed, future)

    def _committed(self, future: concurrent.futures.Future[None]) -> None:
        """The COMMIT of the batch under way returned (or failed): answer its jobs, run the next batch."""
        committing = self._committing
        if committing is None or committing[1] is not future:
            return  # stop() has settled it already
        self._committing = None
        batch, _future, t0 = committing
        exc = future.exception()
        if exc is not None:
            self._storage_failed(batch, exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
        else:
            self.stats.commit_seconds += time.perf_counter() - t0
            self._resolve(batch)
        if self._pending and self._started:
            self._drain()
