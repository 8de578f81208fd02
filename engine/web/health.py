"""The engine's health as /health reports it and the console's overview shows it: one function,
so both say the same."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from sqlalchemy import text

from engine.web.keys import ENGINE, WRITER
from engine.web.reads import on_reader


async def health_report(request: web.Request) -> tuple[bool, dict[str, Any]]:
    """(ready, checks): the database answers, every channel is healthy, storage is above its floor;
    with the free space and the writer's backlog."""
    control = request.config_dict[ENGINE]
    checks: dict[str, Any] = {}
    ok = True
    try:
        await asyncio.wait_for(on_reader(request, lambda conn: conn.execute(text("SELECT 1"))), 5)
        checks["database"] = "ok"
    except Exception as exc:
        ok = False
        checks["database"] = f"unavailable: {type(exc).__name__}"
    channels_ok, listeners = control.health()
    ok = ok and channels_ok
    checks["channels"] = listeners
    storage = control.storage
    if storage is not None:
        free = storage.free_bytes()
        floor = control.storage_floor_mb()
        checks["storage_free_mb"] = None if free is None else free // (1024 * 1024)
        if free is not None and free < floor * 1024 * 1024:
            ok = False
            checks["storage"] = f"below the free-space floor of {floor} MB: C-STORE is refused"
    checks["writer_backlog"] = request.config_dict[WRITER].backlog
    return ok, checks
