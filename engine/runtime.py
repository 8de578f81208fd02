"""The running engine: store, writer, channels' listeners, HTTP and background tasks.

Start order: configuration is checked (a broken channel or mapping stops the start with every
problem listed), the database is migrated, the writer starts, then listeners, then HTTP. Stop is
the reverse: listeners stop accepting and finish the messages in hand (their ACKs are written),
the writer drains its queue, then the database is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import threading
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlalchemy.orm import selectinload

from engine.channels import Channel, load_channels
from engine.config import Settings
from engine.connectors.dicom.scp import DicomListener
from engine.connectors.mllp.hl7_listener import HL7Listener
from engine.domain.events import EventBus
from engine.domain.studies import mark_stable, stability_candidates, stability_cutoff
from engine.fhir.inbound import FhirInbound
from engine.mappings.registry import MappingRegistry
from engine.metrics import Metrics
from engine.outbound.outbox import Outbox
from engine.outbound.worker import OutboundService, address_of, build_outbox
from engine.pipeline.hl7_inbound import HL7Inbound, check_reprocessable, reprocess
from engine.pipeline.writer import IngestWriter, InlineWriter
from engine.reconciliation import triggers
from engine.reconciliation.reconciler import Reconciler
from engine.reconciliation.reconciler import Result as ReconcileResult
from engine.storage.local import LocalStorage
from engine.store import migrate
from engine.store.db import Database, open_database
from engine.store.models import Message
from engine.store.retention import prune
from engine.yamlfile import ConfigFileError, ConfigProblem

log = logging.getLogger(__name__)


def channel_port(ch: Channel, settings: Settings) -> int:
    if ch.port is not None:
        return ch.port
    return settings.dicom.port if ch.connector == "dicom" else settings.mllp.port


def load_definitions(settings: Settings) -> tuple[MappingRegistry, list[Channel], list[ConfigProblem]]:
    """Mappings and channels as configured, with every problem found (errors and warnings)."""
    registry = MappingRegistry(Path(settings.mappings_dir), structure_version=settings.mappings.hl7_version)
    problems = registry.load_all()
    if not Path(settings.mappings_dir).is_dir():
        problems.append(ConfigProblem(settings.mappings_dir, 0, "", "mappings directory not found"))
    channels, chan_problems = load_channels(Path(settings.channels_dir), set(registry.names()))
    problems.extend(chan_problems)
    ports: dict[int, str] = {settings.http.port: "the HTTP server"} if settings.http.port else {}
    fhir_channels: list[str] = []
    for ch in channels:
        if not ch.enabled:
            continue
        if ch.connector == "outbound":
            problems.extend(_check_outbound(ch, registry, settings))
            continue
        if ch.connector == "fhir":
            problems.extend(_check_fhir(ch, registry, fhir_channels))
            fhir_channels.append(ch.name)
            continue
        port = channel_port(ch, settings)
        if port and port in ports:
            problems.append(ConfigProblem(ch.file, 0, "connector.port",
                                          f"port {port} is also used by {ports[port]}"))
        ports[port] = f"channel {ch.name}"
        rules = ch.dicom.reconciliation_rules if ch.connector == "dicom" else ""
        if rules and registry.rules(rules) is None:
            problems.append(ConfigProblem(ch.file, 0, "options.reconciliation_rules",
                                          f"no reconciliation rules named {rules!r} in the mappings directory "
                                          "(a file with source: reconciliation; \"\" uses the built-in rules)"))
    return registry, channels, problems


def _check_outbound(ch: Channel, registry: MappingRegistry, settings: Settings) -> list[ConfigProblem]:
    """Each route's mapping builds what its destination speaks; a destination without an address is
    a warning (nothing is queued for it), not an error: a site may take only HL7 or only FHIR."""
    problems = []
    for i, r in enumerate(ch.outbound_routes):
        dest = ch.destinations.get(r.to)
        m = registry.outbound(r.mapping)
        where = f"routes[{i + 1}].mapping"
        if m is None:
            problems.append(ConfigProblem(ch.file, r.line, where, f"{r.mapping!r} is not an outbound mapping "
                                          "(a mappings/ file with source: store)"))
        elif dest is not None and m.target != ("fhir" if dest.type == "fhir" else "hl7v2"):
            problems.append(ConfigProblem(ch.file, r.line, where, f"{r.mapping!r} builds {m.target} but destination "
                                          f"{dest.name!r} is {dest.type}"))
        elif "report.received" in r.events and len(r.events) > 1:
            problems.append(ConfigProblem(ch.file, r.line, f"routes[{i + 1}].events",
                                          "report.received builds from the report: give it a route of its own"))
    for dest in ch.destinations.values():
        if not address_of(dest, settings):
            key = "fhir_base" if dest.type == "fhir" else "mllp"
            problems.append(ConfigProblem(ch.file, dest.line, f"destinations.{dest.name}",
                                          f"[ehr] {key} is empty (RADBRIDGE_EHR_{key.upper()}): nothing is sent here",
                                          "warning"))
    return problems


def _check_fhir(ch: Channel, registry: MappingRegistry, others: list[str]) -> list[ConfigProblem]:
    """One fhir channel (it owns /fhir/); each route's mappings read the resource it routes."""
    problems = []
    if others:
        problems.append(ConfigProblem(ch.file, 0, "connector.type", f"channel {others[0]} already serves /fhir/; "
                                      "only one fhir channel can be enabled"))
    for i, r in enumerate(ch.routes):
        for name in r.mappings:
            m = registry.get(name)
            if m is None:
                continue  # reported with the mapping file's own problems
            if m.source != "fhir" or m.resource not in r.messages:
                problems.append(ConfigProblem(ch.file, r.line, f"routes[{i + 1}].mappings",
                                              f"{name!r} reads {m.source} {m.resource or ''}".rstrip() +
                                              f"; this route takes {', '.join(r.messages)} (source: fhir, "
                                              f"resource: {r.messages[0]})"))
    if registry.outbound(ch.fhir.imagingstudy_mapping) is None:
        problems.append(ConfigProblem(ch.file, 0, "options.imagingstudy_mapping",
                                      f"no outbound mapping named {ch.fhir.imagingstudy_mapping!r} (source: store, "
                                      "resource: ImagingStudy) for ImagingStudy reads"))
    return problems


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.db: Database = None  # type: ignore[assignment]
        self.writer: IngestWriter = None  # type: ignore[assignment]
        self.mappings: MappingRegistry = None  # type: ignore[assignment]
        self.channels: dict[str, Channel] = {}
        self.inbound: dict[str, HL7Inbound] = {}
        self.listeners: dict[str, HL7Listener] = {}
        self.dicom_listeners: dict[str, DicomListener] = {}
        self.storage: LocalStorage | None = None
        self.http_runner: web.AppRunner | None = None
        self.http_port: int = settings.http.port
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop_event = threading.Event()
        self._generated_token: str | None = None
        self.reconciler: Reconciler | None = None
        self._reconciling: asyncio.Future[int] | None = None
        self._reconcile_wakeup = asyncio.Event()
        self._reconcile_lock = asyncio.Lock()
        self.outbound: OutboundService | None = None
        self.fhir: FhirInbound | None = None  # the fhir channel (served at /fhir/ on the HTTP port)
        self.bus = EventBus()  # domain events: who reacts is wired in _wire_events
        self.outbox: Outbox | None = None

    # --- tokens ------------------------------------------------------------------------------------------
    def api_tokens(self) -> list[str]:
        tokens = self.settings.api_tokens()
        if self._generated_token:
            tokens.append(self._generated_token)
        return tokens

    def _ensure_token(self) -> None:
        if self.settings.http.auth != "token" or self.settings.api_tokens():
            return
        path = Path(self.settings.storage.dir) / "api-token"
        if path.exists():
            self._generated_token = path.read_text().strip()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._generated_token = secrets.token_urlsafe(24)
            path.write_text(self._generated_token + "\n")
            path.chmod(0o600)
        log.info("HTTP API token (no http.tokens configured) is in %s", path)

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self.mappings, channels, problems = load_definitions(s)
        for p in problems:
            (log.warning if p.severity == "warning" else log.error)("%s", p)
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            raise ConfigFileError(errors)
        Path(s.storage.dir).mkdir(parents=True, exist_ok=True)
        self.db = open_database(s.database_url, sqlite_synchronous=s.database.sqlite_synchronous,
                                busy_timeout_ms=s.database.busy_timeout_ms, pool_size=s.database.pool_size)
        await asyncio.to_thread(migrate.upgrade, self.db)
        inline = s.database.writer == "inline" or (s.database.writer == "auto" and self.db.is_sqlite)
        self.writer = InlineWriter(self.db.writer) if inline else IngestWriter(self.db.writer)
        self.writer.start()
        self._wire_events(channels)
        self.metrics.gauge("radbridge_writer_backlog", "Messages waiting for the ingest writer",
                           lambda: float(self.writer.backlog))
        self.metrics.gauge("radbridge_writer_batches_total", "Transactions the ingest writer committed",
                           lambda: float(self.writer.stats.batches))
        self.metrics.gauge("radbridge_writer_jobs_total", "Messages the ingest writer handled",
                           lambda: float(self.writer.stats.jobs))
        self.metrics.gauge("radbridge_writer_commit_failures_total",
                           "Batches that could not be committed (nothing in them was acknowledged)",
                           lambda: float(self.writer.stats.commit_failures))
        self.metrics.gauge("radbridge_writer_integrity_retries_total",
                           "Jobs retried after a conflict with another engine process",
                           lambda: float(self.writer.stats.retried))
        self.metrics.gauge("radbridge_mapping_reloads_total", "Mapping files reloaded after a change",
                           lambda: float(self.mappings.reloads))
        try:
            for ch in channels:
                self.channels[ch.name] = ch
                if not ch.enabled:
                    log.info("channel %s is disabled", ch.name)
                    continue
                if ch.connector == "outbound":
                    continue  # started below, with the outbound service
                if ch.connector == "fhir":
                    self.fhir = FhirInbound(ch, self.mappings, bus=self.bus)
                    continue
                port = channel_port(ch, s)
                if ch.connector == "dicom":
                    await self._start_dicom(ch, port)
                    continue
                inbound = HL7Inbound(ch, self.mappings, app_name=s.name, facility=s.facility, bus=self.bus)
                self.inbound[ch.name] = inbound
                lst = HL7Listener(ch, inbound, self.writer, self.metrics, host=s.bind, port=port,
                                  max_connections=s.mllp.max_connections)
                await lst.start()
                self.listeners[ch.name] = lst
            self._ensure_token()
            from engine.web.app import build_app
            self.http_runner = web.AppRunner(build_app(self), access_log=None)
            await self.http_runner.setup()
            site = web.TCPSite(self.http_runner, s.bind, s.http.port, reuse_address=True)
            await site.start()
            server = getattr(site, "_server", None)
            if server is not None and server.sockets:
                self.http_port = server.sockets[0].getsockname()[1]
            log.info("HTTP on http://%s:%d (/health, /metrics, /api/, /fhir/)", s.bind, self.http_port)
        except BaseException:
            await self.stop()
            raise
        # What start-up built (modules, dictionaries, compiled statements) lives as long as the
        # process: moved out of the collector's sight, a full collection no longer walks it and
        # stops listeners for ~100 ms on a slow machine (seen as the max ACK latency).
        gc.collect()
        gc.freeze()
        if s.mappings.reload_seconds > 0:
            self._tasks.append(asyncio.create_task(self._watch_mappings(), name="mapping-reload"))
        if s.retention.enabled:
            self._tasks.append(asyncio.create_task(self._retention_loop(), name="retention"))
        self.outbound = OutboundService(s, self.db, self.writer, self.mappings, list(self.channels.values()),
                                        self.storage, self.metrics)
        self.outbound.start()
        if self.dicom_listeners:
            self._tasks.append(asyncio.create_task(self._stability_loop(), name="study-stability"))
            self.reconciler = self._make_reconciler()
            self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="reconciliation"))

    def _wire_events(self, channels: list[Channel]) -> None:
        """Who reacts to domain events, in the transaction that raises them; wired before anything
        can publish: reconciliation's triggers (patient, order and study events queue studies) and
        the outbox (reconciled and corrected studies, reports: deliveries to the EHR)."""
        triggers.subscribe(self.bus)
        self.outbox = build_outbox(self.settings, self.mappings, channels)
        self.outbox.subscribe(self.bus)

    async def _start_dicom(self, ch: Channel, port: int) -> None:
        if self.storage is None:
            self.storage = LocalStorage(Path(self.settings.storage.dir) / "studies", fsync=self.settings.dicom.fsync)
            self._use_storage_tempdir()
        lst = DicomListener(ch, self.settings, db=self.db, writer=self.writer, storage=self.storage,
                            metrics=self.metrics, host=self.settings.bind, port=port, bus=self.bus)
        await lst.start()
        self.dicom_listeners[ch.name] = lst

    def _use_storage_tempdir(self) -> None:
        """pynetdicom writes received instances to the process's temporary directory; keeping that
        on the storage file system makes storing a rename instead of a copy."""
        import tempfile
        tmp = Path(self.settings.storage.dir) / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        for stale in tmp.glob("tmp*.dcm"):  # left by a crash mid-transfer: never acknowledged
            with contextlib.suppress(OSError):
                stale.unlink()
        tempfile.tempdir = str(tmp.resolve())

    async def stop(self) -> None:
        self._stop_event.set()
        if self.reconciler is not None:  # finish the batch in hand (its files are committed or removed)
            self.reconciler.stopping = True
            if self._reconciling is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(self._reconciling), 60)
        if self.outbound is not None:  # a batch being sent finishes and is recorded
            await self.outbound.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        await asyncio.gather(*(lst.stop() for lst in self.listeners.values()),
                             *(d.stop() for d in self.dicom_listeners.values()), return_exceptions=True)
        self.listeners.clear()
        self.dicom_listeners.clear()
        if self.http_runner is not None:
            await self.http_runner.cleanup()
            self.http_runner = None
        if isinstance(self.writer, InlineWriter):
            self.writer.stop()
        elif self.writer is not None:
            await asyncio.to_thread(self.writer.stop)
        if self.db is not None:
            self.db.dispose()
        gc.unfreeze()  # a process that starts engines again (tests) lets the collector see them

    # --- background ------------------------------------------------------------------------------------
    async def _watch_mappings(self) -> None:
        while True:
            await asyncio.sleep(self.settings.mappings.reload_seconds)
            try:
                await asyncio.to_thread(self.mappings.reload_changed)
            except Exception:
                log.exception("mapping reload failed")

    async def _retention_loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(prune, self.db, self.settings.retention, stop=self._stop_event)
            except Exception:
                log.exception("retention pass failed; will try again")
            await asyncio.sleep(self.settings.retention.interval_seconds)

    async def _stability_loop(self) -> None:
        stable = self.settings.dicom.stable_seconds
        interval = min(5.0, max(0.2, stable / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_stability()
            except Exception:
                log.exception("study stability check failed; will try again")

    def _make_reconciler(self) -> Reconciler:
        def on_result(r: ReconcileResult) -> None:
            if r.state:
                self.metrics.reconciliations.inc(state=r.state)
            if r.coerced:
                self.metrics.coerced_instances.inc(r.coerced)
        return Reconciler(self.db, self.writer, self.storage, channels=self.channels, rules=self.mappings.rules,
                          modifying_system=self.settings.dicom.aet, tmp_dir=Path(self.settings.storage.dir) / "tmp",
                          fsync=self.settings.dicom.fsync, on_result=on_result, bus=self.bus)

    async def _reconcile_loop(self) -> None:
        interval = min(1.0, max(0.1, self.settings.dicom.stable_seconds / 4))
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._reconcile_wakeup.wait(), interval)
            self._reconcile_wakeup.clear()
            try:
                await self.reconcile_pending()
            except Exception:
                log.exception("reconciliation pass failed; will try again")
            self.wake_outbound()

    async def reconcile_pending(self) -> int:
        """Work the reconciliation queue in a worker thread (file rewriting is blocking I/O)."""
        if self.reconciler is None:
            return 0
        async with self._reconcile_lock:  # one pass at a time (the loop, the API, tests)
            self._reconciling = asyncio.ensure_future(asyncio.to_thread(self.reconciler.run_pending))
            try:
                return await asyncio.shield(self._reconciling)
            finally:
                self._reconciling = None

    def wake_reconciler(self) -> None:
        self._reconcile_wakeup.set()

    def wake_outbound(self) -> None:
        """Deliveries were queued or put back: send now rather than at the next poll."""
        if self.outbound is not None and self.outbox is not None and self.outbox.take_queued():
            self.outbound.wake()

    async def check_stability(self) -> int:
        """Mark studies stable that had no new instance for dicom.stable_seconds; returns how many."""
        cutoff = stability_cutoff(self.settings.dicom.stable_seconds)
        def candidates_() -> list[int]:
            with self.db.reader.connect() as conn:
                return stability_candidates(conn, cutoff)
        candidates = await asyncio.to_thread(candidates_)
        marked = 0
        for study_id in candidates:
            def job(session: Any, sid: int = study_id) -> bool:
                conn = session.connection()
                event = mark_stable(conn, sid, cutoff)
                if event is not None:
                    self.bus.publish(conn, event)
                return event is not None
            if await self.writer.run(job):
                marked += 1
                self.metrics.studies_stable.inc()
        if marked:
            self.wake_reconciler()
        return marked

    # --- operations ------------------------------------------------------------------------------------
    async def reprocess(self, message_id: int) -> dict[str, Any]:
        def work(session: Any) -> dict[str, Any]:
            row = session.get(Message, message_id, options=[selectinload(Message.content)])
            if row is None:
                raise LookupError(f"no message {message_id}")
            check_reprocessable(row)
            inbound = self.inbound.get(row.channel)
            if inbound is None:
                raise ValueError(f"channel {row.channel!r} is not running")
            st = reprocess(session, inbound, row)
            return {"message_id": st.message_id, "status": st.status, "error": st.error,
                    "outcome": st.outcome.as_dict() if st.outcome else None}
        return await self.writer.run(work)

    def _dicom_status(self, ch: Channel) -> dict[str, Any]:
        d = self.dicom_listeners.get(ch.name)
        m = self.metrics
        outcomes = ("stored", "duplicate", "overwritten", "rejected_duplicate", "invalid", "out_of_resources",
                    "not_stored", "failed")
        return {
            "name": ch.name, "connector": ch.connector, "enabled": ch.enabled, "description": ch.description,
            "state": "listening" if d and d.running else ("disabled" if not ch.enabled else "stopped"),
            "port": d.port if d else ch.port, "aet": d.aet if d else (ch.aet or self.settings.dicom.aet),
            "associations": {"open": d.active_associations if d else 0, "total": d.associations_total if d else 0,
                             "refused": d.refused_total if d else 0},
            "counters": {"instances": {o: m.dicom_stored.value(channel=ch.name, outcome=o) for o in outcomes
                                       if m.dicom_stored.value(channel=ch.name, outcome=o)},
                         "requests": {sv: m.dicom_requests.value(channel=ch.name, service=sv)
                                      for sv in ("echo", "find", "mwl", "move", "get")
                                      if m.dicom_requests.value(channel=ch.name, service=sv)}},
            "options": {"duplicates": ch.dicom.duplicates, "allowed_calling_aets": ch.dicom.allowed_calling_aets,
                        "max_associations": ch.dicom.max_associations},
        }

    def channel_status(self) -> list[dict[str, Any]]:
        out = []
        for name, ch in self.channels.items():
            m = self.metrics
            if ch.connector == "dicom":
                out.append(self._dicom_status(ch))
                continue
            lst = self.listeners.get(name)
            names = dict.fromkeys(m for r in ch.routes for m in r.mappings)  # each mapping once, in route order
            mapping_problems = [str(p) for mname in names for p in self.mappings.problems(mname)]
            out.append({
                "name": name, "connector": ch.connector, "enabled": ch.enabled, "description": ch.description,
                "state": "listening" if lst and lst.server.running else ("disabled" if not ch.enabled else "stopped"),
                "port": lst.server.port if lst else ch.port,
                "connections": {"open": lst.server.active_connections if lst else 0,
                                "total": lst.server.connections_total if lst else 0,
                                "refused": lst.server.refused_total if lst else 0},
                "counters": {
                    "received": m.received.value(channel=name),
                    "acked": {c: m.acked.value(channel=name, code=c)
                              for c in ("AA", "AE", "AR", "CA", "CE", "CR") if m.acked.value(channel=name, code=c)},
                    "duplicates": m.duplicates.value(channel=name),
                    "errors": m.failed.value(channel=name, reason="error"),
                    "rejected": m.failed.value(channel=name, reason="rejected"),
                    "not_stored": m.failed.value(channel=name, reason="not_stored"),
                },
                "routes": [{"messages": r.messages, "action": r.action, "mappings": r.mappings} for r in ch.routes],
                "mapping_problems": mapping_problems,
            })
        return out
