"""One message (``/messages/{id}``): the raw message as a table of segments and fields with their
names (hl7apy's structure definitions), the mapped values kept when it was applied, the ACK sent,
its history (events, what it did to patients and orders, deliveries for those orders), what the
current mappings say about it, and Reprocess (role operate) through the API's own code.

Opening a message is a read of patient data: one ``read`` row of the audit trail, like the API's
reads (engine/web/audit.py ``record_read``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from engine.channels import Route
from engine.hl7.errors import HL7ParseError
from engine.hl7.message import Message as HL7Message
from engine.hl7.message import parse_message
from engine.hl7.structure import field_names
from engine.mappings.spec import Mapping
from engine.pipeline.dry_run import spec_line
from engine.pipeline.hl7_inbound import map_message
from engine.store.models import Delivery, Message, Order, OrderStatusChange, PatientChange, Study
from engine.store.tokens import Role
from engine.web.api import reprocess_message
from engine.web.audit import Refused, record_read
from engine.web.console.pages import done, render
from engine.web.keys import ENGINE, MAPPINGS, SETTINGS
from engine.web.reads import in_read_session
from engine.web.roles import requires
from engine.web.serialize import message_json

routes = web.RouteTableDef()
HISTORY_LIMIT = 100  # rows of each kind of history shown (a message touches a few)
HL7APY_VERSIONS = ("2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8", "2.8.1", "2.8.2")


@dataclass
class FieldRow:
    """One field of a segment as the table shows it."""

    number: int
    name: str  # from hl7apy; "" for Z-segments and fields it does not define
    datatype: str
    value: str  # as sent (still escaped)
    components: list[tuple[str, str, str]] = field(default_factory=list)  # (position, name, value)


@dataclass
class SegmentRows:
    name: str
    occurrence: int
    index: int
    fields: list[FieldRow]
    known: bool  # hl7apy knows the segment


def segment_table(msg: HL7Message, version: str) -> list[SegmentRows]:
    """Every segment with its non-empty fields, named; components (and their names) of composite
    fields, per repetition."""
    seps = msg.seps
    counts: dict[str, int] = {}
    out: list[SegmentRows] = []
    for index, seg in enumerate(msg.segments, 1):
        counts[seg.name] = counts.get(seg.name, 0) + 1
        names = field_names(seg.name, version)
        rows: list[FieldRow] = []
        for n in range(1, seg.field_count + 1):
            value = seg.raw_field(n)
            if value == "":
                continue
            name, datatype, comp_names = names.get(n, ("", "", ()))
            row = FieldRow(n, name, datatype, value)
            if not (seg.name == "MSH" and n in (1, 2)):
                reps = value.split(seps.repetition)
                for r, rep in enumerate(reps, 1):
                    parts = rep.split(seps.component)
                    if len(parts) < 2:
                        continue
                    for c, part in enumerate(parts, 1):
                        if part:
                            where = f"{n}.{c}" if len(reps) == 1 else f"{n}({r}).{c}"
                            row.components.append((where, comp_names[c - 1] if c <= len(comp_names) else "", part))
            rows.append(row)
        out.append(SegmentRows(seg.name, counts[seg.name], index, rows, bool(names)))
    return out


def _version(msg_version: str | None, default: str) -> str:
    return msg_version if msg_version in HL7APY_VERSIONS else default


def current_mapping_errors(request: web.Request, msg: HL7Message, channel: str) -> dict[str, Any] | None:
    """What the engine's current mappings make of this message now (a dry run: nothing is written):
    its route and the values they cannot accept, each with the mapping file and line of its field.
    None when the message's channel has no route for it (or is not an HL7 channel)."""
    status = next((c for c in request.config_dict[ENGINE].channel_status() if c.get("name") == channel), None)
    if status is None or not status.get("routes"):
        return None
    routes_ = [Route(list(r["messages"]), str(r["action"]), list(r["mappings"])) for r in status["routes"]]
    route = next((r for r in routes_ if r.matches(msg.message_type)), None)
    if route is None or route.action == "ignore":
        return None
    registry = request.config_dict[MAPPINGS]
    loaded: list[Mapping] = [m for name in route.mappings if (m := registry.get(name)) is not None]
    mapped = map_message(msg, loaded, order_action=route.action == "order")
    errors = []
    for e in mapped.errors:
        at = spec_line(loaded, e.field)
        errors.append({"field": e.field, "path": e.path, "error": e.message,
                       "mapping": at[0] if at else None, "line": at[1] if at else None})
    return {"action": route.action, "mappings": route.mappings, "errors": errors,
            "missing": [n for n in route.mappings if registry.get(n) is None]}


