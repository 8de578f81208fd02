"""Delivery workers: one per destination, so an EHR interface that is down stalls only itself.

    claim a batch (outbox.claim: due, oldest first, one per patient, SKIP LOCKED), leased for
        [database] lease_seconds and renewed every third of that until it is settled
    render what was never rendered (from the store, in a thread: an MLLP batch at once), keep it
        for the retries
    send: MLLP one at a time on a connection, on ``in_flight`` connections at once (default 1); FHIR
        up to ``concurrency`` requests at once; a batch holds one delivery per patient, so sends at
        once are always for different patients
    settle the batch in one transaction: delivered, retry at now + backoff, or dead

The sender is the destination's: MLLP and FHIR ones here (the worker renders the message first), or
any ``DeliverySender`` that sends a claimed delivery whole (the DICOM forwarder of the dicom-forward
connector, engine/connectors/dicom/forward.py, which sends stored instances by C-STORE).

Backoff per delivery is tenacity's exponential wait with jitter (``backoff_initial_seconds`` doubling
up to ``backoff_max_seconds``). When the destination itself fails (refused, timeout, 5xx, 429) the
worker also pauses as a whole, for a backoff that grows with each failed pass, gives back the rest
of its batch, and then probes with a single delivery until one succeeds; so an outage costs one
probe per backoff step instead of one failed attempt per queued message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Connection
from tenacity import RetryCallState, wait_exponential_jitter

from engine.channels import Channel, Destination
from engine.config import Settings
from engine.domain.events import EventKind
from engine.mappings.registry import MappingRegistry
from engine.metrics import Metrics
from engine.outbound import outbox
from engine.outbound.context import EngineInfo, StudyRows, build_context
from engine.outbound.mapping import OutboundMapping, RenderError
from engine.outbound.outbox import Claimed, Outbox, Outcome
from engine.outbound.render import Rendered, render
from engine.outbound.senders import FHIRSender, MLLPSender, mllp_tls_context
from engine.redaction import redact_url
from engine.storage.base import ObjectStorage
from engine.store import leases
from engine.store.db import Database
from engine.store.states import AttemptOutcome, DeliveryState

log = logging.getLogger(__name__)
DESTINATION_FAILURES = ("refused", "connection", "timeout", "no MSA", "401", "403", "429", "500", "502", "503", "504")


class DeliverySender(Protocol):
    """Sends one claimed delivery, building what it sends itself, and says how it went (never raises
    for what the network or the destination does)."""

    async def deliver(self, c: Claimed) -> Outcome: ...

    async def close(self) -> None: ...


def destination_failed(o: Outcome) -> bool:
    """Whether an attempt failed because of the destination itself (down, refusing, overloaded): the
    worker then pauses and probes, instead of trying each queued delivery."""
    if o.outcome != AttemptOutcome.RETRY:
        return False
    if o.destination_failure is not None:
        return o.destination_failure
    return o.status in DESTINATION_FAILURES


def backoff_seconds(dest: Destination, attempts: int) -> float:
    """The wait before try ``attempts + 1``: tenacity's exponential backoff with jitter."""
    wait = wait_exponential_jitter(multiplier=dest.backoff_initial_seconds, max=dest.backoff_max_seconds,
                                   jitter=dest.backoff_initial_seconds)
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(1, attempts)
    return float(wait(state))


def address_of(dest: Destination, settings: Settings) -> str:
    return settings.ehr.fhir_base if dest.type == "fhir" else settings.ehr.mllp


@dataclass
class Renderer:
    """Builds a delivery's message from the store (a blocking call: run it in a thread)."""

    db: Database
    mappings: MappingRegistry
    storage: ObjectStorage | None
    info: EngineInfo

    def mapping(self, name: str) -> OutboundMapping:
        m = self.mappings.get_as(name, OutboundMapping)
        if m is None:
            raise RenderError(f"no outbound mapping named {name!r} (a mappings/ file with source: store)")
        return m

    def render(self, c: Claimed) -> Rendered:
        found = self.render_all([c])[c.id]
        if isinstance(found, RenderError):
            raise found
        return found

    def render_all(self, claimed: list[Claimed]) -> dict[int, Rendered | RenderError]:
        """Each delivery's message (or why it cannot be built), read on one connection: a batch
        costs one thread hop, one connection and one read a table (StudyRows), not one each."""
        out: dict[int, Rendered | RenderError] = {}
        with self.db.reader.connect() as conn:
            rows = StudyRows.read(conn, [c.study_id for c in claimed if c.study_id is not None])
            for c in claimed:
                try:
                    out[c.id] = self._render(conn, c, rows)
                except RenderError as exc:
                    out[c.id] = exc
        return out

    def _render(self, conn: Connection, c: Claimed, rows: StudyRows) -> Rendered:
        if c.study_id is None:
            raise RenderError("the study of this delivery was deleted")
        mapping = self.mapping(c.mapping)
        try:
            ctx = build_context(conn, c.study_id, event=c.event, delivery_id=c.id, instance_id=c.instance_id,
                                storage=self.storage, engine=self.info, rows=rows)
        except LookupError as exc:
            raise RenderError(str(exc)) from None
        return render(mapping, ctx)


