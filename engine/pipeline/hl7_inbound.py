"""An inbound HL7 v2 message, from bytes to ACK.

    prepare()  parse, check MSH, route, map         (event loop thread, no I/O)
    apply()    dedup, store raw, apply, build ACK   (writer thread, one SAVEPOINT, group commit)
    the ACK goes back only after the writer's COMMIT returned.

``reprocess()`` runs a stored message through the same steps again (after a mapping fix).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from engine.channels import Channel, Route
from engine.domain.errors import DomainError
from engine.domain.events import EventBus
from engine.domain.patients import Outcome
from engine.domain.records import (
    CONTENT,
    DUPLICATE,
    EVENTS,
    MESSAGES,
    DuplicateOf,
    add,
    add_many,
    fetch,
    update_row,
)
from engine.domain.rows import MessageValues
from engine.errors import failure_detail, report_failure
from engine.hl7 import errors as E
from engine.hl7.ack import build_ack
from engine.hl7.errors import HL7Error, HL7ParseError
from engine.hl7.message import Message, decode_bytes, nul_error, parse_text, split_groups
from engine.hl7.paths import PathError, SegmentSource, parse_path
from engine.mappings.fields import MappedFields
from engine.mappings.registry import MappingRegistry
from engine.mappings.spec import Mapping, MappingError
from engine.pipeline.actions import apply_action
from engine.pipeline.writer import FINAL_ATTEMPT, RedoJob
from engine.reconciliation import triggers
from engine.store.models import Message as MessageRow
from engine.store.models import MessageEvent
from engine.store.prepared import pipelined, savepoint
from engine.store.states import MessageStatus
from engine.store.types import JsonObject, utcnow

log = logging.getLogger(__name__)

# Segments that belong to an order group (ORC up to the next ORC) even when a group lacks them.
ORDER_GROUP_MEMBERS = ("ORC", "OBR", "TQ1", "TQ2", "IPC", "NTE", "DG1", "OBX", "ZDS", "CTI", "BLG", "PRT",
                       "RQD", "RQ1", "ODS", "ODT")
GROUP_FIELDS = ("order.", "message.")
CONTROL_ID_LENGTH = 199  # MSH-10 (ST, v2.7+)
HD_LENGTH = 227  # MSH-3, MSH-4


@dataclass
class Prepared:
    raw: bytes
    remote: str | None
    received_at: float
    size: int = 0  # bytes received (an oversized message keeps only its head in ``raw``)
    message: Message | None = None
    reject: HL7Error | None = None  # AR: unreadable or unsupported
    route: Route | None = None
    values: MappedFields = field(default_factory=dict)
    groups: list[MappedFields] = field(default_factory=list)
    mapped: MappedMessage | None = None  # where each field came from, for error locations
    mapping_errors: list[MappingError] = field(default_factory=list)
    content_errors: list[HL7Error] = field(default_factory=list)  # content that cannot be stored as text
    digest: str | None = None  # Message.content_digest(), for duplicate detection
    warnings: list[JsonObject] = field(default_factory=list)  # stored as "warning" events of the message
    apply_errors: list[HL7Error] | None = None  # why an earlier run of the writer's job could not apply it

    def source_of(self, fld: str | None, group: int | None = None) -> str:
        """Where a field came from, for ERR locations (see MappedMessage.source_of)."""
        return self.mapped.source_of(fld or "", group) if self.mapped is not None else ""

    def mapped_json(self) -> JsonObject | None:
        """What message_content.mapped keeps: the message's fields, and its order groups under "orders"."""
        if self.route is None:
            return None
        out: JsonObject = dict(self.values)
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


def internal_error(exc: Exception, what: str, *args: object) -> HL7Error:
    """ERR 207 for a failure no rule foresaw: logged whole under a reference; the peer gets the
    failure's class and that reference, the store also its text, never the SQL or values."""
    return HL7Error(E.INTERNAL_ERROR, internal_error_text(exc, what, *args), detail=failure_detail(exc))


