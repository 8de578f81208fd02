"""One message in the console (issue 16, Messages: detail): the raw message as segments and fields
with their HL7 names, the mapped values, the ACK sent and the history; a FHIR request shown as
JSON; opening it is on the audit trail; Reprocess is the API's own action (role operate), refused
to a read-only token even when it posts anyway. Real engine, real MLLP, real browser."""

from __future__ import annotations

import html
import re
from datetime import timedelta

import pytest
from playwright.sync_api import expect
from sqlalchemy import select, update

from engine.store.models import AuditEvent, Message
from engine.store.retention import prune
from engine.store.tokens import Role
from engine.store.types import utcnow
from tests.browser import Console
from tests.conftest import RunningEngine
from tests.fhirutil import patient
from tests.hl7util import ack_code, adt, send
from tests.test_roles import create_tokens

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def _message_id(running: RunningEngine, control_id: str) -> int:
    status, body = running.api(f"/api/messages?control_id={control_id}")
    assert status == 200 and len(body["messages"]) == 1, body
    return int(body["messages"][0]["id"])


@SQLITE_ONLY
def test_a_message_shows_its_fields_by_name_the_mapped_values_the_ack_and_the_history(
        running: RunningEngine, console: Console) -> None:
    reply = send(running.mllp_port, adt("A01", "MD100", "Fieldname", "Grace", ctrl="CTL-MD-1",
                                        pid_extra="", msh_extra=""))
    assert ack_code(reply) == "AA"
    mid = _message_id(running, "CTL-MD-1")
    page = console.open(f"/messages/{mid}")
    expect(page.get_by_role("heading", name=re.compile(f"Message {mid}"))).to_be_visible()
    pid5 = page.locator('tr[data-field="PID-5"]')
    expect(pid5.locator(".field-name")).to_contain_text("Patient Name")
    expect(pid5.locator(".field-value")).to_have_text("Fieldname^Grace")
    expect(pid5.locator("ul.components")).to_contain_text("Family Name")
    expect(page.locator('tr[data-field="MSH-10"] .field-name')).to_contain_text("Message Control ID")
    expect(page.locator("#mapped")).to_contain_text('"patient.family_name": "Fieldname"')
    expect(page.locator("#ack")).to_contain_text("MSA|AA|CTL-MD-1")
    history = page.locator("#history")
    expect(history.locator('tr[data-kind="received"]')).to_be_visible()
    expect(history.locator('tr[data-kind="patient"]')).to_contain_text("patient created")
    expect(page.locator("#message-status")).to_have_text("processed")
    patient_link = page.get_by_role("link", name=re.compile(r"^patient \d+$")).first
    (patient,) = running.api("/api/patients?identifier=MD100")[1]["patients"]
    expect(patient_link).to_have_attribute("href", f"/patients/{patient['id']}")
    console.shot("message-detail")
    assert console.errors == []
    with running.db.read_session() as s:
        reads = s.execute(select(AuditEvent.action, AuditEvent.patient_ids, AuditEvent.message_id, AuditEvent.query)
                          .where(AuditEvent.resource_type == "Message")).all()
    assert [tuple(r) for r in reads] == [("read", [patient["id"]], mid, f"/messages/{mid}")]


@SQLITE_ONLY
def test_a_z_segment_is_shown_without_names_and_an_unknown_message_is_a_404_page(
        running: RunningEngine, console: Console) -> None:
    message = adt("A01", "MD200", "Zed", ctrl="CTL-MD-2") + "ZPI|1|VIP^yes\r"
    assert ack_code(send(running.mllp_port, message)) == "AA"
    page = console.open(f"/messages/{_message_id(running, 'CTL-MD-2')}")
    zpi = page.locator('tbody[data-segment="ZPI"]')
    expect(zpi).to_contain_text("(not in the standard)")
    expect(zpi.locator('tr[data-field="ZPI-2"] .field-name')).to_have_text("")
    expect(zpi.locator('tr[data-field="ZPI-2"] .field-value')).to_have_text("VIP^yes")
    answer = page.request.get(f"{console.base}/messages/999999")
    assert answer.status == 404 and "There is no message 999999" in answer.text()
    assert console.errors == []


@SQLITE_ONLY
def test_a_fhir_request_is_shown_as_json(running: RunningEngine, console: Console) -> None:
    created = console.page.request.post(f"{console.base}/fhir/Patient", data=patient("MD300"),
                                        headers={"Authorization": "Bearer test-token",
                                                 "Content-Type": "application/fhir+json"})
    assert created.status == 201, created.text()
    messages = running.api("/api/messages?channel=fhir-inbound")[1]["messages"]
    page = console.open(f"/messages/{messages[0]['id']}")
    expect(page.locator("#fhir-json")).to_contain_text('"resourceType": "Patient"')
    expect(page.locator("#fhir-json")).to_contain_text("MD300")
    expect(page.get_by_role("button", name="Reprocess")).to_have_count(0)  # a FHIR sender resends instead
    console.shot("message-detail-fhir")
    assert console.errors == []


@SQLITE_ONLY
def test_a_read_only_token_sees_no_reprocess_and_is_refused_when_it_posts(running: RunningEngine,
                                                                          browser: object) -> None:
    reply = send(running.mllp_port, adt("A01", "MD400", "Readonly", dob="31.12.1999", ctrl="CTL-MD-4"))
    assert ack_code(reply) == "AE"
    mid = _message_id(running, "CTL-MD-4")
    secrets = create_tokens(running.settings, {"viewer": frozenset({Role.READ})})
    tab = Console(browser, f"http://127.0.0.1:{running.engine.http_port}")  # type: ignore[arg-type]
    try:
        tab.login(secrets["viewer"], f"/messages/{mid}")
        expect(tab.page.locator("#message-status")).to_have_text("error")
        expect(tab.page.get_by_role("button", name="Reprocess")).to_have_count(0)
        csrf = tab.page.locator('form.logout input[name="csrf"]').get_attribute("value")
        assert csrf
        refused = tab.page.request.post(f"{tab.base}/messages/{mid}/reprocess", form={"csrf": csrf})
        assert refused.status == 403 and "lacks the role 'operate'" in html.unescape(refused.text())
        tab.shot("message-detail-read-only")
        assert tab.errors == []
    finally:
        tab.close()
    status, body = running.api(f"/api/messages/{mid}")
    assert status == 200 and body["attempts"] == 1 and body["status"] == "error"  # nothing was done


@SQLITE_ONLY
def test_a_message_whose_content_retention_removed_shows_what_is_left(running: RunningEngine,
                                                                      console: Console) -> None:
    assert ack_code(send(running.mllp_port, adt("A01", "MD500", "Pruned", ctrl="CTL-MD-5"))) == "AA"
    mid = _message_id(running, "CTL-MD-5")
    with running.db.write_session() as s, s.begin():  # 40 days old: past content_days (30)
        s.execute(update(Message).where(Message.id == mid).values(received_at=utcnow() - timedelta(days=40)))
    assert prune(running.db, running.settings.retention).content == 1
    page = console.open(f"/messages/{mid}")
    expect(page.get_by_text("The content of this message was removed by retention.")).to_be_visible()
    expect(page.locator("#message-status")).to_have_text("processed")
    expect(page.locator('#history tr[data-kind="patient"]')).to_contain_text("patient created")
    expect(page.get_by_role("button", name="Reprocess")).to_have_count(0)
    assert console.errors == []
