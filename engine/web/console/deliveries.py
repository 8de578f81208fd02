"""Deliveries to the EHR in the console: counts per destination and state, the list (filtered,
keyset-paged), a delivery with every attempt, the EHR's answers and the message sent; and the
operator's hand: retry, retry with the message built again, retry every dead one of a destination,
discard with a note. The actions go through the same functions as the admin API's
(engine/web/deliveries.py), audited the same way."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from engine.outbound import admin, outbox
from engine.store.tokens import Role
from engine.web.console.pages import done, fragment, query_int, render
from engine.web.deliveries import (
    discard_delivery,
    record_delivery_read,
    refusal_detail,
    retry_dead,
    retry_delivery,
)
from engine.web.reads import on_reader
from engine.web.roles import requires

routes = web.RouteTableDef()
PAGE = 50  # rows a page, unless ?limit= says otherwise (1 to MAX_PAGE)
MAX_PAGE = 500
COUNT_CAP = 10_000
MAX_NOTE = 1000
FILTERS = ("destination", "state", "study", "message")


def _filters(request: web.Request) -> tuple[dict[str, str], list[str]]:
    """The list's filters as given (blank ones left out) and what is wrong with them."""
    given = {k: request.query.get(k, "").strip() for k in FILTERS}
    given = {k: v for k, v in given.items() if v}
    problems = []
    if "state" in given and given["state"] not in outbox.STATES:
        problems.append(f"state must be one of {', '.join(outbox.STATES)}")
        given.pop("state")
    if "message" in given and not given["message"].isdigit():
        problems.append("message is a message's number (as in /messages/12)")
        given.pop("message")
    return given, problems


def _payload_text(payload: str | None) -> str | None:
    """The message as shown: HL7 segments one a line, JSON indented."""
    if payload is None:
        return None
    if payload.startswith("MSH"):
        return payload.replace("\r\n", "\n").replace("\r", "\n")
    try:
        return json.dumps(json.loads(payload), indent=2, ensure_ascii=False)
    except ValueError:
        return payload


def _answer_text(response: str | None) -> str | None:
    return response.replace("\r\n", "\n").replace("\r", "\n") if response else response


@routes.get("/deliveries")
@requires(Role.READ)
async def deliveries(request: web.Request) -> web.Response:
    given, problems = _filters(request)
    before = query_int(request, "before", 0, 0, 2**62) or None
    after = query_int(request, "after", 0, 0, 2**62) or None
    page = query_int(request, "limit", PAGE, 1, MAX_PAGE)
    if page != PAGE:
        given["limit"] = str(page)  # kept in the pager's links

    def read(conn: Any) -> tuple[list[admin.DeliverySummary], dict[str, dict[str, int]]]:
        rows = admin.list_deliveries(conn, state=given.get("state"), destination=given.get("destination"),
                                     study_uid=given.get("study"), limit=page + 1, before=before,
                                     after=None if before else after,
                                     message_id=int(given["message"]) if "message" in given else None)
        return rows, admin.capped_counts(conn, COUNT_CAP)
    rows, counts = await on_reader(request, read)
    if after and not before:  # the page just newer than `after`: one more means there are newer still
        more_newer, more_older = len(rows) > page, True
        rows = rows[1:] if more_newer else rows
    else:
        more_older, more_newer = len(rows) > page, before is not None
        rows = rows[:page]
    older = urlencode({**given, "before": rows[-1]["id"]}) if rows and more_older else None
    newer = urlencode({**given, "after": rows[0]["id"]}) if rows and more_newer else None
    dead = {dest: by_state.get("dead", 0) for dest, by_state in counts.items() if by_state.get("dead")}
    return render(request, "deliveries.html", {
        "rows": rows, "counts": counts, "states": outbox.STATES, "cap": COUNT_CAP, "given": given,
        "problems": problems, "older": older, "newer": newer, "dead": dead,
        "destinations": sorted(set(counts) | ({given["destination"]} if "destination" in given else set())),
        "link": lambda **kw: "/deliveries?" + urlencode(kw)})


async def _detail(request: web.Request, did: int) -> dict[str, Any] | None:
    def read(conn: Any) -> tuple[admin.DeliveryDetail | None, int | None]:
        d = admin.show_delivery(conn, did)
        return d, admin.message_of(conn, d["order_id"]) if d is not None else None
    d, message_id = await on_reader(request, read)
    if d is None:
        return None
    attempts = [{**a, "answer": _answer_text(a["response"])} for a in d["attempts_made"]]
    return {"d": d, "attempts": attempts, "message_id": message_id, "payload": _payload_text(d["payload"]),
            "can_retry": d["state"] in ("dead", "pending", "discarded"),
            "can_discard": d["state"] in ("dead", "pending")}


@routes.get(r"/deliveries/{id:\d+}")
@requires(Role.READ)
async def delivery(request: web.Request) -> web.Response:
    did = int(request.match_info["id"])
    context = await _detail(request, did)
    if context is None:
        return render(request, "delivery_missing.html", {"id": did}, status=404)
    await record_delivery_read(request, context["d"])  # not the live refresh: one row per page view
    return render(request, "delivery.html", context)


@routes.get(r"/deliveries/{id:\d+}/live")
@requires(Role.READ)
async def delivery_live(request: web.Request) -> web.Response:
    """The delivery's state and attempts, fetched again every few seconds (static/console.js) while
    it is pending: a retried delivery is seen going through without reloading."""
    context = await _detail(request, int(request.match_info["id"]))
    if context is None:
        raise web.HTTPNotFound()
    return fragment(request, "delivery_status.html", context)


async def _form(request: web.Request) -> dict[str, str]:
    form = await request.post()
    return {k: v for k, v in form.items() if isinstance(v, str)}


@routes.post(r"/deliveries/{id:\d+}/retry")
@requires(Role.OPERATE)
async def retry_one(request: web.Request) -> web.Response:
    did = int(request.match_info["id"])
    rebuild = (await _form(request)).get("rebuild") == "1"
    try:
        await retry_delivery(request, did, rebuild)
    except web.HTTPClientError as exc:
        raise done(request, f"/deliveries/{did}", f"Not retried: {refusal_detail(exc)}") from None
    raise done(request, f"/deliveries/{did}", f"Delivery {did} is queued again"
               + (", its message to be built again from the store as it is now" if rebuild else "") + ".")


@routes.post("/deliveries/retry")
@requires(Role.OPERATE)
async def retry_all_dead(request: web.Request) -> web.Response:
    form = await _form(request)
    dest = form.get("destination", "").strip() or None
    rebuild = form.get("rebuild") == "1"
    n = await retry_dead(request, dest, rebuild)
    back = "/deliveries?" + urlencode({"destination": dest} if dest else {})
    raise done(request, back, f"{n} dead deliver{'y' if n == 1 else 'ies'}" + (f" to {dest}" if dest else "")
               + " queued again" + (", to be built again" if rebuild else "") + ".")


@routes.post(r"/deliveries/{id:\d+}/discard")
@requires(Role.OPERATE)
async def discard(request: web.Request) -> web.Response:
    did = int(request.match_info["id"])
    note = (await _form(request)).get("note", "").strip()
    if not note:
        raise done(request, f"/deliveries/{did}", "Not discarded: give a note saying why the EHR does not need it.")
    try:
        await discard_delivery(request, did, note[:MAX_NOTE])
    except web.HTTPClientError as exc:
        raise done(request, f"/deliveries/{did}", f"Not discarded: {refusal_detail(exc)}") from None
    raise done(request, f"/deliveries/{did}", f"Delivery {did} is discarded.")