@dataclass
class DestinationWorker:
    dest: Destination
    address: str
    renderer: Renderer | None  # None: the sender builds what it sends (a DeliverySender)
    writer: Any  # the engine's IngestWriter / InlineWriter: run(job(Session))
    metrics: Metrics
    worker_id: str  # who holds the leases: leases.this_process()
    batch: int = 20
    lease_seconds: float = leases.LEASE_SECONDS
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    paused_for: float = 0.0
    failures: int = 0  # passes in a row in which the destination itself failed
    sender: MLLPSender | FHIRSender | DeliverySender | None = None
    more_senders: list[MLLPSender] = field(default_factory=list)  # MLLP in_flight > 1: a connection each
    # an attempt's error may carry patient data (a FHIR search by identifier, the EHR's own text):
    # off, log lines give its status and point to the delivery; on, they give the error as it was
    log_patient_details: bool = False
    # the next batch, claimed and rendered while this one is sent (MLLP and FHIR destinations)
    _ahead: asyncio.Task[tuple[list[Claimed], dict[int, Rendered | RenderError]]] | None = field(
        default=None, init=False, repr=False)

    def said(self, delivery_id: int, o: Outcome) -> str:
        """What a log line says of an attempt's outcome."""
        if self.log_patient_details:
            return o.error or str(o.status)
        return f"status {o.status} (the error is in GET /api/deliveries/{delivery_id})"

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    worked = await self.pass_once()
                except Exception:
                    log.exception("delivery pass to %s failed; will try again", self.dest.name)
                    worked = 0
                if worked and not self.paused_for:
                    continue
                delay = self.paused_for or 1.0
                self.paused_for = 0.0
                self.wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wait(stop), delay)
        finally:
            await self._give_back_ahead()

    async def _wait(self, stop: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(self.wakeup.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def pass_once(self) -> int:
        """Claim, send and settle one batch; returns how many deliveries were attempted."""
        # after a destination failure, probe with one delivery before sending a batch again
        limit = 1 if self.failures else self.batch
        ahead, self._ahead = self._ahead, None
        built: dict[int, Rendered | RenderError] | None = None
        if ahead is not None:  # claimed and rendered while the last batch was sent
            claimed, built = await ahead
        else:
            claimed = await self._claim(limit)
        if not claimed:
            return 0
        ids = [c.id for c in claimed]
        # the leases are short and renewed while the batch is worked (MLLP: one after another, each
        # up to its timeout), so those of a process that died lapse soon
        with leases.Renewing(lambda: self.writer.run_sync(lambda s: leases.renew(
                s.connection(), outbox.DELIVERIES, ids, self.worker_id, self.lease_seconds)),
                self.lease_seconds / 3, f"deliveries to {self.dest.name}"):
            return await self._work(claimed, built, ids)

    async def _claim(self, limit: int) -> list[Claimed]:
        return await self.writer.run(
            lambda s: outbox.claim(s.connection(), self.dest.name, self.worker_id, limit=limit,
                                   lease_seconds=self.lease_seconds))

    async def _claim_ahead(self, held: list[int]) -> tuple[list[Claimed], dict[int, Rendered | RenderError]]:
        """The next batch, claimed and rendered while this one is sent. Per-patient order holds as it
        does for batches one after another: a delivery whose patient has one in this batch (pending
        until settled) is not claimable. Its leases are renewed with this batch's (``held``)."""
        claimed = await self._claim(self.batch)
        held.extend(c.id for c in claimed)
        unbuilt = [c for c in claimed if c.payload is None]
        assert self.renderer is not None
        return claimed, (await asyncio.to_thread(self.renderer.render_all, unbuilt) if unbuilt else {})

    async def _give_back_ahead(self) -> None:
        """Release a batch claimed ahead and not sent (the destination failed, the worker stops)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        try:
            claimed, _built = await ahead
            if claimed:
                await self.writer.run(lambda s: outbox.release(s.connection(), [c.id for c in claimed]))
        except Exception:  # its leases lapse on their own
            log.warning("could not give back the deliveries to %s claimed ahead", self.dest.name, exc_info=True)

    async def _work(self, claimed: list[Claimed], built: dict[int, Rendered | RenderError] | None = None,
                    held: list[int] | None = None) -> int:
        results: list[tuple[Claimed, Outcome, Rendered | None]] = []
        unsent: list[int] = []
        # what was never rendered, the whole batch in one thread hop on one connection (a DICOM
        # destination sends the stored files: nothing to render)
        renderer = self.renderer if isinstance(self.sender, MLLPSender | FHIRSender) else None
        if built is None:
            unbuilt = [c for c in claimed if c.payload is None]
            built = await asyncio.to_thread(renderer.render_all, unbuilt) if unbuilt and renderer is not None else {}
        if renderer is not None and held is not None and not self.failures and len(claimed) == self.batch:
            # a full batch: there may be more; the next one is claimed and rendered while this is sent
            self._ahead = asyncio.create_task(self._claim_ahead(held))
        if self.dest.type != "fhir":  # MLLP: in_flight connections, one message each; DICOM one at a time
            queue = list(claimed)  # oldest first; one per patient, so the lanes never reorder a patient's
            done: dict[int, tuple[Claimed, Outcome, Rendered | None]] = {}

            async def lane(sender: MLLPSender | FHIRSender | DeliverySender | None) -> None:
                while queue and not any(destination_failed(o) for _c, o, _r in done.values()):
                    c = queue.pop(0)
                    done[c.id] = await self._attempt(c, built.get(c.id), sender)
            await asyncio.gather(*(lane(s) for s in [self.sender, *self.more_senders]))
            results = [done[c.id] for c in claimed if c.id in done]
            unsent = [c.id for c in claimed if c.id not in done]  # the destination failed: given back
        else:
            sem = asyncio.Semaphore(max(1, self.dest.concurrency))
            if isinstance(self.sender, FHIRSender):  # the batch's references at once (corrections search again)
                msgs = [c.kept() or built.get(c.id) for c in claimed if c.event != EventKind.STUDY_CORRECTED]
                await self.sender.prefetch([m.payload for m in msgs if isinstance(m, Rendered)])

            async def one(c: Claimed) -> tuple[Claimed, Outcome, Rendered | None]:
                async with sem:
                    return await self._attempt(c, built.get(c.id))
            results = list(await asyncio.gather(*(one(c) for c in claimed)))
        delays = {c.id: backoff_seconds(self.dest, c.attempts + 1) for c, o, _r in results if o.outcome == AttemptOutcome.RETRY}

        def settle_all(s: Any) -> list[str]:
            conn = s.connection()
            states = outbox.settle(conn, [outbox.Attempted(c, o, r, delays.get(c.id, 0.0)) for c, o, r in results],
                                   self.dest, worker=self.worker_id)
            outbox.release(conn, unsent)
            return states
        states = await self.writer.run(settle_all)
        for (c, o, _r), state in zip(results, states, strict=True):
            self.metrics.deliveries.inc(destination=self.dest.name, outcome=state if state != DeliveryState.PENDING else AttemptOutcome.RETRY)
            self.metrics.delivery_latency.observe(o.duration_ms / 1000, destination=self.dest.name)
            if state == DeliveryState.DEAD:
                log.warning("delivery %d to %s is dead-lettered: %s", c.id, self.dest.name, self.said(c.id, o))
        failed = any(destination_failed(o) for _c, o, _r in results)
        if not failed:
            self.failures = 0
        else:  # the destination is down or overloaded: wait longer each time before probing it again
            await self._give_back_ahead()
            self.failures += 1
            self.paused_for = max(backoff_seconds(self.dest, self.failures),
                                  max((o.retry_after or 0.0) for _c, o, _r in results))
            log.warning("destination %s (%s) failing (%s); next try in %.1f s", self.dest.name, self.address,
                        self.said(results[-1][0].id, results[-1][1]), self.paused_for)
        return len(results)

    async def _attempt(self, c: Claimed, ready: Rendered | RenderError | None = None,
                       sender: MLLPSender | FHIRSender | DeliverySender | None = None
                       ) -> tuple[Claimed, Outcome, Rendered | None]:
        """Send one delivery (on ``sender``, else the worker's): what it kept from its first attempt,
        else ``ready`` (rendered with its batch), else rendered now."""
        sender = sender or self.sender
        assert sender is not None
        if not isinstance(sender, MLLPSender | FHIRSender):
            return c, await sender.deliver(c), None
        fresh: Rendered | None = None
        msg = c.kept()
        if msg is None:
            assert self.renderer is not None
            try:
                if isinstance(ready, RenderError):
                    raise ready
                msg = fresh = ready if ready is not None else await asyncio.to_thread(self.renderer.render, c)
            except RenderError as exc:
                return c, Outcome(AttemptOutcome.DEAD, "render", error=f"cannot build the message: {exc}"), None
        if isinstance(sender, MLLPSender):
            # the ACK must answer the MSH-10 actually sent (a mapping may set its own)
            return c, await sender.send(msg.payload, _msh10(msg.payload) or msg.control_id), fresh
        if not msg.resource:
            return c, Outcome(AttemptOutcome.DEAD, "render", error="the kept message names no FHIR resource type"), fresh
        # a correction (a merge, a relink) may have changed what the references point at: searched again
        return c, await sender.send(msg.payload, msg.resource, msg.conditional,
                                    recheck=c.event == EventKind.STUDY_CORRECTED), fresh


def _msh10(payload: str) -> str | None:
    first = payload.split("\r", 1)[0]
    if not first.startswith("MSH") or len(first) < 4:
        return None
    fields = first.split(first[3])
    return fields[9] if len(fields) > 9 else None


def build_outbox(settings: Settings, mappings: MappingRegistry, channels: list[Channel]) -> Outbox:
    """The routes of the enabled outbound channels whose destinations have an address."""
    enabled = {d.name for ch in channels if ch.connector == "outbound" and ch.enabled
               for d in ch.destinations.values() if address_of(d, settings)}
    supersede = set()
    for ch in channels:
        for r in ch.outbound_routes:
            m = mappings.get_as(r.mapping, OutboundMapping)
            if m is not None and m.target == "fhir":
                supersede.add(r.mapping)
    return Outbox(channels, enabled, supersede)


class DeliveryWorkers:
    """A worker per destination, started, woken and stopped together (an outbound or dicom-forward
    channel's)."""

    def __init__(self) -> None:
        self.workers: dict[str, DestinationWorker] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for name, w in self.workers.items():
            self._tasks.append(asyncio.create_task(w.run(self._stop), name=f"deliver-{name}"))

    def wake(self) -> None:
        for w in self.workers.values():
            w.wakeup.set()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming; a batch in hand finishes (its results are recorded) within ``grace``."""
        self._stop.set()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=grace)
            for t in pending:
                t.cancel()
            for t in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        self._tasks.clear()
        for w in self.workers.values():
            for sender in [w.sender, *w.more_senders]:
                if sender is not None:
                    with contextlib.suppress(Exception):
                        await sender.close()


class OutboundService(DeliveryWorkers):
    """The engine's outbound side: the outbox it hands the reconciler, and a worker per destination."""

    def __init__(self, settings: Settings, db: Database, writer: Any, mappings: MappingRegistry,
                 channels: list[Channel], storage: ObjectStorage | None, metrics: Metrics) -> None:
        super().__init__()
        self.settings = settings
        worker_id = str(leases.this_process())
        self.renderer = Renderer(db, mappings, storage, EngineInfo.of(settings))
        for ch in channels:
            if ch.connector != "outbound" or not ch.enabled:
                continue
            for dest in ch.destinations.values():
                address = address_of(dest, settings)
                if not address:
                    log.warning("channel %s: destination %s has no address ([ehr] %s); nothing is sent there",
                                ch.name, dest.name, "fhir_base" if dest.type == "fhir" else "mllp")
                    continue
                if dest.name in self.workers:
                    continue
                # the address as shown (log lines, /api/channels): a password in fhir_base masked
                w = DestinationWorker(dest, redact_url(address), self.renderer, writer, metrics, worker_id,
                                      lease_seconds=settings.database.lease_seconds,
                                      log_patient_details=settings.log_patient_details)
                if dest.type == "fhir":
                    w.sender = FHIRSender(settings.ehr, dest)
                else:
                    tls = mllp_tls_context(settings.ehr)
                    w.sender, *w.more_senders = [MLLPSender(address, dest, tls) for _ in range(dest.in_flight)]
                self.workers[dest.name] = w
        self.outbox = build_outbox(settings, mappings, channels)
