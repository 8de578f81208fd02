"""Reconciliation scenarios over real sockets: ADT/ORM over MLLP, images with dcmtk's storescu, then
the stored files read back with pydicom, the index, the findings and the order's status.

Stability is driven by the test (stable_seconds set to 0 for one check) rather than by waiting, so
each step is deterministic; the engine's own loops run as in production.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from engine.store.models import DomainEvent, Finding, Instance, InstanceRevision, Order, ReconcileJob, Study
from tests.conftest import TOKEN, RunningEngine, start_dicom_engine
from tests.dicomutil import findscu, make_instance, require_dcmtk, storescu
from tests.hl7util import ack_code, adt, orm, send
from tests.waiting import wait_until


@pytest.fixture(autouse=True)
def _dcmtk() -> None:
    require_dcmtk()


start = start_dicom_engine


@pytest.fixture
def eng(dicom_engine: RunningEngine) -> RunningEngine:
    return dicom_engine


def hl7(e: RunningEngine, *messages: str) -> None:
    for m in messages:
        reply = send(e.mllp_port, m)
        assert ack_code(reply) == "AA", reply


def store(e: RunningEngine, tmp: Path, n: int = 1, **kw: Any) -> Any:
    """Send ``n`` CT instances of one series; returns the last one made (its UIDs)."""
    objs: list[Any] = []
    for i in range(n):
        objs.append(make_instance(tmp / f"{generate_uid()}.dcm", number=i + 1,
                                  series_uid=objs[0].series_uid if objs else kw.pop("series_uid", None), **kw))
        kw.setdefault("study_uid", objs[0].study_uid)
    proc = storescu(e.dicom_port, [o.path for o in objs])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return objs[-1]


def work(e: RunningEngine) -> None:
    """Let the reconciler work the queue (what its loop does within a second)."""
    e.call(e.engine.reconcile_pending())


def settle(e: RunningEngine) -> None:
    """Make every receiving study stable now, then reconcile."""
    work(e)
    e.engine.settings.dicom.stable_seconds = 0
    try:
        e.call(e.engine.check_stability())
    finally:
        e.engine.settings.dicom.stable_seconds = 3600
    work(e)


def study(e: RunningEngine, uid: str) -> Study:
    with e.db.read_session() as s:
        st = s.execute(select(Study).where(Study.study_uid == uid)).scalar_one()
        _ = st.findings
        return st


def findings(e: RunningEngine, uid: str, **where: Any) -> list[Finding]:
    with e.db.read_session() as s:
        stmt = select(Finding).join(Study, Finding.study_id == Study.id).where(Study.study_uid == uid)
        for k, v in where.items():
            stmt = stmt.where(getattr(Finding, k) == v)
        return list(s.execute(stmt.order_by(Finding.id)).scalars())


def order(e: RunningEngine, accession: str) -> Order:
    with e.db.read_session() as s:
        return s.execute(select(Order).where(Order.accession == accession).order_by(Order.id.desc())).scalars().first()


def files(e: RunningEngine, uid: str) -> list[pydicom.Dataset]:
    """The stored files of a study, read back (pixel data included, to compare it)."""
    with e.db.read_session() as s:
        keys = s.execute(select(Instance.storage_key).join(Study, Instance.study_id == Study.id)
                         .where(Study.study_uid == uid).order_by(Instance.instance_number)).scalars().all()
    root = Path(e.settings.storage.dir) / "studies"
    return [pydicom.dcmread(root / k) for k in keys]


def events(e: RunningEngine, uid: str) -> list[str]:
    with e.db.read_session() as s:
        return list(s.execute(select(DomainEvent.kind).join(Study, DomainEvent.study_id == Study.id)
                              .where(Study.study_uid == uid).order_by(DomainEvent.id)).scalars())


def post(e: RunningEngine, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{e.engine.http_port}{path}", data=json.dumps(body).encode(),
                                 method="POST", headers={"Authorization": f"Bearer {TOKEN}",
                                                         "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def original(ds: pydicom.Dataset) -> list[tuple[str, pydicom.Dataset]]:
    """(reason, the values replaced) for each Original Attributes Sequence item."""
    return [(item.ReasonForTheAttributeModification, item.ModifiedAttributesSequence[0])
            for item in ds.get("OriginalAttributesSequence", [])]


# --- scenarios ------------------------------------------------------------------------------------

def test_order_then_images_match_and_complete_the_order(eng: RunningEngine, tmp_path: Path) -> None:
    hl7(eng, adt("A04", "MRN1", "Smith", "John", dob="19800202", sex="M"),
        orm("NW", "PL1", "ACC1", "MRN1", modality="CT"))
    sent = make_instance(tmp_path / "src.dcm")  # the pixel data to compare with
    obj = store(eng, tmp_path, 2, accession="ACC1", patient_id="MRN1", name="SMITH^JOHN", birth_date="19800202",
                sex="M")
    work(eng)  # images received: the order is in progress; the study is not reconciled yet
    assert order(eng, "ACC1").status == "IP"
    assert study(eng, obj.study_uid).recon_state == "pending"
    settle(eng)
    st = study(eng, obj.study_uid)
    o = order(eng, "ACC1")
    assert (st.recon_state, st.matched_by, st.order_id, st.patient_id) == ("reconciled", "accession", o.id,
                                                                           o.patient_id)
    assert o.status == "CM"
    # the name agrees (case is not a difference); only the missing issuer was filled in
    for ds in files(eng, obj.study_uid):
        assert str(ds.PatientName) == "SMITH^JOHN" and ds.PatientID == "MRN1"
        assert ds.IssuerOfPatientID == "GENHOSP"
        [(reason, old)] = original(ds)
        assert reason == "COERCE" and "IssuerOfPatientID" in old and not old.IssuerOfPatientID
        assert ds.PixelData == pydicom.dcmread(sent.path).PixelData
    assert [f.attribute for f in findings(eng, obj.study_uid, kind="mismatch")] == ["IssuerOfPatientID"]
    assert "study.reconciled" in events(eng, obj.study_uid)
    # a completed order leaves the worklist
    proc, mwl = findscu(eng.dicom_port, "", ["AccessionNumber", "ScheduledProcedureStepSequence[0].Modality"],
                        model="-W", out_dir=tmp_path / "mwl")
    assert proc.returncode == 0 and "ACC1" not in [ds.AccessionNumber for ds in mwl]
    status, body = eng.api(f"/api/studies?study_uid={obj.study_uid}")
    rec = body["studies"][0]["reconciliation"]
    assert rec["state"] == "reconciled" and rec["open_findings"] == 0 and rec["queued"] is None


def test_images_before_order_are_unmatched_then_matched_by_the_late_order(eng: RunningEngine,
                                                                           tmp_path: Path) -> None:
    obj = store(eng, tmp_path, accession="ACC2", patient_id="MRN2", name="DOE^JANE", issuer="GENHOSP")
    # a second series whose header disagrees where the index (filled from the first) does not
    store(eng, tmp_path, accession="ACC2", patient_id="MRN2", name="DOE^JAEN", issuer="GENHOSP",
          study_uid=obj.study_uid)
    settle(eng)
    st = study(eng, obj.study_uid)
    assert (st.recon_state, st.patient_id, st.order_id) == ("unmatched", None, None)
    assert {f.kind for f in findings(eng, obj.study_uid, status="open")} == {"order_unknown", "patient_unknown"}
    status, body = eng.api("/api/studies?exceptions=true")
    assert obj.study_uid in [x["study_uid"] for x in body["studies"]]
    hl7(eng, orm("NW", "PL2", "ACC2", "MRN2"))  # creates the patient from its PID, and the order
    work(eng)
    st = study(eng, obj.study_uid)
    o = order(eng, "ACC2")
    assert (st.recon_state, st.matched_by, st.order_id) == ("reconciled", "accession", o.id)
    assert o.status == "CM"  # the study was already stable
    assert findings(eng, obj.study_uid, status="open") == []
    # every file was checked once matched: the second series was corrected, the first left alone
    first, second = sorted(files(eng, obj.study_uid), key=lambda ds: ds.SeriesInstanceUID != obj.series_uid)
    assert str(first.PatientName) == "DOE^JANE" and "OriginalAttributesSequence" not in first
    assert str(second.PatientName) == "Doe^Jane" and str(original(second)[0][1].PatientName) == "DOE^JAEN"
    assert {f.kind for f in findings(eng, obj.study_uid, status="resolved")} >= {"order_unknown", "patient_unknown"}


@pytest.mark.parametrize("policy", ["coerce", "flag"])
def test_name_typo_is_coerced_or_flagged(workdir: Path, db_url: str, tmp_path: Path, policy: str) -> None:
    e = start(workdir, db_url, reconciliation=policy)
    try:
        hl7(e, adt("A04", "MRN3", "Smith", "John", dob="19800202", sex="M"),
            orm("NW", "PL3", "ACC3", "MRN3"))
        obj = store(e, tmp_path, accession="ACC3", patient_id="MRN3", name="SMIHT^JOHN", birth_date="19800202",
                    sex="M", issuer="GENHOSP")
        with e.db.read_session() as s:
            before = s.execute(select(Instance).where(Instance.sop_instance_uid == obj.sop_uid)).scalar_one()
        settle(e)
        st = study(e, obj.study_uid)
        [ds] = files(e, obj.study_uid)
        [f] = findings(e, obj.study_uid, kind="mismatch")
        assert (f.attribute, f.received, f.expected) == ("PatientName", "SMIHT^JOHN", "Smith^John")
        with e.db.read_session() as s:
            after = s.execute(select(Instance).where(Instance.sop_instance_uid == obj.sop_uid)).scalar_one()
            revisions = s.execute(select(InstanceRevision)).scalars().all()
        root = Path(e.settings.storage.dir) / "studies"
        if policy == "coerce":
            assert (st.recon_state, st.patient_name) == ("reconciled", "Smith^John")
            assert str(ds.PatientName) == "Smith^John"
            [(reason, old)] = original(ds)
            assert reason == "COERCE" and str(old.PatientName) == "SMIHT^JOHN"
            assert (f.action, f.status) == ("coerced", "resolved")
            # checksum history: the old file's and the new one's, and only the new file remains
            [rev] = revisions
            assert (rev.old_sha256, rev.new_sha256) == (before.sha256, after.sha256) != (after.sha256, after.sha256)
            assert rev.changes == {"PatientName": ["SMIHT^JOHN", "Smith^John"]}
            assert not (root / before.storage_key).exists() and (root / after.storage_key).exists()
        else:
            assert (st.recon_state, st.patient_name) == ("flagged", "SMIHT^JOHN")
            assert str(ds.PatientName) == "SMIHT^JOHN" and "OriginalAttributesSequence" not in ds
            assert (f.action, f.status) == ("flagged", "open")
            assert after.sha256 == before.sha256 and revisions == []
        assert order(e, "ACC3").status == "CM"
    finally:
        e.stop()


def test_wrong_birth_date_under_reject_quarantines_until_accepted(workdir: Path, db_url: str,
                                                                   tmp_path: Path) -> None:
    e = start(workdir, db_url, reconciliation="reject")
    try:
        hl7(e, adt("A04", "MRN4", "Brown", "Ann", dob="19650505"), orm("NW", "PL4", "ACC4", "MRN4"))
        obj = store(e, tmp_path, accession="ACC4", patient_id="MRN4", name="BROWN^ANN", birth_date="19560505",
                    issuer="GENHOSP")
        settle(e)
        st = study(e, obj.study_uid)
        assert st.recon_state == "quarantined"
        [f] = findings(e, obj.study_uid, kind="mismatch")
        assert (f.attribute, f.received, f.expected, f.action) == ("PatientBirthDate", "19560505", "19650505",
                                                                   "rejected")
        [ds] = files(e, obj.study_uid)
        assert ds.PatientBirthDate == "19560505"  # kept as received
        assert order(e, "ACC4").status == "IP"  # images came, but the study is not accepted
        proc, found = findscu(e.dicom_port, "STUDY", [f"StudyInstanceUID={obj.study_uid}", "PatientID"],
                              out_dir=tmp_path / "q")
        assert proc.returncode == 0 and found == []  # hidden from query/retrieve
        status, _ = e.api(f"/api/findings/{f.id}/accept", method="POST")
        assert status == 200
        status, body = e.api(f"/api/findings/{f.id}/accept", method="POST")
        assert status == 409 and "already accepted" in body["detail"]
        status, body = e.api("/api/findings/999999/accept", method="POST")
        assert status == 404 and "no finding 999999" in body["detail"]
        work(e)
        assert study(e, obj.study_uid).recon_state == "reconciled"
        assert order(e, "ACC4").status == "CM"
        _, found = findscu(e.dicom_port, "STUDY", [f"StudyInstanceUID={obj.study_uid}", "PatientID"],
                           out_dir=tmp_path / "q")
        assert [ds.StudyInstanceUID for ds in found] == [obj.study_uid]
    finally:
        e.stop()


def test_unknown_accession_for_known_patient_is_flagged_until_the_order_arrives(eng: RunningEngine,
                                                                                 tmp_path: Path) -> None:
    hl7(eng, adt("A04", "MRN5", "Green", "Al", dob="19900101", sex="M"))
    obj = store(eng, tmp_path, accession="ACC5", patient_id="MRN5", name="GREEN^AL", birth_date="19900101",
                sex="M")
    settle(eng)
    st = study(eng, obj.study_uid)
    assert (st.recon_state, st.matched_by, st.order_id) == ("flagged", "patient_id", None)
    assert st.patient_id is not None
    [f] = findings(eng, obj.study_uid, status="open", kind="order_unknown")
    assert f.received == "ACC5"
    hl7(eng, orm("NW", "PL5", "ACC5", "MRN5"))
    work(eng)
    st = study(eng, obj.study_uid)
    assert (st.recon_state, st.matched_by, st.order_id) == ("reconciled", "accession", order(eng, "ACC5").id)
    assert findings(eng, obj.study_uid, kind="order_unknown")[0].status == "resolved"


def test_unknown_patient_and_accession_matched_by_hand(eng: RunningEngine, tmp_path: Path) -> None:
    hl7(eng, adt("A04", "MRN6", "White", "Eve", dob="19750315"), orm("NW", "PL6", "ACC6", "MRN6"))
    obj = store(eng, tmp_path, accession="WRONG6", patient_id="TMP123", name="UNKNOWN^PATIENT")
    settle(eng)
    assert study(eng, obj.study_uid).recon_state == "unmatched"
    status, body = eng.api(f"/api/studies/{obj.study_uid}/match", method="POST")
    assert status == 400 and "accession" in body["detail"]  # no body: says what to give
    status, body = post(eng, f"/api/studies/{obj.study_uid}/match", {"accession": "NOSUCH"})
    assert status == 404 and "NOSUCH" in body["detail"]
    status, body = post(eng, f"/api/studies/{obj.study_uid}/match",
                        {"accession": "ACC6", "note": "tech picked no worklist item"})
    assert status == 202 and body["queued"]
    work(eng)
    st = study(eng, obj.study_uid)
    assert (st.recon_state, st.matched_by, st.order_id) == ("reconciled", "manual", order(eng, "ACC6").id)
    [ds] = files(eng, obj.study_uid)
    assert (str(ds.PatientName), ds.PatientID, ds.AccessionNumber, ds.PatientBirthDate) == (
        "White^Eve", "MRN6", "ACC6", "19750315")
    [(reason, old)] = original(ds)
    assert reason == "CORRECT" and old.PatientID == "TMP123" and old.AccessionNumber == "WRONG6"
    assert "study.manual_match" in events(eng, obj.study_uid)
    # dropping the manual match: the (coerced) headers now name the order themselves
    status, _ = eng.api(f"/api/studies/{obj.study_uid}/match", method="DELETE")
    assert status == 202
    work(eng)
    st = study(eng, obj.study_uid)
    assert (st.recon_state, st.matched_by, st.manual_order_id) == ("reconciled", "accession", None)
    assert events(eng, obj.study_uid)[-1] == "study.manual_match_cleared"  # nothing else changed: no correction


def test_a08_after_reconciliation_recoerces_the_stored_files(eng: RunningEngine, tmp_path: Path) -> None:
    hl7(eng, adt("A04", "MRN7", "Smith", "John", dob="19800202", sex="M"), orm("NW", "PL7", "ACC7", "MRN7"))
    obj = store(eng, tmp_path, 2, accession="ACC7", patient_id="MRN7", name="SMITH^JOHN", birth_date="19800202",
                sex="M", issuer="GENHOSP")
    settle(eng)
    assert study(eng, obj.study_uid).recon_state == "reconciled"
    assert all("OriginalAttributesSequence" not in ds for ds in files(eng, obj.study_uid))  # nothing to change
    hl7(eng, adt("A08", "MRN7", "Smith", "Jonathan", dob="19800202", sex="M", ts="20240316090000"))
    work(eng)
    for ds in files(eng, obj.study_uid):
        assert str(ds.PatientName) == "Smith^Jonathan"
        [(reason, old)] = original(ds)
        assert reason == "CORRECT" and str(old.PatientName) == "SMITH^JOHN"
    st = study(eng, obj.study_uid)
    assert (st.recon_state, st.patient_name) == ("reconciled", "Smith^Jonathan")
    assert events(eng, obj.study_uid)[-1] == "study.corrected"


def test_a40_merge_moves_studies_to_the_survivor_and_recoerces(eng: RunningEngine, tmp_path: Path) -> None:
    hl7(eng, adt("A04", "MRNA", "Black", "Sam", dob="19600101", sex="M"),
        adt("A04", "MRNB", "Blak", "Sam", dob="19600101", sex="M"),
        orm("NW", "PLA", "ACCA", "MRNA"), orm("NW", "PLB", "ACCB", "MRNB"))
    a = store(eng, tmp_path, accession="ACCA", patient_id="MRNA", name="BLACK^SAM", birth_date="19600101", sex="M",
              issuer="GENHOSP")
    b = store(eng, tmp_path, accession="ACCB", patient_id="MRNB", name="BLAK^SAM", birth_date="19600101", sex="M",
              issuer="GENHOSP")
    settle(eng)
    sa, sb = study(eng, a.study_uid), study(eng, b.study_uid)
    assert sa.patient_id != sb.patient_id and sa.recon_state == sb.recon_state == "reconciled"
    hl7(eng, adt("A40", "MRNA", "Black", "Sam", dob="19600101", sex="M", mrg="MRNB", ts="20240316090000"))
    work(eng)
    sa, sb = study(eng, a.study_uid), study(eng, b.study_uid)
    assert sb.patient_id == sa.patient_id and order(eng, "ACCB").patient_id == sa.patient_id
    [dsb] = files(eng, b.study_uid)
    assert (dsb.PatientID, str(dsb.PatientName)) == ("MRNA", "Black^Sam")
    [(reason, old)] = original(dsb)
    assert reason == "CORRECT" and old.PatientID == "MRNB" and str(old.PatientName) == "BLAK^SAM"
    [dsa] = files(eng, a.study_uid)
    assert dsa.PatientID == "MRNA" and "OriginalAttributesSequence" not in dsa  # already right
    assert sb.recon_state == "reconciled" and events(eng, b.study_uid)[-1] == "study.corrected"


def test_cancelled_order_with_images_is_a_finding(eng: RunningEngine, tmp_path: Path) -> None:
    hl7(eng, adt("A04", "MRN9", "Gray", "Kim"), orm("NW", "PL9", "ACC9", "MRN9"),
        orm("CA", "PL9", "ACC9", "MRN9", ts="20240315090000"))
    obj = store(eng, tmp_path, accession="ACC9", patient_id="MRN9", name="GRAY^KIM", issuer="GENHOSP")
    settle(eng)
    st = study(eng, obj.study_uid)
    assert (st.recon_state, st.matched_by) == ("flagged", "accession")
    [f] = findings(eng, obj.study_uid, kind="order_cancelled", status="open")
    assert (f.detail or {})["status"] == "CA"
    assert order(eng, "ACC9").status == "CA"  # not revived by the images


def test_two_studies_for_one_accession(eng: RunningEngine, tmp_path: Path) -> None:
    hl7(eng, adt("A04", "MRN10", "Lee", "Ray", sex="M"), orm("NW", "PL10", "ACC10", "MRN10"))
    one = store(eng, tmp_path, accession="ACC10", patient_id="MRN10", name="LEE^RAY", sex="M", issuer="GENHOSP")
    two = store(eng, tmp_path, accession="ACC10", patient_id="MRN10", name="LEE^RAY", sex="M", issuer="GENHOSP")
    settle(eng)
    o = order(eng, "ACC10")
    s1, s2 = study(eng, one.study_uid), study(eng, two.study_uid)
    assert s1.order_id == s2.order_id == o.id and o.status == "CM"
    assert s1.recon_state == s2.recon_state == "reconciled"  # information, not a flag
    [f] = findings(eng, two.study_uid, kind="accession_shared")
    assert f.severity == "info" and (f.detail or {})["other_studies"] == [one.study_uid]


def test_study_that_grows_after_it_was_stable(eng: RunningEngine, tmp_path: Path) -> None:
    hl7(eng, adt("A04", "MRN11", "Park", "Joy"), orm("NW", "PL11", "ACC11", "MRN11"))
    first = store(eng, tmp_path, accession="ACC11", patient_id="MRN11", name="PRAK^JOY", issuer="GENHOSP")
    settle(eng)
    assert study(eng, first.study_uid).patient_name == "Park^Joy"
    store(eng, tmp_path, accession="ACC11", patient_id="MRN11", name="PRAK^JOY", issuer="GENHOSP",
          study_uid=first.study_uid, series_uid=first.series_uid)
    assert study(eng, first.study_uid).state == "receiving"
    settle(eng)
    st = study(eng, first.study_uid)
    assert (st.state, st.times_stable, st.num_instances, st.recon_state) == ("stable", 2, 2, "reconciled")
    got = files(eng, first.study_uid)
    assert [str(ds.PatientName) for ds in got] == ["Park^Joy", "Park^Joy"]
    assert [len(original(ds)) for ds in got] == [1, 1]  # the first was not rewritten twice
    assert events(eng, first.study_uid).count("study.reconciled") == 2


def test_queued_reconciliation_survives_a_restart(workdir: Path, db_url: str, tmp_path: Path) -> None:
    e = start(workdir, db_url)
    try:
        hl7(e, adt("A04", "MRN12", "Stone", "Mia"), orm("NW", "PL12", "ACC12", "MRN12"))
        obj = store(e, tmp_path, accession="ACC12", patient_id="MRN12", name="STONE^MAI", issuer="GENHOSP")
        assert e.engine.reconciler is not None
        e.engine.reconciler.stopping = True  # the worker is gone; the queue row stays
        settle(e)
        assert study(e, obj.study_uid).state == "stable"
        assert study(e, obj.study_uid).recon_state == "pending"
    finally:
        e.stop()
    e = start(workdir, db_url)
    try:
        work(e)
        st = study(e, obj.study_uid)
        assert (st.recon_state, st.patient_name) == ("reconciled", "Stone^Mia")
        [ds] = files(e, obj.study_uid)
        assert str(ds.PatientName) == "Stone^Mia"
        assert order(e, "ACC12").status == "CM"
    finally:
        e.stop()


def test_a_pass_stopped_midway_hands_back_the_jobs_it_leased_but_did_not_run(eng: RunningEngine,
                                                                              tmp_path: Path) -> None:
    """Regression: a pass leases up to 10 jobs at once; stopped after the first (engine shutdown),
    it left the other 9 leased for LEASE_SECONDS (10 minutes), so after a restart, or on a second
    engine sharing the queue, those studies waited that long."""
    from engine.cli.studies import reconciler_for_tools
    assert eng.engine.reconciler is not None
    eng.engine.reconciler.stopping = True  # the engine's own loop stays out of the queue
    hl7(eng, adt("A04", "MRN30", "Hall", "Ben", sex="M"))
    for i in range(3):
        store(eng, tmp_path, accession=f"ACC3{i}", patient_id="MRN30", name="HALL^BEN", sex="M", issuer="GENHOSP")

    def queued() -> list[tuple[int, Any]]:
        with eng.db.read_session() as s:
            return [(j.study_id, j.leased_until) for j in s.execute(select(ReconcileJob).order_by(ReconcileJob.id))
                    .scalars()]
    assert wait_until(lambda: len(queued()) == 3, message="3 studies queued")
    results: list[Any] = []

    def stop_after_the_first(result: Any) -> None:
        results.append(result)
        tool.stopping = len(results) == 1
    tool = reconciler_for_tools(eng.db, eng.settings, on_result=stop_after_the_first)
    assert tool.run_pending() == 1
    left = queued()
    assert len(left) == 2 and [leased for _sid, leased in left] == [None, None]
    tool.stopping = False
    assert tool.run_pending() == 2 and queued() == [] and len(results) == 3


def test_cli_lists_exceptions_and_matches_by_hand(workdir: Path, db_url: str, tmp_path: Path) -> None:
    from tests.test_cli import radbridge
    e = start(workdir, db_url)
    try:
        hl7(e, adt("A04", "MRN13", "Young", "Ida", dob="19910909"), orm("NW", "PL13", "ACC13", "MRN13"))
        obj = store(e, tmp_path, accession="", patient_id="", name="ANON")
        settle(e)
        assert study(e, obj.study_uid).recon_state == "unmatched"
    finally:
        e.stop()
    env = {"RADBRIDGE_DATABASE_URL": db_url, "RADBRIDGE_STORAGE_DIR": e.settings.storage.dir,
           "RADBRIDGE_CHANNELS_DIR": str(workdir / "channels"), "RADBRIDGE_MAPPINGS_DIR": str(workdir / "mappings")}
    out = radbridge("studies", "list", "--exceptions", env=env)
    assert out.returncode == 0, out.stderr
    [line] = [ln for ln in out.stdout.splitlines() if obj.study_uid in ln]
    assert "unmatched" in line and "patient_id_missing" in line
    out = radbridge("studies", "match", obj.study_uid, "--order", "NOSUCH", env=env)
    assert out.returncode == 1 and "no order with accession number 'NOSUCH'" in out.stderr
    out = radbridge("studies", "match", obj.study_uid, "--order", "ACC13", "--note", "paper requisition", env=env)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["reconciliation"]["state"] == "reconciled" and shown["reconciliation"]["matched_by"] == "manual"
    e = start(workdir, db_url)  # read the result back through the engine's own index and files
    try:
        [ds] = files(e, obj.study_uid)
        assert (str(ds.PatientName), ds.PatientID, ds.AccessionNumber, ds.PatientBirthDate) == (
            "Young^Ida", "MRN13", "ACC13", "19910909")
        assert order(e, "ACC13").status == "CM"
        manual = [ev for ev in events(e, obj.study_uid) if ev == "study.manual_match"]
        assert manual == ["study.manual_match"]
    finally:
        e.stop()


def test_two_engines_share_the_reconciliation_queue(pg_url: str, workdir: Path, tmp_path: Path) -> None:
    """Two engine processes on one PostgreSQL database and one storage folder work
    the queue at the same time: each study is reconciled once and each file rewritten once."""
    import threading
    engines = [start(workdir, pg_url) for _ in range(2)]
    try:
        a, b = engines
        hl7(a, adt("A04", "MRN20", "Hall", "Ben", sex="M"))
        uids = []
        for i in range(6):
            hl7(a, orm("NW", f"PL2{i}", f"ACC2{i}", "MRN20"))
            uids.append(store(a, tmp_path, 2, accession=f"ACC2{i}", patient_id="MRN20", name="HALL^BNE", sex="M",
                              issuer="GENHOSP").study_uid)
        for e in engines:
            assert e.engine.reconciler is not None
            e.engine.reconciler.stopping = True  # hold both loops while stability queues the studies
        a.engine.settings.dicom.stable_seconds = 0
        assert a.call(a.engine.check_stability()) == 6
        for e in engines:
            assert e.engine.reconciler is not None
            e.engine.reconciler.stopping = False
        barrier = threading.Barrier(2)

        def run(e: RunningEngine) -> None:
            barrier.wait(30)
            work(e)
        threads = [threading.Thread(target=run, args=(e,)) for e in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)

        def queue_drained() -> tuple[int, list[Any]]:
            """Revisions written and the jobs still queued (with their errors) after a pass of each engine:
            a job that lost a race with the other engine is retried after its backoff, which is fine as
            long as every study ends reconciled exactly once (checked below)."""
            for e in engines:  # a pass an engine's own loop started meanwhile holds its lock: wait for it
                work(e)
            with a.db.read_session() as s:
                jobs = [(j.study_id, j.attempts, j.last_error) for j in s.execute(select(ReconcileJob)).scalars()]
                return len(s.execute(select(InstanceRevision)).scalars().all()), jobs
        try:
            wait_until(lambda: queue_drained() == (12, []), timeout=60, interval=0.5,
                       message="every study reconciled and each of the 12 files rewritten once")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; (revisions, queued jobs) now: {queue_drained()}") from None
        for uid in uids:
            st = study(a, uid)
            assert (st.recon_state, st.times_reconciled, st.patient_name) == ("reconciled", 1, "Hall^Ben")
            assert events(a, uid).count("study.reconciled") == 1
            assert [str(ds.PatientName) for ds in files(a, uid)] == ["Hall^Ben", "Hall^Ben"]
    finally:
        for e in engines:
            e.stop()
