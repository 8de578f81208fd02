"""dicom-forward over real sockets: ADT/ORM in over MLLP, images in with dcmtk's storescu, reconciled by the
engine, then forwarded by C-STORE to dcmtk's storescp (+uf: every C-STORE received is a file of its own, so
a resend would show), to Orthanc (as PACS, checked through its REST API), or to a pynetdicom SCP started by
the test (what storescp cannot be made to do: refuse a SOP class, answer A700 once).

Stability is driven by the test (settle); the delivery workers run as in production; every wait is a
bounded poll.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.uid import generate_uid
from sqlalchemy import select

from engine.channels import FORWARD_RECON_STATES, ForwardDestination
from engine.connectors.registry import connector_specs
from engine.store.models import Delivery, DeliveryAttempt, Study
from engine.store.states import ReconState
from tests.conftest import REPO, RunningEngine, make_settings
from tests.dicomutil import Obj, StoreSCP, free_port, make_instance, require_dcmtk, storescu
from tests.hl7util import adt, orm
from tests.test_dicomweb import orthanc  # noqa: F401 - the Orthanc fixture
from tests.test_reconciliation import hl7, settle
from tests.waiting import wait_until

WAIT = 40.0
CHANNEL = "pacs-forward"


@pytest.fixture(autouse=True)
def _dcmtk() -> None:
    require_dcmtk()


# --- peers ---------------------------------------------------------------------------------------------------
@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StoreSCP]:
    s = StoreSCP(tmp_path / "storescp").start()
    try:
        yield s
    finally:
        s.stop()


class PySCP:
    """A pynetdicom storage SCP on loopback taking only ``sop_classes``; ``answer(sop_uid, n)`` gives the
    status of the n-th C-STORE of that instance (default success). ``stored``: instances answered success."""

    def __init__(self, port: int, sop_classes: list[str], answer: Callable[[str, int], int] | None = None) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        ae = AE(ae_title="PYSCP")
        for c in sop_classes:
            ae.add_supported_context(c, ALL_TRANSFER_SYNTAXES)
        self.answer = answer or (lambda _uid, _n: 0)
        self.seen: Counter[str] = Counter()
        self.stored: list[str] = []
        self._lock = threading.Lock()
        self.server = ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.on_store)])

    def on_store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.seen[uid] += 1
            status = self.answer(uid, self.seen[uid])
            if status == 0:
                self.stored.append(uid)
        return status

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


# --- the engine ----------------------------------------------------------------------------------------------
def forward_channel(workdir: Path, port: int, *, aet: str = "STORESCP", routes: list[dict[str, Any]] | None = None,
                    **dest: Any) -> None:
    """channels/pacs-forward.yaml enabled, one destination ``pacs`` on loopback ``port``, short backoff."""
    path = workdir / "channels" / "pacs-forward.yaml"
    data = yaml.safe_load(path.read_text())
    data["enabled"] = True
    data["destinations"] = {"pacs": {"aet": aet, "host": "127.0.0.1", "port": port, "timeout_seconds": 10,
                                     "max_attempts": 1000, "backoff_initial_seconds": 0.1,
                                     "backoff_max_seconds": 0.3, **dest}}
    data["routes"] = routes or [{"when": ["study.reconciled", "study.corrected"], "to": "pacs"}]
    path.write_text(yaml.safe_dump(data))


def start(workdir: Path, db_url: str) -> RunningEngine:
    s = make_settings(workdir, db_url)
    s.dicom.stable_seconds = 3600
    return RunningEngine(s).start()


def images(e: RunningEngine, tmp: Path, n: int, *, calling: str = "TESTSCU", **kw: Any) -> list[Obj]:
    """``n`` CT instances of one new study and series, sent with storescu from AE ``calling``."""
    study_uid, series_uid = generate_uid(), generate_uid()
    objs = [make_instance(tmp / f"{generate_uid()}.dcm", number=i + 1, study_uid=study_uid, series_uid=series_uid,
                          **kw) for i in range(n)]
    proc = storescu(e.dicom_port, [o.path for o in objs], calling=calling)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return objs


def order_and_images(e: RunningEngine, tmp: Path, mrn: str, acc: str, n: int = 3, **kw: Any) -> list[Obj]:
    """Patient Smith^John and an order; images whose PatientName is misspelt (the engine coerces it)."""
    hl7(e, adt("A04", mrn, "Smith", "John", dob="19800202", sex="M"), orm("NW", f"PL{acc}", acc, mrn, modality="CT"))
    kw.setdefault("name", "SMIHT^JOHN")
    return images(e, tmp, n, accession=acc, patient_id=mrn, birth_date="19800202", sex="M", issuer="GENHOSP", **kw)


def wake(e: RunningEngine) -> None:
    e.loop.call_soon_threadsafe(e.engine.wake_outbound)


def deliveries(e: RunningEngine) -> list[Delivery]:
    with e.db.read_session() as s:
        return list(s.execute(select(Delivery).where(Delivery.channel == CHANNEL).order_by(Delivery.id)).scalars())


def attempts(e: RunningEngine, delivery_id: int) -> list[DeliveryAttempt]:
    with e.db.read_session() as s:
        return list(s.execute(select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == delivery_id)
                              .order_by(DeliveryAttempt.id)).scalars())


def settled(e: RunningEngine, n: int, state: str = "delivered") -> list[Delivery]:
    """The channel's ``n`` deliveries once every one is in ``state``."""
    def check() -> list[Delivery]:
        found = deliveries(e)
        return found if len(found) == n and all(d.state == state for d in found) else []
    wake(e)
    return wait_until(check, timeout=WAIT, interval=0.1, message=f"{n} forward deliveries {state}")


