"""The FHIR R4 REST endpoint at /fhir/ (JSON): a small aiohttp app over engine/fhir/.

    GET  /fhir/metadata                      CapabilityStatement (open, no token: clients discover auth)
    POST /fhir/                              transaction or batch Bundle
    POST /fhir/{type}                        create (If-None-Exist: conditional create)
    PUT  /fhir/{type}/{id}                   update (If-Match: version check)
    PUT  /fhir/{type}?identifier=...         conditional update
    GET  /fhir/{type}/{id}[/_history/{vid}]  read (vread of the current version)
    GET  /fhir/{type}?...  POST /fhir/{type}/_search    search

Writes go through the ingest writer (stored raw and applied in one transaction, answered after the
commit); reads run on the reader pool and are recorded in the audit trail before they are answered.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

from aiohttp import web
from sqlalchemy import Connection

from engine.channels import FHIR_ROUTE_RESOURCES, FhirOptions
from engine.errors import report_failure
from engine.fhir.outcome import FhirError, issue, operation_outcome
from engine.fhir.validate import check_resource, local_id, parse_json
from engine.outbound.context import EngineInfo
from engine.outbound.mapping import OutboundMapping
from engine.pipeline import fhir_search as search
from engine.pipeline.fhir_inbound import Done, FhirInbound, Interaction, Stored
from engine.pipeline.stage import ingest
from engine.pipeline.writer import StorageUnavailable
from engine.store.tokens import Role
from engine.web import fhir_views as views
from engine.web.audit import agent_of, record_read
from engine.web.fhir_capability import capability_statement
from engine.web.inputs import BodyError, nul_parameter, read_body
from engine.web.keys import FHIR_INBOUND, MAPPINGS, METRICS, PRINCIPAL, SETTINGS, WRITER
from engine.web.reads import on_reader
from engine.web.roles import public, requires

log = logging.getLogger(__name__)
REQUEST_ID = web.RequestKey("radbridge_request_id", str)  # kept as the message's control_id, echoed back
FHIR_JSON = "application/fhir+json"
WRITABLE = FHIR_ROUTE_RESOURCES  # what a fhir channel's routes can take
READABLE = tuple(search.SEARCH_PARAMS)  # what can be read and searched
REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           409: "Conflict", 412: "Precondition Failed", 413: "Payload Too Large", 422: "Unprocessable Entity",
           500: "Internal Server Error", 503: "Service Unavailable"}

routes = web.RouteTableDef()


def fhir_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":")).encode(), status=status,
                        content_type=FHIR_JSON, charset="utf-8", headers=headers)


def error_response(err: FhirError) -> web.Response:
    return fhir_response(err.outcome(), err.status)


@web.middleware
async def outcome_middleware(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every refusal is an OperationOutcome, including aiohttp's own (404 route, 405 method)."""
    try:
        if (name := nul_parameter(request)) is not None:
            raise FhirError(400, f"{name} contains a NUL character", "value")
        return await handler(request)
    except FhirError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(FhirError(exc.status, f"{request.method} {request.path}: {exc.reason}"))
    except StorageUnavailable as exc:
        return error_response(FhirError(503, f"{exc}; nothing was stored, send it again", "transient"))
    except Exception as exc:  # a bug must still answer in FHIR, and never take the listener down
        reason = report_failure(log, exc, "FHIR %s %s failed", request.method, request.path)
        return error_response(FhirError(500, f"internal error ({reason}); the engine's log has the detail",
                                        "exception"))


def _inbound(request: web.Request) -> FhirInbound:
    fi = request.config_dict[FHIR_INBOUND]
    if fi is None:
        raise FhirError(405, "no channel with connector type fhir is enabled (channels/fhir-inbound.yaml): "
                             "this server only answers reads", "not-supported")
    return fi


def _options(request: web.Request) -> FhirOptions | None:
    fi = request.config_dict[FHIR_INBOUND]
    return fi.channel.fhir if fi is not None else None


def _base(request: web.Request) -> str:
    return f"{request.url.origin()}/fhir"


