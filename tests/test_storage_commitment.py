"""Storage Commitment Push Model, SCU side (engine/connectors/dicom/commitment.py, engine/store/commitments.py):
asking a real Orthanc to commit instances, its report arriving at the running engine's DICOM channel on an
association of its own; reports sent by a pynetdicom peer (unknown transaction, repeats, malformed,
refused calling AE); a report on the requesting association; an N-ACTION refused or not answered."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from engine.connectors.dicom.commitment import (
    CommitmentRequest,
    new_transaction_uid,
    report_recorder,
    request_commitment,
)
from engine.store.commitments import CommitmentResult, record_failure, record_request, result_of
from engine.store.states import CommitmentState
from tests.conftest import RunningEngine, start_dicom_engine
from tests.dicomutil import free_port, make_instance, orthanc_process, require_dcmtk, storescu
from tests.waiting import wait_until

ENGINE_AET = "RADBRIDGE"  # the shipped dicom channel's ([dicom] aet)
NO_SUCH_OBJECT_INSTANCE = 0x0112  # Failure Reason (PS3.3 C.14.1.1)


@dataclass(frozen=True)
class Peer:
    aet: str
    host: str
    port: int


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

def test_orthanc_commits_what_it_has_and_reports_on_its_own_association(dicom_engine: RunningEngine,
                                                                        tmp_path: Path) -> None:
    require_dcmtk()
    objs = [make_instance(tmp_path / f"in/{i}.dcm", number=i) for i in range(3)]
    modalities = {"radbridge": {"AET": "RADBRIDGE", "Host": "127.0.0.1", "Port": dicom_engine.dicom_port}}
    with orthanc_process(tmp_path, {"DicomModalities": modalities}) as (port, _http):
        sent = storescu(port, [o.path for o in objs], aet="ORTHANC", calling="RADBRIDGE")
        assert sent.returncode == 0, sent.stderr
        missing = str(generate_uid())
        refs = [(str(CTImageStorage), o.sop_uid) for o in objs] + [(str(CTImageStorage), missing)]
        asked = ask(dicom_engine, Peer("ORTHANC", "127.0.0.1", port), refs)
        assert asked.accepted and asked.status == 0 and asked.error == "", asked
        # Orthanc answers asynchronously (its book: "storage commitment responses are sent asynchronously"),
        # on an association of its own to the modality of the calling AE title
        assert asked.report is None
        row = answered(dicom_engine, asked.transaction_uid)
    assert row.state is CommitmentState.FAILED
    assert (row.instances, row.committed, row.answered_by) == (4, 3, "ORTHANC")
    assert [(f.sop_instance_uid, f.reason) for f in row.failed] == [(missing, NO_SUCH_OBJECT_INSTANCE)]
    assert (row.destination, row.delivery_id, row.study_id, row.error) == ("pacs", 7, 3, None)
    status, body = dicom_engine.api("/api/channels")
    assert status == 200
    dicom = next(c for c in body["channels"] if c["name"] == "dicom")
    assert dicom["counters"]["requests"]["commitment"] == 1


def test_orthanc_commits_every_instance_it_has(dicom_engine: RunningEngine, tmp_path: Path) -> None:
    require_dcmtk()
    objs = [make_instance(tmp_path / f"in/{i}.dcm", number=i) for i in range(2)]
    modalities = {"radbridge": {"AET": "RADBRIDGE", "Host": "127.0.0.1", "Port": dicom_engine.dicom_port}}
    with orthanc_process(tmp_path, {"DicomModalities": modalities}) as (port, _http):
        assert storescu(port, [o.path for o in objs], aet="ORTHANC", calling="RADBRIDGE").returncode == 0
        asked = ask(dicom_engine, Peer("ORTHANC", "127.0.0.1", port), [(str(CTImageStorage), o.sop_uid) for o in objs])
        assert asked.accepted, asked
        row = answered(dicom_engine, asked.transaction_uid)
    assert (row.state, row.committed, row.failed) == (CommitmentState.COMMITTED, 2, ())


# --- reports sent by a peer (pynetdicom as the PACS) ---------------------------------------------------

def report_info(transaction_uid: str | None, committed: list[str], failed: list[tuple[str, int]]) -> Dataset:
    info = Dataset()
    if transaction_uid is not None:
        info.TransactionUID = transaction_uid
    items = []
    for uid in committed:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CTImageStorage, uid
        items.append(item)
    info.ReferencedSOPSequence = items
    if failed:
        failures = []
        for uid, reason in failed:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID, item.FailureReason = CTImageStorage, uid, reason
            failures.append(item)
        info.FailedSOPSequence = failures
    return info


def send_reports(port: int, reports: list[tuple[Dataset, int]], *, calling: str = "PACS", role: bool = True,
                 instance: str = str(StorageCommitmentPushModelInstance)) -> list[Dataset]:
    """Send N-EVENT-REPORTs (Event Information, Event Type ID) on one association, as a PACS does: it
    takes the SCP role of the Storage Commitment Push Model (role selection) unless ``role`` is False.
    Returns each response's status dataset (Status, ErrorComment)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    roles: list[Any] = [build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)] if role else []
    assoc = ae.associate("127.0.0.1", port, ae_title=ENGINE_AET, ext_neg=roles)
    if not assoc.is_established:
        raise ConnectionRefusedError("the engine did not accept the association")
    try:
        answers = []
        for info, event_type in reports:
            status, _reply = assoc.send_n_event_report(info, event_type, StorageCommitmentPushModel, instance)
            answers.append(status)
        return answers
    finally:
        assoc.release()


