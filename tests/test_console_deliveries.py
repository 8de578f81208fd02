"""Deliveries in the console (issue 16), in a real browser on a real engine sending to the stand-in
EHR (engine/standin_ehr.py) over real sockets: a dead letter shows the EHR's answer and the message
sent; Retry gets it delivered once the EHR is back; Retry with rebuild sends the patient as the
store has them now; discard needs a note, which lands in the delivery's history and the audit trail;
a read-only token sees no buttons and is refused (403 naming 'operate') when it posts anyway.
Screenshots land in artifacts/screenshots/."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Dialog, expect
from sqlalchemy import select

from engine.outbound import admin
from engine.standin_ehr import StandInEHR
from engine.store import tokens
from engine.store.models import Delivery, Order, OrderStatusChange, Study
from engine.store.tokens import Role
from tests.browser import Console
from tests.conftest import TOKEN, RunningEngine
from tests.dicomutil import require_dcmtk
from tests.hl7util import adt
from tests.test_outbound import EHR_TOKEN, _cli_env, deliveries, order_and_images, seg, start, wake
from tests.test_reconciliation import hl7, settle
from tests.test_roles import create_tokens
from tests.waiting import wait_until

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
WAIT = 30.0
MAX_ATTEMPTS = 2  # a delivery the EHR keeps refusing is dead after its second attempt


@pytest.fixture
def ehr() -> Iterator[StandInEHR]:
    with StandInEHR(token=EHR_TOKEN) as e:
        yield e


@pytest.fixture
def running(workdir: Path, db_url: str, ehr: StandInEHR) -> Iterator[RunningEngine]:
    """The engine of the ``console`` fixture (conftest): one sending to the stand-in EHR, giving up
    on a delivery after MAX_ATTEMPTS."""
    require_dcmtk()
    e = start(workdir, db_url, ehr, max_attempts=MAX_ATTEMPTS)
    yield e
    e.stop()


def dead_mllp(e: RunningEngine, n: int = 1) -> list[int]:
    """The ids of the first ``n`` deliveries to the MLLP destination, once all of them are dead."""
    def dead() -> list[int]:
        found = [d for d in deliveries(e) if d.destination == "mllp"]
        return [d.id for d in found] if len(found) == n and all(d.state == "dead" for d in found) else []
    return wait_until(dead, timeout=WAIT, message=f"{n} dead deliveries to mllp")


def dead_then_renamed(e: RunningEngine, ehr: StandInEHR, tmp: Path, mrn: str, accession: str) -> tuple[int, int]:
    """A delivery to mllp dies (the EHR's results inbox is down); then the patient is renamed
    Smith -> Smythe by an A08, whose corrected result dies too; then the EHR comes back. The ids of
    the first delivery and of the correction."""
    ehr.set_mllp_down(True)
    order_and_images(e, tmp, mrn, accession, family="Smith", n=1)
    settle(e)
    wake(e)
    [first] = dead_mllp(e)
    hl7(e, adt("A08", mrn, "Smythe", "John", dob="19800202", sex="M"))
    settle(e)
    wake(e)
    again, corrected = dead_mllp(e, 2)
    assert again == first
    ehr.set_mllp_down(False)
    return first, corrected


def orus_for(ehr: StandInEHR, accession: str) -> list[str]:
    """The ORU^R01 the stand-in EHR accepted (AA) for ``accession``."""
    return [m for m in ehr.oru_messages() if seg(m, "OBR")[18] == accession]


def accept_dialogs(console: Console) -> None:
    """data-confirm forms ask first: a person says yes."""
    def accept(dialog: Dialog) -> None:
        dialog.accept()
    console.page.on("dialog", accept)


@SQLITE_ONLY
def test_retry_a_dead_delivery(running: RunningEngine, ehr: StandInEHR, console: Console, tmp_path: Path) -> None:
    ehr.nak = lambda msg: "AR" if "|ACCD1|" in msg else None  # AR: worth retrying, until the attempts run out
    order_and_images(running, tmp_path, "MRND1", "ACCD1", n=1)
    settle(running)
    wake(running)
    [did] = dead_mllp(running)
    page = console.open("/deliveries")
    expect(page.get_by_role("heading", name="Deliveries", exact=True)).to_be_visible()
    dead_cell = page.locator('#delivery-counts tr[data-destination="mllp"] td[data-state="dead"]')
    expect(dead_cell).to_have_text("1")
    console.shot("deliveries")
    dead_cell.get_by_role("link").click()
    expect(page).to_have_url(re.compile(r"/deliveries\?destination=mllp&state=dead$"))
    expect(page.get_by_role("heading", name="Dead letters", exact=True)).to_be_visible()
    row = page.locator(f'#deliveries tr[data-delivery="{did}"]')
    expect(row).to_contain_text("dead")
    expect(page.locator("#deliveries tbody tr")).to_have_count(1)
    console.shot("deliveries-dead")
    row.get_by_role("link", name=str(did), exact=True).click()
    expect(page).to_have_url(f"{console.base}/deliveries/{did}")
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
    expect(page.get_by_role("link", name=f"patient {deliveries(running)[0].patient_id}")).to_have_attribute(
        "href", re.compile(r"^/patients/\d+$"))
    console.shot("delivery-dead")
    # the payload holds the patient's details: reading it, on the page or from the API, is on the trail
    patient_id = deliveries(running)[0].patient_id
    assert running.api(f"/api/deliveries/{did}")[0] == 200
    status, reads = running.api("/api/audit?action=read&resource_type=Delivery")
    assert status == 200
    assert [(e["delivery_id"], e["patient_ids"], e["query"].split("?")[0]) for e in reads["events"]] == [
        (did, [patient_id], f"/api/deliveries/{did}"), (did, [patient_id], f"/deliveries/{did}")]  # newest first

    ehr.nak = None  # the EHR is fixed
    page.get_by_role("button", name="Retry", exact=True).click()
    expect(page.get_by_role("status")).to_have_text(f"Delivery {did} is queued again.")
    expect(page.locator("#delivery-state")).to_have_text("delivered")  # live: no reload needed
    expect(page.locator("#attempts tbody tr")).to_have_count(MAX_ATTEMPTS + 1)
    console.shot("delivery-delivered")
    [oru] = orus_for(ehr, "ACCD1")  # exactly once
    assert seg(oru, "MSH")[9] == f"RB{did:010d}"
    status, audit = running.api("/api/audit?action=retry")
    assert status == 200
    assert [(e["delivery_id"], e["agent"], e["status"]) for e in audit["events"]] == [
        (did, tokens.config_token_name(TOKEN), 200)]
    # the FHIR side went through at once: its page shows the ImagingStudy sent and the server's answer
    [fhir] = [d for d in deliveries(running) if d.destination == "fhir"]
    console.open(f"/deliveries/{fhir.id}")
    expect(page.locator("#delivery-state")).to_have_text("delivered")
    expect(page.locator("#payload")).to_contain_text('"resourceType": "ImagingStudy"')
    expect(page.locator("#attempts tbody tr td").nth(2)).to_have_text(re.compile(r"^20[01]$"))
    expect(page.get_by_role("button", name=re.compile("Retry|Discard"))).to_have_count(0)  # delivered: nothing to do
    console.shot("delivery-fhir")
    assert console.errors == []


@SQLITE_ONLY
def test_retry_with_rebuild_sends_the_patient_as_the_store_has_them_now(running: RunningEngine, ehr: StandInEHR,
                                                                         console: Console, tmp_path: Path) -> None:
    did, corrected = dead_then_renamed(running, ehr, tmp_path, "MRNR1", "ACCR1")
    page = console.open(f"/deliveries/{did}")
    expect(page.locator("#payload")).to_contain_text("|Smith^John|")  # the message kept from the first attempt
    page.get_by_role("button", name="Retry with rebuild").click()
    expect(page.get_by_role("status")).to_contain_text(f"Delivery {did} is queued again, its message to be built")
    expect(page.locator("#delivery-state")).to_have_text("delivered")
    [oru] = orus_for(ehr, "ACCR1")  # the corrected one is still dead: only the retried one went
    assert seg(oru, "MSH")[9] == f"RB{did:010d}" and seg(oru, "PID")[5] == "Smythe^John"
    assert seg(oru, "OBR")[25] == "F"  # still the result it was (study.reconciled), with today's patient
    page.reload()
    expect(page.locator("#payload")).to_contain_text("|Smythe^John|")
    console.shot("delivery-rebuilt")
    assert next(d for d in deliveries(running) if d.id == corrected).state == "dead"
    status, audit = running.api("/api/audit?action=retry")
    assert status == 200 and [e["detail"] for e in audit["events"]] == ["destination mllp rebuild"]
    assert console.errors == []


@SQLITE_ONLY
def test_discard_with_a_note_by_keyboard_then_retry_every_dead_one(running: RunningEngine, ehr: StandInEHR,
                                                                     console: Console, tmp_path: Path) -> None:
    ehr.nak = lambda msg: "AE" if "|ACCX" in msg else None  # AE: the message is wrong, dead at once
    order_and_images(running, tmp_path / "1", "MRNX1", "ACCX1", n=1)
    order_and_images(running, tmp_path / "2", "MRNX2", "ACCX2", family="Jones", n=1)
    settle(running)
    wake(running)
    ids = dead_mllp(running, 2)
    assert [d.attempts for d in deliveries(running) if d.id in ids] == [1, 1]
    dropped, kept = ids
    accept_dialogs(console)
    page = console.open(f"/deliveries/{dropped}")
    # an empty note is refused (the browser's own check bypassed: the server says why)
    csrf = page.locator('form.logout input[name="csrf"]').get_attribute("value")
    assert csrf
    refused = page.request.post(f"{console.base}/deliveries/{dropped}/discard", form={"csrf": csrf, "note": "  "})
    assert refused.url == f"{console.base}/deliveries/{dropped}"  # back to the page (post/redirect/get), which says why
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
    console.shot("delivery-discard-form")
    page.keyboard.press("Enter")
    expect(page.get_by_role("status")).to_have_text(f"Delivery {dropped} is discarded.")
    expect(page.locator("#delivery-state")).to_have_text("discarded")
    history = page.locator("#attempts tbody tr").last
    expect(history).to_contain_text("discarded")
    expect(history).to_contain_text("sent by fax to ward 3; EHR has it")
    expect(page.get_by_role("button", name="Discard")).to_have_count(0)
    console.shot("delivery-discarded")
    status, audit = running.api("/api/audit?action=discard")
    assert status == 200
    assert [(e["delivery_id"], e["status"], e["detail"]) for e in audit["events"]] == [
        (dropped, 200, "destination mllp: sent by fax to ward 3; EHR has it")]

    # the EHR is fixed: every dead delivery to mllp at once (the discarded one is not dead: it stays)
    ehr.nak = None
    console.open("/deliveries")
    page.get_by_role("button", name="Retry all dead to mllp", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("1 dead delivery to mllp queued again.")
    wait_until(lambda: {d.id: d.state for d in deliveries(running) if d.destination == "mllp"}
               == {dropped: "discarded", kept: "delivered"}, timeout=WAIT, message="the kept one delivered")
    assert len(orus_for(ehr, "ACCX2")) == 1 and orus_for(ehr, "ACCX1") == []
    assert console.errors == []


@SQLITE_ONLY
def test_a_read_only_token_sees_no_action_buttons_and_is_refused_when_it_posts(
        running: RunningEngine, ehr: StandInEHR, console: Console, tmp_path: Path) -> None:
    ehr.nak = lambda msg: "AE"
    order_and_images(running, tmp_path, "MRNV1", "ACCV1", n=1)
    settle(running)
    wake(running)
    [did] = dead_mllp(running)
    secrets = create_tokens(running.settings, {"viewer": frozenset({Role.READ})})
    console.page.get_by_role("button", name="Log out").click()  # the operator leaves; a viewer logs in
    page = console.login(secrets["viewer"], "/deliveries?state=dead")
    expect(page.locator(f'#deliveries tr[data-delivery="{did}"]')).to_be_visible()
    expect(page.get_by_role("button", name=re.compile("Retry|Discard"))).to_have_count(0)
    console.shot("deliveries-read-only")
    console.open(f"/deliveries/{did}")
    expect(page.locator("#delivery-state")).to_have_text("dead")
    expect(page.locator("#payload")).to_contain_text("|ACCV1|")
    expect(page.get_by_role("button", name=re.compile("Retry|Discard"))).to_have_count(0)
    expect(page.get_by_label(re.compile("^Note"))).to_have_count(0)
    console.shot("delivery-read-only")
    csrf = page.locator('form.logout input[name="csrf"]').get_attribute("value")
    assert csrf
    for path, form in ((f"/deliveries/{did}/retry", {"rebuild": "1"}), ("/deliveries/retry", {"destination": "mllp"}),
                       (f"/deliveries/{did}/discard", {"note": "not mine to drop"})):
        answer = page.request.post(f"{console.base}{path}", form={"csrf": csrf, **form}, max_redirects=0)
        assert answer.status == 403, path
        assert "text/html" in answer.headers["content-type"]
        assert "lacks the role 'operate'" in html.unescape(answer.text())
    assert [d.state for d in deliveries(running) if d.id == did] == ["dead"]
    status, audit = running.api("/api/audit?action=retry")
    assert status == 200 and audit["events"] == []
    assert console.errors == []


@SQLITE_ONLY
def test_cli_retry_with_rebuild_is_the_same_action(running: RunningEngine, ehr: StandInEHR, tmp_path: Path) -> None:
    """`radbridge deliveries retry ID --rebuild` builds the message again like the console's button,
    and records the same audit subject."""
    did, _corrected = dead_then_renamed(running, ehr, tmp_path, "MRNC1", "ACCC1")
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "deliveries", "retry", str(did), "--rebuild"],
                          capture_output=True, text=True, timeout=60, env=_cli_env(running))
    assert proc.returncode == 0 and "1 delivery queued again (to be built again)" in proc.stdout, proc.stderr
    wake(running)
    assert ehr.wait_for(lambda: len(orus_for(ehr, "ACCC1")) == 1, WAIT)
    [oru] = orus_for(ehr, "ACCC1")
    assert seg(oru, "MSH")[9] == f"RB{did:010d}" and seg(oru, "PID")[5] == "Smythe^John"
    status, audit = running.api("/api/audit?action=retry")
    assert status == 200 and [(e["delivery_id"], e["detail"]) for e in audit["events"]] == [
        (did, "destination mllp rebuild")]


def listed(running: RunningEngine, query: str) -> tuple[list[int], dict[str, str]]:
    """The delivery ids a /deliveries page lists, in order, and its pager's links (rel -> query)."""
    status, page = running.api(f"/deliveries?{query}")
    assert status == 200, page
    ids = [int(i) for i in re.findall(r'<tr data-delivery="(\d+)">', page)]
    links = {rel: html.unescape(q) for q, rel in re.findall(r'<a href="\?([^"]*)" rel="(prev|next)">', page)}
    return ids, links


def test_the_list_pages_by_id_and_filters_by_destination_state_study_and_message(
        running: RunningEngine, ehr: StandInEHR, tmp_path: Path) -> None:
    """Query logic of /deliveries on both databases: keyset pages (older, then newer again), each
    filter, and counts that stop at their cap."""
    ehr.nak = lambda msg: "AE" if "|ACCP1|" in msg else None
    objs = [order_and_images(running, tmp_path / str(i), f"MRNP{i}", f"ACCP{i}", n=1) for i in (1, 2, 3)]
    settle(running)
    wake(running)

    def settled() -> list[Delivery]:
        found = deliveries(running)
        return found if len(found) == 6 and all(d.state != "pending" for d in found) else []
    done = wait_until(settled, timeout=WAIT, message="six deliveries settled")
    ids = sorted((d.id for d in done), reverse=True)
    dead = [d.id for d in done if d.state == "dead"]
    assert len(dead) == 1

    first, links = listed(running, "limit=2")
    assert first == ids[:2] and set(links) == {"next"}
    second, links = listed(running, links["next"])
    assert second == ids[2:4] and set(links) == {"prev", "next"}
    third, links = listed(running, links["next"])
    assert third == ids[4:] and set(links) == {"prev"}
    back, links = listed(running, links["prev"])
    assert back == ids[2:4] and set(links) == {"prev", "next"}
    newest, links = listed(running, links["prev"])
    assert newest == ids[:2] and set(links) == {"next"}

    assert listed(running, "state=dead&destination=mllp")[0] == dead
    assert listed(running, "state=dead&destination=fhir")[0] == []
    with running.db.read_session() as s:
        placed_by = s.execute(select(OrderStatusChange.message_id).join(Order, Order.id == OrderStatusChange.order_id)
                              .where(Order.accession == "ACCP2", OrderStatusChange.message_id.is_not(None))
                              .order_by(OrderStatusChange.id)).scalars().first()
        study_of = {acc: sid for acc, sid in s.execute(select(Study.accession, Study.id))}
    assert listed(running, f"study={objs[2].study_uid}")[0] == [
        d.id for d in sorted(done, key=lambda d: -d.id) if d.study_id == study_of["ACCP3"]]
    assert listed(running, f"message={placed_by}")[0] == [
        d.id for d in sorted(done, key=lambda d: -d.id) if d.study_id == study_of["ACCP2"]]
    status, page = running.api("/deliveries?state=lost&message=ACCP2")
    assert status == 200 and "state must be one of pending, delivered, dead, discarded, superseded" in page
    assert "message is a message&#39;s number" in page or "message is a message&#x27;s number" in page

    with running.db.reader.connect() as conn:
        assert admin.destinations(conn) == ["fhir", "mllp"]
        assert admin.capped_counts(conn) == {"fhir": {"delivered": 3}, "mllp": {"delivered": 2, "dead": 1}}
        assert admin.capped_counts(conn, cap=1) == {"fhir": {"delivered": 2}, "mllp": {"delivered": 2, "dead": 1}}
