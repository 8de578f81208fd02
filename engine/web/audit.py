"""The audit trail of reads of patient data: who read what, from where, and whose data it was.

Every FHIR read, vread and search, and every admin API lookup of patients, orders or studies, writes
one ``audit_events`` row through the ingest writer before the answer is sent: a read that cannot be
recorded is not answered (503). ``GET /api/audit`` lists them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from sqlalchemy import Table, select
from sqlalchemy.orm import Session

from engine.domain.records import add
from engine.store.models import AuditEvent
from engine.web.fhir_views import patient_ids_of

if TYPE_CHECKING:
    from engine.runtime import Engine

AUDIT: Table = AuditEvent.__table__  # type: ignore[assignment]


def fingerprint(token: str) -> str:
    """How a token is named in the trail: never the token itself."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


AGENT = web.RequestKey("radbridge_agent", str)  # set by the token check


def agent_of(request: web.Request) -> str:
    return request.get(AGENT) or "anonymous"


async def record_read(engine: Engine, request: web.Request, action: str, resource_type: str, status: int,
                      resources: list[dict[str, Any]], patient_ids: list[int] | None = None) -> None:
    opts = engine.fhir.channel.fhir if engine.fhir is not None else None
    if opts is not None and not opts.audit_reads:
        return
    ids = patient_ids if patient_ids is not None else patient_ids_of(resource_type, resources)
    row: dict[str, Any] = {"agent": agent_of(request)[:64], "remote": (request.remote or "")[:64] or None,
                           "action": action, "resource_type": resource_type[:32], "query": str(request.rel_url)[:2000],
                           "status": status, "count": len(resources), "patient_ids": ids or None}
    await engine.writer.run(lambda s: add(s.connection(), AUDIT, **row))


def add_audit_routes(app: web.Application, read: Callable[[Callable[[Session], Any]], Awaitable[Any]]) -> None:
    """GET /api/audit?agent=&resource_type=&patient_id=&since_id=&limit=: the trail, newest first."""

    async def audit(request: web.Request) -> web.Response:
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
            out: list[dict[str, Any]] = [{"id": a.id, "at": a.at.isoformat(), "agent": a.agent, "remote": a.remote, "action": a.action,
                    "resource_type": a.resource_type, "query": a.query, "status": a.status, "count": a.count,
                    "patient_ids": a.patient_ids or []} for a in rows.scalars()]
            if q.get("patient_id", "").isdigit():  # JSON lists are not indexed alike on SQLite and PostgreSQL
                wanted = int(q["patient_id"])
                out = [e for e in out if wanted in e["patient_ids"]][:limit]
            return out
        return web.json_response({"events": await read(run)})

    app.router.add_get("/audit", audit)
