"""Admin API (JSON): patients, orders, messages, studies, channels, tokens; reprocess a message; match a
study by hand, reconcile it again, accept a finding. Each route declares its role (engine/web/roles.py)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from engine.reconciliation import manual
from engine.reconciliation.manual import ManualError
from engine.reconciliation.reconciler import EXCEPTION_STATES
from engine.store import tokens
from engine.store.audit import AuditAction, Subject, finding_subject, message_subject, study_subject
from engine.store.message_search import search_statement
from engine.store.models import DomainEvent, Message, Order, Patient, PatientIdentifier, ReconcileJob, Study
from engine.store.tokens import Role
from engine.web import audit, deliveries
from engine.web.audit import actor_of, audited, record_failure, record_read
from engine.web.inputs import BodyError, nul_parameter, read_body
from engine.web.keys import ENGINE, WRITER
from engine.web.message_filters import FilterError, message_filter
from engine.web.reads import in_read_session, on_reader
from engine.web.roles import requires
from engine.web.serialize import message_json, order_json, patient_json, study_json

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


def _with_studies(s: Session, p: Patient) -> dict[str, Any]:
    """The patient, with the studies linked to it and those whose headers carry one of its IDs."""
    out = patient_json(p)
    values = [i.value for i in p.identifiers]
    stmt = select(Study).where((Study.patient_id == p.id) | Study.dicom_patient_id.in_(values)).order_by(Study.id)
    out["studies"] = [study_json(st, series=False) for st in s.execute(stmt.limit(MAX_LIMIT)).scalars()]
    return out


async def _write(request: web.Request, action: AuditAction, fn: Callable[[Any], T],
                 about: Callable[[Any, T | None], Subject], status: int = 202) -> T:
    """``fn`` on the writer's connection, with its audit row; then the reconciler is woken for what
    it changed."""
    try:
        result = await audited(request, action, fn, about, status=status)
    except ManualError as exc:
        conflict = exc.status == 409
        raise (web.HTTPConflict if conflict else web.HTTPNotFound)(
            text=json.dumps({"error": "conflict" if conflict else "not found", "detail": str(exc)}),
            content_type="application/json") from None
    request.config_dict[ENGINE].wake_reconciler()
    return result


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
    ident, issuer, name = q.get("identifier"), q.get("issuer"), q.get("name")
    if not ident and not name:
        raise _bad("give identifier=ID (and optionally issuer=) or name=FAMILY")
    limit = _limit(request)

    def run(s: Session) -> list[dict[str, Any]]:
        stmt = select(Patient).options(selectinload(Patient.identifiers), selectinload(Patient.orders),
                                       selectinload(Patient.history))
        if ident:
            sub = select(PatientIdentifier.patient_id).where(PatientIdentifier.value == ident)
            if issuer is not None:
                sub = sub.where(PatientIdentifier.issuer == issuer)
            stmt = stmt.where(Patient.id.in_(sub))
        if name:
            stmt = stmt.where(Patient.family_name.ilike(name.replace("*", "%")))
        return [_with_studies(s, p) for p in s.execute(stmt.order_by(Patient.id).limit(limit)).scalars()]
    found = await in_read_session(request, run)
    await record_read(request, "search", "Patient", 200, found, [p["id"] for p in found])
    return web.json_response({"patients": found})


@routes.get(r"/patients/{id:\d+}")
@requires(Role.READ)
async def patient(request: web.Request) -> web.Response:
    pid = int(request.match_info["id"])

    def run(s: Session) -> dict[str, Any] | None:
        p = s.get(Patient, pid)
        return _with_studies(s, p) if p else None
    body = await in_read_session(request, run)
    await record_read(request, "read", "Patient", 200 if body else 404, [body] if body else [],
                      [pid] if body else [])
    if body is None:
        raise web.HTTPNotFound(text='{"error": "no such patient"}', content_type="application/json")
    return web.json_response(body)


@routes.get("/orders")
@requires(Role.READ)
async def orders(request: web.Request) -> web.Response:
    q = request.query
    filters = {k: q[k] for k in ("accession", "placer", "filler", "status", "patient_id") if k in q}
    if not filters:
        raise _bad("give accession=, placer=, filler=, status= or patient_id=")
    limit = _limit(request)

    def run(s: Session) -> list[dict[str, Any]]:
        stmt = select(Order).options(selectinload(Order.history))
        cols = {"accession": Order.accession, "placer": Order.placer_number, "filler": Order.filler_number,
                "status": Order.status, "patient_id": Order.patient_id}
        for k, v in filters.items():
            stmt = stmt.where(cols[k] == (int(v) if k == "patient_id" and v.isdigit() else v))
        return [order_json(o) for o in s.execute(stmt.order_by(Order.id).limit(limit)).scalars()]
    found = await in_read_session(request, run)
    await record_read(request, "search", "Order", 200, found, sorted({o["patient_id"] for o in found}))
    return web.json_response({"orders": found})


@routes.get("/messages")
@requires(Role.READ)
async def messages(request: web.Request) -> web.Response:
    """Newest first; the filters of docs/api.md (the console's /messages uses the same query)."""
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
    if body is None:
        raise web.HTTPNotFound(text='{"error": "no such message"}', content_type="application/json")
    return web.json_response(body)


@routes.post(r"/messages/{id:\d+}/reprocess")
@requires(Role.OPERATE)
async def reprocess(request: web.Request) -> web.Response:
    mid = int(request.match_info["id"])
    try:
        result = await request.config_dict[ENGINE].reprocess(mid, actor_of(request))
    except LookupError as exc:
        await record_failure(request, AuditAction.REPROCESS, Subject("Message", message_id=mid), 404)
        raise web.HTTPNotFound(text=json.dumps({"error": str(exc)}), content_type="application/json") from None
    except ValueError as exc:
        subject = await request.config_dict[WRITER].run(lambda s: message_subject(s.connection(), mid))
        await record_failure(request, AuditAction.REPROCESS, subject, 409)
        return web.json_response({"error": "cannot reprocess", "detail": str(exc)}, status=409)
    return web.json_response(result)


@routes.get("/studies")
@requires(Role.READ)
async def studies(request: web.Request) -> web.Response:
    q = request.query
    filters = {k: q[k] for k in ("accession", "study_uid", "patient_id", "state", "reconciliation") if k in q}
    exceptions = q.get("exceptions", "").lower() in ("1", "true", "yes")
    if not filters and not exceptions:
        raise _bad("give accession=, study_uid=, patient_id= (as in the headers), state=, reconciliation= "
                   "or exceptions=true")
    limit = _limit(request)

    def run(s: Session) -> list[dict[str, Any]]:
        stmt = select(Study).options(selectinload(Study.series), selectinload(Study.findings))
        cols = {"accession": Study.accession, "study_uid": Study.study_uid, "patient_id": Study.dicom_patient_id,
                "state": Study.state, "reconciliation": Study.recon_state}
        for k, v in filters.items():
            stmt = stmt.where(cols[k] == v)
        if exceptions:
            stmt = stmt.where(Study.recon_state.in_(EXCEPTION_STATES))
        found = list(s.execute(stmt.order_by(Study.id).limit(limit)).scalars())
        events: dict[int, list[DomainEvent]] = {st.id: [] for st in found}
        jobs: dict[int, ReconcileJob] = {}
        if found:
            for e in s.execute(select(DomainEvent).where(DomainEvent.study_id.in_(list(events)))
                               .order_by(DomainEvent.id)).scalars():
                events[e.study_id].append(e)  # type: ignore[index]
            jobs = {j.study_id: j for j in s.execute(select(ReconcileJob).where(
                ReconcileJob.study_id.in_(list(events)))).scalars()}
        return [study_json(st, events=events[st.id], findings=True, job=jobs.get(st.id)) for st in found]
    listed = await in_read_session(request, run)
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
    ref = request.match_info["ref"]
    by = actor_of(request).name

    def about(c: Any, _: Any) -> Subject:
        found = study_subject(c, ref)
        found.detail = f"accession {accession}" if accession else f"patient {patient}"
        return found
    out = await _write(request, AuditAction.MATCH, lambda c: manual.match(c, ref, accession=accession, patient=patient,
                                                                         by=by, note=data.get("note")), about)
    return web.json_response(out, status=202)


@routes.delete("/studies/{ref}/match")
@requires(Role.OPERATE)
async def study_unmatch(request: web.Request) -> web.Response:
    ref = request.match_info["ref"]
    by = actor_of(request).name
    return web.json_response(await _write(request, AuditAction.UNMATCH, lambda c: manual.clear_match(c, ref, by=by),
                                          lambda c, _: study_subject(c, ref)), status=202)


@routes.post("/studies/{ref}/reconcile")
@requires(Role.OPERATE)
async def study_reconcile(request: web.Request) -> web.Response:
    ref = request.match_info["ref"]
    by = actor_of(request).name
    return web.json_response(await _write(request, AuditAction.RECONCILE, lambda c: manual.request(c, ref, by=by),
                                          lambda c, _: study_subject(c, ref)), status=202)


@routes.post(r"/findings/{id:\d+}/accept")
@requires(Role.OPERATE)
async def finding_accept(request: web.Request) -> web.Response:
    data = await _body(request)
    fid = int(request.match_info["id"])
    by = actor_of(request).name
    await _write(request, AuditAction.ACCEPT, lambda c: manual.accept_finding(c, fid, by=by, note=data.get("note")),
                 lambda c, _: finding_subject(c, fid), status=200)
    return web.json_response({"finding": fid, "status": "accepted"})


@routes.get("/channels")
@requires(Role.READ)
async def channels(request: web.Request) -> web.Response:
    return web.json_response({"channels": request.config_dict[ENGINE].channel_status()})


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
