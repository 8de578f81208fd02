"""Leases on queued work (deliveries, reconcile_queue): who holds one, keeping it while working,
and taking back at start-up those whose holder died.

A worker leases rows for ``lease_seconds`` ([database] lease_seconds, 30 s) and, while it works
them, renews the lease every third of that (``Renewing``). So a lease outlives its holder by at
most ``lease_seconds``: then any engine takes the rows again. ``leased_by`` names the holder as
``host:pid:start`` (the process's start time, UTC); an engine starting on the same host takes back
at once the leases of a holder that no longer runs (the pid is gone, or is another process that
started at another time). A live process's leases are never taken: they lapse only if it stops
renewing them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from types import TracebackType

from sqlalchemy import Connection, Table, select, update

from engine.store.models import Delivery, ReconcileJob
from engine.store.types import utcnow

log = logging.getLogger(__name__)

LEASE_SECONDS = 30.0
HOST_CHARS = 32  # of the host name kept in leased_by (String(64) with the pid and start time)
SAME_START_SECONDS = 2.0  # start times this close are one process (a wall-clock step moves boot time)
START_FORMAT = "%Y%m%dT%H%M%SZ"
DELIVERIES: Table = Delivery.__table__  # type: ignore[assignment]
RECONCILIATIONS: Table = ReconcileJob.__table__  # type: ignore[assignment]
TABLES = {"deliveries": DELIVERIES, "reconciliations": RECONCILIATIONS}


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: a process on a host, told from a later one with the same pid by its start time."""

    host: str
    pid: int
    started: str  # START_FORMAT, or "" where the platform does not say

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.started}"

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """The holder a ``leased_by`` names; None for anything else (a worker name of an older version)."""
        host, _, rest = text.partition(":")
        pid, _, started = rest.partition(":")
        if not host or not pid.isdigit():
            return None
        return cls(host, int(pid), started)

    def is_gone(self) -> bool:
        """True only when this holder is on this host and certainly no longer runs: its pid is not a
        process, or is one that started at another time. Anything unknown counts as running."""
        if self.host != _host() or not self.started:
            return False
        if self.pid == os.getpid():
            return self.started != this_process().started  # this pid in an earlier life
        started = process_start(self.pid)
        if started is None:
            return not _pid_exists(self.pid)
        return not _same_start(started, self.started)


def _host() -> str:
    return socket.gethostname()[:HOST_CHARS]


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (START_FORMAT, UTC), from /proc; None where there is no /proc
    or no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f.read().decode("ascii").splitlines()
                        if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ", which may hold spaces
    try:
        ticks = int(fields[19])  # field 22, starttime: clock ticks after boot
    except (IndexError, ValueError):
        return None
    return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"), UTC).strftime(START_FORMAT)


def _same_start(a: str, b: str) -> bool:
    try:
        t1, t2 = (datetime.strptime(x, START_FORMAT) for x in (a, b))
    except ValueError:
        return a == b
    return abs((t1 - t2).total_seconds()) <= SAME_START_SECONDS


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


@cache
def this_process() -> Holder:
    return Holder(_host(), os.getpid(), process_start(os.getpid()) or "")


def until(seconds: float) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


def renew(conn: Connection, table: Table, ids: list[int], holder: str, seconds: float) -> int:
    """Extend the leases ``holder`` still has on rows ``ids`` (those settled or released meanwhile
    are not touched); returns how many."""
    if not ids:
        return 0
    return int(conn.execute(update(table).where(table.c.id.in_(ids), table.c.leased_by == holder,
                                                table.c.leased_until.is_not(None))
                            .values(leased_until=until(seconds))).rowcount or 0)


def reclaim_gone(conn: Connection) -> dict[str, int]:
    """Release every lease whose holder no longer runs on this host (see Holder.is_gone); returns
    how many per kind of work (deliveries, reconciliations)."""
    now = utcnow()
    out: dict[str, int] = {}
    for kind, table in TABLES.items():
        names = conn.execute(select(table.c.leased_by).distinct().where(
            table.c.leased_by.is_not(None), table.c.leased_until.is_not(None), table.c.leased_until >= now)).scalars()
        gone = [n for n in names if (h := Holder.parse(n)) is not None and h.is_gone()]
        if gone:
            n = conn.execute(update(table).where(table.c.leased_by.in_(gone))
                             .values(leased_until=None, leased_by=None)).rowcount or 0
            out[kind] = int(n)
            log.warning("took back %d lease(s) on %s held by %s: no longer running", n, kind, ", ".join(gone))
    return out


class Renewing:
    """While a batch of leased rows is worked: ``renew`` every ``every`` seconds, in a thread of its
    own, so neither a busy event loop nor a long blocking step lets the leases lapse. Leaving the
    block stops it without waiting (a renewal still running then finds the rows settled: no effect)."""

    def __init__(self, renew_leases: Callable[[], object], every: float, what: str) -> None:
        self._renew = renew_leases
        self._every = every
        self._what = what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"renew-{what}", daemon=True)

    def __enter__(self) -> Renewing:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._renew()
            except Exception:  # the database is away: the next turn tries again, the lease may lapse
                log.warning("could not renew the leases of %s", self._what, exc_info=True)
