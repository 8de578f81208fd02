"""Storage Commitment Push Model (PS3.4 Annex J), SCU side: asking a destination to commit instances
(N-ACTION) and taking its answer (N-EVENT-REPORT), here on the requesting association or on an
association the destination opens to the engine's DICOM channel (``scp.py`` binds ``take_report``).

How a caller uses it (blocking: run it in a thread, e.g. ``asyncio.to_thread``)::

    uid = new_transaction_uid()
    writer.run_sync(lambda s: record_request(s.connection(), uid, destination=..., instances=len(refs)))
    sent = request_commitment(peer, refs, uid, calling_aet=aet, timeout=30,
                              record=report_recorder(writer, timeout=30))
    if not sent.accepted:
        writer.run_sync(lambda s: record_failure(s.connection(), uid, sent.error))
    # else: the report comes (sent.report, or later on the DICOM channel); result_of() reads it

The request is committed *before* the N-ACTION: a report may arrive on another association before
the N-ACTION response. A report is answered with success only after its row is committed.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from engine.dicom import status as S
from engine.errors import RadBridgeError
from engine.pipeline.stage import Writer
from engine.store.commitments import record_report

log = logging.getLogger(__name__)

PUSH_MODEL = str(StorageCommitmentPushModel)  # 1.2.840.10008.1.20.1
PUSH_MODEL_INSTANCE = str(StorageCommitmentPushModelInstance)  # 1.2.840.10008.1.20.1.1 (well-known)
REQUEST_ACTION = 1  # Action Type ID of "Request Storage Commitment"
ALL_COMMITTED, FAILURES_EXIST = 1, 2  # Event Type IDs of the report
MAX_REFERENCES = 65535  # instances in one request (and the most items a report may list)
REPORT_WAIT_SECONDS = 2.0  # how long the requesting association stays open for a report on it


class ReportError(RadBridgeError):
    """An N-EVENT-REPORT that is not a readable Storage Commitment report: answered ``status``."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


