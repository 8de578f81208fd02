"""The HTTP root app: /health (open), /metrics, and the token-protected /api/ and /fhir/ sub-apps
(/fhir/metadata is open: a client reads it to learn how to authenticate)."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web
from sqlalchemy import text

from engine.web.api import api_app
from engine.web.audit import AGENT, fingerprint
from engine.web.fhir import FHIR_JSON, fhir_app
from engine.web.keys import ENGINE, METRICS, SETTINGS, WRITER, EngineServices, provide
from engine.web.reads import on_reader

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROTECTED = ("/api/", "/fhir/")
OPEN = ("/fhir/metadata",)

routes = web.RouteTableDef()


@web.middleware
async def token_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    protected = request.path.startswith(PROTECTED) or request.path in ("/api", "/fhir")
    enabled = request.config_dict[SETTINGS].http.auth == "token"
    if not enabled or not protected or request.path in OPEN:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() == "bearer" and given:
        for t in request.config_dict[ENGINE].api_tokens():
            if hmac.compare_digest(t.encode(), given.strip().encode()):
                request[AGENT] = fingerprint(t)  # who, in the audit trail
                return await handler(request)
    if request.path.startswith("/fhir"):
        from engine.fhir.outcome import FhirError
        body = FhirError(401, "send Authorization: Bearer <token> (http.tokens in the engine's config)",
                         "login").outcome()
        return web.json_response(body, status=401, content_type=FHIR_JSON,
                                 headers={"WWW-Authenticate": 'Bearer realm="radbridge"'})
    return web.json_response(
        {"error": "unauthorized", "detail": "send Authorization: Bearer <token> (see http.tokens in the config, "
                                            "RADBRIDGE_API_TOKEN, or <storage dir>/api-token)"},
        status=401, headers={"WWW-Authenticate": 'Bearer realm="radbridge"'})


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    control = request.app[ENGINE]
    checks: dict[str, object] = {}
    ok = True
    try:
        await asyncio.wait_for(on_reader(request, lambda conn: conn.execute(text("SELECT 1"))), 5)
        checks["database"] = "ok"
    except Exception as exc:
        ok = False
        checks["database"] = f"unavailable: {type(exc).__name__}"
    channels_ok, listeners = control.health()
    ok = ok and channels_ok
    checks["channels"] = listeners
    storage = control.storage
    if storage is not None:
        free = storage.free_bytes()
        floor = control.storage_floor_mb()
        checks["storage_free_mb"] = None if free is None else free // (1024 * 1024)
        if free is not None and free < floor * 1024 * 1024:
            ok = False
            checks["storage"] = f"below the free-space floor of {floor} MB: C-STORE is refused"
    checks["writer_backlog"] = request.app[WRITER].backlog
    body = {"status": "ok" if ok else "unavailable", "live": True, "ready": ok, "checks": checks}
    return web.json_response(body, status=200 if ok else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[METRICS].render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def build_app(engine: EngineServices) -> web.Application:
    """The whole HTTP application; ``engine`` is only handed to ``provide``, handlers read the keys."""
    app = web.Application(middlewares=[token_middleware], client_max_size=8 * 1024 * 1024)
    provide(app, engine)
    app.add_routes(routes)
    app.add_subapp("/api/", api_app())
    app.add_subapp("/fhir/", fhir_app())
    return app