def internal_error_text(exc: Exception, what: str, *args: object) -> str:
    """What a peer is told of a failure while applying (see engine.errors.report_failure)."""
    return f"internal error while applying ({report_failure(log, exc, what, *args)}); the engine's log has the detail"


def guess_control_id(raw: bytes) -> str:
    """MSH-10 from the first line of bytes that did not parse, so the NAK can still name it."""
    first = raw.split(b"\r", 1)[0].split(b"\n", 1)[0].decode("latin-1", "replace")
    if first.startswith("MSH") and len(first) > 3:
        parts = first.split(first[3])
        if len(parts) > 9:
            return parts[9][:CONTROL_ID_LENGTH].replace("\x00", "\ufffd")
    return ""


@dataclass
class MappedMessage:
    values: MappedFields = field(default_factory=dict)  # message-level fields (patient, merge, ...)
    groups: list[MappedFields] = field(default_factory=list)  # one dict of order/message fields per ORC
    sources: dict[str, str] = field(default_factory=dict)
    declared: dict[str, str] = field(default_factory=dict)
    errors: list[MappingError] = field(default_factory=list)
    # per ORC group: its segments and where each of its fields came from (resolved only when reported)
    group_sources: list[tuple[SegmentSource, dict[str, str], dict[str, str]]] = field(default_factory=list)

    def source_of(self, fld: str, group: int | None = None) -> str:
        """The path a field's value came from, else the path its mapping names, as the segment's
        occurrence in the whole message (ORC[2]-1), for ERR locations."""
        if group is not None and 0 <= group < len(self.group_sources):
            src, sources, declared = self.group_sources[group]
            path = sources.get(fld) or declared.get(fld, "")
            if path:
                return src.absolute(path)
        return self.sources.get(fld) or self.declared.get(fld, "")


def map_message(msg: Message, mappings: list[Mapping], *, order_action: bool) -> MappedMessage:
    """Evaluate mappings on a message. For orders, each ORC starts a group that runs to the next ORC;
    an order mapping's order.* and message.* fields are evaluated once per group, inside which the
    group's own segments answer (and an order without a TQ1 has none), while PID and the rest come
    from the message. Error paths name the segment's occurrence in the whole message."""
    out = MappedMessage()
    groups = split_groups(msg, "ORC") if order_action else []
    scoped = set(ORDER_GROUP_MEMBERS) | {seg.name for g in groups for seg in g}
    message_src = SegmentSource(msg)
    group_srcs = [SegmentSource(msg, g, scoped) for g in groups]
    out.groups = [{} for _ in groups]
    out.group_sources = [(src, {}, {}) for src in group_srcs]
    for mapping in mappings:
        per_group = order_action and mapping.maps_orders
        res = mapping.apply(message_src, exclude=GROUP_FIELDS if per_group else ())
        out.values.update(res.values)
        out.sources.update(res.sources)
        out.declared.update(res.declared)
        out.errors.extend(res.errors)
        if not per_group:
            continue
        for gi, src in enumerate(group_srcs):
            gres = mapping.apply(src, only=GROUP_FIELDS)
            out.groups[gi].update(gres.values)
            out.group_sources[gi][1].update(gres.sources)
            out.group_sources[gi][2].update(gres.declared)
            for e in gres.errors:
                located = src.absolute(e.path)
                if located != e.path:
                    e.message = e.message.replace(e.path, located)
                    e.path = located
            out.errors.extend(gres.errors)
    if order_action and not groups:
        out.errors.append(MappingError("order.control", "ORC-1", "the message has no ORC segment", E.SEGMENT_SEQUENCE))
    return out