async def _body_of(request: web.Request) -> bytes:
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype not in (FHIR_JSON, "application/json", "application/json+fhir"):
        raise FhirError(415, f"Content-Type {ctype or '(none)'} is not supported: send {FHIR_JSON}",
                        "not-supported")
    try:
        return await read_body(request, _inbound(request).channel.fhir.max_body_bytes,
                               "options.max_body_bytes of the fhir channel")
    except BodyError as exc:
        raise FhirError(exc.status, exc.detail, "too-costly" if exc.status == 413 else "timeout") from None


async def _write(request: web.Request, raw: bytes, kind: str, interactions: list[Interaction],
                 mode: str = "single") -> Stored:
    fi = _inbound(request)
    remote = request.remote
    request_id = request.headers.get("X-Request-ID") or str(uuid.uuid4())
    request[REQUEST_ID] = request_id
    agent = agent_of(request)
    metrics = request.config_dict[METRICS]
    t0 = time.perf_counter()
    prepared = fi.prepare(raw, kind, interactions, mode=mode, remote=remote, request_id=request_id, agent=agent)
    stored: Stored = await ingest(request.config_dict[WRITER], fi, prepared)
    metrics.fhir_latency.observe(time.perf_counter() - t0, kind=kind)
    failed = stored.error is not None or any(isinstance(r, FhirError) for r in stored.results)
    metrics.fhir_requests.inc(kind=kind, outcome="error" if failed else "ok")
    return stored


async def _read_resources(request: web.Request, rtype: str, ids: list[int]) -> dict[int, dict[str, Any]]:
    opts = _options(request)
    mapping_name = opts.imagingstudy_mapping if opts else "fhir-imagingstudy"
    mappings = request.config_dict[MAPPINGS]
    mapping = mappings.get_as(mapping_name, OutboundMapping) if rtype == "ImagingStudy" else None
    if rtype == "ImagingStudy" and mapping is None:
        raise FhirError(500, f"the ImagingStudy mapping {mapping_name!r} is not loaded (see radbridge check)",
                        "exception")
    info = EngineInfo.of(request.config_dict[SETTINGS])

    def run(conn: Connection) -> dict[int, dict[str, Any]]:
        if rtype == "Patient":
            return views.patients(conn, ids)
        if rtype == "ServiceRequest":
            return views.service_requests(conn, ids)
        assert mapping is not None
        return views.imaging_studies(conn, ids, mapping, info)
    return await on_reader(request, run)


def _entry_headers(done: Done) -> dict[str, str]:
    headers = {"ETag": f'W/"{done.version}"', "Location": f"{done.location}"}
    if done.last_updated is not None:
        headers["Last-Modified"] = http_date(done.last_updated)
    return headers


async def _answer_write(request: web.Request, stored: Stored) -> web.Response:
    if stored.error is not None:
        return error_response(stored.error)
    result = stored.results[0]
    if isinstance(result, FhirError):
        return error_response(result)
    headers = _entry_headers(result)
    headers["Location"] = f"{_base(request)}/{result.location}"
    if request.get(REQUEST_ID):
        headers["X-Request-ID"] = request[REQUEST_ID]
    prefer = request.headers.get("Prefer", "")
    if "return=minimal" in prefer:
        return web.Response(status=result.status, headers=headers)
    principal = request.get(PRINCIPAL)
    if "return=OperationOutcome" in prefer or (principal is not None and not principal.may(Role.READ)):
        # a token with fhir-write but not read gets no patient data back (a conditional create's match)
        return fhir_response(_notes_outcome(result), result.status, headers)
    res = (await _read_resources(request, result.resource_type, [result.id])).get(result.id)
    if res is not None:  # what comes back is patient data too (a conditional create's match)
        await record_read(request, "read", result.resource_type, result.status, [res])
    return fhir_response(res or _notes_outcome(result), result.status, headers)


# --- routes, in the order the router tries them (more specific paths first) -------------------------------
@routes.get("/metadata")
@public
async def metadata(request: web.Request) -> web.Response:
    return fhir_response(capability_statement(request.config_dict[SETTINGS], request.config_dict[FHIR_INBOUND],
                                              _base(request)))


