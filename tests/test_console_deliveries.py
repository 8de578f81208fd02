"""Deliveries in the console (issue 16), in a real browser on a real engine sending to the stand-in
EHR (engine/standin_ehr.py) over real sockets: a dead letter shows the EHR's answer and the message
sent; Retry gets it delivered once the EHR is back; Retry with rebuild sends the patient as the
store has them now; discard needs a note, which lands in the delivery's history and the audit trail;
a read-only token sees no buttons and is refused (403 naming 'operate') when it posts anyway.
Screenshots land in artifacts/screenshots/."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Dialog, expect

from engine.standin_ehr import StandInEHR
from engine.store import tokens
from engine.store.tokens import Role
from tests.browser import Console
from tests.conftest import TOKEN, RunningEngine
from tests.dicomutil import require_dcmtk
from tests.hl7util import adt
from tests.test_outbound import EHR_TOKEN, deliveries, order_and_images, seg, start, wake
from tests.test_reconciliation import hl7, settle
from tests.test_roles import create_tokens
from tests.waiting import wait_until

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
WAIT = 30.0
MAX_ATTEMPTS = 2  # a delivery the EHR keeps refusing is dead after its second attempt


@pytest.fixture
def ehr() -> Iterator[StandInEHR]:
    with StandInEHR(token=EHR_TOKEN) as e:
        yield e


@pytest.fixture
def eng(workdir: Path, db_url: str, ehr: StandInEHR) -> Iterator[RunningEngine]:
    require_dcmtk()
    e = start(workdir, db_url, ehr, max_attempts=MAX_ATTEMPTS)
    try:
        yield e
    finally:
        e.stop()


@pytest.fixture
def tab(eng: RunningEngine, browser: Any) -> Iterator[Console]:
    t = Console(browser, f"http://127.0.0.1:{eng.engine.http_port}")
    try:
        yield t
    finally:
        t.close()


def dead_mllp(e: RunningEngine, n: int = 1) -> list[int]:
    """The ids of the first ``n`` deliveries to the MLLP destination, once all of them are dead."""
    def dead() -> list[int]:
        found = [d for d in deliveries(e) if d.destination == "mllp"]
        return [d.id for d in found] if len(found) == n and all(d.state == "dead" for d in found) else []
    return wait_until(dead, timeout=WAIT, message=f"{n} dead deliveries to mllp")


def orus_for(ehr: StandInEHR, accession: str) -> list[str]:
    """The ORU^R01 the stand-in EHR accepted (AA) for ``accession``."""
    return [m for m in ehr.oru_messages() if seg(m, "OBR")[18] == accession]


def accept_dialogs(tab: Console) -> None:
    """data-confirm forms ask first: a person says yes."""
    def accept(dialog: Dialog) -> None:
        dialog.accept()
    tab.page.on("dialog", accept)


def test_retry_a_dead_delivery(eng: RunningEngine, ehr: StandInEHR, tab: Console, tmp_path: Path) -> None:
    ehr.nak = lambda msg: "AR" if "|ACCD1|" in msg else None  # AR: worth retrying, until the attempts run out
    order_and_images(eng, tmp_path, "MRND1", "ACCD1", n=1)
    settle(eng)
    wake(eng)
    [did] = dead_mllp(eng)
    page = tab.login(TOKEN, "/deliveries")
    expect(page.get_by_role("heading", name="Deliveries", exact=True)).to_be_visible()
    dead_cell = page.locator('#delivery-counts tr[data-destination="mllp"] td[data-state="dead"]')
    expect(dead_cell).to_have_text("1")
    tab.shot("deliveries")
    dead_cell.get_by_role("link").click()
    expect(page).to_have_url(re.compile(r"/deliveries\?destination=mllp&state=dead$"))
    expect(page.get_by_role("heading", name="Dead letters", exact=True)).to_be_visible()
    row = page.locator(f'#deliveries tr[data-delivery="{did}"]')
    expect(row).to_contain_text("dead")
    expect(page.locator("#deliveries tbody tr")).to_have_count(1)
    tab.shot("deliveries-dead")
    row.get_by_role("link", name=str(did), exact=True).click()
    expect(page).to_have_url(f"{tab.base}/deliveries/{did}")
    expect(page.locator("#delivery-state")).to_have_text("dead")
    expect(page.locator("#attempts tbody tr")).to_have_count(MAX_ATTEMPTS)
    answers = page.locator("#attempts pre.answer")
    expect(answers.first).to_contain_text("MSA|AR|")  # the EHR's ACK, as text
    expect(answers.first).to_contain_text("stand-in told to refuse")
    expect(page.locator("#last-error")).to_contain_text(f"gave up after {MAX_ATTEMPTS} attempts")
    payload = page.locator("#payload")
    expect(payload).to_contain_text("MSH|^~\\&|")
    expect(payload).to_contain_text("ORU^R01")
    expect(payload).to_contain_text("|ACCD1|")
    expect(page.get_by_role("link", name=f"patient {deliveries(eng)[0].patient_id}")).to_have_attribute(
        "href", re.compile(r"^/patients/\d+$"))
    tab.shot("delivery-dead")

    ehr.nak = None  # the EHR is fixed
    page.get_by_role("button", name="Retry", exact=True).click()
    expect(page.get_by_role("status")).to_have_text(f"Delivery {did} is queued again.")
    expect(page.locator("#delivery-state")).to_have_text("delivered")  # live: no reload needed
    expect(page.locator("#attempts tbody tr")).to_have_count(MAX_ATTEMPTS + 1)
    tab.shot("delivery-delivered")
    [oru] = orus_for(ehr, "ACCD1")  # exactly once
    assert seg(oru, "MSH")[9] == f"RB{did:010d}"
    status, audit = eng.api("/api/audit?action=retry")
    assert status == 200
    assert [(e["delivery_id"], e["agent"], e["status"]) for e in audit["events"]] == [
        (did, tokens.config_token_name(TOKEN), 200)]
    assert tab.errors == []


def test_retry_with_rebuild_sends_the_patient_as_the_store_has_them_now(eng: RunningEngine, ehr: StandInEHR,
                                                                         tab: Console, tmp_path: Path) -> None:
    ehr.set_mllp_down(True)
    order_and_images(eng, tmp_path, "MRNR1", "ACCR1", family="Smith", n=1)
    settle(eng)
    wake(eng)
    [did] = dead_mllp(eng)
    # the patient is renamed after the delivery died; the correction it causes dies too
    hl7(eng, adt("A08", "MRNR1", "Smythe", "John", dob="19800202", sex="M"))
    settle(eng)
    wake(eng)
    first, corrected = dead_mllp(eng, 2)
    assert first == did
    ehr.set_mllp_down(False)
    page = tab.login(TOKEN, f"/deliveries/{did}")
    expect(page.locator("#payload")).to_contain_text("|Smith^John|")  # the message kept from the first attempt
    page.get_by_role("button", name="Retry with rebuild").click()
    expect(page.get_by_role("status")).to_contain_text(f"Delivery {did} is queued again, its message to be built")
    expect(page.locator("#delivery-state")).to_have_text("delivered")
    [oru] = orus_for(ehr, "ACCR1")  # the corrected one is still dead: only the retried one went
    assert seg(oru, "MSH")[9] == f"RB{did:010d}" and seg(oru, "PID")[5] == "Smythe^John"
    assert seg(oru, "OBR")[25] == "F"  # still the result it was (study.reconciled), with today's patient
    page.reload()
    expect(page.locator("#payload")).to_contain_text("|Smythe^John|")
    tab.shot("delivery-rebuilt")
    assert next(d for d in deliveries(eng) if d.id == corrected).state == "dead"
    status, audit = eng.api("/api/audit?action=retry")
    assert status == 200 and [e["detail"] for e in audit["events"]] == ["destination mllp rebuild"]
    assert tab.errors == []


def test_discard_with_a_note_by_keyboard_then_retry_every_dead_one(eng: RunningEngine, ehr: StandInEHR,
                                                                     tab: Console, tmp_path: Path) -> None:
    ehr.nak = lambda msg: "AE" if "|ACCX" in msg else None  # AE: the message is wrong, dead at once
    order_and_images(eng, tmp_path / "1", "MRNX1", "ACCX1", n=1)
    order_and_images(eng, tmp_path / "2", "MRNX2", "ACCX2", family="Jones", n=1)
    settle(eng)
    wake(eng)
    ids = dead_mllp(eng, 2)
    assert [d.attempts for d in deliveries(eng) if d.id in ids] == [1, 1]
    dropped, kept = ids
    accept_dialogs(tab)
    page = tab.login(TOKEN, f"/deliveries/{dropped}")
    # an empty note is refused (the browser's own check bypassed: the server says why)
    csrf = page.locator('form.logout input[name="csrf"]').get_attribute("value")
    assert csrf
    refused = page.request.post(f"{tab.base}/deliveries/{dropped}/discard", form={"csrf": csrf, "note": "  "})
    assert refused.url == f"{tab.base}/deliveries/{dropped}"  # back to the page (post/redirect/get), which says why
    assert "Not discarded: give a note saying why" in refused.text()
    expect(page.locator("#delivery-state")).to_have_text("dead")
    # with the keyboard alone: Tab reaches the note's box (by its label), then the Discard button
    page.get_by_role("button", name="Retry with rebuild").focus()
    note = page.get_by_label(re.compile("^Note: why the EHR does not need"))
    for _ in range(10):
        page.keyboard.press("Tab")
        if note.evaluate("el => el === document.activeElement"):
            break
    expect(note).to_be_focused()
    page.keyboard.type("sent by fax to ward 3; EHR has it")
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Discard")).to_be_focused()
    tab.shot("delivery-discard-form")
    page.keyboard.press("Enter")
    expect(page.get_by_role("status")).to_have_text(f"Delivery {dropped} is discarded.")
    expect(page.locator("#delivery-state")).to_have_text("discarded")
    history = page.locator("#attempts tbody tr").last
    expect(history).to_contain_text("discarded")
    expect(history).to_contain_text("sent by fax to ward 3; EHR has it")
    expect(page.get_by_role("button", name="Discard")).to_have_count(0)
    tab.shot("delivery-discarded")
    status, audit = eng.api("/api/audit?action=discard")
    assert status == 200
    assert [(e["delivery_id"], e["status"], e["detail"]) for e in audit["events"]] == [
        (dropped, 200, "destination mllp: sent by fax to ward 3; EHR has it")]

    # the EHR is fixed: every dead delivery to mllp at once (the discarded one is not dead: it stays)
    ehr.nak = None
    tab.open("/deliveries")
    page.get_by_role("button", name="Retry all dead to mllp", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("1 dead delivery to mllp queued again.")
    wait_until(lambda: {d.id: d.state for d in deliveries(eng) if d.destination == "mllp"}
               == {dropped: "discarded", kept: "delivered"}, timeout=WAIT, message="the kept one delivered")
    assert len(orus_for(ehr, "ACCX2")) == 1 and orus_for(ehr, "ACCX1") == []
    assert tab.errors == []


def test_a_read_only_token_sees_no_action_buttons_and_is_refused_when_it_posts(
        eng: RunningEngine, ehr: StandInEHR, tab: Console, tmp_path: Path) -> None:
    ehr.nak = lambda msg: "AE"
    order_and_images(eng, tmp_path, "MRNV1", "ACCV1", n=1)
    settle(eng)
    wake(eng)
    [did] = dead_mllp(eng)
    secrets = create_tokens(eng.settings, {"viewer": frozenset({Role.READ})})
    page = tab.login(secrets["viewer"], "/deliveries?state=dead")
    expect(page.locator(f'#deliveries tr[data-delivery="{did}"]')).to_be_visible()
    expect(page.get_by_role("button", name=re.compile("Retry|Discard"))).to_have_count(0)
    tab.shot("deliveries-read-only")
    tab.open(f"/deliveries/{did}")
    expect(page.locator("#delivery-state")).to_have_text("dead")
    expect(page.locator("#payload")).to_contain_text("|ACCV1|")
    expect(page.get_by_role("button", name=re.compile("Retry|Discard"))).to_have_count(0)
    expect(page.get_by_label(re.compile("^Note"))).to_have_count(0)
    tab.shot("delivery-read-only")
    csrf = page.locator('form.logout input[name="csrf"]').get_attribute("value")
    assert csrf
    for path, form in ((f"/deliveries/{did}/retry", {"rebuild": "1"}), ("/deliveries/retry", {"destination": "mllp"}),
                       (f"/deliveries/{did}/discard", {"note": "not mine to drop"})):
        answer = page.request.post(f"{tab.base}{path}", form={"csrf": csrf, **form}, max_redirects=0)
        assert answer.status == 403, path
        assert "text/html" in answer.headers["content-type"]
        assert "lacks the role 'operate'" in html.unescape(answer.text())
    assert [d.state for d in deliveries(eng) if d.id == did] == ["dead"]
    status, audit = eng.api("/api/audit?action=retry")
    assert status == 200 and audit["events"] == []
    assert tab.errors == []
