"""`radbridge run --workers N`: N engine processes on one PostgreSQL database and one storage
directory, serving the same MLLP, DICOM and HTTP ports (SO_REUSEPORT: the kernel spreads new
connections over them). docs/scaling.md says what is per process and what is shared.

This process, the supervisor, runs no engine of its own. It migrates the database once, then
starts each worker as a fresh interpreter (`radbridge run --worker-slot I`, never a fork of a
running event loop) and waits:

- a worker tells it is listening by writing a byte to a pipe (``--ready-fd``); a worker that exits
  before that could not start (configuration, a port taken, the database away): every worker is
  stopped and the supervisor exits with its code, as a single `run` would;
- SIGTERM / SIGINT are passed on to every worker, which drain and stop as a single `run` does; the
  supervisor exits when all have stopped (one still running after ``STOP_GRACE_SECONDS`` is killed);
- a worker that dies while running (killed, crashed) is started again after a back-off that doubles
  from ``BACKOFF_INITIAL_SECONDS`` up to ``BACKOFF_MAX_SECONDS``; more than ``MAX_RESTARTS`` of one
  slot within ``RESTART_WINDOW_SECONDS`` stops everything (exit 1) rather than looping. The new
  worker takes back at once the leases the dead one held (engine/store/leases.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from types import FrameType

from sqlalchemy.engine import make_url

from engine.config import Settings
from engine.errors import RadBridgeError

log = logging.getLogger("radbridge.workers")

BACKOFF_INITIAL_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
MAX_RESTARTS = 5  # of one slot within RESTART_WINDOW_SECONDS
RESTART_WINDOW_SECONDS = 300.0
STOP_GRACE_SECONDS = 150.0  # a worker's own stop is bounded (reconciliation 60 s, MLLP drain 10 s, ...)
POLL_SECONDS = 0.2


class WorkersRefused(RadBridgeError):
    """--workers cannot be used with these settings (a usage error: exit 2)."""


def check_workers(settings: Settings, workers: int) -> None:
    if workers < 1:
        raise WorkersRefused(f"--workers {workers}: expected 1 or more")
    if workers > 1 and make_url(settings.database_url).get_backend_name() != "postgresql":
        raise WorkersRefused(f"--workers {workers} needs PostgreSQL (RADBRIDGE_DATABASE_URL "
                             "postgresql+psycopg://...): SQLite is one process's database")


@dataclass
class Worker:
    slot: int
    proc: subprocess.Popen[bytes] | None = None
    ready_fd: int = -1  # the read end of the worker's ready pipe; -1 once read or closed
    ready: bool = False
    exit_code: int | None = None
    restart_at: float | None = None  # monotonic; a restart is due then
    deaths: deque[float] = field(default_factory=deque)  # when it died, within the restart window

    @property
    def running(self) -> bool:
        return self.proc is not None and self.exit_code is None


class Supervisor:
    def __init__(self, argv: list[str], workers: int) -> None:
        self.argv = argv  # the worker's `radbridge run` arguments, without the slot and ready fd
        self.workers = [Worker(slot) for slot in range(1, workers + 1)]
        self.stopping: signal.Signals | None = None
        self.failed: int | None = None  # the exit code once a worker could not start or restarts ran out
        self.announced = False

    # --- signals ---------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping is None:
            self.stopping = signal.Signals(signum)
            print(f"radbridge: stopping {len(self.workers)} workers (each finishes the messages in hand)...",
                  flush=True)
        self._signal_all(signum)

    def _signal_all(self, signum: int) -> None:
        for w in self.workers:
            if w.running and w.proc is not None:
                try:
                    w.proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    # --- workers ---------------------------------------------------------------------------------------
    def _spawn(self, w: Worker) -> None:
        read_fd, write_fd = os.pipe()
        cmd = [sys.executable, "-m", "engine.cli", "run", *self.argv,
               "--worker-slot", str(w.slot), "--ready-fd", str(write_fd)]
        try:
            w.proc = subprocess.Popen(cmd, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        w.ready_fd, w.ready, w.exit_code, w.restart_at = read_fd, False, None, None
        log.info("worker %d started (pid %d)", w.slot, w.proc.pid)

    def _close_ready(self, w: Worker) -> None:
        if w.ready_fd >= 0:
            os.close(w.ready_fd)
            w.ready_fd = -1

    def _read_ready(self) -> None:
        fds = {w.ready_fd: w for w in self.workers if w.ready_fd >= 0}
        if not fds:
            time.sleep(POLL_SECONDS)
            return
        try:
            readable, _, _ = select.select(list(fds), [], [], POLL_SECONDS)
        except InterruptedError:  # a signal: the loop looks again
            return
        for fd in readable:
            w = fds[fd]
            if os.read(fd, 16):
                w.ready = True
                if self.announced and w.proc is not None:
                    log.warning("worker %d started again (pid %d): listening", w.slot, w.proc.pid)
            self._close_ready(w)  # a byte, or EOF: a worker that died before it was ready (poll says)
        if not self.announced and all(w.ready for w in self.workers):
            self.announced = True
            pids = ", ".join(str(w.proc.pid) for w in self.workers if w.proc is not None)
            print(f"radbridge running: {len(self.workers)} workers (pids {pids}) sharing the listening ports "
                  "(Ctrl-C to stop)", flush=True)

    def _reap(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if not w.running or w.proc is None:
                continue
            code = w.proc.poll()
            if code is None:
                continue
            w.exit_code = code
            self._close_ready(w)
            if self.stopping is not None or self.failed is not None:
                log.info("worker %d (pid %d) stopped, exit code %d", w.slot, w.proc.pid, code)
                continue
            if not w.ready:
                log.error("worker %d (pid %d) could not start (exit code %d): stopping every worker",
                          w.slot, w.proc.pid, code)
                self._fail(code if code > 0 else 1)
                continue
            w.deaths.append(now)
            while w.deaths and now - w.deaths[0] > RESTART_WINDOW_SECONDS:
                w.deaths.popleft()
            if len(w.deaths) > MAX_RESTARTS:
                log.error("worker %d died %d times within %.0f s (last exit code %d): stopping every worker",
                          w.slot, len(w.deaths), RESTART_WINDOW_SECONDS, code)
                self._fail(1)
                continue
            # the back-off doubles with each death still within the window
            w.restart_at = now + min(BACKOFF_INITIAL_SECONDS * 2 ** (len(w.deaths) - 1), BACKOFF_MAX_SECONDS)
            log.warning("worker %d (pid %d) died unexpectedly (exit code %d); starting it again in %.0f s",
                        w.slot, w.proc.pid, code, w.restart_at - now)

    def _fail(self, code: int) -> None:
        self.failed = code
        self._signal_all(signal.SIGTERM)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.restart_at is not None and now >= w.restart_at and self.stopping is None and self.failed is None:
                self._spawn(w)

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        for w in self.workers:
            self._spawn(w)
        stop_deadline: float | None = None
        while True:  # ends when every worker has stopped after a stop (bounded by STOP_GRACE_SECONDS)
            self._read_ready()
            self._reap()
            self._restart_due()
            if self.stopping is None and self.failed is None:
                continue
            if stop_deadline is None:
                stop_deadline = time.monotonic() + STOP_GRACE_SECONDS
            if not any(w.running for w in self.workers):
                break
            if time.monotonic() > stop_deadline:
                for w in self.workers:
                    if w.running and w.proc is not None:
                        log.error("worker %d (pid %d) did not stop within %.0f s: killed", w.slot, w.proc.pid,
                                  STOP_GRACE_SECONDS)
                        w.proc.kill()
                        w.exit_code = w.proc.wait()
                self.failed = self.failed or 1
                break
        for w in self.workers:
            self._close_ready(w)
        if self.failed is not None:
            return self.failed
        # a worker that was still starting when the stop came ends by the signal itself: a clean stop too
        stopped_by = -int(self.stopping) if self.stopping is not None else 0
        codes = [w.exit_code for w in self.workers if w.exit_code and w.exit_code != stopped_by]
        return 1 if codes else 0


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The `run` arguments each worker gets (the supervisor's, less --workers)."""
    argv = ["--config", args.config] if args.config else []
    return argv + (["--verbose"] if args.verbose else [])


def supervise(args: argparse.Namespace, settings: Settings) -> int:
    """Migrate once, then run ``args.workers`` worker processes until stopped."""
    from sqlalchemy.exc import SQLAlchemyError

    from engine.redaction import redact_url, scrub
    from engine.store import migrate
    from engine.store.db import open_database

    try:
        db = open_database(settings.database_url, pool_size=1, hide_parameters=not settings.log_patient_details)
        try:
            migrate.upgrade(db)
        finally:
            db.dispose()
    except SQLAlchemyError as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"radbridge: not started: database {redact_url(settings.database_url)}: "
              f"{scrub(why, settings.secret_values())}", file=sys.stderr)
        return 1
    return Supervisor(worker_argv(args), args.workers).run()
