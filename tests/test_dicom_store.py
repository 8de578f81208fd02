"""C-ECHO and C-STORE against the running engine with dcmtk's echoscu/storescu (and pynetdicom as
an SCU where a test must craft what dcmtk will not send): files on disk, index, statuses."""

from __future__ import annotations

import hashlib
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import UID, generate_uid
from pynetdicom import AE, _config
from sqlalchemy import select

from engine.store.models import DomainEvent, Instance, Series, Study
from tests.conftest import RunningEngine, make_settings, start_dicom_engine
from tests.dicomutil import (
    RawStoreSCU,
    bundled,
    data_store_file,
    make_instance,
    propose,
    require_dcmtk,
    run,
    storescu,
)
from tests.waiting import wait_until


@pytest.fixture(autouse=True)
def _dcmtk() -> None:
    require_dcmtk()


start = start_dicom_engine


@pytest.fixture
def sqlite_engine(workdir: Path) -> Iterator[RunningEngine]:
    eng = start(workdir, f"sqlite:///{workdir / 'var' / 'radbridge.db'}")
    try:
        yield eng
    finally:
        eng.stop()


def instances(eng: RunningEngine, sop_uid: str) -> list[Instance]:
    with eng.db.read_session() as s:
        return list(s.execute(select(Instance).where(Instance.sop_instance_uid == sop_uid)).scalars())


def stored_path(eng: RunningEngine, inst: Instance) -> Path:
    return Path(eng.settings.storage.dir) / "studies" / inst.storage_key


