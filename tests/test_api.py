"""/health, /metrics and the admin API over real HTTP, with token checks."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import SAMPLES, RunningEngine, make_settings
from tests.hl7util import ack_code, adt, orm, send, send_many


def test_health_is_open_and_reports_readiness(running: RunningEngine) -> None:
    status, body = running.api("/health", token=None)
    assert status == 200 and body["ready"] is True and body["checks"]["database"] == "ok"
    assert body["checks"]["channels"]["hl7-inbound"]["listening"] is True


def test_api_needs_a_token(running: RunningEngine) -> None:
    assert running.api("/api/channels", token=None)[0] == 401
    assert running.api("/api/channels", token="wrong")[0] == 401
    assert running.api("/api/channels")[0] == 200


def test_patients_orders_and_messages(running: RunningEngine) -> None:
    port = running.mllp_port
    send_many(port, [(SAMPLES / "adt_a01.hl7").read_text(), (SAMPLES / "orm_o01.hl7").read_text(),
                     adt("A01", "GONE9", "Smith"), adt("A40", "100001", "Smith", "John", dob="19650412", sex="M", mrg="GONE9")])
    status, body = running.api("/api/patients?identifier=100001&issuer=GENHOSP")
    assert status == 200
    (p,) = body["patients"]
    assert p["name"]["family"] == "Smith" and p["birth_date"] == "1965-04-12"
    assert {i["value"] for i in p["identifiers"]} == {"100001", "555-44-3333", "E12345"}
    assert [a["value"] for a in p["aliases"]] == ["GONE9"]
    assert [o["accession"] for o in p["orders"]] == ["ACC1001"]
    # the alias finds the survivor too
    assert running.api("/api/patients?identifier=GONE9")[1]["patients"][0]["id"] == p["id"]

    (o,) = running.api("/api/orders?accession=ACC1001")[1]["orders"]
    assert o["status"] == "SC" and o["history"][0]["control"] == "NW" and o["procedure"]["code"] == "71020"
    # the order names its patient as /api/patients does: identifiers with their issuers, and aliases
    assert o["patient"]["id"] == o["patient_id"] == p["id"]
    assert o["patient"]["identifiers"] == p["identifiers"] and o["patient"]["aliases"] == p["aliases"]
    assert {(i["value"], i["issuer"]) for i in o["patient"]["identifiers"]} >= {("100001", "GENHOSP")}
    assert [(a["value"], a["issuer"]) for a in o["patient"]["aliases"]] == [("GONE9", "GENHOSP")]

    msgs = running.api("/api/messages?control_id=ORM0001")[1]["messages"]
    assert [(m["type"], m["status"], m["ack_code"]) for m in msgs] == [("ORM^O01", "processed", "AA")]
    status, full = running.api(f"/api/messages/{msgs[0]['id']}")
    assert status == 200 and full["raw"].startswith("MSH|") and "MSA|AA|ORM0001" in full["ack"]
    assert full["mapped"]["orders"][0]["order.accession"] == "ACC1001"
    assert running.api("/api/messages/999999")[0] == 404
    assert running.api("/api/patients")[0] == 400
    assert running.api("/api/orders?limit=100000&accession=x")[0] == 400


def test_channels_and_metrics_count_what_happened(running: RunningEngine) -> None:
    port = running.mllp_port
    send(port, adt("A01", "MET1", "Count"))
    send(port, adt("A01", "MET2", "Bad", dob="notadate"))
    send(port, "MSH|^~\\&|A|B|C|D|2024||ORU^R01|X1|P|2.5\rOBR|1\r")
    ch = next(c for c in running.api("/api/channels")[1]["channels"] if c["name"] == "hl7-inbound")
    assert ch["state"] == "listening" and ch["counters"]["received"] == 3
    assert ch["counters"]["acked"] == {"AA": 1, "AE": 1, "AR": 1}
    assert running.api("/metrics", token=None)[0] == 401  # /metrics needs a token with the metrics role
    status, text = running.api("/metrics")
    assert status == 200
    assert 'radbridge_messages_received_total{channel="hl7-inbound"} 3' in text
    assert 'radbridge_messages_acked_total{channel="hl7-inbound",code="AE"} 1' in text
    assert 'radbridge_ack_latency_seconds_count{channel="hl7-inbound"} 3' in text


def test_reprocess_after_fixing_a_mapping(running: RunningEngine) -> None:
    # The site's RIS sends birth dates as DD.MM.YYYY: AE until the mapping says so.
    reply = send(running.mllp_port, adt("A01", "RP1", "Later", dob="12.04.1965"))
    assert ack_code(reply) == "AE"
    (m,) = running.api("/api/messages?status=error")[1]["messages"]
    mapping = running.settings.mappings_dir + "/hl7-patient.yaml"
    with open(mapping) as f:
        text = f.read()
    with open(mapping, "w") as f:
        f.write(text.replace("    transform: [date]", '    transform: [{date: {format: "%d.%m.%Y"}}]'))
    running.engine.mappings.reload_changed()
    status, result = running.api(f"/api/messages/{m['id']}/reprocess", method="POST")
    assert status == 200 and result["status"] == "processed", result
    (p,) = running.api("/api/patients?identifier=RP1")[1]["patients"]
    assert p["birth_date"] == "1965-04-12"
    events = running.api(f"/api/messages/{m['id']}")[1]["events"]
    assert any(e["kind"] == "reprocess" and e["detail"]["previous_status"] == "error" for e in events)


def test_order_api_filters(running: RunningEngine) -> None:
    send_many(running.mllp_port, [orm("NW", "F1", "ACCF1", "PF"), orm("NW", "F2", "ACCF2", "PF"),
                                  orm("CA", "F2", "ACCF2", "PF")])
    assert [o["accession"] for o in running.api("/api/orders?status=CA")[1]["orders"]] == ["ACCF2"]
    assert [o["accession"] for o in running.api("/api/orders?placer=F1")[1]["orders"]] == ["ACCF1"]


def test_metrics_show_the_writer_and_mapping_reloads(running: RunningEngine) -> None:
    send(running.mllp_port, adt("A01", "WM1", "Writer"))
    status, text = running.api("/metrics")
    jobs = next(line for line in text.splitlines() if line.startswith("radbridge_writer_jobs_total "))
    assert float(jobs.split()[1]) >= 1
    assert "radbridge_writer_commit_failures_total 0" in text and "radbridge_mapping_reloads_total 0" in text


def test_channel_lists_each_mapping_problem_once(running: RunningEngine) -> None:
    """Review regression: /api/channels lists each problem of a channel's mapping once."""
    f = Path(running.settings.mappings_dir) / "hl7-patient.yaml"
    f.write_text(f.read_text() + "  patient.extra.beyond: PID-99\n")
    running.engine.mappings.reload_changed()
    ch = next(c for c in running.api("/api/channels")[1]["channels"] if c["name"] == "hl7-inbound")
    assert sum("PID-99" in p for p in ch["mapping_problems"]) == 1


