"""The running engine: store, writer, one connector per enabled channel, HTTP and background tasks.

Start order: configuration is checked (a broken channel or mapping stops the start with every
problem listed), the database is migrated, leases on queued work held by a process of this host
that no longer runs (killed, crashed) are taken back (engine/store/leases.py), the writer starts,
then each channel's connector (in channel file order), then HTTP. Stop is the reverse: connectors stop taking work and finish what
they hold (ACKs and C-STORE answers are written, a delivery batch is recorded), the writer drains
its queue, then the database is closed.

The runtime knows connectors only through ``engine.connectors.base.Connector`` and the registry
of types; the HTTP application is handed in by the caller (``http_app``), so this layer does not
import the web layer above it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from aiohttp import web
from sqlalchemy.orm import selectinload

from engine.channels import Channel, load_channels
from engine.config import CleanupSettings, Settings, http_tls_source
from engine.connectors.base import Connector, ConnectorContext, Definitions, disabled_status
from engine.connectors.dicom.channel import DicomConnector
from engine.connectors.dicom.scp import DicomListener
from engine.connectors.exposure import exposure_problems
from engine.connectors.fhir import FhirConnector
from engine.connectors.hl7channel import HL7Channel, Reprocessed
from engine.connectors.http_listener import CappedTCPSite
from engine.connectors.outbound import DeliveringConnector
from engine.connectors.registry import CONNECTOR_TYPES, connector_specs
from engine.domain.events import EventBus
from engine.domain.integrity import ORPHAN_GRACE_SECONDS, sweep_orphans
from engine.domain.lifecycle import CleanupReport, run_cleanup
from engine.domain.studies import mark_stable, stability_candidates, stability_cutoff
from engine.mappings.registry import MappingRegistry
from engine.metrics import Metrics
from engine.pipeline.dry_run import MAPPING_SOURCES
from engine.pipeline.fhir_inbound import FhirInbound
from engine.pipeline.hl7_inbound import check_reprocessable
from engine.pipeline.writer import IngestWriter, InlineWriter
from engine.reconciliation import triggers
from engine.reconciliation.reconciler import Reconciler
from engine.reconciliation.reconciler import Result as ReconcileResult
from engine.reconciliation.rules import ReconciliationRules
from engine.storage.base import ObjectStorage
from engine.storage.local import LocalStorage
from engine.store import leases, migrate, tokens
from engine.store.audit import Actor, AuditAction, Subject, engine_actor, message_subject, record_action
from engine.store.db import Database, create_private_file, open_database
from engine.store.models import Message
from engine.store.retention import prune
from engine.store.tokens import ALL_ROLES, GENERATED, Principal, config_token_name
from engine.tls import ReloadingContext, TLSSettings, TLSSource, check_files
from engine.yamlfile import ConfigFileError, ConfigProblem

log = logging.getLogger(__name__)
C = TypeVar("C", bound=Connector)
HttpAppFactory = Callable[["Engine"], web.Application]



def open_mappings(settings: Settings) -> MappingRegistry:
    return MappingRegistry(Path(settings.mappings_dir), structure_version=settings.mappings.hl7_version,
                           sources=MAPPING_SOURCES)


def load_definitions(settings: Settings) -> tuple[MappingRegistry, list[Channel], list[ConfigProblem]]:
    """Mappings and channels as configured, with every problem found (errors and warnings): each
    file's own, then what each enabled channel's connector type checks against the whole."""
    registry = open_mappings(settings)
    problems = registry.load_all()
    if not Path(settings.mappings_dir).is_dir():
        problems.append(ConfigProblem(settings.mappings_dir, 0, "", "mappings directory not found"))
    channels, chan_problems = load_channels(Path(settings.channels_dir), connector_specs(), set(registry.names()))
    problems.extend(chan_problems)
    defs = Definitions(settings, registry, channels,
                       ports={settings.http.port: "the HTTP server"} if settings.http.port else {})
    for ch in channels:
        if ch.enabled:
            problems.extend(CONNECTOR_TYPES[ch.connector].check(ch, defs))
    problems.extend(exposure_problems(settings, channels))
    return registry, channels, problems


def tls_problems(settings: Settings, channels: list[Channel]) -> list[ConfigProblem]:
    """What the certificate, key and CA files of every TLS endpoint say (engine/tls.py check_files):
    expired, not yet valid, key of another certificate, unreadable; at the line of the setting."""
    problems: list[ConfigProblem] = []
    if settings.http.tls.enabled:
        problems.extend(check_files(settings.http.tls, http_tls_source(settings)))
    for ch in channels:
        if ch.enabled and ch.tls is not None:
            problems.extend(check_files(ch.tls, TLSSource(ch.file, ch.tls_line, ch.tls_key_lines)))
    ehr = settings.ehr
    if ehr.mllp_tls:
        lines = settings.lines_of("ehr")
        source = TLSSource(settings.source or "environment", lines.get("mllp_tls", 0),
                           {"cert": lines.get("mllp_cert_file", 0), "key": lines.get("mllp_key_file", 0),
                            "ca": lines.get("mllp_ca_file", 0)}, prefix="ehr")
        client = TLSSettings(cert=ehr.mllp_cert_file, key=ehr.mllp_key_file, ca=ehr.mllp_ca_file)
        problems.extend(ConfigProblem(p.file, p.line, p.field.replace("ehr.", "ehr.mllp_") + "_file", p.message)
                        for p in check_files(client, source))
    return problems


class Engine:
    def __init__(self, settings: Settings, *, http_app: HttpAppFactory | None = None, reuse_port: bool = False) -> None:
        self.settings = settings
        self.reuse_port = reuse_port  # one of the processes of `radbridge run --workers N`: listeners share ports
        self.http_app = http_app  # builds the HTTP application (engine.web.app.build_app); None: no HTTP
        self.metrics = Metrics()
        self.db: Database = None  # type: ignore[assignment]
        self.writer: IngestWriter = None  # type: ignore[assignment]
        self.mappings: MappingRegistry = None  # type: ignore[assignment]
        self.channels: dict[str, Channel] = {}
        self.connectors: dict[str, Connector] = {}  # enabled channels, by name
        self._storage: LocalStorage | None = None
        self._tmp_lock: BinaryIO | None = None  # a shared lock on <storage>/tmp/.engines while running
        self.http_runner: web.AppRunner | None = None
        self.http_site: CappedTCPSite | None = None
        self.http_tls: ReloadingContext | None = None  # [http.tls]: HTTPS, its certificate reloaded on change
        self.http_port: int = settings.http.port
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop_event = threading.Event()
        self._generated_token: str | None = None
        self._configured_tokens: list[tuple[Principal, bytes]] | None = None
        self._actor = Actor("engine")
        self._started = False  # the start is in the audit trail (so the stop will be)
        self.reconciler: Reconciler | None = None
        self._reconciling: asyncio.Future[int] | None = None
        self._reconcile_wakeup = asyncio.Event()
        self._reconcile_lock = asyncio.Lock()
        self._cleanup_lock = asyncio.Lock()
        self.cleanup_last: CleanupReport | None = None  # the storage lifecycle's last pass (not a dry run)
        self.cleanup_totals = {"passes": 0, "studies_deleted": 0, "bytes_freed": 0, "failed": 0}  # since start
        self.bus = EventBus()  # domain events; reconciliation subscribes here, each outbound channel's outbox too
        triggers.subscribe(self.bus)

    # --- connectors --------------------------------------------------------------------------------------
    def connectors_of(self, kind: type[C]) -> list[C]:
        return [c for c in self.connectors.values() if isinstance(c, kind)]

    def connector(self, name: str, kind: type[C]) -> C:
        """The running connector of channel ``name``; LookupError when there is none of that type."""
        found = self.connectors.get(name)
        if not isinstance(found, kind):
            raise LookupError(f"no running {kind.spec.name} channel named {name!r}")
        return found

    @property
    def fhir(self) -> FhirInbound | None:
        """The fhir channel's inbound stage (served at /fhir/ on the HTTP port), if one is enabled."""
        found = self.connectors_of(FhirConnector)
        return found[0].inbound if found else None

    def stow_listener(self) -> DicomListener | None:
        """The DICOM channel STOW-RS stores through ([http] stow_channel, else the first enabled dicom
        channel by name): its storage, index, duplicate policy and free-space floor."""
        found = sorted(self.connectors_of(DicomConnector), key=lambda c: c.channel.name)
        wanted = self.settings.http.stow_channel
        if wanted:
            found = [c for c in found if c.channel.name == wanted]
        return found[0].listener if found else None

    @property
    def storage(self) -> ObjectStorage | None:
        """The study storage, once a connector asked for it."""
        return self._storage

    def _study_storage(self) -> ObjectStorage:
        if self._storage is None:
            self._storage = LocalStorage(Path(self.settings.storage.dir) / "studies", fsync=self.settings.dicom.fsync)
            self._use_storage_tempdir()
        return self._storage

    # --- tokens ------------------------------------------------------------------------------------------
    def configured_tokens(self) -> list[tuple[Principal, bytes]]:
        """Configured and generated tokens, each with every role and its secret's digest (named
        tokens are rows: engine/store/tokens.py). Hashed on first use, not per request."""
        if self._configured_tokens is None:
            named = {config_token_name(t): t for t in self.settings.api_tokens()}
            if self._generated_token:
                named[GENERATED] = self._generated_token
            self._configured_tokens = [(Principal(name, ALL_ROLES), tokens.digest_of(secret))
                                       for name, secret in named.items()]
        return self._configured_tokens

    def _ensure_token(self) -> None:
        """<storage dir>/api-token: a token holding every role, so a fresh install can be reached. Only
        while neither http.tokens nor a named token (radbridge tokens create) exists."""
        if self.settings.http.auth != "token" or self.settings.api_tokens():
            return
        path = Path(self.settings.storage.dir) / "api-token"
        with self.db.reader.connect() as conn:
            named = len(tokens.active(conn))
        if named:
            if path.exists():
                log.warning("%s is no longer accepted: %d named token(s) exist (radbridge tokens list); delete it",
                            path, named)
            return
        if not path.exists():
            # Engines sharing the storage directory (`run --workers`) may start together: each
            # writes a whole file of its own and links it in place; the first link wins, and every
            # engine then uses what the file holds.
            path.parent.mkdir(parents=True, exist_ok=True)
            mine = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            create_private_file(mine, secrets.token_urlsafe(24) + "\n")  # never readable by others
            try:
                os.link(mine, path)
            except FileExistsError:
                pass
            finally:
                mine.unlink()
        self._generated_token = path.read_text().strip()
        self._configured_tokens = None  # hashed again with the generated one
        log.info("HTTP API token (no http.tokens configured, no named tokens) is in %s", path)

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self.mappings, channels, problems = load_definitions(s)
        for p in problems:
            (log.warning if p.severity == "warning" else log.error)("%s", p)
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            raise ConfigFileError(errors)
        self._announce_patient_details()
        for p in await asyncio.to_thread(tls_problems, s, channels):  # an expired certificate: peers will say so
            log.error("TLS: %s", p)
        Path(s.storage.dir).mkdir(parents=True, exist_ok=True)
        self.db = open_database(s.database_url, sqlite_synchronous=s.database.sqlite_synchronous,
                                busy_timeout_ms=s.database.busy_timeout_ms, pool_size=s.database.pool_size,
                                hide_parameters=not s.log_patient_details)
        await asyncio.to_thread(migrate.upgrade, self.db)
        await asyncio.to_thread(self._reclaim_leases)
        inline = s.database.writer == "inline" or (s.database.writer == "auto" and self.db.is_sqlite)
        self.writer = InlineWriter(self.db.writer) if inline else IngestWriter(self.db.writer)
        self.writer.start()
        self._register_gauges()
        self._actor = engine_actor()
        ctx = ConnectorContext(settings=s, db=self.db, writer=self.writer, mappings=self.mappings,
                               metrics=self.metrics, storage=self._study_storage, events=self.bus,
                               on_tls_reload=self.tls_reloaded, reuse_port=self.reuse_port)
        try:
            for ch in channels:
                self.channels[ch.name] = ch
                if not ch.enabled:
                    log.info("channel %s is disabled", ch.name)
                    continue
                conn = CONNECTOR_TYPES[ch.connector](ch, ctx)
                self.connectors[ch.name] = conn
            if any(c.stores_studies for c in self.connectors.values()):
                self.reconciler = self._make_reconciler()
            for conn in self.connectors.values():
                await conn.start()
            await asyncio.to_thread(self._ensure_token)
            if self.http_app is not None:
                await self._start_http()
        except BaseException:
            await self.stop()
            raise
        # What start-up built (modules, dictionaries, compiled statements) lives as long as the
        # process: moved out of the collector's sight, a full collection no longer walks it and
        # stops listeners for ~100 ms on a slow machine (seen as the max ACK latency).
        await self._audit(AuditAction.START, Subject("Engine", count=len(self.connectors),
                                                     detail=f"pid {os.getpid()}, channels: "
                                                            + (", ".join(self.connectors) or "none")))
        if s.log_patient_details:  # a privacy officer sees who switched patient details into the log
            file, line, key = s.origin("log_patient_details")
            await self._audit(AuditAction.CONFIG_RELOAD, Subject(
                "Engine", detail=f"log_patient_details = true ({file}{f':{line}' if line else ''}, {key})"))
        self._started = True
        gc.collect()
        gc.freeze()
        if s.mappings.reload_seconds > 0:
            self._tasks.append(asyncio.create_task(self._watch_mappings(), name="mapping-reload"))
        if s.retention.enabled:
            self._tasks.append(asyncio.create_task(self._retention_loop(), name="retention"))
        if self._storage is not None:
            self._tasks.append(asyncio.create_task(self._storage_sweeps(self._storage), name="storage-sweep"))
            if s.storage.cleanup.enabled:
                self._tasks.append(asyncio.create_task(self._cleanup_loop(), name="storage-cleanup"))
        if self.reconciler is not None:
            self._tasks.append(asyncio.create_task(self._stability_loop(), name="study-stability"))
            self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="reconciliation"))

    def _announce_patient_details(self) -> None:
        """log_patient_details on is said loudly at every start, with where it was switched on.

        The audit trail records it too (a config-reload row, once the database is open: start())."""
        if not self.settings.log_patient_details:
            return
        file, line, key = self.settings.origin("log_patient_details")
        log.warning("log_patient_details is on (%s%s, %s): patient names, identifiers, accession numbers and birth "
                    "dates are written to the log. For debugging only: switch it off when done",
                    file, f":{line}" if line else "", key)

    def _reclaim_leases(self) -> None:
        """Deliveries and reconciliations leased by a process of this host that died (kill -9, a
        crash) are free again at once, not when their lease lapses."""
        with self.db.writer.begin() as conn:
            leases.reclaim_gone(conn)

    async def _start_http(self) -> None:
        assert self.http_app is not None
        s = self.settings
        # the site times each connection's first request head; aiohttp's keep-alive timer, run
        # again after each response, closes a connection whose next head is not complete in time
        self.http_runner = web.AppRunner(self.http_app(self), access_log=None,
                                         keepalive_timeout=s.http.header_timeout_seconds)
        await self.http_runner.setup()
        if s.http.tls.enabled:
            self.http_tls = ReloadingContext(s.http.tls, "HTTPS")
        site = CappedTCPSite(self.http_runner, s.bind, s.http.port, max_connections=s.http.max_connections,
                             header_timeout=s.http.header_timeout_seconds,
                             ssl_context=self.http_tls.context if self.http_tls is not None else None,
                             reuse_port=self.reuse_port)
        await site.start()
        if self.http_tls is not None and s.http.tls.reload_seconds > 0:
            self.http_tls.on_reload = self.tls_reloaded
            self._tasks.append(asyncio.create_task(self.http_tls.watch(), name="https-certificate-reload"))
        self.http_site = site
        addresses = self.http_runner.addresses
        if addresses:
            self.http_port = int(addresses[0][1])
        log.info("HTTP on %s://%s:%d (/health, /metrics, /api/, /fhir/)", self.http_scheme, s.bind, self.http_port)

    @property
    def http_scheme(self) -> str:
        return "https" if self.settings.http.tls.enabled else "http"

    def _register_gauges(self) -> None:
        m = self.metrics
        m.gauge("radbridge_writer_backlog", "Messages waiting for the ingest writer", lambda: float(self.writer.backlog))
        m.gauge("radbridge_writer_batches_total", "Transactions the ingest writer committed",
                lambda: float(self.writer.stats.batches))
        m.gauge("radbridge_writer_jobs_total", "Messages the ingest writer handled",
                lambda: float(self.writer.stats.jobs))
        m.gauge("radbridge_writer_commit_failures_total",
                "Batches that could not be committed (nothing in them was acknowledged)",
                lambda: float(self.writer.stats.commit_failures))
        m.gauge("radbridge_writer_integrity_retries_total", "Jobs retried after a conflict with another engine process",
                lambda: float(self.writer.stats.retried))
        m.gauge("radbridge_mapping_reloads_total", "Mapping files reloaded after a change",
                lambda: float(self.mappings.reloads))
        m.gauge("radbridge_storage_cleanup_studies_deleted", "Studies the storage lifecycle deleted since the start",
                lambda: float(self.cleanup_totals["studies_deleted"]))
        m.gauge("radbridge_storage_cleanup_bytes_freed", "Study bytes the storage lifecycle freed since the start",
                lambda: float(self.cleanup_totals["bytes_freed"]))
        m.gauge("radbridge_storage_cleanup_last_run_timestamp_seconds",
                "When the storage lifecycle's last pass started (POSIX time; 0: none yet)",
                lambda: self.cleanup_last.started_at.timestamp() if self.cleanup_last is not None else 0.0)
        m.gauge("radbridge_http_connections", "Open HTTP connections",
                lambda: float(self.http_site.open_connections if self.http_site is not None else 0))
        m.gauge("radbridge_http_connections_refused_total", "HTTP connections refused over http.max_connections",
                lambda: float(self.http_site.refused_total if self.http_site is not None else 0))

    def _use_storage_tempdir(self) -> None:
        """pynetdicom writes received instances to the process's temporary directory; keeping that
        on the storage file system makes storing a rename instead of a copy.

        What a crash left there mid-transfer (never acknowledged) is deleted at start, but the
        directory may be shared with other engines (`run --workers`, engines on other hosts): each
        holds a shared lock on tmp/.engines while it runs, and only an engine that finds no other
        holder deletes every leftover; otherwise only those untouched for ORPHAN_GRACE_SECONDS
        (a transfer in progress writes its file as the data comes)."""
        tmp = Path(self.settings.storage.dir) / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        lock = (tmp / ".engines").open("a+b")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except OSError:  # another engine runs on this directory
            alone = False
        cutoff = time.time() - ORPHAN_GRACE_SECONDS
        for stale in tmp.glob("tmp*.dcm"):
            with contextlib.suppress(OSError):
                if alone or stale.stat().st_mtime < cutoff:
                    stale.unlink()
        fcntl.flock(lock, fcntl.LOCK_SH)  # held (the file stays open) until stop()
        self._tmp_lock = lock
        tempfile.tempdir = str(tmp.resolve())

    async def stop(self) -> None:
        self._stop_event.set()
        if self.reconciler is not None:  # finish the batch in hand (its files are committed or removed)
            self.reconciler.stopping = True
            if self._reconciling is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(self._reconciling), 60)
        for out in self.connectors_of(DeliveringConnector):  # a batch being sent finishes and is recorded
            with contextlib.suppress(Exception):
                await out.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        results = await asyncio.gather(*(c.stop() for c in self.connectors.values()), return_exceptions=True)
        for conn, res in zip(list(self.connectors.values()), results, strict=True):
            if isinstance(res, BaseException):
                log.warning("channel %s did not stop cleanly: %s", conn.name, res)
        if self.http_runner is not None:
            await self.http_runner.cleanup()
            self.http_runner = None
            self.http_site = None
        if self._started:  # the last row this engine writes
            self._started = False
            with contextlib.suppress(Exception):  # bounded: a stop never waits on a stuck database
                await asyncio.wait_for(
                    self._audit(AuditAction.STOP, Subject("Engine", count=0, detail=f"pid {os.getpid()}")), 30)
        if isinstance(self.writer, InlineWriter):
            self.writer.stop()
        elif self.writer is not None:
            await asyncio.to_thread(self.writer.stop)
        if self.db is not None:
            self.db.dispose()
        if self._tmp_lock is not None:  # this engine no longer receives into tmp/
            self._tmp_lock.close()
            self._tmp_lock = None
        gc.unfreeze()  # a process that starts engines again (tests) lets the collector see them

    # --- background ------------------------------------------------------------------------------------
    async def _watch_mappings(self) -> None:
        while True:
            await asyncio.sleep(self.settings.mappings.reload_seconds)
            try:
                changed = await asyncio.to_thread(self.mappings.reload_changed)
            except Exception:
                log.exception("mapping reload failed")
                continue
            if changed:
                await self.mapping_reloaded(changed)

    async def reload_mappings(self) -> list[str]:
        """Recompile the mapping files changed on disk now (as the watcher does every
        ``reload_seconds``), with the watcher's audit row; the names reloaded (or refused)."""
        changed = await asyncio.to_thread(self.mappings.reload_changed)
        if changed:
            await self.mapping_reloaded(changed)
        return changed

    async def mapping_reloaded(self, names: list[str]) -> None:
        """One audit row per reload pass that changed files: which, and whether any was refused
        (its previous version kept)."""
        refused = [n for n in names if any(p.severity == "error" for p in self.mappings.problems(n))]
        detail = "reloaded: " + ", ".join(n for n in names if n not in refused)
        if refused:
            detail += "; refused (previous version kept): " + ", ".join(refused)
        try:
            await self._audit(AuditAction.MAPPING_RELOAD, Subject("Mapping", count=len(names), detail=detail),
                              status=422 if refused else 200)
        except Exception:
            log.exception("mapping reload not recorded in the audit trail")

    async def tls_reloaded(self, detail: str, loaded: bool) -> None:
        """A certificate changed on disk at run time (loaded, or refused and the old one kept): a
        config-reload row of the audit trail."""
        try:
            await self._audit(AuditAction.CONFIG_RELOAD, Subject("Engine", detail=detail), status=200 if loaded else 422)
        except Exception:
            log.exception("TLS certificate reload not recorded in the audit trail")

    async def _audit(self, action: AuditAction, subject: Subject, status: int = 200) -> None:
        """An audit row for something the engine did on its own (start, stop, mapping reload)."""
        actor = self._actor
        await self.writer.run(lambda s: record_action(s.connection(), actor, action, subject, status=status))

    async def _retention_loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(prune, self.db, self.settings.retention, stop=self._stop_event)
            except Exception:
                log.exception("retention pass failed; will try again")
            await asyncio.sleep(self.settings.retention.interval_seconds)

    async def _cleanup_loop(self) -> None:
        """The storage lifecycle ([storage.cleanup]): a pass at start, then every interval_seconds."""
        while True:
            try:
                await self.run_cleanup()
            except Exception:
                log.exception("storage cleanup pass failed; will try again")
            await asyncio.sleep(self.settings.storage.cleanup.interval_seconds)

    async def run_cleanup(self, *, dry_run: bool = False, policy: CleanupSettings | None = None) -> CleanupReport:
        """One storage lifecycle pass (engine/domain/lifecycle.py) in a worker thread, its deletions
        through the writer; one pass at a time. A real pass becomes ``cleanup_last``."""
        storage = self._study_storage()
        chosen = policy or self.settings.storage.cleanup
        actor = self._actor

        def write(job: Callable[[Any], Any]) -> Any:
            return self.writer.run_sync(job, timeout=120)
        async with self._cleanup_lock:
            report = await asyncio.to_thread(run_cleanup, self.db, storage, chosen, write=write, actor=actor,
                                             dry_run=dry_run, stop=self._stop_event)
        if not dry_run:
            self.cleanup_last = report
            t = self.cleanup_totals
            t["passes"] += 1
            t["studies_deleted"] += report.deleted
            t["bytes_freed"] += report.bytes_freed
            t["failed"] += report.failed
        return report

    def cleanup_status(self) -> dict[str, Any]:
        """What GET /api/storage/cleanup shows: the settings in force, the last pass, totals since start."""
        c = self.settings.storage.cleanup
        return {"enabled": c.enabled, "max_age_days": c.max_age_days, "max_storage_mb": c.max_storage_mb,
                "low_watermark_mb": c.low_watermark_mb, "min_free_mb": c.min_free_mb,
                "require_forwarded_to": list(c.require_forwarded_to), "delete_unforwarded": c.delete_unforwarded,
                "interval_seconds": c.interval_seconds,
                "last_run": self.cleanup_last.summary() if self.cleanup_last is not None else None,
                "since_start": dict(self.cleanup_totals)}

    async def _stability_loop(self) -> None:
        stable = self.settings.dicom.stable_seconds
        interval = min(5.0, max(0.2, stable / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_stability()
            except Exception:
                log.exception("study stability check failed; will try again")

    async def _storage_sweeps(self, storage: ObjectStorage) -> None:
        """Set aside the files a crash left in storage without an index row: at start those older
        than the grace period, and once more when the grace period has passed (then also those
        the crash just before this start left)."""
        for delay in (0.0, ORPHAN_GRACE_SECONDS):
            await asyncio.sleep(delay)
            try:
                report = await asyncio.to_thread(sweep_orphans, self.db.reader, storage, stop=self._stop_event)
            except Exception:
                log.exception("storage sweep failed (radbridge storage check --repair does the same)")
                continue
            if report.findings:
                log.warning("storage sweep: %d file(s) without an index row moved to the orphan folder",
                            len(report.findings))

    def _make_reconciler(self) -> Reconciler:
        def on_result(r: ReconcileResult) -> None:
            if r.state:
                self.metrics.reconciliations.inc(state=r.state)
            if r.coerced:
                self.metrics.coerced_instances.inc(r.coerced)
        return Reconciler(self.db, self.writer, self._study_storage(), channels=self.channels,
                          rules=lambda name: self.mappings.get_as(name, ReconciliationRules),
                          modifying_system=self.settings.dicom.aet,
                          tmp_dir=Path(self.settings.storage.dir) / "tmp", fsync=self.settings.dicom.fsync,
                          on_result=on_result, bus=self.bus, lease_seconds=self.settings.database.lease_seconds)

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
            for out in self.connectors_of(DeliveringConnector):
                if out.take_queued():  # this pass queued deliveries: send now, not at the next poll
                    out.wake()

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
        for out in self.connectors_of(DeliveringConnector):
            out.wake()

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
    async def reprocess(self, message_id: int, actor: Actor | None = None) -> Reprocessed:
        """Apply a stored message again; with ``actor``, its audit row is in the same transaction."""
        def work(session: Any) -> Reprocessed:
            row = session.get(Message, message_id, options=[selectinload(Message.content)])
            if row is None:
                raise LookupError(f"no message {message_id}")
            check_reprocessable(row)
            conn = self.connectors.get(row.channel)
            if not isinstance(conn, HL7Channel):
                raise ValueError(f"channel {row.channel!r} is not running")
            result = conn.reprocess(session, row)
            if actor is not None:
                session.flush()
                subject = message_subject(session.connection(), message_id)
                subject.detail = f"now {result['status']}"
                record_action(session.connection(), actor, AuditAction.REPROCESS, subject)
            return result
        return await self.writer.run(work)

    def channel_status(self) -> list[dict[str, Any]]:
        """Every configured channel as its connector reports it (disabled ones say so)."""
        out = []
        for name, ch in self.channels.items():
            conn = self.connectors.get(name)
            out.append(conn.status() if conn is not None else disabled_status(ch))
        return out

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Each connector's own health (listening, port); False when any is not ok."""
        ok, found = True, {}
        for name, conn in self.connectors.items():
            h = conn.health()
            if h is not None:
                found[name] = {k: v for k, v in h.items() if k not in ("ok", "min_free_mb")}
                ok = ok and bool(h.get("ok"))
        return ok, found

    def storage_floor_mb(self) -> int:
        """The lowest free-space floor of the channels that store studies (they refuse C-STORE below it)."""
        floors = [int((c.health() or {}).get("min_free_mb", 0)) for c in self.connectors.values() if c.stores_studies]
        return min(floors, default=0)