def requested(eng: RunningEngine, instances: int) -> str:
    uid = new_transaction_uid()
    with eng.db.writer.begin() as conn:
        record_request(conn, uid, destination="pacs", instances=instances)
    return uid


def test_a_report_for_an_unknown_transaction_is_refused_and_not_stored(dicom_engine: RunningEngine) -> None:
    unknown = new_transaction_uid()
    [status] = send_reports(dicom_engine.dicom_port, [(report_info(unknown, [str(generate_uid())], []), 1)])
    assert (status.Status, status.ErrorComment) == (0x0115, "unknown Transaction UID")
    assert result(dicom_engine, unknown) is None


def test_a_report_sent_twice_is_recorded_once(dicom_engine: RunningEngine) -> None:
    a, b = str(generate_uid()), str(generate_uid())
    uid = requested(dicom_engine, 2)
    first = send_reports(dicom_engine.dicom_port, [(report_info(uid, [a, b], []), 1)])
    row = result(dicom_engine, uid)
    assert row is not None and row.answered
    # again, and then a different one (it failed b after all): known, answered success, nothing changes
    again = send_reports(dicom_engine.dicom_port, [(report_info(uid, [a, b], []), 1), (report_info(uid, [a], [(b, 0x0110)]), 2)],
                         role=False)
    assert [s.Status for s in first + again] == [0, 0, 0]
    assert result(dicom_engine, uid) == row
    assert (row.state, row.committed, row.failed, row.answered_by) == (CommitmentState.COMMITTED, 2, (), "PACS")


def test_malformed_reports_get_specific_statuses_and_the_engine_goes_on(dicom_engine: RunningEngine) -> None:
    uid = requested(dicom_engine, 1)
    sop = str(generate_uid())
    no_transaction = (report_info(None, [sop], []), 1)
    bad_event_type = (report_info(uid, [sop], []), 3)
    failures_without_list = (report_info(uid, [sop], []), 2)
    bad_uid = (report_info("not a uid", [sop], []), 1)
    answers = send_reports(dicom_engine.dicom_port, [no_transaction, bad_event_type, failures_without_list, bad_uid])
    assert [(s.Status, str(s.get("ErrorComment", ""))) for s in answers] == [
        (0x0114, "Transaction UID missing"), (0x0113, "Event Type ID 3 is not 1 or 2"),
        (0x0114, "Event Type 2 without a Failed SOP Sequence"), (0x0115, "Transaction UID is not a valid UID")]
    [wrong_instance] = send_reports(dicom_engine.dicom_port, [(report_info(uid, [sop], []), 1)],
                                    instance=str(generate_uid()))
    assert wrong_instance.Status == 0x0117
    row = result(dicom_engine, uid)
    assert row is not None and row.state is CommitmentState.REQUESTED and not row.answered
    # the same transaction, well formed, is still taken
    assert [s.Status for s in send_reports(dicom_engine.dicom_port, [(report_info(uid, [sop], []), 1)])] == [0]
    row = result(dicom_engine, uid)
    assert row is not None and row.state is CommitmentState.COMMITTED


def test_reports_from_a_calling_ae_title_the_channel_does_not_accept_are_refused(workdir: Path, db_url: str) -> None:
    eng = start_dicom_engine(workdir, db_url, allowed_calling_aets=["PACS"])
    try:
        uid = requested(eng, 1)
        with pytest.raises(ConnectionRefusedError):
            send_reports(eng.dicom_port, [(report_info(uid, [str(generate_uid())], []), 1)], calling="INTRUDER")
        assert [s.Status for s in send_reports(eng.dicom_port, [(report_info(uid, [str(generate_uid())], []), 1)])] == [0]
    finally:
        eng.stop()