class Peer(Protocol):
    """Where to ask: the destination's AE title and address (a C-MOVE destination, a forward destination)."""

    @property
    def aet(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


@dataclass(frozen=True)
class CommitmentReport:
    """A destination's N-EVENT-REPORT: the Transaction UID, the SOP Instance UIDs committed and those
    failed (with their Failure Reason), and who sent it (calling AE title of its association)."""

    transaction_uid: str
    committed: tuple[str, ...]
    failed: tuple[tuple[str, int], ...]
    peer_ae: str
    event_type: int


@dataclass(frozen=True)
class CommitmentRequest:
    """How asking went. ``accepted``: the destination answered the N-ACTION with success (0x0000), the
    report is to come. Otherwise ``error`` says why (association refused, status and comment; no patient
    data), ``status`` is the N-ACTION status when there was one. ``report``: the report when the
    destination sent it on the requesting association (None: it comes on another one, or never)."""

    transaction_uid: str
    accepted: bool
    status: int | None = None
    error: str = ""
    report: CommitmentReport | None = None  # recorded through ``record`` and answered with success


ReportRecorder = Callable[[CommitmentReport], bool]


def new_transaction_uid() -> str:
    return str(generate_uid())


def report_recorder(writer: Writer, *, timeout: float) -> ReportRecorder:
    """Records a report through the engine's writer (``record_report`` in its next transaction) and
    returns once it is committed: whether the transaction was known. Raises when it could not be
    committed (the report is then answered with a failure status; the destination sends it again)."""
    def record(report: CommitmentReport) -> bool:
        return writer.submit(lambda session: record_report(
            session.connection(), report.transaction_uid, report.committed, report.failed,
            report.peer_ae)).result(timeout=timeout)
    return record


# --- the report ---------------------------------------------------------------------------------------

def _uid(value: Any, what: str) -> str:
    text = str(value or "").strip()
    if not text:
        raise ReportError(S.NO_SUCH_ARGUMENT, f"{what} missing")
    if not UID(text).is_valid:
        raise ReportError(S.INVALID_ARGUMENT_VALUE, f"{what} is not a valid UID")
    return text


def report_from(info: Dataset, event_type: int, peer_ae: str) -> CommitmentReport:
    """The report in a decoded Event Information dataset (Transaction UID, Referenced SOP Sequence,
    Failed SOP Sequence)."""
    try:
        transaction = _uid(info.get("TransactionUID"), "Transaction UID")
        committed = tuple(_uid(item.get("ReferencedSOPInstanceUID"), "Referenced SOP Instance UID")
                          for item in _items(info, "ReferencedSOPSequence"))
        failed = tuple((_uid(item.get("ReferencedSOPInstanceUID"), "Failed SOP's Referenced SOP Instance UID"),
                        _reason(item)) for item in _items(info, "FailedSOPSequence"))
    except ReportError:
        raise
    except Exception:  # a value of the wrong type, a sequence that is not one, an undecodable element
        raise ReportError(S.INVALID_ARGUMENT_VALUE, "Event Information cannot be read") from None
    if event_type == FAILURES_EXIST and not failed:
        raise ReportError(S.NO_SUCH_ARGUMENT, "Event Type 2 without a Failed SOP Sequence")
    if event_type == ALL_COMMITTED and failed:
        raise ReportError(S.INVALID_ARGUMENT_VALUE, "Event Type 1 with a Failed SOP Sequence")
    if not committed and not failed:
        raise ReportError(S.NO_SUCH_ARGUMENT, "Referenced SOP Sequence missing")
    if len(committed) + len(failed) > MAX_REFERENCES:
        raise ReportError(S.RESOURCE_LIMITATION, f"more than {MAX_REFERENCES} instances in one report")
    return CommitmentReport(transaction, committed, failed, peer_ae.strip(), event_type)


def _items(info: Dataset, keyword: str) -> list[Dataset]:
    value = info.get(keyword)
    if value is None:
        return []
    if not isinstance(value, DicomSequence):
        raise ReportError(S.INVALID_ARGUMENT_VALUE, f"{keyword} is not a sequence")
    return list(value)


def _reason(item: Dataset) -> int:
    reason = item.get("FailureReason")
    if reason is None:
        raise ReportError(S.NO_SUCH_ARGUMENT, "Failed SOP Sequence item without Failure Reason")
    return int(reason)


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def take_report(event: Any, record: ReportRecorder | None, where: str) -> tuple[Dataset, CommitmentReport | None]:
    """The answer to an N-EVENT-REPORT (pynetdicom's EVT_N_EVENT_REPORT ``event``) and the report when it
    was recorded: the report read, recorded through ``record`` (committed), then success; an unknown
    transaction, a report that is not one, or a failure to record it gets a failure status with an Error
    Comment (and None). Never raises."""
    assoc = event.assoc
    peer_ae = str(assoc.requestor.ae_title if assoc.is_acceptor else assoc.acceptor.ae_title).strip()
    try:
        try:
            report = parse_report_event(event, peer_ae)
        except ReportError as exc:
            log.warning("%s: storage commitment report from %s refused: %04X %s", where, peer_ae, exc.status,
                        exc.comment)
            return _status(exc.status, exc.comment), None
        if record is None:
            return _status(S.PROCESSING_FAILURE, "report not taken on this association"), None
        try:
            known = record(report)
        except Exception as exc:
            log.error("%s: storage commitment report %s from %s not recorded: %s", where, report.transaction_uid,
                      peer_ae, type(exc).__name__)
            return _status(S.PROCESSING_FAILURE, "report not recorded: database unavailable"), None
        if not known:
            log.warning("%s: storage commitment report from %s for unknown transaction %s refused", where,
                        peer_ae, report.transaction_uid)
            return _status(S.INVALID_ARGUMENT_VALUE, "unknown Transaction UID"), None
        log.info("%s: storage commitment %s reported by %s: %d committed, %d failed", where,
                 report.transaction_uid, peer_ae, len(report.committed), len(report.failed))
        return _status(S.SUCCESS), report
    except Exception:  # never let pynetdicom answer for us, nor the association thread die
        log.exception("%s: storage commitment report from %s failed unexpectedly", where, peer_ae)
        return _status(S.PROCESSING_FAILURE, "report not processed"), None


def parse_report_event(event: Any, peer_ae: str) -> CommitmentReport:
    """The report an N-EVENT-REPORT request carries, its Event Information decoded in the transfer syntax of
    its context; ReportError when it is not one (the status and comment to answer with: never patient
    data, only which attribute is wrong)."""
    request = event.request
    if str(request.AffectedSOPClassUID or "") != PUSH_MODEL:
        raise ReportError(S.NO_SUCH_SOP_CLASS, "not a Storage Commitment Push Model report")
    if str(request.AffectedSOPInstanceUID or "") != PUSH_MODEL_INSTANCE:
        raise ReportError(S.INVALID_OBJECT_INSTANCE, "Affected SOP Instance UID is not 1.2.840.10008.1.20.1.1")
    event_type = request.EventTypeID
    if event_type not in (ALL_COMMITTED, FAILURES_EXIST):
        raise ReportError(S.NO_SUCH_EVENT_TYPE, f"Event Type ID {event_type} is not 1 or 2")
    if request.EventInformation is None:
        raise ReportError(S.NO_SUCH_ARGUMENT, "Event Information missing")
    try:
        info = event.event_information  # decoded in the context's transfer syntax
    except Exception:
        raise ReportError(S.INVALID_ARGUMENT_VALUE, "Event Information cannot be decoded") from None
    return report_from(info, int(event_type), peer_ae)


# --- the request --------------------------------------------------------------------------------------

def action_information(transaction_uid: str, references: Sequence[tuple[str, str]]) -> Dataset:
    """The N-ACTION's Action Information: Transaction UID and Referenced SOP Sequence of (SOP Class UID,
    SOP Instance UID) pairs."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


@dataclass
class _SameAssociation:
    """A report the destination sends on the requesting association, caught by its handler."""

    record: ReportRecorder | None
    where: str
    report: CommitmentReport | None = None
    arrived: threading.Event = field(default_factory=threading.Event)
    answered: threading.Event = field(default_factory=threading.Event)

    def on_report(self, event: Any) -> tuple[Dataset, None]:
        self.arrived.set()
        status, report = take_report(event, self.record, self.where)
        if report is not None:
            self.report = report
        return status, None

    def on_sent(self, event: Any) -> None:
        if type(event.message).__name__ == "N_EVENT_REPORT_RSP":
            self.answered.set()  # the answer is on its way: the association may be released


def request_commitment(peer: Peer, references: Sequence[tuple[str, str]], transaction_uid: str, *,
                       calling_aet: str, timeout: float, tls_context: ssl.SSLContext | None = None,
                       record: ReportRecorder | None = None,
                       report_wait: float = REPORT_WAIT_SECONDS) -> CommitmentRequest:
    """Ask ``peer`` to commit ``references`` ((SOP Class UID, SOP Instance UID) pairs) under
    ``transaction_uid``: one association proposing the Storage Commitment Push Model as SCU, one
    N-ACTION (Action Type ID 1). Blocking; ``timeout`` bounds the association, each message and the
    connection. Never raises for what the network or the peer does: the answer says.

    After a successful N-ACTION the association stays open up to ``report_wait`` seconds for a report
    on it (some destinations send it there); such a report is recorded through ``record`` (see
    ``report_recorder``) before it is answered with success, and returned. Without ``record`` a report
    there is refused (0x0110: the destination sends it again, on a new association, to the DICOM channel).
    The destination then takes the calling AE title ``calling_aet`` as where to send its report."""
    if not references:
        raise ValueError("a storage commitment request names at least one instance")
    if len(references) > MAX_REFERENCES:
        raise ValueError(f"at most {MAX_REFERENCES} instances per storage commitment request")
    where = f"storage commitment to {peer.aet}"
    same = _SameAssociation(record, where)
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    options: dict[str, Any] = {"ae_title": peer.aet,
                               "evt_handlers": [(evt.EVT_N_EVENT_REPORT, same.on_report),
                                                (evt.EVT_DIMSE_SENT, same.on_sent)]}
    if tls_context is not None:
        options["tls_args"] = (tls_context, peer.host)
    try:
        assoc = ae.associate(peer.host, peer.port, **options)
    except Exception as exc:  # TLS handshake, unresolvable host ...
        return CommitmentRequest(transaction_uid, False, error=f"association failed: {type(exc).__name__}")
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "association failed (no answer or aborted)"
        return CommitmentRequest(transaction_uid, False, error=why)
    try:
        if not any(str(cx.abstract_syntax) == PUSH_MODEL for cx in assoc.accepted_contexts):
            return CommitmentRequest(transaction_uid, False,
                                     error="the destination does not accept Storage Commitment Push Model")
        rsp, _reply = assoc.send_n_action(action_information(transaction_uid, references), REQUEST_ACTION,
                                          StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
        if "Status" not in rsp:
            return CommitmentRequest(transaction_uid, False,
                                     error="no N-ACTION response (timeout, abort or invalid response)")
        code = int(rsp.Status)
        if code != S.SUCCESS:
            comment = str(rsp.get("ErrorComment", "") or "").strip()
            return CommitmentRequest(transaction_uid, False, code,
                                     f"N-ACTION refused: status 0x{code:04X}" + (f" ({comment})" if comment else ""))
        # a report on this association: wait for it a little, and for its answer to be sent (it is
        # recorded first) before releasing
        if same.arrived.wait(report_wait):
            same.answered.wait(timeout)
        return CommitmentRequest(transaction_uid, True, code, report=same.report)
    finally:
        if assoc.is_established:
            assoc.release()
