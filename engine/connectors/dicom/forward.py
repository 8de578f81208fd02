"""The C-STORE SCU of a dicom-forward destination: one delivery, one association (docs/forwarding.md).

A delivery names a study (study.stable / reconciled / corrected) or one instance (instance.received).
Its instances are read from the index in series and instance order and sent one after another, each
read from storage as it is sent (pynetdicom streams a local file from disk in chunks: a study is never
held in memory). The stored file already carries the reconciled headers (the reconciler coerces it).

Presentation contexts: per SOP class one with explicit and implicit VR little endian, and per stored
compressed syntax one with that syntax alone (engine/connectors/dicom/contexts.py, as for C-MOVE). An
instance goes as stored when its syntax was accepted, else decoded to an accepted uncompressed syntax
(engine/dicom/transcode.py: never re-encoded into another compressed, let alone lossy, syntax).

Outcome (engine/outbound/outbox.py Outcome):
    every instance stored (0000, or warning B000/B006/B007)        delivered
    no association (nothing listening, refused, rejected, aborted,
    no response in time), or out of resources (A7xx), processing
    failure (0110), resource limitation (0213)                      retry (the destination failed:
                                                                    the worker pauses and probes)
    an instance refused otherwise (A9xx, Cxxx, 0122 ...), no
    context for its SOP class, or no way to encode it               dead, naming the instance UIDs
                                                                    and statuses (never patient data)

The instances the destination took are remembered in the delivery's detail (``acknowledged``), so a
retry sends only the rest; at least once all the same (a process that dies mid-send sends the
study again, and the destination keeps one copy per SOP Instance UID).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, _config, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE
from sqlalchemy import select

from engine.channels import ForwardDestination
from engine.connectors.dicom.contexts import move_contexts
from engine.connectors.dicom.scp import accepted_syntaxes
from engine.dicom.transcode import TranscodeError, decoded_for
from engine.domain.studies import INSTANCES, SERIES
from engine.errors import RadBridgeError
from engine.outbound.outbox import Claimed, KeptRendering, Outcome
from engine.storage.base import ObjectStorage
from engine.store.db import Database
from engine.store.states import AttemptOutcome
from engine.tls import client_context

log = logging.getLogger(__name__)
WARNINGS = (0xB000, 0xB006, 0xB007)
# failures worth sending again later: the destination's trouble, not the instance's
TRANSIENT = (0x0110, 0x0213)  # processing failure, resource limitation (and A7xx: out of resources)
MAX_NAMED = 5  # failed instances named in last_error (the rest are counted)


@dataclass(frozen=True)
class ForwardItem:
    """One instance to send, as the index has it."""

    id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    storage_key: str


class NotSent(RadBridgeError):
    """This instance cannot be sent on this association (the others can): dead unless fixed."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def instances_to_send(db: Database, c: Claimed) -> list[ForwardItem]:
    """The delivery's instances in series and instance order (numbers, then arrival)."""
    assert c.study_id is not None
    stmt = (select(INSTANCES.c.id, INSTANCES.c.sop_class_uid, INSTANCES.c.sop_instance_uid,
                   INSTANCES.c.transfer_syntax, INSTANCES.c.storage_key)
            .select_from(INSTANCES.join(SERIES, INSTANCES.c.series_id == SERIES.c.id))
            .where(INSTANCES.c.study_id == c.study_id)
            .order_by(SERIES.c.series_number.is_(None), SERIES.c.series_number, SERIES.c.id,
                      INSTANCES.c.instance_number.is_(None), INSTANCES.c.instance_number, INSTANCES.c.id))
    if c.instance_id is not None:
        stmt = stmt.where(INSTANCES.c.id == c.instance_id)
    with db.reader.connect() as conn:
        return [ForwardItem(*r) for r in conn.execute(stmt)]


def forward_tls_context(dest: ForwardDestination) -> ssl.SSLContext | None:
    """The client context of a destination with tls: (its files are read now)."""
    if dest.tls is None:
        return None
    return client_context(dest.tls.ca, dest.tls.cert, dest.tls.key)


class _Association:
    """What pynetdicom tells about an association being negotiated: whether the connection was made,
    why the association was rejected, whether it was accepted with no presentation context (pynetdicom
    then aborts it)."""

    def __init__(self) -> None:
        self.connected = False
        self.rejection = ""
        self.accepted_without_contexts = False

    def on_connection(self, event: Any) -> None:
        """Connected: Nagle off, as dcmtk does with TCP_NODELAY=1 (else each C-STORE's last PDU waits
        for the peer's delayed ACK: ~4x slower on loopback)."""
        self.connected = True
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_acse(self, event: Any) -> None:
        p = event.primitive
        if not isinstance(p, A_ASSOCIATE):  # A-RELEASE, A-ABORT ... come here too
            return
        result = p.result
        if result is None:
            return
        if result != 0:
            self.rejection = f"{p.result_str}, {p.source_str}: {p.reason_str}"
            return
        results = getattr(p, "presentation_context_definition_results_list", None) or []
        self.accepted_without_contexts = not any(getattr(cx, "result", 1) == 0 for cx in results)


