"""Admin API for outbound deliveries: list, show (with every attempt), retry, discard."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from engine.outbound import admin, outbox

if TYPE_CHECKING:
    from engine.runtime import Engine

MAX_LIMIT = 500


def _error(cls: type[web.HTTPException], detail: str) -> web.HTTPException:
    return cls(text=json.dumps({"error": cls.__name__.removeprefix("HTTP"), "detail": detail}),
               content_type="application/json")


def add_delivery_routes(app: web.Application, engine: Engine) -> None:
    async def read(fn: Any) -> Any:
        def run() -> Any:
            with engine.db.reader.connect() as conn:
                return fn(conn)
        return await asyncio.to_thread(run)

    async def write(fn: Any) -> Any:
        result = await engine.writer.run(lambda s: fn(s.connection()))
        engine.wake_outbound()
        return result

    async def deliveries(request: web.Request) -> web.Response:
        q = request.query
        state = q.get("state")
        if state and state not in outbox.STATES:
            raise _error(web.HTTPBadRequest, f"state must be one of {', '.join(outbox.STATES)}")
        raw = q.get("limit", "100")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise _error(web.HTTPBadRequest, f"limit must be a number from 1 to {MAX_LIMIT}")
        rows = await read(lambda c: admin.list_deliveries(c, state=state, destination=q.get("destination"),
                                                          study_uid=q.get("study_uid"), limit=int(raw)))
        counts = await read(outbox.counts)
        return web.json_response({"deliveries": rows, "counts": counts})

    def _id(request: web.Request) -> int:
        return int(request.match_info["id"])

    async def delivery(request: web.Request) -> web.Response:
        d = await read(lambda c: admin.show_delivery(c, _id(request)))
        if d is None:
            raise _error(web.HTTPNotFound, f"no delivery {_id(request)}")
        return web.json_response(d)

    async def retry_one(request: web.Request) -> web.Response:
        rebuild = request.query.get("rebuild", "").lower() in ("1", "true", "yes")
        n = await write(lambda c: outbox.retry(c, [_id(request)], rebuild=rebuild))
        if not n:
            d = await read(lambda c: admin.show_delivery(c, _id(request)))
            if d is None:
                raise _error(web.HTTPNotFound, f"no delivery {_id(request)}")
            raise _error(web.HTTPConflict, f"delivery {_id(request)} is {d['state']}; only dead, pending or "
                                           "discarded deliveries can be sent again")
        return web.json_response({"retried": n, "rebuild": rebuild})

    async def retry_many(request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            raise _error(web.HTTPBadRequest, "the body is not JSON") from None
        if not isinstance(body, dict) or body.get("state", "dead") != "dead":
            raise _error(web.HTTPBadRequest, 'give {"state": "dead", "destination": NAME (optional)}')
        dest = body.get("destination")
        n = await write(lambda c: outbox.retry(c, None, destination=dest, rebuild=bool(body.get("rebuild"))))
        return web.json_response({"retried": n})

    async def discard(request: web.Request) -> web.Response:
        note = request.query.get("note", "")
        n = await write(lambda c: outbox.discard(c, [_id(request)], note))
        if not n:
            raise _error(web.HTTPConflict, f"delivery {_id(request)} is not pending or dead (or does not exist)")
        return web.json_response({"discarded": n})

    app.router.add_get("/deliveries", deliveries)
    app.router.add_get(r"/deliveries/{id:\d+}", delivery)
    app.router.add_post(r"/deliveries/{id:\d+}/retry", retry_one)
    app.router.add_post("/deliveries/retry", retry_many)
    app.router.add_post(r"/deliveries/{id:\d+}/discard", discard)
