"""The console's overview and message search (issue 16): counts on the overview are those of the
messages sent over real MLLP (and outlive a restart), the live part changes without a reload, the
message search's filters (console and GET /api/messages: one query) find exactly the right
messages on SQLite and PostgreSQL, keyset paging both ways, and the search form works with the
keyboard alone. Screenshots: artifacts/screenshots/overview-*.png, messages-*.png."""

from __future__ import annotations

import re
import urllib.parse
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from engine.config import Settings
from tests.browser import Console
from tests.conftest import RunningEngine
from tests.hl7util import ack_code, adt, ctrl_id, msh, orm, send, send_many
from tests.waiting import wait_until

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
CHANNEL = "hl7-inbound"
FLUSH_WAIT = 20.0  # the per-minute figures are written every 2 s; the page refreshes every 5 s


def bad_birth_date(mrn: str) -> str:
    """Applied as AE: the default mapping reads birth dates as YYYYMMDD."""
    return adt("A01", mrn, "Later", dob="12.04.1965")


def unknown_type() -> str:
    """Rejected as AR: no route of the channel takes this message type."""
    return "\r".join([msh("ZZZ^Z01", ctrl_id("ZZZ")), "PID|1||Z1^^^GENHOSP^MR||Doe^Zed"]) + "\r"


def figures(html: str, channel: str = CHANNEL) -> dict[str, str]:
    """The data-figure cells of one channel's row of the overview."""
    row = re.search(rf'<tr data-channel="{re.escape(channel)}">(.*?)</tr>', html, re.S)
    assert row is not None, html[:2000]
    return dict(re.findall(r'data-figure="([a-z0-9-]+)">([^<]*)<', row.group(1)))


def live(running: RunningEngine) -> dict[str, str]:
    status, html = running.api("/overview/live")
    assert status == 200
    return figures(html)


def expected(replies: list[str]) -> dict[str, str]:
    codes = Counter(ack_code(r) for r in replies)
    return {"received": str(len(replies)), "aa": str(codes["AA"]), "ae": str(codes["AE"]), "ar": str(codes["AR"])}


def counts_of(fig: dict[str, str], span: str) -> dict[str, str]:
    return {k: fig[f"{span}-{k}"] for k in ("received", "aa", "ae", "ar")}


def test_overview_counts_are_the_acks_sent_and_outlive_a_restart(settings: Settings) -> None:
    running = RunningEngine(settings).start()
    try:
        want = _counted(running)
    finally:
        running.stop()
    # the figures are rows, not the process's counters: a new engine on the same store shows them
    again = RunningEngine(settings).start()
    try:
        assert counts_of(live(again), "day") == want
        assert again.engine.metrics.received.value(channel=CHANNEL) == 0
    finally:
        again.stop()


def _counted(running: RunningEngine) -> dict[str, str]:
    assert counts_of(live(running), "day") == {"received": "0", "aa": "0", "ae": "0", "ar": "0"}
    replies = send_many(running.mllp_port, [adt("A01", f"OV{i}", "Good") for i in range(3)])
    replies += [send(running.mllp_port, bad_birth_date("OVBAD")), send(running.mllp_port, unknown_type())]
    assert sorted(ack_code(r) for r in replies) == ["AA", "AA", "AA", "AE", "AR"]
    want = expected(replies)
    wait_until(lambda: counts_of(live(running), "hour") == want, timeout=FLUSH_WAIT, message="the hour's counts")
    fig = live(running)
    assert counts_of(fig, "day") == want
    assert fig["p50"].endswith(" ms") and fig["p99"].endswith(" ms")  # five ACKs: a latency is known
    status, html = running.api("/overview/chart")
    assert status == 200 and f'data-chart="{CHANNEL}"' in html and 'class="line messages" d="M' in html
    return want


