"""The audit trail of reads of patient data: who read what, from where, and whose data it was.

Every FHIR read, vread and search, and every admin API lookup of patients, orders or studies, writes
one ``audit_events`` row through the ingest writer before the answer is sent: a read that cannot be
recorded is not answered (503). ``GET /api/audit`` lists them.
"""

from __future__ import annotations

import hashlib
from typing import Any

from aiohttp import web
from sqlalchemy import Table, select
from sqlalchemy.orm import Session

from engine.domain.records import add
from engine.store.models import AuditEvent
from engine.store.tokens import Role
from engine.web.fhir_views import patient_ids_of
from engine.web.keys import FHIR_INBOUND, WRITER
from engine.web.reads import in_read_session
from engine.web.roles import requires

AUDIT: Table = AuditEvent.__table__  # type: ignore[assignment]

routes = web.RouteTableDef()


def fingerprint(token: str) -> str:
    """How a token is named in the trail: never the token itself."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


AGENT = web.RequestKey("radbridge_agent", str)  # set by the token check


def agent_of(request: web.Request) -> str:
    return request.get(AGENT) or "anonymous"


async def record_read(request: web.Request, action: str, resource_type: str, status: int,
                      resources: list[dict[str, Any]], patient_ids: list[int] | None = None) -> None:
    """One audit_events row for this read, through the writer (raises when it cannot be written)."""
    fhir = request.config_dict[FHIR_INBOUND]
    opts = fhir.channel.fhir if fhir is not None else None
    if opts is not None and not opts.audit_reads:
        return
    ids = patient_ids if patient_ids is not None else patient_ids_of(resource_type, resources)
    row: dict[str, Any] = {"agent": agent_of(request)[:64], "remote": (request.remote or "")[:64] or None,
                           "action": action, "resource_type": resource_type[:32], "query": str(request.rel_url)[:2000],
                           "status": status, "count": len(resources), "patient_ids": ids or None}
    await request.config_dict[WRITER].run(lambda s: add(s.connection(), AUDIT, **row))


@routes.get("/audit")
@requires(Role.READ)
async def audit(request: web.Request) -> web.Response:
    """GET /api/audit?agent=&resource_type=&patient_id=&since_id=&limit=: the trail, newest first."""
    q = request.query
    limit = int(q["limit"]) if q.get("limit", "").isdigit() and 0 < int(q["limit"]) <= 1000 else 100

    def run(s: Session) -> list[dict[str, Any]]:
        stmt = select(AuditEvent)
        if q.get("agent"):
            stmt = stmt.where(AuditEvent.agent == q["agent"])
        if q.get("resource_type"):
            stmt = stmt.where(AuditEvent.resource_type == q["resource_type"])
        if q.get("since_id", "").isdigit():
            stmt = stmt.where(AuditEvent.id > int(q["since_id"]))
        rows = s.execute(stmt.order_by(AuditEvent.id.desc()).limit(limit * 10 if q.get("patient_id") else limit))
        out: list[dict[str, Any]] = [{"id": a.id, "at": a.at.isoformat(), "agent": a.agent, "remote": a.remote,
                                      "action": a.action, "resource_type": a.resource_type, "query": a.query,
                                      "status": a.status, "count": a.count, "patient_ids": a.patient_ids or []}
                                     for a in rows.scalars()]
        if q.get("patient_id", "").isdigit():  # JSON lists are not indexed alike on SQLite and PostgreSQL
            wanted = int(q["patient_id"])
            out = [e for e in out if wanted in e["patient_ids"]][:limit]
        return out
    return web.json_response({"events": await in_read_session(request, run)})
