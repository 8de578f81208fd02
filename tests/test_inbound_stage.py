"""The one inbound-stage shape (engine/pipeline/stage.py): HL7, FHIR and the DICOM index are each
prepared outside the writer and applied by ``ingest``, which returns only after the COMMIT."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import func, select

from engine.channels import load_channels
from engine.config import Settings
from engine.connectors.registry import connector_specs
from engine.domain.events import EventBus
from engine.pipeline.hl7_inbound import HL7Inbound, Prepared, Stored
from engine.pipeline.stage import InboundStage, ingest
from engine.pipeline.writer import IngestWriter
from engine.runtime import open_mappings
from engine.store.db import Database
from engine.store.models import Message, Patient
from tests.conftest import REPO
from tests.hl7util import adt


def counts(db: Database) -> tuple[int, int]:
    """Messages and patients, read on a connection of its own: only what was committed."""
    with db.read_session() as s:
        return (int(s.execute(select(func.count()).select_from(Message)).scalar() or 0),
                int(s.execute(select(func.count()).select_from(Patient)).scalar() or 0))


def test_an_hl7_message_is_committed_when_ingest_returns(db: Database) -> None:
    settings = Settings()
    settings.mappings_dir = str(REPO / "mappings")
    mappings = open_mappings(settings)
    assert [p for p in mappings.load_all() if p.severity == "error"] == []
    channels, _ = load_channels(REPO / "channels", connector_specs(), set(mappings.names()))
    channel = next(c for c in channels if c.name == "hl7-inbound")
    stage: InboundStage[Prepared, Stored] = HL7Inbound(channel, mappings, bus=EventBus())
    assert isinstance(stage, HL7Inbound)
    prepared = stage.prepare(adt("A01", "STAGE1", "Stage").encode(), "127.0.0.1:1")
    assert counts(db) == (0, 0)  # preparing touches no store
    writer = IngestWriter(db.writer)
    writer.start()
    try:
        stored = asyncio.run(ingest(writer, stage, prepared))
        assert stored.ack_code == "AA"
        assert counts(db) == (1, 1)  # visible to another connection the moment ingest returns
    finally:
        writer.stop()


def test_the_dicom_scp_answers_from_the_index_stage() -> None:
    """C-STORE goes through DicomIndex (prepare, then ingest_blocking), not a private writer job."""
    source = (Path(REPO) / "engine" / "connectors" / "dicom" / "scp.py").read_text()
    assert "ingest_blocking(self.writer, self.index" in source and "record_instance" not in source
