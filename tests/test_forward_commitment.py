"""dicom-forward with storage_commitment: true, over real associations. Orthanc (from Debian, on
loopback) is the PACS: it stores what the engine forwards and, asked to commit, reports on an
association of its own to the engine's DICOM channel (declared in its DicomModalities). dcmtk's storescp
takes the images but has no Storage Commitment: the delivery must then never count as delivered, and
the images must not be sent again while the engine keeps asking."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import select

from engine.store.models import StorageCommitment
from engine.store.states import CommitmentState
from tests.conftest import RunningEngine, make_settings
from tests.dicomutil import StoreSCP, free_port, orthanc_process, require_dcmtk
from tests.test_forward import attempts, deliveries, forward_channel, order_and_images, settled, wake
from tests.test_reconciliation import settle
from tests.waiting import wait_until


def start(workdir: Path, db_url: str, dicom_port: int = 0) -> RunningEngine:
    s = make_settings(workdir, db_url)
    s.dicom.stable_seconds = 3600
    s.dicom.port = dicom_port
    return RunningEngine(s).start()


def commitments(e: RunningEngine) -> list[StorageCommitment]:
    with e.db.read_session() as s:
        return list(s.execute(select(StorageCommitment).order_by(StorageCommitment.requested_at)).scalars())


def test_a_forward_counts_as_delivered_once_orthanc_has_committed_every_instance(workdir: Path, tmp_path: Path,
                                                                                 db_url: str) -> None:
    require_dcmtk()
    engine_port = free_port()
    modalities = {"radbridge": {"AET": "RADBRIDGE", "Host": "127.0.0.1", "Port": engine_port}}
    with orthanc_process(tmp_path, {"DicomModalities": modalities}) as (orthanc_port, http_port):
        forward_channel(workdir, orthanc_port, aet="ORTHANC", calling_aet="RADBRIDGE", storage_commitment=True)
        e = start(workdir, db_url, engine_port)
        try:
            objs = order_and_images(e, tmp_path, "MRN7", "ACC7", n=3)
            settle(e)
            [d] = settled(e, 1)
            [c] = commitments(e)
            assert (c.state, c.instances, c.committed, c.failed, c.answered_by) == (
                CommitmentState.COMMITTED, 3, 3, None, "ORTHANC")
            assert (c.delivery_id, c.destination) == (d.id, "pacs")
            made = attempts(e, d.id)
            assert made[-1].status == "committed" and made[-1].outcome == "delivered"
            assert all(a.status == "commitment" and a.outcome == "retry" for a in made[:-1])  # stored, then waited
            assert d.detail is not None and "commitment" not in d.detail

            def get(path: str) -> Any:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=10) as r:  # noqa: S310
                    return json.loads(r.read())
            tags = [get(f"/instances/{i}/simplified-tags") for i in get("/instances")]
            assert sorted(t["SOPInstanceUID"] for t in tags) == sorted(o.sop_uid for o in objs)
            assert {t["PatientName"] for t in tags} == {"Smith^John"}  # as reconciled
        finally:
            e.stop()


def test_a_destination_that_cannot_commit_never_counts_as_delivered_and_gets_each_image_once(
        workdir: Path, tmp_path: Path, db_url: str) -> None:
    require_dcmtk()
    scp = StoreSCP(tmp_path / "storescp").start()
    try:
        forward_channel(workdir, scp.port, storage_commitment=True)
        e = start(workdir, db_url)
        try:
            objs = order_and_images(e, tmp_path, "MRN8", "ACC8", n=3)
            settle(e)
            wake(e)
            wait_until(lambda: [d.attempts >= 3 for d in deliveries(e)] == [True], timeout=40,
                       message="the delivery asked for commitment three times")
            [d] = deliveries(e)
            assert d.state == "pending"
            assert "storage commitment failed" in (d.last_error or "") and d.detail and d.detail.get("stored")
            assert {a.status for a in attempts(e, d.id)} == {"commitment"}
            assert Counter(ds.SOPInstanceUID for ds in scp.received()) == Counter(o.sop_uid for o in objs)
            assert {c.state for c in commitments(e)} == {CommitmentState.FAILED}
        finally:
            e.stop()
    finally:
        scp.stop()
