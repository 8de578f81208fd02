"""Imaging orders from ORM^O01 / OMI^O23 (and later FHIR ServiceRequest).

Order control (ORC-1) decides what happens; the status history keeps every status an order was
asked to take, applied or not, with the reason. Rules (docs/domain-rules.md):
* NW creates; NW for a known order updates it (senders resend).
* XO/SC update; for an unknown order they create it, as the NW may have been lost.
* CA/OC (cancel) and DC/OD (discontinue) end an order; for an unknown order a cancelled record is
  kept, so a late NW for the same order does not schedule it.
* A cancelled or discontinued order is not revived by a later NW/XO/SC; a completed order (CM) is
  not moved back to scheduled or in progress. Both are recorded with applied = false.
* CA/OC/DC/OD change the status only: their OBR identifies the order, it does not rewrite it, and
  their PID does not move it to another patient.
* A message whose event time is older than the newest one applied to the order changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, select

from engine.domain.errors import DomainError
from engine.domain.events import OrderCancelled, OrderChanged, OrderPlaced
from engine.domain.limits import check_length
from engine.domain.patients import Outcome, upsert_patient
from engine.domain.records import (
    NOT_LOOKED_UP,
    ORDER_HISTORY,
    ORDER_KEYS,
    ORDER_LOOKUP,
    ORDERS,
    NotLookedUp,
    Record,
    add,
    fetch,
    load,
)
from engine.domain.times import is_older
from engine.hl7 import errors as E
from engine.mappings.fields import MappedFields
from engine.store.models import Order
from engine.store.types import utcnow

ORDER_COLUMNS = ("placer_number", "placer_issuer", "filler_number", "accession", "procedure_code",
                 "procedure_text", "procedure_scheme", "modality", "scheduled_at", "station_aet", "priority",
                 "requested_procedure_id", "sps_id", "study_uid", "reason", "ordering_provider")
CONTROL_STATUS = {"NW": "SC", "CA": "CA", "OC": "CA", "DC": "DC", "OD": "DC", "HD": "HD", "RL": "SC",
                  "XO": None, "SC": None}
KNOWN_STATUSES = {"A", "CA", "CM", "DC", "ER", "HD", "IP", "RP", "SC"}
CANCELLED = {"CA", "DC"}
ENDING_CONTROLS = {"CA", "OC", "DC", "OD"}
# How far along an order is, for statuses the images may move it to (never back, never out of CA/DC).
IMAGE_STATUS_RANK = {"SC": 0, "HD": 0, "A": 1, "IP": 1, "CM": 2}
ORDER_BY_ID = select(ORDERS).where(ORDERS.c.id == bindparam("id"))


def find_order(conn: Connection, data: MappedFields) -> Record | None:
    """The order the message names: the newest with its placer number, else with its filler number,
    else with its accession number."""
    values = {key: data[f"order.{key}"] for key in ORDER_KEYS if data.get(f"order.{key}")}
    if not values:
        return None
    row = fetch(conn, ORDER_LOOKUP[tuple(values)], **values)
    if row is None:
        return None
    del row["rank_"]
    return Record(ORDERS, row)


def _column_value(name: str, value: Any) -> Any:
    if name == "scheduled_at" and isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise DomainError(f"scheduled time {value!r} is not ISO date/time", code=E.DATA_TYPE_ERROR,
                              field="order.scheduled_at") from None
        # kept as wall-clock time in the engine's zone (the worklist's); an offset is honoured, not dropped
        return (dt.astimezone() if dt.tzinfo is not None else dt).replace(tzinfo=None)
    return value


def _fields(data: MappedFields, current: Record | None) -> dict[str, Any]:
    """The order columns this message sets (all mapped ones for a new order, changed ones otherwise)."""
    cols: dict[str, Any] = {}
    for name in ORDER_COLUMNS:
        key = f"order.{name}"
        if key in data:
            check_length(Order, name, data[key], key)
            value = _column_value(name, data[key])
            if current is None or current.get(name) != value:
                cols[name] = value
    extra_keys = [k for k in data if k.startswith("order.extra.")]
    if extra_keys:
        old = dict((current.get("extra") if current is not None else None) or {})
        extra = dict(old)
        for k in extra_keys:
            if data[k] is None:
                extra.pop(k[len("order.extra."):], None)
            else:
                extra[k[len("order.extra."):]] = data[k]
        if extra != old:
            cols["extra"] = extra
    return cols


def _refusal(current: str, new: str) -> str | None:
    if current in CANCELLED and new not in CANCELLED:
        return f"order is {current}; a later message does not revive it (send a new order)"
    if current == "CM" and new in ("SC", "IP", "A", "HD"):
        return "order is completed (CM); not moved back"
    return None


def _history(conn: Connection, order_id: int, control: str | None, from_status: str | None, to_status: str, applied: bool,
             note: str | None, message_id: int | None, source_time: str | None) -> None:
    add(conn, ORDER_HISTORY, order_id=order_id, control=control, from_status=from_status, to_status=to_status,
        applied=applied, note=note, message_id=message_id, source_time=source_time)


def apply_order(conn: Connection, data: MappedFields, out: Outcome, *, message_id: int | None,
                orders_update_patient: bool = False, ignore_stale: bool = True,
                found: Record | None | NotLookedUp = NOT_LOOKED_UP) -> Record:
    """``found``: what ``find_order`` gave the caller for this message's order numbers, if it asked."""
    if "order.control" in data and not data["order.control"]:
        raise DomainError('order control (ORC-1) is "" (null)', code=E.REQUIRED_FIELD_MISSING, field="order.control")
    control = str(data.get("order.control") or "NW").upper()
    if control not in CONTROL_STATUS:
        raise DomainError(f"order control {control!r} is not supported (NW, XO, SC, CA, OC, DC, OD, HD, RL)",
                          code=E.TABLE_VALUE_NOT_FOUND, field="order.control")
    if not any(data.get(k) for k in ("order.placer_number", "order.filler_number", "order.accession")):
        raise DomainError("the order has no placer number, filler number or accession number",
                          code=E.REQUIRED_FIELD_MISSING, field="order.placer_number")
    requested = data.get("order.status")
    requested = str(requested).upper() if requested else None
    if requested and requested not in KNOWN_STATUSES:
        raise DomainError(f"order status {requested!r} is not in HL7 table 0038", code=E.TABLE_VALUE_NOT_FOUND,
                          field="order.status")
    if control in ENDING_CONTROLS or control == "HD":
        new_status: str | None = CONTROL_STATUS[control]  # the control code decides, whatever ORC-5 says
    else:
        new_status = requested or CONTROL_STATUS[control]
    event_time = data.get("message.event_time")

    if orders_update_patient:
        patient_data = data
    else:
        # The order's PID may create an unknown patient, but its time says nothing about demographics:
        # a later ADT with an earlier EVN-2 must still be applied.
        patient_data = {k: v for k, v in data.items() if k != "message.event_time"}
    patient = upsert_patient(conn, patient_data, out, create=True, update=orders_update_patient,
                             ignore_stale=ignore_stale)
    order = find_order(conn, data) if found is NOT_LOOKED_UP else found
    if order is None:
        status = new_status or "SC"
        cols = {name: None for name in ORDER_COLUMNS}
        cols["extra"] = None
        cols.update(_fields(data, None))
        now = utcnow()
        order_id = add(conn, ORDERS, patient_id=patient.id, status=status, last_control=control,
                       source_time=event_time, version=1, created_at=now, updated_at=now, **cols)
        note = None
        if control in ENDING_CONTROLS:
            note = f"{control} for an unknown order: kept as {status} so a late NW does not schedule it"
        elif control != "NW":
            note = f"{control} for an unknown order: created (its NW may have been lost)"
        if note:
            out.notes.append(note)
        _history(conn, order_id, control, None, status, True, note, message_id, event_time)
        out.changes.append(f"order {order_id} created ({status})")
        out.order_ids.append(order_id)
        out.events.append(OrderPlaced(order_id=order_id, patient_id=patient.id, accession=cols.get("accession"),
                                      status=status, control=control))
        created = Record(ORDERS, {"id": order_id, "patient_id": patient.id, "status": status, "version": 1,
                                  "last_control": control, "source_time": event_time, "created_at": now,
                                  "updated_at": now, **cols})
        out.orders.append(created)
        return created

    out.order_ids.append(order.id)
    out.orders.append(order)
    if ignore_stale and is_older(event_time, order["source_time"]):
        note = f"stale: event time {event_time} is older than {order['source_time']} already applied"
        _history(conn, order.id, control, order["status"], new_status or order["status"], False, note,
                 message_id, event_time)
        out.notes.append(f"order {order.id}: {note}")
        return order
    target = new_status or order["status"]
    refusal = _refusal(order["status"], target)
    if refusal:
        _history(conn, order.id, control, order["status"], target, False, refusal, message_id, event_time)
        out.notes.append(f"order {order.id}: {refusal}")
        return order
    previous = order["status"]
    moved_from = None
    if order["patient_id"] != patient.id and control not in ENDING_CONTROLS:
        out.notes.append(f"order {order.id} moved from patient {order['patient_id']} to {patient.id}")
        moved_from = order["patient_id"]
        order.set("patient_id", patient.id)
    # A cancel or discontinue identifies the order; its OBR does not rewrite it.
    changed = False
    fields: list[str] = []
    if control not in ENDING_CONTROLS:
        for name, value in _fields(data, order).items():
            if order.set(name, value):
                changed = True
                fields.append(name)
    note = "NW for a known order: treated as an update" if control == "NW" else None
    if order["status"] == "CM" and target in CANCELLED:
        note = f"{control} after completion"
    if target != order["status"] or note or control in ENDING_CONTROLS:
        _history(conn, order.id, control, order["status"], target, True, note, message_id, event_time)
    if target != order["status"]:
        out.changes.append(f"order {order.id} {order['status']} -> {target}")
        order.set("status", target)
        changed = True
    if note:
        out.notes.append(f"order {order.id}: {note}")
    if changed:
        out.changes.append(f"order {order.id} updated")
        order.set("updated_at", utcnow())
        order.set("version", (order["version"] or 1) + 1)
    order.set("last_control", control)
    if event_time and not is_older(event_time, order["source_time"]):
        order.set("source_time", event_time)
    order.save(conn)
    if target != previous and target in CANCELLED:
        out.events.append(OrderCancelled(order_id=order.id, patient_id=order["patient_id"],
                                         accession=order["accession"], from_status=previous, status=target,
                                         control=control))
    elif changed or moved_from is not None:
        out.events.append(OrderChanged(order_id=order.id, patient_id=order["patient_id"], accession=order["accession"],
                                       from_status=previous, status=target, fields=tuple(fields),
                                       moved_from_patient=moved_from, control=control))
    return order


def advance_for_images(conn: Connection, order_id: int, target: str, note: str) -> tuple[str, str] | None:
    """Move an order forward because images arrived (IP) or the study is complete (CM), as a RIS
    expects without MPPS. Only forward; a cancelled or discontinued order keeps its status (the
    reconciliation records a finding instead). Returns (from, to) when it moved."""
    order = load(conn, ORDERS, ORDER_BY_ID, id=order_id)
    if order is None or not target:
        return None
    current = order["status"]
    if current not in IMAGE_STATUS_RANK or IMAGE_STATUS_RANK.get(target, -1) <= IMAGE_STATUS_RANK[current]:
        return None
    _history(conn, order.id, None, current, target, True, note, None, None)
    order.set("status", target)
    order.set("updated_at", utcnow())
    order.set("version", (order["version"] or 1) + 1)
    order.save(conn)
    return current, target
