"""What the store holds, as FHIR R4 resources: Patient, ServiceRequest and ImagingStudy reads.

Ids are the store's row ids. A patient merged into another reads with ``active: false`` and a
``replaced-by`` link to the survivor; the survivor links back with ``replaces``. ImagingStudy is
built by the same outbound mapping the engine sends to the EHR (fhir-imagingstudy by default), with
its references pointing at this server's Patient and ServiceRequest.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select

from engine.domain.records import IDENTIFIERS, ORDERS, PATIENTS
from engine.domain.studies import STUDIES
from engine.outbound.context import EngineInfo, build_context, system_of
from engine.outbound.mapping import OutboundMapping, RenderError, Scope
from engine.outbound.render import build_resource, prune_empty
from engine.pipeline.fhir_search import GENDER, SR_STATUS, V2_0203

CODE_SYSTEMS = {"LN": "http://loinc.org", "SCT": "http://snomed.info/sct", "RADLEX": "http://www.radlex.org"}
PRIORITY = {"STAT": "stat", "ASAP": "asap", "ROUTINE": "routine", "PREOP": "urgent", "CALLBACK": "routine",
            "TIMING": "routine"}


def instant(dt: datetime | None) -> str | None:
    """A stored (naive UTC) time as a FHIR instant."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _meta(version: int | None, updated: datetime | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"versionId": str(version or 1)}
    if updated is not None:
        meta["lastUpdated"] = instant(updated)
    return meta


def _identifier(i: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"system": system_of(i["issuer"]), "value": i["value"]}
    if i["kind"] == "alias":
        out["use"] = "old"
    elif i["kind"] == "primary":
        out["use"] = "usual"
    if i["type_code"]:
        out["type"] = {"coding": [{"system": V2_0203, "code": i["type_code"]}]}
    return out


# HL7 table 0190 address type (PID-11.7) -> FHIR Address.use / Address.type
ADDRESS_USE = {"H": "home", "B": "work", "O": "work", "C": "temp", "BA": "old", "BI": "billing"}
ADDRESS_TYPE = {"M": "postal"}


def address(a: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The stored address (patients.address) as FHIR R4 Patient.address ([] when none is known)."""
    if not a:
        return []
    kind = str(a.get("type") or "").upper()
    return [{"use": ADDRESS_USE.get(kind), "type": ADDRESS_TYPE.get(kind),
             "line": [line for line in (a.get("street"), a.get("other")) if line],
             "city": a.get("city"), "state": a.get("state"), "postalCode": a.get("postal_code"),
             "country": a.get("country")}]


def patients(conn: Connection, ids: list[int]) -> dict[int, dict[str, Any]]:
    if not ids:
        return {}
    rows = {r["id"]: r for r in conn.execute(select(PATIENTS).where(PATIENTS.c.id.in_(ids))).mappings()}
    idents: dict[int, list[dict[str, Any]]] = {}
    for r in conn.execute(select(IDENTIFIERS).where(IDENTIFIERS.c.patient_id.in_(ids))
                          .order_by(IDENTIFIERS.c.kind != "primary", IDENTIFIERS.c.id)).mappings():
        idents.setdefault(r["patient_id"], []).append(dict(r))
    absorbed: dict[int, list[int]] = {}
    for pid_, into in conn.execute(select(PATIENTS.c.id, PATIENTS.c.merged_into_id)
                                   .where(PATIENTS.c.merged_into_id.in_(ids))):
        absorbed.setdefault(int(into), []).append(int(pid_))
    out = {}
    for pid, p in rows.items():
        given = [g for g in (p["given_name"], p["middle_name"]) if g]
        links = [{"other": {"reference": f"Patient/{p['merged_into_id']}"}, "type": "replaced-by"}] \
            if p["merged_into_id"] else []
        links += [{"other": {"reference": f"Patient/{o}"}, "type": "replaces"} for o in absorbed.get(pid, [])]
        res = {
            "resourceType": "Patient", "id": str(pid), "meta": _meta(p["version"], p["updated_at"]),
            "identifier": [_identifier(i) for i in idents.get(pid, [])],
            "active": bool(p["active"]),
            "name": [{"use": "official", "family": p["family_name"], "given": given,
                      "prefix": [p["prefix"]] if p["prefix"] else None,
                      "suffix": [p["suffix"]] if p["suffix"] else None}],
            "gender": GENDER.get((p["sex"] or "").upper()),
            "birthDate": p["birth_date"],
            "address": address(p["address"]),
            "link": links,
        }
        prune_empty(res)
        out[pid] = res
    return out


def _local_datetime(dt: datetime | None) -> str | None:
    """An order's scheduled time is kept as the RIS sent it (its local time): say so with our offset."""
    if dt is None:
        return None
    return dt.astimezone().isoformat(timespec="seconds") if dt.tzinfo is None else dt.isoformat(timespec="seconds")


def service_requests(conn: Connection, ids: list[int]) -> dict[int, dict[str, Any]]:
    if not ids:
        return {}
    out = {}
    for o in conn.execute(select(ORDERS).where(ORDERS.c.id.in_(ids))).mappings():
        idents = []
        for code, col, system in (("PLAC", "placer_number", system_of(o["placer_issuer"])),
                                  ("FILL", "filler_number", None), ("ACSN", "accession", None)):
            if o[col]:
                idents.append({"type": {"coding": [{"system": V2_0203, "code": code}]}, "system": system,
                               "value": o[col]})
        if o["study_uid"]:
            idents.append({"system": "urn:dicom:uid", "value": f"urn:oid:{o['study_uid']}"})
        coding = {"system": CODE_SYSTEMS.get((o["procedure_scheme"] or "").upper(), o["procedure_scheme"]
                                             if o["procedure_scheme"] and ":" in o["procedure_scheme"] else None),
                  "code": o["procedure_code"], "display": o["procedure_text"]}
        res = {
            "resourceType": "ServiceRequest", "id": str(o["id"]), "meta": _meta(o["version"], o["updated_at"]),
            "identifier": idents,
            "status": SR_STATUS.get(o["status"], "unknown"),
            "intent": "order",
            "priority": PRIORITY.get((o["priority"] or "").upper()),
            "code": {"coding": [coding] if o["procedure_code"] else [], "text": o["procedure_text"]},
            "subject": {"reference": f"Patient/{o['patient_id']}"},
            "occurrenceDateTime": _local_datetime(o["scheduled_at"]),
            "authoredOn": instant(o["created_at"]),
            "requester": {"display": o["ordering_provider"]} if o["ordering_provider"] else None,
            "reasonCode": [{"text": o["reason"]}] if o["reason"] else None,
        }
        if o["modality"]:
            res["category"] = [{"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM",
                                            "code": o["modality"]}]}]
        prune_empty(res)
        out[int(o["id"])] = res
    return out


