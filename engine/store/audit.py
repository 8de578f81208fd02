"""The audit trail: who read patient data or changed state, from where, on what, and how it ended.

One ``audit_events`` row per read of patient data (engine/web/audit.py ``record_read``) and per
action that changes state: ``record_action`` is the one function that writes them, called inside
the action's own transaction (so the action and its trail row are committed together, or neither),
by the admin API, the CLI, the runtime (start, stop, mapping reload) and the token commands. A
refused or failed action is recorded too, in a transaction of its own, with its status.

The trail is append-only for the engine: nothing here or elsewhere updates or deletes its rows,
except retention (engine/store/retention.py, ``[retention] audit_days``);
tests/test_audit_trail.py walks the code to keep it so.

Reading (``find_events``) serves ``radbridge audit`` and ``GET /api/audit``; ``syslog_line`` and
engine/fhir/auditevent.py export a row for a SIEM (RFC 5424, FHIR R4 AuditEvent in the IHE ATNA
shape).
"""

from __future__ import annotations

import getpass
import os
import re
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Table, insert, select

from engine.errors import RadBridgeError
from engine.store.models import AuditEvent, Delivery, Finding, Message, Order, PatientIdentifier, Study
from engine.store.types import utcnow

AUDIT: Table = AuditEvent.__table__  # type: ignore[assignment]
MAX_PAGES = 200  # patient filtering reads at most this many pages of rows (bounded scan)
PAGE = 1000


class AuditAction(StrEnum):
    """What an audit row records (the ``action`` column)."""

    READ = "read"
    VREAD = "vread"
    SEARCH = "search"
    REPROCESS = "reprocess"  # a stored message applied again
    RETRY = "retry"  # deliveries put back in the queue
    DISCARD = "discard"  # deliveries given up
    MATCH = "match"  # a study matched to an order or patient by hand
    UNMATCH = "unmatch"  # a manual match dropped
    RECONCILE = "reconcile"  # a study reconciled again on request
    ACCEPT = "accept"  # a reconciliation finding accepted
    MAPPING_RELOAD = "mapping-reload"
    CONFIG_RELOAD = "config-reload"  # settings or certificates read again, a logging detail switched
    TOKEN_CREATE = "token-create"
    TOKEN_REVOKE = "token-revoke"
    START = "start"
    STOP = "stop"
    LOGIN = "login"  # a console session opened (or refused: status 401/403)
    LOGOUT = "logout"
    MAPPING_EDIT = "mapping-edit"  # a mapping file saved from the console
    STORE = "store"  # instances stored over HTTP (STOW-RS): one row per request
    DELETE = "delete"  # a study deleted by the storage lifecycle ([storage.cleanup]): one row per study


READS = (AuditAction.READ, AuditAction.VREAD, AuditAction.SEARCH)


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"


def outcome_of(status: int) -> Outcome:
    return Outcome.SUCCESS if status < 400 else Outcome.FAILURE


@dataclass(frozen=True)
class Actor:
    """Who acts: a token's name (HTTP), ``cli:<os user>`` (CLI), ``engine:<host>`` (the engine
    itself); the client certificate's subject and the remote address when they are known."""

    name: str
    remote: str | None = None
    cert_subject: str | None = None


