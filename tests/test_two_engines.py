"""Two engine processes on one PostgreSQL database: the same patients arrive through
both at once; each patient and identifier must exist once, and every message must end up applied.

Whether the two actually collide depends on timing; the collision itself is forced, deterministically,
in test_a_concurrent_insert_of_the_same_identifier_is_retried_as_an_update below."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

from sqlalchemy import func, select

from engine.store.models import Message, Patient, PatientIdentifier
from tests.conftest import RunningEngine, make_settings
from tests.hl7util import ack_code, adt, send_many

PATIENTS = 40


def test_two_engines_share_one_database_without_duplicates(pg_url: str, tmp_path: Path, workdir: Path) -> None:
    engines = [RunningEngine(make_settings(workdir, pg_url)).start() for _ in range(2)]
    try:
        barrier = threading.Barrier(8)

        def feed(job: tuple[int, int]) -> list[str]:
            index, part = job
            eng = engines[index]
            # Engine 0 gets A01s, engine 1 A08s for the same patients, four connections each, all at once.
            event = "A01" if index == 0 else "A08"
            messages = [adt(event, f"SH{i}", f"Shared{i}", ts=f"2024031{index}000000",
                            pid_extra=f"~{index}-{i}^^^SSA^SS") for i in range(part, PATIENTS, 4)]
            barrier.wait(30)
            codes = [ack_code(r) for r in send_many(eng.mllp_port, messages)]
            # A sender resends what was NAKed (AR: not stored); bounded.
            for _ in range(3):
                retry = [m for m, c in zip(messages, codes, strict=True) if c != "AA"]
                if not retry:
                    break
                again = iter(ack_code(r) for r in send_many(eng.mllp_port, retry))
                codes = [c if c == "AA" else next(again) for c in codes]
            return codes
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = [c for batch in pool.map(feed, [(e, p) for e in range(2) for p in range(4)]) for c in batch]
        assert results == ["AA"] * (2 * PATIENTS)
        with engines[0].db.read_session() as s:
            assert s.execute(select(func.count()).select_from(Patient)).scalar() == PATIENTS
            mrns = s.execute(select(PatientIdentifier.value, func.count()).where(PatientIdentifier.issuer == "GENHOSP")
                             .group_by(PatientIdentifier.value)).all()
            assert len(mrns) == PATIENTS and all(n == 1 for _v, n in mrns)
            # both engines' extra identifiers landed on the one patient
            owners = s.execute(select(PatientIdentifier.patient_id).where(PatientIdentifier.value.in_(["0-7", "1-7"]))
                               ).scalars().all()
            assert len(owners) == 2 and owners[0] == owners[1]
            assert s.execute(select(func.count()).select_from(Message).where(Message.status == "processed")
                             ).scalar() == 2 * PATIENTS
    finally:
        for eng in engines:
            eng.stop()


def test_a_concurrent_insert_of_the_same_identifier_is_retried_as_an_update(pg_url: str, workdir: Path) -> None:
    """Another process has inserted the same MRN but not committed: our insert waits on the unique
    index, fails when they commit, and the writer retries the message, which now updates."""
    from sqlalchemy import create_engine

    from engine.domain.records import IDENTIFIERS, add
    from engine.domain.records import PATIENTS as PATIENT_TABLE
    from engine.pipeline.hl7_inbound import HL7Inbound
    from engine.pipeline.writer import IngestWriter
    from engine.runtime import load_definitions
    from engine.store import migrate
    from engine.store.db import open_database

    settings = make_settings(workdir, pg_url)
    db = open_database(pg_url)
    migrate.upgrade(db)
    registry, channels, _ = load_definitions(settings)
    inbound = HL7Inbound(next(c for c in channels if c.name == "hl7-inbound"), registry)
    other = create_engine(pg_url)
    writer = IngestWriter(db.writer)
    writer.start()
    try:
        with other.connect() as conn:
            tx = conn.begin()
            pid = add(conn, PATIENT_TABLE, family_name="OtherProcess")
            add(conn, IDENTIFIERS, patient_id=pid, value="RACE1", issuer="GENHOSP", kind="primary")
            prepared = inbound.prepare(adt("A01", "RACE1", "Ours").encode())
            future = writer.submit(lambda s: inbound.apply(s, prepared))
            threading.Timer(0.5, tx.commit).start()  # the other process commits while we wait on the index
            stored = future.result(30)
        assert stored.status == "processed" and writer.stats.retried >= 1
        with db.read_session() as s:
            patients = s.execute(select(Patient.id, Patient.family_name)).all()
        assert patients == [(pid, "Ours")]  # one patient: the retry found theirs and updated it
    finally:
        writer.stop()
        other.dispose()
        db.dispose()