class HL7Inbound:
    """One channel's inbound HL7 handling (shared by every connection of its listener)."""

    def __init__(self, channel: Channel, mappings: MappingRegistry, *, app_name: str = "RADBRIDGE",
                 facility: str = "", bus: EventBus | None = None) -> None:
        self.channel = channel
        self.mappings = mappings
        self.app_name = app_name
        self.facility = facility
        if bus is None:  # a tool without the engine's bus (radbridge reprocess): reconciliation still hears
            bus = EventBus()
            triggers.subscribe(bus)
        self.bus = bus

    # --- step 1: no I/O ---------------------------------------------------------------------------
    def prepare(self, raw: bytes, remote: str | None = None) -> Prepared:
        p = Prepared(raw=raw, remote=remote, received_at=time.time(), size=len(raw))
        opts = self.channel.options
        nul: HL7Error | None = None
        try:
            text, codec = decode_bytes(raw, opts.default_charset, opts.fallback_charset or None)
            nul = nul_error(text)
            if nul is not None:  # parsed with U+FFFD in its place (headers, ACK); never applied
                text = text.replace("\x00", "\ufffd")
            msg = parse_text(text, codec)
        except HL7ParseError as exc:
            p.reject = exc.error
            return p
        p.message = msg
        p.digest = msg.content_digest()
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
        if nul is not None:
            p.content_errors.append(nul)
        elif route.action != "ignore":
            self._map(p, msg, route)
        return p

    def _map(self, p: Prepared, msg: Message, route: Route) -> None:
        mappings: list[Mapping] = []
        for name in route.mappings:
            mapping = self.mappings.get(name)
            if mapping is None:
                p.mapping_errors.append(MappingError("", "", f"mapping {name!r} is not loaded (see radbridge check)",
                                                     E.INTERNAL_ERROR))
            else:
                mappings.append(mapping)
        mapped = map_message(msg, mappings, order_action=route.action == "order")
        p.values, p.groups, p.mapped = mapped.values, mapped.groups, mapped
        p.mapping_errors.extend(mapped.errors)

    # --- step 2: in the writer thread -----------------------------------------------------------------
    def apply(self, session: Session, p: Prepared) -> Stored:
        msg = p.message
        conn = session.connection()  # the hot path runs Core statements on the connection directly
        row: MessageValues = {"channel": self.channel.name, "remote": p.remote, "size": p.size or len(p.raw),
                              "status": MessageStatus.RECEIVED, "received_at": utcnow(), "attempts": 1}
        if msg is not None:
            row["control_id"], row["sending_app"] = msg.control_id[:CONTROL_ID_LENGTH], msg.sending_application[:HD_LENGTH]
            row["sending_facility"], row["message_type"] = msg.sending_facility[:HD_LENGTH], msg.message_type[:32]
            row["content_digest"] = p.digest
            row["version"], row["charset"] = msg.version[:16], msg.charset
        else:
            row["control_id"] = guess_control_id(p.raw) or None
        if p.reject is not None:
            return self._finish(conn, None, row, p, MessageStatus.REJECTED, None, [p.reject])
        assert msg is not None and p.route is not None
        window = self.channel.options.dedup_window_seconds
        if window > 0:
            dup = fetch(conn, DUPLICATE, DuplicateOf, control_id=row["control_id"], sending_app=row["sending_app"],
                        sending_facility=row["sending_facility"], channel=row["channel"], digest=p.digest,
                        since=row["received_at"] - timedelta(seconds=window))
            if dup is not None and dup["same_content"]:
                row["duplicate_of"] = dup["id"]
                return self._finish(conn, None, row, p, MessageStatus.DUPLICATE, None, [], ack_code=dup["ack_code"] or "AA",
                                    text=f"duplicate of message {dup['id']}; not applied again")
            if dup is not None:  # the control ID was reused for another message: new, applied
                log.warning("channel %s: MSH-10 %r from %s reused by a message with other content than message %s;"
                            " applied as a new message", self.channel.name, row["control_id"], row["sending_app"], dup["id"])
                warning: JsonObject = {"warning": "control ID reused with other content; applied as a new message",
                                       "reused_control_id_of": dup["id"]}
                if warning not in p.warnings:  # the writer may run this job again (RedoJob)
                    p.warnings.append(warning)
        if p.route.action == "ignore":
            return self._finish(conn, None, row, p, MessageStatus.FILTERED, None, [])
        if p.content_errors:
            return self._finish(conn, None, row, p, MessageStatus.ERROR, None, p.content_errors)
        if p.mapping_errors:
            return self._finish(conn, None, row, p, MessageStatus.ERROR, None, self.mapping_errors(p))
        if p.apply_errors is not None:  # an earlier run of this job failed to apply it: stored as AE
            return self._finish(conn, None, row, p, MessageStatus.ERROR, None, p.apply_errors)
        # Inserted as it will most likely end (nobody sees it before the commit) so that success needs
        # no second write of status; the domain's history rows point at it.
        message_id = add(conn, MESSAGES, **{**row, "status": MessageStatus.PROCESSED, "ack_code": "AA", "processed_at": utcnow()})
        # In the group-commit writer with a run to come, a failure undoes the whole job (its SAVEPOINT
        # or transaction) and the next run stores the message as AE: no SAVEPOINT of its own (two
        # statements, two round trips on PostgreSQL) for every message that applies.
        outcome, errors = self.apply_mapped(session, p, message_id, redo=not session.info.get(FINAL_ATTEMPT, True),
                                            conn=conn)
        if outcome is None:
            return self._finish(conn, message_id, row, p, MessageStatus.ERROR, None, errors)
        row["patient_id"] = outcome.patient_id
        return self._finish(conn, message_id, row, p, MessageStatus.PROCESSED, outcome, [])

    @staticmethod
    def mapping_errors(p: Prepared) -> list[HL7Error]:
        return [error_at(e.path, e.code, f"{e.field}: {e.message}" if e.field else e.message)
                for e in p.mapping_errors]

    def apply_mapped(self, session: Session, p: Prepared, message_id: int, *, redo: bool = False,
                     conn: Connection | None = None) -> tuple[Outcome | None, list[HL7Error]]:
        """Apply a mapped message inside a SAVEPOINT: (outcome, []) or (None, the ERR detail).

        A database in trouble (OperationalError) propagates: the batch fails, nothing is acknowledged.
        A conflict with another engine process (IntegrityError) propagates so the writer retries,
        except on its last attempt. Anything else keeps the message as AE (reprocessable).

        ``redo`` (the writer will run the job again): no SAVEPOINT; a failure is kept in
        ``p.apply_errors`` and RedoJob raised, so the writer undoes the job and runs it again.
        ``conn``: the session's connection, when the caller has it already."""
        assert p.route is not None
        if conn is None:
            conn = session.connection()
        try:
            with contextlib.nullcontext() if redo else savepoint(conn):
                return apply_action(conn, p.route.action, p.values, p.groups, self.channel.options, message_id,
                                    bus=self.bus), []
        except DomainError as exc:
            errors = [error_at(p.source_of(exc.field, exc.group), exc.code, str(exc))]
        except OperationalError:
            raise
        except IntegrityError as exc:
            if not session.info.get(FINAL_ATTEMPT, True):
                raise
            errors = [internal_error(exc, "channel %s: message %s conflicted on every attempt",
                                     self.channel.name, message_id)]
        except Exception as exc:
            errors = [internal_error(exc, "channel %s: applying message %s failed", self.channel.name, message_id)]
        if redo:
            p.apply_errors = errors
            raise RedoJob(f"message {message_id} not applied; stored as AE on the next run")
        return None, errors

    def _finish(self, conn: Connection, message_id: int | None, row: MessageValues, p: Prepared, status: str,
                outcome: Outcome | None, errors: list[HL7Error], *, ack_code: str | None = None,
                text: str = "") -> Stored:
        """Write the message row (insert, or update when it was inserted before applying), its content
        and events; build the replies that go out once the batch is committed."""
        msg = p.message
        if ack_code is None:
            ack_code = {MessageStatus.PROCESSED: "AA", MessageStatus.FILTERED: "AA", MessageStatus.ERROR: "AE",
                        MessageStatus.REJECTED: "AR"}[MessageStatus(status)]
        final: MessageValues = {"status": status, "ack_code": ack_code, "processed_at": utcnow()}
        if errors:
            final["error"] = "; ".join(e.describe() for e in errors)[:4000]
        if "patient_id" in row:
            final["patient_id"] = row["patient_id"]
        replies = self._acks(msg, ack_code, errors, text, storage_ok=True, control_id=row.get("control_id") or "")
        events = [{"kind": "warning", "detail": warning} for warning in p.warnings]
        if outcome is not None and outcome.notes:
            events.append({"kind": "notes", "detail": {"notes": outcome.notes}})
        if errors:
            events.append({"kind": "error", "detail": {"errors": [e.as_dict() for e in errors]}})
        if message_id is None:
            message_id = add(conn, MESSAGES, **{**row, **final})
            changed: MessageValues = {}
        elif status == MessageStatus.PROCESSED and ack_code == "AA":
            changed = {"patient_id": final["patient_id"]} if final.get("patient_id") is not None else {}
        else:
            changed = {"error": None, "patient_id": None, **final}
        with pipelined(conn):  # nothing here is read back: one round trip on PostgreSQL
            if changed:
                update_row(conn, MESSAGES, message_id, **changed)
            add_many(conn, CONTENT, [{"message_id": message_id, "raw": p.raw, "mapped": p.mapped_json(),
                                      "ack": "\n".join(replies) or None}])
            add_many(conn, EVENTS, [{"message_id": message_id, **event} for event in events])
        return Stored(message_id=message_id, status=status, ack_code=ack_code, replies=replies,
                      charset=msg.charset if msg else "latin-1", outcome=outcome, error=final.get("error"))

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
        if not storage_ok:
            commit_code = "CE"  # could not be stored: the sender should resend
        else:
            commit_code = "CR" if app_code == "AR" else "CA"
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