# --- writes ------------------------------------------------------------------------------------------------
# Stacked route decorators register bottom-up: "/" is registered before "".
@routes.post("")
@routes.post("/")
@requires(Role.FHIR_WRITE)
async def bundle(request: web.Request) -> web.Response:
    raw = await _body_of(request)
    data = parse_json(raw)
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        got = data.get("resourceType") if isinstance(data, dict) else type(data).__name__
        raise FhirError(400, f"POST /fhir/ takes a Bundle (transaction or batch), got {got!r}", "structure",
                        "resourceType")
    btype = data.get("type")
    if btype not in ("transaction", "batch"):
        raise FhirError(400, f"Bundle.type is {btype!r}: this endpoint processes transaction and batch "
                             "Bundles", "not-supported", "Bundle.type")
    entries = data.get("entry") or []
    limit = _inbound(request).channel.fhir.max_bundle_entries
    if not isinstance(entries, list):
        raise FhirError(400, "Bundle.entry must be a list", "structure", "Bundle.entry")
    if len(entries) > limit:
        raise FhirError(413, f"the Bundle has {len(entries)} entries; at most {limit} are taken at once "
                             "(options.max_bundle_entries of the fhir channel)", "too-costly", "Bundle.entry")
    if data.keys() - {"resourceType", "type", "entry"}:  # else resourceType and type, checked above, are all
        check_resource({k: v for k, v in data.items() if k != "entry"}, "Bundle")
    interactions: list[Interaction | FhirError] = [_entry(i, e) for i, e in enumerate(entries)]
    first_with: dict[str, int] = {}
    for i, e in enumerate(entries):
        url = e.get("fullUrl") if isinstance(e, dict) else None
        if isinstance(url, str) and url:
            if url in first_with:  # bdl-7: a reference to it would be ambiguous
                raise FhirError(400, f"Bundle.entry[{i}].fullUrl {url} repeats Bundle.entry[{first_with[url]}]'s: "
                                     "each entry needs its own", "invalid", f"Bundle.entry[{i}].fullUrl")
            first_with[url] = i
    errors = [x for x in interactions if isinstance(x, FhirError)]
    if btype == "transaction" and errors:
        raise errors[0] if len(errors) == 1 else FhirError(
            errors[0].status, errors[0].diagnostics, more=[i for e in errors[1:] for i in e.issues])
    good = [x for x in interactions if isinstance(x, Interaction)]
    stored = await _write(request, raw, f"Bundle^{btype}", good, mode=btype)
    if stored.error is not None:
        return error_response(stored.error)
    results = iter(stored.results)
    base = _base(request)
    out_entries = []
    for x in interactions:
        r: Done | FhirError = x if isinstance(x, FhirError) else next(results)
        out_entries.append(_response_entry(r, base))
    return fhir_response({"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": f"{btype}-response",
                          "link": [{"relation": "self", "url": base}], "entry": out_entries})


@routes.post("/{type}/_search")
@requires(Role.READ)
async def search_post(request: web.Request) -> web.Response:
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
    if ctype != "application/x-www-form-urlencoded":
        raise FhirError(415, "POST _search takes application/x-www-form-urlencoded parameters", "not-supported")
    try:
        raw = await read_body(request, request.client_max_size, "the HTTP server's request size limit")
    except BodyError as exc:
        raise FhirError(exc.status, exc.detail, "too-costly" if exc.status == 413 else "timeout") from None
    form = raw.decode("utf-8", "replace")
    params = list(parse_qsl(request.query_string, keep_blank_values=True)) + \
        list(parse_qsl(form, keep_blank_values=True))
    return await _search(request, params)


@routes.post("/{type}")
@requires(Role.FHIR_WRITE)
async def create(request: web.Request) -> web.Response:
    rtype = _writable(request.match_info["type"], "POST")
    raw = await _body_of(request)
    resource = check_resource(parse_json(raw), rtype)
    it = Interaction("POST", rtype, resource, condition=request.headers.get("If-None-Exist") or None)
    return await _answer_write(request, await _write(request, raw, rtype, [it]))


@routes.put("/{type}/{id}")
@requires(Role.FHIR_WRITE)
async def update(request: web.Request) -> web.Response:
    rtype = _writable(request.match_info["type"], "PUT")
    raw = await _body_of(request)
    resource = check_resource(parse_json(raw), rtype)
    it = Interaction("PUT", rtype, resource, id=request.match_info["id"],
                     if_match=request.headers.get("If-Match"))
    return await _answer_write(request, await _write(request, raw, rtype, [it]))


