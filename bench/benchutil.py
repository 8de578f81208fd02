"""Process helpers shared by the benchmarks (imported as a sibling module: scripts run from bench/)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def proc_status(pid: int, key: str) -> int:
    """A kB value (VmRSS, VmHWM) from /proc/<pid>/status; 0 when unavailable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def die_with_parent() -> None:
    """In a child before exec (Linux): SIGTERM when the benchmark dies, so no server outlives it."""
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def describe_source(src: Path) -> str:
    """The commit the engine source is at, and whether engine/, channels/ or mappings/ differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "engine", "channels",
                                "mappings"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"{src} (not a git checkout)"
    return f"{src} at {head}{' with uncommitted changes' if dirty else ''}"


def mib(kb: int) -> str:
    return f"{kb / 1024:.1f}"


def make_store(admin_url: str | None, work: Path) -> tuple[str, Callable[[], None]]:
    """A fresh store for a benchmark and how to drop it: with ``admin_url`` (PostgreSQL) a throwaway
    database created next to it, else SQLite under ``work``/var (removed with ``work``)."""
    if not admin_url:
        return f"sqlite:///{work / 'var' / 'radbridge.db'}", lambda: None
    from sqlalchemy import create_engine, text
    name = f"radbridge_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}", drop


def bench_settings(work: Path, url: str, token: str) -> Any:
    """The engine's settings for a benchmark run in-process: the repository's channels and mappings,
    every port chosen by the system, one token, no retention pass of its own."""
    from engine.config import Settings
    repo = Path(__file__).resolve().parents[1]
    s = Settings()
    s.storage.dir, s.database.url = str(work / "var"), url
    s.channels_dir, s.mappings_dir = str(repo / "channels"), str(repo / "mappings")
    s.mllp.port = s.dicom.port = s.http.port = 0
    s.http.tokens = [token]
    s.retention.enabled = False
    s.mappings.reload_seconds = 0
    return s
