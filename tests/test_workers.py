"""`radbridge run --workers 2` on PostgreSQL (docs/scaling.md): two worker processes share the
MLLP, DICOM and HTTP ports. Patients arrive over many MLLP connections, which the kernel spreads
over both workers (which worker holds a connection is read from /proc); each patient's messages,
sent in order on one connection, are applied in that order; their studies' ORU^R01 results leave
for the EHR in order per patient, each once. A worker killed is started again; SIGTERM stops all."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from hl7.client import MLLPClient
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from engine.reconciliation.queue import QUEUE
from engine.standin_ehr import StandInEHR, msh_fields
from engine.store.models import Delivery, Instance, Message, Patient, PatientIdentifier, Study
from tests.conftest import REPO, RunningEngine, make_settings, start_dicom_engine
from tests.dicomutil import DCMTK_ENV, RawStoreSCU, make_instance, require_dcmtk
from tests.hl7util import ack_code, adt, orm
from tests.processes import EngineProcess
from tests.test_outbound import fast_retries
from tests.test_reconciliation import events, hl7, settle, store, work
from tests.waiting import wait_until

UPDATES = 5  # A08s per patient after its A01, each a new given name; the last one applied must be the last sent
MIN_PATIENTS = 6
MAX_CONNECTIONS = 64  # opened until both workers hold one (the kernel's spread is a hash: not assumed)
MB = 1024 * 1024
TS = "20240315081500"  # one time stamp for all: an update applied out of order would not be ignored as stale


def server_side_owner(mllp_port: int, client_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the accepted socket of the loopback connection from ``client_port``."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        local, remote = cols[1], cols[2]
        if int(local.split(":")[1], 16) == mllp_port and int(remote.split(":")[1], 16) == client_port:
            inode = cols[9]
    if inode is None:
        return None
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def send(client: MLLPClient, message: str) -> str:
    return ack_code(client.send_message(message).decode("latin-1").strip("\x0b\x1c\r"))


def test_two_workers_share_the_ports_and_keep_per_patient_order(pg_url: str, workdir: Path, tmp_path: Path) -> None:
    require_dcmtk()
    fast_retries(workdir)
    with StandInEHR() as ehr:
        eng = EngineProcess(workdir, pg_url, ehr, RADBRIDGE_STABLE_SECONDS="1")
        eng.workers = 2
        eng.start()
        try:
            workers = eng.children()
            assert len(workers) == 2
            # patient i arrives on connection i: its A01 first, then the worker holding it is known
            clients: list[MLLPClient] = []
            owners: list[int | None] = []
            try:
                while len(clients) < MAX_CONNECTIONS and (len(clients) < MIN_PATIENTS
                                                          or set(owners) != set(workers)):
                    i = len(clients)
                    client = MLLPClient("127.0.0.1", eng.mllp)
                    client.socket.settimeout(30)
                    clients.append(client)
                    assert send(client, adt("A01", f"W{i}", "Smith", "John0", ts=TS, ctrl=f"W{i}-0")) == "AA"
                    owners.append(server_side_owner(eng.mllp, client.socket.getsockname()[1], workers))
                assert set(owners) == set(workers), f"{len(clients)} connections all on one worker: {owners}"

                def feed(i: int) -> list[str]:
                    """The rest of patient i's messages, in order on its connection, each after the last ACK."""
                    msgs = [adt("A08", f"W{i}", "Smith", f"John{k}", ts=TS, ctrl=f"W{i}-{k}")
                            for k in range(1, UPDATES + 1)]
                    msgs += [orm("NW", f"PW{i}-{n}", f"AW{i}-{n}", f"W{i}", family="Smith", modality="CT",
                                 ctrl=f"W{i}-O{n}") for n in (1, 2)]
                    return [send(clients[i], m) for m in msgs]
                with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
                    codes = [c for batch in pool.map(feed, range(len(clients))) for c in batch]
                assert codes == ["AA"] * len(clients) * (UPDATES + 2)
            finally:
                for client in clients:
                    client.close()
            patients = len(clients)

            # two studies per patient, one after the other, each an association of its own (both workers take them)
            def images(i: int) -> None:
                for n in (1, 2):
                    f = make_instance(tmp_path / f"p{i}" / f"{n}.dcm", patient_id=f"W{i}",
                                      name=f"SMITH^JOHN{UPDATES}", accession=f"AW{i}-{n}")
                    res = subprocess.run(["storescu", "-aec", "RADBRIDGE", "127.0.0.1", str(eng.dicom), str(f.path)],
                                         capture_output=True, text=True, timeout=60, env=DCMTK_ENV, check=False)
                    assert res.returncode == 0, res.stderr
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                list(pool.map(images, range(patients)))

            db = create_engine(pg_url)
            try:
                seen: dict[str, object] = {}

                def all_delivered() -> bool:
                    with Session(db) as s:
                        states = Counter(s.execute(select(Delivery.state).where(Delivery.destination == "mllp"))
                                         .scalars())
                        seen["deliveries"] = states
                        seen["studies"] = Counter(s.execute(select(Study.state)).scalars())
                        seen["queue"] = s.execute(select(QUEUE)).all()
                        seen["all"] = s.execute(select(Delivery.id, Delivery.study_id, Delivery.event,
                                                       Delivery.order_key, Delivery.state, Delivery.created_at)).all()
                        seen["leases"] = s.execute(select(Delivery.id, Delivery.leased_by, Delivery.leased_until,
                                                          Delivery.next_at, Delivery.attempts)
                                                   .where(Delivery.state == "pending")).all()
                        studies = Counter(s.execute(select(Delivery.study_id).where(Delivery.destination == "mllp"))
                                          .scalars())
                    # every study's ORU out, nothing left to send, and one per study
                    assert max(studies.values(), default=1) == 1, f"a study sent twice: {seen}"
                    return set(states) == {"delivered"} and len(studies) == 2 * patients
                try:
                    wait_until(all_delivered, timeout=120, interval=0.5, message="every study's ORU delivered")
                except AssertionError as exc:
                    raise AssertionError(f"{exc}: {seen}") from None
                with Session(db) as s:
                    for i in range(patients):
                        # applied in the order sent: every message once, in id order, and the last name wins
                        sent = [f"W{i}-{k}" for k in range(UPDATES + 1)] + [f"W{i}-O1", f"W{i}-O2"]
                        rows = s.execute(select(Message.control_id, Message.status).where(
                            Message.control_id.in_(sent)).order_by(Message.id)).all()
                        assert [r.control_id for r in rows] == sent
                        assert {r.status for r in rows} == {"processed"}
                        given = s.execute(select(Patient.given_name).join(
                            PatientIdentifier, PatientIdentifier.patient_id == Patient.id).where(
                            PatientIdentifier.value == f"W{i}")).scalar_one()
                        assert given == f"John{UPDATES}"
                    deliveries = s.execute(select(Delivery.id, Delivery.control_id, Delivery.order_key)
                                           .where(Delivery.destination == "mllp").order_by(Delivery.id)).all()
                expected: dict[str, list[str]] = defaultdict(list)  # per patient, in delivery (id) order
                for d in deliveries:
                    expected[d.order_key].append(str(d.control_id))
                received = [msh_fields(m)[10] for m in ehr.oru_messages()]
                assert max(Counter(received).values()) == 1, "an ORU was sent twice"
                arrived: dict[str, list[str]] = defaultdict(list)
                key_of = {str(d.control_id): d.order_key for d in deliveries}
                for control_id in received:
                    arrived[key_of[control_id]].append(control_id)
                assert arrived == expected
                assert len(expected) == patients
            finally:
                db.dispose()
            print(f"{patients} patients over {len(clients)} connections: "
                  f"{Counter(owners)} per worker pid; {len(received)} ORUs")

            # a worker killed is started again, and the ports keep working
            victim = workers[0]
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: len(eng.children()) == 2 and victim not in eng.children(), timeout=60, interval=0.2,
                       message="the killed worker to be started again")
            wait_until(lambda: "started again" in eng.log.read_text(errors="replace"), timeout=60,
                       message="the supervisor to say the worker listens again")
            assert f"(pid {victim}) died unexpectedly (exit code -9)" in eng.log.read_text()
            for i in range(8):
                with MLLPClient("127.0.0.1", eng.mllp) as client:
                    client.socket.settimeout(30)
                    assert send(client, adt("A08", "W0", "Smith", f"John{UPDATES}", ts=TS, ctrl=f"K{i}")) == "AA"

            # SIGTERM: every worker drains and stops, then the supervisor exits 0
            assert eng.proc is not None
            children = eng.children()
            eng.proc.send_signal(signal.SIGTERM)
            assert eng.proc.wait(120) == 0, eng.log.read_text(errors="replace")[-3000:]
            for pid in children:
                assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
            assert "Traceback" not in eng.log.read_text(errors="replace")
        finally:
            eng.stop()


