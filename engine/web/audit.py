"""The audit trail over HTTP: reads of patient data and actions that change state, each with who
(the token's name, the client certificate's subject, the remote address), what, on what, and how it
ended (engine/store/audit.py keeps the rows).

Every FHIR read, vread and search, and every admin API lookup of patients, orders or studies, writes
one ``audit_events`` row through the ingest writer before the answer is sent: a read that cannot be
recorded is not answered (503). Every admin API action (reprocess, retry, discard, match, accept...)
goes through ``audited``: its row is written in the action's own transaction; a refused action gets
a row of its own with the refusal's status. ``GET /api/audit`` lists and exports them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web
from sqlalchemy import Connection

from engine.errors import RadBridgeError
from engine.fhir.auditevent import audit_bundle
from engine.store.audit import (
    Actor,
    AuditAction,
    AuditQueryError,
    Subject,
    find_events,
    parse_since,
    patients_named,
    record_action,
    syslog_line,
)
from engine.store.tokens import Role
from engine.tls import peer_subject
from engine.web.fhir_views import patient_ids_of
from engine.web.keys import FHIR_INBOUND, SETTINGS, WRITER
from engine.web.reads import on_reader
from engine.web.roles import requires

T = TypeVar("T")
log = logging.getLogger(__name__)
MAX_LIMIT = 1000

routes = web.RouteTableDef()


AGENT = web.RequestKey("radbridge_agent", str)  # set by the token check: the token's name


def agent_of(request: web.Request) -> str:
    return request.get(AGENT) or "anonymous"


def cert_subject_of(request: web.Request) -> str | None:
    """The verified client certificate's subject (``CN=...,O=...``) when the request came over TLS
    with one; None otherwise."""
    transport = request.transport
    return peer_subject(transport.get_extra_info("peercert") if transport is not None else None)


def actor_of(request: web.Request) -> Actor:
    return Actor(agent_of(request), request.remote or None, cert_subject_of(request))


async def record_read(request: web.Request, action: str, resource_type: str, status: int,
                      resources: list[dict[str, Any]], patient_ids: list[int] | None = None, *,
                      message_id: int | None = None, study_uid: str | None = None,
                      delivery_id: int | None = None) -> None:
    """One audit_events row for this read, through the writer (raises when it cannot be written);
    ``message_id``, ``study_uid``, ``delivery_id``: the stored message, study or delivery read."""
    fhir = request.config_dict[FHIR_INBOUND]
    opts = fhir.channel.fhir if fhir is not None else None
    if opts is not None and not opts.audit_reads:
        return
    ids = patient_ids if patient_ids is not None else patient_ids_of(resource_type, resources)
    subject = Subject(resource_type, ids or [], count=len(resources), message_id=message_id, study_uid=study_uid,
                      delivery_id=delivery_id)
    actor = actor_of(request)
    query = str(request.rel_url)
    await request.config_dict[WRITER].run(
        lambda s: record_action(s.connection(), actor, AuditAction(action), subject, status=status, query=query))


class Refused(RadBridgeError):
    """An action the handler turns down after looking (nothing changed): its HTTP status and body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("detail") or body.get("error"))
        self.status = status
        self.body = body


async def audited(request: web.Request, action: AuditAction, work: Callable[[Connection], T],
                  about: Callable[[Connection, T | None], Subject],
                  refusal: Callable[[Connection, T], Refused | None] | None = None,
                  status: int = 200) -> T:
    """Run ``work`` on the writer's connection with its audit row in the same transaction. When
    ``refusal`` finds the result a refusal (nothing was done) or ``work`` raises, the transaction is
    rolled back and a row with the refusal's status is written on its own; then it is raised again
    (a ``Refused`` becomes the HTTP error it names)."""
    actor = actor_of(request)
    query = f"{request.method} {request.rel_url}"
    writer = request.config_dict[WRITER]

    def job(s: Any) -> T:
        conn = s.connection()
        result = work(conn)
        refused = refusal(conn, result) if refusal is not None else None
        if refused is not None:
            raise refused
        record_action(conn, actor, action, about(conn, result), status=status, query=query)
        return result
    try:
        return await writer.run(job)
    except Exception as exc:
        code = exc.status if isinstance(getattr(exc, "status", None), int) else 500  # type: ignore[attr-defined]
        try:
            await writer.run(lambda s: record_action(s.connection(), actor, action, about(s.connection(), None),
                                                     status=code, query=query))
        except Exception:  # the store itself failed: the original error is what the client needs
            log.exception("a failed %s could not be recorded in the audit trail", action)
        if isinstance(exc, Refused):
            raise _http(exc) from None
        raise


def _http(refused: Refused) -> web.HTTPException:
    cls = {404: web.HTTPNotFound, 409: web.HTTPConflict, 400: web.HTTPBadRequest}.get(refused.status,
                                                                                   web.HTTPConflict)
    return cls(text=json.dumps(refused.body), content_type="application/json")


async def record_failure(request: web.Request, action: AuditAction, subject: Subject, status: int) -> None:
    """A row for an action that failed before any transaction of its own (the engine refused it)."""
    actor = actor_of(request)
    query = f"{request.method} {request.rel_url}"
    await request.config_dict[WRITER].run(
        lambda s: record_action(s.connection(), actor, action, subject, status=status, query=query))


def _bad(detail: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": "bad request", "detail": detail}),
                              content_type="application/json")


@routes.get("/audit")
@requires(Role.READ)
async def audit(request: web.Request) -> web.Response:
    """GET /api/audit?since=&who=&patient=&action=&resource_type=&since_id=&limit=&format=: the
    trail, newest first (with ``since_id``: the oldest ``limit`` after it, oldest first, for a
    poller that keeps the last id it saw). ``patient`` is an identifier (``ID`` or ``ID^ISSUER``) or Patient/<id>;
    ``patient_id`` an index id; ``format`` json (default), syslog (RFC 5424 lines) or fhir (a
    Bundle of AuditEvent). ``agent`` is the old name of ``who``."""
    q = request.query
    raw_limit = q.get("limit", "100")
    if not raw_limit.isdigit() or not 0 < int(raw_limit) <= MAX_LIMIT:
        raise _bad(f"limit must be a number from 1 to {MAX_LIMIT}")
    fmt = q.get("format", "json")
    if fmt not in ("json", "syslog", "fhir"):
        raise _bad("format must be json, syslog or fhir")
    try:
        since = parse_since(q["since"]) if q.get("since") else None
    except AuditQueryError as exc:
        raise _bad(str(exc)) from None
    if q.get("since_id") and not q["since_id"].isdigit():
        raise _bad("since_id must be a number")

    def run(conn: Connection) -> list[dict[str, Any]]:
        patients: list[int] | None = None
        if q.get("patient"):
            patients = patients_named(conn, q["patient"])
        if q.get("patient_id", "").isdigit():
            patients = (patients or []) + [int(q["patient_id"])]
        return find_events(conn, since=since, who=q.get("who") or q.get("agent"), patient_ids=patients,
                           resource_type=q.get("resource_type"), action=q.get("action"),
                           since_id=int(q["since_id"]) if q.get("since_id") else None, limit=int(raw_limit),
                           oldest_first=bool(q.get("since_id")))
    events = await on_reader(request, run)
    if fmt == "syslog":
        return web.Response(text="".join(syslog_line(e) + "\n" for e in events), content_type="text/plain",
                            charset="utf-8")
    if fmt == "fhir":
        return web.json_response(audit_bundle(events, observer=request.config_dict[SETTINGS].name),
                                 content_type="application/fhir+json")
    return web.json_response({"events": events})
