"""Bounded waits for tests: poll a condition until it holds or a deadline passes, then fail with
what was awaited and what was last seen (never a silent fall-through, never an unbounded loop)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.05,
               message: str = "condition") -> T:
    """Call ``predicate`` until it returns a truthy value and return that value.

    It is called at least once, and once more at or after the deadline, so a condition that holds
    by then is not missed. When ``timeout`` seconds pass without a truthy value, AssertionError
    says ``message`` and the last value returned. An exception the predicate raises propagates at
    once: a predicate fails fast that way when waiting longer cannot help (a process exited)."""
    if timeout <= 0 or interval <= 0:
        raise ValueError("timeout and interval must be greater than 0")
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}; last value: {value!r}")
        time.sleep(min(interval, max(deadline - time.monotonic(), 0.0)))


def accepts_connections(port: int, host: str = "127.0.0.1") -> bool:
    """True when a TCP connection to ``host:port`` is accepted now (then closed at once)."""
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return False
    return True


def wait_for_listener(port: int, proc: subprocess.Popen[Any], *, what: str, timeout: float = 30.0) -> None:
    """Wait until the process ``proc`` (described as ``what``) accepts connections on loopback
    ``port``; fail at once, with its output, if it exits first."""

    def listening() -> bool:
        code = proc.poll()
        if code is not None:
            out = proc.stdout.read() if proc.stdout else b""
            err = proc.stderr.read() if proc.stderr else b""
            text = b"".join(x if isinstance(x, bytes) else x.encode() for x in (out, err) if x)
            raise AssertionError(f"{what} exited with code {code} before listening on port {port}: "
                                 f"{text.decode('utf-8', 'replace')}")
        return accepts_connections(port)

    wait_until(listening, timeout=timeout, interval=0.1, message=f"{what} to listen on port {port}")


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not ended within ``grace`` seconds; waits for it either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
