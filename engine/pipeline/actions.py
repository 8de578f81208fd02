"""Route actions: what a mapped message does to the domain."""

from __future__ import annotations

from sqlalchemy import Connection

from engine.channels import DomainOptions
from engine.domain.errors import DomainError
from engine.domain.events import EventBus
from engine.domain.orders import apply_order
from engine.domain.patients import Outcome, merge_patients, upsert_patient
from engine.domain.records import NOT_LOOKED_UP, NotLookedUp, Record
from engine.mappings.fields import MappedFields


def apply_action(conn: Connection, action: str, values: MappedFields, groups: list[MappedFields],
                 options: DomainOptions, message_id: int | None, *, bus: EventBus,
                 found: Record | None | NotLookedUp = NOT_LOOKED_UP) -> Outcome:
    """Apply one message. ``values`` are the message-level fields, ``groups`` one dict per order group.
    ``found``: the patient (patient actions) or the order (one order group) the caller already looked
    up for these values, so the domain does not read it again.

    The events the domain raised are published on ``bus`` last, in the caller's transaction (one
    INSERT for all of them; the subscribers' writes commit or roll back with the message)."""
    out = Outcome(message_id=message_id)
    stale = options.ignore_stale_updates
    if action == "patient.upsert":
        upsert_patient(conn, values, out, ignore_stale=stale, found=found)
    elif action == "patient.update":
        upsert_patient(conn, values, out, create=options.update_creates_patient, ignore_stale=stale, found=found)
    elif action == "patient.merge":
        merge_patients(conn, values, out, ignore_stale=stale)
    elif action == "order":
        if not groups:
            groups = [{}]
        if len(groups) > 1:
            found = NOT_LOOKED_UP  # one lookup cannot stand for several orders
        for index, group in enumerate(groups):
            try:
                apply_order(conn, {**values, **group}, out, message_id=message_id,
                            orders_update_patient=options.orders_update_patient, ignore_stale=stale, found=found)
            except DomainError as exc:
                exc.group = index  # so the ERR segment names this order's segment (ORC[2]-1)
                raise
    elif action != "ignore":
        raise ValueError(f"unknown action {action!r}")
    bus.publish_all(conn, out.events)
    return out
