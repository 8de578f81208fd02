"""The file connector: HL7 files dropped in a directory are applied like MLLP messages, exactly once,
then moved to done/ or error/ (with the reason beside them)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from engine.channels import load_channels
from engine.connectors.file import FileConnector, split_messages
from engine.connectors.registry import connector_specs
from engine.store.models import FileProgress, Message, Patient, PatientIdentifier
from tests.conftest import REPO, RunningEngine, make_settings
from tests.hl7util import adt
from tests.waiting import wait_until

ROUTES = """routes:
  - messages: [ADT^A01, ADT^A04, ADT^A05, ADT^A28]
    action: patient.upsert
    mappings: [hl7-patient]
  - messages: [ADT^A08, ADT^A31]
    action: patient.update
    mappings: [hl7-patient]
  - messages: ["ADT^*"]
    action: ignore
"""


def write_channel(workdir: Path, inbox: Path, *, min_age: float = 0, poll: float = 0.05, enabled: bool = True,
                  **options: object) -> None:
    more = "".join(f"  {key}: {value}\n" for key, value in options.items())
    (workdir / "channels" / "hl7-file.yaml").write_text(
        f"name: hl7-file\nenabled: {'true' if enabled else 'false'}\n"
        f"connector:\n  type: file\n  directory: {inbox}\n"
        f"options:\n  poll_seconds: {poll}\n  min_age_seconds: {min_age}\n{more}" + ROUTES)


def drop(inbox: Path, name: str, content: bytes) -> Path:
    """Write under a dot name (never read), then rename: the file appears whole."""
    tmp = inbox / f".{name}.part"
    tmp.write_bytes(content)
    os.utime(tmp, (time.time() - 5, time.time() - 5))
    target = inbox / name
    tmp.rename(target)
    return target


@contextlib.contextmanager
def file_engine(workdir: Path, db_url: str, **channel: Any) -> Iterator[tuple[RunningEngine, Path]]:
    """An engine with the file channel reading workdir/inbox (options as write_channel's)."""
    inbox = workdir / "inbox"
    inbox.mkdir()
    write_channel(workdir, inbox, **channel)
    eng = RunningEngine(make_settings(workdir, db_url)).start()
    try:
        yield eng, inbox
    finally:
        eng.stop()


@pytest.fixture
def engine(workdir: Path, db_url: str) -> Iterator[tuple[RunningEngine, Path]]:
    with file_engine(workdir, db_url) as running:
        yield running


def rows(eng: RunningEngine, *controls: str) -> list[Message]:
    with eng.db.read_session() as s:
        return list(s.execute(select(Message).where(Message.control_id.in_(controls))
                              .order_by(Message.id)).scalars())


def has_patient(eng: RunningEngine, mrn: str) -> bool:
    with eng.db.read_session() as s:
        return s.execute(select(func.count()).select_from(PatientIdentifier)
                         .where(PatientIdentifier.value == mrn)).scalar() == 1


def test_single_message_file_is_applied_and_moved_to_done(engine: tuple[RunningEngine, Path]) -> None:
    eng, inbox = engine
    drop(inbox, "one.hl7", adt("A01", "FILE1", "Single", ctrl="FONE0001").encode())
    wait_until((inbox / "done" / "one.hl7").exists, timeout=30, message="done/one.hl7")
    assert not (inbox / "one.hl7").exists()
    assert has_patient(eng, "FILE1")
    [row] = rows(eng, "FONE0001")
    assert (row.channel, row.status, row.ack_code, row.remote) == ("hl7-file", "processed", "AA", "file:one.hl7#1")
    with eng.db.read_session() as s:
        ack = s.get(Message, row.id).content.ack
    assert "MSA|AA|FONE0001" in ack
    st = eng.engine.connector("hl7-file", FileConnector).status()
    assert st["state"] == "running" and st["files"]["done"] == 1 and st["counters"]["received"] == 1
    assert st["directory"] == str(inbox) and st["last_poll"]
    status, health = eng.api("/health", token=None)
    assert status == 200, health


def test_multi_message_and_batch_files(engine: tuple[RunningEngine, Path]) -> None:
    eng, inbox = engine
    lf = "".join(adt("A01", f"MULTI{i}", "Multi", ctrl=f"FMUL{i:04d}").replace("\r", "\n") for i in range(3))
    drop(inbox, "multi.hl7", lf.encode())
    batch = ("FHS|^~\\&|EPIC|GENHOSP|||20240315081500\r\nBHS|^~\\&|EPIC|GENHOSP|||20240315081500\r\n"
             + "".join(adt("A04", f"BATCH{i}", "Batch", ctrl=f"FBAT{i:04d}").replace("\r", "\r\n") for i in range(4))
             + "BTS|4\r\nFTS|1\r\n")
    drop(inbox, "batch.hl7", batch.encode())
    wait_until(lambda: (inbox / "done" / "multi.hl7").exists() and (inbox / "done" / "batch.hl7").exists(),
               timeout=30, message="both files in done/")
    multi = rows(eng, *(f"FMUL{i:04d}" for i in range(3)))
    batched = rows(eng, *(f"FBAT{i:04d}" for i in range(4)))
    assert [r.status for r in multi] == ["processed"] * 3
    assert [r.status for r in batched] == ["processed"] * 4  # BHS/FHS/BTS/FTS are no messages
    assert [r.remote for r in batched] == [f"file:batch.hl7#{i}" for i in range(1, 5)]
    assert all(has_patient(eng, f"BATCH{i}") for i in range(4)) and has_patient(eng, "MULTI2")
    with eng.db.read_session() as s:
        assert s.execute(select(func.count()).select_from(Message).where(Message.channel == "hl7-file")).scalar() == 7
        states = dict(s.execute(select(FileProgress.file_name, FileProgress.state)).all())
    assert states == {"multi.hl7": "done", "batch.hl7": "done"}


def test_batch_with_a_bad_message_applies_the_good_ones_and_goes_to_error(engine: tuple[RunningEngine, Path]) -> None:
    eng, inbox = engine
    good1 = adt("A01", "GOOD1", "Good", ctrl="FBAD0001")
    bad = adt("A01", "BAD2", "Bad", ctrl="FBAD0002").replace("ADT^A01^ADT_A01", "ZZZ^Z01")
    good3 = adt("A01", "GOOD3", "Good", ctrl="FBAD0003")
    drop(inbox, "mixed.hl7", ("BHS|^~\\&|EPIC\r" + good1 + bad + good3 + "BTS|3\r").encode())
    wait_until((inbox / "error" / "mixed.hl7").exists, timeout=30, message="error/mixed.hl7")
    report = (inbox / "error" / "mixed.hl7.error.txt").read_text()
    assert "message 2 (MSH-10 FBAD0002): rejected (AR)" in report and "ZZZ^Z01" in report
    assert "FBAD0001" not in report and "FBAD0003" not in report
    assert [(r.control_id, r.status) for r in rows(eng, "FBAD0001", "FBAD0002", "FBAD0003")] == [
        ("FBAD0001", "processed"), ("FBAD0002", "rejected"), ("FBAD0003", "processed")]
    assert has_patient(eng, "GOOD1") and has_patient(eng, "GOOD3") and not has_patient(eng, "BAD2")
    assert not (inbox / "done").exists() or not (inbox / "done" / "mixed.hl7").exists()
    assert eng.engine.connector("hl7-file", FileConnector).status()["files"]["failed"] == 1


def test_not_hl7_goes_to_error_with_its_reason_and_names_never_clash(engine: tuple[RunningEngine, Path]) -> None:
    eng, inbox = engine
    drop(inbox, "notes.hl7", b"Dear colleague,\nplease find attached\n")
    wait_until((inbox / "error" / "notes.hl7").exists, timeout=30, message="error/notes.hl7")
    assert "not an HL7 file" in (inbox / "error" / "notes.hl7.error.txt").read_text()
    content = adt("A01", "AGAIN1", "Again", ctrl="FAGN0001").encode()
    drop(inbox, "same.hl7", content)
    wait_until((inbox / "done" / "same.hl7").exists, timeout=30, message="done/same.hl7")
    drop(inbox, "same.hl7", content)  # the same file again: kept beside, not overwritten, not applied twice
    wait_until((inbox / "done" / "same-1.hl7").exists, timeout=30, message="done/same-1.hl7")
    assert (inbox / "done" / "same.hl7").read_bytes() == content
    assert len(rows(eng, "FAGN0001")) == 1


def test_a_file_younger_than_min_age_is_left_alone(workdir: Path, db_url: str) -> None:
    with file_engine(workdir, db_url, min_age=600) as (eng, inbox):
        conn = eng.engine.connector("hl7-file", FileConnector)
        path = inbox / "young.hl7"
        path.write_bytes(adt("A01", "YOUNG1", "Young", ctrl="FYNG0001").encode())
        written = time.time()
        # two whole polls that started after the file was written
        wait_until(lambda: conn.last_poll is not None and conn.last_poll.timestamp() > written + 0.1,
                   timeout=30, message="two polls")
        polled = conn.last_poll
        wait_until(lambda: conn.last_poll != polled, timeout=30, message="another poll")
        assert path.exists() and rows(eng, "FYNG0001") == []
        os.utime(path, (time.time() - 601, time.time() - 601))  # now it has been unchanged long enough
        wait_until((inbox / "done" / "young.hl7").exists, timeout=30, message="done/young.hl7")
        assert [r.status for r in rows(eng, "FYNG0001")] == ["processed"]


def test_a_file_over_max_file_bytes_goes_to_error_unread(workdir: Path, db_url: str) -> None:
    with file_engine(workdir, db_url, max_file_bytes=300) as (eng, inbox):
        big = "".join(adt("A01", f"BIG{i}", "Big", ctrl=f"FBIG{i:04d}") for i in range(3)).encode()
        assert len(big) > 300
        drop(inbox, "big.hl7", big)
        wait_until((inbox / "error" / "big.hl7").exists, timeout=30, message="error/big.hl7")
        report = (inbox / "error" / "big.hl7.error.txt").read_text()
        assert f"file of {len(big)} bytes exceeds max_file_bytes (300); nothing was read" in report
        assert rows(eng, *(f"FBIG{i:04d}" for i in range(3))) == [] and not has_patient(eng, "BIG0")
        assert (inbox / "error" / "big.hl7").read_bytes() == big


def test_missing_directory_is_a_problem_at_its_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "f.yaml").write_text("name: f\nconnector:\n  type: file\nroutes:\n"
                                     "  - messages: [ADT^*]\n    action: ignore\n")
    channels, problems = load_channels(tmp_path, connector_specs(), set())
    assert channels == []
    assert [str(p) for p in problems] == [
        f"{tmp_path / 'f.yaml'}:2: connector.directory: a file channel needs connector: {{type: file, directory: PATH}}"]
    (tmp_path / "f.yaml").write_text("name: f\nconnector:\n  type: file\n  directory: 7\n"
                                     "options:\n  poll_seconds: 0\nroutes:\n  - messages: [ADT^*]\n    action: ignore\n")
    _channels, problems = load_channels(tmp_path, connector_specs(), set())
    text = "\n".join(str(p) for p in problems)
    assert f"{tmp_path / 'f.yaml'}:4: connector.directory: directory is a path" in text
    assert f"{tmp_path / 'f.yaml'}:6: options.poll_seconds: must be greater than 0" in text


