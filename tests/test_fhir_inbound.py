"""FHIR R4 inbound at /fhir/ over real HTTP, on SQLite and PostgreSQL: the specification's own
Patient, ServiceRequest and ImagingStudy examples, Bundles, conditional interactions, merges through
Patient.link, bad input of every kind, search, and the audit trail of reads."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from sqlalchemy import select

from engine.pipeline.fhir_search import SEARCH_PARAMS
from engine.store.models import AuditEvent, Message, MessageContent, Order
from engine.store.tokens import config_token_name
from tests.conftest import TOKEN, RunningEngine, make_settings
from tests.fhirutil import acsn, call, mrn, patient, placer, sample, service_request
from tests.hl7util import ack_code, adt, orm, send
from tests.waiting import wait_until

HOSP_MRN = "http://hospital.example.org/mrn"  # the shipped mappings' issuer table: HOSP


def valid(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource passes fhir.resources' R4 (R4B classes) validation."""
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    return resource


def ref(reply: Any) -> str:
    """Patient/3 from a create's Location header."""
    return str(reply.headers["Location"]).split("/fhir/")[1].split("/_history")[0]


def entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", [])]


def orders(e: RunningEngine, accession: str) -> list[dict[str, Any]]:
    return list(e.api(f"/api/orders?accession={accession}")[1]["orders"])


# --- capability and auth ---------------------------------------------------------------------------------

def test_metadata_is_open_and_every_advertised_search_parameter_works(running: RunningEngine) -> None:
    r = call(running, "GET", "metadata", token=None)
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/fhir+json")
    cs = valid(r.body)
    assert cs["fhirVersion"] == "4.0.1" and cs["kind"] == "instance"
    rest = cs["rest"][0]
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch"}
    by_type = {res["type"]: res for res in rest["resource"]}
    assert set(by_type) == {"Patient", "ServiceRequest", "ImagingStudy"}
    assert {i["code"] for i in by_type["Patient"]["interaction"]} >= {"create", "update", "read", "search-type"}
    assert {i["code"] for i in by_type["ImagingStudy"]["interaction"]} == {"read", "vread", "search-type"}
    assert by_type["Patient"]["conditionalCreate"] is True and by_type["Patient"]["conditionalUpdate"] is True
    samples = {"token": "x", "string": "x", "date": "ge2020-01-01", "reference": "Patient/1", "number": "5"}
    for rtype, res in by_type.items():
        names = {p["name"] for p in res["searchParam"]} - {"_count", "_offset"}
        assert names == set(SEARCH_PARAMS[rtype])
        for p in res["searchParam"]:
            value = {"_id": "1", "status": "active", "gender": "male", "birthdate": "1974",
                     "basedon": "ServiceRequest/1"}.get(p["name"],
                                                                                          samples[p["type"]])
            got = call(running, "GET", f"{rtype}?{p['name']}={value}")
            assert got.status == 200, (rtype, p["name"], got.body)
    # what it does not advertise, it refuses by name instead of ignoring
    bad = call(running, "GET", "Patient?nmae=Smith")
    assert bad.status == 400 and "'nmae' is not supported" in bad.issues()[0]


def test_a_token_is_needed_except_for_metadata(running: RunningEngine) -> None:
    for token in (None, "wrong"):
        r = call(running, "GET", "Patient?identifier=1", token=token)
        assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.body["resourceType"] == "OperationOutcome" and "Bearer" in r.issues()[0]
        assert call(running, "POST", "Patient", patient("1"), token=token).status == 401
        # the base URL without its slash is the same endpoint: no way around the token
        assert call(running, "POST", "", _txn(_post(patient("NOAUTH"))), token=token).status == 401
    req = urllib.request.Request(f"http://127.0.0.1:{running.engine.http_port}/fhir", method="POST",
                                 data=json.dumps(_txn(_post(patient("NOAUTH")))).encode(),
                                 headers={"Content-Type": "application/fhir+json"})
    try:
        status = urllib.request.urlopen(req, timeout=10).status  # noqa: S310 - loopback
    except urllib.error.HTTPError as exc:
        status = exc.code
    assert status == 401
    with running.db.read_session() as s:
        assert s.execute(select(Message)).first() is None  # nothing was stored for them


# --- create, read, update ----------------------------------------------------------------------------------

