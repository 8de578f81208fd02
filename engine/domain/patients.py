"""Patients: identity by (identifier, issuer), updates, merges with aliases.

Rules (documented for analysts in docs/domain-rules.md):
* Identity is (value, issuer). An identifier that was merged away stays as an ``alias`` of the
  surviving patient, so later messages and images under the old ID still resolve.
* A field the message leaves empty changes nothing; ``""`` clears it.
* An update whose event time (EVN-2, else MSH-7) is older than the newest one applied does not
  overwrite demographics; it is recorded as a note on the message.
* An update (A08/A31) for an unknown patient creates it (``update_creates_patient``), since the
  A04 it depends on may have been lost or sent to another interface.
* Every change a message makes is kept in patient_history with old and new values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypedDict

from sqlalchemy import Connection, select, update

from engine.domain.errors import DomainError
from engine.domain.events import Event, IdentifierAdded, PatientCreated, PatientMerged, PatientUpdated
from engine.domain.limits import check_length
from engine.domain.records import (
    IDENTIFIER,
    IDENTIFIERS,
    NOT_LOOKED_UP,
    ORDER_IDS_OF_PATIENT,
    ORDERS,
    PATIENT_BY_ID,
    PATIENT_BY_IDENTIFIER,
    PATIENT_HISTORY,
    PATIENTS,
    NotLookedUp,
    Record,
    add,
    add_many,
    identifier_owners,
    load,
)
from engine.domain.studies import STUDIES
from engine.domain.times import is_older
from engine.hl7 import errors as E
from engine.mappings.fields import ADDRESS_PARTS, MappedFields
from engine.store.models import Patient, PatientIdentifier
from engine.store.types import JsonObject, utcnow

DEMOGRAPHICS = ("family_name", "given_name", "middle_name", "prefix", "suffix", "birth_date", "sex")
MAX_MERGE_CHAIN = 32
MAX_ADDRESS_PART = 256  # each part of patient.address (JSON, so no column width says it)


class OutcomeSummary(TypedDict):
    patient_id: int | None
    order_ids: list[int]
    changes: list[str]
    notes: list[str]


@dataclass
class Outcome:
    """What applying one message did: kept on the message, and read by later stages.

    ``changes`` and ``notes`` are prose for people (the message history); ``events`` are what
    the domain raised, typed, for the caller to publish on the bus (nothing reads the prose).
    ``patient`` and ``orders`` are the rows as written (version, updated_at), so a caller that
    answers with them (FHIR) need not read them back."""

    patient_id: int | None = None
    order_ids: list[int] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    message_id: int | None = None  # the message being applied, for the history rows
    events: list[Event] = field(default_factory=list)
    patient: Record | None = None
    orders: list[Record] = field(default_factory=list)

    def as_dict(self) -> OutcomeSummary:
        return {"patient_id": self.patient_id, "order_ids": self.order_ids, "changes": self.changes,
                "notes": self.notes}


def get_patient(conn: Connection, patient_id: int) -> Record | None:
    return load(conn, PATIENTS, PATIENT_BY_ID, id=patient_id)


def surviving(conn: Connection, p: Record) -> Record:
    for _ in range(MAX_MERGE_CHAIN):
        nxt_id = p["merged_into_id"]
        if nxt_id is None:
            return p
        nxt = get_patient(conn, nxt_id)
        if nxt is None:
            return p
        p = nxt
    raise DomainError(f"merge chain of patient {p.id} is longer than {MAX_MERGE_CHAIN}")


def find_patient(conn: Connection, value: str, issuer: str = "") -> Record | None:
    """The patient an identifier belongs to, following merges to the survivor."""
    p = load(conn, PATIENTS, PATIENT_BY_IDENTIFIER, value=value, issuer=issuer)
    return None if p is None else surviving(conn, p)


def _identity(data: MappedFields) -> tuple[str, str]:
    pid = data.get("patient.id")
    if not pid:
        raise DomainError("the message has no patient identifier", code=E.REQUIRED_FIELD_MISSING,
                          field="patient.id")
    issuer = str(data.get("patient.issuer") or "")
    check_length(PatientIdentifier, "value", str(pid), "patient.id")
    check_length(PatientIdentifier, "issuer", issuer, "patient.issuer")
    check_length(PatientIdentifier, "type_code", data.get("patient.identifier_type"), "patient.identifier_type")
    return str(pid), issuer


def record(conn: Connection, patient_id: int, out: Outcome, kind: str, changes: JsonObject | None,
           source_time: str | None = None) -> None:
    """Keep what this message did to the patient (patient_history)."""
    add(conn, PATIENT_HISTORY, patient_id=patient_id, message_id=out.message_id, kind=kind, changes=changes,
        source_time=source_time)


def _demographics(data: MappedFields, current: Record | None, out: Outcome) -> dict[str, list[Any]]:
    """{field: [old, new]} for what the message changes; sets them on ``current`` when given."""
    diff: dict[str, list[Any]] = {}
    for name in DEMOGRAPHICS:
        key = f"patient.{name}"
        if key not in data:
            continue
        value = data[key]
        check_length(Patient, name, value, key)
        old = current.get(name) if current is not None else None
        if old != value:
            diff[name] = [old, value]
            out.changes.append(key)
    extra_keys = [k for k in data if k.startswith("patient.extra.")]
    if extra_keys:
        old_extra = dict((current.get("extra") if current is not None else None) or {})
        extra = dict(old_extra)
        for k in extra_keys:
            short = k[len("patient.extra."):]
            if data[k] is None:
                extra.pop(short, None)
            else:
                extra[short] = data[k]
        if extra != old_extra:
            for short in sorted(set(old_extra) | set(extra)):
                if old_extra.get(short) != extra.get(short):
                    diff[f"extra.{short}"] = [old_extra.get(short), extra.get(short)]
            diff["__extra__"] = [old_extra, extra]
            out.changes.append("patient.extra")
    address_keys = [f"patient.address.{part}" for part in ADDRESS_PARTS if f"patient.address.{part}" in data]
    if address_keys:  # the message's address replaces the stored one as a whole; all parts empty clear it
        for k in address_keys:
            if data[k] is not None and len(str(data[k])) > MAX_ADDRESS_PART:
                raise DomainError(f"{k} is {len(str(data[k]))} characters; at most {MAX_ADDRESS_PART} are kept",
                                  code=E.VALUE_TOO_LONG, field=k)
        address = {k.rsplit(".", 1)[1]: str(data[k]) for k in address_keys if data[k] not in (None, "")} or None
        old_address = current.get("address") if current is not None else None
        if address != old_address:
            diff["address"] = [old_address, address]
            out.changes.append("patient.address")
    return diff


def _columns(diff: dict[str, list[Any]]) -> dict[str, Any]:
    cols = {k: v[1] for k, v in diff.items() if k in DEMOGRAPHICS or k == "address"}
    if "__extra__" in diff:
        cols["extra"] = diff["__extra__"][1]
    return cols


def _public(diff: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {k: v for k, v in diff.items() if k != "__extra__"}


def _add_identifiers(conn: Connection, patient_id: int, data: MappedFields, out: Outcome,
                     first: dict[str, Any] | None = None) -> list[str]:
    """Keep the other identifiers the message lists (PID-3 repeats) on the patient its identity
    (patient.id, patient.issuer) found or created: that one is the patient's already, not looked up.
    ``first``: an identifier row of a new patient to insert with them (its primary identifier).

    One statement looks up the owners of all of them, one inserts every new one (with ``first``)."""
    items = []
    for item in data.get("patient.identifiers") or []:
        value = str(item.get("value") or "")
        issuer = str(item.get("issuer") or "")
        if not value:
            continue
        type_code = item.get("type")
        if len(value) > 64 or len(issuer) > 64 or (type_code and len(str(type_code)) > 16):
            out.notes.append(f"identifier {value[:20]}^{issuer[:20]} is too long to keep; skipped")
            continue
        items.append((value, issuer, type_code))
    rows: list[dict[str, Any]] = [first] if first is not None else []
    added: list[str] = []
    if items:
        identity = (str(data.get("patient.id") or ""), str(data.get("patient.issuer") or ""))
        others = list(dict.fromkeys((v, i) for v, i, _t in items if (v, i) != identity))
        owners = identifier_owners(conn, others) if others else {}
        owners[identity] = patient_id
        for value, issuer, type_code in items:
            owner = owners.get((value, issuer))
            if owner is None:
                rows.append({"patient_id": patient_id, "value": value, "issuer": issuer, "type_code": type_code,
                             "kind": "other"})
                owners[(value, issuer)] = patient_id
                added.append(f"{value}^{issuer}")
                out.changes.append(f"identifier {value}^{issuer} added")
            elif owner != patient_id:
                other = get_patient(conn, owner)
                if other is None or surviving(conn, other).id != patient_id:
                    out.notes.append(f"identifier {value}^{issuer} belongs to patient {owner}; not moved "
                                     "(send a merge to combine the two)")
    add_many(conn, IDENTIFIERS, rows)
    return added


def create_patient(conn: Connection, data: MappedFields, out: Outcome) -> Record:
    value, issuer = _identity(data)
    diff = _demographics(data, None, out)
    values: dict[str, Any] = {name: None for name in DEMOGRAPHICS}
    values.update(_columns(diff))
    values.setdefault("extra", None)
    values.setdefault("address", None)
    now = utcnow()
    pid = add(conn, PATIENTS, source_time=data.get("message.event_time"), created_at=now, updated_at=now, **values)
    out.changes.append(f"patient {pid} created")
    added = _add_identifiers(conn, pid, data, out, first={"patient_id": pid, "value": value, "issuer": issuer,
                                                          "type_code": data.get("patient.identifier_type"),
                                                          "kind": "primary"})
    fields = {k: v[1] for k, v in _public(diff).items()}
    record(conn, pid, out, "created", {"identifier": f"{value}^{issuer}", "fields": fields,
                                          **({"identifiers_added": added} if added else {})},
           data.get("message.event_time"))
    out.events.append(PatientCreated(patient_id=pid, identifier=f"{value}^{issuer}", fields=fields,
                                     identifiers_added=tuple(added)))
    return Record(PATIENTS, {"id": pid, **values, "source_time": data.get("message.event_time"),
                             "merged_into_id": None, "version": 1, "active": True, "created_at": now,
                             "updated_at": now})


def update_patient(conn: Connection, p: Record, data: MappedFields, out: Outcome, *,
                   ignore_stale: bool = True) -> None:
    event_time = data.get("message.event_time")
    if ignore_stale and is_older(event_time, p["source_time"]):
        out.notes.append(f"stale update: event time {event_time} is older than {p['source_time']} already "
                         "applied; demographics kept")
        # Identifiers are not demographics: an A01 overtaken by its A08 still brings its SSN, MPI ID...
        added = _add_identifiers(conn, p.id, data, out)
        if added:
            record(conn, p.id, out, "updated", {"fields": {}, "identifiers_added": added}, event_time)
            out.events.append(IdentifierAdded(patient_id=p.id, identifiers=tuple(added)))
        return
    diff = _demographics(data, p, out)
    for col, value in _columns(diff).items():
        p.set(col, value)
    if diff:
        p.set("version", p["version"] + 1)
        p.set("updated_at", utcnow())
    if event_time and not is_older(event_time, p["source_time"]):
        p.set("source_time", event_time)
    p.save(conn)
    added = _add_identifiers(conn, p.id, data, out)
    if diff or added:
        record(conn, p.id, out, "updated", {"fields": _public(diff),
                                                **({"identifiers_added": added} if added else {})}, event_time)
    if diff:
        out.events.append(PatientUpdated(patient_id=p.id, fields=_public(diff)))
    if added:
        out.events.append(IdentifierAdded(patient_id=p.id, identifiers=tuple(added)))


def upsert_patient(conn: Connection, data: MappedFields, out: Outcome, *, create: bool = True,
                   update: bool = True, ignore_stale: bool = True,
                   found: Record | None | NotLookedUp = NOT_LOOKED_UP) -> Record:
    """``found``: what ``find_patient`` gave the caller for this message's identifier, if it asked."""
    value, issuer = _identity(data)
    p = find_patient(conn, value, issuer) if found is NOT_LOOKED_UP else found
    if p is None:
        if not create:
            raise DomainError(f"patient {value}^{issuer} is not known", code=E.UNKNOWN_KEY, field="patient.id")
        p = create_patient(conn, data, out)
    elif update:
        update_patient(conn, p, data, out, ignore_stale=ignore_stale)
    out.patient_id = p.id
    out.patient = p
    return p


