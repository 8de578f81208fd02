"""Who is asking, and may they: bearer tokens and the role each route declares.

Every handler declares the role it needs, next to its route::

    @routes.post(r"/deliveries/{id:\\d+}/retry")
    @requires(Role.OPERATE)
    async def retry_one(request: web.Request) -> web.Response: ...

or ``@public`` (no token: /health, /fhir/metadata). ``build_app`` refuses to build an application
with a route that declares neither (``roles.undeclared_routes``), and the middleware refuses such a route
too, so a route cannot be added without a role.

With ``[http] auth = "token"`` every other request needs ``Authorization: Bearer <token>``: a
named token (``radbridge tokens create``, checked against the store on each request, so a revoked
token is refused at once), a configured one (``[http] tokens``, ``RADBRIDGE_API_TOKEN``) or the
generated ``<storage dir>/api-token`` (those hold every role). No or an unknown token: 401. A
token without the route's role: 403 naming the role (an OperationOutcome under /fhir/, a JSON
error elsewhere). The request then carries ``PRINCIPAL`` (name and roles) and the audit trail's
``AGENT`` (the token's name).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from engine.fhir.outcome import FhirError
from engine.pipeline.writer import StorageUnavailable
from engine.store import tokens
from engine.store.tokens import ALL_ROLES, Principal, Role
from engine.store.types import utcnow
from engine.web.audit import AGENT
from engine.web.fhir import FHIR_JSON
from engine.web.keys import ENGINE, PRINCIPAL, SETTINGS, WRITER
from engine.web.reads import on_reader
from engine.web.roles import Public, declared

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ANONYMOUS = Principal("anonymous", ALL_ROLES)  # http.auth = "none": local use only


def _refusal(request: web.Request, status: int, detail: str, code: str, **extra: str) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="radbridge"'} if status == 401 else None
    error = {401: "unauthorized", 403: "forbidden"}.get(status, "unavailable")
    if request.path == "/fhir" or request.path.startswith("/fhir/"):
        return web.json_response(FhirError(status, detail, code).outcome(), status=status, content_type=FHIR_JSON,
                                 headers=headers)
    return web.json_response({"error": error, "detail": detail, **extra},
                             status=status, headers=headers)


async def authenticate(request: web.Request, given: str) -> Principal | None:
    """The principal whose token ``given`` is, or None. Configured tokens first (no database needed,
    so /metrics with one keeps working while the database is down), then the named ones."""
    found = tokens.find(given, request.config_dict[ENGINE].configured_tokens())
    if found is not None:
        return found
    rows = await on_reader(request, tokens.active)
    found = tokens.find(given, [(t.principal, t.digest) for t in rows])
    if found is None:
        return None
    row = next(t for t in rows if t.principal == found)
    if row.last_used_at is None or utcnow() - row.last_used_at > timedelta(seconds=tokens.LAST_USED_STEP_SECONDS):
        try:
            await request.config_dict[WRITER].run(lambda s: tokens.touch(s.connection(), row.id))
        except (SQLAlchemyError, StorageUnavailable) as exc:  # the last use is a hint: never refuse for it
            log.warning("token %s: last use not recorded (%s)", found.name, type(exc).__name__)
    return found


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    match = request.match_info
    need: Role | Public | None = None
    if match.http_exception is None:  # a route matched (else: its 404 or 405, to an authenticated caller)
        need = declared(match.handler)
        if need is None:  # build_app refuses such an app; never serve one
            return _refusal(request, 403, f"{request.method} {request.path} declares no role", "forbidden")
        if isinstance(need, Public):
            return await handler(request)
    if request.config_dict[SETTINGS].http.auth != "token":
        request[PRINCIPAL] = ANONYMOUS
        return await handler(request)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    try:
        principal = await authenticate(request, given.strip()) if scheme.lower() == "bearer" and given.strip() \
            else None
    except SQLAlchemyError:  # named tokens live in the database; configured ones were checked before it
        return _refusal(request, 503, "the token cannot be checked now (database unavailable); send it again",
                        "transient")
    if principal is None:
        return _refusal(request, 401, "send Authorization: Bearer <token> (radbridge tokens create; or http.tokens "
                                      "in the config, RADBRIDGE_API_TOKEN, or <storage dir>/api-token)", "login")
    request[PRINCIPAL] = principal
    request[AGENT] = principal.name  # who, in the audit trail
    if isinstance(need, Role) and not principal.may(need):
        return _refusal(request, 403, f"the token {principal.name!r} lacks the role {need.value!r}, which "
                                      f"{request.method} {request.path} needs", "forbidden", missing_role=need.value)
    return await handler(request)
