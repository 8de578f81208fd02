"""STOW-RS (issue 17 item 1): POST /dicomweb/studies[/{study}] against a running engine over real HTTP,
with dicomweb-client's store_instances and hand-built multipart bodies; what was stored is found with
dcmtk's findscu and QIDO-RS, on disk and in the index, after a kill -9 too. Expected values come from
the files sent (pydicom)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from engine.dicom import status as S
from engine.store.models import AuditEvent, Instance, Study
from engine.store.tokens import Role, config_token_name
from tests.conftest import TOKEN, RunningEngine, make_settings, start_dicom_engine
from tests.dicomutil import Obj, findscu, make_instance, propose, require_dcmtk, storescu
from tests.processes import EngineProcess
from tests.test_reconciliation import settle
from tests.test_roles import create_tokens

DICOM_MULTIPART = 'multipart/related; type="application/dicom"; boundary={}'
REFERENCED, FAILED, REASON, RETRIEVE_URL = "00081199", "00081198", "00081197", "00081190"
SOP_CLASS, SOP_INSTANCE = "00081150", "00081155"


@pytest.fixture(autouse=True)
def _dcmtk() -> None:
    require_dcmtk()


@pytest.fixture
def engine(dicom_engine: RunningEngine) -> RunningEngine:
    return dicom_engine


def base(eng: RunningEngine) -> str:
    return f"http://127.0.0.1:{eng.engine.http_port}/dicomweb"


def multipart(parts: list[bytes], boundary: str | None = None) -> tuple[bytes, str]:
    """A multipart/related body of application/dicom parts, and its Content-Type."""
    boundary = boundary or secrets.token_hex(12)
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts)
    return body + b"--" + boundary.encode() + b"--\r\n", DICOM_MULTIPART.format(boundary)


def post(eng: RunningEngine, parts: list[bytes], *, study: str | None = None, token: str | None = TOKEN,
         ctype: str | None = None) -> requests.Response:
    body, default_type = multipart(parts)
    headers = {"Content-Type": ctype or default_type, "Accept": "application/dicom+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = base(eng) + "/studies" + (f"/{study}" if study else "")
    return requests.post(url, data=body, headers=headers, timeout=60)


def instances(tmp: Path, n: int, study_uid: str | None = None, **kw: Any) -> list[Obj]:
    first = make_instance(tmp / "i0.dcm", study_uid=study_uid, **kw)
    rest = [make_instance(tmp / f"i{i}.dcm", study_uid=first.study_uid, series_uid=first.series_uid, number=i + 1,
                          **kw) for i in range(1, n)]
    return [first, *rest]


def indexed(eng: RunningEngine, study_uid: str) -> dict[str, str]:
    """SOP Instance UID -> storage key of the study's indexed instances."""
    with eng.db.read_session() as s:
        rows = s.execute(select(Instance.sop_instance_uid, Instance.storage_key).join(Study, Study.id == Instance.study_id)
                         .where(Study.study_uid == study_uid)).all()
    return {r[0]: r[1] for r in rows}