@routes.put("/{type}")
@requires(Role.FHIR_WRITE)
async def conditional_update(request: web.Request) -> web.Response:
    rtype = _writable(request.match_info["type"], "PUT")
    if not request.query_string:
        raise FhirError(405, f"PUT {rtype} needs an id (PUT {rtype}/ID) or a condition "
                             f"(PUT {rtype}?identifier=system|value)", "not-supported")
    raw = await _body_of(request)
    resource = check_resource(parse_json(raw), rtype)
    it = Interaction("PUT", rtype, resource, condition=request.query_string)
    return await _answer_write(request, await _write(request, raw, rtype, [it]))


# --- reads -------------------------------------------------------------------------------------------------
# Stacked route decorators register bottom-up: the _history path is registered first.
@routes.get("/{type}/{id}")
@routes.get("/{type}/{id}/_history/{vid}")
@requires(Role.READ)
async def read(request: web.Request) -> web.Response:
    rtype = _readable(request.match_info["type"])
    rid = request.match_info["id"]
    vid = request.match_info.get("vid")
    local = local_id(rid)
    found = (await _read_resources(request, rtype, [local])).get(local) if local is not None else None
    status = 200 if found is not None else 404
    if found is not None and vid is not None and vid != views.version_of(found):
        status, found = 404, None
    await record_read(request, "vread" if vid else "read", rtype, status, [found] if found else [])
    if found is None:
        why = f"{rtype}/{rid} is not known here"
        if vid is not None:
            why = f"{rtype}/{rid} version {vid} is not available (only the current version is kept)"
        elif rtype == "ImagingStudy":
            why += " (a study becomes an ImagingStudy once it is placed with a patient)"
        raise FhirError(404, why, "not-found")
    headers = {"ETag": f'W/"{views.version_of(found)}"'}
    updated = found.get("meta", {}).get("lastUpdated")
    if updated:
        headers["Last-Modified"] = http_date(datetime.fromisoformat(str(updated).replace("Z", "+00:00")))
    return fhir_response(found, headers=headers)


async def _search(request: web.Request, params: list[tuple[str, str]]) -> web.Response:
    rtype = _readable(request.match_info["type"])
    opts = _options(request)
    fi = request.config_dict[FHIR_INBOUND]
    q = search.parse(rtype, params, issuers=fi.issuers if fi else search.plain_issuers,
                     default_count=opts.default_page_size if opts else 50,
                     max_count=opts.max_page_size if opts else 500)
    ids, total = await on_reader(request, lambda conn: search.run(conn, q))
    found = await _read_resources(request, rtype, ids)
    resources = [found[i] for i in ids if i in found]
    await record_read(request, "search", rtype, 200, resources)
    b = _base(request)
    kept = [(k, v) for k, v in params if k not in ("_offset",)]
    links = [{"relation": "self", "url": f"{b}/{rtype}?{urlencode(params)}"}]
    if q.count and len(ids) == q.count and (total is None or q.offset + q.count < total):
        links.append({"relation": "next", "url": f"{b}/{rtype}?{urlencode([*kept, ('_offset', q.offset + q.count)])}"})
    if q.offset > 0:
        links.append({"relation": "previous",
                      "url": f"{b}/{rtype}?{urlencode([*kept, ('_offset', max(0, q.offset - q.count))])}"})
    body: dict[str, Any] = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "searchset",
                            "link": links,
                            "entry": [{"fullUrl": f"{b}/{rtype}/{r['id']}", "resource": r,
                                       "search": {"mode": "match"}} for r in resources]}
    if total is not None:
        body["total"] = total
    return fhir_response(body)


@routes.get("/{type}")
@requires(Role.READ)
async def search_get(request: web.Request) -> web.Response:
    return await _search(request, list(parse_qsl(request.query_string, keep_blank_values=True)))


