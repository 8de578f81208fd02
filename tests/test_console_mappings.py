"""Mappings and channels in the console (issue 16): every file with its validation state, a file
with its problems at their lines, "try" as `radbridge mappings try` does it, and the scenario "fix a
broken mapping then reprocess an errored message": a message the mapping rejects arrives over real
MLLP, the console shows its mapping error with the file and line, an invalid edit is refused with
the problem at its line (file untouched), a valid one typed and saved with the keyboard is kept
(previous version under .history/, audit row) and used at once: Reprocess applies the message.
A read-only token sees no Edit and gets 403 when it posts anyway."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect
from sqlalchemy import select

from engine.store.models import AuditEvent
from engine.store.tokens import Role
from tests.browser import Console
from tests.conftest import TOKEN, RunningEngine
from tests.dicomutil import make_instance, require_dcmtk, storescu
from tests.fhirutil import patient
from tests.hl7util import ack_code, adt, orm, send
from tests.test_reconciliation import settle
from tests.test_roles import create_tokens
from tests.waiting import wait_until

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
DATE_LINE = "    transform: [date]"


def _line_of(text: str, wanted: str) -> int:
    """1-based line of the first line equal to ``wanted`` after the birth date's spec."""
    lines = text.split("\n")
    start = lines.index("  patient.birth_date:")
    return lines.index(wanted, start) + 1


def _edits(running: RunningEngine) -> list[tuple[int, str | None]]:
    with running.db.read_session() as s:
        rows = s.execute(select(AuditEvent.status, AuditEvent.detail).where(AuditEvent.action == "mapping-edit")
                         .order_by(AuditEvent.id)).all()
    return [(st, d) for st, d in rows]


@SQLITE_ONLY
def test_fix_a_broken_mapping_in_the_browser_then_reprocess_the_errored_message(
        running: RunningEngine, console: Console) -> None:
    page = console.page
    page.on("dialog", lambda dialog: dialog.accept())  # Reprocess asks first
    # The site's RIS sends birth dates as DD.MM.YYYY: the shipped mapping rejects them (AE).
    reply = send(running.mllp_port, adt("A01", "FX100", "Fixlater", dob="31.12.1999", ctrl="CTL-FIX-1"))
    assert ack_code(reply) == "AE"
    (msg,) = running.api("/api/messages?control_id=CTL-FIX-1")[1]["messages"]
    mapping = Path(running.settings.mappings_dir) / "hl7-patient.yaml"
    original = mapping.read_text()
    line = _line_of(original, "  patient.birth_date:")

    console.open(f"/messages/{msg['id']}")
    errors = page.locator("#mapping-errors")
    expect(errors).to_contain_text("patient.birth_date")
    expect(errors).to_contain_text("PID-7.1")
    link = errors.get_by_role("link", name=f"hl7-patient.yaml:{line}")
    expect(link).to_have_attribute("href", f"/mappings/hl7-patient.yaml#L{line}")
    console.shot("message-detail-mapping-error")
    link.click()
    expect(page.locator(f"#L{line}")).to_contain_text("patient.birth_date:")
    console.shot("mapping-file")
    page.get_by_role("link", name="Edit").click()
    expect(page.get_by_role("heading", name="Edit mapping file hl7-patient.yaml")).to_be_visible()
    console.shot("mapping-edit")

    # first an invalid edit: refused, the problem at its line, the file untouched
    broken = original.replace(DATE_LINE, "    transform: [dmy]")
    page.get_by_label("Text of hl7-patient.yaml").fill(broken)
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_role("alert")).to_contain_text("Not saved")
    bad = _line_of(broken, "    transform: [dmy]")
    expect(page.locator(f"#L{bad}")).to_have_class(re.compile("problem-line"))
    expect(page.locator(f"#L{bad}")).to_contain_text("unknown transform 'dmy'")
    problem = page.get_by_role("list", name="Problems").get_by_role("link", name=f"line {bad}")
    expect(problem).to_have_attribute("href", f"#L{bad}")
    console.shot("mapping-edit-refused")
    assert mapping.read_text() == original
    assert not (mapping.parent / ".history").exists()
    # the refusal is answered 422 (chromium logs that status, as it does any 4xx); no script error
    assert console.errors == ["Failed to load resource: the server responded with a status of 422 "
                              "(Unprocessable Entity)"]
    console.errors.clear()

    # then a valid one, typed and saved with the keyboard alone
    fixed = original.replace(DATE_LINE, '    transform: [{date: {format: "%d.%m.%Y"}}]')
    box = page.get_by_label("Text of hl7-patient.yaml")
    box.fill(fixed)
    box.focus()
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Save")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{console.base}/mappings/hl7-patient.yaml")
    expect(page.get_by_role("status")).to_contain_text("Saved hl7-patient.yaml")
    expect(page.get_by_role("status")).to_contain_text("in use now")
    assert mapping.read_text() == fixed
    (kept,) = (mapping.parent / ".history").glob("hl7-patient.*.yaml")
    assert kept.read_text() == original
    expect(page.locator("#history")).to_contain_text(kept.name)
    console.shot("mapping-file-saved")
    edits = _edits(running)
    assert [s for s, _ in edits] == [422, 200]
    assert edits[1][1] == f"hl7-patient.yaml saved; previous version .history/{kept.name}"

    console.open(f"/messages/{msg['id']}")
    expect(page.locator("#mapping-errors-none")).to_be_visible()
    page.get_by_role("button", name="Reprocess").click()
    expect(page.get_by_role("status")).to_have_text("Reprocessed: now processed")
    expect(page.locator("#message-status")).to_have_text("processed")
    expect(page.locator('#history tr[data-kind="reprocess"]')).to_contain_text("it was error")
    console.shot("message-detail-reprocessed")
    (patient,) = running.api("/api/patients?identifier=FX100")[1]["patients"]
    assert patient["birth_date"] == "1999-12-31"
    with running.db.read_session() as s:
        reprocessed = s.execute(select(AuditEvent.status, AuditEvent.message_id)
                                .where(AuditEvent.action == "reprocess")).all()
    assert [tuple(r) for r in reprocessed] == [(200, msg["id"])]
    assert console.errors == []


