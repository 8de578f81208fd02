"""Shared fixtures: a database per test (SQLite file and a throwaway PostgreSQL database), and a
running engine on loopback ports in its own thread, driven by real clients over real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from engine.config import Settings
from engine.connectors.dicom.channel import DicomConnector
from engine.connectors.mllp.channel import MllpConnector
from engine.pipeline.hl7_inbound import HL7Inbound
from engine.runtime import Engine, load_definitions
from engine.store import migrate
from engine.store.db import Database, open_database
from engine.web.app import build_app

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "tests" / "samples"
PG_ADMIN_URL = os.environ.get("RADBRIDGE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
TOKEN = "test-token"


def _pg_reason() -> str | None:
    try:
        eng = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with eng.connect() as c:
            c.execute(text("SELECT 1"))
        eng.dispose()
        return None
    except Exception as exc:  # no server: the PostgreSQL variants skip with this reason
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {type(exc).__name__}: {str(exc).splitlines()[0]}"


_PG_REASON: str | None | bool = False


def pg_unavailable() -> str | None:
    global _PG_REASON
    if _PG_REASON is False:
        _PG_REASON = _pg_reason()
    return _PG_REASON  # type: ignore[return-value]


@pytest.fixture
def pg_url() -> Iterator[str]:
    reason = pg_unavailable()
    if reason:
        pytest.skip(reason)
    name = f"radbridge_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'var' / 'radbridge.db'}"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """A migrated, empty store (SQLite, then PostgreSQL) for tests that call the domain or the
    stages directly, without an engine."""
    database = open_database(db_url)
    migrate.upgrade(database)
    yield database
    database.dispose()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A copy of the shipped channels/ and mappings/ that a test may edit."""
    shutil.copytree(REPO / "channels", tmp_path / "channels")
    shutil.copytree(REPO / "mappings", tmp_path / "mappings")
    return tmp_path


def make_settings(workdir: Path, db_url: str) -> Settings:
    s = Settings()
    s.storage.dir = str(workdir / "var")
    s.database.url = db_url
    s.channels_dir = str(workdir / "channels")
    s.mappings_dir = str(workdir / "mappings")
    s.mllp.port = 0
    s.dicom.port = 0
    s.dicom.fsync = True
    s.http.port = 0
    s.http.tokens = [TOKEN]
    s.retention.enabled = False
    s.mappings.reload_seconds = 0.2
    return s


@pytest.fixture
def settings(workdir: Path, db_url: str) -> Settings:
    return make_settings(workdir, db_url)


class RunningEngine:
    """An Engine on its own event loop in a thread, so tests use ordinary blocking clients."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = Engine(settings, http_app=build_app)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> RunningEngine:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.engine.start(), self.loop).result(60)
        return self

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.engine.stop(), self.loop).result(60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def mllp_port(self) -> int:
        return self.engine.connector("hl7-inbound", MllpConnector).port

    @property
    def dicom_port(self) -> int:
        return self.engine.connector("dicom", DicomConnector).port

    @property
    def db(self) -> Any:
        return self.engine.db

    def api(self, path: str, *, token: str | None = TOKEN, method: str = "GET") -> tuple[int, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.engine.http_port}{path}", method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
                body = resp.read()
                status = resp.status
                ctype = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            body, status, ctype = exc.read(), exc.code, exc.headers.get("Content-Type", "")
        return status, (json.loads(body) if "json" in ctype else body.decode())


@pytest.fixture
def running(settings: Settings) -> Iterator[RunningEngine]:
    eng = RunningEngine(settings).start()
    try:
        yield eng
    finally:
        eng.stop()


def start_dicom_engine(workdir: Path, db_url: str, *, destinations: list[str] | None = None,
                       **dicom_options: Any) -> RunningEngine:
    """An engine whose studies only become stable when a test says so (stable_seconds 3600), with
    the C-MOVE ``destinations`` given ("AET=host:port") and the DICOM channel's options changed as given."""
    settings = make_settings(workdir, db_url)
    settings.dicom.stable_seconds = 3600
    settings.dicom.destinations = list(destinations or [])
    if dicom_options:
        import yaml
        path = workdir / "channels" / "dicom.yaml"
        data = yaml.safe_load(path.read_text())
        data.setdefault("options", {}).update(dicom_options)
        path.write_text(yaml.safe_dump(data))
    return RunningEngine(settings).start()


@pytest.fixture
def dicom_engine(workdir: Path, db_url: str) -> Iterator[RunningEngine]:
    """``start_dicom_engine`` with the shipped channels, stopped after the test."""
    e = start_dicom_engine(workdir, db_url)
    try:
        yield e
    finally:
        e.stop()


@pytest.fixture
def hl7_stage(workdir: Path, db_url: str) -> Iterator[tuple[Database, HL7Inbound]]:
    """The shipped hl7-inbound channel's inbound stage over a migrated database, without listeners:
    for tests that drive prepare/apply (or the domain) directly."""
    db = open_database(db_url)
    migrate.upgrade(db)
    registry, channels, _problems = load_definitions(make_settings(workdir, db_url))
    channel = next(c for c in channels if c.name == "hl7-inbound")
    try:
        yield db, HL7Inbound(channel, registry)
    finally:
        db.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless chromium per test module (Debian's, by executable path; see tests/browser.py).

    Not per session: while Playwright's sync API is started, its event loop counts as running in the
    main thread, so asyncio.run() in any later test module would fail ("cannot be called from a
    running event loop"). Per module, it is stopped before the next module's tests."""
    from playwright.sync_api import sync_playwright

    from tests.browser import chromium_path
    path = chromium_path()
    if path is None:
        pytest.skip("chromium is not installed (scripts/test installs it: apt-get install chromium)")
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=path, headless=True, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def console(running: RunningEngine, browser: Any) -> Iterator[Any]:
    """A browser tab on ``running``'s console, logged in with the test token (every role)."""
    from tests.browser import Console
    tab = Console(browser, f"http://127.0.0.1:{running.engine.http_port}")
    tab.login(TOKEN)
    try:
        yield tab
    finally:
        tab.close()
