"""The engine as a process of its own (`radbridge run`), for tests that kill it -9 and start it again."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from engine.standin_ehr import StandInEHR
from tests.conftest import REPO
from tests.dicomutil import free_port
from tests.waiting import accepts_connections, stop_process, wait_until


class EngineProcess:
    """`radbridge run` on free loopback ports, its output in ``workdir/engine.log``; the stand-in EHR
    (when given) receives its results. ``env`` adds or overrides RADBRIDGE_* settings. ``up`` is set
    while the process is known to listen (a sender thread waits on it across a kill)."""

    def __init__(self, workdir: Path, db_url: str, ehr: StandInEHR | None = None, **env: str) -> None:
        self.workdir = workdir
        self.workers = 1  # set > 1 before start(): `run --workers N`, a supervisor and its worker processes
        self.mllp, self.http, self.dicom = free_port(), free_port(), free_port()
        self.env = {**os.environ, "RADBRIDGE_DATABASE_URL": db_url, "RADBRIDGE_STORAGE_DIR": str(workdir / "var"),
                    "RADBRIDGE_MLLP_PORT": str(self.mllp), "RADBRIDGE_HTTP_PORT": str(self.http),
                    "RADBRIDGE_DICOM_PORT": str(self.dicom), "RADBRIDGE_CHANNELS_DIR": str(workdir / "channels"),
                    "RADBRIDGE_MAPPINGS_DIR": str(workdir / "mappings"), "RADBRIDGE_API_TOKEN": "t",
                    "RADBRIDGE_LOG_LEVEL": "WARNING", "RADBRIDGE_EHR_MLLP": ehr.mllp_address if ehr else "",
                    "RADBRIDGE_EHR_FHIR_BASE": "", **env}
        self.log = workdir / "engine.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.up = threading.Event()

    def start(self) -> EngineProcess:
        workers = ["--workers", str(self.workers)] if self.workers > 1 else []
        announced = self.log.read_text(errors="replace").count(self.RUNNING) if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", "--config",
                                          str(REPO / "config" / "radbridge.toml"), *workers], env=self.env,
                                         cwd=self.workdir, stdout=log, stderr=log)
        self.started_at = time.monotonic()
        for port in (self.mllp, self.http, self.dicom):
            wait_until(functools.partial(self._listening, port), timeout=60, interval=0.1,
                       message=f"the engine to listen on port {port}")
        if self.workers > 1:  # every worker listens: the supervisor says so once
            wait_until(lambda: self._listening(self.mllp) and self.log.read_text(errors="replace")
                       .count(self.RUNNING) > announced, timeout=60, interval=0.1,
                       message=f"all {self.workers} workers to listen")
        self.up.set()
        return self

    RUNNING = "radbridge running:"

    def children(self) -> list[int]:
        """The worker processes (`--workers`): the supervisor's children."""
        assert self.proc is not None
        found: list[int] = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(p) for p in (task / "children").read_text().split()]
        return sorted(found)

    def _listening(self, port: int) -> bool:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            tail = self.log.read_text(errors="replace")[-4000:]
            raise AssertionError(f"the engine exited with code {code} before listening on port {port}: {tail}")
        return accepts_connections(port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        self.up.clear()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        self.up.clear()
        if self.proc is not None:
            stop_process(self.proc, 30)
