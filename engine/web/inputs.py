"""Checks every HTTP request gets before a handler sees it."""

from __future__ import annotations

from aiohttp import web


def nul_parameter(request: web.Request) -> str | None:
    """The first query parameter (or "path") holding a NUL character: no identifier, name or id has
    one, PostgreSQL refuses it in text, and SQLite would compare it literally. Such a request is
    refused with 400 before it reaches the store."""
    if "\x00" in request.path:
        return "path"
    for key, value in request.query.items():
        if "\x00" in key or "\x00" in value:
            return key.replace("\x00", "\\0")
    return None