@SQLITE_ONLY
def test_the_list_shows_each_files_state_and_the_file_view_marks_problems(
        running: RunningEngine, console: Console) -> None:
    broken = Path(running.settings.mappings_dir) / "site-extra.yaml"
    broken.write_text("source: hl7v2\nfields:\n  patient.nickname: PID-5.9\n")
    page = console.open("/mappings")
    expect(page.get_by_role("heading", name="Mappings and channels")).to_be_visible()
    expect(page.locator('#mapping-files tr[data-file="hl7-patient.yaml"]')).to_contain_text("ok")
    row = page.locator('#mapping-files tr[data-file="site-extra.yaml"]')
    expect(row).to_contain_text("error")
    expect(row).to_contain_text("unknown domain field")
    expect(page.locator('#channel-files tr[data-file="hl7-inbound.yaml"]')).to_contain_text("ok")
    console.shot("mappings")
    row.get_by_role("link", name="line 3").click()
    expect(page).to_have_url(f"{console.base}/mappings/site-extra.yaml#L3")
    expect(page.locator("#L3")).to_have_class(re.compile("problem-line"))
    console.open("/mappings/channels/hl7-inbound.yaml")
    expect(page.locator("#L1")).to_contain_text("ADT and imaging orders")
    console.shot("channel-file")
    for name in ("..%2Fconfig.yaml", "nothing.yaml", "hl7-patient.yml"):
        assert page.request.get(f"{console.base}/mappings/{name}").status == 404
    assert console.errors == []


@SQLITE_ONLY
def test_try_runs_a_mapping_on_a_pasted_sample_and_on_a_stored_message(running: RunningEngine,
                                                                       console: Console) -> None:
    assert ack_code(send(running.mllp_port, adt("A01", "TR100", "Stored", dob="1.2.1990", ctrl="CTL-TRY-1"))) == "AE"
    (msg,) = running.api("/api/messages?control_id=CTL-TRY-1")[1]["messages"]
    page = console.open("/mappings/try?mapping=hl7-patient")
    expect(page.get_by_label("Mapping")).to_have_value("hl7-patient")
    page.get_by_label("Sample (a pasted HL7 message or FHIR resource)").fill(
        adt("A01", "TR200", "Pasted", given="Paula").replace("\r", "\n"))
    page.get_by_role("button", name="Try").click()
    result = page.locator("#try-result")
    expect(result).to_contain_text("Result on the pasted sample")
    expect(result.locator("pre")).to_contain_text('"patient.family_name": "Pasted"')
    console.shot("mapping-try")
    page.get_by_label("Sample (a pasted HL7 message or FHIR resource)").fill("")
    page.get_by_label("Or a stored message (its number)").fill(str(msg["id"]))
    page.get_by_role("button", name="Try").click()
    expect(result).to_contain_text(f"Result on message {msg['id']}")
    expect(page.locator("#try-errors")).to_contain_text("patient.birth_date")
    page.get_by_label("Mapping").select_option("hl7-oru-report")
    page.get_by_label("Or a stored message (its number)").fill("")
    page.get_by_role("button", name="Try").click()
    expect(page.get_by_role("alert")).to_contain_text("is tried on a stored study")
    assert running.api("/api/patients?identifier=TR200")[1]["patients"] == []  # nothing stored
    assert console.errors == []