def run_cli(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", "run", "--config", str(REPO / "config" / "radbridge.toml"),
                           *args], env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)


def test_workers_need_postgresql(workdir: Path) -> None:
    res = run_cli({"RADBRIDGE_STORAGE_DIR": str(workdir / "var"), "RADBRIDGE_DATABASE_URL": f"sqlite:///{workdir / 'x.db'}"}, "--workers", "2",
                  cwd=workdir)
    assert res.returncode == 2
    assert "--workers 2 needs PostgreSQL" in res.stderr
    assert not (workdir / "x.db").exists()  # refused before anything was created


def test_workers_refuse_port_zero(pg_url: str, workdir: Path) -> None:
    """Port 0 cannot be shared: a worker refuses it at start, and the supervisor exits with its code."""
    env = {"RADBRIDGE_DATABASE_URL": pg_url, "RADBRIDGE_STORAGE_DIR": str(workdir / "var"),
           "RADBRIDGE_CHANNELS_DIR": str(workdir / "channels"), "RADBRIDGE_MAPPINGS_DIR": str(workdir / "mappings"),
           "RADBRIDGE_MLLP_PORT": "0", "RADBRIDGE_DICOM_PORT": "0", "RADBRIDGE_HTTP_PORT": "0",
           "RADBRIDGE_API_TOKEN": "t", "RADBRIDGE_EHR_MLLP": "", "RADBRIDGE_EHR_FHIR_BASE": ""}
    res = run_cli(env, "--workers", "2", cwd=workdir)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "port 0 (any free port) cannot be shared" in res.stderr
    assert "could not start" in res.stderr


