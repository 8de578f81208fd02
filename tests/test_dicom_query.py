"""Query/retrieve and modality worklist against the running engine with dcmtk's findscu, movescu
(to a real storescp), getscu; worklist items come from orders sent over MLLP."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from tests.conftest import RunningEngine, make_settings
from tests.dicomutil import (
    DCMTK_ENV,
    bundled,
    findscu,
    free_port,
    make_instance,
    require_dcmtk,
    run,
    storescu,
)
from tests.hl7util import ack_code, orm, send
from tests.waiting import wait_for_listener, wait_until


@pytest.fixture(autouse=True)
def _dcmtk() -> None:
    require_dcmtk()


class Archive:
    def __init__(self, eng: RunningEngine, tmp: Path) -> None:
        self.eng, self.tmp = eng, tmp
        self.study_a = generate_uid()
        self.study_b = generate_uid()
        self.ct = make_instance(tmp / "a1.dcm", patient_id="QR1", name="SMITH^ANNA", accession="QA1",
                                study_uid=self.study_a, edit=lambda ds: setattr(ds, "StudyDate", "20240110"))
        self.ct2 = make_instance(tmp / "a2.dcm", patient_id="QR1", name="SMITH^ANNA", accession="QA1",
                                 study_uid=self.study_a, series_uid=self.ct.series_uid, number=2,
                                 edit=lambda ds: setattr(ds, "StudyDate", "20240110"))
        self.mr = make_instance(tmp / "b1.dcm", source=bundled("MR_small.dcm"), patient_id="QR2", name="Jones^Bob",
                                accession="QB1", study_uid=self.study_b,
                                edit=lambda ds: setattr(ds, "StudyDate", "20240301"))
        proc = storescu(eng.dicom_port, [self.ct.path, self.ct2.path, self.mr.path])
        assert proc.returncode == 0, proc.stdout


@pytest.fixture
def archive(workdir: Path, db_url: str, tmp_path: Path) -> Iterator[Archive]:
    settings = make_settings(workdir, db_url)
    settings.dicom.stable_seconds = 3600
    dest_port = free_port()
    settings.dicom.destinations = [f"DEST=127.0.0.1:{dest_port}"]
    eng = RunningEngine(settings).start()
    try:
        arc = Archive(eng, tmp_path / "objects")
        arc.dest_port = dest_port  # type: ignore[attr-defined]
        yield arc
    finally:
        eng.stop()


def uids(answers: list, kw: str) -> list[str]:
    return sorted(str(a.get(kw)) for a in answers)


def test_find_study_level_matching(archive: Archive, tmp_path: Path) -> None:
    port = archive.eng.dicom_port
    out = tmp_path / "rsp"
    # wildcard on the name, case-insensitive
    proc, found = findscu(port, "STUDY", ["PatientName=smith*", "StudyInstanceUID", "AccessionNumber",
                                          "NumberOfStudyRelatedInstances", "ModalitiesInStudy"], out_dir=out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert uids(found, "StudyInstanceUID") == [archive.study_a]
    assert found[0].AccessionNumber == "QA1" and int(found[0].NumberOfStudyRelatedInstances) == 2
    assert list(found[0].ModalitiesInStudy) == ["CT"] or found[0].ModalitiesInStudy == "CT"
    # date range
    _, found = findscu(port, "STUDY", ["StudyDate=20240201-20240331", "StudyInstanceUID"], out_dir=out)
    assert uids(found, "StudyInstanceUID") == [archive.study_b]
    _, found = findscu(port, "STUDY", ["StudyDate=-20240131", "StudyInstanceUID"], out_dir=out)
    assert uids(found, "StudyInstanceUID") == [archive.study_a]
    # list of UIDs
    _, found = findscu(port, "STUDY", [f"StudyInstanceUID={archive.study_a}\\{archive.study_b}"], out_dir=out)
    assert uids(found, "StudyInstanceUID") == sorted([archive.study_a, archive.study_b])
    # modality in study
    _, found = findscu(port, "STUDY", ["ModalitiesInStudy=MR", "StudyInstanceUID"], out_dir=out)
    assert uids(found, "StudyInstanceUID") == [archive.study_b]
    # single value matching is exact: no match for a prefix without wildcard
    _, found = findscu(port, "STUDY", ["AccessionNumber=QA", "StudyInstanceUID"], out_dir=out)
    assert found == []


def test_find_patient_series_image_levels(archive: Archive, tmp_path: Path) -> None:
    port = archive.eng.dicom_port
    out = tmp_path / "rsp"
    proc, found = findscu(port, "PATIENT", ["PatientID", "PatientName", "NumberOfPatientRelatedStudies"],
                          model="-P", out_dir=out)
    assert proc.returncode == 0
    assert uids(found, "PatientID") == ["QR1", "QR2"]
    # Patient Root: studies of one patient
    _, found = findscu(port, "STUDY", ["PatientID=QR2", "StudyInstanceUID"], model="-P", out_dir=out)
    assert uids(found, "StudyInstanceUID") == [archive.study_b]
    _, found = findscu(port, "SERIES", [f"StudyInstanceUID={archive.study_a}", "SeriesInstanceUID", "Modality",
                                        "NumberOfSeriesRelatedInstances"], out_dir=out)
    assert uids(found, "SeriesInstanceUID") == [archive.ct.series_uid]
    assert found[0].Modality == "CT" and int(found[0].NumberOfSeriesRelatedInstances) == 2
    _, found = findscu(port, "IMAGE", [f"StudyInstanceUID={archive.study_a}",
                                       f"SeriesInstanceUID={archive.ct.series_uid}", "SOPInstanceUID",
                                       "InstanceNumber"], out_dir=out)
    assert uids(found, "SOPInstanceUID") == sorted([archive.ct.sop_uid, archive.ct2.sop_uid])
    # an unsupported level is refused with a failure status, the listener stays up
    proc, found = findscu(port, "FOO", ["StudyInstanceUID"], out_dir=out)
    assert found == [] and "DataSetDoesNotMatchSOPClass" in proc.stdout + proc.stderr  # 0xA900
    assert run(["echoscu", "-aec", "RADBRIDGE", "127.0.0.1", str(port)]).returncode == 0


def test_move_to_configured_destination_and_get(archive: Archive, tmp_path: Path) -> None:
    port = archive.eng.dicom_port
    dest_port = archive.dest_port  # type: ignore[attr-defined]
    received = tmp_path / "moved"
    received.mkdir()
    scp = subprocess.Popen(["storescp", "-aet", "DEST", "-od", str(received), str(dest_port)], env=DCMTK_ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_listener(dest_port, scp, what="storescp (the C-MOVE destination)")
        proc = run(["movescu", "-v", "-S", "-aet", "TESTSCU", "-aec", "RADBRIDGE", "-aem", "DEST",
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={archive.study_a}",
                    "127.0.0.1", str(port)])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        wait_until(lambda: len(list(received.iterdir())) >= 2, timeout=10, interval=0.1,
                   message="storescp to have written the two moved instances")
        got = sorted(p.name.split(".", 1)[1] for p in received.iterdir())
        assert got == sorted([archive.ct.sop_uid, archive.ct2.sop_uid])
        unknown = run(["movescu", "-v", "-S", "-aet", "TESTSCU", "-aec", "RADBRIDGE", "-aem", "NOBODY",
                       "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={archive.study_a}",
                       "127.0.0.1", str(port)])
        assert "Refused: MoveDestinationUnknown" in unknown.stdout + unknown.stderr
    finally:
        scp.terminate()
        scp.wait(10)
    got_dir = tmp_path / "got"
    got_dir.mkdir()
    proc = run(["getscu", "-v", "-S", "-aet", "TESTSCU", "-aec", "RADBRIDGE", "-od", str(got_dir),
                "-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={archive.mr.series_uid}",
                "127.0.0.1", str(port)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [p.name.split(".", 1)[1] for p in got_dir.iterdir()] == [archive.mr.sop_uid]


def test_modality_worklist_from_orders(workdir: Path, db_url: str, tmp_path: Path) -> None:
    eng = RunningEngine(make_settings(workdir, db_url)).start()
    try:
        mllp = eng.mllp_port
        for placer, acc, mrn, family, modality, station, when in (
                ("WL1", "WACC1", "WMRN1", "Garcia", "CT", "CT_ROOM1", "20240320140000"),
                ("WL2", "WACC2", "WMRN2", "Nguyen", "MR", "MR_ROOM1", "20240320150000"),
                ("WL3", "WACC3", "WMRN3", "Olsen", "CT", "CT_ROOM1", "20240322090000")):
            msg = orm("NW", placer, acc, mrn, family=family, modality=modality, station=station)
            msg = msg.replace("^^^20240320140000^^R", f"^^^{when}^^R")
            assert ack_code(send(mllp, msg)) == "AA"
        out = tmp_path / "wl"

        def worklist(*keys: str) -> list:
            proc, found = findscu(eng.dicom_port, "", ["PatientName", "PatientID", "AccessionNumber",
                                                      "StudyInstanceUID", "RequestedProcedureID",
                                                      *keys], model="-W", out_dir=out)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            return found

        found = worklist("ScheduledProcedureStepSequence[0].Modality=CT",
                         "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
                         "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate")
        assert uids(found, "AccessionNumber") == ["WACC1", "WACC3"]
        first = next(f for f in found if f.AccessionNumber == "WACC1")
        assert first.PatientID == "WMRN1" and str(first.PatientName).startswith("Garcia")
        sps = first.ScheduledProcedureStepSequence[0]
        assert sps.Modality == "CT" and sps.ScheduledStationAETitle == "CT_ROOM1"
        assert sps.ScheduledProcedureStepStartDate == "20240320"
        # the Study Instance UID offered is the same on every query
        again = worklist("ScheduledProcedureStepSequence[0].Modality=CT")
        assert uids(again, "StudyInstanceUID") == uids(found, "StudyInstanceUID")
        # date range and station AE
        found = worklist("ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20240320-20240320",
                         "ScheduledProcedureStepSequence[0].ScheduledStationAETitle=CT_ROOM1")
        assert uids(found, "AccessionNumber") == ["WACC1"]
        # patient name, any case, wildcard
        found = worklist("PatientName=NGUY*")
        assert uids(found, "AccessionNumber") == ["WACC2"]
        # a cancelled order drops out
        assert ack_code(send(mllp, orm("CA", "WL3", "WACC3", "WMRN3", family="Olsen", modality="CT"))) == "AA"
        found = worklist("ScheduledProcedureStepSequence[0].Modality=CT")
        assert uids(found, "AccessionNumber") == ["WACC1"]
    finally:
        eng.stop()


def _query_file(path: Path, **keys: object) -> Path:
    """An identifier as a bare dataset in implicit VR (4-byte lengths: a 2.4 MB UID list stays UI;
    a file meta header would copy SOPInstanceUID into a 2-byte-length element), as findscu reads it."""
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    ds.save_as(path, implicit_vr=True, little_endian=True)
    return path


def test_find_by_a_list_of_40000_uids(archive: Archive, tmp_path: Path) -> None:
    """Issue 14, item 12: a list this long failed with C001 (SQLite: expression tree too large)."""
    wanted = [archive.ct.sop_uid, archive.ct2.sop_uid]
    others = [generate_uid() for _ in range(40_000)]
    q = _query_file(tmp_path / "q.dcm", QueryRetrieveLevel="IMAGE", StudyInstanceUID=archive.study_a,
                    SeriesInstanceUID=archive.ct.series_uid, SOPInstanceUID=others[:20_000] + wanted + others[20_000:])
    proc, answers = findscu(archive.eng.dicom_port, "", [], out_dir=tmp_path / "rsp", query_file=q)
    assert proc.returncode == 0, proc.stdout
    log = proc.stdout + proc.stderr
    assert "Received Final Find Response (Success)" in log, log[-2000:]
    assert uids(answers, "SOPInstanceUID") == sorted(wanted)


def test_more_matches_than_the_limit_is_refused_not_truncated(workdir: Path, db_url: str, tmp_path: Path) -> None:
    """Issue 14, item 12: over query_max_results the SCP answered the first N and Success."""
    ch = workdir / "channels" / "dicom.yaml"
    ch.write_text(ch.read_text().replace("  max_associations: 32\n", "  max_associations: 32\n  query_max_results: 2\n"))
    settings = make_settings(workdir, db_url)
    settings.dicom.stable_seconds = 3600
    eng = RunningEngine(settings).start()
    try:
        arc = Archive(eng, tmp_path / "objects")  # 3 instances in 2 studies
        proc, answers = findscu(eng.dicom_port, "IMAGE", ["SOPInstanceUID"], out_dir=tmp_path / "r1", debug=True)
        log = proc.stdout + proc.stderr
        assert answers == [] and "0xa700: Refused: Out of resources" in log, log
        # findscu does not print the Error Comment: read it with pynetdicom as the SCU
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", eng.dicom_port, ae_title="RADBRIDGE")
        assert assoc.is_established
        try:
            q = Dataset()
            q.QueryRetrieveLevel, q.SOPInstanceUID = "IMAGE", ""
            [(status, identifier)] = list(assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind))
        finally:
            assoc.release()
        assert status.Status == 0xA700 and identifier is None
        assert "more than 2 matches" in status.ErrorComment and "refine your query" in status.ErrorComment
        proc, answers = findscu(eng.dicom_port, "STUDY", ["StudyInstanceUID"], out_dir=tmp_path / "r2")
        assert proc.returncode == 0 and uids(answers, "StudyInstanceUID") == sorted([arc.study_a, arc.study_b])
    finally:
        eng.stop()
