"""The DICOM SCP of one DICOM channel (pynetdicom), and what each DIMSE service does.

Association lifecycle: pynetdicom runs every association in its own thread and calls the handlers
bound here from it. A C-STORE is answered only after the file is durable in storage and its index
row is committed by the writer (the same group-committing writer the MLLP listeners use), so a
success status always means "stored". Anything that goes wrong becomes a specific failure status
with an Error Comment; a handler never lets an exception reach pynetdicom (which would answer
with a generic 0xC211).

Received data is written by pynetdicom straight to a temporary file as it arrives
(STORE_RECV_CHUNKED_DATASET): an instance is never held in memory, whatever its size. Free space
is checked as it arrives, and the file of a transfer cut off is deleted when its association
ends (``spool.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import os
import socketserver
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from engine.channels import Channel
from engine.config import Settings
from engine.connectors.dicom.commitment import report_recorder, take_report
from engine.connectors.dicom.contexts import SharedContexts, add_supported, move_contexts
from engine.connectors.dicom.peers import CallingPeers
from engine.connectors.dicom.query import QueryError, TooManyMatches, find, instances_for
from engine.connectors.dicom.reactor import unwatch, watch
from engine.connectors.dicom.spool import discard_unfinished, receiving, refuse_partial, was_refused
from engine.connectors.dicom.worklist import find_worklist
from engine.connectors.sharing import check_shared, set_reuse_port
from engine.dicom import status as S
from engine.dicom.headers import HeaderError, InstanceHeader, read_header, storage_key
from engine.dicom.transcode import TranscodeError, decoded_for, syntax_label
from engine.domain.events import EventBus
from engine.metrics import Metrics
from engine.pipeline.dicom_index import DicomIndex
from engine.pipeline.stage import ingest_blocking
from engine.pipeline.writer import IngestWriter
from engine.storage.base import ObjectStorage, StorageFull, digest_bytes
from engine.store.db import Database
from engine.store.states import InstanceOutcome
from engine.tls import client_context, peer_common_name

log = logging.getLogger(__name__)
NOT_TAKEN = (InstanceOutcome.DUPLICATE, InstanceOutcome.REJECTED, InstanceOutcome.UID_CONFLICT)  # file not indexed
logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # one INFO line per PDU otherwise


class TLSFailureLine(logging.Filter):
    """pynetdicom logs a failed TLS handshake (a plain-text peer on a TLS port, an untrusted or
    missing client certificate) as an ERROR with a traceback; it is one WARNING line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ssl.SSLError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "DICOM TLS handshake failed: %s", (exc.reason or exc,)
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("pynetdicom.dul").addFilter(TLSFailureLine())


def _status(code: int, comment: str = "") -> Dataset:
    """A status Dataset. Yield it as the status itself (not beside a bare int status), or pynetdicom
    drops the Error Comment and the peer never learns why."""
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


class SharedPortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with SO_REUSEPORT set before the bind (--workers)."""

    def server_bind(self) -> None:
        assert self.socket is not None
        set_reuse_port(self.socket)
        super().server_bind()

    def shutdown(self) -> None:
        """As pynetdicom's, less taking itself off the AE's list of servers: ae.start_server puts a
        server there, ae.make_server (which builds this one) does not."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class DicomListener:
    """One DICOM channel: its AE, its server thread and its handlers."""

    def __init__(self, channel: Channel, settings: Settings, *, db: Database, writer: IngestWriter,
                 storage: ObjectStorage, metrics: Metrics, host: str, port: int, bus: EventBus,
                 ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False) -> None:
        self.channel = channel
        self.reuse_port = reuse_port  # SO_REUSEPORT: shared with the other --workers processes
        self.ssl_context = ssl_context  # DICOM TLS (the channel's tls: block); None: plain TCP
        self._move_tls: ssl.SSLContext | None = None  # client context of C-MOVE to tls:// destinations
        self.index = DicomIndex(channel.name, channel.dicom.duplicates, bus)  # the inbound stage of C-STORE
        self.opts = channel.dicom
        self.settings = settings
        self.db = db
        self.writer = writer
        self.storage = storage
        self.metrics = metrics
        self.host, self.port = host, port
        self.aet = channel.aet or settings.dicom.aet
        self.peers = CallingPeers.of(channel.dicom)
        self._server: Any = None
        self._io = concurrent.futures.ThreadPoolExecutor(max(2, channel.dicom.max_associations),
                                                         thread_name_prefix=f"dicom-io-{channel.name}")
        self.associations_total = 0
        self.refused_total = 0

    # --- lifecycle ------------------------------------------------------------------------------------
    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.aet)
        add_supported(ae)
        ae.maximum_associations = self.opts.max_associations
        ae.maximum_pdu_size = self.opts.max_pdu_bytes
        ae.acse_timeout = self.opts.acse_timeout_seconds
        ae.dimse_timeout = self.opts.dimse_timeout_seconds
        ae.network_timeout = self.opts.network_timeout_seconds
        ae.require_called_aet = self.opts.require_called_aet
        return ae  # calling AE titles (and their addresses) are checked in _on_requested

    async def start(self) -> None:
        _config.STORE_RECV_CHUNKED_DATASET = True
        # pynetdicom's standard handlers only log INFO/DEBUG lines about each PDU and DIMSE message (the
        # engine shows pynetdicom's WARNING and above only), but with "standard" they are bound to every
        # association and run, building those lines, for every PDU sent and received; warnings and
        # errors are logged either way
        _config.LOG_HANDLER_LEVEL = "none"
        destinations = (self.settings.dicom.move_destination(e.partition("=")[0]) for e in self.settings.dicom.destinations)
        if any(d is not None and d.tls for d in destinations):
            self.move_tls_context()  # its files are read now: a missing one stops the start, not a C-MOVE
        ae = self._build_ae()
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self.on_echo), (evt.EVT_C_STORE, self.on_store), (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move), (evt.EVT_C_GET, self.on_get),
            (evt.EVT_N_EVENT_REPORT, self.on_event_report), (evt.EVT_N_ACTION, self.on_action),
            (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted), (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_REQUESTED, self._on_requested), (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_PDU_RECV, self._on_pdu),
        ]
        if self.reuse_port:
            check_shared(self.port, f"channel {self.channel.name}")
            self._server = await asyncio.to_thread(self._start_shared, ae, handlers)
        else:
            self._server = await asyncio.to_thread(ae.start_server, (self.host, self.port), block=False,
                                                   evt_handlers=handlers, ssl_context=self.ssl_context)
        self._server.contexts = SharedContexts(self._server.contexts)  # not deep-copied per association
        self.port = self._server.server_address[1]
        log.info("channel %s: DICOM SCP %s on %s:%d", self.channel.name, self.aet, self.host, self.port)

    def _start_shared(self, ae: AE, handlers: list[Any]) -> SharedPortServer:
        """As ae.start_server(block=False), on a socket bound with SO_REUSEPORT."""
        server = cast(SharedPortServer, ae.make_server((self.host, self.port), evt_handlers=handlers,
                                                       ssl_context=self.ssl_context, server_class=SharedPortServer))
        threading.Thread(target=server.serve_forever, name=f"dicom-acceptor-{self.channel.name}", daemon=True).start()
        return server

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            # stops accepting, then waits for the associations in hand (their responses are sent)
            await asyncio.to_thread(server.shutdown)
        self._io.shutdown(wait=True)

    def use_ssl_context(self, context: ssl.SSLContext) -> None:
        """A renewed certificate: associations accepted from now on use this context (one
        attribute assignment, which the accepting thread sees whole)."""
        self.ssl_context = context
        server = self._server
        if server is not None:
            server.ssl_context = context

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def active_associations(self) -> int:
        server = self._server
        return len(server.active_associations) if server is not None else 0

    # --- association events ---------------------------------------------------------------------------
    def _on_connection(self, event: Any) -> None:
        """A new connection gets association_request_timeout_seconds to send its A-ASSOCIATE-RQ (the
        ARTIM timer and the wait for the request both run on the association's acse_timeout): a
        connection that never asks holds an association slot, and max_associations of them would
        lock every modality out for the whole acse_timeout."""
        event.assoc.acse_timeout = min(self.opts.association_request_timeout_seconds, self.opts.acse_timeout_seconds)
        watch(event.assoc)  # its reactors wait for work instead of polling every millisecond (reactor.py)

    def _on_requested(self, event: Any) -> None:
        """The A-ASSOCIATE-RQ is in: a calling AE title not recognized (not listed, calling from an
        address not allowed for it, or not the subject of its client certificate under
        tls.bind_ae_title) is rejected here, before any negotiation."""
        event.assoc.acse_timeout = self.opts.acse_timeout_seconds  # the rest of the association: as configured
        if self._refuse_unknown_peer(event.assoc):
            return
        tls = self.channel.tls
        if tls is not None and tls.bind_ae_title:
            self._check_bound_ae_title(event.assoc)

    def _refuse_unknown_peer(self, assoc: Any) -> bool:
        """allowed_calling_aets / calling_ae_hosts: True when the association was rejected."""
        if not self.peers.restricted:
            return False
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = assoc.requestor.address
        why = self.peers.refusal(calling, address)
        if why is None:
            return False
        self.refused_total += 1
        self.metrics.dicom_associations.inc(channel=self.channel.name, result="rejected")
        log.warning("channel %s: association from %s (%s:%s) to %s rejected: calling AE title not recognized (%s)",
                    self.channel.name, calling, address, assoc.requestor.port,
                    assoc.requestor.primitive.called_ae_title.strip(), why)
        assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, service user, calling AE not recognized
        assoc.kill()  # as pynetdicom's own rejections: waits until the A-ASSOCIATE-RJ is sent
        return True

    def _check_bound_ae_title(self, assoc: Any) -> None:
        """tls.bind_ae_title: the calling AE title must be the CN of the peer's (verified) client
        certificate; else the association is rejected: calling AE title not recognised."""
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        sock = getattr(assoc.dul.socket, "socket", None)
        cn = peer_common_name(sock.getpeercert()) if isinstance(sock, ssl.SSLSocket) else None
        if cn is not None and cn.strip() == calling:
            return
        log.warning("channel %s: association from %s refused: calling AE title %r is not the subject of its "
                    "client certificate (CN %r; tls.bind_ae_title)", self.channel.name, assoc.requestor.address,
                    calling, cn)
        # as pynetdicom rejects (acse.negotiate_association): the A-ASSOCIATE-RJ goes out before the
        # connection is closed (kill waits for the DUL thread), and EVT_REJECTED is counted
        assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected permanent, service user, calling AE not recognised
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def _on_accepted(self, event: Any) -> None:
        self.associations_total += 1
        self.metrics.dicom_associations.inc(channel=self.channel.name, result="accepted")

    def _on_rejected(self, event: Any) -> None:
        self.refused_total += 1
        self.metrics.dicom_associations.inc(channel=self.channel.name, result="rejected")
        req = event.assoc.requestor
        log.warning("channel %s: association from %s (%s:%s) to %s refused", self.channel.name,
                    req.ae_title, req.address, req.port, event.assoc.acceptor.ae_title)

    def _on_aborted(self, event: Any) -> None:
        self.metrics.dicom_associations.inc(channel=self.channel.name, result="aborted")
        self._discard_unfinished(event)

    def _on_closed(self, event: Any) -> None:
        """The connection is gone (released, aborted, dropped): no request still in transfer or
        still queued can be answered, so their temporary files go now."""
        self._discard_unfinished(event)
        unwatch(event.assoc)

    def _discard_unfinished(self, event: Any) -> None:
        for path in discard_unfinished(event.assoc):
            log.warning("channel %s: association with %s ended mid-transfer; partial file %s deleted",
                        self.channel.name, event.assoc.requestor.ae_title, path.name)

    def _on_pdu(self, event: Any) -> None:
        """Each PDU received (pynetdicom's DUL thread, before the PDU's data is written): while a
        C-STORE's data is arriving, free space is checked against the floor, so one large
        instance cannot fill the disk. Below it, the partial file goes at once and the rest of
        the request is dropped as it arrives; the request is answered A700 (``_store``)."""
        if receiving(event.assoc) is None:
            return
        free = self.storage.free_bytes()
        if free is None or free >= self.opts.min_free_mb * 1024 * 1024:
            return
        path = refuse_partial(event.assoc)
        if path is not None:
            log.error("channel %s: storage has %d MB free (floor %d MB) while receiving from %s: partial file %s "
                      "deleted, the rest is dropped and answered A700", self.channel.name, free // (1024 * 1024),
                      self.opts.min_free_mb, event.assoc.requestor.ae_title, path.name)

    def below_floor(self) -> bool:
        """Whether the storage's free space is below the channel's floor (min_free_mb): C-STORE and
        STOW-RS refuse to store then (A700)."""
        free = self.storage.free_bytes()
        return free is not None and free < self.opts.min_free_mb * 1024 * 1024

    # --- C-ECHO ---------------------------------------------------------------------------------------
    def on_echo(self, event: Any) -> int:
        self.metrics.dicom_requests.inc(channel=self.channel.name, service="echo")
        return S.SUCCESS

    # --- Storage Commitment: the destinations' reports -------------------------------------------------
    def on_event_report(self, event: Any) -> tuple[Dataset, None]:
        """An N-EVENT-REPORT: the Storage Commitment report of a destination the engine asked
        (engine/connectors/dicom/commitment.py), recorded by the writer before it is answered with success."""
        self.metrics.dicom_requests.inc(channel=self.channel.name, service="commitment")
        record = report_recorder(self.writer, timeout=self.opts.dimse_timeout_seconds)
        status, _report = take_report(event, record, f"channel {self.channel.name}")
        return status, None

    def on_action(self, event: Any) -> tuple[Dataset, None]:
        """An N-ACTION: the engine asks for storage commitment but does not commit on request."""
        log.warning("channel %s: N-ACTION from %s refused: not a Storage Commitment SCP", self.channel.name,
                    str(event.assoc.requestor.ae_title).strip())
        return _status(S.UNRECOGNIZED_OPERATION, "storage commitment is not offered here"), None

    # --- C-STORE --------------------------------------------------------------------------------------
    def on_store(self, event: Any) -> Dataset | int:
        req = event.request
        if was_refused(req):  # free space fell below the floor while it arrived (_on_pdu)
            self.metrics.dicom_stored.inc(channel=self.channel.name, outcome="out_of_resources")
            return _status(S.OUT_OF_RESOURCES, "storage full: free space below the floor")
        answer = self.store_file(Path(event.dataset_path), calling=str(event.assoc.requestor.ae_title).strip(),
                                 remote=f"{event.assoc.requestor.address}:{event.assoc.requestor.port}",
                                 command_sop_class=str(req.AffectedSOPClassUID),
                                 command_sop_instance=str(req.AffectedSOPInstanceUID),
                                 transfer_syntax=str(event.context.transfer_syntax))
        # a bare status when there is no comment to carry: pynetdicom then builds no Dataset to copy from
        return _status(answer.status, answer.comment) if answer.comment else answer.status

    def store_file(self, path: Path, *, calling: str | None, remote: str | None, command_sop_class: str | None = None,
                   command_sop_instance: str | None = None, transfer_syntax: str | None = None,
                   expected_study: str | None = None) -> StoreAnswer:
        """Store one received instance (a complete file at ``path``) and commit its index row: the one
        way in for C-STORE and STOW-RS (engine/web/stow.py). Blocking: call from a thread, not the
        event loop. The answer (its DIMSE status) is given only after the COMMIT; it never raises.
        ``path`` is left where it was when the instance was not stored (the caller deletes it)."""
        t0 = time.perf_counter()
        try:
            answer = self._store(path, calling, remote, command_sop_class, command_sop_instance, transfer_syntax,
                                 expected_study)
        except Exception as exc:  # never let pynetdicom answer with a bare 0xC211
            log.exception("channel %s: C-STORE failed unexpectedly", self.channel.name)
            answer = StoreAnswer("failed", S.PROCESSING_FAILURE, f"not stored: {type(exc).__name__}")
        self.metrics.dicom_stored.inc(channel=self.channel.name, outcome=answer.outcome)
        self.metrics.store_latency.observe(time.perf_counter() - t0, channel=self.channel.name)
        return answer

    def _store(self, path: Path, calling: str | None, remote: str | None, command_sop_class: str | None,
               command_sop_instance: str | None, transfer_syntax: str | None,
               expected_study: str | None) -> StoreAnswer:
        sop_uid = command_sop_instance or path.name
        if self.below_floor():
            log.error("channel %s: storage below its free-space floor (%d MB): refusing %s from %s",
                      self.channel.name, self.opts.min_free_mb, sop_uid, calling)
            return StoreAnswer("out_of_resources", S.OUT_OF_RESOURCES, "storage full: free space below the floor")
        # the file's fsync (disk), its checksum (C, without the GIL) and the header parse (Python, this
        # thread) at once: the slowest of the three, not their sum, before the file is put in place.
        # A file of up to READ_WHOLE_BYTES (a CT or MR slice) is read once, here: checksummed and parsed
        # from those bytes, not read again by each
        flushed = self._io.submit(self.storage.flush, path)
        data = read_small(path)
        digested = self._io.submit(self.storage.digest, path) if data is None else self._io.submit(digest_bytes, data)
        both: list[concurrent.futures.Future[Any]] = [flushed, digested]
        try:
            hdr = read_header(path if data is None else io.BytesIO(data), command_sop_class=command_sop_class,
                              command_sop_instance=command_sop_instance, transfer_syntax=transfer_syntax)
            if expected_study is not None and hdr.study_uid != expected_study:
                raise HeaderError(S.DATASET_MISMATCH, "StudyInstanceUID differs from the study of the request")
        except HeaderError as exc:
            log.warning("channel %s: refused %s from %s: %04X %s", self.channel.name, sop_uid, calling, exc.status,
                        exc.comment)
            concurrent.futures.wait(both)
            return StoreAnswer("invalid", exc.status, exc.comment, header_uids(path))
        sop_uid = hdr.sop_instance_uid
        try:
            concurrent.futures.wait(both)  # both done, whichever failed first
            size, sha = digested.result()
            flushed.result()  # durable before it is put in place and indexed
            stored = self.storage.put_file(path, storage_key(hdr.study_uid, hdr.series_uid, hdr.sop_instance_uid,
                                                             sha), size=size, sha256=sha)
        except StorageFull as exc:
            log.error("channel %s: storage full storing %s: %s", self.channel.name, sop_uid, exc)
            return StoreAnswer("out_of_resources", S.OUT_OF_RESOURCES, "storage full", hdr)
        except OSError as exc:
            log.error("channel %s: cannot write %s: %s", self.channel.name, sop_uid, exc)
            return StoreAnswer("out_of_resources", S.OUT_OF_RESOURCES, f"storage error: {exc.strerror or exc}", hdr)

        received = self.index.prepare(hdr, stored, calling_aet=calling, remote=remote)
        try:
            result = ingest_blocking(self.writer, self.index, received, timeout=self.opts.dimse_timeout_seconds)
        except Exception as exc:
            # The file may be on disk, but without its index row it is not stored: the sender
            # must send it again (the same bytes land on the same key, so nothing piles up).
            log.error("channel %s: index not committed for %s: %s", self.channel.name, sop_uid, exc)
            return StoreAnswer("not_stored", S.PROCESSING_FAILURE, "not stored: database unavailable", hdr)
        if result.outcome in NOT_TAKEN and result.stored_key != stored.key:
            self.storage.delete(stored.key)  # the new bytes were not taken
        if result.replaced_key and result.replaced_key != stored.key:
            self.storage.delete(result.replaced_key)
        if result.outcome == InstanceOutcome.REJECTED:
            return StoreAnswer("rejected_duplicate", S.DUPLICATE_SOP_INSTANCE,
                               "SOP Instance UID already stored with other content", hdr)
        if result.outcome == InstanceOutcome.UID_CONFLICT:
            log.warning("channel %s: refused %s from %s: %s", self.channel.name, sop_uid, calling, result.refusal)
            return StoreAnswer(str(result.outcome), S.UID_CONFLICT, result.refusal or "", hdr)
        return StoreAnswer(str(result.outcome), S.SUCCESS, "", hdr)

    # --- C-FIND (Q/R and worklist) --------------------------------------------------------------------
    def on_find(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        is_mwl = str(event.request.AffectedSOPClassUID) == ModalityWorklistInformationFind
        self.metrics.dicom_requests.inc(channel=self.channel.name, service="mwl" if is_mwl else "find")
        try:
            identifier = event.identifier
        except Exception as exc:
            yield _status(S.IDENTIFIER_MISMATCH, f"identifier unreadable: {exc}"), None
            return
        try:
            with self.db.reader.connect() as conn:
                if is_mwl:
                    answers = list(find_worklist(conn, identifier, statuses=self.opts.worklist_statuses,
                                                 fold_names=self.opts.names_case_insensitive,
                                                 limit=self.opts.worklist_max_results))
                else:
                    answers = list(find(conn, identifier, fold_names=self.opts.names_case_insensitive,
                                        limit=self.opts.query_max_results, retrieve_aet=self.aet))
        except TooManyMatches as exc:
            yield _status(S.OUT_OF_RESOURCES, str(exc)), None
            return
        except QueryError as exc:
            yield _status(S.IDENTIFIER_MISMATCH, str(exc)), None
            return
        except Exception as exc:
            log.exception("channel %s: C-FIND failed", self.channel.name)
            yield _status(S.UNABLE_TO_PROCESS, f"query failed: {type(exc).__name__}"), None
            return
        for ds in answers:
            if event.is_cancelled:
                yield S.CANCEL, None
                return
            yield S.PENDING, ds
        yield S.SUCCESS, None

    # --- C-MOVE / C-GET -------------------------------------------------------------------------------
    def _select(self, event: Any) -> list[Any]:
        with self.db.reader.connect() as conn:
            return instances_for(conn, event.identifier)

    def _load(self, key: str) -> Dataset:
        path = self.storage.local_path(key)
        if path is not None:
            return dcmread(os.fspath(path))
        with self.storage.open(key) as f:
            return dcmread(f)

    def on_move(self, event: Any) -> Iterator[Any]:
        self.metrics.dicom_requests.inc(channel=self.channel.name, service="move")
        dest_aet = str(event.move_destination).strip()
        found = self.settings.dicom.move_destination(dest_aet)
        if found is None:
            log.warning("channel %s: C-MOVE to unknown destination %r", self.channel.name, dest_aet)
            yield None, None  # pynetdicom answers 0xA801 Move Destination unknown
            return
        try:
            refs = self._select(event)
        except QueryError as exc:
            log.warning("channel %s: C-MOVE refused: %s", self.channel.name, exc)
            yield found.host, found.port
            yield 1
            yield _status(S.IDENTIFIER_MISMATCH, str(exc)), None
            return
        sub = _SubAssociation()
        options: dict[str, Any] = {"contexts": move_contexts({(r.sop_class_uid, r.transfer_syntax) for r in refs}),
                                   "ae_title": dest_aet, "evt_handlers": [(evt.EVT_ACCEPTED, sub.on_accepted)]}
        if found.tls:
            options["tls_args"] = (self.move_tls_context(), found.host)
        yield found.host, found.port, options
        yield len(refs)
        # pynetdicom asks for the first instance only once the destination has accepted the association
        yield from self._send(event, refs, sub.accepted, dest_aet)

    def move_tls_context(self) -> ssl.SSLContext:
        """How C-MOVE sub-associations to a tls:// destination connect: the destination's certificate
        must chain to the channel's tls.ca (else the system's CAs) and name its host; the channel's
        own certificate is our client certificate."""
        if self._move_tls is None:
            tls = self.channel.tls
            self._move_tls = (client_context(tls.ca, tls.cert, tls.key) if tls is not None else client_context())
        return self._move_tls

    def on_get(self, event: Any) -> Iterator[Any]:
        self.metrics.dicom_requests.inc(channel=self.channel.name, service="get")
        try:
            refs = self._select(event)
        except QueryError as exc:
            log.warning("channel %s: C-GET refused: %s", self.channel.name, exc)
            yield 1
            yield _status(S.IDENTIFIER_MISMATCH, str(exc)), None
            return
        yield len(refs)
        yield from self._send(event, refs, lambda sop_class: accepted_syntaxes(event.assoc, sop_class),
                              str(event.assoc.requestor.ae_title).strip())

    def _send(self, event: Any, refs: list[Any], accepted: Callable[[str], list[str]],
              receiver: str) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """The C-STORE sub-operations of a C-GET/C-MOVE, one instance at a time (read, decoded when the
        receiver does not take its stored syntax, sent, dropped: engine/dicom/transcode.py).

        An instance that cannot be sent in a syntax the receiver accepted (no decoder for its syntax ...)
        is a failed sub-operation and the rest goes on. From then on each response carries an Error
        Comment naming the syntax(es) ("1 not sent: no decoder for 1.2.840.10008.1.2.4.92"), the final
        one (B000, or A702 when every sub-operation failed) included: pynetdicom builds that one from the
        last response's primitive and takes no status from the handler once every sub-operation is done."""
        not_sent: Counter[str] = Counter()
        for ref in refs:
            if event.is_cancelled:
                yield S.CANCEL, None
                return
            try:
                item = decoded_for(self._load(ref.storage_key), accepted(ref.sop_class_uid))
            except TranscodeError as exc:
                log.warning("channel %s: %s not sent to %s: %s", self.channel.name, ref.sop_instance_uid,
                            receiver, exc)
                not_sent[exc.comment] += 1
                yield _status(S.PENDING, _not_sent_comment(not_sent)), _unsendable(ref)
                continue
            except (OSError, ValueError, InvalidDicomError) as exc:
                # one failed sub-operation (a failure status from here would end the whole retrieve)
                log.error("channel %s: stored file of %s unreadable: %s", self.channel.name, ref.sop_instance_uid,
                          exc)
                not_sent["stored file unreadable"] += 1
                yield _status(S.PENDING, _not_sent_comment(not_sent)), _unsendable(ref)
                continue
            if item.transcoded and item.syntax != item.stored_syntax:
                log.debug("channel %s: %s sent to %s as %s (stored as %s)", self.channel.name, ref.sop_instance_uid,
                          receiver, syntax_label(item.syntax), syntax_label(item.stored_syntax))
            yield (_status(S.PENDING, _not_sent_comment(not_sent)) if not_sent else S.PENDING), item.dataset


@dataclass(frozen=True)
class StoreAnswer:
    """How storing one instance ended: the outcome counted in the metrics, the DIMSE status and its
    Error Comment, and the instance's header (or its UIDs as far as they could be read; None when not)."""

    outcome: str
    status: int
    comment: str = ""
    header: InstanceHeader | StoreUids | None = None

    @property
    def stored(self) -> bool:
        return self.status == S.SUCCESS


@dataclass(frozen=True)
class StoreUids:
    """The UIDs of an instance that was refused, as far as its file says (for STOW-RS's FailedSOPSequence)."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_uid: str | None = None


READ_WHOLE_BYTES = 1024 * 1024  # received files up to this size are read into memory once (at most one per association)


def read_small(path: Path) -> bytes | None:
    """The whole file when it has at most READ_WHOLE_BYTES, else None (it is read in chunks where
    needed; so is a file that cannot be read here, which then fails where it did before)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > READ_WHOLE_BYTES:
                return None
            data = f.read(READ_WHOLE_BYTES + 1)
    except OSError:
        return None
    return data if len(data) <= READ_WHOLE_BYTES else None


def header_uids(path: Path) -> StoreUids | None:
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID",
                                                                     "StudyInstanceUID"])
    except Exception:  # unreadable: nothing to name
        return None
    uids = [str(ds.get(k) or "").strip() or None for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")]
    return StoreUids(*uids)


def accepted_syntaxes(assoc: Any, sop_class: str) -> list[str]:
    """The transfer syntaxes ``assoc`` accepted for sending (storage SCU role) instances of ``sop_class``."""
    if assoc is None:
        return []
    return [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
            if str(cx.abstract_syntax) == sop_class and cx.as_scu]


class _SubAssociation:
    """The association of a C-MOVE to its destination, caught as it is accepted (pynetdicom opens it between
    the handler's yields, and calls EVT_ACCEPTED before it reports the association established)."""

    def __init__(self) -> None:
        self.assoc: Any = None

    def on_accepted(self, event: Any) -> None:
        self.assoc = event.assoc

    def accepted(self, sop_class: str) -> list[str]:
        return accepted_syntaxes(self.assoc, sop_class)


def _not_sent_comment(not_sent: Counter[str]) -> str:
    """'2 not sent: no decoder for 1.2.840.10008.1.2.4.92' (cut to the 64 characters of an Error Comment)."""
    return f"{sum(not_sent.values())} not sent: " + "; ".join(not_sent)


def _unsendable(ref: Any) -> Dataset:
    """What stands for an instance that cannot be sent: its SOP class and instance UIDs and no transfer
    syntax, so pynetdicom's send_c_store refuses it before choosing a context (nothing is sent, whatever
    the receiver accepted), counts a failed sub-operation and lists the instance in Failed SOP Instance
    UID List."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = ref.sop_class_uid, ref.sop_instance_uid
    ds.file_meta = FileMetaDataset()
    return ds
