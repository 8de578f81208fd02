"""Nothing acknowledged is lost: an ACK goes out only after the data is committed."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session

from engine.store.models import Message, Patient
from tests.conftest import REPO, RunningEngine
from tests.hl7util import ack_code, adt, segment, send
from tests.waiting import wait_for_listener


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_every_acked_message_survives_sigkill(db_url: str, workdir: Path) -> None:
    mllp, http = free_port(), free_port()
    env = {**os.environ, "RADBRIDGE_DATABASE_URL": db_url, "RADBRIDGE_STORAGE_DIR": str(workdir / "var"),
           "RADBRIDGE_MLLP_PORT": str(mllp), "RADBRIDGE_HTTP_PORT": str(http),
           "RADBRIDGE_CHANNELS_DIR": str(workdir / "channels"), "RADBRIDGE_MAPPINGS_DIR": str(workdir / "mappings"),
           "RADBRIDGE_API_TOKEN": "t", "RADBRIDGE_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", "--config",
                             str(REPO / "config" / "radbridge.toml")], env=env, cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    acked: list[str] = []
    try:
        wait_for_listener(mllp, proc, what="the engine", timeout=60)
        with socket.create_connection(("127.0.0.1", mllp), timeout=10) as s:
            for i in range(300):
                msg = adt("A01", f"K{i}", "Kill", ctrl=f"KILL{i:04d}")
                s.sendall(b"\x0b" + msg.encode() + b"\x1c\r")
                if i == 299:
                    break  # the last one is in flight when the engine dies
                buf = b""
                while not buf.endswith(b"\x1c\r"):
                    chunk = s.recv(4096)
                    assert chunk, "the engine closed the connection without a reply"
                    buf += chunk
                reply = buf.decode()
                assert ack_code(reply) == "AA"
                acked.append(segment(reply, "MSA")[2])
            proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    eng = create_engine(db_url)
    with Session(eng) as sess:
        stored = set(sess.execute(select(Message.control_id).where(Message.status == "processed")).scalars())
        patients = sess.execute(select(func.count()).select_from(Patient)).scalar()
    eng.dispose()
    assert len(acked) == 299
    assert set(acked) <= stored
    assert patients is not None and patients >= 299


def test_database_outage_gets_ar_and_nothing_claimed_then_recovers(pg_url: str, workdir: Path) -> None:
    from tests.conftest import make_settings
    running = RunningEngine(make_settings(workdir, pg_url)).start()
    try:
        port = running.mllp_port
        assert ack_code(send(port, adt("A01", "UP1", "Before"))) == "AA"
        dbname = pg_url.rsplit("/", 1)[1]
        admin = create_engine(pg_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false'))
            c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"), {"d": dbname})
        try:
            reply = send(port, adt("A01", "DOWN1", "During", ctrl="DOWN0001"))
            assert ack_code(reply) == "AR"
            assert segment(reply, "ERR")[3].startswith("207^") and "not stored" in reply
            status, body = running.api("/health", token=None)
            assert status == 503 and body["ready"] is False
        finally:
            with admin.connect() as c:
                c.execute(text(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true'))
            admin.dispose()
        # the sender resends after the NAK; this time it is stored and applied once
        assert ack_code(send(port, adt("A01", "DOWN1", "During", ctrl="DOWN0001"))) == "AA"
        with running.db.read_session() as s:
            rows = s.execute(select(Message.status).where(Message.control_id == "DOWN0001")).scalars().all()
        assert rows == ["processed"]
    finally:
        running.stop()


def test_sigterm_drains_and_exits_cleanly(tmp_path: Path, workdir: Path) -> None:
    mllp, http = free_port(), free_port()
    db_url = f"sqlite:///{workdir / 'var' / 'radbridge.db'}"
    env = {**os.environ, "RADBRIDGE_DATABASE_URL": db_url, "RADBRIDGE_STORAGE_DIR": str(workdir / "var"),
           "RADBRIDGE_MLLP_PORT": str(mllp), "RADBRIDGE_HTTP_PORT": str(http),
           "RADBRIDGE_CHANNELS_DIR": str(workdir / "channels"), "RADBRIDGE_MAPPINGS_DIR": str(workdir / "mappings")}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "run"], env=env, cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_listener(mllp, proc, what="the engine", timeout=60)
        assert ack_code(send(mllp, adt("A01", "TERM1", "Term"))) == "AA"
        idle = socket.create_connection(("127.0.0.1", mllp), timeout=10)  # an idle sender must not block stop
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        idle.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    assert b"stopping" in out
    # scripts (bench/mllp_ingest.py) read the ports from this line: its shape is an interface
    first = out.decode().splitlines()[0]
    assert re.match(rf"radbridge running: dicom \(DICOM RADBRIDGE\) on 127\.0\.0\.1:\d+, hl7-inbound on 127\.0\.0\.1:{mllp}; "
                    rf"HTTP on http://127\.0\.0\.1:{http}/ ", first), first
    assert (workdir / "var" / "api-token").exists()  # no token configured: one was generated for the API
