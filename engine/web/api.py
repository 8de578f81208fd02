"""Admin API (JSON): patients, orders, messages, studies, channels, tokens; reprocess a message; match a
study by hand, reconcile it again, accept a finding. Each route declares its role (engine/web/roles.py)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from sqlalchemy.orm import Session, selectinload

from engine.connectors.hl7channel import Reprocessed
from engine.reconciliation.manual import ManualError
from engine.store import tokens
from engine.store.audit import AuditAction, Subject, message_subject
from engine.store.message_search import search_statement
from engine.store.models import Message
from engine.store.tokens import Role
from engine.web import audit, deliveries, study_actions
from engine.web.audit import Refused, actor_of, record_failure, record_read
from engine.web.inputs import BodyError, nul_parameter, read_body
from engine.web.keys import ENGINE, WRITER
from engine.web.lookups import (
    ORDER_FILTERS,
    PatientSearch,
    StudySearch,
    find_orders,
    find_patients,
    find_studies,
    patient_detail,
    read_one,
)
from engine.web.message_filters import FilterError, message_filter
from engine.web.reads import in_read_session, on_reader
from engine.web.roles import requires
from engine.web.serialize import message_json

T = TypeVar("T")
MAX_LIMIT = 500

routes = web.RouteTableDef()


def _bad(detail: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": "bad request", "detail": detail}),
                              content_type="application/json")


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise _bad(f"limit must be a number from 1 to {MAX_LIMIT}")
    return int(raw)


async def _manual(action: Awaitable[T]) -> T:
    """A study action (engine/web/study_actions.py); what it names not being there is a JSON 404 / 409."""
    try:
        return await action
    except ManualError as exc:
        conflict = exc.status == 409
        raise (web.HTTPConflict if conflict else web.HTTPNotFound)(
            text=json.dumps({"error": "conflict" if conflict else "not found", "detail": str(exc)}),
            content_type="application/json") from None


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        raw = await read_body(request, request.client_max_size, "the HTTP server's request size limit")
        data = json.loads(raw) if raw.strip() else {}
    except BodyError as exc:
        raise exc.http_error() from None
    except ValueError:
        raise _bad("the body is not JSON") from None
    if not isinstance(data, dict):
        raise _bad("the body is a JSON object")
    return data


@routes.get("/patients")
@requires(Role.READ)
async def patients(request: web.Request) -> web.Response:
    q = request.query
    search = PatientSearch(identifier=q.get("identifier"), issuer=q.get("issuer"), name=q.get("name"),
                           birth_date=q.get("birth_date"))
    if not search.given():
        raise _bad("give identifier=ID (and optionally issuer=), name=FAMILY or birth_date=YYYY-MM-DD")
    limit = _limit(request)
    found = await in_read_session(request, lambda s: find_patients(s, search, limit))
    await record_read(request, "search", "Patient", 200, found, [p["id"] for p in found])
    return web.json_response({"patients": found})


@routes.get(r"/patients/{id:\d+}")
@requires(Role.READ)
async def patient(request: web.Request) -> web.Response:
    pid = int(request.match_info["id"])
    body = await read_one(request, "Patient", lambda s: patient_detail(s, pid), lambda _: [pid])
    if body is None:
        raise web.HTTPNotFound(text='{"error": "no such patient"}', content_type="application/json")
    return web.json_response(body)


@routes.get("/orders")
@requires(Role.READ)
async def orders(request: web.Request) -> web.Response:
    q = request.query
    filters = {k: q[k] for k in ORDER_FILTERS if k in q}
    if not filters:
        raise _bad("give accession=, placer=, filler=, status=, patient_id= or patient=ID^ISSUER")
    limit = _limit(request)
    found = await in_read_session(request, lambda s: find_orders(s, filters, limit))
    await record_read(request, "search", "Order", 200, found, sorted({o["patient_id"] for o in found}))
    return web.json_response({"orders": found})


@routes.get("/messages")
@requires(Role.READ)
async def messages(request: web.Request) -> web.Response:
    """Newest first; the filters of docs/console.md "Messages" (the console's /messages uses the same query)."""
    try:
        wanted = message_filter(request.query)
    except FilterError as exc:
        raise _bad(str(exc)) from None
    limit = _limit(request)

    def run(s: Session) -> list[dict[str, Any]]:
        stmt = search_statement(wanted, limit).options(selectinload(Message.events))
        found = [message_json(m) for m in s.execute(stmt).scalars()]
        return found[::-1] if wanted.after_id is not None else found
    return web.json_response({"messages": await in_read_session(request, run)})


@routes.get(r"/messages/{id:\d+}")
@requires(Role.READ)
async def message(request: web.Request) -> web.Response:
    mid = int(request.match_info["id"])

    def run(s: Session) -> dict[str, Any] | None:
        m = s.get(Message, mid)
        return message_json(m, content=True) if m else None
    body = await in_read_session(request, run)
    await record_read(request, "read", "Message", 200 if body else 404, [body] if body else [],
                      [body["patient_id"]] if body and body.get("patient_id") else [], message_id=mid)
    if body is None:
        raise web.HTTPNotFound(text='{"error": "no such message"}', content_type="application/json")
    return web.json_response(body)


async def reprocess_message(request: web.Request, mid: int) -> Reprocessed:
    """Apply stored message ``mid`` again with its audit row (POST /api/messages/{id}/reprocess and
    the console's Reprocess button). A message that is not there (404) or cannot be applied again
    (409: a FHIR request, pruned content) gets an audit row of its own and raises ``Refused``."""
    try:
        return await request.config_dict[ENGINE].reprocess(mid, actor_of(request))
    except LookupError as exc:
        await record_failure(request, AuditAction.REPROCESS, Subject("Message", message_id=mid), 404)
        raise Refused(404, {"error": str(exc)}) from None
    except ValueError as exc:
        subject = await request.config_dict[WRITER].run(lambda s: message_subject(s.connection(), mid))
        await record_failure(request, AuditAction.REPROCESS, subject, 409)
        raise Refused(409, {"error": "cannot reprocess", "detail": str(exc)}) from None


@routes.post(r"/messages/{id:\d+}/reprocess")
@requires(Role.OPERATE)
async def reprocess(request: web.Request) -> web.Response:
    try:
        result = await reprocess_message(request, int(request.match_info["id"]))
    except Refused as exc:
        return web.json_response(exc.body, status=exc.status)
    return web.json_response(result)


@routes.get("/studies")
@requires(Role.READ)
async def studies(request: web.Request) -> web.Response:
    q = request.query
    search = StudySearch(accession=q.get("accession"), study_uid=q.get("study_uid"), patient_id=q.get("patient_id"),
                         state=q.get("state"), reconciliation=q.get("reconciliation"),
                         exceptions=q.get("exceptions", "").lower() in ("1", "true", "yes"))
    if not search.given():
        raise _bad("give accession=, study_uid=, patient_id= (as in the headers), state=, reconciliation= "
                   "or exceptions=true")
    limit = _limit(request)
    listed = await in_read_session(request, lambda s: find_studies(s, search, limit))
    await record_read(request, "search", "Study", 200, listed,
                      sorted({st["patient_id"] for st in listed if st["patient_id"] is not None}))
    return web.json_response({"studies": listed})


@routes.post("/studies/{ref}/match")
@requires(Role.OPERATE)
async def study_match(request: web.Request) -> web.Response:
    data = await _body(request)
    accession, patient = data.get("accession"), data.get("patient")
    if bool(accession) == bool(patient) or not isinstance(accession or patient, str):
        raise _bad('give {"accession": "ACC"} or {"patient": "ID^ISSUER"}')
    out = await _manual(study_actions.match_study(request, request.match_info["ref"], accession=accession,
                                                  patient=patient, note=data.get("note")))
    return web.json_response(out, status=202)


@routes.delete("/studies/{ref}/match")
@requires(Role.OPERATE)
async def study_unmatch(request: web.Request) -> web.Response:
    return web.json_response(await _manual(study_actions.clear_match(request, request.match_info["ref"])),
                             status=202)


@routes.post("/studies/{ref}/reconcile")
@requires(Role.OPERATE)
async def study_reconcile(request: web.Request) -> web.Response:
    return web.json_response(await _manual(study_actions.reconcile_again(request, request.match_info["ref"])),
                             status=202)


@routes.post(r"/findings/{id:\d+}/accept")
@requires(Role.OPERATE)
async def finding_accept(request: web.Request) -> web.Response:
    data = await _body(request)
    fid = int(request.match_info["id"])
    await _manual(study_actions.accept_finding(request, fid, note=data.get("note")))
    return web.json_response({"finding": fid, "status": "accepted"})


@routes.get("/channels")
@requires(Role.READ)
async def channels(request: web.Request) -> web.Response:
    return web.json_response({"channels": request.config_dict[ENGINE].channel_status()})


@routes.get("/storage/cleanup")
@requires(Role.READ)
async def storage_cleanup(request: web.Request) -> web.Response:
    """The storage lifecycle ([storage.cleanup], docs/storage.md): settings, last pass, totals since start."""
    return web.json_response(request.config_dict[ENGINE].cleanup_status())


@routes.get("/tokens")
@requires(Role.ADMIN)
async def token_list(request: web.Request) -> web.Response:
    """The named tokens (radbridge tokens list): names, roles, created, last used, revoked; no secrets."""
    return web.json_response({"tokens": await on_reader(request, tokens.listing)})


@web.middleware
async def input_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    if (name := nul_parameter(request)) is not None:
        raise _bad(f"{name} contains a NUL character")
    return await handler(request)


def api_app() -> web.Application:
    """/api/: the services come from the root app's keys (request.config_dict)."""
    app = web.Application(middlewares=[input_middleware])
    app.add_routes(audit.routes)
    app.add_routes(routes)
    app.add_routes(deliveries.routes)
    return app
