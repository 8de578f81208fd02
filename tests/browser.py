"""A real browser for the console's tests: Playwright for Python driving Debian's chromium, launched
by its executable path (no browser is downloaded; scripts/test installs chromium like dcmtk).

``Console`` is one tab on a running engine's console, 1280x800, with helpers to log in, open a page
and save a screenshot under ``artifacts/screenshots/`` (RADBRIDGE_ARTIFACTS to move it): the test
artifacts of each page."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, BrowserContext, Page, expect

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("RADBRIDGE_ARTIFACTS", REPO / "artifacts"))
VIEWPORT = {"width": 1280, "height": 800}


def chromium_path() -> str | None:
    """Debian's chromium, or None (the console's browser tests are then skipped with the reason shown)."""
    return os.environ.get("RADBRIDGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class Console:
    """One browser tab (its own context: cookies are not shared with other tabs) on ``base``."""

    def __init__(self, browser: Browser, base: str) -> None:
        self.base = base
        self.context: BrowserContext = browser.new_context(viewport=VIEWPORT, base_url=base)  # type: ignore[arg-type]
        self.context.set_default_timeout(15_000)
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []  # uncaught script errors and CSP violations: a page must have none
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)

    def login(self, token: str, landing: str = "/") -> Page:
        """Log in through the form (as a person would) and land on ``landing``."""
        self.page.goto(landing)
        expect(self.page).to_have_url(re.compile(r"/login\?next="))
        self.page.get_by_label("Token").fill(token)
        self.page.get_by_role("button", name="Log in").click()
        expect(self.page).to_have_url(re.compile(re.escape(self.base + landing.split("?")[0])))
        return self.page

    def open(self, path: str) -> Page:
        self.page.goto(path)
        return self.page

    def shot(self, name: str) -> Path:
        """A full-page screenshot of the current page, kept as a test artifact."""
        out = ARTIFACTS / "screenshots" / f"{name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(out), full_page=True)
        return out

    def cookie(self, name: str) -> dict[str, Any] | None:
        return next((dict(c) for c in self.context.cookies() if c["name"] == name), None)

    def close(self) -> None:
        self.context.close()