def test_spec_patient_is_created_stored_raw_and_read_back(running: RunningEngine) -> None:
    raw = (Path(__file__).parent / "samples" / "fhir" / "patient-example.json").read_bytes()
    r = call(running, "POST", "Patient", raw=raw, headers={"X-Request-ID": "req-spec-1"})
    assert r.status == 201, r.body
    assert r.headers["ETag"] == 'W/"1"' and r.headers["Location"].endswith("/_history/1")
    p = valid(r.body)
    assert p["id"] == ref(r).split("/")[1]
    assert p["name"][0]["family"] == "Chalmers" and p["name"][0]["given"] == ["Peter", "James"]
    assert p["gender"] == "male" and p["birthDate"] == "1974-12-25"
    mr = [i for i in p["identifier"] if i.get("type", {}).get("coding", [{}])[0].get("code") == "MR"]
    assert [(i["system"], i["value"]) for i in mr] == [("urn:oid:1.2.36.146.595.217.0.1", "12345")]
    # the same store the HL7 feed and the admin API use: issuer is the OID without urn:oid:
    (ap,) = running.api("/api/patients?identifier=12345&issuer=1.2.36.146.595.217.0.1")[1]["patients"]
    assert ap["id"] == int(p["id"]) and ap["name"]["family"] == "Chalmers"
    # its (first) address is kept as an HL7 feed's PID-11 is, and read back
    assert ap["address"] == {"street": "534 Erewhon St", "city": "PleasantVille", "state": "Vic",
                             "postal_code": "3999", "type": "H"}
    assert p["address"] == [{"use": "home", "line": ["534 Erewhon St"], "city": "PleasantVille", "state": "Vic",
                             "postalCode": "3999"}]
    # the request was kept as received, with what the mapping made of it
    with running.db.read_session() as s:
        msg = s.execute(select(Message).where(Message.control_id == "req-spec-1")).scalar_one()
        content = s.get(MessageContent, msg.id)
        assert (msg.protocol, msg.message_type, msg.status, msg.patient_id) == ("fhir", "Patient", "processed",
                                                                                 int(p["id"]))
        assert content is not None and content.raw == raw
        assert content.mapped["entries"][0]["patient.family_name"] == "Chalmers"
    got = call(running, "GET", ref(r))
    assert got.status == 200 and got.body == p and got.headers["ETag"] == 'W/"1"'


def test_update_checks_id_version_and_identifiers(running: RunningEngine) -> None:
    a = call(running, "POST", "Patient", patient("U1", "Alpha"))
    b = call(running, "POST", "Patient", patient("U2", "Beta"))
    body = dict(a.body, birthDate="1980-02-03")
    r = call(running, "PUT", ref(a), body, headers={"If-Match": 'W/"1"'})
    assert r.status == 200 and r.body["birthDate"] == "1980-02-03" and r.headers["ETag"] == 'W/"2"'
    stale = call(running, "PUT", ref(a), dict(body, birthDate="1981-01-01"), headers={"If-Match": 'W/"1"'})
    assert stale.status == 412 and 'W/"2"' in stale.issues()[0]
    wrong_id = call(running, "PUT", ref(a), dict(body, id=b.body["id"]))
    assert wrong_id.status == 400 and "must equal the id in the URL" in wrong_id.issues()[0]
    stolen = call(running, "PUT", ref(a), dict(body, identifier=[mrn("U2")]))
    assert stolen.status == 409 and ref(b) in stolen.issues()[0]
    assert call(running, "PUT", "Patient/987654", dict(body, id="987654")).status == 405
    dup = call(running, "POST", "Patient", patient("U1", "Again"))
    assert dup.status == 409 and ref(a) in dup.issues()[0]
    assert call(running, "GET", ref(a)).body["name"][0]["family"] == "Alpha"
    assert call(running, "GET", f"{ref(a)}/_history/2").status == 200
    old = call(running, "GET", f"{ref(a)}/_history/1")
    assert old.status == 404 and "only the current version" in old.issues()[0]


def test_servicerequest_and_orm_for_one_accession_are_one_order(running: RunningEngine) -> None:
    # HL7 first: the ORM creates the order and its patient (MRN 7001, issuer HOSP)
    assert ack_code(send(running.mllp_port, orm("NW", "PL7001", "ACC7001", "7001", issuer="HOSP"))) == "AA"
    (o,) = orders(running, "ACC7001")
    # then the EHR's FHIR side updates it by accession: the same order, with its history
    sr = service_request("ACC7001", {"identifier": {"system": HOSP_MRN, "value": "7001"}}, status="active",
                         priority="stat")
    r = call(running, "PUT", "ServiceRequest?identifier=ACC7001", sr)
    assert r.status == 200, r.body
    assert r.body["id"] == str(o["id"]) and r.headers["ETag"] == 'W/"2"'
    assert valid(r.body)["subject"]["reference"] == f"Patient/{o['patient_id']}"
    (o2,) = orders(running, "ACC7001")
    assert o2["priority"] == "STAT" and o2["last_control"] == "XO"  # an update, not a second NW
    # FHIR cancels it: CA, as an ORC-1 CA would
    r = call(running, "PUT", "ServiceRequest?identifier=ACC7001", dict(sr, status="revoked"))
    assert r.status == 200 and r.body["status"] == "revoked"
    assert orders(running, "ACC7001")[0]["status"] == "CA"
    # the other way round: FHIR first, then the RIS's ORM XO for the same accession
    pat = call(running, "POST", "Patient", patient("7002", "Gamma", identifier=[mrn("7002", HOSP_MRN)]))
    assert pat.status == 201
    created = call(running, "POST", "ServiceRequest", service_request("ACC7002", {"reference": ref(pat)}))
    assert created.status == 201
    assert ack_code(send(running.mllp_port, orm("XO", "PL7002", "ACC7002", "7002", issuer="HOSP", status="IP"))) == "AA"
    (o3,) = orders(running, "ACC7002")
    assert str(o3["id"]) == created.body["id"] and o3["status"] == "IP"
    # "active" covers in progress: an update does not move the order back to scheduled
    kept = call(running, "PUT", f"ServiceRequest/{o3['id']}", dict(created.body, status="active"),
                headers={"X-Request-ID": "ehr-4711"})
    assert kept.status == 200 and kept.headers["X-Request-ID"] == "ehr-4711"
    assert kept.headers["Last-Modified"].endswith(" GMT")
    assert orders(running, "ACC7002")[0]["status"] == "IP"
    assert o3["patient_id"] == int(pat.body["id"])
    assert call(running, "GET", f"ServiceRequest?patient={ref(pat)}&status=active").body["total"] == 1