_LOCAL_REF = re.compile(r"^(Patient|ServiceRequest)\?")


def imaging_studies(conn: Connection, ids: list[int], mapping: OutboundMapping, info: EngineInfo
                    ) -> dict[int, dict[str, Any]]:
    """Studies placed with a patient, as the mapping builds them, pointing at our own resources."""
    if not ids:
        return {}
    out = {}
    for st in conn.execute(select(STUDIES.c.id, STUDIES.c.patient_id, STUDIES.c.order_id, STUDIES.c.state,
                                  STUDIES.c.last_received_at, STUDIES.c.reconciled_at, STUDIES.c.times_reconciled)
                           .where(STUDIES.c.id.in_(ids), STUDIES.c.patient_id.is_not(None))).mappings():
        ctx = build_context(conn, st["id"], event="study.read", engine=info)
        try:
            res = build_resource(mapping, Scope(ctx))
            prune_empty(res)
        except RenderError as exc:
            res = {"resourceType": "ImagingStudy", "status": "unknown",
                   "note": [{"text": f"the ImagingStudy mapping could not build this study: {exc}"}]}
        res["id"] = str(st["id"])
        updated = st["reconciled_at"] or st["last_received_at"]  # as _lastUpdated searches it
        res["meta"] = _meta((st["times_reconciled"] or 0) + 1, updated)
        if st["state"] == "receiving":
            res["status"] = "registered"  # images still arriving
        subject = dict(res.get("subject") or {})
        subject["reference"] = f"Patient/{st['patient_id']}"
        subject.pop("identifier", None)
        res["subject"] = subject
        if st["order_id"]:
            res["basedOn"] = [{"reference": f"ServiceRequest/{st['order_id']}"}]
        else:
            res.pop("basedOn", None)
        out[int(st["id"])] = res
    return out


def patient_ids_of(resource_type: str, resources: list[dict[str, Any]]) -> list[int]:
    """Whose data these resources are (for the audit trail)."""
    ids: set[int] = set()
    for r in resources:
        if resource_type == "Patient":
            ids.add(int(r["id"]))
        else:
            ref = str((r.get("subject") or {}).get("reference") or "")
            if ref.startswith("Patient/") and ref[8:].isdigit():
                ids.add(int(ref[8:]))
    return sorted(ids)


def version_of(resource: dict[str, Any]) -> str:
    return str((resource.get("meta") or {}).get("versionId") or "1")
