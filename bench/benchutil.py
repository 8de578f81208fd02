"""Process helpers shared by the benchmarks (imported as a sibling module: scripts run from bench/)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from pathlib import Path


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
