"""The overview: every channel with its state (the start of the console's home page)."""

from __future__ import annotations

from aiohttp import web

from engine.store.tokens import Role
from engine.web.console.pages import fragment, render
from engine.web.keys import ENGINE
from engine.web.roles import requires

routes = web.RouteTableDef()


def _context(request: web.Request) -> dict[str, object]:
    return {"channels": request.app[ENGINE].channel_status()}


@routes.get("/")
@requires(Role.READ)
async def overview(request: web.Request) -> web.Response:
    return render(request, "overview.html", _context(request))


@routes.get("/overview/live")
@requires(Role.READ)
async def overview_live(request: web.Request) -> web.Response:
    """The overview's changing part, fetched again every few seconds by static/console.js."""
    return fragment(request, "overview_live.html", _context(request))