# --- Bundles -----------------------------------------------------------------------------------------------

def _txn(*entries: dict[str, Any], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def _post(resource: dict[str, Any], full_url: str | None = None, if_none_exist: str | None = None) -> dict[str, Any]:
    req: dict[str, Any] = {"method": "POST", "url": resource["resourceType"]}
    if if_none_exist:
        req["ifNoneExist"] = if_none_exist
    e: dict[str, Any] = {"resource": resource, "request": req}
    if full_url:
        e["fullUrl"] = full_url
    return e


def test_transaction_resolves_urn_uuid_and_is_all_or_nothing(running: RunningEngine) -> None:
    pid = "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"
    bundle = _txn(
        _post(service_request("TX1", {"reference": pid})),  # before its patient: Patients are applied first
        _post(patient("T100", "Delta"), pid, "identifier=urn:oid:1.2.36.146.595.217.0.1|T100"),
        _post(service_request("TX2", {"reference": pid}, priority="urgent")),
    )
    r = call(running, "POST", "", bundle)
    assert r.status == 200 and r.body["type"] == "transaction-response", r.body
    statuses = [e["response"]["status"] for e in r.body["entry"]]
    assert statuses == ["201 Created"] * 3
    locations = [e["response"]["location"] for e in r.body["entry"]]
    assert locations[0].startswith("ServiceRequest/") and locations[1].startswith("Patient/")
    patient_ref = locations[1].split("/_history")[0]
    for acc in ("TX1", "TX2"):
        (o,) = orders(running, acc)
        assert f"Patient/{o['patient_id']}" == patient_ref
    # the same bundle again: the patient is found by If-None-Exist (200), the orders exist -> 409, so
    # the transaction fails as a whole
    again = call(running, "POST", "", bundle)
    assert again.status == 409 and "already has these identifiers" in again.issues()[0]
    assert "Bundle.entry[0]" in again.issues()[0]
    # a failing entry undoes the entries before it: neither this patient nor its order exists
    pid2 = "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"
    broken = _txn(_post(patient("T200", "Epsilon"), pid2),
                  _post(service_request("TX3", {"reference": pid2}, identifier=[])))
    bad = call(running, "POST", "", broken)
    assert bad.status == 422 and "no placer number, filler number or accession" in bad.issues()[0]
    assert running.api("/api/patients?identifier=T200")[1]["patients"] == []
    with running.db.read_session() as s:  # kept, as an error, for whoever looks at 3 a.m.
        msg = s.execute(select(Message).order_by(Message.id.desc())).scalars().first()
        assert msg is not None and msg.message_type == "Bundle^transaction" and msg.status == "error"
        assert "accession" in (msg.error or "")
        failed_id = msg.id
    status, answer = running.api(f"/api/messages/{failed_id}/reprocess", method="POST")
    assert status == 409 and "FHIR request" in answer["detail"]


def test_every_answer_names_the_version_and_time_a_read_then_gives(running: RunningEngine) -> None:
    """The answers carry what the domain wrote (no read-back): each must equal a later read."""
    def same_as_read(entry: dict[str, Any]) -> None:
        location = entry["response"]["location"].split("/_history")[0]
        now = call(running, "GET", location).body
        assert entry["response"]["etag"] == f'W/"{now["meta"]["versionId"]}"', (entry, now["meta"])
        assert entry["response"]["lastModified"] == now["meta"]["lastUpdated"], (entry, now["meta"])

    pid = "urn:uuid:8d0c6f0e-50a4-4a53-9a51-3c6b7d1d8f11"
    created = call(running, "POST", "", _txn(_post(patient("V100", "Eta"), pid),
                                             _post(service_request("VX1", {"reference": pid}))))
    assert created.status == 200, created.body
    for entry in created.body["entry"]:
        same_as_read(entry)
    patient_ref = created.body["entry"][0]["response"]["location"].split("/_history")[0]
    order_ref = created.body["entry"][1]["response"]["location"].split("/_history")[0]
    current = call(running, "GET", patient_ref).body
    # unchanged, changed, and an order update found by its identifiers: each answer is the stored row
    for body in (current, dict(current, birthDate="1970-01-02")):
        put = call(running, "POST", "", _txn({"resource": body, "request": {"method": "PUT", "url": patient_ref}}))
        assert put.status == 200, put.body
        same_as_read(put.body["entry"][0])
    order = call(running, "GET", order_ref).body
    moved = call(running, "POST", "", _txn({"resource": dict(order, priority="stat"),
                                            "request": {"method": "PUT", "url": order_ref}}))
    assert moved.status == 200, moved.body
    same_as_read(moved.body["entry"][0])
    assert moved.body["entry"][0]["response"]["etag"] == 'W/"2"'
    single = call(running, "PUT", patient_ref, dict(current, birthDate="1970-01-03"))
    assert single.headers["Last-Modified"] == call(running, "GET", patient_ref).headers["Last-Modified"]


def test_batch_answers_each_entry(running: RunningEngine) -> None:
    p = call(running, "POST", "Patient", patient("B100", "Zeta"))
    bundle = _txn(_post(service_request("BA1", {"reference": ref(p)})),
                  _post(service_request("BA2", {"reference": "Patient/999999"})),
                  _post({"resourceType": "ServiceRequest", "status": "active"}),
                  _post(service_request("BA3", {"reference": ref(p)})), kind="batch")
    r = call(running, "POST", "", bundle)
    assert r.status == 200 and r.body["type"] == "batch-response"
    got = [e["response"]["status"].split()[0] for e in r.body["entry"]]
    assert got == ["201", "404", "400", "201"]
    assert "Patient/999999 does not exist" in r.body["entry"][1]["response"]["outcome"]["issue"][0]["diagnostics"]
    assert "required element is missing" in r.body["entry"][2]["response"]["outcome"]["issue"][0]["diagnostics"]
    assert [len(orders(running, a)) for a in ("BA1", "BA2", "BA3")] == [1, 0, 1]


# --- conditional interactions --------------------------------------------------------------------------------

def test_conditional_create_and_conflicting_conditional_updates(running: RunningEngine) -> None:
    cond = {"If-None-Exist": "identifier=urn:oid:1.2.36.146.595.217.0.1|C1"}
    first = call(running, "POST", "Patient", patient("C1", "Eta"), headers=cond)
    second = call(running, "POST", "Patient", patient("C1", "Changed"), headers=cond)
    assert (first.status, second.status) == (201, 200)
    assert second.body["id"] == first.body["id"] and second.body["name"][0]["family"] == "Eta"  # unchanged
    # conditional update: creates when nothing matches, updates the one match
    made = call(running, "PUT", f"Patient?identifier={HOSP_MRN}|C2", patient("C2", "Theta", identifier=[mrn("C2", HOSP_MRN)]))
    assert made.status == 201
    upd = call(running, "PUT", f"Patient?identifier={HOSP_MRN}|C2",
               patient("C2", "Iota", identifier=[mrn("C2", HOSP_MRN)]))
    assert upd.status == 200 and upd.body["id"] == made.body["id"] and upd.body["name"][0]["family"] == "Iota"
    # two patients share the value C3 under different issuers: "identifier=C3" is ambiguous -> 412
    call(running, "POST", "Patient", patient("C3", "Kappa"))
    call(running, "POST", "Patient", patient("C3", "Lambda", identifier=[mrn("C3", HOSP_MRN)]))
    amb = call(running, "PUT", "Patient?identifier=C3", patient("C3", "Mu"))
    assert amb.status == 412 and "more than one" in amb.issues()[0]
    # the condition finds C1, the body's identifier is C2's: a conflict, nothing changes
    clash = call(running, "PUT", "Patient?identifier=urn:oid:1.2.36.146.595.217.0.1|C1",
                 patient("C2", "Nu", identifier=[mrn("C2", HOSP_MRN)]))
    assert clash.status == 409 and ref(first) in clash.issues()[0]
    other_id = call(running, "PUT", "Patient?identifier=urn:oid:1.2.36.146.595.217.0.1|C1",
                    dict(patient("C1", "Xi"), id=made.body["id"]))
    assert other_id.status == 409
    assert call(running, "GET", ref(made)).body["name"][0]["family"] == "Iota"
    assert call(running, "GET", ref(first)).body["name"][0]["family"] == "Eta"
    assert call(running, "PUT", "Patient?identifier=", patient("C1")).status == 400


# --- merges --------------------------------------------------------------------------------------------------

def test_patient_link_merges_like_a40(running: RunningEngine) -> None:
    keep = call(running, "POST", "Patient", patient("M1", "Omicron"))
    gone = call(running, "POST", "Patient", patient("M2", "Omicron"))
    assert call(running, "POST", "ServiceRequest", service_request("MACC2", {"reference": ref(gone)})).status == 201
    # the survivor says it replaces the other record (a local reference)
    body = dict(keep.body, link=[{"other": {"reference": ref(gone)}, "type": "replaces"}])
    r = call(running, "PUT", ref(keep), body)
    assert r.status == 200, r.body
    (o,) = orders(running, "MACC2")
    assert o["patient_id"] == int(keep.body["id"])  # the order moved, as with A40
    old = call(running, "GET", ref(gone)).body
    assert old["active"] is False and old["link"] == [{"other": {"reference": ref(keep)}, "type": "replaced-by"}]
    new = call(running, "GET", ref(keep)).body
    assert {"other": {"reference": ref(gone)}, "type": "replaces"} in new["link"]
    assert any(i["value"] == "M2" and i["use"] == "old" for i in new["identifier"])
    assert old["meta"]["versionId"] == "2"  # the retired record changed: a new version
    # the survivor read back and PUT unchanged (its link says replaces Patient/M2's record): harmless
    again = call(running, "PUT", ref(keep), {k: v for k, v in new.items() if k != "meta"})
    assert again.status == 200, again.body
    found = call(running, "GET", "Patient?identifier=urn:oid:1.2.36.146.595.217.0.1|M2").body
    assert [p["id"] for p in entries(found)] == [keep.body["id"]]  # the old MRN finds the survivor
    # the retired record says it is replaced by another one, named by identifier
    a = call(running, "POST", "Patient", patient("M3", "Pi"))
    b = call(running, "POST", "Patient", patient("M4", "Pi"))
    retire = dict(b.body, active=False, link=[{"other": {"identifier": mrn("M3")}, "type": "replaced-by"}])
    r2 = call(running, "PUT", ref(b), retire)
    assert r2.status == 200 and r2.body["active"] is False
    assert r2.body["link"] == [{"other": {"reference": ref(a)}, "type": "replaced-by"}]
    # an HL7 ORM under the merged-away MRN still lands on the survivor
    assert ack_code(send(running.mllp_port, orm("NW", "PLM4", "MACC4", "M4",
                                                issuer="1.2.36.146.595.217.0.1"))) == "AA"
    assert orders(running, "MACC4")[0]["patient_id"] == int(a.body["id"])


# --- bad input -----------------------------------------------------------------------------------------------

def test_bad_input_gets_a_specific_operation_outcome(running: RunningEngine) -> None:
    def refused(status: int, *args: Any, **kw: Any) -> str:
        r = call(running, *args, **kw)
        assert r.status == status, (r.status, r.body)
        assert r.headers["Content-Type"].startswith("application/fhir+json")
        return " | ".join(r.issues())

    assert "not valid JSON" in refused(400, "POST", "Patient", raw=b'{"resourceType": "Patient",')
    assert "expected Patient" in refused(400, "POST", "Patient", service_request("W1", {"reference": "Patient/1"}))
    r5 = service_request("R5ACC", {"reference": "Patient/1"})
    r5["code"] = {"concept": r5["code"]}
    r5["reason"] = [{"concept": {"text": "metastases"}}]
    text = refused(400, "POST", "ServiceRequest", r5)
    assert "ServiceRequest.code.concept" in text and "FHIR R5" in text and "reasonCode" in text
    unknown = patient("BAD1")
    unknown["favouriteColour"] = "blue"
    assert "Patient.favouriteColour: unknown element" in refused(400, "POST", "Patient", unknown)
    assert "birthDate" in refused(400, "POST", "Patient", patient("BAD2", birthDate="1974-13-45"))
    big = patient("BAD3")
    big["text"] = {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">" + "x" * 6_000_000
                   + "</div>"}
    assert "at most 5242880" in refused(413, "POST", "Patient", big)
    many = _txn(*[_post(patient(f"N{i}")) for i in range(1001)])
    assert "at most 1000" in refused(413, "POST", "", many)
    assert "Content-Type" in refused(415, "POST", "Patient", raw=b"PID|1", content_type="text/plain")
    assert "read-only" in refused(405, "POST", "ImagingStudy", sample("imagingstudy-example.json"))
    assert "not a resource type" in refused(404, "GET", "Observation?code=x")
    assert "Bundle.type" in refused(400, "POST", "", {"resourceType": "Bundle", "type": "collection"})
    # the Bundle's own elements are validated as well as its entries'
    assert "Bundle.issues: unknown element" in refused(400, "POST", "", {**_txn(_post(patient("BAD5"))), "issues": {}})
    assert "Bundle.timestamp" in refused(400, "POST", "", {**_txn(_post(patient("BAD6"))), "timestamp": "today"})
    assert "not supported" in refused(405, "DELETE", "Patient/1")
    # the spec's own ServiceRequest/di has no identifier: an order nobody could match images to
    spec_sr = sample("servicerequest-example-di.json")
    p = call(running, "POST", "Patient", patient("BAD4"))
    spec_sr.pop("id")
    spec_sr["subject"] = {"reference": ref(p)}
    assert "no placer number, filler number or accession" in refused(422, "POST", "ServiceRequest", spec_sr)
    # ... and with an accession number it is taken as it is
    spec_sr["identifier"] = [acsn("SPEC-DI-1"), placer("PL-DI-1")]
    ok = call(running, "POST", "ServiceRequest", spec_sr)
    assert ok.status == 201 and valid(ok.body)["code"]["coding"][0]["code"] == "24627-2"
    # the scheduled time keeps its instant (kept as the engine's local time, read back with its offset)
    assert datetime.fromisoformat(ok.body["occurrenceDateTime"]) == datetime.fromisoformat(spec_sr["occurrenceDateTime"])
    (o,) = orders(running, "SPEC-DI-1")
    assert o["placer_number"] == "PL-DI-1" and o["procedure"]["text"] == "Chest CT"
    # the listener is fine afterwards
    assert call(running, "GET", ref(p)).status == 200


# --- search and reads --------------------------------------------------------------------------------------

def test_hostile_requests_get_4xx_not_500(running: RunningEngine) -> None:
    """Found by the hardening review (issue 14, item 13): each answered 500."""
    deep = b'{"resourceType": "Patient", "extension": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = call(running, "POST", "Patient", raw=deep)
    assert r.status == 400 and "deeper than 100 levels" in r.issues()[0], r.body
    parsable = b'{"resourceType": "Patient", "extension": ' + b"[" * 150 + b"]" * 150 + b"}"  # json parses it
    r = call(running, "POST", "Patient", raw=parsable)
    assert r.status == 400 and "deeper than 100 levels" in r.issues()[0], r.body
    assert call(running, "GET", "Patient/99999999999999999999999").status == 404
    huge_put = call(running, "PUT", "Patient/99999999999999999999999",
                    dict(patient("HUGE1", "Huge"), id="99999999999999999999999"))
    assert huge_put.status == 405, huge_put.body  # ids are ours, as for any unknown id
    nul = call(running, "GET", "Patient?family=a%00b")
    assert nul.status == 400 and "NUL" in nul.issues()[0], nul.body
    status, body = running.api("/api/patients?identifier=a%00b")
    assert status == 400 and "NUL" in body["detail"], body
    assert call(running, "GET", "metadata", token=None).status == 200  # and it still serves


def test_bundle_references_and_search_wildcards(running: RunningEngine) -> None:
    """Issue 14, item 14: a link to a later Patient entry, a repeated fullUrl, LIKE wildcards in search."""
    def merged(survivor_first: bool, surv: str, prior: str) -> list[str]:
        """A Bundle of a Patient that replaces another Patient entry; the statuses it got."""
        a, b = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
        survivor = _post(dict(patient(surv, "Linked"), link=[{"other": {"reference": b}, "type": "replaces"}]), a)
        entries = [survivor, _post(patient(prior, "Linked"), b)]
        r = call(running, "POST", "", _txn(*(entries if survivor_first else entries[::-1])))
        assert r.status == 200, r.body
        return sorted(e["response"]["status"] for e in r.body["entry"])

    def owner(mrn: str) -> int:
        (p,) = running.api(f"/api/patients?identifier={mrn}")[1]["patients"]
        return int(p["id"])

    # the link names a later entry, or an earlier one: the same outcome (the prior identifier joins the
    # survivor's record, as an A40 whose survivor is new)
    assert merged(True, "LK1", "LK2") == merged(False, "LK5", "LK6")
    assert owner("LK1") == owner("LK2") and owner("LK5") == owner("LK6")
    # one fullUrl for two entries: which one a reference means is undecidable
    c = "urn:uuid:0f1c5f4e-7d9e-4a57-9d0c-1d4e8b7a0003"
    dup = call(running, "POST", "", _txn(_post(patient("LK3", "Dup"), c), _post(patient("LK4", "Dup"), c)))
    assert dup.status == 400 and "fullUrl" in dup.issues()[0] and "entry[0]" in dup.issues()[0], dup.body
    assert running.api("/api/patients?identifier=LK3")[1]["patients"] == []
    # % and _ are letters in a search value, not LIKE wildcards
    assert call(running, "GET", "Patient?family=_%25").body["total"] == 0
    assert call(running, "GET", "Patient?family:contains=%25").body["total"] == 0
    assert call(running, "GET", "Patient?family=Linke_").body["total"] == 0
    assert call(running, "GET", "Patient?family=Linke").body["total"] >= 1


def test_order_naming_a_patient_entry_that_another_entry_merges_away(running: RunningEngine) -> None:
    """A Bundle creates a Patient, a later Patient entry replaces it (a merge), and a ServiceRequest
    names the first one: the order goes to the survivor under the survivor's identifier, as any
    reference to a merged patient does; a Bundle's one new patient is named by its own identifier."""
    a, b = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    bundle = _txn(_post(service_request("MG1", {"reference": a})),
                  _post(dict(patient("MG-SURV", "Merged"), link=[{"other": {"reference": a}, "type": "replaces"}]), b),
                  _post(patient("MG-PRIOR", "Merged"), a))
    r = call(running, "POST", "", bundle)
    assert r.status == 200, r.body
    (survivor,) = running.api("/api/patients?identifier=MG-SURV")[1]["patients"]
    assert running.api("/api/patients?identifier=MG-PRIOR")[1]["patients"] == [survivor]
    (o,) = orders(running, "MG1")
    assert o["patient_id"] == survivor["id"]
    plain = call(running, "POST", "", _txn(_post(service_request("MG2", {"reference": a})), _post(patient("MG-NEW"), a)))
    assert plain.status == 200, plain.body
    with running.db.read_session() as s:
        mapped = [c.mapped["entries"] for c in s.execute(select(MessageContent).order_by(MessageContent.message_id.desc())
                                                         .limit(2)).scalars()]
    assert mapped[1][0]["patient.id"] == "MG-SURV" and mapped[1][0]["order.accession"] == "MG1"
    assert mapped[0][0]["patient.id"] == "MG-NEW" and mapped[0][0]["patient.issuer"] == "1.2.36.146.595.217.0.1"


def test_search_parameters_paging_and_audit(running: RunningEngine) -> None:
    made = [call(running, "POST", "Patient", patient(f"S{i}", "Searchable", given=f"G{i}")) for i in range(5)]
    page = call(running, "GET", "Patient?family=searchable&_count=2").body
    assert page["total"] == 5 and len(page["entry"]) == 2
    nxt = next(link["url"] for link in page["link"] if link["relation"] == "next")
    page2 = call(running, "GET", nxt.split("/fhir/")[1]).body
    assert [p["id"] for p in entries(page2)] == [m.body["id"] for m in made[2:4]]
    assert call(running, "GET", "Patient?family=searchable&_lastUpdated=ge2020-01-01").body["total"] == 5
    assert call(running, "GET", "Patient?family=searchable&_lastUpdated=lt2020-01-01").body["total"] == 0
    assert call(running, "GET", "Patient?family:exact=Searchable&given=G3").body["total"] == 1
    assert call(running, "GET", f"Patient?_id={made[0].body['id']},{made[1].body['id']}").body["total"] == 2
    for sr in ("SA1", "SA2"):
        call(running, "POST", "ServiceRequest", service_request(sr, {"reference": ref(made[0])}))
    call(running, "PUT", "ServiceRequest?identifier=SA2",
         service_request("SA2", {"reference": ref(made[0])}, status="completed"))
    assert call(running, "GET", f"ServiceRequest?subject={ref(made[0])}").body["total"] == 2
    completed = call(running, "GET", "ServiceRequest?status=completed").body
    assert [valid(r)["identifier"][0]["value"] for r in entries(completed)] == ["SA2"]
    typed = call(running, "GET", "ServiceRequest?identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|ACSN|SA1")
    assert typed.body["total"] == 1
    assert call(running, "GET", "ServiceRequest?_lastUpdated=2020-13").status == 400
    # every read of patient data is in the trail: who (the token's name: config: and its fingerprint), what, whose
    with running.db.read_session() as s:
        trail = list(s.execute(select(AuditEvent).where(AuditEvent.action.in_(("read", "vread", "search")))
                               .order_by(AuditEvent.id)).scalars())  # not the engine's start row
    searches = [a for a in trail if a.action == "search" and a.resource_type == "ServiceRequest"]
    assert searches and all(a.agent == config_token_name(TOKEN) for a in trail)
    assert "test-token" not in json.dumps([a.agent for a in trail])
    assert any(a.patient_ids == [int(made[0].body["id"])] and a.count == 2 for a in searches)
    reads = [a for a in trail if a.resource_type == "Patient" and a.action == "search"]
    assert any(a.count == 2 and "_count=2" in (a.query or "") for a in reads)
    # a create or update answers with the resource: that is a read too
    assert any(a.action == "read" and a.status == 201 and a.resource_type == "ServiceRequest" for a in trail)
    listed = running.api("/api/audit?resource_type=ServiceRequest")[1]["events"]
    assert len(listed) == len([a for a in trail if a.resource_type == "ServiceRequest"])


def test_stale_updates_and_hot_reloaded_mapping(workdir: Path, db_url: str) -> None:
    eng = RunningEngine(make_settings(workdir, db_url)).start()
    try:
        newer = patient("H1", "Rho", meta={"lastUpdated": "2026-03-01T10:00:00Z"})
        p = call(eng, "POST", "Patient", newer)
        older = dict(patient("H1", "Sigma", meta={"lastUpdated": "2026-02-01T10:00:00Z"}), id=p.body["id"])
        r = call(eng, "PUT", ref(p), older)
        assert r.status == 200 and r.body["name"][0]["family"] == "Rho"  # kept: the update is older
        # an analyst maps another identifier system to HOSP by editing the mapping file, no restart
        path = workdir / "mappings" / "fhir-patient.yaml"
        path.write_text(path.read_text().replace('{"http://hospital.example.org/mrn": HOSP}',
                                                 '{"http://hospital.example.org/mrn": HOSP, "urn:site:mrn": HOSP}'))
        wait_until(lambda: (m := eng.engine.mappings.get("fhir-patient")) is not None
                   and "urn:site:mrn" in str(m.tables["issuer"].values).lower(),
                   timeout=10, interval=0.1, message="the edited fhir-patient mapping to be reloaded")
        assert ack_code(send(eng.mllp_port, adt("A01", "H2", "Tau"))) == "AA"  # issuer GENHOSP
        made = call(eng, "POST", "Patient", patient("H3", "Upsilon", identifier=[mrn("H3", "urn:site:mrn")]))
        assert made.status == 201
        (ap,) = eng.api("/api/patients?identifier=H3&issuer=HOSP")[1]["patients"]
        assert ap["id"] == int(made.body["id"])
    finally:
        eng.stop()


def test_check_names_file_and_line_of_a_bad_fhir_mapping(workdir: Path) -> None:
    from tests.test_cli import radbridge
    path = workdir / "mappings" / "fhir-servicerequest.yaml"
    path.write_text(path.read_text().replace("type.coding.code='ACSN'", "type.coding.code=ACSN"))
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "code=ACSN" in t)
    ch = workdir / "channels" / "fhir-inbound.yaml"
    ch.write_text(ch.read_text().replace("mappings: [fhir-patient]", "mappings: [hl7-patient]"))
    env = {"RADBRIDGE_CHANNELS_DIR": str(workdir / "channels"), "RADBRIDGE_MAPPINGS_DIR": str(workdir / "mappings")}
    out = radbridge("check", env=env)
    assert out.returncode == 1
    assert f"{path}:{line}: order.accession: FHIR path" in out.stderr and "where() condition" in out.stderr
    assert "'hl7-patient' reads hl7v2; this route takes Patient" in out.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_imagingstudy_is_read_from_the_store(workdir: Path, db_url: str, tmp_path: Path) -> None:
    from tests.conftest import start_dicom_engine
    from tests.dicomutil import make_instance, require_dcmtk, storescu
    from tests.test_reconciliation import settle
    require_dcmtk()
    spec = sample("imagingstudy-example.json")
    study_uid = spec["identifier"][0]["value"].removeprefix("urn:oid:")
    series = spec["series"][0]
    inst = series["instance"][0]
    eng = start_dicom_engine(workdir, db_url)
    try:
        pat = call(eng, "POST", "Patient", patient("IS1", "Dicom"))
        call(eng, "POST", "ServiceRequest", service_request("ISACC1", {"reference": ref(pat)}))
        f = make_instance(tmp_path / "ct.dcm", patient_id="IS1", name="DICOM^PATIENT", accession="ISACC1",
                          study_uid=study_uid, series_uid=series["uid"], sop_uid=inst["uid"], modality="CT",
                          number=inst["number"], edit=lambda ds: setattr(ds, "SeriesNumber", series["number"]))
        assert storescu(eng.dicom_port, [f.path]).returncode == 0
        assert call(eng, "GET", "ImagingStudy?patient=" + ref(pat)).body["total"] == 0  # not placed yet
        settle(eng)
        found = call(eng, "GET", f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{study_uid}").body
        (st,) = entries(found)
        valid(st)
        assert st["identifier"][0] == spec["identifier"][0]
        assert st["subject"]["reference"] == ref(pat) and st["basedOn"][0]["reference"].startswith("ServiceRequest/")
        assert (st["numberOfSeries"], st["numberOfInstances"]) == (1, 1)
        (s0,) = st["series"]
        assert (s0["uid"], s0["number"], s0["modality"]["code"]) == (series["uid"], series["number"], "CT")
        (i0,) = s0["instance"]
        assert (i0["uid"], i0["number"], i0["sopClass"]) == (inst["uid"], inst["number"], inst["sopClass"])
        assert call(eng, "GET", f"ImagingStudy/{st['id']}").body == st
        assert call(eng, "GET", "ImagingStudy?identifier=ISACC1").body["total"] == 1
        with eng.db.read_session() as s:
            assert s.execute(select(Order).where(Order.accession == "ISACC1")).scalar_one().status in ("IP", "CM")
    finally:
        eng.stop()
