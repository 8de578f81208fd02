"""Process helpers shared by the benchmarks (imported as a sibling module: scripts run from bench/)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Mapping
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc/<pid>/stat); 0.0 when unavailable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


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


def print_plan(conn: Any, name: str, sql: str) -> None:
    """The database's plan of ``sql`` (EXPLAIN QUERY PLAN on SQLite, EXPLAIN on PostgreSQL), under ``name``."""
    from sqlalchemy import text
    prefix = "EXPLAIN QUERY PLAN " if conn.dialect.name == "sqlite" else "EXPLAIN "
    plan = [" ".join(str(c) for c in row) for row in conn.execute(text(prefix + sql))]
    print(f"\n{name}:\n  " + "\n  ".join(plan))


def percentiles(values: list[float]) -> tuple[float, float, float]:
    """p50, p95 and max of ``values`` (not empty)."""
    import statistics
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(round(len(ordered) * 0.95)) - 1)], ordered[-1]


def timing_arguments(ap: Any, explain_help: str) -> None:
    """The options the request-timing benchmarks share: --repeat, --database-url, --explain."""
    ap.add_argument("--repeat", type=int, default=20, help="requests of each kind")
    ap.add_argument("--database-url", help="PostgreSQL admin URL; a throwaway database is created and dropped")
    ap.add_argument("--explain", action="store_true", help=explain_help)


def migrated_store(admin_url: str | None, prefix: str) -> tuple[Path, str, Callable[[], None]]:
    """A temporary work directory, a fresh store in it migrated to the newest schema (``make_store``),
    and what removes both."""
    import shutil
    import tempfile

    from engine.store.db import open_database
    from engine.store.migrate import upgrade
    work = Path(tempfile.mkdtemp(prefix=prefix))
    url, drop_store = make_store(admin_url, work)

    def drop() -> None:
        shutil.rmtree(work, ignore_errors=True)
        drop_store()
    try:
        (work / "var").mkdir(parents=True, exist_ok=True)
        db = open_database(url)
        upgrade(db)
        db.dispose()
    except BaseException:
        drop()
        raise
    return work, url, drop


def json_option(ap: Any) -> None:
    """``--json FILE``: every benchmark's way of handing its figures to bench/run_all.py."""
    ap.add_argument("--json", type=Path, default=None, metavar="FILE",
                    help="also write this run's figures to FILE as JSON (bench/run_all.py reads them)")


def write_figures(path: Path | None, figures: Mapping[str, float]) -> None:
    """The figures of a run, by name (medians when it ran several rounds), as ``{"figures": {...}}``
    in ``path`` (``--json``); nothing without a path. NaN (a figure the run could not measure) is
    written as null."""
    if path is None:
        return
    out = {k: (None if math.isnan(float(v)) else float(v)) for k, v in sorted(figures.items())}
    path.write_text(json.dumps({"figures": out}, indent=1) + "\n", encoding="utf-8")
