"""The study index against the files in storage: `radbridge storage check [--repair]` (run as the
operator runs it) and the engine's sweep at start. The damage is what a crash, a disk or a person
leaves: a file renamed into storage whose index row was never committed, the old file of a coerced
instance not yet deleted, a file gone, a file changed."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import create_engine, select

from engine.dicom.headers import storage_key
from engine.store.models import Instance
from tests.conftest import REPO, RunningEngine, start_dicom_engine
from tests.dicomutil import Obj, free_port, make_instance, require_dcmtk, storescu
from tests.test_cli import radbridge
from tests.waiting import wait_for_listener, wait_until

HOURS_AGO = time.time() - 2 * 3600  # well past the grace period


@pytest.fixture(autouse=True)
def _dcmtk() -> None:
    require_dcmtk()


def keys_by_sop(eng: RunningEngine) -> dict[str, str]:
    with eng.db.read_session() as s:
        return {i.sop_instance_uid: i.storage_key for i in s.execute(select(Instance)).scalars()}


def place(studies: Path, obj: Obj, *, digest: str | None = None, modified: float | None = None) -> str:
    """Put ``obj``'s file where the SCP would have renamed it (``digest``: under another checksum,
    as an older revision would be), without an index row; returns its key."""
    data = obj.path.read_bytes()
    key = storage_key(obj.study_uid, obj.series_uid, obj.sop_uid, digest or hashlib.sha256(data).hexdigest())
    path = studies / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if modified is not None:
        os.utime(path, (modified, modified))
    return key


def cli_env(workdir: Path, db_url: str) -> dict[str, str]:
    return {"RADBRIDGE_STORAGE_DIR": str(workdir / "var"), "RADBRIDGE_DATABASE_URL": db_url,
            "RADBRIDGE_CHANNELS_DIR": str(workdir / "channels"), "RADBRIDGE_MAPPINGS_DIR": str(workdir / "mappings")}


@pytest.fixture
def stored(workdir: Path, db_url: str, tmp_path: Path) -> Iterator[tuple[list[Obj], dict[str, str]]]:
    """Four instances stored by storescu into an engine that is then stopped."""
    eng = start_dicom_engine(workdir, db_url)
    try:
        study, series = generate_uid(), generate_uid()
        objs = [make_instance(tmp_path / "in" / f"{i}.dcm", accession="CHK", study_uid=study, series_uid=series,
                              number=i + 1) for i in range(4)]
        proc = storescu(eng.dicom_port, [o.path for o in objs])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        keys = keys_by_sop(eng)
    finally:
        eng.stop()
    yield objs, keys


def test_storage_check_reports_index_against_files_and_repair_sets_orphans_aside(
        workdir: Path, db_url: str, tmp_path: Path, stored: tuple[list[Obj], dict[str, str]]) -> None:
    objs, keys = stored
    env = cli_env(workdir, db_url)
    studies = workdir / "var" / "studies"
    clean = radbridge("storage", "check", env=env, cwd=workdir)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "radbridge storage check: 4 file(s), 4 instance(s): clean" in clean.stdout

    missing = keys[objs[0].sop_uid]
    (studies / missing).unlink()
    changed = keys[objs[1].sop_uid]
    data = bytearray((studies / changed).read_bytes())
    data[-100] ^= 0xFF  # one pixel byte: same size, other content
    (studies / changed).write_bytes(bytes(data))
    series = objs[0]
    never = place(studies, make_instance(tmp_path / "never.dcm", study_uid=series.study_uid,
                                         series_uid=series.series_uid), modified=HOURS_AGO)
    old_revision = place(studies, objs[2], digest="0" * 64, modified=HOURS_AGO)
    young = place(studies, make_instance(tmp_path / "young.dcm", study_uid=series.study_uid,
                                         series_uid=series.series_uid))  # maybe still on its way into the index

    out = radbridge("storage", "check", env=env, cwd=workdir)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith(f"missing   {missing}  (instance {objs[0].sop_uid} of study ") for line in lines)
    assert any(line.startswith(f"checksum  {changed}  (instance {objs[1].sop_uid}: ") for line in lines)
    assert any(line.startswith(f"orphaned  {never}  (") for line in lines)
    assert any(line.startswith(f"orphaned  {old_revision}  (") for line in lines)
    assert young not in out.stdout
    assert lines[-1] == ("radbridge storage check: 6 file(s), 4 instance(s): 2 orphaned, 1 missing, 1 checksum wrong; "
                         "1 unreferenced file(s) younger than 600 s not judged")
    assert (studies / never).exists()  # reported, not touched

    repaired = radbridge("storage", "check", "--repair", env=env, cwd=workdir)
    assert repaired.returncode == 1, repaired.stdout + repaired.stderr
    orphaned = workdir / "var" / "orphaned"
    for key in (never, old_revision):
        assert not (studies / key).exists() and (orphaned / key).exists()
        assert f"; moved to {orphaned / key})" in repaired.stdout
    assert (studies / young).exists()
    assert "2 orphaned (moved aside), 1 missing, 1 checksum wrong" in repaired.stdout

    again = radbridge("storage", "check", "--quick", env=env, cwd=workdir)
    assert again.returncode == 1  # what repair cannot mend stays reported
    assert again.stdout.splitlines()[-1] == (
        "radbridge storage check: 4 file(s), 4 instance(s), sizes only: 1 missing; "
        "1 unreferenced file(s) younger than 600 s not judged")
    grace0 = radbridge("storage", "check", "--grace", "0", "--quick", env=env, cwd=workdir)
    assert f"orphaned  {young}  (" in grace0.stdout
    (studies / changed).write_bytes(bytes(data) + b"\x00")  # --quick still sees a size that is not the index's
    sizes = radbridge("storage", "check", "--quick", env=env, cwd=workdir)
    assert any(line.startswith(f"checksum  {changed}  (instance {objs[1].sop_uid}: ") for line in sizes.stdout.splitlines())


def test_engine_start_sets_aside_files_a_crash_left_unindexed(
        workdir: Path, db_url: str, tmp_path: Path, stored: tuple[list[Obj], dict[str, str]]) -> None:
    """Files renamed into storage whose index rows were never committed (the SCP answered nothing,
    or a failure, so the sender sends them again): the engine sets them aside at start."""
    objs, keys = stored
    studies, orphaned = workdir / "var" / "studies", workdir / "var" / "orphaned"
    never = place(studies, make_instance(tmp_path / "never.dcm", study_uid=objs[0].study_uid,
                                         series_uid=objs[0].series_uid), modified=HOURS_AGO)
    old_revision = place(studies, objs[1], digest="f" * 64, modified=HOURS_AGO)
    young = place(studies, make_instance(tmp_path / "young.dcm"))
    eng = start_dicom_engine(workdir, db_url)
    try:
        wait_until(lambda: (orphaned / never).exists() and (orphaned / old_revision).exists(), timeout=30,
                   message="the start-up sweep to set the unindexed files aside")
        assert not (studies / never).exists() and not (studies / old_revision).exists()
        assert (studies / young).exists()  # younger than the grace period: left alone
        for key in keys.values():  # the indexed files are where they were
            assert (studies / key).exists()
        # and the engine still serves what it holds
        assert storescu(eng.dicom_port, [objs[0].path]).returncode == 0
    finally:
        eng.stop()


def test_after_a_kill_9_mid_ingest_check_and_repair_leave_index_and_files_agreeing(
        workdir: Path, db_url: str, tmp_path: Path) -> None:
    """A real crash: the engine is killed while a SCU stores instance after instance. Then every
    acknowledged instance is indexed with its file, nothing is missing or changed, and whatever the
    crash left unindexed is an orphan that --repair sets aside (--grace 0: the crash was just now)."""
    dicom, http = free_port(), free_port()
    env = {**os.environ, **cli_env(workdir, db_url), "RADBRIDGE_DICOM_PORT": str(dicom),
           "RADBRIDGE_HTTP_PORT": str(http), "RADBRIDGE_MLLP_PORT": str(free_port()), "RADBRIDGE_API_TOKEN": "t",
           "RADBRIDGE_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", "--config", str(REPO / "config" / "radbridge.toml")],
                            env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    acked: list[str] = []
    template = pydicom.dcmread(make_instance(tmp_path / "t.dcm").path)

    def send_until_the_engine_dies() -> None:
        ae = AE(ae_title="KILLSCU")
        ae.add_requested_context(template.SOPClassUID, template.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", dicom, ae_title="RADBRIDGE")
        assert assoc.is_established
        study, series = generate_uid(), generate_uid()
        for i in range(2000):
            template.StudyInstanceUID, template.SeriesInstanceUID = study, series
            template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            template.InstanceNumber = i + 1
            status = assoc.send_c_store(template)
            if not assoc.is_established or "Status" not in status:
                return
            if status.Status == 0:
                acked.append(str(template.SOPInstanceUID))
        assoc.release()

    try:
        wait_for_listener(dicom, proc, what="the engine", timeout=60)
        sender = threading.Thread(target=send_until_the_engine_dies, daemon=True)
        sender.start()
        wait_until(lambda: len(acked) >= 30, timeout=60, message="30 instances acknowledged")
        proc.send_signal(signal.SIGKILL)
        sender.join(60)
        assert not sender.is_alive()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)

    out = radbridge("storage", "check", "--grace", "0", env=cli_env(workdir, db_url), cwd=workdir)
    assert "missing" not in out.stdout and "checksum" not in out.stdout, out.stdout
    assert out.returncode in (0, 1) and (out.returncode == 0) == ("orphaned" not in out.stdout), out.stdout
    repaired = radbridge("storage", "check", "--grace", "0", "--repair", env=cli_env(workdir, db_url), cwd=workdir)
    assert repaired.returncode == out.returncode, repaired.stdout
    after = radbridge("storage", "check", "--grace", "0", env=cli_env(workdir, db_url), cwd=workdir)
    assert after.returncode == 0 and after.stdout.rstrip().endswith(": clean"), after.stdout
    eng = create_engine(db_url)
    with eng.connect() as conn:
        indexed = set(conn.execute(select(Instance.sop_instance_uid)).scalars())
    eng.dispose()
    assert set(acked) <= indexed