def test_a_file_channels_messages_are_counted_too(workdir: Path, db_url: str) -> None:
    from tests.test_file_connector import drop, file_engine
    with file_engine(workdir, db_url) as (running, inbox):
        assert counts_of(figures(running.api("/overview/live")[1], "hl7-file"), "hour")["received"] == "0"
        drop(inbox, "batch.hl7", (adt("A01", "FILE1", "Good") + "\n" + bad_birth_date("FILE2")).encode())

        def both_stored() -> list[str]:
            found = running.api("/api/messages?channel=hl7-file")[1]["messages"]
            return [m["ack_code"] for m in found] if len(found) == 2 else []
        stored = wait_until(both_stored, timeout=FLUSH_WAIT, message="both messages of the file stored")
        assert sorted(stored) == ["AA", "AE"]
        codes = Counter(stored)
        want = {"received": "2", "aa": str(codes["AA"]), "ae": str(codes["AE"]), "ar": str(codes["AR"])}
        wait_until(lambda: counts_of(figures(running.api("/overview/live")[1], "hl7-file"), "hour") == want,
                   timeout=FLUSH_WAIT, message="the file channel's counts")


def test_overview_shows_health_backlog_and_links_the_exceptions(running: RunningEngine) -> None:
    status, health = running.api("/health")
    status, html = running.api("/")
    assert status == 200
    assert re.search(r'id="writer-backlog">\d+<', html)
    assert ('id="health-status"><span class="badge state-ok">ok<' in html) == (health["status"] == "ok")
    exceptions = len(running.api("/api/studies?exceptions=true")[1]["studies"])
    assert f'href="/studies?reconciliation=exceptions">{exceptions}<' in html
    free = health["checks"].get("storage_free_mb")
    if free is not None:
        shown = re.search(r'id="storage-free">(\d+) MB<', html)
        assert shown is not None and abs(int(shown.group(1)) - free) < 64  # the disk moves between the two reads


# --- message search ---------------------------------------------------------------------------------

def sent(running: RunningEngine) -> dict[str, Any]:
    """A small, varied set of messages; returns what the test knows about each (by control ID)."""
    a1, o1, a2, bad = ctrl_id("S"), ctrl_id("S"), ctrl_id("S"), ctrl_id("S")
    replies = send_many(running.mllp_port, [adt("A01", "SRCH1", "First", ctrl=a1),
                                            orm("NW", "PL77", "ACC77", "SRCH1", ctrl=o1),
                                            adt("A01", "SRCH2", "Second", issuer="OTHER", ctrl=a2)])
    replies.append(send(running.mllp_port, adt("A01", "SRCH3", "Bad", dob="12.04.1965", ctrl=bad)))
    assert [ack_code(r) for r in replies] == ["AA", "AA", "AA", "AE"], replies
    listed = running.api("/api/messages?limit=500")[1]["messages"]
    ids = {m["control_id"]: m["id"] for m in listed}
    return {"a1": ids[a1], "o1": ids[o1], "a2": ids[a2], "bad": ids[bad], "all": [m["id"] for m in listed],
            "orm_type": next(m["type"] for m in listed if m["id"] == ids[o1]),
            "first": min(m["received_at"] for m in listed)}


def api_ids(running: RunningEngine, **params: str) -> list[int]:
    status, body = running.api("/api/messages?" + urllib.parse.urlencode(params))
    assert status == 200, body
    return [m["id"] for m in body["messages"]]


def page_ids(running: RunningEngine, **params: str) -> list[int]:
    status, html = running.api("/messages?" + urllib.parse.urlencode(params))
    assert status == 200, html[:500]
    return [int(i) for i in re.findall(r'<tr data-message="(\d+)">', html)]


def test_every_filter_finds_exactly_its_messages_in_the_api_and_the_console(running: RunningEngine) -> None:
    m = sent(running)
    later = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
    cases: list[tuple[dict[str, str], list[int]]] = [
        ({}, m["all"]),
        ({"control_id": "no-such-control"}, []),
        ({"identifier": "SRCH1"}, [m["o1"], m["a1"]]),
        ({"identifier": "SRCH2", "issuer": "OTHER"}, [m["a2"]]),
        ({"identifier": "SRCH2", "issuer": "GENHOSP"}, []),
        ({"accession": "ACC77"}, [m["o1"]]),
        ({"status": "error"}, [m["bad"]]),
        ({"status": "processed", "identifier": "SRCH1"}, [m["o1"], m["a1"]]),
        ({"type": m["orm_type"]}, [m["o1"]]),
        ({"channel": CHANNEL}, m["all"]),
        ({"channel": "no-such-channel"}, []),
        ({"received_from": later}, []),
        ({"received_to": later}, m["all"]),
        ({"received_from": m["first"], "status": "processed"}, [m["a2"], m["o1"], m["a1"]]),
    ]
    for control, key in ((m["a1"], "a1"), (m["bad"], "bad")):
        listed = running.api("/api/messages?limit=500")[1]["messages"]
        cid = next(x["control_id"] for x in listed if x["id"] == control)
        cases.append(({"control_id": cid}, [m[key]]))
    wrong = []
    for params, want in cases:
        got_api, got_page = api_ids(running, **params), page_ids(running, **params)
        if got_api != want or got_page != want:
            wrong.append(f"{params}: api {got_api}, console {got_page}, want {want}")
    assert wrong == []


