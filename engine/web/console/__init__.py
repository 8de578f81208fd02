"""The operator console at ``/``: server-rendered pages (Jinja2 through aiohttp-jinja2) with a little
JavaScript, behind the same tokens and roles as the API (docs/console.md).

A person logs in with a token on ``/login``; the console then keeps a session cookie (HttpOnly,
SameSite=Strict; engine/store/sessions.py) and every form carries the session's CSRF secret, which
engine/web/auth.py checks on every change. Pages declare their role like the API's routes do
(``@requires(Role.READ)``); action buttons are shown only to a principal holding the action's role,
and the action's route checks the role again.

Each section is a module with its own ``routes`` (overview, messages, ...); ``console_routes`` joins
them. Templates live in ``templates/`` (base.html is the layout, macros.html the shared pieces), and
static files (CSS, JS, vendored libraries) in ``static/``, served by ``/static/{name}``.
"""

from __future__ import annotations

from aiohttp import web

from engine.web.console import (
    deliveries,
    login,
    mappings,
    message_detail,
    messages,
    overview,
    pages,
    patients,
    studies,
)


def console_routes() -> list[web.RouteTableDef]:
    """Every console route table, to be added to the root application."""
    return [pages.routes, login.routes, overview.routes, messages.routes, message_detail.routes, mappings.routes,
            patients.routes, studies.routes, deliveries.routes]


def setup_console(app: web.Application) -> None:
    """Templates for ``app`` and the console's routes."""
    pages.setup_templates(app)
    app[login.FAILED_LOGINS] = login.FailedLogins()
    for table in console_routes():
        app.add_routes(table)