class DicomForwarder:
    """Sends the claimed deliveries of one destination (a ``DeliverySender``)."""

    def __init__(self, dest: ForwardDestination, db: Database, storage: ObjectStorage, *, calling_aet: str,
                 tls: ssl.SSLContext | None = None) -> None:
        self.dest = dest
        self.db = db
        self.storage = storage
        self.calling_aet = calling_aet
        self.tls = tls
        self.stopping = False  # set by close(): the association in hand ends after the current instance
        self.target = dest.address

    async def deliver(self, c: Claimed) -> Outcome:
        return await asyncio.to_thread(self.send, c)

    async def close(self) -> None:
        self.stopping = True

    # --- one delivery ---------------------------------------------------------------------------------
    def send(self, c: Claimed) -> Outcome:
        started = time.monotonic()
        if c.study_id is None:
            return self._outcome(AttemptOutcome.DEAD, "gone", started, error="the study of this delivery was deleted")
        kept = c.detail or {}
        done: set[int] = set(kept.get("acknowledged") or [])
        sent_before = int(kept.get("sent") or len(done))
        items = instances_to_send(self.db, c)
        if not items:
            return self._outcome(AttemptOutcome.DEAD, "gone", started, error="nothing to send: the instance is no "
                                 "longer stored" if c.instance_id is not None else "nothing to send: the study "
                                 "holds no instances")
        todo = [i for i in items if i.id not in done]
        if not todo:
            return self._outcome(AttemptOutcome.DELIVERED, "0000", started, response="every instance was taken before",
                                 detail={"instances": len(items), "sent": sent_before, "acknowledged": []})
        ae = AE(ae_title=self.calling_aet)
        t = self.dest.timeout_seconds
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = t
        watch = _Association()
        assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.aet,
                             contexts=move_contexts({(i.sop_class_uid, i.transfer_syntax) for i in todo}),
                             tls_args=(self.tls, self.dest.host) if self.tls is not None else None,
                             evt_handlers=[(evt.EVT_ACSE_RECV, watch.on_acse),
                                           (evt.EVT_CONN_OPEN, watch.on_connection)])
        if not assoc.is_established:
            if watch.accepted_without_contexts:  # the destination takes none of these SOP classes (syntaxes)
                named = "; ".join(f"instance {i.sop_instance_uid}: no context" for i in todo[:MAX_NAMED])
                more = f"; {len(todo) - MAX_NAMED} more" if len(todo) > MAX_NAMED else ""
                classes = ", ".join(sorted({i.sop_class_uid for i in todo}))
                return self._outcome(AttemptOutcome.DEAD, "no context", started,
                                     error=f"{len(todo)} instance(s) refused: {named}{more}",
                                     response=f"{self.dest.aet} accepted no presentation context for {classes}",
                                     detail=self._detail(items, done, sent_before), destination_failure=False)
            if assoc.is_rejected:
                status, why = "rejected", f"association rejected by {self.dest.aet} ({watch.rejection or 'no reason'})"
            elif watch.connected:
                status, why = "aborted", (f"association with {self.target} aborted while negotiating (or no answer "
                                          f"within {t:g} s)")
            else:
                status, why = "refused", (f"no association with {self.target}: nothing listening, unreachable, or "
                                          f"no connection within {t:g} s")
            return self._outcome(AttemptOutcome.RETRY, status, started, error=why, destination_failure=True,
                                 detail=self._detail(items, done, sent_before))
        acked: list[int] = []
        failed: list[tuple[ForwardItem, str, str]] = []  # (item, status, why)
        warned = 0
        stop: tuple[str, str] | None = None  # (status, why): the rest waits for a retry
        try:
            for n, item in enumerate(todo, 1):
                if self.stopping:
                    stop = ("stopped", "the engine is stopping; the rest is sent later")
                    break
                try:
                    rsp = assoc.send_c_store(self._payload(assoc, item), msg_id=(n - 1) % 65535 + 1)
                except NotSent as exc:
                    failed.append((item, exc.status, str(exc)))
                    continue
                except (ValueError, AttributeError) as exc:  # pynetdicom: no context fits, cannot encode
                    failed.append((item, "no context", str(exc)[:200]))
                    continue
                if not assoc.is_established and "Status" not in rsp:
                    stop = ("aborted", f"association with {self.dest.aet} ended before the response for instance "
                                       f"{item.sop_instance_uid} (aborted, or none within {t:g} s)")
                    break
                if "Status" not in rsp:
                    stop = ("timeout", f"no C-STORE response for instance {item.sop_instance_uid} within {t:g} s")
                    break
                code = int(rsp.Status)
                if code == 0 or code in WARNINGS:
                    acked.append(item.id)
                    warned += code != 0
                elif 0xA700 <= code <= 0xA7FF or code in TRANSIENT:
                    stop = (f"{code:04X}", f"instance {item.sop_instance_uid}: {code:04X} (out of resources or "
                                           "processing failure at the destination); the rest is sent later")
                    break
                else:
                    failed.append((item, f"{code:04X}", _comment(rsp)))
        finally:
            if assoc.is_established:
                assoc.release()
        done.update(acked)
        detail = self._detail(items, done, sent_before + len(acked))
        said = f"{len(acked)} of {len(todo)} instances stored" + (f" ({warned} with warnings)" if warned else "")
        if stop is not None:
            return self._outcome(AttemptOutcome.RETRY, stop[0], started, error=stop[1], response=said, detail=detail,
                                 destination_failure=stop[0] != "stopped")
        if failed:
            named = "; ".join(f"instance {i.sop_instance_uid}: {st}" for i, st, _w in failed[:MAX_NAMED])
            more = f"; {len(failed) - MAX_NAMED} more" if len(failed) > MAX_NAMED else ""
            why = "; ".join(dict.fromkeys(w for _i, _s, w in failed if w))  # what the destination said, for people
            return self._outcome(AttemptOutcome.DEAD, failed[0][1], started,
                                 error=f"{len(failed)} instance(s) refused: {named}{more}",
                                 response=f"{said}\n{why}"[:4000], detail=detail, destination_failure=False)
        detail["acknowledged"] = []  # all taken: the ids are not needed any more
        return self._outcome(AttemptOutcome.DELIVERED, "0000", started, response=said, detail=detail)

    def _payload(self, assoc: Any, item: ForwardItem) -> Dataset | str:
        """What send_c_store sends for ``item``: the stored file itself (streamed from disk) when its
        syntax was accepted; else the dataset decoded to an accepted uncompressed syntax."""
        accepted = accepted_syntaxes(assoc, item.sop_class_uid)
        if not accepted:
            raise NotSent("no context", f"{self.dest.aet} accepted no presentation context for SOP class "
                                        f"{item.sop_class_uid}")
        path = self.storage.local_path(item.storage_key)
        try:
            if path is not None and item.transfer_syntax in accepted:
                if not path.exists():
                    raise FileNotFoundError(item.storage_key)
                return os.fspath(path)
            if path is not None:
                return decoded_for(path, accepted).dataset
            with self.storage.open(item.storage_key) as f:
                return decoded_for(dcmread(f), accepted).dataset
        except TranscodeError as exc:
            raise NotSent("transcode", exc.comment) from None
        except (OSError, InvalidDicomError, ValueError) as exc:
            log.error("forward to %s: stored file of instance %s unreadable: %s", self.dest.name,
                      item.sop_instance_uid, exc)
            raise NotSent("unreadable", "stored file unreadable") from None

    @staticmethod
    def _detail(items: list[ForwardItem], done: set[int], sent: int) -> KeptRendering:
        return {"instances": len(items), "sent": sent, "acknowledged": sorted(done)}

    def _outcome(self, outcome: AttemptOutcome, status: str, started: float, *, error: str | None = None,
                 response: str | None = None, detail: KeptRendering | None = None,
                 destination_failure: bool | None = None) -> Outcome:
        return Outcome(outcome, status, response=response, error=error,
                       duration_ms=int((time.monotonic() - started) * 1000), target=self.target, detail=detail,
                       destination_failure=destination_failure)


def _comment(rsp: Dataset) -> str:
    """The destination's Error Comment (kept in the attempt's response, never in last_error: a
    destination may quote the patient in it)."""
    return str(rsp.get("ErrorComment", "") or "").strip()


def send_files_streamed() -> None:
    """pynetdicom sends a C-STORE given a file path by streaming the file's dataset from disk (never
    decoded, never held whole in memory). Process-wide; C-MOVE/C-GET hand it datasets and are not
    affected."""
    _config.STORE_SEND_CHUNKED_DATASET = True
