"""Reads for handlers: blocking database work on the reader pool, in a worker thread, so the event
loop keeps serving (and the writer is never held up by a read)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from aiohttp import web
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from engine.web.keys import DATABASE

T = TypeVar("T")


async def in_read_session(request: web.Request, fn: Callable[[Session], T]) -> T:
    """``fn`` in a read-only ORM session (models, relationships)."""
    db = request.config_dict[DATABASE]

    def run() -> T:
        with db.read_session() as s:
            return fn(s)
    return await asyncio.to_thread(run)


async def on_reader(request: web.Request, fn: Callable[[Connection], T]) -> T:
    """``fn`` on a Core connection of the reader pool."""
    db = request.config_dict[DATABASE]

    def run() -> T:
        with db.reader.connect() as conn:
            return fn(conn)
    return await asyncio.to_thread(run)
