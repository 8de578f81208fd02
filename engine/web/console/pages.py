"""What every console page shares: the template environment, ``render`` (the layout's context: who
is logged in, what they may do, the CSRF secret, a notice from the last action), notices, paging,
and the static files."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import quote, unquote

import aiohttp_jinja2
import jinja2
from aiohttp import web

from engine.store.tokens import Principal, Role
from engine.web.keys import CONSOLE_CSRF, PRINCIPAL, SESSION
from engine.web.roles import public

routes = web.RouteTableDef()

NOTICE_COOKIE = "radbridge_notice"  # one line shown once, on the page an action redirects to
NAV = [("/", "Overview"), ("/messages", "Messages"), ("/patients", "Patients"), ("/orders", "Orders"),
       ("/studies", "Studies"), ("/deliveries", "Deliveries"), ("/mappings", "Mappings")]
# No inline script or style: what an attacker manages to put in a page (a patient's name, a field
# of a message) cannot run there.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "object-src 'none'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml", ".png": "image/png",
                ".woff2": "font/woff2", ".ico": "image/x-icon"}
STATIC_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,80}")


@dataclass(frozen=True)
class Can:
    """What the logged-in principal may do, for templates: ``{% if can.operate %}`` shows a button."""

    read: bool
    operate: bool
    admin: bool

    @classmethod
    def of(cls, principal: Principal | None) -> Can:
        def has(r: Role) -> bool:
            return principal is not None and principal.may(r)
        return cls(has(Role.READ), has(Role.OPERATE), has(Role.ADMIN))


def setup_templates(app: web.Application) -> None:
    env = aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader("engine.web.console", "templates"),
                               autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                               undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals["NAV"] = NAV


def csrf_of(request: web.Request) -> str:
    """The CSRF secret this page's forms carry: the session's, or with auth = none the engine's."""
    session = request.get(SESSION)
    return session.csrf if session is not None else request.config_dict[CONSOLE_CSRF]


def section_of(path: str) -> str:
    return next((href for href, _ in reversed(NAV) if href != "/" and (path == href or path.startswith(href + "/"))),
                "/")


def _who(request: web.Request) -> dict[str, Any]:
    """What every template is given about the request: who, what they may do, their forms' CSRF secret."""
    principal = request.get(PRINCIPAL)
    return {"principal": principal, "can": Can.of(principal), "csrf": csrf_of(request) if principal else "",
            "request": request}


def render(request: web.Request, template: str, context: dict[str, Any], *, status: int = 200) -> web.Response:
    """``template`` rendered in the layout, with the security headers; a pending notice is shown once."""
    principal = request.get(PRINCIPAL)
    notice = request.cookies.get(NOTICE_COOKIE)
    base = {**_who(request), "roles": sorted(r.value for r in principal.roles) if principal else [],
            "section": section_of(request.path), "notice": unquote(notice) if notice else None}
    response = aiohttp_jinja2.render_template(template, request, {**base, **context}, status=status)
    response.headers.update(SECURITY_HEADERS)
    if notice:
        response.del_cookie(NOTICE_COOKIE, path="/")
    return response


def fragment(request: web.Request, template: str, context: dict[str, Any]) -> web.Response:
    """A piece of a page (no layout) for the console's live refresh (static/console.js)."""
    response = aiohttp_jinja2.render_template(template, request, {**_who(request), **context})
    response.headers.update(SECURITY_HEADERS)
    return response


def done(request: web.Request, location: str, notice: str) -> web.HTTPSeeOther:
    """The redirect after an action (post/redirect/get), carrying one line to show on arrival."""
    redirect = web.HTTPSeeOther(location if location.startswith("/") and not location.startswith("//") else "/")
    redirect.set_cookie(NOTICE_COOKIE, quote(notice[:300]), path="/", httponly=True, samesite="Strict",
                        secure=request.secure, max_age=60)
    return redirect


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """A whole-number query parameter within [low, high]; ``default`` when absent or not a number."""
    raw = request.query.get(name, "")
    return min(max(int(raw), low), high) if raw.isdigit() else default


@routes.get(r"/static/{name}")
@public
async def static(request: web.Request) -> web.StreamResponse:
    """The console's CSS and scripts: only files of static/, by plain name."""
    name = request.match_info["name"]
    suffix = name[name.rfind("."):] if "." in name else ""
    if not STATIC_NAME.fullmatch(name) or suffix not in STATIC_TYPES:
        raise web.HTTPNotFound()
    item = resources.files("engine.web.console").joinpath("static", name)
    if not item.is_file():
        raise web.HTTPNotFound()
    return web.Response(body=item.read_bytes(), content_type=STATIC_TYPES[suffix],
                        headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})


@routes.get("/favicon.ico")
@public
async def favicon(request: web.Request) -> web.Response:
    """Browsers ask for it on every page without a <link rel=icon> (the JSON ones too): nothing, quietly."""
    return web.Response(status=204, headers={"Cache-Control": "max-age=86400"})