# Stacked route decorators register bottom-up: DELETE, then PATCH.
@routes.route("PATCH", "/{tail:.*}")
@routes.route("DELETE", "/{tail:.*}")
@requires(Role.FHIR_WRITE)
async def not_allowed(request: web.Request) -> web.Response:
    raise FhirError(405, f"{request.method} is not supported here (no deletes, patches or history: "
                         "see GET /fhir/metadata)", "not-supported")


def fhir_app() -> web.Application:
    """/fhir/: the services come from the root app's keys (request.config_dict)."""
    app = web.Application(middlewares=[outcome_middleware])
    app.add_routes(routes)
    return app


def http_date(dt: datetime) -> str:
    return format_datetime((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).astimezone(UTC), usegmt=True)


def _writable(rtype: str, method: str) -> str:
    if rtype in WRITABLE:
        return rtype
    if rtype in READABLE:
        raise FhirError(405, f"{rtype} is read-only here: it is built from the DICOM images the engine received",
                        "not-supported")
    raise FhirError(404, f"{rtype!r} is not a resource type this server supports for {method} "
                         f"({', '.join(WRITABLE)})", "not-supported")


def _readable(rtype: str) -> str:
    if rtype not in READABLE:
        raise FhirError(404, f"{rtype!r} is not a resource type this server serves ({', '.join(READABLE)})",
                        "not-supported")
    return rtype


def _entry(index: int, entry: Any) -> Interaction | FhirError:
    """A Bundle entry as an interaction, or the reason it cannot be one."""
    where = f"Bundle.entry[{index}]"
    try:
        if not isinstance(entry, dict):
            raise FhirError(400, "an entry must be an object", "structure", where)
        req = entry.get("request")
        if not isinstance(req, dict) or not req.get("method") or not req.get("url"):
            raise FhirError(400, "entry.request with method and url is required in a transaction or batch",
                            "required", f"{where}.request")
        method, url = str(req["method"]).upper(), str(req["url"]).lstrip("/")
        path, _, query = url.partition("?")
        parts = path.split("/")
        if method not in ("POST", "PUT"):
            raise FhirError(405, f"entry.request.method {method} is not supported in a Bundle (POST, PUT)",
                            "not-supported", f"{where}.request.method")
        rtype = _writable(parts[0], method)
        resource = check_resource(entry.get("resource"), rtype, f"{where}.resource: ")
        full_url = entry.get("fullUrl")
        if method == "POST":
            if len(parts) != 1 or query:
                raise FhirError(400, f"POST url must be the type ({rtype}), got {url!r}", "invalid",
                                f"{where}.request.url")
            return Interaction("POST", rtype, resource, condition=req.get("ifNoneExist") or None,
                               full_url=full_url, where=f"{where}: ")
        if len(parts) == 2 and not query:
            return Interaction("PUT", rtype, resource, id=parts[1], if_match=req.get("ifMatch"), full_url=full_url,
                               where=f"{where}: ")
        if len(parts) == 1 and query:
            return Interaction("PUT", rtype, resource, condition=query, full_url=full_url, where=f"{where}: ")
        raise FhirError(400, f"PUT url must be {rtype}/ID or {rtype}?search, got {url!r}", "invalid",
                        f"{where}.request.url")
    except FhirError as err:
        if not err.issues[0]["diagnostics"].startswith(where):
            err.issues[0]["diagnostics"] = f"{where}: {err.issues[0]['diagnostics']}"
        return err


def _response_entry(r: Done | FhirError, base: str) -> dict[str, Any]:
    if isinstance(r, FhirError):
        return {"response": {"status": f"{r.status} {REASONS.get(r.status, '')}".strip(), "outcome": r.outcome()}}
    resp: dict[str, Any] = {"status": f"{r.status} {REASONS[r.status]}", "location": r.location,
                            "etag": f'W/"{r.version}"'}
    if r.last_updated is not None:
        resp["lastModified"] = views.instant(r.last_updated)
    if r.notes:
        resp["outcome"] = _notes_outcome(r)
    return {"fullUrl": f"{base}/{r.resource_type}/{r.id}", "response": resp}


def _notes_outcome(r: Done) -> dict[str, Any]:
    return operation_outcome(*(issue(n, "informational", "information") for n in r.notes))


__all__ = ["fhir_app", "FHIR_JSON"]
