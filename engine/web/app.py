"""The HTTP root app: /health (open), /metrics (role metrics), the console at / (engine/web/console),
and the /api/, /fhir/ and /dicomweb/ sub-apps.
Every route declares its role (engine/web/auth.py); /health and /fhir/metadata are public (a FHIR
client reads the CapabilityStatement to learn how to authenticate)."""

from __future__ import annotations

from aiohttp import web

from engine.errors import RadBridgeError
from engine.store.tokens import Role
from engine.web.api import api_app
from engine.web.auth import auth_middleware
from engine.web.console import setup_console
from engine.web.dicomweb import dicomweb_app
from engine.web.fhir import fhir_app
from engine.web.health import health_report
from engine.web.keys import METRICS, EngineServices, provide
from engine.web.roles import public, requires, undeclared_routes
from engine.web.stow import with_stow

routes = web.RouteTableDef()


@routes.get("/health")
@public
async def health(request: web.Request) -> web.Response:
    ok, checks = await health_report(request)
    body = {"status": "ok" if ok else "unavailable", "live": True, "ready": ok, "checks": checks}
    return web.json_response(body, status=200 if ok else 503)


@routes.get("/metrics")
@requires(Role.METRICS)
async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[METRICS].render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def build_app(engine: EngineServices) -> web.Application:
    """The whole HTTP application; ``engine`` is only handed to ``provide``, handlers read the keys."""
    app = web.Application(middlewares=[auth_middleware], client_max_size=8 * 1024 * 1024)
    provide(app, engine)
    app.add_routes(routes)
    setup_console(app)
    app.add_subapp("/api/", api_app())
    app.add_subapp("/fhir/", fhir_app())
    app.add_subapp("/dicomweb/", with_stow(dicomweb_app()))
    if missing := undeclared_routes(app):
        raise RouteWithoutRole(missing)
    return app


class RouteWithoutRole(RadBridgeError):
    """A route was added without @requires(Role...) or @public (engine/web/auth.py)."""

    def __init__(self, routes: list[str]) -> None:
        super().__init__("routes without a declared role: " + "; ".join(routes))
