"""Patients: identity by (identifier, issuer), updates, merges with aliases.

Rules (documented for analysts in docs/domain-rules.md):
* Identity is (value, issuer). An identifier that was merged away stays as an ``alias`` of the
  surviving patient, so later messages and images under the old ID still resolve.
* A field the message leaves empty changes nothing; ``""`` clears it.
* An update whose event time (EVN-2, else MSH-7) is older than the newest one applied does not
  overwrite demographics; it is recorded as a note on the message.
* An update (A08/A31) for an unknown patient creates it (``update_creates_patient``), since the
  A04 it depends on may have been lost or sent to another interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.domain.errors import DomainError
from engine.domain.limits import check_length
from engine.domain.times import is_older
from engine.hl7 import errors as E
from engine.store.models import Order, Patient, PatientChange, PatientIdentifier
from engine.store.types import utcnow

DEMOGRAPHICS = ("family_name", "given_name", "middle_name", "prefix", "suffix", "birth_date", "sex")
MAX_MERGE_CHAIN = 32


@dataclass
class Outcome:
    """What applying one message did: kept on the message, and read by later stages."""

    patient_id: int | None = None
    order_ids: list[int] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    message_id: int | None = None  # the message being applied, for the history rows

    def as_dict(self) -> dict[str, Any]:
        return {"patient_id": self.patient_id, "order_ids": self.order_ids, "changes": self.changes,
                "notes": self.notes}


def find_patient(session: Session, value: str, issuer: str = "") -> Patient | None:
    """The patient an identifier belongs to, following merges to the survivor."""
    ident = session.execute(
        select(PatientIdentifier).where(PatientIdentifier.value == value, PatientIdentifier.issuer == issuer)
    ).scalar_one_or_none()
    if ident is None:
        return None
    return surviving(session, ident.patient)


def surviving(session: Session, patient: Patient) -> Patient:
    for _ in range(MAX_MERGE_CHAIN):
        if patient.merged_into_id is None:
            return patient
        nxt = session.get(Patient, patient.merged_into_id)
        if nxt is None:
            return patient
        patient = nxt
    raise DomainError(f"merge chain of patient {patient.id} is longer than {MAX_MERGE_CHAIN}")


def _identity(data: dict[str, Any]) -> tuple[str, str]:
    pid = data.get("patient.id")
    if not pid:
        raise DomainError("the message has no patient identifier", code=E.REQUIRED_FIELD_MISSING,
                          field="patient.id")
    issuer = str(data.get("patient.issuer") or "")
    check_length(PatientIdentifier, "value", str(pid), "patient.id")
    check_length(PatientIdentifier, "issuer", issuer, "patient.issuer")
    return str(pid), issuer


def record(session: Session, p: Patient, out: Outcome, kind: str, changes: dict[str, Any] | None,
           source_time: str | None = None) -> None:
    """Keep what this message did to the patient (patient_history)."""
    session.add(PatientChange(patient=p, message_id=out.message_id, kind=kind, changes=changes,
                              source_time=source_time))


def _set_demographics(p: Patient, data: dict[str, Any], out: Outcome) -> dict[str, list[Any]]:
    """Apply the message's demographics; returns {field: [old, new]} for what changed."""
    diff: dict[str, list[Any]] = {}
    for name in DEMOGRAPHICS:
        key = f"patient.{name}"
        check_length(Patient, name, data.get(key), key)
        if key in data and getattr(p, name) != data[key]:
            diff[name] = [getattr(p, name), data[key]]
            setattr(p, name, data[key])
            out.changes.append(f"patient.{name}")
    extra_keys = [k for k in data if k.startswith("patient.extra.")]
    if extra_keys:
        old = dict(p.extra or {})
        extra = dict(old)
        for k in extra_keys:
            short = k[len("patient.extra."):]
            if data[k] is None:
                extra.pop(short, None)
            else:
                extra[short] = data[k]
        if extra != old:
            for short in sorted(set(old) | set(extra)):
                if old.get(short) != extra.get(short):
                    diff[f"extra.{short}"] = [old.get(short), extra.get(short)]
            p.extra = extra
            out.changes.append("patient.extra")
    return diff


def _add_identifiers(session: Session, p: Patient, data: dict[str, Any], out: Outcome) -> list[str]:
    added: list[str] = []
    for item in data.get("patient.identifiers") or []:
        value = str(item.get("value") or "")
        if not value:
            continue
        issuer = str(item.get("issuer") or "")
        if len(value) > 64 or len(issuer) > 64:
            out.notes.append(f"identifier {value[:20]}...^{issuer[:20]} is too long to keep; skipped")
            continue
        owner = session.execute(
            select(PatientIdentifier).where(PatientIdentifier.value == value, PatientIdentifier.issuer == issuer)
        ).scalar_one_or_none()
        if owner is None:
            session.add(PatientIdentifier(patient=p, value=value, issuer=issuer, type_code=item.get("type"),
                                          kind="other"))
            added.append(f"{value}^{issuer}")
            out.changes.append(f"identifier {value}^{issuer} added")
        elif owner.patient_id != p.id and surviving(session, owner.patient).id != p.id:
            out.notes.append(f"identifier {value}^{issuer} belongs to patient {owner.patient_id}; not moved "
                             "(send a merge to combine the two)")
    return added


