"""An inbound HL7 v2 message, from bytes to ACK.

    prepare()  parse, check MSH, route, map         (event loop thread, no I/O)
    store()    dedup, store raw, apply, build ACK   (writer thread, one SAVEPOINT, group commit)
    the ACK goes back only after the writer's COMMIT returned.

``reprocess()`` runs a stored message through the same steps again (after a mapping fix).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.channels import Channel, Route
from engine.domain.errors import DomainError
from engine.domain.patients import Outcome
from engine.hl7 import errors as E
from engine.hl7.ack import build_ack
from engine.hl7.errors import HL7Error, HL7ParseError
from engine.hl7.message import Message, decode_bytes, parse_text, split_groups
from engine.hl7.paths import PathError, SegmentSource, parse_path
from engine.mappings.registry import MappingRegistry
from engine.mappings.spec import MappingError
from engine.pipeline.actions import apply_action
from engine.store.models import Message as MessageRow
from engine.store.models import MessageContent, MessageEvent
from engine.store.types import utcnow

log = logging.getLogger(__name__)

ORDER_GROUP_MEMBERS = ("ORC", "OBR", "TQ1", "TQ2", "IPC", "NTE", "DG1", "OBX", "ZDS", "CTI", "BLG", "PRT",
                       "RQD", "RQ1", "ODS", "ODT")
DEDUP_STATUSES = ("processed", "error", "filtered")


@dataclass
class Prepared:
    raw: bytes
    remote: str | None
    received_at: float
    size: int = 0  # bytes received (an oversized message keeps only its head in ``raw``)
    message: Message | None = None
    reject: HL7Error | None = None  # AR: unreadable or unsupported
    route: Route | None = None
    values: dict[str, Any] = field(default_factory=dict)
    groups: list[dict[str, Any]] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    mapping_errors: list[MappingError] = field(default_factory=list)

    def mapped_json(self) -> dict[str, Any] | None:
        if self.route is None:
            return None
        out: dict[str, Any] = dict(self.values)
        if self.groups:
            out["orders"] = self.groups
        return out


@dataclass
class Stored:
    """What the writer did with a message; the listener writes ``replies`` after the commit."""

    message_id: int | None
    status: str
    ack_code: str
    replies: list[str]
    charset: str
    outcome: Outcome | None = None
    error: str | None = None


def error_at(path_text: str, code: int, text: str) -> HL7Error:
    """An HL7Error located at a mapping source path (PID-7, OBR[2]-4.1 ...)."""
    try:
        p = parse_path(path_text) if path_text else None
    except PathError:
        p = None
    if p is None:
        return HL7Error(code, text)
    return HL7Error(code, text, segment=p.segment, sequence=p.occurrence, field=p.field,
                    repetition=p.repetition or None, component=p.component, subcomponent=p.subcomponent)


def guess_control_id(raw: bytes) -> str:
    """MSH-10 from the first line of bytes that did not parse, so the NAK can still name it."""
    first = raw.split(b"\r", 1)[0].split(b"\n", 1)[0].decode("latin-1", "replace")
    if first.startswith("MSH") and len(first) > 3:
        parts = first.split(first[3])
        if len(parts) > 9:
            return parts[9][:64]
    return ""


class HL7Inbound:
    """One channel's inbound HL7 handling (shared by every connection of its listener)."""

    def __init__(self, channel: Channel, mappings: MappingRegistry, *, app_name: str = "RADBRIDGE",
                 facility: str = "") -> None:
        self.channel = channel
        self.mappings = mappings
        self.app_name = app_name
        self.facility = facility

    # --- step 1: no I/O ---------------------------------------------------------------------------
    def prepare(self, raw: bytes, remote: str | None = None) -> Prepared:
        p = Prepared(raw=raw, remote=remote, received_at=time.time(), size=len(raw))
        opts = self.channel.options
        try:
            text, codec = decode_bytes(raw, opts.default_charset, opts.fallback_charset or None)
            msg = parse_text(text, codec)
        except HL7ParseError as exc:
            p.reject = exc.error
            return p
        p.message = msg
        if opts.processing_ids and msg.processing_id and msg.processing_id not in opts.processing_ids:
            p.reject = HL7Error(E.UNSUPPORTED_PROCESSING_ID,
                                f"processing ID {msg.processing_id!r} is not accepted by channel {self.channel.name}",
                                segment="MSH", sequence=1, field=11)
            return p
        if opts.versions and msg.version and msg.version not in opts.versions:
            p.reject = HL7Error(E.UNSUPPORTED_VERSION, f"HL7 version {msg.version!r} is not accepted",
                                segment="MSH", sequence=1, field=12)
            return p
        route = self.channel.route_for(msg.message_type)
        if route is None:
            code = E.UNSUPPORTED_EVENT if self.channel.knows_code(msg.message_code) else E.UNSUPPORTED_MESSAGE_TYPE
            what = "event" if code == E.UNSUPPORTED_EVENT else "message type"
            p.reject = HL7Error(code, f"{what} {msg.message_type} is not handled by channel {self.channel.name}",
                                segment="MSH", sequence=1, field=9)
            return p
        p.route = route
        if route.action != "ignore":
            self._map(p, msg, route)
        return p

    def _map(self, p: Prepared, msg: Message, route: Route) -> None:
        src = SegmentSource(msg)
        order_action = route.action == "order"
        groups = split_groups(msg, "ORC", ORDER_GROUP_MEMBERS) if order_action else []
        for name in route.mappings:
            mapping = self.mappings.get(name)
            if mapping is None:
                p.mapping_errors.append(MappingError("", "", f"mapping {name!r} is not loaded (see radbridge check)",
                                                     E.INTERNAL_ERROR))
                continue
            res = mapping.apply(src)
            for k, v in res.values.items():
                if order_action and k.startswith("order."):
                    continue
                p.values[k] = v
                p.sources.setdefault(k, res.sources.get(k, ""))
            p.mapping_errors.extend(e for e in res.errors if not (order_action and e.field.startswith("order.")))
            if order_action:
                for gi, group in enumerate(groups):
                    gres = mapping.apply(SegmentSource(msg, group), only=("order.",))
                    while len(p.groups) <= gi:
                        p.groups.append({})
                    p.groups[gi].update(gres.values)
                    for k, path in gres.sources.items():
                        p.sources.setdefault(k, path)
                    p.mapping_errors.extend(gres.errors)
        if order_action and not groups:
            p.mapping_errors.append(MappingError("order.control", "ORC-1", "the message has no ORC segment",
                                                 E.SEGMENT_SEQUENCE))

    # --- step 2: in the writer thread -----------------------------------------------------------------
    def store(self, session: Session, p: Prepared) -> Stored:
        msg = p.message
        row = MessageRow(channel=self.channel.name, remote=p.remote, size=p.size or len(p.raw), status="received",
                         received_at=utcnow(), attempts=1)
        if msg is not None:
            row.control_id = msg.control_id[:64]
            row.sending_app = msg.sending_application[:64]
            row.sending_facility = msg.sending_facility[:64]
            row.message_type = msg.message_type[:32]
            row.version = msg.version[:16]
            row.charset = msg.charset
        else:
            row.control_id = guess_control_id(p.raw) or None
        if p.reject is not None:
            return self._finish(session, row, p, "rejected", None, [p.reject])
        assert msg is not None and p.route is not None
        window = self.channel.options.dedup_window_seconds
        if window > 0:
            dup = session.execute(
                select(MessageRow.id, MessageRow.ack_code).where(
                    MessageRow.control_id == row.control_id, MessageRow.sending_app == row.sending_app,
                    MessageRow.sending_facility == row.sending_facility, MessageRow.channel == row.channel,
                    MessageRow.received_at >= utcnow() - timedelta(seconds=window),
                    MessageRow.status.in_(DEDUP_STATUSES)).order_by(MessageRow.id.desc()).limit(1)
            ).first()
            if dup is not None:
                row.duplicate_of = dup.id
                code = dup.ack_code or "AA"
                return self._finish(session, row, p, "duplicate", None, [], ack_code=code,
                                    text=f"duplicate of message {dup.id}; not applied again")
        if p.route.action == "ignore":
            return self._finish(session, row, p, "filtered", None, [])
        if p.mapping_errors:
            errs = [error_at(e.path, e.code, f"{e.field}: {e.message}" if e.field else e.message)
                    for e in p.mapping_errors]
            return self._finish(session, row, p, "error", None, errs)
        session.add(row)
        session.flush()
        try:
            with session.begin_nested():
                outcome = apply_action(session, p.route.action, p.values, p.groups, self.channel.options, row.id)
        except DomainError as exc:
            path = p.sources.get(exc.field or "", "")
            return self._finish(session, row, p, "error", None, [error_at(path, exc.code, str(exc))])
        row.patient_id = outcome.patient_id
        return self._finish(session, row, p, "processed", outcome, [])

    def _finish(self, session: Session, row: MessageRow, p: Prepared, status: str, outcome: Outcome | None,
                errors: list[HL7Error], *, ack_code: str | None = None, text: str = "") -> Stored:
        msg = p.message
        if ack_code is None:
            ack_code = {"processed": "AA", "filtered": "AA", "error": "AE", "rejected": "AR"}[status]
        row.status = status
        row.ack_code = ack_code
        row.processed_at = utcnow()
        if errors:
            row.error = "; ".join(e.describe() for e in errors)[:4000]
        replies = self._acks(msg, ack_code, errors, text, storage_ok=True, control_id=row.control_id or "")
        if row.id is None:
            session.add(row)
            session.flush()
        session.add(MessageContent(message_id=row.id, raw=p.raw, mapped=p.mapped_json(),
                                   ack="\n".join(replies) or None))
        if outcome is not None and outcome.notes:
            session.add(MessageEvent(message_id=row.id, kind="notes", detail={"notes": outcome.notes}))
        if errors:
            session.add(MessageEvent(message_id=row.id, kind="error",
                                     detail={"errors": [e.as_dict() for e in errors]}))
        return Stored(message_id=row.id, status=status, ack_code=ack_code, replies=replies,
                      charset=msg.charset if msg else "latin-1", outcome=outcome, error=row.error)

    # --- acknowledgements -----------------------------------------------------------------------------
    def _acks(self, msg: Message | None, app_code: str, errors: list[HL7Error], text: str,
              *, storage_ok: bool, control_id: str = "") -> list[str]:
        """Original mode: one ACK. Enhanced mode: a commit ACK per MSH-15, then an application ACK per MSH-16."""
        kw: dict[str, Any] = {"original": msg, "application": self.app_name, "facility": self.facility}
        if msg is None:
            kw["original_control_id"] = control_id
        enhanced = msg is not None and bool(msg.accept_ack_type or msg.application_ack_type)
        if not enhanced:
            return [build_ack(app_code, errors=errors, text=text, **kw)]
        assert msg is not None
        replies: list[str] = []
        commit_code = "CA" if storage_ok and app_code != "AR" else ("CR" if app_code == "AR" else "CE")
        if _wanted(msg.accept_ack_type or "AL", commit_code == "CA"):
            replies.append(build_ack(commit_code, errors=errors if commit_code != "CA" else [], text=text, **kw))
        if commit_code == "CA" and _wanted(msg.application_ack_type or "NE", app_code == "AA"):
            replies.append(build_ack(app_code, errors=errors, text=text, **kw))
        return replies

    def storage_failure_acks(self, p: Prepared, reason: str) -> list[str]:
        err = HL7Error(E.INTERNAL_ERROR, f"message not stored ({reason}); resend later")
        return self._acks(p.message, "AR", [err], "", storage_ok=False, control_id=guess_control_id(p.raw))


