"""GET /fhir/metadata: a CapabilityStatement that says what this server really does.

It is built from the same tables the endpoint uses (the search parameters of search.py, the
channel's routes), so it cannot claim a parameter or interaction that is not there.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from engine import __version__
from engine.config import Settings
from engine.fhir.validate import FHIR_VERSION
from engine.pipeline.fhir_inbound import FhirInbound
from engine.pipeline.fhir_search import SEARCH_PARAMS

_STARTED = datetime.now(UTC).isoformat(timespec="seconds")
_DEFINITIONS = {"_id": "Resource-id", "_lastUpdated": "Resource-lastUpdated"}


def _params(rtype: str) -> list[dict[str, Any]]:
    out = []
    for name, kind in SEARCH_PARAMS[rtype].items():
        p: dict[str, Any] = {"name": name, "type": kind}
        if name in _DEFINITIONS:
            p["definition"] = f"http://hl7.org/fhir/SearchParameter/{_DEFINITIONS[name]}"
        if name == "identifier" and rtype != "Patient":
            p["documentation"] = "also identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|ACSN|VALUE"
        out.append(p)
    out.append({"name": "_count", "type": "number", "documentation": "page size"})
    out.append({"name": "_offset", "type": "number", "documentation": "paging offset (the next link uses it)"})
    return out


def capability_statement(settings: Settings, fhir: FhirInbound | None, base: str) -> dict[str, Any]:
    """``fhir``: the fhir channel's inbound stage (what can be written), None when only reads are served."""
    routes = fhir.channel.routes if fhir is not None else []
    writable = {m for r in routes for m in r.messages}
    resources = []
    for rtype in ("Patient", "ServiceRequest", "ImagingStudy"):
        interactions = ["read", "vread", "search-type"]
        res: dict[str, Any] = {"type": rtype, "profile": f"http://hl7.org/fhir/StructureDefinition/{rtype}"}
        if rtype in writable:
            interactions += ["create", "update"]
            res.update({"versioning": "versioned-update", "readHistory": False, "updateCreate": False,
                        "conditionalCreate": True, "conditionalUpdate": True, "conditionalRead": "not-supported",
                        "conditionalDelete": "not-supported",
                        "referencePolicy": ["literal", "logical", "local"]})
        else:
            res.update({"versioning": "versioned", "readHistory": False,
                        "documentation": "built from received DICOM studies placed with a patient; read-only"})
        res["interaction"] = [{"code": i} for i in interactions]
        res["searchParam"] = _params(rtype)
        resources.append(res)
    system = [{"code": "transaction"}, {"code": "batch"}] if writable else []
    auth = settings.http.auth == "token"
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": _STARTED,
        "publisher": "RadBridge",
        "kind": "instance",
        "software": {"name": "RadBridge", "version": __version__},
        "implementation": {"description": f"RadBridge imaging integration engine ({settings.name})",
                           "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": "Patients and imaging orders go into the engine's store (the same one HL7 v2 feeds); "
                             "ImagingStudy is read from received DICOM studies. Reads are audited.",
            "security": {"cors": False, "description": "Authorization: Bearer <token>; reads and searches need "
                         "the role read, creates, updates and Bundles the role fhir-write" if auth
                         else "no authentication (http.auth = none: local use only)"},
            "resource": resources,
            "interaction": system,
        }],
    }