def pynetdicom_store(port: int, path: Path, *, chunked: bool = False) -> int:
    """Send one file with pynetdicom as the SCU; with ``chunked`` the command's UIDs come from the
    file meta, not the dataset (how a mismatch between them reaches the SCP)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = chunked
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="RADBRIDGE")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(path if chunked else pydicom.dcmread(path))
            return int(status.Status)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def test_echo_and_called_aet_check(sqlite_engine: RunningEngine) -> None:
    port = sqlite_engine.dicom_port
    assert run(["echoscu", "-aec", "RADBRIDGE", "127.0.0.1", str(port)]).returncode == 0
    wrong = run(["echoscu", "-aec", "SOMEONE", "127.0.0.1", str(port)])
    assert wrong.returncode != 0
    assert "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr


def test_store_writes_file_as_received_and_indexes_it(workdir: Path, db_url: str, tmp_path: Path) -> None:
    eng = start(workdir, db_url)
    try:
        study = generate_uid()
        ct = make_instance(tmp_path / "in" / "ct1.dcm", study_uid=study, accession="ACC-1", name="Müller^Jörg",
                           patient_id="MRN1", edit=lambda ds: setattr(ds, "SpecificCharacterSet", "ISO_IR 100"))
        ct2 = make_instance(tmp_path / "in" / "ct2.dcm", study_uid=study, series_uid=ct.series_uid, accession="ACC-1",
                            patient_id="MRN1", number=2)
        mr = make_instance(tmp_path / "in" / "mr.dcm", source=bundled("MR_small.dcm"), study_uid=study,
                           accession="ACC-1", patient_id="MRN1")
        proc = storescu(eng.dicom_port, [ct.path, ct2.path, mr.path])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        [inst] = instances(eng, ct.sop_uid)
        path = stored_path(eng, inst)
        # layout derived from the UIDs, checksum recorded and true
        assert path.parent.name == ct.series_uid and path.parent.parent.name == study
        assert path.name.startswith(ct.sop_uid + ".") and path.suffix == ".dcm"
        data = path.read_bytes()
        assert inst.sha256 == hashlib.sha256(data).hexdigest() and inst.size_bytes == len(data)
        assert data[128:132] == b"DICM"
        back, sent = pydicom.dcmread(path), pydicom.dcmread(ct.path)
        assert back.file_meta.MediaStorageSOPInstanceUID == ct.sop_uid
        assert back.file_meta.TransferSyntaxUID == inst.transfer_syntax
        assert back.PixelData == sent.PixelData and back.PatientName == "Müller^Jörg"
        with eng.db.read_session() as s:
            st = s.execute(select(Study).where(Study.study_uid == study)).scalar_one()
            series = s.execute(select(Series).where(Series.study_id == st.id).order_by(Series.id)).scalars().all()
        assert (st.num_series, st.num_instances, st.accession, st.state) == (2, 3, "ACC-1", "receiving")
        assert st.patient_name == "Müller^Jörg" and st.dicom_patient_id == "MRN1"
        assert st.modalities == "CT\\MR"
        assert [x.num_instances for x in series] == [2, 1]
        status, body = eng.api(f"/api/studies?study_uid={study}")
        assert status == 200
        [js] = body["studies"]
        assert js["number_of_series"] == 2 and js["number_of_instances"] == 3
        assert sorted(x["number_of_instances"] for x in js["series"]) == [1, 2]
        status, body = eng.api("/api/studies?accession=ACC-1")
        assert [x["study_uid"] for x in body["studies"]] == [study]
    finally:
        eng.stop()


@pytest.mark.parametrize("name", [
    "693_J2KR.dcm",  # JPEG 2000 lossless
    "MR2_J2KI.dcm",  # JPEG 2000
    "JPEG-LL.dcm",  # JPEG lossless SV1
    "color3d_jpeg_baseline.dcm",  # JPEG baseline, multi-frame
    "emri_small_jpeg_ls_lossless.dcm",  # JPEG-LS
    "OBXXXX1A_rle.dcm",  # RLE
    "OBXXXX1A_expb.dcm",  # explicit VR big endian
    "gdcm-US-ALOKA-16.dcm",  # implicit VR little endian
])
def test_compressed_and_other_syntaxes_are_stored_as_received(sqlite_engine: RunningEngine, tmp_path: Path,
                                                              name: str) -> None:
    src = data_store_file(name)
    obj = make_instance(tmp_path / name, source=src)
    sent_ts = pydicom.dcmread(obj.path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    proc = storescu(sqlite_engine.dicom_port, [obj.path], extra=propose(obj.path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [inst] = instances(sqlite_engine, obj.sop_uid)
    assert inst.transfer_syntax == sent_ts
    stored = pydicom.dcmread(stored_path(sqlite_engine, inst))
    assert stored.file_meta.TransferSyntaxUID == sent_ts
    assert stored.PixelData == pydicom.dcmread(obj.path).PixelData  # not transcoded


def test_deflated_syntax(sqlite_engine: RunningEngine, tmp_path: Path) -> None:
    obj = make_instance(tmp_path / "dfl.dcm", source=bundled("image_dfl.dcm"))
    proc = storescu(sqlite_engine.dicom_port, [obj.path], extra=propose(obj.path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [inst] = instances(sqlite_engine, obj.sop_uid)
    assert inst.transfer_syntax == "1.2.840.10008.1.2.1.99"


@pytest.mark.parametrize("policy", ["ignore", "overwrite", "reject"])
def test_duplicate_policies(workdir: Path, tmp_path: Path, policy: str) -> None:
    eng = start(workdir, f"sqlite:///{workdir / 'var' / 'radbridge.db'}", duplicates=policy)
    try:
        port = eng.dicom_port
        first = make_instance(tmp_path / "a.dcm", name="FIRST^VERSION")
        assert pynetdicom_store(port, first.path) == 0
        [orig] = instances(eng, first.sop_uid)
        # the identical object again (a resend after a lost response) always succeeds, changes nothing
        assert pynetdicom_store(port, first.path) == 0
        [again] = instances(eng, first.sop_uid)
        assert again.sha256 == orig.sha256 and again.duplicates == 1
        changed = make_instance(tmp_path / "b.dcm", name="SECOND^VERSION", study_uid=first.study_uid,
                                series_uid=first.series_uid, sop_uid=first.sop_uid)
        status = pynetdicom_store(port, changed.path)
        [now] = instances(eng, first.sop_uid)
        files = sorted(p.name for p in stored_path(eng, now).parent.iterdir())
        with eng.db.read_session() as s:
            kinds = [e.kind for e in s.execute(select(DomainEvent).order_by(DomainEvent.id)).scalars()]
            st = s.execute(select(Study).where(Study.study_uid == first.study_uid)).scalar_one()
        assert st.num_instances == 1
        if policy == "ignore":
            assert status == 0 and now.sha256 == orig.sha256
            assert pydicom.dcmread(stored_path(eng, now)).PatientName == "FIRST^VERSION"
            assert "instance.duplicate_ignored" in kinds and len(files) == 1
        elif policy == "overwrite":
            assert status == 0 and now.sha256 != orig.sha256
            assert pydicom.dcmread(stored_path(eng, now)).PatientName == "SECOND^VERSION"
            assert "instance.overwritten" in kinds
            assert files == [Path(now.storage_key).name]  # the replaced file is gone
        else:
            assert status == 0x0111 and now.sha256 == orig.sha256
            assert "instance.duplicate_rejected" in kinds and len(files) == 1
    finally:
        eng.stop()


def test_bad_datasets_get_specific_failure_statuses(sqlite_engine: RunningEngine, tmp_path: Path) -> None:
    port = sqlite_engine.dicom_port
    no_study = make_instance(tmp_path / "nostudy.dcm", edit=lambda ds: delattr(ds, "StudyInstanceUID"))
    assert pynetdicom_store(port, no_study.path) == 0xA900
    bad_uid = make_instance(tmp_path / "baduid.dcm", series_uid="1.2.3.abc")
    assert pynetdicom_store(port, bad_uid.path) == 0xC002
    # the SOP class in the dataset is not the one the command (and context) named
    wrong_class = make_instance(tmp_path / "wrongclass.dcm")
    ds = pydicom.dcmread(wrong_class.path)
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.4")  # MR Image Storage
    ds.save_as(wrong_class.path)  # not enforce_file_format: that would put the dataset's class back
    assert pydicom.dcmread(wrong_class.path).file_meta.MediaStorageSOPClassUID.endswith(".4")
    assert pynetdicom_store(port, wrong_class.path, chunked=True) == 0xA900
    for obj in (no_study, bad_uid, wrong_class):
        assert instances(sqlite_engine, obj.sop_uid) == []
    # the listener is still fine
    ok = make_instance(tmp_path / "ok.dcm")
    assert pynetdicom_store(port, ok.path) == 0
    status, body = sqlite_engine.api("/api/channels")
    dicom = next(c for c in body["channels"] if c["name"] == "dicom")
    assert dicom["counters"]["instances"] == {"stored": 1.0, "invalid": 3.0}


def test_storescu_reports_the_failure(sqlite_engine: RunningEngine, tmp_path: Path) -> None:
    obj = make_instance(tmp_path / "baduid.dcm", series_uid="1.2.3.abc")
    proc = storescu(sqlite_engine.dicom_port, [obj.path], extra=["-d"])  # -d: show the status and comment
    out = proc.stdout + proc.stderr
    assert "c002" in out.lower()  # the status, as storescu prints the response
    assert "[SeriesInstanceUID is not a valid UID: '1.2.3.abc']" in out  # the Error Comment


def test_below_free_space_floor_answers_out_of_resources(workdir: Path, tmp_path: Path) -> None:
    eng = start(workdir, f"sqlite:///{workdir / 'var' / 'radbridge.db'}", min_free_mb=10**9)
    try:
        obj = make_instance(tmp_path / "x.dcm")
        assert pynetdicom_store(eng.dicom_port, obj.path) == 0xA700
        assert instances(eng, obj.sop_uid) == []
        status, body = eng.api("/health", token=None)
        assert status == 503 and "free-space floor" in body["checks"]["storage"]
    finally:
        eng.stop()


def test_calling_aet_restriction(workdir: Path, tmp_path: Path) -> None:
    eng = start(workdir, f"sqlite:///{workdir / 'var' / 'radbridge.db'}", allowed_calling_aets=["CT1"])
    try:
        obj = make_instance(tmp_path / "x.dcm")
        refused = storescu(eng.dicom_port, [obj.path], calling="INTRUDER")
        assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
        assert instances(eng, obj.sop_uid) == []
        assert storescu(eng.dicom_port, [obj.path], calling="CT1").returncode == 0
        [inst] = instances(eng, obj.sop_uid)
        assert inst.calling_aet == "CT1"
    finally:
        eng.stop()


def test_database_outage_means_not_stored_then_resend_works(pg_url: str, workdir: Path, tmp_path: Path) -> None:
    from sqlalchemy import create_engine, text
    eng = start(workdir, pg_url)
    try:
        obj = make_instance(tmp_path / "x.dcm")
        dbname = pg_url.rsplit("/", 1)[1]
        admin = create_engine(pg_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false'))
            c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"), {"d": dbname})
        try:
            assert pynetdicom_store(eng.dicom_port, obj.path) == 0x0110
        finally:
            with admin.connect() as c:
                c.execute(text(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true'))
            admin.dispose()
        assert instances(eng, obj.sop_uid) == []
        assert pynetdicom_store(eng.dicom_port, obj.path) == 0  # the modality's retry
        [inst] = instances(eng, obj.sop_uid)
        assert stored_path(eng, inst).exists()
    finally:
        eng.stop()


def test_study_becomes_stable_and_reopens(workdir: Path, tmp_path: Path) -> None:
    settings = make_settings(workdir, f"sqlite:///{workdir / 'var' / 'radbridge.db'}")
    settings.dicom.stable_seconds = 0.5
    eng = RunningEngine(settings).start()
    try:
        first = make_instance(tmp_path / "1.dcm", accession="STAB1")
        assert storescu(eng.dicom_port, [first.path]).returncode == 0

        def study() -> Study:
            with eng.db.read_session() as s:
                return s.execute(select(Study).where(Study.study_uid == first.study_uid)).scalar_one()

        def events() -> list[str]:  # those of stability (reconciliation adds its own: test_reconciliation)
            with eng.db.read_session() as s:
                return [e.kind for e in s.execute(select(DomainEvent).where(
                    DomainEvent.kind.in_(["study.stable", "study.reopened"])).order_by(DomainEvent.id)).scalars()]

        wait_until(lambda: study().state == "stable", timeout=20, interval=0.1,
                   message="the study to become stable (stable_seconds 0.5)")
        assert study().state == "stable" and study().times_stable == 1
        assert events() == ["study.stable"]
        late = make_instance(tmp_path / "2.dcm", study_uid=first.study_uid, series_uid=first.series_uid, number=2)
        assert storescu(eng.dicom_port, [late.path]).returncode == 0
        assert events()[:2] == ["study.stable", "study.reopened"]
        wait_until(lambda: study().times_stable >= 2, timeout=20, interval=0.1,
                   message="the reopened study to become stable again")
        st = study()
        assert st.state == "stable" and st.times_stable == 2 and st.num_instances == 2
        assert events() == ["study.stable", "study.reopened", "study.stable"]
        status, body = eng.api(f"/api/studies?study_uid={first.study_uid}")
        assert [e["kind"] for e in body["studies"][0]["events"] if e["kind"] in ("study.stable", "study.reopened")] \
            == events()
    finally:
        eng.stop()


def closed_by_peer(sock: socket.socket) -> bool:
    """True when the other side closed ``sock`` (EOF or reset) before its timeout."""
    try:
        return sock.recv(16) == b""
    except ConnectionResetError:
        return True


def test_connections_that_never_associate_are_closed_soon_and_a_modality_gets_in(workdir: Path) -> None:
    """Issue 14 item 8: raw TCP connections that never send an A-ASSOCIATE-RQ held every association
    slot for acse_timeout_seconds (30 s: "Local Limit Exceeded" for everyone); they are closed after
    association_request_timeout_seconds."""
    eng = start(workdir, f"sqlite:///{workdir / 'var' / 'radbridge.db'}", max_associations=4,
                association_request_timeout_seconds=1)
    silent = [socket.create_connection(("127.0.0.1", eng.dicom_port), timeout=20) for _ in range(4)]
    try:
        assert all(closed_by_peer(s) for s in silent)
        assert run(["echoscu", "-aec", "RADBRIDGE", "127.0.0.1", str(eng.dicom_port)]).returncode == 0
    finally:
        for s in silent:
            s.close()
        eng.stop()


def test_series_uid_of_another_study_is_refused_not_merged(workdir: Path, db_url: str, tmp_path: Path) -> None:
    """A modality reusing a Series Instance UID under a new study: the instance is refused with a
    Cxxx status and a comment that says why; the first study keeps its series, no study is made."""
    eng = start(workdir, db_url)
    try:
        first = make_instance(tmp_path / "first.dcm", accession="SER-A")
        clash = make_instance(tmp_path / "clash.dcm", accession="SER-B", series_uid=first.series_uid)
        assert clash.study_uid != first.study_uid
        ok = storescu(eng.dicom_port, [first.path], extra=["-d"])
        assert ok.returncode == 0, ok.stdout + ok.stderr
        refused = storescu(eng.dicom_port, [clash.path], extra=["-d"])
        out = refused.stdout + refused.stderr
        assert "c409" in out.lower(), out
        assert "[SeriesInstanceUID already belongs to another study]" in out
        assert instances(eng, clash.sop_uid) == []
        with eng.db.read_session() as s:
            studies = {st.study_uid: st for st in s.execute(select(Study)).scalars()}
            series = s.execute(select(Series).where(Series.series_uid == first.series_uid)).scalar_one()
        assert set(studies) == {first.study_uid}  # the clash made no study of its own
        st = studies[first.study_uid]
        assert (st.num_series, st.num_instances) == (1, 1) and series.study_id == st.id and series.num_instances == 1
        # nothing of the refused instance stays on disk
        assert not any(Path(eng.settings.storage.dir, "studies").rglob(f"{clash.sop_uid}.*"))
        status, body = eng.api("/api/channels")
        dicom = next(c for c in body["channels"] if c["name"] == "dicom")
        assert dicom["counters"]["instances"] == {"stored": 1.0, "uid_conflict": 1.0}
    finally:
        eng.stop()


def test_overwrite_never_moves_an_instance_to_another_study(workdir: Path, tmp_path: Path) -> None:
    """duplicates: overwrite takes new content for a SOP Instance UID, but not new content that
    names another study or series: the index row could not follow it there."""
    eng = start(workdir, f"sqlite:///{workdir / 'var' / 'radbridge.db'}", duplicates="overwrite")
    try:
        first = make_instance(tmp_path / "a.dcm", accession="OVR-A")
        assert pynetdicom_store(eng.dicom_port, first.path) == 0
        moved = make_instance(tmp_path / "b.dcm", accession="OVR-B", sop_uid=first.sop_uid)
        assert pynetdicom_store(eng.dicom_port, moved.path) == 0xC409
        [inst] = instances(eng, first.sop_uid)
        assert pydicom.dcmread(stored_path(eng, inst)).StudyInstanceUID == first.study_uid
        assert not [p for p in Path(eng.settings.storage.dir, "studies").rglob(f"*/{moved.study_uid}/*") if p.is_file()]
    finally:
        eng.stop()


MB = 1024 * 1024


def temp_files(eng: RunningEngine) -> list[tuple[str, int]]:
    """The received-data files in var/tmp (pynetdicom's tmp*.dcm) with their sizes."""
    found = []
    for p in Path(eng.settings.storage.dir, "tmp").glob("tmp*.dcm"):
        try:
            found.append((p.name, p.stat().st_size))
        except FileNotFoundError:  # deleted between listing and stat
            pass
    return found


@pytest.mark.parametrize("ending", ["abort", "drop", "stall"])
def test_an_interrupted_transfer_leaves_no_temporary_file(workdir: Path, tmp_path: Path, ending: str) -> None:
    """A C-STORE cut off half way (the SCU sends A-ABORT, its TCP connection just closes, or it
    stops sending and the association times out): the partial file pynetdicom was writing is
    deleted then, not at the next restart."""
    timeout: dict[str, Any] = {"network_timeout_seconds": 1} if ending == "stall" else {}  # else only the ending can delete it
    eng = start(workdir, f"sqlite:///{workdir / 'var' / 'radbridge.db'}", **timeout)
    try:
        scu = RawStoreSCU(eng.dicom_port)
        scu.begin(generate_uid(), 64 * MB)
        scu.send(8 * MB)
        wait_until(lambda: any(size >= 4 * MB for _name, size in temp_files(eng)), timeout=20,
                   message="the partial file to be written")
        if ending == "abort":
            scu.abort()
        elif ending == "drop":
            scu.drop()
        wait_until(lambda: not temp_files(eng), timeout=20, message="the partial file to be deleted")
        scu.drop()
        ok = make_instance(tmp_path / "ok.dcm")  # the listener is fine
        assert storescu(eng.dicom_port, [ok.path]).returncode == 0
        assert not temp_files(eng)
    finally:
        eng.stop()


def test_leftover_temporary_files_are_deleted_at_start(workdir: Path) -> None:
    tmp = workdir / "var" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "tmpab12cd.dcm").write_bytes(b"\x00" * 1024)  # a crash mid-transfer
    eng = start(workdir, f"sqlite:///{workdir / 'var' / 'radbridge.db'}")
    try:
        assert not temp_files(eng)
    finally:
        eng.stop()


