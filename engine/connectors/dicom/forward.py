"""The C-STORE SCU of a dicom-forward destination: one delivery, one association (docs/forwarding.md).

A delivery names a study (study.stable / reconciled / corrected) or one instance (instance.received).
Its instances are read from the index in series and instance order and sent one after another, each
read from storage as it is sent, by the lean C-STORE SCU of engine/connectors/dicom/storescu.py: the
stored file's dataset bytes go on the wire as they are, read in chunks after its File Meta Information
(never parsed, a study never held in memory). The stored file already carries the reconciled headers
(the reconciler coerces it).

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
import logging
import ssl
import time
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import encode
from sqlalchemy import select

from engine.channels import ForwardDestination
from engine.connectors.dicom.contexts import move_contexts
from engine.connectors.dicom.storescu import (
    AssociationFailed,
    AssociationLost,
    StoreAssociation,
    StoreResponse,
    dataset_offset,
)
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
        t = self.dest.timeout_seconds
        contexts = [(str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax])
                    for cx in move_contexts({(i.sop_class_uid, i.transfer_syntax) for i in todo})]
        try:
            assoc = StoreAssociation.open(self.dest.host, self.dest.port, calling=self.calling_aet,
                                          called=self.dest.aet, contexts=contexts, timeout=t, tls=self.tls)
        except AssociationFailed as exc:
            if exc.kind == "rejected":
                status, why = "rejected", f"association rejected by {self.dest.aet} ({exc})"
            elif exc.kind == "aborted":
                status, why = "aborted", (f"association with {self.target} aborted while negotiating (or no answer "
                                          f"within {t:g} s): {exc}")
            else:
                status, why = "refused", (f"no association with {self.target}: nothing listening, unreachable, or "
                                          f"no connection within {t:g} s ({exc})")
            return self._outcome(AttemptOutcome.RETRY, status, started, error=why, destination_failure=True,
                                 detail=self._detail(items, done, sent_before))
        if not assoc.accepted.contexts:  # the destination takes none of these SOP classes (syntaxes)
            assoc.abort()
            named = "; ".join(f"instance {i.sop_instance_uid}: no context" for i in todo[:MAX_NAMED])
            more = f"; {len(todo) - MAX_NAMED} more" if len(todo) > MAX_NAMED else ""
            classes = ", ".join(sorted({i.sop_class_uid for i in todo}))
            return self._outcome(AttemptOutcome.DEAD, "no context", started,
                                 error=f"{len(todo)} instance(s) refused: {named}{more}",
                                 response=f"{self.dest.aet} accepted no presentation context for {classes}",
                                 detail=self._detail(items, done, sent_before), destination_failure=False)
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
                    rsp = self.store_item(assoc, item, (n - 1) % 65535 + 1)
                except NotSent as exc:
                    failed.append((item, exc.status, str(exc)))
                    continue
                except AssociationLost as exc:
                    if exc.kind == "timeout":
                        stop = ("timeout", f"no C-STORE response for instance {item.sop_instance_uid} within {t:g} s")
                    else:
                        stop = ("aborted", f"association with {self.dest.aet} ended before the response for instance "
                                           f"{item.sop_instance_uid} ({exc})")
                    break
                code = rsp.status
                if code == 0 or code in WARNINGS:
                    acked.append(item.id)
                    warned += code != 0
                elif 0xA700 <= code <= 0xA7FF or code in TRANSIENT:
                    stop = (f"{code:04X}", f"instance {item.sop_instance_uid}: {code:04X} (out of resources or "
                                           "processing failure at the destination); the rest is sent later")
                    break
                else:
                    failed.append((item, f"{code:04X}", rsp.error_comment))
        finally:
            assoc.release()  # a no-op when it was aborted
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

    def store_item(self, assoc: StoreAssociation, item: ForwardItem, message_id: int) -> StoreResponse:
        """Sends ``item``: the stored file's dataset bytes as they are (read in chunks after its File Meta
        Information) when its syntax was accepted; else the dataset decoded to an accepted uncompressed
        syntax and encoded in it."""
        accepted = assoc.accepted.syntaxes(item.sop_class_uid)
        if not accepted:
            raise NotSent("no context", f"{self.dest.aet} accepted no presentation context for SOP class "
                                        f"{item.sop_class_uid}")
        try:
            with self._open(item) as f:
                cid = assoc.accepted.context_for(item.sop_class_uid, item.transfer_syntax)
                if cid is not None:
                    try:
                        dataset_offset(f)
                    except ValueError:
                        cid = None  # no Part 10 file: read and encoded below
                        f.seek(0)
                if cid is not None:
                    return assoc.store(cid, item.sop_class_uid, item.sop_instance_uid, message_id, f)
                got = decoded_for(f, accepted)
        except TranscodeError as exc:
            raise NotSent("transcode", exc.comment) from None
        except (OSError, InvalidDicomError, ValueError) as exc:
            log.error("forward to %s: stored file of instance %s unreadable: %s", self.dest.name,
                      item.sop_instance_uid, exc)
            raise NotSent("unreadable", "stored file unreadable") from None
        cid = assoc.accepted.context_for(item.sop_class_uid, got.syntax)
        data = encode(got.dataset, got.syntax == ImplicitVRLittleEndian, True,
                      got.syntax == DeflatedExplicitVRLittleEndian) if cid is not None else None
        if cid is None or data is None:
            raise NotSent("transcode", f"instance {item.sop_instance_uid} could not be encoded in {got.syntax}")
        return assoc.store(cid, item.sop_class_uid, item.sop_instance_uid, message_id, data)

    def _open(self, item: ForwardItem) -> BinaryIO:
        path = self.storage.local_path(item.storage_key)
        if path is not None:
            return open(path, "rb")  # noqa: SIM115 - the caller closes it
        return self.storage.open(item.storage_key)

    @staticmethod
    def _detail(items: list[ForwardItem], done: set[int], sent: int) -> KeptRendering:
        return {"instances": len(items), "sent": sent, "acknowledged": sorted(done)}

    def _outcome(self, outcome: AttemptOutcome, status: str, started: float, *, error: str | None = None,
                 response: str | None = None, detail: KeptRendering | None = None,
                 destination_failure: bool | None = None) -> Outcome:
        return Outcome(outcome, status, response=response, error=error,
                       duration_ms=int((time.monotonic() - started) * 1000), target=self.target, detail=detail,
                       destination_failure=destination_failure)
