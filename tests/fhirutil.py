"""A blocking FHIR client for tests (real HTTP to the running engine), and spec-example loaders."""

from __future__ import annotations

import copy
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import TOKEN, RunningEngine

FHIR_SAMPLES = Path(__file__).parent / "samples" / "fhir"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any

    def issues(self) -> list[str]:
        assert isinstance(self.body, dict) and self.body.get("resourceType") == "OperationOutcome", self.body
        return [str(i.get("diagnostics")) for i in self.body["issue"]]


def call(eng: RunningEngine, method: str, path: str, body: Any = None, *, token: str | None = TOKEN,
         headers: dict[str, str] | None = None, raw: bytes | None = None,
         content_type: str = "application/fhir+json") -> Reply:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://127.0.0.1:{eng.engine.http_port}/fhir/{path.lstrip('/')}", data=data,
                                 method=method)
    if data is not None:
        req.add_header("Content-Type", content_type)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback
            status, hdrs, payload = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, hdrs, payload = exc.code, dict(exc.headers), exc.read()
    ctype = hdrs.get("Content-Type", "")
    return Reply(status, hdrs, json.loads(payload) if payload and "json" in ctype else payload.decode())


def sample(name: str) -> dict[str, Any]:
    return copy.deepcopy(json.loads((FHIR_SAMPLES / name).read_text()))


def acsn(value: str, system: str = "urn:oid:1.2.3.4.5") -> dict[str, Any]:
    return {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "system": system, "value": value}


def placer(value: str, system: str = "urn:oid:1.2.3.4.6") -> dict[str, Any]:
    return {"type": {"coding": [{"system": V2_0203, "code": "PLAC"}]}, "system": system, "value": value}


def mrn(value: str, system: str = "urn:oid:1.2.36.146.595.217.0.1") -> dict[str, Any]:
    return {"use": "usual", "type": {"coding": [{"system": V2_0203, "code": "MR"}]}, "system": system,
            "value": value}


def patient(value: str, family: str = "Chalmers", given: str = "Peter", **extra: Any) -> dict[str, Any]:
    """The spec's Patient/example with another MRN and name."""
    p = sample("patient-example.json")
    p.pop("id", None)
    p["identifier"] = [mrn(value)]
    p["name"] = [{"use": "official", "family": family, "given": [given]}]
    p.update(extra)
    return p


def service_request(accession: str, subject: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The spec's ServiceRequest/di (Chest CT) with an accession number and another subject."""
    sr = sample("servicerequest-example-di.json")
    sr.pop("id", None)
    sr["identifier"] = [acsn(accession)]
    sr["subject"] = subject
    sr.update(extra)
    return sr
