"""The reconciliation work queue: one row per study that needs (re)reconciling.

A row is written in the transaction that makes the work necessary (a study became stable, an order
or ADT message touched its order or patient, an analyst matched it by hand), so no trigger is lost.
Workers lease rows (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several engine processes share
the queue; SQLite has one writer anyway) for a short time, renewed while the batch is worked
(engine/store/leases.py: a dead holder's leases lapse, or are taken back when an engine starts). A trigger arriving while a row is leased bumps its
``generation``: the worker then runs the study again instead of deleting the row. A failed run
is retried with backoff and its error kept on the row (``/api/studies`` shows it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypedDict

from sqlalchemy import Connection, Table, case, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from engine.domain.records import first_as
from engine.store.leases import LEASE_SECONDS
from engine.store.models import ReconcileJob
from engine.store.types import utcnow

QUEUE: Table = ReconcileJob.__table__  # type: ignore[assignment]
MAX_BACKOFF_SECONDS = 900.0


class QueueRow(TypedDict):
    """reconcile_queue (engine/store/models.py ReconcileJob)."""

    id: int
    study_id: int
    reasons: str  # comma-separated
    generation: int
    created_at: datetime
    next_at: datetime
    leased_until: datetime | None
    leased_by: str | None
    attempts: int
    last_error: str | None


@dataclass(frozen=True)
class Lease:
    job_id: int
    study_id: int
    generation: int
    reasons: tuple[str, ...]
    attempts: int


def enqueue(conn: Connection, study_id: int, reason: str) -> None:
    """Ask for the study to be reconciled (again); idempotent per study."""
    now = utcnow()
    ins = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(QUEUE)
    stmt = ins.values(study_id=study_id, reasons=reason, generation=1, created_at=now, next_at=now, attempts=0)
    merged = case((QUEUE.c.reasons.contains(reason), QUEUE.c.reasons),
                  else_=func.substr(QUEUE.c.reasons + "," + reason, 1, 255))
    conn.execute(stmt.on_conflict_do_update(index_elements=[QUEUE.c.study_id],
                                            set_={"generation": QUEUE.c.generation + 1, "reasons": merged,
                                                  "next_at": now}))


def enqueue_many(conn: Connection, study_ids: list[int], reason: str) -> None:
    for sid in dict.fromkeys(study_ids):
        enqueue(conn, sid, reason)


def lease(conn: Connection, worker: str, limit: int = 20, seconds: float = LEASE_SECONDS) -> list[Lease]:
    now = utcnow()
    stmt = (select(QUEUE.c.id, QUEUE.c.study_id, QUEUE.c.generation, QUEUE.c.reasons, QUEUE.c.attempts)
            .where(QUEUE.c.next_at <= now, (QUEUE.c.leased_until.is_(None)) | (QUEUE.c.leased_until < now))
            .order_by(QUEUE.c.next_at, QUEUE.c.id).limit(limit))
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    rows = list(conn.execute(stmt))
    if not rows:
        return []
    conn.execute(update(QUEUE).where(QUEUE.c.id.in_([r.id for r in rows]))
                 .values(leased_until=now + timedelta(seconds=seconds), leased_by=worker[:64]))
    return [Lease(r.id, r.study_id, r.generation, tuple(r.reasons.split(",")), r.attempts) for r in rows]


def release(conn: Connection, jobs: list[Lease], worker: str) -> None:
    """Hand back leases that were not worked (the worker is stopping), so another worker, or this
    one after a restart, takes them at once instead of after the lease expires."""
    if jobs:
        conn.execute(update(QUEUE).where(QUEUE.c.id.in_([j.job_id for j in jobs]), QUEUE.c.leased_by == worker[:64])
                     .values(leased_until=None, leased_by=None))


def finish(conn: Connection, job: Lease) -> bool:
    """Done with this generation: delete the row, or release it when a newer trigger arrived
    meanwhile (True: it will run again)."""
    gone = conn.execute(delete(QUEUE).where(QUEUE.c.id == job.job_id, QUEUE.c.generation == job.generation))
    if gone.rowcount == 1:
        return False
    conn.execute(update(QUEUE).where(QUEUE.c.id == job.job_id)
                 .values(leased_until=None, leased_by=None, attempts=0, last_error=None))
    return True


def fail(conn: Connection, job: Lease, error: str) -> None:
    delay = min(MAX_BACKOFF_SECONDS, 2.0 ** min(job.attempts + 1, 12))
    conn.execute(update(QUEUE).where(QUEUE.c.id == job.job_id)
                 .values(leased_until=None, leased_by=None, attempts=QUEUE.c.attempts + 1, last_error=error[:2000],
                         next_at=utcnow() + timedelta(seconds=delay)))


def pending(conn: Connection, study_id: int) -> QueueRow | None:
    return first_as(conn, select(QUEUE).where(QUEUE.c.study_id == study_id), QueueRow)