# --- the requesting association ----------------------------------------------------------------------------

@dataclass
class CommitmentSCP:
    """A pynetdicom Storage Commitment SCP that answers the N-ACTION with ``status`` and, when ``report``,
    sends its report on the same association first (committing every instance asked for)."""

    status: int = 0
    report: bool = True
    report_answers: list[int] | None = None

    def on_action(self, event: Any) -> tuple[int, None]:
        info = event.action_information
        if self.report:
            rsp, _ = event.assoc.send_n_event_report(
                report_info(str(info.TransactionUID), [str(i.ReferencedSOPInstanceUID) for i in
                                                       info.ReferencedSOPSequence], []),
                1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
            self.report_answers = [*(self.report_answers or []), int(rsp.Status)]
        return self.status, None


@contextmanager
def commitment_scp(scp: CommitmentSCP) -> Iterator[int]:
    ae = AE(ae_title="SCPEER")
    ae.add_supported_context(StorageCommitmentPushModel)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_ACTION, scp.on_action)])
    assert server is not None
    try:
        yield port
    finally:
        server.shutdown()


def test_a_report_on_the_requesting_association_is_recorded_before_it_is_answered(dicom_engine: RunningEngine) -> None:
    scp = CommitmentSCP()
    sops = [str(generate_uid()) for _ in range(3)]
    with commitment_scp(scp) as port:
        asked = ask(dicom_engine, Peer("SCPEER", "127.0.0.1", port), [(str(CTImageStorage), s) for s in sops])
    assert asked.accepted and asked.report is not None, asked
    assert (asked.report.transaction_uid, set(asked.report.committed), asked.report.peer_ae) == (
        asked.transaction_uid, set(sops), "SCPEER")
    assert scp.report_answers == [0]
    row = result(dicom_engine, asked.transaction_uid)
    assert row is not None and (row.state, row.committed, row.answered_by) == (CommitmentState.COMMITTED, 3, "SCPEER")


def test_a_report_on_the_requesting_association_is_refused_when_the_caller_cannot_record_it() -> None:
    scp = CommitmentSCP()
    with commitment_scp(scp) as port:
        asked = request_commitment(Peer("SCPEER", "127.0.0.1", port), [(str(CTImageStorage), str(generate_uid()))],
                                   new_transaction_uid(), calling_aet="RADBRIDGE", timeout=15)
    assert asked.accepted and asked.report is None
    assert scp.report_answers == [0x0110]  # the destination keeps it and sends it again


def test_a_refused_or_unanswered_request_says_why(dicom_engine: RunningEngine) -> None:
    refs = [(str(CTImageStorage), str(generate_uid()))]
    with commitment_scp(CommitmentSCP(status=0x0110, report=False)) as port:
        refused = ask(dicom_engine, Peer("SCPEER", "127.0.0.1", port), refs)
    assert (refused.accepted, refused.status, refused.report) == (False, 0x0110, None)
    assert refused.error == "N-ACTION refused: status 0x0110"
    nobody = ask(dicom_engine, Peer("SCPEER", "127.0.0.1", free_port()), refs)
    assert (nobody.accepted, nobody.status) == (False, None)
    assert nobody.error.startswith("association failed")
    # the caller decides what an unanswered request comes to; until then the operator sees both waiting
    waiting = radbridge(dicom_engine, "commitments", "--older-than", "0")
    assert waiting.returncode == 1, waiting.stderr
    assert refused.transaction_uid in waiting.stdout and nobody.transaction_uid in waiting.stdout
    assert "2 transaction(s) waiting for a report for more than 0 min" in waiting.stdout
    with dicom_engine.db.writer.begin() as conn:
        assert record_failure(conn, refused.transaction_uid, refused.error)
        assert not record_failure(conn, refused.transaction_uid, "again")  # only a waiting one
    waiting = radbridge(dicom_engine, "commitments")
    assert waiting.returncode == 0 and refused.transaction_uid not in waiting.stdout
    assert nobody.transaction_uid in waiting.stdout and "1 transaction(s) waiting" in waiting.stdout
    one = radbridge(dicom_engine, "commitments", refused.transaction_uid)
    assert one.returncode == 0 and " failed " in one.stdout and "error: N-ACTION refused: status 0x0110" in one.stdout


def radbridge(eng: RunningEngine, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RADBRIDGE_DATABASE_URL": eng.settings.database_url}
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)
