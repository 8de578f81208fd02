"""Storage Commitment Push Model, SCU side (engine/connectors/dicom/commitment.py, engine/store/commitments.py):
asking a real Orthanc to commit instances, its report arriving at the running engine's DICOM channel on an
association of its own; reports sent by a pynetdicom peer (unknown transaction, repeats, malformed,
refused calling AE); a report on the requesting association; an N-ACTION refused or not answered."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
)

from engine.connectors.dicom.commitment import (
    CommitmentRequest,
    new_transaction_uid,
    report_recorder,
    request_commitment,
)
from engine.store.commitments import CommitmentResult, record_request, result_of
from engine.store.states import CommitmentState
from tests.conftest import RunningEngine, start_dicom_engine
from tests.dicomutil import free_port, make_instance, require_dcmtk, storescu
from tests.waiting import wait_for_listener, wait_until

ORTHANC = Path("/usr/sbin/Orthanc")
ENGINE_AET = "RADBRIDGE"  # the shipped dicom channel's ([dicom] aet)
NO_SUCH_OBJECT_INSTANCE = 0x0112  # Failure Reason (PS3.3 C.14.1.1)


@dataclass(frozen=True)
class Peer:
    aet: str
    host: str
    port: int


@contextmanager
def orthanc(tmp_path: Path, modalities: dict[str, Any]) -> Iterator[int]:
    """Debian's Orthanc on loopback, knowing ``modalities`` (its DicomModalities); yields its DICOM port."""
    if not ORTHANC.exists():
        pytest.fail("Orthanc is not installed (scripts/test installs it; or apt-get install orthanc)")
    dicom_port, http_port = free_port(), free_port()
    config = {"Name": "radbridge-commitment", "StorageDirectory": str(tmp_path / "orthanc-storage"),
              "IndexDirectory": str(tmp_path / "orthanc-index"), "DicomAet": "ORTHANC", "DicomPort": dicom_port,
              "DicomCheckCalledAet": False, "HttpPort": http_port, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "DicomModalities": modalities, "Plugins": []}
    path = tmp_path / "orthanc.json"
    path.write_text(json.dumps(config))
    with open(tmp_path / "orthanc.log", "wb") as log:
        proc = subprocess.Popen([str(ORTHANC), str(path)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        try:
            wait_for_listener(dicom_port, proc, what="Orthanc")
            yield dicom_port
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def engine(workdir: Path, db_url: str) -> Iterator[RunningEngine]:
    eng = start_dicom_engine(workdir, db_url)
    try:
        yield eng
    finally:
        eng.stop()


def ask(eng: RunningEngine, peer: Peer, refs: list[tuple[str, str]], *, destination: str = "pacs",
        **kwargs: Any) -> CommitmentRequest:
    """What the forwarder does: the request committed first, then the N-ACTION (reports on the requesting
    association recorded through the engine's writer)."""
    uid = new_transaction_uid()
    with eng.db.writer.begin() as conn:
        record_request(conn, uid, destination=destination, instances=len(refs), delivery_id=7, study_id=3)
    return request_commitment(peer, refs, uid, calling_aet=ENGINE_AET,
                              timeout=15, record=report_recorder(eng.engine.writer, timeout=15), **kwargs)


def result(eng: RunningEngine, uid: str) -> CommitmentResult | None:
    with eng.db.reader.connect() as conn:
        return result_of(conn, uid)


def answered(eng: RunningEngine, uid: str) -> CommitmentResult:
    def report() -> CommitmentResult | None:
        r = result(eng, uid)
        return r if r is not None and r.answered else None
    found = wait_until(report, timeout=30, message=f"the report of transaction {uid}")
    assert found is not None
    return found


# --- against Orthanc ------------------------------------------------------------------------------------

def test_orthanc_commits_what_it_has_and_reports_on_its_own_association(engine: RunningEngine,
                                                                        tmp_path: Path) -> None:
    require_dcmtk()
    objs = [make_instance(tmp_path / f"in/{i}.dcm", number=i) for i in range(3)]
    modalities = {"radbridge": {"AET": "RADBRIDGE", "Host": "127.0.0.1", "Port": engine.dicom_port}}
    with orthanc(tmp_path, modalities) as port:
        sent = storescu(port, [o.path for o in objs], aet="ORTHANC", calling="RADBRIDGE")
        assert sent.returncode == 0, sent.stderr
        missing = str(generate_uid())
        refs = [(str(CTImageStorage), o.sop_uid) for o in objs] + [(str(CTImageStorage), missing)]
        asked = ask(engine, Peer("ORTHANC", "127.0.0.1", port), refs)
        assert asked.accepted and asked.status == 0 and asked.error == "", asked
        # Orthanc answers asynchronously (its book: "storage commitment responses are sent asynchronously"),
        # on an association of its own to the modality of the calling AE title
        assert asked.report is None
        row = answered(engine, asked.transaction_uid)
    assert row.state is CommitmentState.FAILED
    assert (row.instances, row.committed, row.answered_by) == (4, 3, "ORTHANC")
    assert [(f.sop_instance_uid, f.reason) for f in row.failed] == [(missing, NO_SUCH_OBJECT_INSTANCE)]
    assert (row.destination, row.delivery_id, row.study_id, row.error) == ("pacs", 7, 3, None)
    status, body = engine.api("/api/channels")
    assert status == 200
    dicom = next(c for c in body["channels"] if c["name"] == "dicom")
    assert dicom["counters"]["requests"]["commitment"] == 1


def test_orthanc_commits_every_instance_it_has(engine: RunningEngine, tmp_path: Path) -> None:
    require_dcmtk()
    objs = [make_instance(tmp_path / f"in/{i}.dcm", number=i) for i in range(2)]
    modalities = {"radbridge": {"AET": "RADBRIDGE", "Host": "127.0.0.1", "Port": engine.dicom_port}}
    with orthanc(tmp_path, modalities) as port:
        assert storescu(port, [o.path for o in objs], aet="ORTHANC", calling="RADBRIDGE").returncode == 0
        asked = ask(engine, Peer("ORTHANC", "127.0.0.1", port), [(str(CTImageStorage), o.sop_uid) for o in objs])
        assert asked.accepted, asked
        row = answered(engine, asked.transaction_uid)
    assert (row.state, row.committed, row.failed) == (CommitmentState.COMMITTED, 2, ())