def test_a_merged_patients_messages_are_found_by_either_identifier(running: RunningEngine) -> None:
    c_old, c_new, c_merge, c_other = ctrl_id("M"), ctrl_id("M"), ctrl_id("M"), ctrl_id("M")
    replies = send_many(running.mllp_port, [adt("A01", "MRGOLD", "Prior", ctrl=c_old),
                                            adt("A01", "MRGNEW", "Survivor", ctrl=c_new),
                                            adt("A01", "MRGOTHER", "Other", ctrl=c_other),
                                            adt("A40", "MRGNEW", "Survivor", mrg="MRGOLD", ctrl=c_merge)])
    assert [ack_code(r) for r in replies] == ["AA"] * 4, replies
    ids = {m["control_id"]: m["id"] for m in running.api("/api/messages")[1]["messages"]}
    old_patient = running.api(f"/api/messages?control_id={c_old}")[1]["messages"][0]["patient_id"]
    new_patient = running.api(f"/api/messages?control_id={c_new}")[1]["messages"][0]["patient_id"]
    assert old_patient != new_patient  # the prior patient's message keeps the prior patient
    both = [ids[c_merge], ids[c_new], ids[c_old]]
    for ident in ("MRGOLD", "MRGNEW"):
        assert api_ids(running, identifier=ident) == both, ident
        assert page_ids(running, identifier=ident, issuer="GENHOSP") == both, ident


def test_pages_go_older_and_newer_by_id(running: RunningEngine) -> None:
    m = sent(running)
    newest_first = m["all"]
    assert len(newest_first) == 4
    first = api_ids(running, limit="2")
    older = api_ids(running, limit="2", before_id=str(first[-1]))
    back = api_ids(running, limit="2", after_id=str(older[0]))
    assert first + older == newest_first and back == first
    assert api_ids(running, limit="2", before_id=str(older[-1])) == []


def pager_links(html: str) -> dict[str, str]:
    """The pager's links: {"prev": query, "next": query} (Newer, Older) as the page has them."""
    nav = html.split('<nav class="pager"', 1)[1].split("</nav>", 1)[0]
    return {rel: q.replace("&amp;", "&") for q, rel in re.findall(r'<a href="\?([^"]*)" rel="(prev|next)"', nav)}


def test_the_console_pages_older_and_newer_keeping_the_filters(running: RunningEngine) -> None:
    sent_ids = send_many(running.mllp_port, [adt("A01", f"PG{i}", "Paged") for i in range(55)])
    assert {ack_code(r) for r in sent_ids} == {"AA"}
    newest = api_ids(running, status="processed", limit="500")
    assert len(newest) == 55
    status, html = running.api("/messages?status=processed")
    first = [int(i) for i in re.findall(r'<tr data-message="(\d+)">', html)]
    links = pager_links(html)
    assert first == newest[:50] and set(links) == {"next"} and "status=processed" in links["next"]
    status, html = running.api("/messages?" + links["next"])
    older = [int(i) for i in re.findall(r'<tr data-message="(\d+)">', html)]
    links = pager_links(html)
    assert older == newest[50:] and set(links) == {"prev"}
    status, html = running.api("/messages?" + links["prev"])
    assert [int(i) for i in re.findall(r'<tr data-message="(\d+)">', html)] == first
    assert set(pager_links(html)) == {"next"}


def test_a_wrong_parameter_is_named_not_echoed(running: RunningEngine) -> None:
    for params, named in (({"received_from": "yesterday<script>"}, "received_from"),
                          ({"before_id": "12x"}, "before_id"), ({"patient_id": "\u00b2"}, "patient_id"),
                          ({"issuer": "X"}, "issuer")):
        status, body = running.api("/api/messages?" + urllib.parse.urlencode(params))
        assert status == 400 and named in body["detail"] and "<script>" not in body["detail"]
        status, html = running.api("/messages?" + urllib.parse.urlencode(params))
        assert status == 400 and named in html and "yesterday&lt;script" not in html.split("</form>")[-1]


