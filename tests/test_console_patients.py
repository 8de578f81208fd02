"""The console's patients and orders (issue 16 item 3) in a real browser: ADT and ORM sent over real
MLLP, then the patient found by identifier and by name, its page showing identifiers, the alias an
A40 merge left, the merge both ways, the demographic history an A08 wrote, its orders; the order page
with its status history and its patient's identifiers. Every page view of patient data is on the
audit trail like the API's. Screenshots land in artifacts/screenshots/."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect
from sqlalchemy import select

from engine.store.models import AuditEvent
from tests.browser import Console
from tests.conftest import RunningEngine
from tests.hl7util import ack_code, adt, orm, send

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def hl7(e: RunningEngine, *messages: str) -> None:
    for m in messages:
        reply = send(e.mllp_port, m)
        assert ack_code(reply) == "AA", reply


def reads(e: RunningEngine, resource_type: str) -> list[tuple[str, str, int]]:
    """(action, query, status) of the audit rows for reads of ``resource_type``."""
    with e.db.read_session() as s:
        rows = s.execute(select(AuditEvent.action, AuditEvent.query, AuditEvent.status)
                         .where(AuditEvent.resource_type == resource_type).order_by(AuditEvent.id)).all()
    return [(r[0], r[1], r[2]) for r in rows]


def patient_id(e: RunningEngine, mrn: str) -> int:
    status, body = e.api(f"/api/patients?identifier={mrn}&issuer=GENHOSP")
    assert status == 200, body
    [p] = body["patients"]
    return int(p["id"])


@SQLITE_ONLY
def test_patient_page_shows_identifiers_merge_alias_history_and_orders(running: RunningEngine,
                                                                       console: Console) -> None:
    hl7(running, adt("A04", "CP100", "Lindqvist", "Anna", dob="19810203"),
        adt("A08", "CP100", "Lindqvist-Berg", "Anna", dob="19810203", ts="20240316090000"),
        adt("A04", "CP200", "Lindkvist", "Ana", dob="19810203"),
        orm("NW", "PLP1", "ACCP1", "CP100", family="Lindqvist-Berg", modality="CT"),
        orm("NW", "PLP2", "ACCP2", "CP200", family="Lindkvist", modality="MR"),
        adt("A40", "CP100", "Lindqvist-Berg", "Anna", dob="19810203", mrg="CP200", ts="20240317090000"))
    survivor, prior = patient_id(running, "CP100"), patient_id(running, "CP200")
    assert survivor == prior  # CP200 is now an alias of the survivor: found there
    page = console.open("/patients")
    page.get_by_label("Family name starts with").fill("lindqvist")
    page.get_by_role("button", name="Search").click()
    row = page.locator(f'#patients tr[data-patient="{survivor}"]')
    expect(row).to_contain_text("CP100^GENHOSP")
    expect(page.locator("#patients tbody tr")).to_have_count(1)  # "Lindkvist" is not a prefix match
    console.shot("patients-search")
    row.get_by_role("link").click()
    expect(page).to_have_url(re.compile(rf"/patients/{survivor}$"))
    expect(page.get_by_role("heading", level=1)).to_contain_text("Lindqvist-Berg, Anna")
    idents = page.get_by_role("table", name="Identifiers", exact=True)
    expect(idents.locator("tbody tr")).to_have_count(1)
    expect(idents.locator("tbody tr").first).to_contain_text("CP100")
    aliases = page.get_by_role("table", name="Aliases (identifiers kept after merges)")
    expect(aliases.locator("tbody tr")).to_have_text([re.compile(r"CP200\s*GENHOSP")])
    history = page.locator("#history tbody tr")
    expect(history.filter(has_text="merged")).to_have_count(1)
    expect(history.filter(has_text="Lindqvist-Berg")).not_to_have_count(0)  # the A08's change of name
    expect(history.filter(has_text="Lindqvist → Lindqvist-Berg")).to_have_count(1)
    orders = page.locator("#orders tbody tr")
    expect(orders).to_have_count(2)  # its own, and the one the merge moved over
    expect(orders.filter(has_text="ACCP2")).to_have_count(1)
    console.shot("patient-detail")

    # both were known: the prior record is kept, retired, and each page links to the other
    merged_from = page.locator("#merges li", has_text="Merged from")
    expect(merged_from).to_have_count(1)
    retired = merged_from.get_by_role("link").inner_text().split()[-1]
    assert retired.isdigit() and int(retired) != survivor
    merged_from.get_by_role("link").click()
    expect(page.locator("#merges")).to_contain_text(f"Merged into patient {survivor}")
    expect(page.get_by_role("note")).to_contain_text("merged into")
    expect(page.locator("#orders tbody")).to_have_text("No orders.")  # moved to the survivor
    console.shot("patient-merged-away")
    trail = reads(running, "Patient")
    assert ("search", "/patients?identifier=&issuer=&name=lindqvist&birth_date=", 200) in trail
    assert ("read", f"/patients/{survivor}", 200) in trail
    assert console.errors == []


@SQLITE_ONLY
def test_order_page_shows_status_history_and_the_patients_identifiers(running: RunningEngine,
                                                                      console: Console) -> None:
    hl7(running, adt("A04", "CO100", "Okafor", "Chidi", dob="19700505", sex="M"),
        orm("NW", "PLO1", "ACCO1", "CO100", family="Okafor", modality="CT"),
        orm("SC", "PLO1", "ACCO1", "CO100", family="Okafor", modality="CT", status="IP"),
        orm("NW", "PLO2", "ACCO2", "CO100", family="Okafor", modality="MR"))
    status, body = running.api("/api/orders?accession=ACCO1")
    assert status == 200
    [api_order] = body["orders"]
    transitions = [(h["from"] or "", h["to"]) for h in api_order["history"]]
    assert len(transitions) == 2
    page = console.open("/orders")
    page.get_by_label("Patient identifier (ID or ID^ISSUER)").fill("CO100^GENHOSP")
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#orders tbody tr")).to_have_count(2)
    # each order names its patient as the feeds do, by identifier, not by the store's internal number
    expect(page.locator('#orders tr', has_text="ACCO1").get_by_role("link", name="CO100^GENHOSP")).to_have_attribute(
        "href", f"/patients/{api_order['patient_id']}")
    console.shot("orders-search")
    page.locator('#orders tr', has_text="ACCO1").get_by_role("link", name=re.compile("order")).click()
    expect(page).to_have_url(re.compile(rf"/orders/{api_order['id']}$"))
    expect(page.get_by_role("heading", level=1)).to_contain_text("accession ACCO1")
    rows = page.locator("#status-history tbody tr")
    expect(rows).to_have_count(len(transitions))
    for row, (old, new) in zip(rows.all(), transitions, strict=True):
        expect(row.locator("td").nth(2)).to_have_text(old)
        expect(row.locator("td").nth(3)).to_have_text(new)
    idents = page.get_by_role("table", name="The patient's identifiers")
    expect(idents.locator("tbody tr")).to_have_text([re.compile(r"CO100\s*GENHOSP")])
    console.shot("order-detail")
    trail = reads(running, "Order")
    assert ("search", "/orders?accession=&placer=&filler=&status=&patient=CO100%5EGENHOSP", 200) in trail
    assert ("read", f"/orders/{api_order['id']}", 200) in trail
    assert console.errors == []


@SQLITE_ONLY
def test_unknown_records_and_empty_searches(running: RunningEngine, console: Console) -> None:
    page = console.open("/patients/999999")
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    assert [e for e in console.errors if "404" not in e] == []  # the browser logs the page's own 404
    console.errors.clear()
    assert page.request.get(f"{console.base}/orders/999999").status == 404
    page = console.open("/patients?birth_date=1901-01-01")
    expect(page.locator("#patients tbody")).to_have_text("No patient matches.")
    page = console.open("/orders")  # no criteria: the form and a hint, nothing read
    expect(page.get_by_label("Accession number")).to_be_visible()
    assert [r for r in reads(running, "Order") if r[0] == "search"] == []
    assert console.errors == []


def _rows(e: RunningEngine, path: str, attr: str) -> list[str]:
    status, html = e.api(path)
    assert status == 200, html
    return re.findall(rf'<tr {attr}="(\d+)">', html)


def test_patient_and_order_searches_on_both_databases(running: RunningEngine) -> None:
    """The searches' SQL (identifier with or without issuer, aliases, name prefix in any case, birth
    date, order numbers and the patient's identifier) on SQLite and PostgreSQL alike."""
    hl7(running, adt("A04", "CQ1", "Berg", "Ola", dob="19500101", issuer="GENHOSP"),
        adt("A04", "CQ1", "Bergman", "Ida", dob="19600101", issuer="OTHERHOSP"),
        adt("A04", "CQ3", "Andersen", "Kai", dob="19500101"),
        orm("NW", "PLQ1", "ACCQ1", "CQ1", family="Berg"), orm("NW", "PLQ3", "ACCQ3", "CQ3", family="Andersen"))
    berg, andersen = patient_id(running, "CQ1"), str(patient_id(running, "CQ3"))
    status, body = running.api("/api/patients?identifier=CQ1&issuer=OTHERHOSP")
    [other] = body["patients"]
    bergman = str(other["id"])
    assert sorted(_rows(running, "/patients?identifier=CQ1", "data-patient")) == sorted([str(berg), bergman])
    assert _rows(running, "/patients?identifier=CQ1&issuer=OTHERHOSP", "data-patient") == [bergman]
    assert sorted(_rows(running, "/patients?name=BERG", "data-patient")) == sorted([str(berg), bergman])
    assert _rows(running, "/patients?name=bergm", "data-patient") == [bergman]
    assert sorted(_rows(running, "/patients?birth_date=1950-01-01", "data-patient")) == sorted([str(berg), andersen])
    assert _rows(running, "/patients?name=berg&birth_date=1950-01-01", "data-patient") == [str(berg)]
    status, body = running.api("/api/patients?birth_date=1950-01-01")  # the API's search is the same one
    assert status == 200 and sorted(str(p["id"]) for p in body["patients"]) == sorted([str(berg), andersen])
    status, body = running.api("/api/orders?accession=ACCQ1")
    [q1] = body["orders"]
    assert _rows(running, "/orders?placer=PLQ1", "data-order") == [str(q1["id"])]
    assert _rows(running, "/orders?filler=FPLQ1", "data-order") == [str(q1["id"])]
    assert _rows(running, "/orders?patient=CQ1%5EGENHOSP", "data-order") == [str(q1["id"])]
    assert _rows(running, "/orders?patient=CQ1%5EOTHERHOSP", "data-order") == []
    assert len(_rows(running, "/orders?status=SC", "data-order")) == 2
    status, body = running.api("/api/orders?patient=CQ3")  # the API takes the same filter
    assert status == 200 and [o["accession"] for o in body["orders"]] == ["ACCQ3"]
