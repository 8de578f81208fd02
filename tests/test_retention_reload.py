"""Retention prunes in short batches without stopping ingest; mappings reload while running."""

from __future__ import annotations

import concurrent.futures
import itertools
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select, text, update

from engine.store.db import Database
from engine.store.models import Message, MessageContent, Patient
from engine.store.retention import prune
from engine.store.types import utcnow
from tests.conftest import RunningEngine
from tests.hl7util import ack_code, adt, send, send_many
from tests.waiting import wait_until


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


def test_only_duplicates_are_indexed_by_duplicate_of_and_retention_still_finds_them(db: Database) -> None:
    """ix_messages_duplicate_of holds the resends only (not a page per message), and the lookups
    retention makes (IN, and the foreign key's =) still go through it, not a scan."""
    probes = ("SELECT id FROM messages WHERE duplicate_of IN (1, 2, 3)", "SELECT id FROM messages WHERE duplicate_of = 7")
    with db.writer.connect() as conn:
        if db.is_postgres:
            conn.execute(text("SET enable_seqscan = off"))  # an empty table: ask whether the index can serve
            plans = [" ".join(str(r[0]) for r in conn.execute(text("EXPLAIN " + q))) for q in probes]
            definition = conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_messages_duplicate_of'"))
        else:
            plans = [" ".join(str(r[-1]) for r in conn.execute(text("EXPLAIN QUERY PLAN " + q))) for q in probes]
            definition = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'ix_messages_duplicate_of'"))
        assert "duplicate_of IS NOT NULL" in str(definition.scalar()).replace("(", "").replace(")", "")
    for plan in plans:
        assert "ix_messages_duplicate_of" in plan, plan


def test_a_changed_mapping_applies_to_the_next_message_without_restart(running: RunningEngine) -> None:
    port = running.mllp_port
    assert ack_code(send(port, adt("A01", "RL1", "Before", pid_extra="~X9^^^OTHER^PI"))) == "AA"
    mapping = Path(running.settings.mappings_dir) / "hl7-patient.yaml"
    mapping.write_text(mapping.read_text().replace("patient.family_name: PID-5.1.1",
                                                   "patient.family_name:\n    from: PID-5.1.1\n"
                                                   "    transform: [upper]"))
    sent = itertools.count(1)

    def next_a01_upper_cased() -> bool:  # each try is a new A01: the reload happens between two of them
        send(port, adt("A01", f"RL2-{next(sent)}", "After"))
        with running.db.read_session() as s:
            return s.execute(select(Patient.family_name).order_by(Patient.id.desc()).limit(1)).scalar() == "AFTER"
    wait_until(next_a01_upper_cased, timeout=15, interval=0.1,
               message="a new A01 to be mapped with the edited hl7-patient mapping (family name upper-cased)")
    # a broken edit is refused and the last good version stays in use
    mapping.write_text("source: hl7v2\nfields:\n  patient.id: [\n")
    wait_until(lambda: running.engine.mappings.problems("hl7-patient"), timeout=15, interval=0.1,
               message="the broken hl7-patient mapping to be reported")
    assert "YAML syntax" in str(running.engine.mappings.problems("hl7-patient")[0])
    assert ack_code(send(port, adt("A01", "RL3", "Still"))) == "AA"
    ch = next(c for c in running.api("/api/channels")[1]["channels"] if c["name"] == "hl7-inbound")
    assert any("YAML syntax" in p for p in ch["mapping_problems"])
