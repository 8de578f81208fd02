"""Checks every HTTP request gets before a handler sees it."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from engine.errors import RadBridgeError
from engine.web.keys import SETTINGS


class BodyError(RadBridgeError):
    """The request body could not be read whole: too large (413) or too slow (408)."""

    def __init__(self, status: int, detail: str, limit: int = 0, size: int = 0) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.limit, self.size = limit, size

    def http_error(self) -> web.HTTPException:
        """As the JSON error of /api/."""
        text = json.dumps({"error": "request timeout" if self.status == 408 else "request too large",
                           "detail": self.detail})
        if self.status == 408:
            return web.HTTPRequestTimeout(text=text, content_type="application/json")
        return web.HTTPRequestEntityTooLarge(self.limit, self.size, text=text, content_type="application/json")


async def read_body(request: web.Request, limit: int, limit_name: str) -> bytes:
    """The whole request body: at most ``limit`` bytes (``limit_name`` says which setting), and
    arrived within http.body_timeout_seconds, so a peer that announces a body and sends it slowly
    or never does not hold its connection and handler for ever."""
    timeout = request.config_dict[SETTINGS].http.body_timeout_seconds
    if request.content_length is not None and request.content_length > limit:
        raise BodyError(413, f"the body is {request.content_length} bytes; this endpoint takes at most {limit} "
                             f"({limit_name})", limit, request.content_length)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    raise BodyError(413, f"the body is larger than {limit} bytes ({limit_name})", limit, size)
                chunks.append(chunk)
    except TimeoutError:
        raise BodyError(408, f"the request body did not arrive whole within {timeout:g} s "
                             "(http.body_timeout_seconds)") from None
    return b"".join(chunks)


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
