"""Bad input over real sockets: each gets a specific NAK or a closed connection, is recorded where
it can be, and the listener keeps serving everyone else."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from engine.config import Settings
from engine.connectors.mllp.channel import MllpConnector
from engine.connectors.mllp.server import MLLPServer
from engine.store.models import Message
from tests.conftest import RunningEngine, make_settings
from tests.hl7util import ack_code, adt, frames, raw_exchange, segment, send
from tests.waiting import wait_until

SB, EB = b"\x0b", b"\x1c\r"


@pytest.fixture
def small_limits(workdir: Path, db_url: str) -> Settings:
    ch = workdir / "channels" / "hl7-inbound.yaml"
    text = ch.read_text().replace("max_message_bytes: 10485760", "max_message_bytes: 1048576")
    ch.write_text(text.replace("idle_timeout_seconds: 120", "idle_timeout_seconds: 1"))
    return make_settings(workdir, db_url)


@pytest.fixture
def eng(small_limits: Settings):
    e = RunningEngine(small_limits).start()
    yield e
    e.stop()


def still_serving(e: RunningEngine, mrn: str) -> None:
    assert ack_code(send(e.mllp_port, adt("A01", mrn, "Healthy"))) == "AA"


def rows(e: RunningEngine, status: str) -> list[Message]:
    with e.db.read_session() as s:
        return list(s.execute(select(Message).where(Message.status == status).order_by(Message.id)
                              .options(selectinload(Message.content))).scalars())


def test_garbage_bytes_get_no_reply_and_do_not_break_the_next_frame(eng: RunningEngine) -> None:
    data = raw_exchange(eng.mllp_port, b"\x00\xff garbage \x01" + SB + adt("A01", "G1", "After").encode() + EB)
    assert [ack_code(r) for r in frames(data)] == ["AA"]
    assert eng.engine.metrics.frame_errors.value(channel="hl7-inbound", kind="garbage") == 1
    still_serving(eng, "G2")


def test_frame_without_msh_is_rejected_with_err(eng: RunningEngine) -> None:
    data = raw_exchange(eng.mllp_port, SB + b"PID|1||123^^^H^MR||Doe\r" + EB)
    (reply,) = frames(data)
    assert ack_code(reply) == "AR"
    assert segment(reply, "ERR")[2].startswith("MSH") and segment(reply, "ERR")[3].startswith("100^")
    assert rows(eng, "rejected")[0].content is not None
    still_serving(eng, "M1")


def test_wrong_encoding_characters_are_rejected_at_msh2(eng: RunningEngine) -> None:
    bad = b"MSH|^^\\&|EPIC|GENHOSP|RB|RAD|20240101||ADT^A01|WENC1|P|2.5.1\rPID|1||1\r"
    (reply,) = frames(raw_exchange(eng.mllp_port, SB + bad + EB))
    assert ack_code(reply) == "AR" and segment(reply, "MSA")[2] == "WENC1"
    assert segment(reply, "ERR")[2].startswith("MSH^1^2") and segment(reply, "ERR")[3].startswith("102^")
    still_serving(eng, "W1")


def test_truncated_frame_is_recorded_when_the_sender_hangs_up(eng: RunningEngine) -> None:
    raw_exchange(eng.mllp_port, SB + adt("A01", "T1", "Cut").encode()[:60], close_write=True, timeout=3)
    (row,) = wait_until(lambda: rows(eng, "rejected"), timeout=10,
                        message="the truncated frame to be recorded as a rejected message")
    assert "truncated" in (row.error or "") and row.content is not None and row.content.raw.startswith(b"MSH|")
    still_serving(eng, "T2")


def test_twenty_megabyte_message_is_naked_and_only_its_head_kept(eng: RunningEngine) -> None:
    big = adt("A01", "BIG1", "Huge", ctrl="BIG0001").encode() + b"NTE|1||" + b"A" * (20 * 1024 * 1024) + b"\r"
    with socket.create_connection(("127.0.0.1", eng.mllp_port), timeout=60) as s:
        s.sendall(SB + big + EB)
        data = b""
        while not data.endswith(EB):
            chunk = s.recv(65536)
            assert chunk, "connection closed without a reply"
            data += chunk
    (reply,) = frames(data)
    assert ack_code(reply) == "AR" and segment(reply, "MSA")[2] == "BIG0001"
    assert "exceeds" in segment(reply, "MSA")[3] or "exceeds" in reply
    (row,) = rows(eng, "rejected")
    assert row.size == len(big) and row.content is not None and len(row.content.raw) <= 64 * 1024
    still_serving(eng, "BIG2")


def test_silent_client_is_closed_after_the_idle_timeout_while_others_are_served(eng: RunningEngine) -> None:
    with socket.create_connection(("127.0.0.1", eng.mllp_port), timeout=10) as silent:
        still_serving(eng, "I1")
        silent.settimeout(10)
        t0 = time.monotonic()
        assert silent.recv(10) == b""  # the server closed it
        assert time.monotonic() - t0 < 9
    still_serving(eng, "I2")


def test_invalid_date_in_order_is_ae_naming_the_field(eng: RunningEngine) -> None:
    from tests.hl7util import orm
    msg = orm("NW", "BADT1", "ACCBADT", "P9").replace("^^^20240320140000^^R", "^^^2024-03-20^^R")
    reply = send(eng.mllp_port, msg)
    assert ack_code(reply) == "AE"
    assert segment(reply, "ERR")[1].startswith("ORC^1^7^102&")  # v2.3.1: ERR-1 layout
    still_serving(eng, "D1")


def test_many_bad_clients_at_once_do_not_stop_the_listener(eng: RunningEngine) -> None:
    import concurrent.futures
    payloads = [b"\x00" * 100, SB + b"junk" + EB, SB + b"MSH|" + EB, SB + b"MSH|^~\\&" + EB, b"\x0b\x0b\x0b"]

    def attack(i: int) -> bytes:
        return raw_exchange(eng.mllp_port, payloads[i % len(payloads)], close_write=True, timeout=3)
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        list(pool.map(attack, range(30)))
    still_serving(eng, "S1")
    assert eng.engine.connector("hl7-inbound", MllpConnector).server.running


def test_mllp_send_from_python_hl7_as_a_separate_process(eng: RunningEngine, tmp_path: Path) -> None:
    f = tmp_path / "a01.hl7"
    f.write_text(adt("A01", "X1", "External").replace("\r", "\n"))
    mllp_send = Path(sys.executable).parent / "mllp_send"
    out = subprocess.run([str(mllp_send), "--loose", "--file", str(f), "--port", str(eng.mllp_port), "127.0.0.1"],
                         capture_output=True, text=True, timeout=30)
    assert "MSA|AA|" in out.stdout.replace("\r", "\n"), out


def test_connections_over_the_limit_close_the_idlest_and_keep_the_others(workdir: Path, db_url: str) -> None:
    settings = make_settings(workdir, db_url)
    settings.mllp.max_connections = 2
    e = RunningEngine(settings).start()
    try:
        a = socket.create_connection(("127.0.0.1", e.mllp_port), timeout=5)
        b = socket.create_connection(("127.0.0.1", e.mllp_port), timeout=5)
        wait_until(lambda: mllp_server(e).active_connections >= 2,
                   timeout=5, interval=0.02, message="the listener to count both connections as active")
        b.sendall(SB + adt("A01", "LIM1", "Kept").encode() + EB)  # b is busy, a the idlest
        b.settimeout(10)
        assert b"MSA|AA" in b.recv(65536)
        with socket.create_connection(("127.0.0.1", e.mllp_port), timeout=5) as c:
            c.sendall(SB + adt("A01", "LIM2", "New").encode() + EB)
            c.settimeout(10)
            assert b"MSA|AA" in c.recv(65536)
        a.settimeout(5)
        assert a.recv(10) == b""  # closed to make room
        b.sendall(SB + adt("A01", "LIM3", "Still").encode() + EB)
        assert b"MSA|AA" in b.recv(65536)
        a.close()
        b.close()
        assert mllp_server(e).refused_total == 0 and mllp_server(e).closed_for_room_total == 1
    finally:
        e.stop()


def closed_now(sock: socket.socket) -> bool:
    """True when the engine has closed ``sock`` (EOF or reset waiting to be read); never blocks."""
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        return sock.recv(16, socket.MSG_PEEK) == b""
    except BlockingIOError:  # nothing to read yet
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.settimeout(timeout)


def mllp_server(e: RunningEngine) -> MLLPServer:
    return e.engine.connector("hl7-inbound", MllpConnector).server


def holds(e: RunningEngine, counter: str, expected: int) -> bool:
    return bool(getattr(mllp_server(e), counter) == expected)


def test_idle_connections_make_room_for_a_real_sender(workdir: Path, db_url: str) -> None:
    """Issue 14 item 6: with every connection slot held by an idle socket, a real sender was refused
    for up to idle_timeout_seconds. The idlest connection is closed to make room instead."""
    settings = make_settings(workdir, db_url)
    settings.mllp.max_connections = 20
    e = RunningEngine(settings).start()
    idle: list[socket.socket] = []
    try:
        for i in range(20):
            idle.append(socket.create_connection(("127.0.0.1", e.mllp_port), timeout=5))
            wait_until(partial(holds, e, "active_connections", i + 1), timeout=5, interval=0.01,
                       message=f"the listener to count {i + 1} connections")
        still_serving(e, "ROOM1")
        wait_until(lambda: closed_now(idle[0]), timeout=5, message="the idlest connection to be closed")
        assert not any(closed_now(s) for s in idle[1:])
        still_serving(e, "ROOM2")
        assert mllp_server(e).refused_total == 0
    finally:
        for s in idle:
            s.close()
        e.stop()


def test_half_sent_frames_are_capped_in_total_and_the_idlest_is_closed(workdir: Path, db_url: str) -> None:
    """Issue 14 item 6: every connection could hold a half-sent frame of max_message_bytes (200 of
    them: 2 GB). Past [mllp] max_buffered_bytes in total the idlest holder is closed (its truncated
    frame recorded like any other) and real senders are served."""
    settings = make_settings(workdir, db_url)
    settings.mllp.max_buffered_bytes = 1_000_000
    e = RunningEngine(settings).start()
    size = 400_000
    part = SB + adt("A01", "HALF", "Sent").encode() + b"NTE|1||" + b"A" * (size - 200)
    holders: list[socket.socket] = []
    try:
        for i in range(3):
            s = socket.create_connection(("127.0.0.1", e.mllp_port), timeout=5)
            holders.append(s)
            s.sendall(part)
            if i < 2:
                wait_until(partial(holds, e, "buffered_bytes", (i + 1) * (len(part) - 1)), timeout=10,
                           interval=0.01, message="the listener to hold the half-sent frames")
        wait_until(lambda: closed_now(holders[0]), timeout=10, message="the idlest holder to be closed")
        assert not closed_now(holders[1]) and not closed_now(holders[2])
        assert mllp_server(e).buffered_bytes == 2 * (len(part) - 1) <= 1_000_000
        (row,) = wait_until(lambda: rows(e, "rejected"), timeout=10, message="the cut frame to be recorded")
        assert "truncated" in (row.error or "") and row.content is not None and row.content.raw.startswith(b"MSH|")
        still_serving(e, "HALF2")
    finally:
        for s in holders:
            s.close()
        e.stop()


def test_garbage_start_blocks_make_one_record_per_connection_and_few_log_lines(
        eng: RunningEngine, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 14 item 7: b"\\x0bX" repeated made one rejected message row and one WARNING per 2 bytes
    (40 KB: 17,824 rows kept forever with keep_errors). Framing errors are counted per connection,
    stored as one record with a sample, and logged a few times at most."""
    caplog.set_level(logging.INFO)
    raw_exchange(eng.mllp_port, b"\x0bX" * 20_000, close_write=True, timeout=5)
    wait_until(lambda: eng.engine.metrics.frame_errors.value(channel="hl7-inbound", kind="truncated") >= 19_999,
               timeout=30, message="every framing error to be counted")
    wait_until(lambda: mllp_server(eng).active_connections == 0, timeout=30, message="the connection to end")
    (row,) = rows(eng, "rejected")
    assert "20000 truncated" in (row.error or "") and row.content is not None and row.content.raw == b"X"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("engine.connectors")]
    # one line for the connection's first problem, one summary when it ends: not one per problem
    said = [r.getMessage() for r in warnings]
    assert len(said) == 2, said
    assert said[0].endswith("a new frame started before the previous one ended")
    assert "20000 truncated frame(s)" in said[1]
    still_serving(eng, "GARB1")