def items(answer: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return list(answer.get(tag, {}).get("Value", []))


def uids(seq: list[dict[str, Any]]) -> set[str]:
    return {i[SOP_INSTANCE]["Value"][0] for i in seq if "Value" in i.get(SOP_INSTANCE, {})}


def client(eng: RunningEngine, token: str = TOKEN) -> tuple[DICOMwebClient, list[int]]:
    """dicomweb-client on the engine's /dicomweb/, and the HTTP statuses it got."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    statuses: list[int] = []
    session.hooks["response"].append(lambda r, *_a, **_k: statuses.append(r.status_code))
    return DICOMwebClient(url=base(eng), session=session), statuses


def test_dicomweb_client_stores_instances_found_by_cfind_qido_on_disk_and_audited(
        engine: RunningEngine, tmp_path: Path) -> None:
    objs = instances(tmp_path / "a", 3, patient_id="STW1", name="STOW^ANNA", accession="SW1")
    other = make_instance(tmp_path / "b.dcm", patient_id="STW2", name="STOW^BEN", accession="SW2")
    web, statuses = client(engine)
    answer = web.store_instances([pydicom.dcmread(o.path) for o in [*objs, other]])
    assert statuses == [200]
    referenced = answer.get("ReferencedSOPSequence", [])
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced} == {o.sop_uid for o in [*objs, other]}
    assert not answer.get("FailedSOPSequence")
    for item in referenced:
        obj = next(o for o in [*objs, other] if o.sop_uid == item.ReferencedSOPInstanceUID)
        assert item.RetrieveURL == (f"{base(engine)}/studies/{obj.study_uid}/series/{obj.series_uid}"
                                    f"/instances/{obj.sop_uid}")
        assert item.ReferencedSOPClassUID == pydicom.dcmread(obj.path).SOPClassUID
    # C-FIND (dcmtk findscu) finds them
    proc, found = findscu(engine.dicom_port, "IMAGE", [f"StudyInstanceUID={objs[0].study_uid}", "SOPInstanceUID"],
                          out_dir=tmp_path / "find")
    assert proc.returncode == 0, proc.stderr
    assert {str(d.SOPInstanceUID) for d in found} == {o.sop_uid for o in objs}
    # QIDO-RS finds them
    qido = web.search_for_instances(study_instance_uid=objs[0].study_uid)
    assert {i["00080018"]["Value"][0] for i in qido} == {o.sop_uid for o in objs}
    # each on disk, byte for byte what was sent
    storage = engine.engine.storage
    assert storage is not None
    keys = indexed(engine, objs[0].study_uid)
    for o in objs:
        stored = storage.local_path(keys[o.sop_uid])
        assert stored is not None and stored.read_bytes() == o.path.read_bytes()
    # no spool file is left behind
    assert list((Path(engine.settings.storage.dir) / "tmp").glob("tmp*.dcm")) == []
    # one audit row for the request
    with engine.db.read_session() as s:
        rows = s.execute(select(AuditEvent).where(AuditEvent.action == "store")).scalars().all()
        assert [(r.status, r.count, r.agent, r.study_uid) for r in rows] == [(200, 4, config_token_name(TOKEN), None)]
        linked = s.execute(select(Study.patient_id).where(Study.study_uid.in_([objs[0].study_uid, other.study_uid]),
                                                          Study.patient_id.is_not(None))).scalars()
        assert sorted(rows[0].patient_ids or []) == sorted(linked)


def test_stow_studies_are_reconciled_like_cstore_ones(engine: RunningEngine, tmp_path: Path) -> None:
    """The same kind of study, once by C-STORE and once by STOW-RS: the same index and reconciliation outcome."""
    by_stow = make_instance(tmp_path / "s.dcm", patient_id="STW3", name="SAME^AS", accession="SW3")
    by_cstore = make_instance(tmp_path / "c.dcm", patient_id="STW3", name="SAME^AS", accession="SW3")
    assert post(engine, [by_stow.path.read_bytes()]).status_code == 200
    proc = storescu(engine.dicom_port, [by_cstore.path], extra=propose(by_cstore.path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    settle(engine)
    with engine.db.read_session() as s:
        rows = {st.study_uid: st for st in s.execute(select(Study)).scalars()}
        a, b = rows[by_stow.study_uid], rows[by_cstore.study_uid]
        for col in ("state", "channel", "dicom_patient_id", "accession", "num_instances", "modalities",
                    "patient_id", "recon_state"):
            assert getattr(a, col) == getattr(b, col), col
        assert a.state not in ("receiving",)


def test_a_bad_part_fails_alone_with_its_reason(engine: RunningEngine, tmp_path: Path) -> None:
    good = make_instance(tmp_path / "g.dcm", patient_id="STW4", accession="SW4")
    no_sop = make_instance(tmp_path / "n.dcm", patient_id="STW4", accession="SW4", study_uid=good.study_uid,
                           edit=lambda ds: delattr(ds, "SOPInstanceUID"))
    r = post(engine, [good.path.read_bytes(), b"this is not DICOM at all", no_sop.path.read_bytes()])
    assert r.status_code == 202, r.text
    assert r.headers["Content-Type"].startswith("application/dicom+json")
    answer = r.json()
    assert uids(items(answer, REFERENCED)) == {good.sop_uid}
    failed = items(answer, FAILED)
    assert sorted(f[REASON]["Value"][0] for f in failed) == sorted([S.CANNOT_UNDERSTAND, S.DATASET_MISMATCH])
    missing = next(f for f in failed if f[REASON]["Value"][0] == S.DATASET_MISMATCH)
    assert missing[SOP_CLASS]["Value"] == [str(pydicom.dcmread(no_sop.path).SOPClassUID)]
    assert indexed(engine, good.study_uid).keys() == {good.sop_uid}
    # none stored: 409, with the reasons
    r = post(engine, [b"garbage"])
    assert r.status_code == 409
    assert [f[REASON]["Value"][0] for f in items(r.json(), FAILED)] == [S.CANNOT_UNDERSTAND]


def test_an_instance_of_another_study_fails_under_studies_uid(engine: RunningEngine, tmp_path: Path) -> None:
    mine = make_instance(tmp_path / "m.dcm", patient_id="STW5")
    theirs = make_instance(tmp_path / "t.dcm", patient_id="STW5")
    r = post(engine, [mine.path.read_bytes(), theirs.path.read_bytes()], study=mine.study_uid)
    assert r.status_code == 202, r.text
    answer = r.json()
    assert answer[RETRIEVE_URL]["Value"] == [f"{base(engine)}/studies/{mine.study_uid}"]
    assert uids(items(answer, REFERENCED)) == {mine.sop_uid}
    assert [(f[SOP_INSTANCE]["Value"][0], f[REASON]["Value"][0]) for f in items(answer, FAILED)] == \
        [(theirs.sop_uid, S.DATASET_MISMATCH)]
    assert indexed(engine, theirs.study_uid) == {}


def test_a_series_of_another_study_is_refused_as_cstore_refuses_it(engine: RunningEngine, tmp_path: Path) -> None:
    first = make_instance(tmp_path / "f.dcm", patient_id="STW6")
    clash = make_instance(tmp_path / "c.dcm", patient_id="STW6", series_uid=first.series_uid)
    assert post(engine, [first.path.read_bytes()]).status_code == 200
    r = post(engine, [clash.path.read_bytes()])
    assert r.status_code == 409
    assert [f[REASON]["Value"][0] for f in items(r.json(), FAILED)] == [S.UID_CONFLICT]


@pytest.mark.parametrize(("policy", "second_status", "reason"), [
    ("reject", 409, S.DUPLICATE_SOP_INSTANCE), ("ignore", 200, None), ("overwrite", 200, None)])
def test_duplicates_follow_the_channel_policy(workdir: Path, db_url: str, tmp_path: Path, policy: str,
                                              second_status: int, reason: int | None) -> None:
    eng = start_dicom_engine(workdir, db_url, duplicates=policy)
    try:
        orig = make_instance(tmp_path / "o.dcm", patient_id="STW7")
        changed = make_instance(tmp_path / "x.dcm", patient_id="STW7", study_uid=orig.study_uid,
                                series_uid=orig.series_uid, sop_uid=orig.sop_uid, number=9)
        assert post(eng, [orig.path.read_bytes()]).status_code == 200
        assert post(eng, [orig.path.read_bytes()]).status_code == 200  # the same bytes: a duplicate, stored
        r = post(eng, [changed.path.read_bytes()])
        assert r.status_code == second_status, r.text
        assert [f[REASON]["Value"][0] for f in items(r.json(), FAILED)] == ([reason] if reason else [])
        storage = eng.engine.storage
        assert storage is not None
        key = indexed(eng, orig.study_uid)[orig.sop_uid]
        path = storage.local_path(key)
        assert path is not None
        kept = changed if policy == "overwrite" else orig
        assert path.read_bytes() == kept.path.read_bytes()
    finally:
        eng.stop()


def test_below_the_free_space_floor_every_instance_fails_a700(workdir: Path, db_url: str, tmp_path: Path) -> None:
    eng = start_dicom_engine(workdir, db_url, min_free_mb=1 << 40)  # more than any disk has free
    try:
        objs = instances(tmp_path, 2, patient_id="STW11")
        r = post(eng, [o.path.read_bytes() for o in objs])
        assert r.status_code == 409, r.text
        assert [f[REASON]["Value"][0] for f in items(r.json(), FAILED)] == [S.OUT_OF_RESOURCES] * 2
        assert indexed(eng, objs[0].study_uid) == {}
        assert list((Path(eng.settings.storage.dir) / "tmp").glob("tmp*.dcm")) == []
    finally:
        eng.stop()


def test_refusals_of_the_request_itself(engine: RunningEngine, tmp_path: Path) -> None:
    obj = make_instance(tmp_path / "r.dcm", patient_id="STW8")
    data = obj.path.read_bytes()
    assert post(engine, [data], token=None).status_code == 401
    reader = create_tokens(engine.settings, {"only-read": frozenset({Role.READ}),
                                             "only-store": frozenset({Role.STORE})})
    r = post(engine, [data], token=reader["only-read"])
    assert r.status_code == 403 and r.json()["missing_role"] == "store"
    assert post(engine, [data], ctype="application/dicom").status_code == 415
    assert post(engine, [data], ctype='multipart/related; type="application/dicom+xml"; boundary=x').status_code == 415
    assert post(engine, [data], ctype=DICOM_MULTIPART.format("not-the-boundary")).status_code == 400
    assert indexed(engine, obj.study_uid) == {}
    # a token with only ``store`` stores
    assert post(engine, [data], token=reader["only-store"]).status_code == 200
    assert indexed(engine, obj.study_uid).keys() == {obj.sop_uid}
    with engine.db.read_session() as s:
        statuses = sorted(s.execute(select(AuditEvent.status).where(AuditEvent.action == "store")).scalars())
    assert statuses == [200, 400, 415, 415]


def test_a_body_over_stow_max_bytes_is_413_declared_or_streamed(workdir: Path, db_url: str, tmp_path: Path) -> None:
    settings = make_settings(workdir, db_url)
    settings.http.stow_max_bytes = 64 * 1024
    eng = RunningEngine(settings).start()
    try:
        objs = instances(tmp_path, 4)  # CT_small: ~40 KB each
        body, ctype = multipart([o.path.read_bytes() for o in objs])
        assert len(body) > settings.http.stow_max_bytes
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": ctype}
        url = base(eng) + "/studies"
        assert requests.post(url, data=body, headers=headers, timeout=60).status_code == 413
        chunked = requests.post(url, data=iter([body[i:i + 8192] for i in range(0, len(body), 8192)]),
                                headers=headers, timeout=60)
        assert chunked.status_code == 413
        assert indexed(eng, objs[0].study_uid) == {}
        assert list((Path(settings.storage.dir) / "tmp").glob("tmp*.dcm")) == []
        # under the cap: stored
        body, ctype = multipart([objs[0].path.read_bytes()])
        assert requests.post(url, data=body, headers={**headers, "Content-Type": ctype}, timeout=60).status_code == 200
    finally:
        eng.stop()


def test_an_instance_larger_than_the_http_request_limit_is_streamed_and_stored(
        engine: RunningEngine, tmp_path: Path) -> None:
    """The HTTP server's request size limit (client_max_size) is for bodies read whole; STOW-RS streams."""
    limit = 8 * 1024 * 1024  # build_app's client_max_size (engine/web/app.py)

    def big(ds: pydicom.Dataset) -> None:
        ds.Rows = ds.Columns = 2200
        ds.PixelData = bytes(2200 * 2200 * 2)

    obj = make_instance(tmp_path / "big.dcm", patient_id="STW10", edit=big)
    assert obj.path.stat().st_size > limit
    r = post(engine, [obj.path.read_bytes()])
    assert r.status_code == 200, r.text
    storage = engine.engine.storage
    assert storage is not None
    stored = storage.local_path(indexed(engine, obj.study_uid)[obj.sop_uid])
    assert stored is not None and stored.read_bytes() == obj.path.read_bytes()


def test_every_instance_answered_stored_survives_kill_9(db_url: str, workdir: Path, tmp_path: Path) -> None:
    proc = EngineProcess(workdir, db_url).start()
    answered: set[str] = set()
    study = ""
    try:
        for batch in range(3):
            objs = instances(tmp_path / f"b{batch}", 4, patient_id="STW9", study_uid=study or None)
            study = objs[0].study_uid
            body, ctype = multipart([o.path.read_bytes() for o in objs])
            r = requests.post(f"http://127.0.0.1:{proc.http}/dicomweb/studies", data=body, timeout=60,
                              headers={"Authorization": "Bearer t", "Content-Type": ctype})
            assert r.status_code == 200, r.text
            answered |= uids(items(r.json(), REFERENCED))
        proc.kill()  # right after the last answer
    finally:
        proc.stop()
    assert len(answered) == 12
    restarted = EngineProcess(workdir, db_url)
    restarted.mllp, restarted.http, restarted.dicom = proc.mllp, proc.http, proc.dicom
    restarted.env = proc.env
    restarted.start()
    try:
        eng = create_engine(db_url)
        with Session(eng) as s:
            rows = dict(s.execute(select(Instance.sop_instance_uid, Instance.storage_key)).all())
        eng.dispose()
        assert answered <= rows.keys()
        root = workdir / "var" / "studies"
        for sop in answered:
            assert (root / rows[sop]).is_file(), sop
            assert pydicom.dcmread(root / rows[sop]).SOPInstanceUID == sop
        r = requests.get(f"http://127.0.0.1:{proc.http}/dicomweb/studies/{study}/instances", timeout=30,
                         headers={"Authorization": "Bearer t"})
        assert {i["00080018"]["Value"][0] for i in r.json()} == answered
    finally:
        restarted.stop()