def study_id(e: RunningEngine, uid: str) -> int:
    with e.db.read_session() as s:
        return int(s.execute(select(Study.id).where(Study.study_uid == uid)).scalar_one())


def cli(e: RunningEngine, *args: str) -> subprocess.CompletedProcess[str]:
    s = e.settings
    env = {**os.environ, "RADBRIDGE_DATABASE_URL": s.database_url, "RADBRIDGE_STORAGE_DIR": s.storage.dir,
           "RADBRIDGE_CHANNELS_DIR": s.channels_dir, "RADBRIDGE_MAPPINGS_DIR": s.mappings_dir, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=60,
                          env=env)


# --- 1, 2: headers as reconciled -----------------------------------------------------------------------------
def test_reconciled_study_reaches_storescp_with_the_reconciled_headers(workdir: Path, db_url: str, scp: StoreSCP,
                                                                       tmp_path: Path) -> None:
    forward_channel(workdir, scp.port)
    e = start(workdir, db_url)
    try:
        objs = order_and_images(e, tmp_path, "MRN1", "ACC1")
        assert deliveries(e) == []  # nothing before the study is reconciled
        settle(e)
        [d] = settled(e, 1)
        got = scp.received()
        assert sorted(ds.SOPInstanceUID for ds in got) == sorted(o.sop_uid for o in objs)  # each once
        assert {(str(ds.PatientName), ds.PatientID, ds.AccessionNumber) for ds in got} == {("Smith^John", "MRN1",
                                                                                           "ACC1")}
        assert [ds.InstanceNumber for ds in got] == [1, 2, 3]  # in instance order
        sid = study_id(e, objs[0].study_uid)
        assert (d.channel, d.destination, d.mapping, d.event, d.study_id, d.instance_id, d.order_key) == (
            CHANNEL, "pacs", "dicom-forward", "study.reconciled", sid, None, f"study:{sid}")
        assert d.attempts == 1 and d.target == f"STORESCP@127.0.0.1:{scp.port}" and d.last_error is None
        assert d.detail == {"instances": 3, "sent": 3, "acknowledged": []}
        [a] = attempts(e, d.id)
        assert (a.outcome, a.status) == ("delivered", "0000") and "3 of 3 instances stored" in (a.response or "")
        status, body = e.api("/api/channels")
        [ch] = [c for c in body["channels"] if c["name"] == CHANNEL]
        assert ch["state"] == "running" and ch["destinations"]["pacs"] == {
            "type": "dicom", "address": f"STORESCP@127.0.0.1:{scp.port}", "paused_seconds": 0.0,
            "failed_passes_in_a_row": 0}
        status, health = e.api("/health")
        assert status == 200 and health["checks"]["channels"][CHANNEL]["destinations"]["pacs"]["failing"] is False
        status, one = e.api(f"/api/deliveries/{d.id}")
        assert status == 200 and one["destination"] == "pacs" and one["attempts_made"][0]["status"] == "0000"
    finally:
        e.stop()


