"""Admin API for outbound deliveries: list, show (with every attempt), retry, discard."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from sqlalchemy import Connection

from engine.outbound import admin, outbox
from engine.store.audit import AuditAction
from engine.store.tokens import Role
from engine.web.audit import Refused, audited, record_read
from engine.web.inputs import BodyError, read_body
from engine.web.keys import ENGINE
from engine.web.reads import on_reader
from engine.web.roles import requires

MAX_LIMIT = 500

routes = web.RouteTableDef()


def _error(cls: type[web.HTTPException], detail: str) -> web.HTTPException:
    return cls(text=json.dumps({"error": cls.__name__.removeprefix("HTTP"), "detail": detail}),
               content_type="application/json")


async def _write(request: web.Request, action: AuditAction, fn: Any, about: Any, refusal: Any = None) -> Any:
    """``fn(connection)`` in the writer with its audit row; then the outbound workers are woken to
    send what it queued."""
    result = await audited(request, action, fn, about, refusal)
    request.config_dict[ENGINE].wake_outbound()
    return result


def _not_done(delivery_id: int, verb: str) -> Any:
    """The refusal when nothing was retried or discarded: 404 for no such delivery, else 409."""
    def check(conn: Connection, n: int) -> Refused | None:
        if n:
            return None
        d = admin.show_delivery(conn, delivery_id)
        if d is None:
            return Refused(404, {"error": "NotFound", "detail": f"no delivery {delivery_id}"})
        if verb == "retry":
            detail = (f"delivery {delivery_id} is {d['state']}; only dead, pending or discarded deliveries can be "
                      "sent again")
        else:
            detail = f"delivery {delivery_id} is {d['state']}; only pending or dead deliveries can be discarded"
        return Refused(409, {"error": "Conflict", "detail": detail})
    return check


def _id(request: web.Request) -> int:
    return int(request.match_info["id"])


@routes.get("/deliveries")
@requires(Role.READ)
async def deliveries(request: web.Request) -> web.Response:
    q = request.query
    state = q.get("state")
    if state and state not in outbox.STATES:
        raise _error(web.HTTPBadRequest, f"state must be one of {', '.join(outbox.STATES)}")
    raw = q.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise _error(web.HTTPBadRequest, f"limit must be a number from 1 to {MAX_LIMIT}")
    rows = await on_reader(request, lambda c: admin.list_deliveries(c, state=state, destination=q.get("destination"),
                                                                study_uid=q.get("study_uid"), limit=int(raw)))
    counts = await on_reader(request, outbox.counts)
    return web.json_response({"deliveries": rows, "counts": counts})


@routes.get(r"/deliveries/{id:\d+}")
@requires(Role.READ)
async def delivery(request: web.Request) -> web.Response:
    d = await on_reader(request, lambda c: admin.show_delivery(c, _id(request)))
    if d is None:
        raise _error(web.HTTPNotFound, f"no delivery {_id(request)}")
    await record_delivery_read(request, d)
    return web.json_response(d)


async def record_delivery_read(request: web.Request, d: admin.DeliveryDetail) -> None:
    """The payload sent holds the patient's details: reading it is on the audit trail (API and console)."""
    await record_read(request, "read", "Delivery", 200, [dict(d)], [d["patient_id"]] if d["patient_id"] else [],
                      delivery_id=d["id"])


# --- the actions, shared by these routes and the console's forms (engine/web/console/deliveries.py) ----

async def retry_delivery(request: web.Request, did: int, rebuild: bool = False) -> int:
    """Delivery ``did`` back in the queue (``rebuild``: its message built again from the store as it
    is now), audited; raises 404/409 (JSON) when there is none or it cannot be sent again."""
    n: int = await _write(request, AuditAction.RETRY, lambda c: outbox.retry(c, [did], rebuild=rebuild),
                          lambda c, _: admin.retry_subject(c, did, rebuild), _not_done(did, "retry"))
    return n


async def retry_dead(request: web.Request, destination: str | None, rebuild: bool = False) -> int:
    """Every dead delivery (to ``destination``, or to all) back in the queue, audited; how many."""
    n: int = await _write(request, AuditAction.RETRY,
                          lambda c: outbox.retry(c, None, destination=destination, rebuild=rebuild),
                          lambda _, n: admin.retry_dead_subject(n or 0, destination, rebuild))
    return n


async def discard_delivery(request: web.Request, did: int, note: str) -> int:
    """Give up on delivery ``did``; ``note`` is kept in its history and on the audit trail."""
    n: int = await _write(request, AuditAction.DISCARD, lambda c: outbox.discard(c, [did], note),
                          lambda c, _: admin.discard_subject(c, did, note), _not_done(did, "discard"))
    return n


def refusal_detail(exc: web.HTTPException) -> str:
    """The one-line reason of a refusal raised by the actions above (their JSON body's detail)."""
    try:
        body = json.loads(exc.text or "")
    except ValueError:
        return exc.reason
    return str(body.get("detail") or body.get("error") or exc.reason) if isinstance(body, dict) else exc.reason


@routes.post(r"/deliveries/{id:\d+}/retry")
@requires(Role.OPERATE)
async def retry_one(request: web.Request) -> web.Response:
    rebuild = request.query.get("rebuild", "").lower() in ("1", "true", "yes")
    n = await retry_delivery(request, _id(request), rebuild)
    return web.json_response({"retried": n, "rebuild": rebuild})


@routes.post("/deliveries/retry")
@requires(Role.OPERATE)
async def retry_many(request: web.Request) -> web.Response:
    try:
        raw = await read_body(request, request.client_max_size, "the HTTP server's request size limit")
        body = json.loads(raw) if raw.strip() else {}
    except BodyError as exc:
        raise exc.http_error() from None
    except ValueError:
        raise _error(web.HTTPBadRequest, "the body is not JSON") from None
    if not isinstance(body, dict) or body.get("state", "dead") != "dead":
        raise _error(web.HTTPBadRequest, 'give {"state": "dead", "destination": NAME (optional)}')
    n = await retry_dead(request, body.get("destination"), bool(body.get("rebuild")))
    return web.json_response({"retried": n})


@routes.post(r"/deliveries/{id:\d+}/discard")
@requires(Role.OPERATE)
async def discard(request: web.Request) -> web.Response:
    n = await discard_delivery(request, _id(request), request.query.get("note", ""))
    return web.json_response({"discarded": n})
