"""The one inbound-stage shape (engine/pipeline/stage.py): HL7, FHIR and the DICOM index are each
prepared outside the writer and applied by ``ingest``, which returns only after the COMMIT."""

from __future__ import annotations

import asyncio
import functools
import threading
from pathlib import Path

from sqlalchemy import func, select

from engine.channels import load_channels
from engine.config import Settings
from engine.connectors.registry import connector_specs
from engine.domain.events import EventBus, EventKind
from engine.pipeline.hl7_inbound import HL7Inbound, Prepared, Stored
from engine.pipeline.stage import InboundStage, ingest
from engine.pipeline.writer import IngestWriter
from engine.runtime import open_mappings
from engine.store.db import Database
from engine.store.models import DomainEvent, Message, Patient, PatientChange, PatientIdentifier
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


def _stage() -> tuple[HL7Inbound, EventBus]:
    settings = Settings()
    settings.mappings_dir = str(REPO / "mappings")
    mappings = open_mappings(settings)
    mappings.load_all()
    channels, _ = load_channels(REPO / "channels", connector_specs(), set(mappings.names()))
    bus = EventBus()
    return HL7Inbound(next(c for c in channels if c.name == "hl7-inbound"), mappings, bus=bus), bus


def _stored_rows(db: Database) -> dict[str, tuple[str, int]]:
    """control ID -> (status, rows with it), and no other rows left by failed applies."""
    with db.read_session() as s:
        found: dict[str, tuple[str, int]] = {}
        for ctrl, status in s.execute(select(Message.control_id, Message.status)):
            found[ctrl or ""] = (status, found.get(ctrl or "", ("", 0))[1] + 1)
        return found


def test_a_message_failing_to_apply_is_ae_alone_or_in_a_batch_and_leaves_none_of_its_writes(db: Database) -> None:
    """A failure inside the domain (here: a subscriber raising after the patient, its identifiers,
    history and events were written; and a merge into itself) undoes everything that message
    wrote, keeps it once as AE, and leaves the batch's other messages applied."""
    stage, bus = _stage()

    def refuses(_conn: object, event: object) -> None:
        if "BROKEN" in str(getattr(event, "identifier", "")):
            raise RuntimeError("subscriber failed")
    bus.subscribe(EventKind.PATIENT_CREATED, refuses)
    batch = [adt("A01", "GOOD1", "Good", ctrl="C-GOOD1"), adt("A01", "BROKEN1", "Broken", ctrl="C-BROKEN1"),
             adt("A40", "SELF1", "Self", mrg="SELF1", ctrl="C-SELF1"), adt("A01", "GOOD2", "Good", ctrl="C-GOOD2")]
    solo = adt("A01", "BROKEN2", "Broken", ctrl="C-BROKEN2")
    writer = IngestWriter(db.writer)
    writer.start()
    gate = threading.Event()
    try:
        held = writer.submit(lambda _s: gate.wait(10))  # holds the writer so that the batch forms
        futures = [writer.submit(functools.partial(stage.apply, p=stage.prepare(m.encode(), "127.0.0.1:1")))
                   for m in batch]
        gate.set()
        assert held.result(10) is True
        codes = [f.result(10).ack_code for f in futures]
        alone = writer.run_sync(functools.partial(stage.apply, p=stage.prepare(solo.encode(), "127.0.0.1:1")))
        assert writer.stats.largest_batch >= 5
    finally:
        writer.stop()
    assert codes == ["AA", "AE", "AE", "AA"] and alone.ack_code == "AE"
    assert _stored_rows(db) == {"C-GOOD1": ("processed", 1), "C-BROKEN1": ("error", 1), "C-SELF1": ("error", 1),
                                "C-GOOD2": ("processed", 1), "C-BROKEN2": ("error", 1)}
    with db.read_session() as s:
        assert s.execute(select(func.count()).select_from(Patient)).scalar() == 2
        assert s.execute(select(func.count()).select_from(PatientIdentifier)).scalar() == 2
        assert s.execute(select(func.count()).select_from(PatientChange)).scalar() == 2
        kinds = list(s.execute(select(DomainEvent.kind)).scalars())
        assert kinds == ["patient.created", "patient.created"]
        errors = {ctrl: error for ctrl, error in s.execute(select(Message.control_id, Message.error))}
    assert "subscriber failed" not in (errors["C-BROKEN1"] or "")  # an internal error says no more than that
    assert "into itself" in (errors["C-SELF1"] or "")


def test_a_fhir_transaction_failing_to_apply_is_refused_alone_or_in_a_batch_and_leaves_none_of_its_writes(
        db: Database) -> None:
    """A transaction Bundle whose second entry fails (an order without any identifier, after its
    Patient was created) undoes its Patient too, is kept once as an error with the entry's reason, and
    leaves the other requests of the writer's batch applied; the same alone in its transaction."""
    from engine.pipeline.fhir_inbound import FhirInbound, FhirRequest, Interaction
    from tests.fhirutil import patient, service_request

    settings = Settings()
    settings.mappings_dir = str(REPO / "mappings")
    mappings = open_mappings(settings)
    mappings.load_all()
    channels, _ = load_channels(REPO / "channels", connector_specs(), set(mappings.names()))
    stage = FhirInbound(next(c for c in channels if c.name == "fhir-inbound"), mappings, bus=EventBus())

    def transaction(mrn: str, accession: str, *, broken: bool = False) -> FhirRequest:
        url = f"urn:uuid:00000000-0000-4000-8000-{len(mrn):04d}{mrn[-8:]:0>8}"
        order = service_request(accession, {"reference": url}, **({"identifier": []} if broken else {}))
        return stage.prepare(b"{}", "Bundle^transaction", [
            Interaction("POST", "Patient", patient(mrn, "Tx"), full_url=url, where="Bundle.entry[0]: "),
            Interaction("POST", "ServiceRequest", order, where="Bundle.entry[1]: ")], mode="transaction",
            request_id=mrn)
    batch = [transaction("FGOOD1", "FA1"), transaction("FBROKEN1", "FA2", broken=True), transaction("FGOOD2", "FA3")]
    writer = IngestWriter(db.writer)
    writer.start()
    gate = threading.Event()
    try:
        held = writer.submit(lambda _s: gate.wait(10))  # holds the writer so that the batch forms
        futures = [writer.submit(functools.partial(stage.apply, req=req)) for req in batch]
        gate.set()
        assert held.result(10) is True
        results = [f.result(10) for f in futures]
        alone = writer.run_sync(functools.partial(stage.apply, req=transaction("FBROKEN2", "FA4", broken=True)))
        assert writer.stats.largest_batch >= 4
    finally:
        writer.stop()
    assert [r.error is None for r in results] == [True, False, True]
    assert batch[1].refused is results[1].error  # undone by the writer (RedoJob), then kept as refused
    for refused in (results[1], alone):
        assert refused.error is not None and refused.error.status == 422
        assert refused.error.diagnostics.startswith("Bundle.entry[1]: ")
        assert "no placer number, filler number or accession" in refused.error.diagnostics
    with db.read_session() as s:
        rows = {ctrl: status for ctrl, status in s.execute(select(Message.control_id, Message.status))}
        assert rows == {"FGOOD1": "processed", "FBROKEN1": "error", "FGOOD2": "processed", "FBROKEN2": "error"}
        values = set(s.execute(select(PatientIdentifier.value)).scalars())
        assert values == {"FGOOD1", "FGOOD2"}
        assert s.execute(select(func.count()).select_from(Patient)).scalar() == 2
