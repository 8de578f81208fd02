"""An audit trail row as a FHIR R4 AuditEvent in the IHE ATNA shape (for a SIEM or an ATNA
repository): ``type`` and ``subtype`` from DICOM's DCM code system (110110 Patient Record, 110112
Query, 110100 Application Activity with 110120/110121 start/stop, 110113 Security Alert for
configuration and token changes) plus RadBridge's own action code; one agent, the requestor (who,
network address, client certificate subject); the engine as the source; entities for the patients
(Patient/<index id>), the study (its Study Instance UID), the message and the delivery.

Built from the plain dict of engine/store/audit.py ``event_json`` (this layer sits below the
store); tests/test_audit_trail.py validates the result with fhir.resources' R4B AuditEvent.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

DCM = "http://dicom.nema.org/resources/ontology/DCM"
ACTION_SYSTEM = "urn:radbridge:audit-action"  # our own action codes (reprocess, retry...)
REST = "http://hl7.org/fhir/restful-interaction"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"

# action -> (DCM event type, its display, DCM subtype or None, FHIR action code C/R/U/D/E)
EVENT_TYPES: dict[str, tuple[str, str, tuple[str, str] | None, str]] = {
    "read": ("110110", "Patient Record", None, "R"),
    "vread": ("110110", "Patient Record", None, "R"),
    "search": ("110112", "Query", None, "E"),
    "reprocess": ("110110", "Patient Record", None, "U"),
    "retry": ("110106", "Export", None, "E"),
    "discard": ("110110", "Patient Record", None, "U"),
    "match": ("110110", "Patient Record", None, "U"),
    "unmatch": ("110110", "Patient Record", None, "U"),
    "reconcile": ("110110", "Patient Record", None, "U"),
    "accept": ("110110", "Patient Record", None, "U"),
    "mapping-reload": ("110113", "Security Alert", ("110131", "Software Configuration"), "E"),
    "config-reload": ("110113", "Security Alert", ("110131", "Software Configuration"), "E"),
    "token-create": ("110113", "Security Alert", ("110137", "User Security Attributes Changed"), "C"),
    "token-revoke": ("110113", "Security Alert", ("110137", "User Security Attributes Changed"), "D"),
    "start": ("110100", "Application Activity", ("110120", "Application Start"), "E"),
    "stop": ("110100", "Application Activity", ("110121", "Application Stop"), "E"),
}
REST_INTERACTIONS = {"read": "read", "vread": "vread", "search": "search-type"}


def _outcome(status: int) -> str:
    """0 success, 4 minor failure (refused, not found), 8 serious failure (the engine failed)."""
    return "0" if status < 400 else "4" if status < 500 else "8"


def _recorded(at: str) -> str:
    moment = datetime.fromisoformat(at).astimezone(UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _address_type(address: str) -> str:
    """network.type: 2 IP address, 1 machine name."""
    return "2" if address.replace(".", "").isdigit() or ":" in address else "1"


def audit_event(event: dict[str, Any], *, observer: str) -> dict[str, Any]:
    """The AuditEvent for one trail row (``observer``: the engine's name, the reporting system)."""
    action = str(event["action"])
    code, display, subtype, fhir_action = EVENT_TYPES.get(action, ("110110", "Patient Record", None, "E"))
    subtypes: list[dict[str, Any]] = []
    if subtype is not None:
        subtypes.append({"system": DCM, "code": subtype[0], "display": subtype[1]})
    if action in REST_INTERACTIONS:
        subtypes.append({"system": REST, "code": REST_INTERACTIONS[action]})
    subtypes.append({"system": ACTION_SYSTEM, "code": action})
    status = int(event["status"])
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
        "who": {"identifier": {"value": event["agent"]}, "display": event["agent"]}, "requestor": True}
    if event.get("cert_subject"):
        agent["altId"] = event["cert_subject"]
    if event.get("remote"):
        agent["network"] = {"address": event["remote"], "type": _address_type(event["remote"])}
    entities: list[dict[str, Any]] = []
    for pid in event.get("patient_ids") or []:
        entities.append({"what": {"reference": f"Patient/{pid}"},
                         "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
                         "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"}})
    if event.get("study_uid"):
        entities.append({"what": {"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{event['study_uid']}"}},
                         "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                         "role": {"system": OBJECT_ROLE, "code": "3", "display": "Report"},
                         "name": "Study Instance UID"})
    for key, label in (("message_id", "message"), ("delivery_id", "delivery")):
        if event.get(key):
            entities.append({"what": {"identifier": {"system": f"urn:radbridge:{label}", "value": str(event[key])}},
                             "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                             "name": label})
    if event.get("query"):
        entities.append({"type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                         "role": {"system": OBJECT_ROLE, "code": "24", "display": "Query"},
                         "query": base64.b64encode(event["query"].encode()).decode()})
    out: dict[str, Any] = {
        "resourceType": "AuditEvent", "id": str(event["id"]),
        "type": {"system": DCM, "code": code, "display": display}, "subtype": subtypes, "action": fhir_action,
        "recorded": _recorded(event["at"]), "outcome": _outcome(status),
        "outcomeDesc": f"{event.get('outcome', 'success' if status < 400 else 'failure')} ({status})"
                       + (f": {event['detail']}" if event.get("detail") else ""),
        "agent": [agent],
        "source": {"observer": {"display": observer},
                   "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}]}}
    if entities:
        out["entity"] = entities
    return out


def audit_bundle(events: list[dict[str, Any]], *, observer: str) -> dict[str, Any]:
    """The rows as one Bundle of type collection (what ``radbridge audit --format fhir`` prints)."""
    return {"resourceType": "Bundle", "type": "collection", "total": len(events),
            "entry": [{"resource": audit_event(e, observer=observer)} for e in events]}
