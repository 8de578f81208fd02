"""The console's door (issue 16): log in with a token in a real browser (Debian's chromium through
Playwright), session cookie flags, CSRF on every change, logout and token revocation ending the
session, tokens without the role 'read' turned away, no redirect off the site; the overview lists
every channel. Screenshots of each page land in artifacts/screenshots/."""

from __future__ import annotations

import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import expect
from sqlalchemy import select

from engine.store import tokens
from engine.store.models import AuditEvent, ConsoleSession
from engine.store.tokens import Role
from engine.web.console.pages import NAV as NAV_LABELS
from tests.browser import Console
from tests.conftest import TOKEN, RunningEngine
from tests.test_roles import create_tokens

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def tab(running: RunningEngine, browser: Any) -> Iterator[Console]:
    """A browser tab on ``running``'s console, not logged in."""
    t = Console(browser, f"http://127.0.0.1:{running.engine.http_port}")
    try:
        yield t
    finally:
        t.close()


def test_log_in_and_the_overview_lists_every_channel(running: RunningEngine, tab: Console) -> None:
    tab.open("/overview/live?from=bookmark")  # not logged in: to the form, which remembers where to go
    expect(tab.page).to_have_url(re.compile(r"/login\?next="))
    expect(tab.page.get_by_label("Token")).to_have_attribute("type", "password")
    tab.shot("login")
    tab.page.get_by_label("Token").fill(TOKEN)
    tab.page.get_by_role("button", name="Log in").click()
    expect(tab.page).to_have_url(f"{tab.base}/overview/live?from=bookmark")
    tab.open("/")
    expect(tab.page.get_by_role("heading", name="Overview")).to_be_visible()
    status, body = running.api("/api/channels")
    assert status == 200
    names = [c["name"] for c in body["channels"]]
    assert len(names) >= 3
    for name in names:
        expect(tab.page.locator(f'#channels tr[data-channel="{name}"] th')).to_have_text(name)
    tab.shot("overview")
    cookie = tab.cookie("radbridge_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["value"] not in (TOKEN, tokens.digest_of(TOKEN).hex())
    with running.db.read_session() as s:  # only the SHA-256 of the cookie's secret is stored
        stored = s.execute(select(ConsoleSession.secret_sha256, ConsoleSession.token_name)).all()
    assert [(d, n) for d, n in stored] == [(tokens.digest_of(cookie["value"]).hex(), tokens.config_token_name(TOKEN))]
    assert tab.errors == []


def test_log_in_goes_where_the_person_was_going_never_to_another_site(running: RunningEngine, tab: Console) -> None:
    for asked, landing in (("/overview/live", "/overview/live"), ("//evil.example/x", "/"),
                           ("https://evil.example/", "/")):
        tab.context.clear_cookies()
        tab.open("/login?next=" + urllib.parse.quote(asked, safe=""))
        tab.page.get_by_label("Token").fill(TOKEN)
        tab.page.get_by_role("button", name="Log in").click()
        expect(tab.page).to_have_url(f"{tab.base}{landing}")


@SQLITE_ONLY
def test_wrong_tokens_and_tokens_without_read_are_turned_away(running: RunningEngine, tab: Console) -> None:
    secrets = create_tokens(running.settings, {"scraper": frozenset({Role.METRICS})})
    tab.open("/login")
    tab.page.get_by_label("Token").fill("rb_not-a-token")
    tab.page.get_by_role("button", name="Log in").click()
    expect(tab.page.get_by_role("alert")).to_have_text("That token is not known (or was revoked).")
    tab.page.get_by_label("Token").fill(secrets["scraper"])
    tab.page.get_by_role("button", name="Log in").click()
    expect(tab.page.get_by_role("alert")).to_contain_text("lacks the role 'read'")
    tab.shot("login-refused")
    assert tab.cookie("radbridge_session") is None
    with running.db.read_session() as s:
        trail = s.execute(select(AuditEvent.agent, AuditEvent.status).where(AuditEvent.action == "login")
                          .order_by(AuditEvent.id)).all()
    assert [tuple(r) for r in trail] == [("anonymous", 401), ("scraper", 403)]


@SQLITE_ONLY
def test_a_change_needs_the_sessions_csrf_secret(running: RunningEngine, console: Console) -> None:
    """The cookie goes with every request the browser makes, from any site: a POST with it but
    without the page's CSRF secret is refused; with it, the route itself answers."""
    page = console.page
    url = f"{console.base}/api/messages/999999/reprocess"
    forged = page.request.post(url, headers={"Content-Type": "application/x-www-form-urlencoded"}, data="x=1")
    assert forged.status == 403 and "CSRF" in forged.json()["detail"]
    csrf = page.locator('form.logout input[name="csrf"]').get_attribute("value")
    assert csrf
    wrong = page.request.post(url, headers={"X-CSRF-Token": csrf[:-1] + ("A" if csrf[-1] != "A" else "B")})
    assert wrong.status == 403
    allowed = page.request.post(url, headers={"X-CSRF-Token": csrf})
    assert allowed.status == 404  # through the door: the message does not exist
    # a bearer token is not sent by browsers on their own: no CSRF secret needed
    status, _ = running.api("/api/messages/999999/reprocess", method="POST")
    assert status == 404


@SQLITE_ONLY
def test_logout_and_revoking_the_token_end_the_session(running: RunningEngine, browser: Any) -> None:
    secrets = create_tokens(running.settings, {"night-ops": frozenset({Role.READ, Role.OPERATE})})
    first = Console(browser, f"http://127.0.0.1:{running.engine.http_port}")
    second = Console(browser, first.base)
    try:
        first.login(secrets["night-ops"])
        expect(first.page.locator(".who")).to_have_text("night-ops")
        old = first.cookie("radbridge_session")
        assert old is not None
        first.page.get_by_role("button", name="Log out").click()
        expect(first.page).to_have_url(re.compile(r"/login$"))
        expect(first.page.get_by_role("status")).to_have_text("You are logged out.")
        first.context.add_cookies([{"name": "radbridge_session", "value": old["value"], "url": first.base}])
        first.open("/")  # the old cookie is worth nothing now
        expect(first.page).to_have_url(re.compile(r"/login\?next="))

        second.login(secrets["night-ops"])
        with running.db.writer.begin() as conn:
            tokens.revoke(conn, "night-ops")
        second.open("/")
        expect(second.page).to_have_url(re.compile(r"/login\?next="))
    finally:
        first.close()
        second.close()
    with running.db.read_session() as s:
        actions = s.execute(select(AuditEvent.action, AuditEvent.agent).where(
            AuditEvent.action.in_(["login", "logout"])).order_by(AuditEvent.id)).all()
    assert [tuple(a) for a in actions] == [("login", "night-ops"), ("logout", "night-ops"), ("login", "night-ops")]


@SQLITE_ONLY
def test_every_page_keeps_out_inline_script_and_framing(running: RunningEngine, console: Console) -> None:
    answer = console.page.request.get(f"{console.base}/")
    policy = answer.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
    assert answer.headers["x-frame-options"] == "DENY"


def _unlabelled_controls(page: Any) -> list[str]:
    """Form controls a screen reader could not name (no label, aria-label or aria-labelledby)."""
    return page.evaluate("""() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea, button')]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                      && !el.getAttribute('aria-labelledby') && !(el.tagName === 'BUTTON' && el.textContent.trim()))
        .map(el => el.outerHTML.slice(0, 120))""")


# every page of the console reached from the navigation (the sections add theirs)
PAGES = ["/", "/deliveries", "/deliveries?state=dead", "/mappings", "/mappings/hl7-patient.yaml",
         "/mappings/hl7-patient.yaml/edit", "/mappings/try", "/patients", "/orders", "/studies", "/messages"]


@SQLITE_ONLY
def test_every_page_fits_1280_wide_and_names_every_control(running: RunningEngine, console: Console) -> None:
    wrong: list[str] = []
    for path in PAGES:
        console.open(path)
        expect(console.page.locator("main h1")).to_be_visible()
        width = console.page.evaluate("() => document.documentElement.scrollWidth")
        if width > 1280:
            wrong.append(f"{path}: {width} px wide")
        wrong += [f"{path}: {c}" for c in _unlabelled_controls(console.page)]
    assert wrong == [] and console.errors == []


@SQLITE_ONLY
def test_the_keyboard_alone_reaches_the_sections_and_logs_out(running: RunningEngine, console: Console) -> None:
    page = console.page
    console.open("/")
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    focused: list[str] = []
    for _ in range(20):  # bounded: the navigation, then the logout button
        page.keyboard.press("Tab")
        focused.append(page.evaluate("() => document.activeElement.textContent.trim()"))
        if focused[-1] == "Log out":
            break
    assert [label for _, label in NAV_LABELS if label in focused] == [label for _, label in NAV_LABELS]
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/login$"))


def test_without_token_auth_the_console_opens_and_still_wants_its_csrf_secret(
        settings: Any, browser: Any) -> None:
    settings.http.auth = "none"
    eng = RunningEngine(settings).start()
    tab = Console(browser, f"http://127.0.0.1:{eng.engine.http_port}")
    try:
        tab.open("/login")
        expect(tab.page).to_have_url(f"{tab.base}/")
        expect(tab.page.get_by_role("heading", name="Overview")).to_be_visible()
        forged = tab.page.request.post(f"{tab.base}/messages/999999/reprocess", form={"x": "1"})
        assert forged.status == 403 and "CSRF" in forged.text()
        assert tab.page.request.post(f"{tab.base}/api/messages/999999/reprocess").status == 404  # the API: no CSRF
    finally:
        tab.close()
        eng.stop()


@SQLITE_ONLY
def test_wrong_tokens_posted_in_a_loop_do_not_fill_the_audit_trail(running: RunningEngine) -> None:
    """A script posting wrong tokens gets 401 ten times a minute, then 429 (with Retry-After) without
    its token being checked or a row written; the audit trail holds the ten."""
    url = f"http://127.0.0.1:{running.engine.http_port}/login"
    statuses, retry_after = [], []
    for i in range(25):  # bounded
        req = urllib.request.Request(url, data=f"token=rb_guess{i}".encode(), method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
                statuses.append(resp.status)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)
            retry_after.append(exc.headers.get("Retry-After"))
    assert statuses == [401] * 10 + [429] * 15
    assert all(r is not None and 1 <= int(r) <= 60 for r in retry_after[10:])
    with running.db.read_session() as s:
        rows = s.execute(select(AuditEvent.status).where(AuditEvent.action == "login")).scalars().all()
    assert rows == [401] * 10
