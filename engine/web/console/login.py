"""Logging in to the console with a token, and out again. A login opens a session (a row of
console_sessions, its secret in an HttpOnly, SameSite=Strict cookie); logout ends it. Both are on
the audit trail, and so is a refused login (status 401 or 403)."""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, deque

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from engine.store.audit import Actor, AuditAction, Subject, record_action
from engine.store.sessions import close_session, open_session
from engine.store.tokens import Role, digest_of
from engine.web.audit import cert_subject_of
from engine.web.auth import SESSION_COOKIE, authenticate, session_principal
from engine.web.console.pages import SECURITY_HEADERS, done, render
from engine.web.keys import SETTINGS, WRITER
from engine.web.roles import public

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


class FailedLogins:
    """Failed logins per client address over the last ``window`` seconds. Past ``limit`` the address
    is answered 429 for the rest of the window, without checking the token or writing an audit row:
    a script posting wrong tokens cannot fill the audit trail or keep the writer busy. (Guessing is
    hopeless anyway: a token holds 256 random bits.) At most ``max_addresses`` are remembered."""

    def __init__(self, limit: int = 10, window: float = 60.0, max_addresses: int = 10_000) -> None:
        self.limit, self.window, self.max_addresses = limit, window, max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> deque[float]:
        times = self._failures.get(address) or deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def wait_seconds(self, address: str, now: float) -> float:
        """How long ``address`` must wait before its next attempt is looked at (0: now)."""
        times = self._recent(address, now)
        return times[0] + self.window - now if len(times) >= self.limit else 0.0

    def failed(self, address: str, now: float) -> None:
        times = self._recent(address, now)
        times.append(now)
        self._failures[address] = times
        self._failures.move_to_end(address)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)
        if len(times) == self.limit:
            log.warning("console: %d failed logins from %s within %g s; its logins are refused (429) for a while",
                        self.limit, address, self.window)


FAILED_LOGINS = web.AppKey("console_failed_logins", FailedLogins)


def _next(value: object) -> str:
    """Where to go after logging in: a path of this console only (never another site)."""
    text = value if isinstance(value, str) else ""
    return text if text.startswith("/") and not text.startswith("//") and "\\" not in text else "/"


def _login_form(request: web.Request, *, error: str | None = None, status: int = 200,
                next_path: str = "/") -> web.Response:
    return render(request, "login.html", {"error": error, "next": next_path,
                                          "token_auth": request.config_dict[SETTINGS].http.auth == "token"},
                  status=status)


def _actor(request: web.Request, name: str) -> Actor:
    """Who, for the audit trail: these routes are public, so the token check has not named the agent."""
    return Actor(name, request.remote or None, cert_subject_of(request))


async def _record(request: web.Request, agent: str, action: AuditAction, status: int) -> None:
    actor = _actor(request, agent)
    await request.config_dict[WRITER].run(lambda s: record_action(
        s.connection(), actor, action, Subject("Session", count=0), status=status, query=f"POST {request.path}"))


@routes.get("/login")
@public
async def login_form(request: web.Request) -> web.Response:
    if request.config_dict[SETTINGS].http.auth != "token":
        raise web.HTTPSeeOther("/")
    if await session_principal(request) is not None:
        raise web.HTTPSeeOther(_next(request.query.get("next")))
    return _login_form(request, next_path=_next(request.query.get("next")))


@routes.post("/login")
@public
async def login(request: web.Request) -> web.Response:
    form = await request.post()
    given = form.get("token")
    token = given.strip() if isinstance(given, str) else ""
    next_path = _next(form.get("next"))
    if not token:
        return _login_form(request, error="Enter a token.", status=400, next_path=next_path)
    failures, address = request.app[FAILED_LOGINS], request.remote or "unknown"
    if (wait := failures.wait_seconds(address, time.monotonic())) > 0:
        refused = _login_form(request, error=f"Too many failed logins from your address: try again in "
                                             f"{math.ceil(wait)} s.", status=429, next_path=next_path)
        refused.headers["Retry-After"] = str(math.ceil(wait))
        return refused
    try:
        principal = await authenticate(request, token)
    except SQLAlchemyError:
        return _login_form(request, error="The token cannot be checked now (database unavailable); try again.",
                           status=503, next_path=next_path)
    if principal is None:
        failures.failed(address, time.monotonic())
        await _record(request, "anonymous", AuditAction.LOGIN, 401)
        return _login_form(request, error="That token is not known (or was revoked).", status=401,
                           next_path=next_path)
    if not principal.may(Role.READ):
        await _record(request, principal.name, AuditAction.LOGIN, 403)
        return _login_form(request, error=f"The token {principal.name!r} lacks the role 'read' that the console "
                                          "needs.", status=403, next_path=next_path)
    hours = request.config_dict[SETTINGS].http.console_session_hours
    actor = _actor(request, principal.name)

    def opened(s: Session) -> str:
        conn = s.connection()
        secret = open_session(conn, principal.name, digest_of(token), hours)
        record_action(conn, actor, AuditAction.LOGIN, Subject("Session", count=0), status=303,
                      query=f"POST {request.path}")
        return secret
    secret = await request.config_dict[WRITER].run(opened)
    response = web.HTTPSeeOther(next_path, headers=SECURITY_HEADERS)
    response.set_cookie(SESSION_COOKIE, secret, path="/", httponly=True, samesite="Strict", secure=request.secure,
                        max_age=int(hours * 3600))
    log.info("console: %s logged in from %s", principal.name, request.remote)
    raise response


@routes.post("/logout")
@public  # a stale or foreign session may always be dropped; the CSRF field guards a live one
async def logout(request: web.Request) -> web.Response:
    secret = request.cookies.get(SESSION_COOKIE)
    opened = await session_principal(request)
    if secret and opened is not None:
        session, principal = opened
        form = await request.post()
        if form.get("csrf") != session.csrf:
            raise web.HTTPForbidden(text="this form is stale: reload the page and log out again")
        actor = _actor(request, principal.name)

        def closed(s: Session) -> None:
            conn = s.connection()
            close_session(conn, secret)
            record_action(conn, actor, AuditAction.LOGOUT, Subject("Session", count=0), status=303,
                          query=f"POST {request.path}")
        await request.config_dict[WRITER].run(closed)
    redirect = done(request, "/login", "You are logged out.")
    redirect.del_cookie(SESSION_COOKIE, path="/")
    raise redirect
