"""Per-minute message figures of each channel (table message_minutes, migration 0018).

An HL7 listener counts each message when its ACK has been written (``MinuteTally.add``: a dict
update, no I/O) and hands the counts to the writer every few seconds (``flush``: one upsert per
channel and minute); the console's overview reads them back (``totals``, ``series``). A day is
1,440 rows per channel, whatever the number of messages, and the rows outlive a restart.

The ACK latency is kept as a histogram (11 buckets, bounds ``LATENCY_BOUNDS_MS``): p50 and p99 of
any span are read from the summed buckets (the bucket's upper bound, so never understated).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Connection, Table, delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from engine.store.models import MessageMinute
from engine.store.types import utcnow

MINUTES: Table = MessageMinute.__table__  # type: ignore[assignment]
LATENCY_BOUNDS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)  # the last bucket holds the rest
BUCKETS = tuple(f"l{i}" for i in range(len(LATENCY_BOUNDS_MS) + 1))
COUNTS = ("received", "aa", "ae", "ar", "other")
KEEP = timedelta(days=2)


def minute_of(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


def _empty() -> dict[str, int]:
    return dict.fromkeys(COUNTS + ("latency_sum_ms",) + BUCKETS, 0)


@dataclass
class MinuteTally:
    """Counts not yet written, per (channel, minute). Thread-safe; ``add`` is cheap."""

    pending: dict[tuple[str, datetime], dict[str, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, channel: str, ack_code: str | None, seconds: float, at: datetime | None = None) -> None:
        key = (channel, minute_of(at or utcnow()))
        ms = seconds * 1000
        code = (ack_code or "").lower()
        with self.lock:
            row = self.pending.get(key)
            if row is None:
                row = self.pending[key] = _empty()
            row["received"] += 1
            row[code if code in ("aa", "ae", "ar") else "other"] += 1
            row["latency_sum_ms"] += round(ms)
            row[BUCKETS[bisect.bisect_left(LATENCY_BOUNDS_MS, ms)]] += 1

    def drain(self) -> dict[tuple[str, datetime], dict[str, int]]:
        with self.lock:
            out, self.pending = self.pending, {}
        return out

    def restore(self, rows: dict[tuple[str, datetime], dict[str, int]]) -> None:
        """Put back what a failed flush did not write (added to what came since)."""
        with self.lock:
            for key, values in rows.items():
                row = self.pending.setdefault(key, _empty())
                for k, v in values.items():
                    row[k] += v


def flush(conn: Connection, rows: dict[tuple[str, datetime], dict[str, int]], *, prune: bool = True) -> None:
    """Add ``rows`` to message_minutes (insert, or add to the minute's row); with ``prune`` drop the
    rows older than two days."""
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    for (channel, minute), values in rows.items():
        stmt = insert(MINUTES).values(channel=channel, minute=minute, **values)
        conn.execute(stmt.on_conflict_do_update(
            index_elements=[MINUTES.c.channel, MINUTES.c.minute],
            set_={k: MINUTES.c[k] + stmt.excluded[k] for k in values}))
    if prune:
        conn.execute(delete(MINUTES).where(MINUTES.c.minute < utcnow() - KEEP))


def percentile(buckets: list[int], q: float) -> float | None:
    """The upper bound (ms) of the bucket holding the q-th quantile; None without ACKs. The last
    bucket has no bound: it reads as twice the last one."""
    total = sum(buckets)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(buckets):
        seen += n
        if seen >= rank and n:
            return float(LATENCY_BOUNDS_MS[i] if i < len(LATENCY_BOUNDS_MS) else LATENCY_BOUNDS_MS[-1] * 2)
    return float(LATENCY_BOUNDS_MS[-1] * 2)


@dataclass(frozen=True)
class Totals:
    """One channel's messages over a span: counts by ACK code, latency p50/p99 (ms) and mean."""

    received: int = 0
    aa: int = 0
    ae: int = 0
    ar: int = 0
    other: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None


def _totals(values: list[int]) -> Totals:
    counts, latency_sum, buckets = values[:5], values[5], values[6:]
    acks = sum(buckets)
    received, aa, ae, ar, other = counts
    return Totals(received, aa, ae, ar, other, p50_ms=percentile(buckets, 0.5), p99_ms=percentile(buckets, 0.99),
                  mean_ms=latency_sum / acks if acks else None)


def totals(conn: Connection, since: datetime) -> dict[str, Totals]:
    """Per channel, the figures since ``since`` (one range read of the minute index)."""
    cols = [func.coalesce(func.sum(MINUTES.c[k]), 0) for k in COUNTS + ("latency_sum_ms",) + BUCKETS]
    stmt = select(MINUTES.c.channel, *cols).where(MINUTES.c.minute >= minute_of(since)).group_by(MINUTES.c.channel)
    return {row[0]: _totals([int(v) for v in row[1:]]) for row in conn.execute(stmt)}


@dataclass(frozen=True)
class Point:
    minute: datetime
    received: int
    buckets: list[int]  # the ACK latency histogram (BUCKETS)
    p50_ms: float | None
    p99_ms: float | None

    @classmethod
    def of(cls, minute: datetime, received: int, buckets: list[int]) -> Point:
        return cls(minute, received, buckets, percentile(buckets, 0.5), percentile(buckets, 0.99))


def series(conn: Connection, since: datetime) -> dict[str, list[Point]]:
    """Per channel, each minute since ``since`` that had messages (minutes without any are absent)."""
    stmt = (select(MINUTES.c.channel, MINUTES.c.minute, MINUTES.c.received, *[MINUTES.c[b] for b in BUCKETS])
            .where(MINUTES.c.minute >= minute_of(since)).order_by(MINUTES.c.channel, MINUTES.c.minute))
    out: dict[str, list[Point]] = {}
    for row in conn.execute(stmt):
        out.setdefault(row[0], []).append(Point.of(row[1], int(row[2]), [int(v) for v in row[3:]]))
    return out