def cli_actor() -> Actor:
    """The operator running a ``radbridge`` command: the OS user (``cli:root``)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for the uid (a container's arbitrary user)
        user = f"uid{os.getuid()}"
    return Actor(f"cli:{user}"[:64])


def engine_actor() -> Actor:
    """The engine acting on its own (start, stop, a mapping reloaded by the watcher)."""
    return Actor(f"engine:{socket.gethostname()}"[:64])


@dataclass
class Subject:
    """What an action was about: whose data, which study, message or delivery."""

    resource_type: str
    patient_ids: list[int] = field(default_factory=list)
    study_uid: str | None = None
    message_id: int | None = None
    delivery_id: int | None = None
    detail: str | None = None
    count: int = 1


def record_action(conn: Connection, actor: Actor, action: AuditAction, subject: Subject, *, status: int = 200,
                  query: str | None = None) -> None:
    """Append one audit row on ``conn`` (inside the caller's transaction). ``status`` is an HTTP
    status (below 400: success) for every origin, CLI and engine included; ``query`` the request
    path or the command line."""
    conn.execute(insert(AUDIT).values(
        at=utcnow(), agent=actor.name[:64], remote=(actor.remote or None) and actor.remote[:64],
        cert_subject=(actor.cert_subject or None) and actor.cert_subject[:256], action=str(action)[:16],
        resource_type=subject.resource_type[:32], query=query[:2000] if query else None, status=status,
        count=subject.count, patient_ids=sorted(set(subject.patient_ids)) or None,
        study_uid=(subject.study_uid or None) and subject.study_uid[:64], message_id=subject.message_id,
        delivery_id=subject.delivery_id, detail=(subject.detail or None) and subject.detail[:2000]))


# --- what an action was about --------------------------------------------------------------------

def message_subject(conn: Connection, message_id: int) -> Subject:
    row = conn.execute(select(Message.patient_id).where(Message.id == message_id)).first()
    return Subject("Message", [row.patient_id] if row is not None and row.patient_id else [], message_id=message_id)


def delivery_subject(conn: Connection, delivery_id: int) -> Subject:
    row = conn.execute(select(Delivery.patient_id, Study.study_uid, Delivery.destination)
                       .outerjoin(Study, Study.id == Delivery.study_id).where(Delivery.id == delivery_id)).first()
    if row is None:
        return Subject("Delivery", delivery_id=delivery_id)
    return Subject("Delivery", [row.patient_id] if row.patient_id else [], study_uid=row.study_uid,
                   delivery_id=delivery_id, detail=f"destination {row.destination}")


def study_subject(conn: Connection, ref: str | int) -> Subject:
    """A study by index id or Study Instance UID: its UID and the patients it is linked to."""
    stmt = select(Study.id, Study.study_uid, Study.patient_id, Study.manual_patient_id, Study.order_id,
                  Study.manual_order_id)
    row = conn.execute(stmt.where(Study.id == ref) if isinstance(ref, int) else stmt.where(Study.study_uid == ref)
                       ).first()
    if row is None and isinstance(ref, str) and ref.isdigit():
        row = conn.execute(stmt.where(Study.id == int(ref))).first()
    if row is None:
        return Subject("Study", study_uid=str(ref) if isinstance(ref, str) and not ref.isdigit() else None)
    patients = [p for p in (row.patient_id, row.manual_patient_id) if p]
    orders = [o for o in (row.order_id, row.manual_order_id) if o]
    if orders:  # matched to an order (by hand, perhaps just now): the order's patient
        patients += [p for p in conn.execute(select(Order.patient_id).where(Order.id.in_(orders))).scalars() if p]
    return Subject("Study", patients, study_uid=row.study_uid)


def finding_subject(conn: Connection, finding_id: int) -> Subject:
    study_id = conn.execute(select(Finding.study_id).where(Finding.id == finding_id)).scalar()
    found = study_subject(conn, int(study_id)) if study_id is not None else Subject("Finding")
    found.resource_type, found.detail = "Finding", f"finding {finding_id}"
    return found


# --- reading -------------------------------------------------------------------------------------

class AuditQueryError(RadBridgeError, ValueError):
    """A filter that cannot be read (the message says which and why)."""


RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``--since``: an ISO 8601 date or date-time (UTC unless it says otherwise), or an age such as
    ``90m``, ``1h``, ``7d``."""
    text = text.strip()
    m = RELATIVE.match(text)
    if m:
        return (now or utcnow()) - timedelta(**{UNITS[m.group(2)]: int(m.group(1))})
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise AuditQueryError(f"since {text!r}: give an ISO 8601 time (2026-12-01T08:00:00Z) or an age "
                              "(30m, 1h, 7d)") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def patients_named(conn: Connection, ref: str) -> list[int]:
    """Patient index ids for ``--patient``: an identifier value (``ID`` or ``ID^ISSUER``) or
    ``Patient/<index id>`` (as FHIR names them and the AuditEvent export shows them)."""
    if ref.startswith("Patient/") and ref[8:].isdigit():
        return [int(ref[8:])]
    value, sep, issuer = ref.partition("^")
    stmt = select(PatientIdentifier.patient_id).where(PatientIdentifier.value == value)
    if sep:
        stmt = stmt.where(PatientIdentifier.issuer == issuer)
    return sorted(set(conn.execute(stmt).scalars()))


def event_json(a: Any) -> dict[str, Any]:
    """One row as the API, ``radbridge audit --format json`` and the exporters see it."""
    return {"id": a.id, "at": a.at.isoformat(), "agent": a.agent, "remote": a.remote, "cert_subject": a.cert_subject,
            "action": a.action, "resource_type": a.resource_type, "query": a.query, "status": a.status,
            "outcome": str(outcome_of(a.status)), "count": a.count, "patient_ids": a.patient_ids or [],
            "study_uid": a.study_uid, "message_id": a.message_id, "delivery_id": a.delivery_id, "detail": a.detail}


def find_events(conn: Connection, *, since: datetime | None = None, who: str | None = None,
                patient_ids: list[int] | None = None, resource_type: str | None = None,
                action: str | None = None, since_id: int | None = None, limit: int = 100,
                oldest_first: bool = False) -> list[dict[str, Any]]:
    """Audit rows matching every filter given, newest first (or oldest first). ``patient_ids``
    keeps the rows naming any of them (JSON lists are not indexed alike on SQLite and PostgreSQL,
    so rows are paged by id and filtered here, at most MAX_PAGES pages)."""
    base = select(AuditEvent.__table__)
    if since is not None:
        base = base.where(AuditEvent.at >= since)
    if who:
        base = base.where(AuditEvent.agent == who)
    if resource_type:
        base = base.where(AuditEvent.resource_type == resource_type)
    if action:
        base = base.where(AuditEvent.action == action)
    if since_id is not None:
        base = base.where(AuditEvent.id > since_id)
    order = AuditEvent.id.asc() if oldest_first else AuditEvent.id.desc()
    if patient_ids is None:
        return [event_json(r) for r in conn.execute(base.order_by(order).limit(limit))]
    wanted = set(patient_ids)
    out: list[dict[str, Any]] = []
    after: int | None = None
    for _ in range(MAX_PAGES):
        stmt = base
        if after is not None:
            stmt = stmt.where(AuditEvent.id > after if oldest_first else AuditEvent.id < after)
        rows = list(conn.execute(stmt.order_by(order).limit(PAGE)))
        out.extend(event_json(r) for r in rows if wanted & set(r.patient_ids or []))
        if len(out) >= limit or len(rows) < PAGE:
            break
        after = rows[-1].id
    return out[:limit]


# --- syslog (RFC 5424) ---------------------------------------------------------------------------

SYSLOG_FACILITY = 13  # "log audit" (RFC 5424 table 1)
SYSLOG_SD_ID = "radbridge@32473"  # 32473: the enterprise number RFC 5612 reserves for examples
SD_PARAMS = ("id", "agent", "remote", "cert_subject", "outcome", "status", "resource_type", "patient_ids",
             "study_uid", "message_id", "delivery_id", "count")


def _sd_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _printable(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, or the NILVALUE."""
    clean = "".join(ch for ch in value if 33 <= ord(ch) <= 126)[:limit]
    return clean or "-"


def syslog_line(event: dict[str, Any], *, hostname: str | None = None, app_name: str = "radbridge") -> str:
    """One audit row as an RFC 5424 message: facility log audit, severity notice (success) or
    warning (failure); MSGID is the action; the structured data carries every field. No patient
    names, only index ids and UIDs."""
    severity = 5 if event["outcome"] == Outcome.SUCCESS else 4
    at = datetime.fromisoformat(event["at"]).astimezone(UTC)
    stamp = at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond:06d}Z"
    params = []
    for key in SD_PARAMS:
        value = event.get(key)
        if value is None or value == []:
            continue
        text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
        params.append(f'{key}="{_sd_escape(text)}"')
    sd = f"[{SYSLOG_SD_ID} {' '.join(params)}]"
    target = event.get("study_uid") or (f"message {event['message_id']}" if event.get("message_id") else None) \
        or (f"delivery {event['delivery_id']}" if event.get("delivery_id") else None) or event["resource_type"]
    msg = f"{event['agent']} {event['action']} {target}: {event['outcome']} ({event['status']})"
    return (f"<{SYSLOG_FACILITY * 8 + severity}>1 {stamp} {_printable(hostname or socket.gethostname(), 255)} "
            f"{_printable(app_name, 48)} - {_printable(str(event['action']), 32)} {sd} {msg}")
