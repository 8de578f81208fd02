"""The tests' bounded wait (tests/waiting.py): what it returns, and how it fails."""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys

import pytest

from tests.dicomutil import free_port
from tests.waiting import wait_for_listener, wait_until


def test_returns_the_first_truthy_value() -> None:
    calls = itertools.count(1)
    assert wait_until(lambda: [n] if (n := next(calls)) >= 3 else [], timeout=10, interval=0.01) == [3]


def test_fails_with_the_message_and_the_last_value() -> None:
    def rows() -> list[str]:
        return []
    with pytest.raises(AssertionError, match=r"timed out after 0.1 s waiting for the rows to appear; last value: \[\]"):
        wait_until(rows, timeout=0.1, interval=0.02, message="the rows to appear")


def test_an_exception_in_the_predicate_ends_the_wait_at_once() -> None:
    def broken() -> bool:
        raise RuntimeError("process gone")
    with pytest.raises(RuntimeError, match="process gone"):
        wait_until(broken, timeout=30)


def test_refuses_a_wait_that_cannot_end() -> None:
    with pytest.raises(ValueError):
        wait_until(lambda: True, timeout=0)
    with pytest.raises(ValueError):
        wait_until(lambda: True, interval=0)


def test_listener_found_on_loopback() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        # a process that stays up until its stdin closes (no fixed sleep), standing in for the server's
        idle = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        try:
            wait_for_listener(server.getsockname()[1], idle, what="the test server", timeout=10)
        finally:
            assert idle.stdin is not None
            idle.stdin.close()
            idle.wait(10)


def test_a_process_that_exits_before_listening_fails_with_its_output() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; print('bind: address in use'); sys.exit(3)"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with pytest.raises(AssertionError, match="the peer exited with code 3 .*bind: address in use"):
        wait_for_listener(free_port(), proc, what="the peer", timeout=30)
    proc.wait(10)
