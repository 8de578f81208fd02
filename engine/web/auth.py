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

The console (engine/web/console) logs a person in with a token and then keeps a session cookie
(engine/store/sessions.py): a request without ``Authorization`` is checked against it, and a change
(POST, PUT, PATCH, DELETE) made with the cookie must carry the session's CSRF secret. Console pages
get refusals a person can read: a redirect to the login form, or a 403 page naming the role.
"""

from __future__ import annotations

import hmac
import html
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from urllib.parse import quote

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from engine.fhir.outcome import FhirError
from engine.pipeline.writer import StorageUnavailable
from engine.store import tokens
from engine.store.sessions import OpenSession, find_session
from engine.store.tokens import ALL_ROLES, Principal, Role
from engine.store.types import utcnow
from engine.web.audit import AGENT
from engine.web.fhir import FHIR_JSON
from engine.web.keys import CONSOLE_CSRF, ENGINE, PRINCIPAL, SESSION, SETTINGS, WRITER
from engine.web.reads import on_reader
from engine.web.roles import Public, declared

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ANONYMOUS = Principal("anonymous", ALL_ROLES)  # http.auth = "none": local use only
SESSION_COOKIE = "radbridge_session"  # the console's login (engine/store/sessions.py)
CSRF_FIELD = "csrf"  # the hidden field of every console form
CSRF_HEADER = "X-CSRF-Token"  # what the console's scripts send instead
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MACHINE_PREFIXES = ("/api", "/fhir", "/dicomweb", "/metrics", "/health")
CSRF_REFUSAL = ("this form is stale or did not come from the console (its CSRF field does not match your "
                "session): reload the page and try again")


def _refusal(request: web.Request, status: int, detail: str, code: str, **extra: str) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="radbridge"'} if status == 401 else None
    error = {401: "unauthorized", 403: "forbidden"}.get(status, "unavailable")
    if request.path == "/fhir" or request.path.startswith("/fhir/"):
        return web.json_response(FhirError(status, detail, code).outcome(), status=status, content_type=FHIR_JSON,
                                 headers=headers)
    return web.json_response({"error": error, "detail": detail, **extra},
                             status=status, headers=headers)


async def authenticate(request: web.Request, given: str) -> Principal | None:
    """The principal whose token ``given`` is, or None."""
    return await principal_of_digest(request, tokens.digest_of(given))


async def principal_of_digest(request: web.Request, wanted: bytes) -> Principal | None:
    """The principal whose token's SHA-256 is ``wanted``, or None. Configured tokens first (no
    database needed, so /metrics with one keeps working while the database is down), then the named
    ones (a revoked one is not found: its console sessions end with it)."""
    found = tokens.find_digest(wanted, request.config_dict[ENGINE].configured_tokens())
    if found is not None:
        return found
    rows = await on_reader(request, tokens.active)
    found = tokens.find_digest(wanted, [(t.principal, t.digest) for t in rows])
    if found is None:
        return None
    row = next(t for t in rows if t.principal == found)
    if row.last_used_at is None or utcnow() - row.last_used_at > timedelta(seconds=tokens.LAST_USED_STEP_SECONDS):
        try:
            await request.config_dict[WRITER].run(lambda s: tokens.touch(s.connection(), row.id))
        except (SQLAlchemyError, StorageUnavailable) as exc:  # the last use is a hint: never refuse for it
            log.warning("token %s: last use not recorded (%s)", found.name, type(exc).__name__)
    return found


def is_console_path(path: str) -> bool:
    """Whether ``path`` is a console page (HTML: a refusal is a redirect to the login form or a page),
    rather than /api/, /fhir/, /dicomweb/, /metrics or /health (JSON or text)."""
    return not any(path == p or path.startswith(p + "/") for p in MACHINE_PREFIXES)


async def session_principal(request: web.Request) -> tuple[OpenSession, Principal] | None:
    """The console session of the request's cookie and who it is, when both are still valid."""
    secret = request.cookies.get(SESSION_COOKIE)
    if not secret:
        return None
    found = await on_reader(request, lambda conn: find_session(conn, secret))
    if found is None:
        return None
    principal = await principal_of_digest(request, found.token_digest)
    return (found, principal) if principal is not None else None


async def csrf_given(request: web.Request) -> str:
    """The CSRF secret a request carries: the X-CSRF-Token header, or the form's ``csrf`` field."""
    if header := request.headers.get(CSRF_HEADER):
        return header
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        value = (await request.post()).get(CSRF_FIELD)
        return value if isinstance(value, str) else ""
    return ""


def _html_refusal(request: web.Request, status: int, detail: str) -> web.Response:
    if status == 401:
        raise web.HTTPSeeOther(f"/login?next={quote(request.path_qs, safe='')}")
    body = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{status}</title>"
            f"<link rel=stylesheet href=/static/console.css></head><body><main class=refusal>"
            f"<h1>{status} {'Forbidden' if status == 403 else 'Unavailable'}</h1><p>{html.escape(detail)}</p>"
            f"<p><a href=/>Back to the overview</a></p></main></body></html>")
    return web.Response(status=status, text=body, content_type="text/html")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    match = request.match_info
    page = is_console_path(request.path)
    need: Role | Public | None = None
    if match.http_exception is None:  # a route matched (else: its 404 or 405, to an authenticated caller)
        need = declared(match.handler)
        if need is None:  # build_app refuses such an app; never serve one
            return _refusal(request, 403, f"{request.method} {request.path} declares no role", "forbidden")
        if isinstance(need, Public):
            return await handler(request)
    refuse = (lambda status, detail, code, **extra: _html_refusal(request, status, detail)) if page else \
        (lambda status, detail, code, **extra: _refusal(request, status, detail, code, **extra))
    if request.config_dict[SETTINGS].http.auth != "token":
        request[PRINCIPAL] = ANONYMOUS
        if page and request.method not in SAFE_METHODS and \
                not hmac.compare_digest(await csrf_given(request), request.config_dict[CONSOLE_CSRF]):
            return refuse(403, CSRF_REFUSAL, "forbidden")
        return await handler(request)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    try:
        if scheme.lower() == "bearer" and given.strip():
            principal = await authenticate(request, given.strip())
        elif (opened := await session_principal(request)) is not None:
            session, principal = opened
            request[SESSION] = session
            # a cookie is sent by the browser on its own: a change needs the session's CSRF secret too
            if request.method not in SAFE_METHODS and not hmac.compare_digest(await csrf_given(request), session.csrf):
                return refuse(403, CSRF_REFUSAL, "forbidden")
        else:
            principal = None
    except SQLAlchemyError:  # named tokens live in the database; configured ones were checked before it
        return refuse(503, "the token cannot be checked now (database unavailable); send it again", "transient")
    if principal is None:
        return refuse(401, "send Authorization: Bearer <token> (radbridge tokens create; or http.tokens "
                           "in the config, RADBRIDGE_API_TOKEN, or <storage dir>/api-token)", "login")
    request[PRINCIPAL] = principal
    request[AGENT] = principal.name  # who, in the audit trail
    if isinstance(need, Role) and not principal.may(need):
        return refuse(403, f"the token {principal.name!r} lacks the role {need.value!r}, which "
                           f"{request.method} {request.path} needs", "forbidden", missing_role=need.value)
    return await handler(request)