def test_free_space_is_checked_while_receiving(workdir: Path) -> None:
    """The floor is checked as the data arrives: when free space falls below it mid-transfer the
    partial file is deleted at once (the rest is read and dropped), and the C-STORE is answered
    A700. It was checked only before and after, so a large instance could fill the disk."""
    floor_mb = shutil.disk_usage(workdir).free // MB - 8  # 8 MB above the floor now
    eng = start(workdir, f"sqlite:///{workdir / 'var' / 'radbridge.db'}", min_free_mb=floor_mb)
    try:
        sop_uid = generate_uid()
        scu = RawStoreSCU(eng.dicom_port)
        scu.begin(sop_uid, 96 * MB)
        scu.send(80 * MB)  # far past the floor; the SCP has read nearly all of it when this returns
        wait_until(lambda: not temp_files(eng), timeout=20,
                   message="the partial file to be deleted while the transfer goes on")
        rsp = scu.finish()
        scu.release()
        assert rsp.Status == 0xA700 and "free space" in rsp.ErrorComment, rsp
        assert instances(eng, sop_uid) == [] and not temp_files(eng)
    finally:
        eng.stop()


def test_associations_share_the_supported_contexts_and_each_negotiates_its_own(sqlite_engine: RunningEngine,
                                                                                 tmp_path: Path) -> None:
    """Each association gets the server's supported contexts as they are (no deep copy per association:
    ~0.2 s of CPU each); negotiating one association changes nothing another sees."""
    import copy

    from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

    from engine.connectors.dicom.channel import DicomConnector
    from engine.connectors.dicom.contexts import SharedContexts

    server = sqlite_engine.engine.connector("dicom", DicomConnector).listener._server
    assert isinstance(server.contexts, SharedContexts)
    before = [(str(cx.abstract_syntax), list(cx.transfer_syntax), cx.scu_role, cx.scp_role) for cx in server.contexts]
    given = copy.deepcopy(server.contexts)
    assert given is not server.contexts and all(a is b for a, b in zip(given, server.contexts, strict=True))
    for sop_class, syntax in ((CTImageStorage, "1.2.840.10008.1.2.4.50"), (MRImageStorage, "1.2.840.10008.1.2.1")):
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(sop_class, [syntax])
        assoc = ae.associate("127.0.0.1", sqlite_engine.dicom_port, ae_title="RADBRIDGE")
        try:
            assert assoc.is_established
            [cx] = assoc.accepted_contexts
            assert (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) == (str(sop_class), syntax)
        finally:
            assoc.release()
    after = [(str(cx.abstract_syntax), list(cx.transfer_syntax), cx.scu_role, cx.scp_role) for cx in server.contexts]
    assert after == before
    obj = make_instance(tmp_path / "x.dcm")
    assert storescu(sqlite_engine.dicom_port, [obj.path]).returncode == 0
    assert len(instances(sqlite_engine, obj.sop_uid)) == 1