def test_reconciled_study_reaches_orthanc_with_the_reconciled_headers(workdir: Path, tmp_path: Path,
                                                                      orthanc: tuple[int, int]) -> None:  # noqa: F811
    dicom_port, http_port = orthanc
    forward_channel(workdir, dicom_port, aet="ORTHANC")
    e = start(workdir, f"sqlite:///{tmp_path / 'var' / 'radbridge.db'}")
    try:
        objs = order_and_images(e, tmp_path, "MRN2", "ACC2")
        settle(e)
        settled(e, 1)

        def get(path: str) -> Any:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=10) as r:  # noqa: S310
                return json.loads(r.read())
        ids = get("/instances")
        tags = [get(f"/instances/{i}/simplified-tags") for i in ids]
        assert sorted(t["SOPInstanceUID"] for t in tags) == sorted(o.sop_uid for o in objs)
        assert {(t["PatientName"], t["PatientID"], t["AccessionNumber"]) for t in tags} == {("Smith^John", "MRN2",
                                                                                             "ACC2")}
    finally:
        e.stop()


# --- 3: the destination down, then back ----------------------------------------------------------------------
def test_destination_down_then_back_every_instance_arrives_once(workdir: Path, db_url: str, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there yet
    forward_channel(workdir, port)
    e = start(workdir, db_url)
    scp = StoreSCP(tmp_path / "storescp", port)
    try:
        objs = order_and_images(e, tmp_path, "MRN3", "ACC3", n=4)
        settle(e)
        wake(e)
        wait_until(lambda: [d.attempts >= 2 for d in deliveries(e)] == [True], timeout=WAIT,
                   message="the delivery tried (and failed) twice")
        [d] = deliveries(e)
        assert d.state == "pending" and "no association with STORESCP@127.0.0.1" in (d.last_error or "")
        assert {a.status for a in attempts(e, d.id)} == {"refused"}
        scp.start()
        [d] = settled(e, 1)
        got = scp.received()
        assert Counter(ds.SOPInstanceUID for ds in got) == Counter(o.sop_uid for o in objs)  # each exactly once
        made = attempts(e, d.id)
        assert d.attempts == len(made) >= 3 and [a.outcome for a in made][-1] == "delivered"
        assert all(a.outcome == "retry" for a in made[:-1])
    finally:
        scp.stop()
        e.stop()


def test_a_retry_sends_only_what_the_destination_has_not_taken(workdir: Path, tmp_path: Path) -> None:
    """The destination takes two instances, answers A700 (out of resources) to the third: the retry sends
    the third and fourth only; each instance reaches it once."""
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
    port = free_port()
    forward_channel(workdir, port, aet="PYSCP")
    e = start(workdir, f"sqlite:///{tmp_path / 'var' / 'radbridge.db'}")
    objs: list[Obj] = []
    full = {"once": True}

    def answer(uid: str, n: int) -> int:
        if uid == objs[2].sop_uid and full["once"]:
            full["once"] = False
            return 0xA700
        return 0
    peer = PySCP(port, [CTImageStorage], answer)
    try:
        objs.extend(order_and_images(e, tmp_path, "MRN4", "ACC4", n=4))
        settle(e)
        [d] = settled(e, 1)
        assert peer.stored == [o.sop_uid for o in objs]  # in order, each once
        assert peer.seen == Counter({o.sop_uid: 2 if i == 2 else 1 for i, o in enumerate(objs)})
        first, second = attempts(e, d.id)
        assert (first.outcome, first.status) == ("retry", "A700") and objs[2].sop_uid in (first.error or "")
        assert "2 of 4 instances stored" in (first.response or "")
        assert (second.outcome, second.status) == ("delivered", "0000") and "2 of 2" in (second.response or "")
        assert d.detail == {"instances": 4, "sent": 4, "acknowledged": []}
    finally:
        peer.stop()
        e.stop()


# --- 4: a correction after an A08 ------------------------------------------------------------------------------
def test_correction_after_a08_is_forwarded_again_with_the_new_name(workdir: Path, db_url: str, scp: StoreSCP,
                                                                   tmp_path: Path) -> None:
    forward_channel(workdir, scp.port)
    e = start(workdir, db_url)
    try:
        objs = order_and_images(e, tmp_path, "MRN5", "ACC5", n=2)
        settle(e)
        settled(e, 1)
        hl7(e, adt("A08", "MRN5", "Smythe", "John", dob="19800202", sex="M"))
        settle(e)  # the A08 queued the patient's studies: coerced again, study.corrected
        first, second = settled(e, 2)
        assert (first.event, second.event) == ("study.reconciled", "study.corrected")
        got = scp.received()
        assert len(got) == 4
        for o in objs:  # each instance twice: as reconciled, then as corrected (in that order)
            assert [str(ds.PatientName) for ds in got if ds.SOPInstanceUID == o.sop_uid] == ["Smith^John",
                                                                                              "Smythe^John"]
    finally:
        e.stop()


# --- 5: filters, instance.received, dead letter and retry ------------------------------------------------------
def test_filters_take_only_the_studies_they_name(workdir: Path, db_url: str, scp: StoreSCP, tmp_path: Path) -> None:
    forward_channel(workdir, scp.port, routes=[{
        "when": ["study.reconciled", "study.stable"], "to": "pacs",
        "filter": {"modality": ["CT"], "calling_aet": ["CT1"], "accession": "ACC6*", "reconciliation": ["reconciled"]}}])
    e = start(workdir, db_url)
    try:
        hl7(e, adt("A04", "MRN6", "Smith", "John", dob="19800202", sex="M"))
        for acc in ("ACC61", "ACC62", "ACC63", "XYZ64"):
            hl7(e, orm("NW", f"PL{acc}", acc, "MRN6", modality="CT"))
        who = {"patient_id": "MRN6", "name": "Smith^John", "birth_date": "19800202", "sex": "M", "issuer": "GENHOSP"}
        ok = images(e, tmp_path / "ok", 1, calling="CT1", accession="ACC61", **who)
        images(e, tmp_path / "mr", 1, calling="CT1", accession="ACC62", modality="MR", **who)  # modality
        images(e, tmp_path / "aet", 1, calling="OTHER", accession="ACC63", **who)  # calling AE
        images(e, tmp_path / "acc", 1, calling="CT1", accession="XYZ64", **who)  # accession
        images(e, tmp_path / "unm", 1, calling="CT1", accession="ACC69", patient_id="NOBODY")  # unmatched
        settle(e)
        # study.stable is before reconciliation (pending): only study.reconciled of the first passes
        [d] = settled(e, 1)
        assert (d.event, d.study_id) == ("study.reconciled", study_id(e, ok[0].study_uid))
        assert [ds.SOPInstanceUID for ds in scp.received()] == [ok[0].sop_uid]
    finally:
        e.stop()


def test_instance_received_forwards_each_instance_as_it_is_stored(workdir: Path, db_url: str, scp: StoreSCP,
                                                                  tmp_path: Path) -> None:
    forward_channel(workdir, scp.port, routes=[{"when": "instance.received", "to": "pacs",
                                                "filter": {"modality": "CT"}}])
    e = start(workdir, db_url)
    try:
        objs = images(e, tmp_path / "ct", 3, accession="ACC7")
        images(e, tmp_path / "mr", 1, accession="ACC7", modality="MR")
        found = settled(e, 3)  # no stability, no reconciliation: each instance on its own
        assert [d.event for d in found] == ["instance.received"] * 3 and all(d.instance_id for d in found)
        assert len({d.order_key for d in found}) == 1
        assert sorted(ds.SOPInstanceUID for ds in scp.received()) == sorted(o.sop_uid for o in objs)
    finally:
        e.stop()


def test_refused_sop_class_is_dead_lettered_then_retried_from_the_cli(workdir: Path, tmp_path: Path) -> None:
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]
    port = free_port()
    forward_channel(workdir, port, aet="PYSCP")
    e = start(workdir, f"sqlite:///{tmp_path / 'var' / 'radbridge.db'}")
    peer = PySCP(port, [MRImageStorage])  # takes no CT
    try:
        objs = order_and_images(e, tmp_path, "MRN8", "ACC8", n=2)
        settle(e)
        [d] = settled(e, 1, "dead")
        assert d.attempts == 1 and peer.stored == []
        assert d.last_error == (f"2 instance(s) refused: instance {objs[0].sop_uid}: no context; "
                                f"instance {objs[1].sop_uid}: no context")
        assert "SMITH" not in (d.last_error or "").upper()
        peer.stop()
        peer = PySCP(port, [CTImageStorage])  # fixed at the PACS
        proc = cli(e, "deliveries", "retry", str(d.id))
        assert proc.returncode == 0 and "1 delivery queued again" in proc.stdout, proc.stderr
        [d] = settled(e, 1)
        assert peer.stored == [o.sop_uid for o in objs]
        assert [a.outcome for a in attempts(e, d.id)] == ["dead", "delivered"]
    finally:
        peer.stop()
        e.stop()