def check_reprocessable(row: MessageRow) -> None:
    if row.protocol == "fhir":
        raise ValueError(f"message {row.id} is a FHIR request: its sender got the answer (and the error) when it "
                         "was sent, and resends it; it is not applied again from here")


def reprocess(session: Session, inbound: HL7Inbound, row: MessageRow) -> Stored:
    """Run a stored message through routing, mapping and the domain again (e.g. after a mapping fix)."""
    check_reprocessable(row)
    if row.content is None or row.content_pruned:
        raise ValueError(f"message {row.id} has no stored content (pruned by retention)")
    p = inbound.prepare(row.content.raw, row.remote)
    row.attempts += 1
    previous = row.status
    session.add(MessageEvent(message_id=row.id, kind="reprocess", detail={"previous_status": previous,
                                                                          "previous_error": row.error}))
    if p.reject is not None:
        row.status, row.ack_code, row.error = MessageStatus.REJECTED, "AR", p.reject.describe()
        return Stored(row.id, MessageStatus.REJECTED, "AR", [], "latin-1", error=row.error)
    assert p.route is not None
    if p.route.action == "ignore":
        row.status, row.ack_code, row.error = MessageStatus.FILTERED, "AA", None
        return Stored(row.id, MessageStatus.FILTERED, "AA", [], "utf-8")
    errors = p.content_errors or inbound.mapping_errors(p)
    outcome = None
    if not errors:
        outcome, errors = inbound.apply_mapped(session, p, row.id)
    if outcome is None:
        row.status, row.ack_code = MessageStatus.ERROR, "AE"
        row.error = "; ".join(e.describe() for e in errors)[:4000]
        return Stored(row.id, MessageStatus.ERROR, "AE", [], "utf-8", error=row.error)
    row.status, row.ack_code, row.error, row.processed_at = "processed", "AA", None, utcnow()
    row.patient_id = outcome.patient_id
    if row.content is not None:
        row.content.mapped = p.mapped_json()
    if outcome.notes:
        session.add(MessageEvent(message_id=row.id, kind="notes", detail={"notes": outcome.notes}))
    return Stored(row.id, "processed", "AA", [], "utf-8", outcome=outcome)