def test_split_messages_line_endings_and_envelope() -> None:
    assert split_messages(b"\xef\xbb\xbfMSH|a\r\nPID|1\n\nMSH|b\rEVN|x\r") == [b"MSH|a\rPID|1\r", b"MSH|b\rEVN|x\r"]
    assert split_messages(b"FHS|x\nBHS|y\nMSH|a\nBTS|1\nFTS|1\n") == [b"MSH|a\r"]


# --- kill -9 in the middle of a file -------------------------------------------------------------------

def test_kill_9_mid_file_then_restart_applies_every_message_exactly_once(workdir: Path, db_url: str) -> None:
    from tests.test_durability import free_port
    inbox = workdir / "inbox"
    inbox.mkdir()
    write_channel(workdir, inbox)
    total = 400
    controls = [f"FKIL{i:04d}" for i in range(total)]
    body = "".join(adt("A01", f"KILL{i}", "Kill", ctrl=c) for i, c in enumerate(controls))
    drop(inbox, "big.hl7", ("BHS|^~\\&|EPIC\r" + body + f"BTS|{total}\r").encode())
    env = {**os.environ, "RADBRIDGE_DATABASE_URL": db_url, "RADBRIDGE_STORAGE_DIR": str(workdir / "var"),
           "RADBRIDGE_MLLP_PORT": str(free_port()), "RADBRIDGE_HTTP_PORT": str(free_port()),
           "RADBRIDGE_CHANNELS_DIR": str(workdir / "channels"), "RADBRIDGE_MAPPINGS_DIR": str(workdir / "mappings"),
           "RADBRIDGE_API_TOKEN": "t", "RADBRIDGE_LOG_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "engine.cli", "run", "--config", str(REPO / "config" / "radbridge.toml")]
    db = create_engine(db_url)

    def stored() -> int:
        try:
            with Session(db) as s:
                return int(s.execute(select(func.count()).select_from(Message)
                                     .where(Message.channel == "hl7-file")).scalar() or 0)
        except Exception:  # the engine has not created the tables yet
            return 0

    try:
        proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            at_kill = wait_until(lambda: stored() >= 5 and stored(), timeout=60, message="some messages stored")
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        after_kill = stored()
        assert at_kill <= after_kill < total, "the engine finished the file before it was killed"
        assert (inbox / "big.hl7").exists()
        proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until((inbox / "done" / "big.hl7").exists, timeout=120, message="done/big.hl7")
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        with Session(db) as s:
            got = s.execute(select(Message.control_id, Message.status).where(Message.channel == "hl7-file")).all()
            patients = s.execute(select(func.count()).select_from(Patient)).scalar()
            progress = s.execute(select(FileProgress.messages_done, FileProgress.total, FileProgress.state)).all()
    finally:
        db.dispose()
    assert sorted(c or "" for c, _ in got) == controls  # each stored exactly once
    assert {st for _, st in got} == {"processed"}  # and applied (none a duplicate re-ACK)
    assert patients == total
    assert progress == [(total, total, "done")]
    assert not (inbox / "error").exists() or not any((inbox / "error").iterdir())