def test_channels_report_the_state_of_their_running_connector(workdir: Path, db_url: str) -> None:
    """Each channel's state comes from its connector: listeners listen, the fhir and outbound channels
    run (they used to show as "stopped" while working), a disabled channel says so, and after the
    engine stops every channel is stopped."""
    spare = (workdir / "channels" / "hl7-inbound.yaml").read_text()
    spare = spare.replace("name: hl7-inbound", "name: hl7-spare", 1).replace("enabled: true", "enabled: false", 1)
    (workdir / "channels" / "hl7-spare.yaml").write_text(spare)
    e = RunningEngine(make_settings(workdir, db_url)).start()
    try:
        states = {c["name"]: (c["connector"], c["state"]) for c in e.api("/api/channels")[1]["channels"]}
        assert states == {"hl7-inbound": ("mllp", "listening"), "hl7-spare": ("mllp", "disabled"),
                          "dicom": ("dicom", "listening"), "fhir-inbound": ("fhir", "running"),
                          "ehr-outbound": ("outbound", "running"), "hl7-file": ("file", "disabled"),
                          "pacs-forward": ("dicom-forward", "disabled")}
        outbound = next(c for c in e.api("/api/channels")[1]["channels"] if c["name"] == "ehr-outbound")
        assert outbound["destinations"] == {}  # [ehr] has no addresses in this test: nothing is sent
        assert [r["to"] for r in outbound["routes"]] == ["fhir", "mllp", "mllp", "fhir"]
    finally:
        e.stop()
    assert {c["name"]: c["state"] for c in e.engine.channel_status()} == {
        "hl7-inbound": "stopped", "hl7-spare": "disabled", "dicom": "stopped", "fhir-inbound": "stopped",
        "ehr-outbound": "stopped", "hl7-file": "disabled", "pacs-forward": "disabled"}


def test_the_address_pid11_is_kept_in_history_and_read_as_fhir(running: RunningEngine) -> None:
    """The shipped patient mapping keeps PID-11 (the home address when it repeats); a later message
    with another address replaces it (history shows old and new), one without PID-11 leaves it, and
    PID-11 "" clears it. /fhir/Patient reads it as Patient.address."""
    port = running.mllp_port
    assert ack_code(send(port, (SAMPLES / "adt_a01.hl7").read_text())) == "CA"
    (p,) = running.api("/api/patients?identifier=100001&issuer=GENHOSP")[1]["patients"]
    assert p["address"] == {"street": "12 Main St", "city": "Springfield", "state": "IL", "postal_code": "62701"}
    moved = "|||1 Work Rd^^Decatur^IL^62521^USA^B~9 Elm St^Apt 4^Urbana^IL^61801^USA^H"  # PID-9, 10 empty
    assert ack_code(send(port, adt("A08", "100001", "Smith", "John", dob="19650412", sex="M",
                                   ts="20240316090000", ctrl="ADDR1")
                         .replace("|19650412|M\r", "|19650412|M" + moved + "\r"))) == "AA"
    assert ack_code(send(port, orm("NW", "PADDR", "ACCADDR", "100001"))) == "AA"  # an ORM's PID has no PID-11
    (p,) = running.api("/api/patients?identifier=100001&issuer=GENHOSP")[1]["patients"]
    home = {"street": "9 Elm St", "other": "Apt 4", "city": "Urbana", "state": "IL", "postal_code": "61801",
            "country": "USA", "type": "H"}
    assert p["address"] == home
    first = {"street": "12 Main St", "city": "Springfield", "state": "IL", "postal_code": "62701"}
    changes = [(h["kind"], h["changes"]["fields"]["address"]) for h in p["history"]
               if "address" in h["changes"].get("fields", {})]
    assert changes == [("created", first), ("updated", [first, home])]
    status, fhir = running.api(f"/fhir/Patient/{p['id']}")
    assert status == 200
    assert fhir["address"] == [{"use": "home", "line": ["9 Elm St", "Apt 4"], "city": "Urbana", "state": "IL",
                                "postalCode": "61801", "country": "USA"}]
    cleared = adt("A08", "100001", "Smith", "John", dob="19650412", sex="M", ts="20240317090000", ctrl="ADDR2")
    assert ack_code(send(port, cleared.replace("|19650412|M\r", '|19650412|M|||""\r'))) == "AA"
    (p,) = running.api("/api/patients?identifier=100001&issuer=GENHOSP")[1]["patients"]
    assert p["address"] is None and "address" not in running.api(f"/fhir/Patient/{p['id']}")[1]