def test_an_engine_starting_leaves_the_transfers_of_another_alone(pg_url: str, workdir: Path) -> None:
    """Engines (the workers of one `run --workers`, a restarted one among them) share the storage
    directory and its tmp/, where each C-STORE is received: one starting must not delete what another
    is receiving as if a crash had left it."""
    first = start_dicom_engine(workdir, pg_url)
    second = None
    try:
        scu = RawStoreSCU(first.dicom_port)
        sop_uid = generate_uid()
        scu.begin(sop_uid, 8 * MB)
        scu.send(4 * MB)
        tmp = workdir / "var" / "tmp"
        wait_until(lambda: any(p.stat().st_size >= 2 * MB for p in tmp.glob("tmp*.dcm")), timeout=20,
                   message="the partial file to be written")
        second = start_dicom_engine(workdir, pg_url)
        rsp = scu.finish()
        assert rsp.Status == 0x0000, rsp
        scu.release()
        with first.db.read_session() as s:
            assert s.execute(select(Instance.id).where(Instance.sop_instance_uid == sop_uid)).scalar_one()
    finally:
        if second is not None:
            second.stop()
        first.stop()


def test_engines_starting_together_use_one_generated_token(workdir: Path, pg_url: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """With no token configured each engine (each worker) uses <storage>/api-token, creating it if it
    is not there. Two starting at once both found it missing: the one that lost the race kept a
    secret of its own that the file did not hold, and answered 401 to the token the file gave."""
    import engine.runtime

    settings = make_settings(workdir, pg_url)
    settings.http.tokens = []
    path = Path(settings.storage.dir) / "api-token"
    made = engine.runtime.secrets.token_urlsafe

    def sibling_first(n: int) -> str:  # the other worker writes the file just before this one does
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text("sibling-secret-0d5e\n")
            path.chmod(0o600)
        return made(n)
    monkeypatch.setattr(engine.runtime.secrets, "token_urlsafe", sibling_first)
    eng = RunningEngine(settings).start()
    try:
        assert eng.api("/api/channels", token="sibling-secret-0d5e")[0] == 200
    finally:
        eng.stop()


def test_a_trigger_while_a_study_is_reconciled_does_not_send_it_as_reconciled_twice(
        db_url: str, workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another worker reconciling a sibling study of the same patient (or an ADT) queues this study
    again while its stable run is in flight: the run then goes again, and must not raise
    study.reconciled (one more ORU^R01 and ImagingStudy to the EHR) for a stability already handled.
    Seen with `run --workers 2`: two ORUs for one study, 190 ms apart."""
    import engine.reconciliation.reconciler as reconciler_module
    from engine.reconciliation.queue import enqueue

    e = start_dicom_engine(workdir, db_url)
    try:
        hl7(e, adt("A04", "MRN30", "Hall", "Ben", sex="M"), orm("NW", "PL30", "ACC30", "MRN30"))
        uid = store(e, tmp_path, 1, accession="ACC30", patient_id="MRN30", name="HALL^BEN", sex="M",
                    issuer="GENHOSP").study_uid
        work(e)
        original = reconciler_module.match_study
        triggered: list[int] = []

        def match_then_trigger(conn: Any, study: Any, rules: Any) -> Any:
            if study["state"] == "stable" and not triggered:  # the other worker's trigger, committed mid-run
                triggered.append(study["id"])
                e.engine.writer.run_sync(lambda s: enqueue(s.connection(), study["id"], "patient.updated"))
            return original(conn, study, rules)
        monkeypatch.setattr(reconciler_module, "match_study", match_then_trigger)
        settle(e)
        assert triggered
        assert events(e, uid).count("study.reconciled") == 1, events(e, uid)
    finally:
        e.stop()