@SQLITE_ONLY
def test_a_read_only_token_sees_no_edit_and_is_refused_when_it_posts(running: RunningEngine, browser: object) -> None:
    secrets = create_tokens(running.settings, {"viewer": frozenset({Role.READ, Role.OPERATE})})
    mapping = Path(running.settings.mappings_dir) / "hl7-patient.yaml"
    original = mapping.read_text()
    tab = Console(browser, f"http://127.0.0.1:{running.engine.http_port}")  # type: ignore[arg-type]
    try:
        tab.login(secrets["viewer"], "/mappings/hl7-patient.yaml")
        expect(tab.page.locator("#L1")).to_be_visible()
        expect(tab.page.get_by_role("link", name="Edit")).to_have_count(0)
        csrf = tab.page.locator('form.logout input[name="csrf"]').get_attribute("value")
        assert csrf
        refused = tab.page.request.post(f"{tab.base}/mappings/hl7-patient.yaml",
                                        form={"csrf": csrf, "text": "source: hl7v2\n"})
        assert refused.status == 403 and "lacks the role 'admin'" in html.unescape(refused.text())
        assert tab.page.request.get(f"{tab.base}/mappings/hl7-patient.yaml/edit").status == 403
        tab.shot("mapping-file-read-only")
        assert tab.errors == []
    finally:
        tab.close()
    assert mapping.read_text() == original


@SQLITE_ONLY
def test_try_a_fhir_mapping_on_a_stored_fhir_request(running: RunningEngine, console: Console) -> None:
    created = console.page.request.post(f"{console.base}/fhir/Patient", data=patient("TR300", family="Fhirtried"),
                                        headers={"Authorization": f"Bearer {TOKEN}",
                                                 "Content-Type": "application/fhir+json"})
    assert created.status == 201, created.text()
    (msg,) = running.api("/api/messages?channel=fhir-inbound")[1]["messages"]
    page = console.open("/mappings/try?mapping=fhir-patient")
    page.get_by_label("Or a stored message (its number)").fill(str(msg["id"]))
    page.get_by_role("button", name="Try").click()
    output = page.locator("#try-result pre")
    expect(output).to_contain_text('"patient.id": "TR300"')
    expect(output).to_contain_text('"patient.family_name": "Fhirtried"')
    console.shot("mapping-try-fhir")
    assert console.errors == []


@SQLITE_ONLY
def test_try_rules_and_an_outbound_mapping_on_a_stored_study(running: RunningEngine, console: Console,
                                                             tmp_path: Path) -> None:
    require_dcmtk()
    assert ack_code(send(running.mllp_port, orm("NW", "TS1", "ACCTS1", "MRNTS1", family="Studied"))) == "AA"
    obj = make_instance(tmp_path / "ct.dcm", patient_id="MRNTS1", name="STUDIED^JANE", accession="ACCTS1")
    sent = storescu(running.dicom_port, [obj.path])
    assert sent.returncode == 0, sent.stderr
    wait_until(lambda: running.api(f"/api/studies?study_uid={obj.study_uid}")[1]["studies"],
               message="the study in the index")
    settle(running)  # stable and reconciled now: matched to the order by its accession
    page = console.open("/mappings/try?mapping=reconciliation")
    page.get_by_label("Or a stored study (Study Instance UID, accession or id)").fill(obj.study_uid)
    page.get_by_role("button", name="Try").click()
    output = page.locator("#try-result pre")
    expect(output).to_contain_text('"rules": "reconciliation"')
    expect(output).to_contain_text('"matched_by": "accession"')
    page.get_by_label("Mapping").select_option("hl7-oru-images")
    page.get_by_label("Or a stored study (Study Instance UID, accession or id)").fill("ACCTS1")
    page.get_by_role("button", name="Try").click()
    expect(output).to_contain_text("# hl7-oru-images (")
    expect(output).to_contain_text("OBR|1|TS1^EPIC|FTS1|")
    console.shot("mapping-try-study")
    assert console.errors == []
    (st,) = running.api(f"/api/studies?study_uid={obj.study_uid}")[1]["studies"]
    with running.db.read_session() as s:
        reads = s.execute(select(AuditEvent.patient_ids, AuditEvent.study_uid).where(
            AuditEvent.resource_type == "Study", AuditEvent.query == "/mappings/try")).all()
    assert [tuple(r) for r in reads] == [([st["patient_id"]], obj.study_uid)] * 2  # each try read the study
