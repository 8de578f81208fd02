"""Storage Commitment on a dicom-forward destination (``storage_commitment: true``; docs/forwarding.md).

A delivery to such a destination is delivered only when the destination has committed every instance
of it. The C-STORE part is the plain forwarder's (engine/connectors/dicom/forward.py); this wraps it:

    no transaction yet         send what the destination has not taken (the forwarder), then ask for
                               commitment of every instance of the delivery (N-ACTION), under a new
                               Transaction UID recorded (and committed) before the request goes out;
                               the delivery waits (retry, "commitment") with the UID in its detail
    report: committed          delivered
    report: failures           the failed instances are sent again, then commitment asked again
    no report within           asked again (the instances are not sent again): a report that was lost
    commitment_timeout_seconds or a destination that forgot the request
    request refused / failed   retry later (asked again); refused for good (no Storage Commitment SOP
                               class at the destination) ends dead with max_attempts, like any retry

The report itself comes to the engine's DICOM channel (engine/connectors/dicom/commitment.py records it
in storage_commitments) or on the requesting association; either way this reads it from the store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import time
from datetime import timedelta
from typing import Any

from engine.channels import ForwardDestination
from engine.connectors.dicom.commitment import new_transaction_uid, report_recorder, request_commitment
from engine.connectors.dicom.forward import DicomForwarder, instances_to_send
from engine.outbound.outbox import Claimed, KeptRendering, Outcome
from engine.store.commitments import CommitmentResult, record_failure, record_request, result_of
from engine.store.db import Database
from engine.store.states import AttemptOutcome, CommitmentState
from engine.store.types import utcnow

log = logging.getLogger(__name__)
WAITING = "commitment"  # the attempt status of a delivery stored but not committed yet


class CommittingForwarder:
    """A ``DeliverySender``: the forwarder's C-STORE, then Storage Commitment before "delivered"."""

    def __init__(self, forwarder: DicomForwarder, writer: Any, *, calling_aet: str) -> None:
        self.forwarder = forwarder
        self.dest: ForwardDestination = forwarder.dest
        self.db: Database = forwarder.db
        self.writer = writer  # the engine's writer: run_sync(job(Session)) from this worker thread
        self.calling_aet = calling_aet
        self.target = forwarder.target

    @property
    def tls(self) -> ssl.SSLContext | None:
        """The forwarder's (its files are read when the channel opens)."""
        return self.forwarder.tls

    async def deliver(self, c: Claimed) -> Outcome:
        return await asyncio.to_thread(self.send, c)

    async def close(self) -> None:
        await self.forwarder.close()

    # --- one attempt --------------------------------------------------------------------------------------
    def send(self, c: Claimed) -> Outcome:
        started = time.monotonic()
        kept: dict[str, Any] = dict(c.detail or {})  # KeptRendering's keys
        uid = kept.pop("commitment", None)
        if uid:
            with self.db.reader.connect() as conn:
                result = result_of(conn, str(uid))
            if result is not None and result.state == CommitmentState.COMMITTED:
                return self._outcome(AttemptOutcome.DELIVERED, "committed", started, kept,
                                     response=f"{result.committed} instance(s) committed by {result.answered_by}")
            if result is not None and result.state == CommitmentState.REQUESTED:
                waited = utcnow() - result.requested_at
                if waited < timedelta(seconds=self.dest.commitment_timeout_seconds):
                    return self._outcome(AttemptOutcome.RETRY, WAITING, started, {**kept, "commitment": uid},
                                         error=f"stored; waiting for the storage commitment report of {uid}")
                why = f"no report within {self.dest.commitment_timeout_seconds:g} s"
                self.writer.run_sync(lambda s: record_failure(s.connection(), str(uid), why))
                log.warning("forward to %s: storage commitment %s: %s; asking again", self.dest.name, uid, why)
            elif result is not None and result.failed:  # send the instances it did not commit again
                again = {f.sop_instance_uid for f in result.failed}
                items = instances_to_send(self.db, c)
                kept["acknowledged"] = [i.id for i in items if i.sop_instance_uid not in again]
                kept["stored"] = False
                log.warning("forward to %s: %d instance(s) not committed (transaction %s); sending them again",
                            self.dest.name, len(result.failed), uid)
        if not kept.get("stored"):  # an earlier attempt stored every instance: only commitment is owed
            stored = self.forwarder.send(dataclasses.replace(c, detail=_kept(kept)))
            if stored.outcome != AttemptOutcome.DELIVERED:
                return stored
            kept = dict(stored.detail or {})
        return self._ask(c, kept, started)

    def _ask(self, c: Claimed, kept: dict[str, Any], started: float) -> Outcome:
        items = instances_to_send(self.db, c)
        if not items:
            return self._outcome(AttemptOutcome.DEAD, "gone", started, kept, error="nothing to commit: no instances")
        # every instance stored: keep them as taken (a later attempt asks again without sending them)
        kept.update(acknowledged=[i.id for i in items], stored=True)
        uid = new_transaction_uid()
        self.writer.run_sync(lambda s: record_request(s.connection(), uid, destination=self.dest.name,
                                                      instances=len(items), delivery_id=c.id,
                                                      study_id=c.study_id))
        t = self.dest.timeout_seconds
        asked = request_commitment(self.dest, [(i.sop_class_uid, i.sop_instance_uid) for i in items], uid,
                                   calling_aet=self.calling_aet, timeout=t, tls_context=self.tls,
                                   record=report_recorder(self.writer, timeout=t))
        if not asked.accepted:
            self.writer.run_sync(lambda s: record_failure(s.connection(), uid, asked.error))
            return self._outcome(AttemptOutcome.RETRY, WAITING, started, kept,
                                 error=f"stored, but storage commitment failed: {asked.error}")
        if asked.report is not None:  # answered on the requesting association: recorded already
            with self.db.reader.connect() as conn:
                result = result_of(conn, uid)
            if result is not None and result.state == CommitmentState.COMMITTED:
                return self._outcome(AttemptOutcome.DELIVERED, "committed", started, kept,
                                     response=f"{result.committed} instance(s) committed by {result.answered_by}")
            if result is not None and result.state == CommitmentState.FAILED:
                return self._outcome(AttemptOutcome.RETRY, WAITING, started, {**kept, "commitment": uid},
                                     error=_failed(result))
        return self._outcome(AttemptOutcome.RETRY, WAITING, started, {**kept, "commitment": uid},
                             error=f"stored; waiting for the storage commitment report of {uid}")

    def _outcome(self, outcome: AttemptOutcome, status: str, started: float, detail: dict[str, Any], *,
                 error: str | None = None, response: str | None = None) -> Outcome:
        if outcome == AttemptOutcome.DELIVERED:
            detail = {k: v for k, v in detail.items() if k not in ("acknowledged", "stored")}
        return Outcome(outcome, status, response=response, error=error,
                       duration_ms=int((time.monotonic() - started) * 1000), target=self.target,
                       detail=_kept(detail),
                       destination_failure=False)


def _kept(values: dict[str, Any]) -> KeptRendering:
    return KeptRendering(**values)  # type: ignore[typeddict-item]  # the keys come from a KeptRendering


def _failed(result: CommitmentResult) -> str:
    """What the last error says of a report with failures (instance UIDs and reasons: no patient data)."""
    named = "; ".join(f"instance {f.sop_instance_uid}: 0x{f.reason:04X}" for f in result.failed[:5])
    more = f"; {len(result.failed) - 5} more" if len(result.failed) > 5 else ""
    why = named + more or (result.error or "")
    return f"{len(result.failed)} instance(s) not committed by {result.answered_by}: {why}"
