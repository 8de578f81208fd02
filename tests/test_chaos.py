"""Chaos: mixed HL7, FHIR and DICOM traffic into an engine process that is killed (SIGKILL) three
times at random points and restarted; then everything acknowledged is stored and applied once, and
every study reaches the stand-in EHR once (one ORU per study, the same MSH-10 if it was resent; one
ImagingStudy), within 60 s of the last restart.

The senders behave as real ones do: a message without an answer (the engine died) is sent again,
the same bytes, once the engine is back; FHIR writes are conditional updates (idempotent by
identifier); an image without a C-STORE response is sent again. Seeded: RADBRIDGE_CHAOS_SEED
replays a run, RADBRIDGE_CHAOS_ROUNDS makes it longer (docs/reliability.md)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from engine.reconciliation.queue import QUEUE
from engine.standin_ehr import StandInEHR, msh_fields
from engine.store.models import Delivery, Instance, Message, Order, Patient, PatientIdentifier
from tests.dicomutil import DCMTK_ENV, make_instance, require_dcmtk
from tests.hl7util import ack_code, adt, orm, segment
from tests.processes import EngineProcess
from tests.test_outbound import EHR_TOKEN, fast_retries
from tests.waiting import wait_until

SEED = int(os.environ.get("RADBRIDGE_CHAOS_SEED", "0")) or random.SystemRandom().randrange(1, 1 << 30)
ROUNDS = int(os.environ.get("RADBRIDGE_CHAOS_ROUNDS", "12"))
KILLS = 3
RESUME_SECONDS = 60  # the promise: pending work resumes within this after a restart
FHIR_SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"


class Traffic(threading.Thread):
    """One patient per round: ADT (MLLP), a conditional-update FHIR Patient, an order (MLLP), and two
    images of the ordered study (storescu), each resent until answered, as real senders do."""

    def __init__(self, eng: EngineProcess, tmp: Path, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.eng, self.tmp, self.rng = eng, tmp, rng
        self.acked_hl7: dict[str, str] = {}  # control ID -> ACK code
        self.fhir_done: list[str] = []
        self.stored_sops: list[str] = []
        self.studies: dict[str, str] = {}  # accession -> study UID
        self.resends = Counter[str]()
        self.error: BaseException | None = None
        self.deadline = time.monotonic() + 600

    def run(self) -> None:
        try:
            for i in range(ROUNDS):
                self.round(i)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def until_answered(self, what: str, attempt: Any) -> Any:
        while time.monotonic() < self.deadline:
            self.eng.up.wait(timeout=60)
            try:
                answer = attempt()
            except (OSError, ConnectionError, TimeoutError):
                answer = None
            if answer is not None:
                return answer
            self.resends[what] += 1
            time.sleep(0.2)
        raise AssertionError(f"{what}: no answer before the deadline")

    def hl7(self, message: str) -> None:
        def attempt() -> str | None:
            with socket.create_connection(("127.0.0.1", self.eng.mllp), timeout=15) as s:
                s.sendall(b"\x0b" + message.encode() + b"\x1c\r")
                buf = b""
                while not buf.endswith(b"\x1c\r"):
                    chunk = s.recv(65536)
                    if not chunk:
                        return None
                    buf += chunk
            reply = buf.strip(b"\x0b\x1c\r").decode()
            return reply if ack_code(reply) in ("AA", "AE") else None  # AR: not stored, send again
        reply = self.until_answered("hl7", attempt)
        self.acked_hl7[segment(reply, "MSA")[2]] = ack_code(reply)

    def fhir(self, mrn: str) -> None:
        import json
        import urllib.error
        import urllib.request
        body = json.dumps({"resourceType": "Patient", "identifier": [{"system": FHIR_SYSTEM, "value": mrn}],
                           "name": [{"family": "Chaos", "given": [mrn]}], "gender": "female"}).encode()

        def attempt() -> int | None:
            req = urllib.request.Request(f"http://127.0.0.1:{self.eng.http}/fhir/Patient?identifier={FHIR_SYSTEM}|{mrn}",
                                         data=body, method="PUT")
            req.add_header("Content-Type", "application/fhir+json")
            req.add_header("Authorization", "Bearer t")
            try:
                with urllib.request.urlopen(req, timeout=15) as resp:  # noqa: S310 - loopback
                    return int(resp.status)
            except urllib.error.HTTPError as exc:
                if exc.code >= 500:
                    return None
                raise AssertionError(f"FHIR PUT answered {exc.code}: {exc.read()[:300]!r}") from None
            except urllib.error.URLError:
                return None
        assert self.until_answered("fhir", attempt) in (200, 201)
        self.fhir_done.append(mrn)

    def images(self, i: int, accession: str, mrn: str) -> None:
        study = self.studies.setdefault(accession, f"1.2.826.0.1.3680043.10.1999.{SEED % 100000}.{i}")
        series = f"{study}.1"
        files = [make_instance(self.tmp / f"r{i}" / f"{n}.dcm", patient_id=mrn, name="SMITH^JOHN",
                               birth_date="19800202", sex="M", accession=accession, study_uid=study,
                               series_uid=series, sop_uid=f"{series}.{n}", number=n) for n in (1, 2)]
        for f in files:
            def attempt(path: Path = f.path) -> str | None:
                res = subprocess.run(["storescu", "-aec", "RADBRIDGE", "127.0.0.1", str(self.eng.dicom), str(path)],
                                     capture_output=True, text=True, timeout=60, env=DCMTK_ENV, check=False)
                return "ok" if res.returncode == 0 else None
            self.until_answered("dicom", attempt)
            self.stored_sops.append(f.sop_uid)

    def round(self, i: int) -> None:
        mrn, accession = f"CH{SEED % 100000}X{i}", f"ACH{i}"
        self.hl7(adt("A04", mrn, "Smith", "John", dob="19800202", sex="M", ctrl=f"CHA{i}"))
        self.fhir(f"F{mrn}")
        self.hl7(orm("NW", f"PL{accession}", accession, mrn, family="Smith", modality="CT", ctrl=f"CHO{i}"))
        self.images(i, accession, mrn)


def test_kill9_three_times_under_mixed_traffic_loses_nothing_and_applies_once(db_url: str, workdir: Path,
                                                                                tmp_path: Path) -> None:
    require_dcmtk()
    print(f"chaos seed {SEED} (RADBRIDGE_CHAOS_SEED={SEED} replays it)")
    rng = random.Random(SEED)
    fast_retries(workdir)
    with StandInEHR(token=EHR_TOKEN) as ehr:
        eng = EngineProcess(workdir, db_url, ehr, RADBRIDGE_STABLE_SECONDS="1", RADBRIDGE_EHR_FHIR_BASE=ehr.fhir_base,
                            RADBRIDGE_EHR_FHIR_TOKEN=EHR_TOKEN).start()
        traffic = Traffic(eng, tmp_path, rng)
        try:
            traffic.start()
            for _ in range(KILLS - 1):  # two kills while traffic flows
                time.sleep(rng.uniform(1.0, 6.0))
                eng.kill()
                eng.start()
            traffic.join(timeout=600)
            assert not traffic.is_alive() and traffic.error is None, traffic.error
            time.sleep(rng.uniform(0.0, 2.0))  # the third while studies stabilize, reconcile and go out
            eng.kill()
            restarted = eng.start().started_at
            done = check_everything(db_url, traffic, ehr, deadline=restarted + RESUME_SECONDS)
            print(f"chaos: {ROUNDS} rounds, resends {dict(traffic.resends)}, all delivered "
                  f"{time.monotonic() - restarted:.1f} s after the last restart; {done}")
        finally:
            eng.stop()


def check_everything(db_url: str, traffic: Traffic, ehr: StandInEHR, *, deadline: float) -> str:
    db = create_engine(db_url)
    try:
        seen: dict[str, Any] = {}

        def delivered() -> bool:
            """No delivery left to send, and each study's results delivered to both destinations. A
            study that got an image after it was first reconciled (a kill delayed a resend past
            stable_seconds) is reconciled again and sent again: that is a new delivery, not a repeat."""
            with Session(db) as s:
                rows = s.execute(select(Delivery.study_id, Delivery.destination, Delivery.state,
                                        Delivery.leased_until, Delivery.leased_by)).all()
                seen["deliveries"] = Counter(r.state for r in rows)
                seen["leased"] = [(str(r.leased_until), r.leased_by) for r in rows if r.leased_until is not None]
                seen["reconciliation queue"] = s.execute(select(QUEUE.c.study_id, QUEUE.c.leased_until,
                                                                QUEUE.c.leased_by)).all()
            settled = set(seen["deliveries"]) <= {"delivered", "superseded"}
            done = {(r.study_id, r.destination) for r in rows if r.state == "delivered"}
            return settled and len(done) == 2 * len(traffic.studies)
        try:
            wait_until(delivered, timeout=max(1.0, deadline - time.monotonic()), interval=0.5,
                       message="every study's ORU and ImagingStudy delivered")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {len(traffic.studies)} studies; {seen}") from None
        with Session(db) as s:
            # every acknowledged HL7 message is stored, and applied once
            for ctrl, code in traffic.acked_hl7.items():
                rows = s.execute(select(Message.status).where(Message.control_id == ctrl)).scalars().all()
                assert rows.count("processed") == 1, (ctrl, code, rows)
                assert set(rows) <= {"processed", "duplicate"}, (ctrl, rows)
            assert s.execute(select(func.count()).select_from(Order)).scalar_one() == ROUNDS
            # every FHIR patient once
            for mrn in traffic.fhir_done:
                n = s.execute(select(func.count()).select_from(PatientIdentifier)
                              .where(PatientIdentifier.value == mrn)).scalar_one()
                assert n == 1, mrn
            assert s.execute(select(func.count()).select_from(Patient)).scalar_one() == 2 * ROUNDS
            # every acknowledged image is indexed once
            sops = Counter(s.execute(select(Instance.sop_instance_uid)).scalars())
            assert set(traffic.stored_sops) <= set(sops) and max(sops.values()) == 1
        # the EHR: each delivered ORU arrived (a resend after a kill repeats its MSH-10, which the EHR
        # de-duplicates on), nothing else arrived, and every study has its results; one ImagingStudy each
        with Session(db) as s:
            sent = set(s.execute(select(Delivery.control_id).where(Delivery.destination == "mllp",
                                                                   Delivery.state == "delivered")).scalars())
        received = [msh_fields(m)[10] for m in ehr.oru_messages()]
        assert set(received) == sent, sorted(map(str, set(received) ^ sent))
        accessions = {next(seg for seg in m.split("\r") if seg.startswith("OBR|")).split("|")[18]
                      for m in ehr.oru_messages()}
        assert accessions == set(traffic.studies)
        for study in traffic.studies.values():
            assert len(ehr.find("ImagingStudy", "urn:dicom:uid", f"urn:oid:{study}")) == 1, study
        resent = len(received) - len(sent)
        return f"{len(sent)} ORUs for {len(traffic.studies)} studies; resent after a kill (same MSH-10): {resent}"
    finally:
        db.dispose()