def test_a_failed_fsync_of_the_received_file_is_out_of_resources_and_not_indexed(
        sqlite_engine: RunningEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file's fsync runs beside its checksum and the header parse: when it fails the C-STORE is
    answered A700 with the reason and nothing is indexed; the same instance sent again is stored."""
    import errno

    from engine.storage.local import LocalStorage

    def failing_flush(self: LocalStorage, source: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    obj = make_instance(tmp_path / "x.dcm")
    ds = pydicom.dcmread(obj.path)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID)
    with monkeypatch.context() as m:
        m.setattr(LocalStorage, "flush", failing_flush)
        assoc = ae.associate("127.0.0.1", sqlite_engine.dicom_port, ae_title="RADBRIDGE")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
    assert int(status.Status) == 0xA700
    assert status.ErrorComment == "storage error: Input/output error"
    assert instances(sqlite_engine, obj.sop_uid) == []
    assert not list((Path(sqlite_engine.settings.storage.dir) / "studies").rglob(f"{obj.sop_uid}.*"))
    assert pynetdicom_store(sqlite_engine.dicom_port, obj.path) == 0
    [inst] = instances(sqlite_engine, obj.sop_uid)
    assert pydicom.dcmread(stored_path(sqlite_engine, inst)).PixelData == ds.PixelData


def test_pynetdicom_logging_handlers_are_not_bound_and_its_warnings_still_show(
        sqlite_engine: RunningEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """pynetdicom's standard handlers (INFO/DEBUG lines the engine does not show) are not run for every
    PDU and DIMSE message; what pynetdicom logs at WARNING and above still reaches the log."""
    from pynetdicom import evt

    from engine.connectors.dicom.channel import DicomConnector

    server = sqlite_engine.engine.connector("dicom", DicomConnector).listener._server
    events = (evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT)
    bound = {getattr(h[0] if isinstance(h, tuple) else h, "__name__", "") for e in events
             for h in server.get_handlers(e)}
    assert not {name for name in bound if name.startswith("standard_")}
    assert "_on_pdu" in bound  # the engine's own (free space while receiving) is still there
    obj = make_instance(tmp_path / "x.dcm")
    assert storescu(sqlite_engine.dicom_port, [obj.path]).returncode == 0
    with socket.create_connection(("127.0.0.1", sqlite_engine.dicom_port), timeout=10) as sock:
        sock.sendall(b"\x01\x00\x00\x00\x00\x02ab")  # an A-ASSOCIATE-RQ too short to decode
        wait_until(lambda: closed_by_peer(sock), timeout=30)
    assert any(r.name.startswith("pynetdicom") and r.levelname in ("WARNING", "ERROR") for r in caplog.records)
