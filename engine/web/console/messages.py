"""Messages: search (control ID, patient identifier, accession, type, status, channel, time range),
newest first, 50 to a page with Older/Newer links (keyset paging by id). Each row links to the
message's own page (/messages/{id}). The query is the one behind GET /api/messages
(engine/store/message_search.py), read from the same parameters (engine/web/message_filters.py).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from sqlalchemy.orm import Session

from engine.store.message_search import search_statement
from engine.store.states import MessageStatus
from engine.store.tokens import Role
from engine.web.console.pages import render
from engine.web.keys import ENGINE
from engine.web.message_filters import PARAMETERS, FilterError, message_filter
from engine.web.reads import in_read_session
from engine.web.roles import requires

routes = web.RouteTableDef()

PAGE = 50
STATUSES = [s.value for s in MessageStatus if s not in (MessageStatus.RECEIVED, MessageStatus.NOT_STORED)]


def _row(m: Any) -> dict[str, Any]:
    return {"id": m.id, "received_at": m.received_at, "channel": m.channel, "type": m.message_type,
            "control_id": m.control_id, "status": m.status, "ack_code": m.ack_code, "patient_id": m.patient_id,
            "sending_app": m.sending_app}


@routes.get("/messages")
@requires(Role.READ)
async def messages(request: web.Request) -> web.Response:
    q = request.query
    form = {k: q.get(k, "") for k in PARAMETERS if k not in ("before_id", "after_id", "patient_id")}
    if q.get("patient_id"):
        form["patient_id"] = q["patient_id"]
    try:
        wanted = message_filter(q)
    except FilterError as exc:
        return render(request, "messages.html", {"form": form, "rows": [], "error": str(exc), "newer": None,
                                                 "older": None, "filtered": True, **_choices(request)}, status=400)

    def run(s: Session) -> list[dict[str, Any]]:
        return [_row(m) for m in s.execute(search_statement(wanted, PAGE + 1)).scalars()]
    rows = await in_read_session(request, run)
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    if wanted.after_id is not None:
        rows.reverse()
    # Newer: when this page was reached by paging (there are newer ones unless the newest were
    # asked for and fewer than a page came). Older: when more matched than the page shows.
    kept = {k: v for k, v in form.items() if v}
    has_older = more if wanted.after_id is None else bool(rows)
    has_newer = (wanted.before_id is not None and bool(rows)) or (wanted.after_id is not None and more)
    older = urlencode({**kept, "before_id": rows[-1]["id"]}) if rows and has_older else None
    newer = urlencode({**kept, "after_id": rows[0]["id"]}) if rows and has_newer else None
    return render(request, "messages.html", {"form": form, "rows": rows, "error": None, "newer": newer,
                                             "older": older, "filtered": wanted.any(), **_choices(request)})


def _choices(request: web.Request) -> dict[str, Any]:
    return {"statuses": STATUSES, "channel_names": [ch["name"] for ch in request.app[ENGINE].channel_status()]}
