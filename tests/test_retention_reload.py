"""Retention prunes in short batches without stopping ingest; mappings reload while running."""

from __future__ import annotations

import concurrent.futures
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select, update

from engine.store.models import Message, MessageContent, Patient
from engine.store.retention import prune
from engine.store.types import utcnow
from tests.conftest import RunningEngine
from tests.hl7util import ack_code, adt, send, send_many


def test_pruning_during_ingest_drops_old_content_then_rows_and_keeps_errors(running: RunningEngine) -> None:
    port = running.mllp_port
    send_many(port, [adt("A01", f"OLD{i}", "Old") for i in range(120)])
    send(port, adt("A01", "OLDERR", "Old", dob="bad"))
    with running.db.write_session() as s, s.begin():  # make them old: 40 days, and 400 for the first 50
        s.execute(update(Message).values(received_at=utcnow() - timedelta(days=40)))
        s.execute(update(Message).where(Message.id <= 50).values(received_at=utcnow() - timedelta(days=400)))
    policy = running.settings.retention
    policy.batch_size, policy.pause_seconds = 25, 0.0

    def ingest() -> list[str]:
        return [ack_code(r) for r in send_many(port, [adt("A01", f"NEW{i}", "New") for i in range(100)])]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(ingest)
        report = prune(running.db, policy)
        codes = fut.result(60)
    assert codes == ["AA"] * 100
    assert report.content == 120 and report.messages == 50 and report.batches >= 7  # 25 per batch
    with running.db.read_session() as s:
        assert s.execute(select(func.count()).select_from(Message)).scalar() == 171
        assert s.execute(select(func.count()).select_from(MessageContent)).scalar() == 101  # 100 new + the error
        err = s.execute(select(Message).where(Message.status == "error")).scalar_one()
        assert err.content_pruned is False
        assert s.execute(select(func.count()).select_from(Patient)).scalar() == 220  # domain data untouched


def test_a_changed_mapping_applies_to_the_next_message_without_restart(running: RunningEngine) -> None:
    port = running.mllp_port
    assert ack_code(send(port, adt("A01", "RL1", "Before", pid_extra="~X9^^^OTHER^PI"))) == "AA"
    mapping = Path(running.settings.mappings_dir) / "hl7-patient.yaml"
    mapping.write_text(mapping.read_text().replace("patient.family_name: PID-5.1.1",
                                                   "patient.family_name:\n    from: PID-5.1.1\n"
                                                   "    transform: [upper]"))
    deadline = time.monotonic() + 15
    family = None
    i = 0
    while time.monotonic() < deadline and family != "AFTER":
        i += 1
        send(port, adt("A01", f"RL2-{i}", "After"))
        with running.db.read_session() as s:
            family = s.execute(select(Patient.family_name).order_by(Patient.id.desc()).limit(1)).scalar()
        time.sleep(0.1)
    assert family == "AFTER"
    # a broken edit is refused and the last good version stays in use
    mapping.write_text("source: hl7v2\nfields:\n  patient.id: [\n")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not running.engine.mappings.problems("hl7-patient"):
        time.sleep(0.1)
    assert "YAML syntax" in str(running.engine.mappings.problems("hl7-patient")[0])
    assert ack_code(send(port, adt("A01", "RL3", "Still"))) == "AA"
    ch = next(c for c in running.api("/api/channels")[1]["channels"] if c["name"] == "hl7-inbound")
    assert any("YAML syntax" in p for p in ch["mapping_problems"])