# --- 6: configuration errors -------------------------------------------------------------------------------------
def test_forward_channel_problems_name_file_line_and_field(tmp_path: Path) -> None:
    from engine.channels import load_channels
    (tmp_path / "fwd.yaml").write_text(
        "name: fwd\n"                                   # 1
        "connector: {type: dicom-forward}\n"            # 2
        "destinations:\n"                               # 3
        "  pacs:\n"                                     # 4
        "    aet: THIS-AE-TITLE-IS-TOO-LONG\n"          # 5
        "    host: 10.0.0.1\n"                          # 6
        "    port: 70000\n"                             # 7
        "    tls: {ca: ca.pem, cert: me.pem}\n"         # 8
        "    colour: red\n"                             # 9
        "  vna: {host: vna, port: 104}\n"               # 10
        "routes:\n"                                     # 11
        "  - when: [study.arrived]\n"                   # 12
        "    to: nowhere\n"                             # 13
        "    filter:\n"                                 # 14
        "      modality: 5\n"                           # 15
        "      reconciliation: [matched]\n"             # 16
        "      size: big\n")                            # 17
    channels, problems = load_channels(tmp_path, connector_specs())
    assert channels == []
    text = "\n".join(str(p) for p in problems)
    f = str(tmp_path / "fwd.yaml")
    for expected in (f"{f}:5: destinations.pacs.aet: an AE title of 1 to 16 characters",
                     f"{f}:7: destinations.pacs.port: a port number from 1 to 65535, got 70000",
                     f"{f}:8: destinations.pacs.tls: cert and key go together",
                     f"{f}:9: destinations.pacs.colour: unknown key; expected aet, host, port",
                     f"{f}:10: destinations.vna.aet: a DICOM destination needs aet:",
                     f"{f}:12: routes[1].when: unknown event 'study.arrived'; expected one of instance.received",
                     f"{f}:13: routes[1].to: no destination named 'nowhere' (destinations: pacs, vna)",
                     f"{f}:15: routes[1].filter.modality: a list of names, got 5",
                     f"{f}:16: routes[1].filter.reconciliation: unknown reconciliation state 'matched'",
                     f"{f}:17: routes[1].filter.size: unknown key; expected modality, calling_aet, accession"):
        assert expected in text, text


