"""What each HTTP route declares it needs: a role, or nothing (public). engine/web/auth.py enforces it;
``build_app`` refuses an application with a route that declares neither.

    @routes.post(r"/deliveries/{id:\\d+}/retry")
    @requires(Role.OPERATE)
    async def retry_one(request: web.Request) -> web.Response: ...
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from engine.store.tokens import Role

H = TypeVar("H", bound=Callable[[web.Request], Awaitable[web.StreamResponse]])


class Public:
    """The declaration of a route anyone may call, without a token."""

    def __repr__(self) -> str:
        return "public"


PUBLIC = Public()
ROUTE_ROLES: dict[Callable[..., Any], Role | Public] = {}  # handler -> what it declared


def requires(role: Role) -> Callable[[H], H]:
    """Declare that ``handler`` needs ``role``."""
    def declare(handler: H) -> H:
        ROUTE_ROLES[handler] = role
        return handler
    return declare


def public(handler: H) -> H:
    """Declare that ``handler`` needs no token."""
    ROUTE_ROLES[handler] = PUBLIC
    return handler


def declared(handler: Callable[..., Any]) -> Role | Public | None:
    return ROUTE_ROLES.get(handler)


def route_table(app: web.Application) -> list[tuple[str, str, Callable[..., Any]]]:
    """(method, path, handler) of every route of ``app`` and of its sub-apps (whose paths carry their prefix)."""
    out: list[tuple[str, str, Callable[..., Any]]] = []
    for resource in app.router.resources():
        info = resource.get_info()
        sub = info.get("app")
        if isinstance(sub, web.Application):
            out += route_table(sub)
            continue
        for route in resource:
            out.append((route.method, resource.canonical, route.handler))
    return out


def undeclared_routes(app: web.Application) -> list[str]:
    return [f"{method} {path} ({getattr(handler, '__qualname__', handler)})"
            for method, path, handler in route_table(app) if declared(handler) is None]