def _history(s: Session, mid: int) -> dict[str, Any]:
    """What this message did: patient changes, order status changes, and the deliveries made for
    the studies of those orders (each lookup by an indexed column, bounded)."""
    patients = [{"at": h.at, "patient_id": h.patient_id, "kind": h.kind, "changes": h.changes}
                for h in s.execute(select(PatientChange).where(PatientChange.message_id == mid)
                                   .order_by(PatientChange.id).limit(HISTORY_LIMIT)).scalars()]
    orders: list[dict[str, Any]] = [{"at": h.at, "order_id": h.order_id, "accession": accession, "control": h.control,
               "from": h.from_status, "to": h.to_status, "applied": h.applied, "note": h.note}
              for h, accession in s.execute(
                  select(OrderStatusChange, Order.accession).join(Order, Order.id == OrderStatusChange.order_id)
                  .where(OrderStatusChange.message_id == mid).order_by(OrderStatusChange.id).limit(HISTORY_LIMIT))]
    order_ids = sorted({int(o["order_id"]) for o in orders})
    deliveries: list[dict[str, Any]] = []
    if order_ids:
        studies = select(Study.id).where(Study.order_id.in_(order_ids))
        deliveries = [{"id": d.id, "created_at": d.created_at, "destination": d.destination, "event": d.event,
                       "state": d.state, "attempts": d.attempts, "last_error": d.last_error}
                      for d in s.execute(select(Delivery).where(Delivery.study_id.in_(studies))
                                         .order_by(Delivery.id).limit(HISTORY_LIMIT)).scalars()]
    return {"patient_changes": patients, "order_changes": orders, "order_ids": order_ids, "deliveries": deliveries}


def _iso(at: Any) -> str:
    return at.isoformat() if hasattr(at, "isoformat") else str(at or "")


def timeline(m: dict[str, Any], patients: list[dict[str, Any]], orders: list[dict[str, Any]]
             ) -> list[dict[str, Any]]:
    """The message's history in time order: received, its events, what it did to patients and
    orders, and when it was last processed."""
    items: list[dict[str, Any]] = [{"at": m["received_at"], "row": "received"}]
    items += [{**e, "at": _iso(e["at"]), "row": "event"} for e in m["events"]]
    items += [{**h, "at": _iso(h["at"]), "row": "patient"} for h in patients]
    items += [{**h, "at": _iso(h["at"]), "row": "order"} for h in orders]
    if m.get("processed_at"):
        items.append({"at": m["processed_at"], "row": "processed"})
    return sorted(items, key=lambda i: (i["at"] or "", i["row"] == "processed"))


def _pretty_json(raw: str) -> str:
    try:
        return json.dumps(json.loads(raw), indent=2, ensure_ascii=False)
    except ValueError:
        return raw


@routes.get(r"/messages/{id:\d+}")
@requires(Role.READ)
async def message_page(request: web.Request) -> web.Response:
    mid = int(request.match_info["id"])

    def run(s: Session) -> dict[str, Any] | None:
        m = s.get(Message, mid, options=[selectinload(Message.content), selectinload(Message.events)])
        if m is None:
            return None
        return {"message": message_json(m, content=True), **_history(s, mid)}
    found = await in_read_session(request, run)
    patient_ids = sorted({found["message"]["patient_id"]} - {None} | {h["patient_id"] for h in found["patient_changes"]}
                         ) if found else []
    await record_read(request, "read", "Message", 200 if found else 404, [found["message"]] if found else [],
                      patient_ids, message_id=mid)
    if found is None:
        return render(request, "message_missing.html", {"message_id": mid}, status=404)
    m = found["message"]
    found["timeline"] = timeline(m, found["patient_changes"], found["order_changes"])
    context: dict[str, Any] = {**found, "segments": None, "parse_error": None, "fhir_json": None, "current": None,
                               "ack": (m.get("ack") or "").replace("\r", "\n").strip()}
    raw = m.get("raw")
    if raw is not None and m["protocol"] == "fhir":
        context["fhir_json"] = _pretty_json(raw)
    elif raw is not None:
        try:
            msg = parse_message(raw)
        except HL7ParseError as exc:
            context["parse_error"] = str(exc)
        else:
            version = _version(m.get("version"), request.config_dict[SETTINGS].mappings.hl7_version)
            context["segments"] = segment_table(msg, version)
            context["hl7_version"] = version
            if m["status"] in ("error", "received"):
                context["current"] = current_mapping_errors(request, msg, m["channel"])
    return render(request, "message_detail.html", context)


@routes.post(r"/messages/{id:\d+}/reprocess")
@requires(Role.OPERATE)
async def message_reprocess(request: web.Request) -> web.Response:
    """The Reprocess button: the same code as POST /api/messages/{id}/reprocess (audited there)."""
    mid = int(request.match_info["id"])
    try:
        result = await reprocess_message(request, mid)
    except Refused as exc:
        raise done(request, f"/messages/{mid}", f"Not reprocessed: {exc.body.get('detail') or exc.body.get('error')}"
                   ) from None
    notice = f"Reprocessed: now {result['status']}"
    if result.get("error"):
        notice += f" ({result['error']})"
    raise done(request, f"/messages/{mid}", notice)