def _wanted(condition: str, success: bool) -> bool:
    """HL7 table 0155: AL always, NE never, ER on error only, SU on success only."""
    if condition == "NE":
        return False
    if condition == "ER":
        return not success
    if condition == "SU":
        return success
    return True


def reprocess(session: Session, inbound: HL7Inbound, row: MessageRow) -> Stored:
    """Run a stored message through routing, mapping and the domain again (e.g. after a mapping fix)."""
    if row.content is None or row.content_pruned:
        raise ValueError(f"message {row.id} has no stored content (pruned by retention)")
    p = inbound.prepare(row.content.raw, row.remote)
    row.attempts += 1
    previous = row.status
    session.add(MessageEvent(message_id=row.id, kind="reprocess", detail={"previous_status": previous,
                                                                          "previous_error": row.error}))
    if p.reject is not None:
        row.status, row.ack_code, row.error = "rejected", "AR", p.reject.describe()
        return Stored(row.id, "rejected", "AR", [], "latin-1", error=row.error)
    assert p.route is not None
    if p.route.action == "ignore":
        row.status, row.error = "filtered", None
        return Stored(row.id, "filtered", "AA", [], "utf-8")
    if p.mapping_errors:
        row.status, row.ack_code = "error", "AE"
        row.error = "; ".join(error_at(e.path, e.code, e.message).describe() for e in p.mapping_errors)
        return Stored(row.id, "error", "AE", [], "utf-8", error=row.error)
    try:
        with session.begin_nested():
            outcome = apply_action(session, p.route.action, p.values, p.groups, inbound.channel.options, row.id)
    except DomainError as exc:
        row.status, row.ack_code = "error", "AE"
        row.error = error_at(p.sources.get(exc.field or "", ""), exc.code, str(exc)).describe()
        return Stored(row.id, "error", "AE", [], "utf-8", error=row.error)
    row.status, row.ack_code, row.error, row.processed_at = "processed", "AA", None, utcnow()
    row.patient_id = outcome.patient_id
    if row.content is not None:
        row.content.mapped = p.mapped_json()
    if outcome.notes:
        session.add(MessageEvent(message_id=row.id, kind="notes", detail={"notes": outcome.notes}))
    return Stored(row.id, "processed", "AA", [], "utf-8", outcome=outcome)