def merge_patients(conn: Connection, data: MappedFields, out: Outcome, *, ignore_stale: bool = True) -> Record:
    """A40/A34/A18: the prior identifier (MRG-1) joins the surviving patient (PID-3) as an alias."""
    value, issuer = _identity(data)
    prior_value = data.get("merge.prior_id")
    if not prior_value:
        raise DomainError("merge without a prior patient identifier (MRG-1)", code=E.REQUIRED_FIELD_MISSING,
                          field="merge.prior_id")
    prior_value = str(prior_value)
    prior_issuer = str(data.get("merge.prior_issuer") or "")
    check_length(PatientIdentifier, "value", prior_value, "merge.prior_id")
    check_length(PatientIdentifier, "issuer", prior_issuer, "merge.prior_issuer")
    if (prior_value, prior_issuer) == (value, issuer):
        raise DomainError("merge of a patient into itself (MRG-1 equals PID-3)", code=E.DUPLICATE_KEY,
                          field="merge.prior_id")
    survivor = find_patient(conn, value, issuer)
    prior_ident = load(conn, IDENTIFIERS, IDENTIFIER, value=prior_value, issuer=prior_issuer)
    prior = None
    if prior_ident is not None:
        owner = get_patient(conn, prior_ident["patient_id"])
        prior = surviving(conn, owner) if owner is not None else None

    if survivor is None and prior is not None:
        # Identifier change: the record keeps living under the new ID.
        add(conn, IDENTIFIERS, patient_id=prior.id, value=value, issuer=issuer,
            type_code=data.get("patient.identifier_type"), kind="primary")
        conn.execute(update(IDENTIFIERS).where(IDENTIFIERS.c.value == prior_value,
                                                  IDENTIFIERS.c.issuer == prior_issuer).values(kind="alias"))
        out.changes.append(f"patient {prior.id} now identified as {value}^{issuer}; "
                           f"{prior_value}^{prior_issuer} kept as alias")
        record(conn, prior.id, out, "identifier", {"new": f"{value}^{issuer}",
                                                      "alias": f"{prior_value}^{prior_issuer}"})
        out.events.append(IdentifierAdded(patient_id=prior.id, identifiers=(f"{value}^{issuer}",),
                                          replaces=f"{prior_value}^{prior_issuer}"))
        update_patient(conn, prior, data, out, ignore_stale=ignore_stale)
        out.patient_id, out.patient = prior.id, prior
        return prior
    if survivor is None:
        survivor = create_patient(conn, data, out)
    else:
        update_patient(conn, survivor, data, out, ignore_stale=ignore_stale)
    out.patient_id, out.patient = survivor.id, survivor
    if prior is None:
        # PID-3 may list the prior identifier too: the create/update above then added it to the
        # survivor as one of its identifiers; it becomes the alias instead of a second row
        listed = load(conn, IDENTIFIERS, IDENTIFIER, value=prior_value, issuer=prior_issuer)
        if listed is None:
            add(conn, IDENTIFIERS, patient_id=survivor.id, value=prior_value, issuer=prior_issuer, kind="alias")
        else:
            conn.execute(update(IDENTIFIERS).where(IDENTIFIERS.c.id == listed.id).values(kind="alias"))
        record(conn, survivor.id, out, "merged", {"alias": f"{prior_value}^{prior_issuer}", "prior_known": False})
        out.events.append(PatientMerged(patient_id=survivor.id, merged_patient_id=None,
                                        alias=f"{prior_value}^{prior_issuer}"))
        out.notes.append(f"prior patient {prior_value}^{prior_issuer} was not known; kept as an alias of patient "
                         f"{survivor.id} so later messages under it resolve")
        return survivor
    if prior.id == survivor.id:
        out.notes.append(f"{prior_value}^{prior_issuer} is already merged into patient {survivor.id}")
        return survivor
    # Both known: move identifiers (as aliases) and orders to the survivor, retire the prior record.
    conn.execute(update(IDENTIFIERS).where(IDENTIFIERS.c.patient_id == prior.id)
                    .values(patient_id=survivor.id, kind="alias"))
    moved = list(conn.execute(ORDER_IDS_OF_PATIENT, {"patient_id": prior.id}).scalars())  # merges are rare
    if moved:
        conn.execute(update(ORDERS).where(ORDERS.c.patient_id == prior.id).values(patient_id=survivor.id))
    studies = list(conn.execute(select(STUDIES.c.id).where(STUDIES.c.patient_id == prior.id)).scalars())
    if studies:  # reconciliation then coerces them to the survivor (on the patient.merged event)
        conn.execute(update(STUDIES).where(STUDIES.c.patient_id == prior.id).values(patient_id=survivor.id))
    prior.set("merged_into_id", survivor.id)
    prior.set("active", False)
    prior.set("version", prior["version"] + 1)
    prior.set("updated_at", utcnow())
    prior.save(conn)
    survivor.set("version", survivor["version"] + 1)
    survivor.save(conn)
    out.changes.append(f"patient {prior.id} merged into {survivor.id}: {len(moved)} order(s) and "
                       f"{len(studies)} study(ies) moved, identifiers kept as aliases")
    record(conn, survivor.id, out, "merged", {"prior_patient": prior.id, "alias": f"{prior_value}^{prior_issuer}",
                                                 "orders_moved": moved, "studies_moved": studies})
    record(conn, prior.id, out, "merged_away", {"into": survivor.id, "orders_moved": moved, "studies_moved": studies})
    out.events.append(PatientMerged(patient_id=survivor.id, merged_patient_id=prior.id,
                                    alias=f"{prior_value}^{prior_issuer}", orders_moved=tuple(moved),
                                    studies_moved=tuple(studies)))
    return survivor