def create_patient(session: Session, data: dict[str, Any], out: Outcome) -> Patient:
    value, issuer = _identity(data)
    p = Patient(source_time=data.get("message.event_time"), extra=None)
    p.identifiers.append(PatientIdentifier(value=value, issuer=issuer, type_code=data.get("patient.identifier_type"),
                                           kind="primary"))
    created = _set_demographics(p, data, out)
    session.add(p)
    session.flush()
    out.changes.append(f"patient {p.id} created")
    added = _add_identifiers(session, p, data, out)
    record(session, p, out, "created", {"identifier": f"{value}^{issuer}", "fields": {k: v[1] for k, v in created.items()},
                                        **({"identifiers_added": added} if added else {})},
           data.get("message.event_time"))
    return p


def update_patient(session: Session, p: Patient, data: dict[str, Any], out: Outcome, *,
                   ignore_stale: bool = True) -> None:
    event_time = data.get("message.event_time")
    if ignore_stale and is_older(event_time, p.source_time):
        out.notes.append(f"stale update: event time {event_time} is older than {p.source_time} already applied; "
                         "demographics kept")
        return
    diff = _set_demographics(p, data, out)
    if diff:
        p.version += 1
        p.updated_at = utcnow()
    if event_time and not is_older(event_time, p.source_time):
        p.source_time = event_time
    added = _add_identifiers(session, p, data, out)
    if diff or added:
        record(session, p, out, "updated", {"fields": diff, **({"identifiers_added": added} if added else {})},
               event_time)


def upsert_patient(session: Session, data: dict[str, Any], out: Outcome, *, create: bool = True,
                   update: bool = True, ignore_stale: bool = True) -> Patient:
    value, issuer = _identity(data)
    p = find_patient(session, value, issuer)
    if p is None:
        if not create:
            raise DomainError(f"patient {value}^{issuer} is not known", code=E.UNKNOWN_KEY, field="patient.id")
        p = create_patient(session, data, out)
    elif update:
        update_patient(session, p, data, out, ignore_stale=ignore_stale)
    out.patient_id = p.id
    return p


def merge_patients(session: Session, data: dict[str, Any], out: Outcome, *, ignore_stale: bool = True) -> Patient:
    """A40/A34/A18: the prior identifier (MRG-1) joins the surviving patient (PID-3) as an alias."""
    value, issuer = _identity(data)
    prior_value = data.get("merge.prior_id")
    if not prior_value:
        raise DomainError("merge without a prior patient identifier (MRG-1)", code=E.REQUIRED_FIELD_MISSING,
                          field="merge.prior_id")
    prior_issuer = str(data.get("merge.prior_issuer") or "")
    if (str(prior_value), prior_issuer) == (value, issuer):
        raise DomainError("merge of a patient into itself (MRG-1 equals PID-3)", code=E.DUPLICATE_KEY,
                          field="merge.prior_id")
    survivor = find_patient(session, value, issuer)
    prior_ident = session.execute(
        select(PatientIdentifier).where(PatientIdentifier.value == str(prior_value),
                                        PatientIdentifier.issuer == prior_issuer)
    ).scalar_one_or_none()
    prior = surviving(session, prior_ident.patient) if prior_ident else None

    if survivor is None and prior is not None:
        # Identifier change: the record keeps living under the new ID.
        session.add(PatientIdentifier(patient=prior, value=value, issuer=issuer,
                                      type_code=data.get("patient.identifier_type"), kind="primary"))
        _demote_to_alias(prior, str(prior_value), prior_issuer)
        out.changes.append(f"patient {prior.id} now identified as {value}^{issuer}; {prior_value}^{prior_issuer} kept as alias")
        record(session, prior, out, "identifier", {"new": f"{value}^{issuer}",
                                                   "alias": f"{prior_value}^{prior_issuer}"})
        update_patient(session, prior, data, out, ignore_stale=ignore_stale)
        out.patient_id = prior.id
        return prior
    if survivor is None:
        survivor = create_patient(session, data, out)
    else:
        update_patient(session, survivor, data, out, ignore_stale=ignore_stale)
    out.patient_id = survivor.id
    if prior is None:
        session.add(PatientIdentifier(patient=survivor, value=str(prior_value), issuer=prior_issuer, kind="alias"))
        record(session, survivor, out, "merged", {"alias": f"{prior_value}^{prior_issuer}", "prior_known": False})
        out.notes.append(f"prior patient {prior_value}^{prior_issuer} was not known; kept as an alias of patient "
                         f"{survivor.id} so later messages under it resolve")
        return survivor
    if prior.id == survivor.id:
        out.notes.append(f"{prior_value}^{prior_issuer} is already merged into patient {survivor.id}")
        return survivor
    # Both known: move identifiers (as aliases) and orders to the survivor, retire the prior record.
    for ident in list(prior.identifiers):
        ident.patient = survivor
        ident.kind = "alias"
    moved = session.execute(select(Order).where(Order.patient_id == prior.id)).scalars().all()
    for order in moved:
        order.patient_id = survivor.id
    prior.merged_into_id = survivor.id
    prior.active = False
    prior.updated_at = utcnow()
    survivor.version += 1
    out.changes.append(f"patient {prior.id} merged into {survivor.id}: {len(moved)} order(s) moved, "
                       f"identifiers kept as aliases")
    moved_ids = [o.id for o in moved]
    record(session, survivor, out, "merged", {"prior_patient": prior.id, "alias": f"{prior_value}^{prior_issuer}",
                                              "orders_moved": moved_ids})
    record(session, prior, out, "merged_away", {"into": survivor.id, "orders_moved": moved_ids})
    return survivor


def _demote_to_alias(p: Patient, value: str, issuer: str) -> None:
    for ident in p.identifiers:
        if ident.value == value and ident.issuer == issuer:
            ident.kind = "alias"
