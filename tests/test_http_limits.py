"""Hostile HTTP peers over real sockets (issue 14 item 5): request heads that never finish, bodies
that never arrive and floods of connections are cut off, and the other listeners keep answering."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.config import Settings
from tests.conftest import TOKEN, RunningEngine, make_settings
from tests.hl7util import ack_code, adt, send
from tests.waiting import wait_until

PARTIAL_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


@pytest.fixture
def limited(workdir: Path, db_url: str) -> Settings:
    settings = make_settings(workdir, db_url)
    settings.http.header_timeout_seconds = 1
    settings.http.body_timeout_seconds = 1
    settings.http.max_connections = 20
    return settings


@pytest.fixture
def eng(limited: Settings) -> Iterator[RunningEngine]:
    e = RunningEngine(limited).start()
    try:
        yield e
    finally:
        e.stop()


def connect(e: RunningEngine, first: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", e.engine.http_port), timeout=10)
    if first:
        s.sendall(first)
    return s


def answer(s: socket.socket) -> bytes:
    """Everything the engine sends until it closes the connection (bounded by the socket timeout)."""
    data = b""
    for _ in range(1000):
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def response(s: socket.socket) -> bytes:
    """One whole HTTP response (head and Content-Length body), without waiting for the close."""
    data = b""
    for _ in range(1000):
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            lengths = [int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")]
            if lengths and len(body) >= lengths[0]:
                return data
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    return data


def test_request_heads_that_never_finish_are_closed_and_health_answers(eng: RunningEngine) -> None:
    """~20,000 such connections used every file handle and stopped MLLP, DICOM and /health."""
    slow = [connect(eng, PARTIAL_HEAD) for _ in range(10)]
    try:
        for s in slow:
            answer(s)  # returns once the engine closed it; a socket timeout (10 s) fails the test
        assert eng.api("/health")[0] == 200
    finally:
        for s in slow:
            s.close()


def test_connections_over_the_cap_are_refused_at_once_and_other_listeners_answer(eng: RunningEngine) -> None:
    slow = [connect(eng, PARTIAL_HEAD) for _ in range(20)]
    try:
        wait_until(lambda: eng.engine.http_site is not None and eng.engine.http_site.open_connections == 20,
                   timeout=5, interval=0.01, message="the HTTP listener to hold 20 connections")
        with connect(eng, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") as over:
            refused = answer(over)
        assert refused.startswith(b"HTTP/1.1 503 ") and b"Retry-After:" in refused
        assert ack_code(send(eng.mllp_port, adt("A01", "HTTPCAP", "Still"))) == "AA"
        for s in slow:
            answer(s)  # closed after the header timeout
        wait_until(lambda: eng.api("/health")[0] == 200, timeout=10, message="/health to answer again")
        assert eng.engine.http_site is not None and eng.engine.http_site.refused_total == 1
    finally:
        for s in slow:
            s.close()


@pytest.mark.parametrize("path, ctype", [("/fhir/Patient", "application/fhir+json"),
                                         ("/api/findings/1/accept", "application/json")])
def test_a_body_that_never_arrives_is_answered_408(eng: RunningEngine, path: str, ctype: str) -> None:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: 100000\r\n\r\n{{").encode()
    with connect(eng, head) as s:
        reply = response(s)
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert b"body_timeout_seconds" in reply
    assert eng.api("/health")[0] == 200
