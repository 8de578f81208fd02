"""Rows to JSON for the admin API and the CLI."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from engine.store.models import (
    DomainEvent,
    Finding,
    Message,
    Order,
    OrderStatusChange,
    Patient,
    ReconcileJob,
    Study,
)
from engine.store.states import FindingStatus


def _ts(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt is not None else None


def patient_identity(p: Patient) -> dict[str, Any]:
    """The patient's id, its identifiers (value, issuer, type) and its aliases (identifiers merged
    into it), as /api/patients and /api/orders show them."""
    idents = [{"value": i.value, "issuer": i.issuer, "type": i.type_code, "kind": i.kind} for i in p.identifiers]
    return {"id": p.id, "identifiers": [i for i in idents if i["kind"] != "alias"],
            "aliases": [i for i in idents if i["kind"] == "alias"]}


def patient_json(p: Patient, *, orders: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        **patient_identity(p),
        "name": {"family": p.family_name, "given": p.given_name, "middle": p.middle_name, "prefix": p.prefix,
                 "suffix": p.suffix},
        "birth_date": p.birth_date,
        "sex": p.sex,
        "address": p.address,
        "extra": p.extra or {},
        "active": p.active,
        "merged_into": p.merged_into_id,
        "version": p.version,
        "created_at": _ts(p.created_at),
        "updated_at": _ts(p.updated_at),
        "source_time": p.source_time,
    }
    if orders:
        out["orders"] = [order_json(o, history=False) for o in p.orders]
        out["history"] = [{"at": _ts(h.at), "kind": h.kind, "changes": h.changes, "message_id": h.message_id,
                           "source_time": h.source_time} for h in p.history]
        out["studies"] = []  # filled by the API: studies linked to the patient or carrying its IDs
    return out


def history_json(h: OrderStatusChange) -> dict[str, Any]:
    return {"at": _ts(h.at), "control": h.control, "from": h.from_status, "to": h.to_status, "applied": h.applied,
            "note": h.note, "message_id": h.message_id, "source_time": h.source_time}


def order_json(o: Order, *, history: bool = True, patient: bool = False) -> dict[str, Any]:
    """An order; with ``patient``, its patient's identifiers and aliases under "patient" (an order
    read on its own is otherwise known only by an internal patient_id)."""
    out: dict[str, Any] = {
        "id": o.id, "patient_id": o.patient_id, "status": o.status, "last_control": o.last_control,
        "placer_number": o.placer_number, "placer_issuer": o.placer_issuer, "filler_number": o.filler_number,
        "accession": o.accession, "procedure": {"code": o.procedure_code, "text": o.procedure_text,
                                                "scheme": o.procedure_scheme},
        "modality": o.modality, "scheduled_at": o.scheduled_at.isoformat() if o.scheduled_at else None,
        "station_aet": o.station_aet, "priority": o.priority, "requested_procedure_id": o.requested_procedure_id,
        "sps_id": o.sps_id, "study_uid": o.study_uid, "reason": o.reason, "ordering_provider": o.ordering_provider,
        "extra": o.extra or {}, "created_at": _ts(o.created_at), "updated_at": _ts(o.updated_at),
    }
    if patient:
        out["patient"] = patient_identity(o.patient)
    if history:
        out["history"] = [history_json(h) for h in o.history]
    return out


def message_json(m: Message, *, content: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": m.id, "channel": m.channel, "direction": m.direction, "protocol": m.protocol,
        "received_at": _ts(m.received_at), "remote": m.remote, "control_id": m.control_id,
        "sending_app": m.sending_app, "sending_facility": m.sending_facility, "type": m.message_type,
        "version": m.version, "charset": m.charset, "size": m.size, "status": m.status, "ack_code": m.ack_code,
        "error": m.error, "processed_at": _ts(m.processed_at), "duplicate_of": m.duplicate_of,
        "patient_id": m.patient_id, "attempts": m.attempts, "content_pruned": m.content_pruned,
        "events": [{"at": _ts(e.at), "kind": e.kind, "detail": e.detail} for e in m.events],
    }
    if content and m.content is not None:
        c = m.content
        out["raw"] = c.raw.decode(m.charset or "utf-8", errors="replace")
        out["mapped"] = c.mapped
        out["ack"] = c.ack
    return out


def finding_json(f: Finding) -> dict[str, Any]:
    return {"id": f.id, "at": _ts(f.at), "kind": f.kind, "severity": f.severity, "attribute": f.attribute,
            "received": f.received, "expected": f.expected, "action": f.action, "status": f.status,
            "resolved_at": _ts(f.resolved_at), "resolution": f.resolution, "detail": f.detail}


def reconciliation_json(st: Study, *, findings: bool = True, job: ReconcileJob | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "state": st.recon_state, "matched_by": st.matched_by, "reconciled_at": _ts(st.reconciled_at),
        "times_reconciled": st.times_reconciled,
        "manual": ({"order_id": st.manual_order_id, "patient_id": st.manual_patient_id}
                   if st.manual_order_id or st.manual_patient_id else None),
        "queued": ({"reasons": job.reasons.split(","), "attempts": job.attempts, "last_error": job.last_error,
                    "next_at": _ts(job.next_at), "leased_by": job.leased_by} if job is not None else None),
    }
    if findings:
        out["open_findings"] = sum(1 for f in st.findings if f.status == FindingStatus.OPEN and f.severity != "info")
        out["findings"] = [finding_json(f) for f in st.findings]
    return out


def study_json(st: Study, *, series: bool = True, events: list[DomainEvent] | None = None,
               findings: bool = False, job: ReconcileJob | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": st.id, "study_uid": st.study_uid, "accession": st.accession, "state": st.state,
        "patient": {"id": st.dicom_patient_id, "issuer": st.dicom_issuer, "name": st.patient_name,
                    "birth_date": st.patient_birth_date, "sex": st.patient_sex},
        "study_date": st.study_date, "study_time": st.study_time, "study_id": st.study_id,
        "description": st.description, "referring_physician": st.referring_physician,
        "modalities": st.modalities.split("\\") if st.modalities else [],
        "number_of_series": st.num_series, "number_of_instances": st.num_instances, "size_bytes": st.size_bytes,
        "first_received_at": _ts(st.first_received_at), "last_received_at": _ts(st.last_received_at),
        "stable_at": _ts(st.stable_at) if st.stable_at else None, "times_stable": st.times_stable,
        "channel": st.channel, "patient_id": st.patient_id, "order_id": st.order_id,
        "reconciliation": reconciliation_json(st, findings=findings, job=job),
    }
    if series:
        out["series"] = [{"series_uid": se.series_uid, "modality": se.modality, "number": se.series_number,
                          "description": se.description, "body_part": se.body_part,
                          "number_of_instances": se.num_instances} for se in st.series]
    if events is not None:
        out["events"] = [{"id": e.id, "at": _ts(e.at), "kind": e.kind, "detail": e.detail} for e in events]
    return out