def test_destination_names_are_unique_across_channels(workdir: Path, tmp_path: Path) -> None:
    """Deliveries are claimed by destination name: radbridge check refuses a forward destination named like
    an outbound one (mllp); the shipped forward channel, disabled, checks clean once enabled."""
    path = workdir / "channels" / "pacs-forward.yaml"
    text = path.read_text().replace("enabled: false", "enabled: true")
    path.write_text(text)
    env = {"RADBRIDGE_CHANNELS_DIR": str(workdir / "channels"), "RADBRIDGE_MAPPINGS_DIR": str(workdir / "mappings"),
           "RADBRIDGE_STORAGE_DIR": str(tmp_path / "var"), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, "-m", "engine.cli", "check"], capture_output=True, text=True, timeout=60,
                        env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    path.write_text(text.replace("  pacs:   ", "  mllp:   ").replace("to: pacs", "to: mllp"))
    line = next(i for i, x in enumerate(path.read_text().splitlines(), 1) if x.startswith("  mllp:"))
    bad = subprocess.run([sys.executable, "-m", "engine.cli", "check"], capture_output=True, text=True, timeout=60,
                         env=env)
    assert bad.returncode == 1
    assert (f"pacs-forward.yaml:{line}: destinations.mllp: destination name 'mllp' is also used by channel "
            "ehr-outbound") in bad.stdout + bad.stderr


def test_forward_filter_states_are_the_reconciliation_states() -> None:
    """channels.py (core) cannot import the store's states: its list must agree with ReconState."""
    assert set(FORWARD_RECON_STATES) == {str(s) for s in ReconState}
    assert ForwardDestination(name="x").type == "dicom"