# --- in the browser ---------------------------------------------------------------------------------

def cell(console: Console, figure: str) -> Any:
    return console.page.locator(f'#channels tr[data-channel="{CHANNEL}"] [data-figure="{figure}"]')


@SQLITE_ONLY
def test_the_overview_counts_messages_live_without_a_reload(running: RunningEngine, console: Console) -> None:
    page = console.open("/")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    expect(cell(console, "hour-aa")).to_have_text("0")
    loaded = page.evaluate("performance.timeOrigin")
    replies = send_many(running.mllp_port, [adt("A01", f"LIVE{i}", "Good") for i in range(3)])
    replies.append(send(running.mllp_port, bad_birth_date("LIVEBAD")))
    want = expected(replies)
    for key in ("received", "aa", "ae", "ar"):
        expect(cell(console, f"hour-{key}")).to_have_text(want[key], timeout=FLUSH_WAIT * 1000)
        expect(cell(console, f"day-{key}")).to_have_text(want[key])
    assert page.evaluate("performance.timeOrigin") == loaded  # the same document: no reload happened
    expect(page.get_by_role("link", name="0", exact=True)).to_have_attribute("href", "/studies?reconciliation=exceptions")
    expect(page.get_by_text(f"{CHANNEL}: the same figures per hour, as a table")).to_be_visible()
    console.shot("overview-live")
    send(running.mllp_port, adt("A01", "LIVE9", "More"))
    expect(cell(console, "hour-aa")).to_have_text(str(int(want["aa"]) + 1), timeout=FLUSH_WAIT * 1000)
    page.reload()  # the charts (fetched again every minute) now have this minute
    expect(page.locator(f'figure[data-chart="{CHANNEL}"] path.messages')).to_have_count(1)
    page.get_by_text(f"{CHANNEL}: the same figures per hour, as a table").click()
    expect(page.locator(f'figure[data-chart="{CHANNEL}"] tbody tr').first).to_be_visible()  # one or two hours
    console.shot("overview")
    page.locator("#recon-exceptions").get_by_role("link").click()  # to the studies page, exceptions only
    expect(page.get_by_label("Reconciliation")).to_have_value("exceptions")
    assert console.errors == []


@SQLITE_ONLY
def test_search_with_the_keyboard_and_open_a_message(running: RunningEngine, console: Console) -> None:
    m = sent(running)
    cid = next(x["control_id"] for x in running.api("/api/messages")[1]["messages"] if x["id"] == m["o1"])
    page = console.open("/messages")
    expect(page.get_by_role("heading", name="Messages")).to_be_visible()
    console.shot("messages")
    field = page.get_by_label("Control ID (MSH-10)")
    for _ in range(40):  # Tab from the top of the page until the first field of the form has focus
        page.keyboard.press("Tab")
        if field.evaluate("el => el === document.activeElement"):
            break
    expect(field).to_be_focused()
    page.keyboard.type(cid)
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/messages\?.*control_id=" + re.escape(urllib.parse.quote(cid))))
    rows = page.locator("#messages tbody tr")
    expect(rows).to_have_count(1)
    link = page.get_by_role("link", name=str(m["o1"]), exact=True)
    expect(link).to_have_attribute("href", f"/messages/{m['o1']}")
    console.shot("messages-by-control-id")
    # the form's other filters: status and patient identifier, chosen and sent with the keyboard
    page.get_by_label("Control ID (MSH-10)").fill("")
    page.get_by_label("Status").select_option("error")
    page.get_by_label("Patient identifier").fill("")
    page.get_by_label("Channel").select_option(CHANNEL)
    page.get_by_label("Message type").press("Enter")
    expect(rows).to_have_count(1)
    expect(page.locator(f'#messages tr[data-message="{m["bad"]}"]')).to_be_visible()
    page.get_by_label("Status").select_option("")
    page.get_by_label("Patient identifier").fill("SRCH1")
    page.get_by_label("Patient identifier").press("Enter")
    expect(rows).to_have_count(2)
    console.shot("messages-by-patient")
    page.get_by_role("link", name="Clear").click()
    expect(page).to_have_url(f"{console.base}/messages")
    expect(page.get_by_label("Patient identifier")).to_have_value("")
    assert console.errors == []
