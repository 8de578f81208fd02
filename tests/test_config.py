"""Settings from TOML and the environment, channel validation, and the schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from engine.channels import load_channels
from engine.config import load_settings
from engine.connectors.registry import connector_specs
from engine.store import migrate
from engine.store.db import open_database
from engine.store.models import Base
from engine.yamlfile import ConfigFileError
from tests.conftest import REPO


def test_shipped_config_loads_with_the_contract_defaults() -> None:
    s = load_settings(REPO / "config" / "radbridge.toml", env={})
    assert (s.bind, s.mllp.port, s.http.port, s.dicom.port, s.dicom.aet) == ("127.0.0.1", 2575, 8080, 11112,
                                                                             "RADBRIDGE")
    assert s.database_url == "sqlite:///var/radbridge.db"


def test_environment_overrides_named_in_the_contract() -> None:
    env = {"RADBRIDGE_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1/x", "RADBRIDGE_STORAGE_DIR": "/srv",
           "RADBRIDGE_BIND": "0.0.0.0", "RADBRIDGE_MLLP_PORT": "3000", "RADBRIDGE_DICOM_PORT": "104",
           "RADBRIDGE_DICOM_AET": "RB2", "RADBRIDGE_HTTP_PORT": "9000", "RADBRIDGE_EHR_MLLP": "127.0.0.1:6661",
           "RADBRIDGE_EHR_FHIR_BASE": "http://127.0.0.1:8081/fhir", "RADBRIDGE_STABLE_SECONDS": "5",
           "RADBRIDGE_API_TOKEN": "tok", "RADBRIDGE_RETENTION_CONTENT_DAYS": "7"}
    s = load_settings(REPO / "config" / "radbridge.toml", env=env)
    assert s.database_url == env["RADBRIDGE_DATABASE_URL"] and s.storage.dir == "/srv" and s.bind == "0.0.0.0"
    assert (s.mllp.port, s.dicom.port, s.dicom.aet, s.http.port) == (3000, 104, "RB2", 9000)
    assert (s.ehr.mllp, s.ehr.fhir_base, s.dicom.stable_seconds) == ("127.0.0.1:6661", env["RADBRIDGE_EHR_FHIR_BASE"],
                                                                     5.0)
    assert s.api_tokens() == ["tok"] and s.retention.content_days == 7.0


def test_bad_settings_are_named(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[mllp]\nport = "many"\ncolour = 1\n[http]\nauth = "maybe"\n')
    with pytest.raises(ConfigFileError) as info:
        load_settings(f, env={"RADBRIDGE_HTTP_PORT": "eighty"})
    text = str(info.value)
    assert "mllp.port: expected int" in text and "mllp.colour: unknown setting" in text
    assert "RADBRIDGE_HTTP_PORT: expected int" in text and "http.auth: must be token or none" in text
    f.write_text("[mllp\nport = 1\n")
    with pytest.raises(ConfigFileError) as info:
        load_settings(f, env={})
    assert info.value.problems[0].line == 1


def test_limits_against_hostile_peers_must_be_positive(tmp_path: Path) -> None:
    """Issue 14 items 5, 6, 8: the new limits load from the shipped files and refuse 0."""
    s = load_settings(REPO / "config" / "radbridge.toml", env={"RADBRIDGE_HTTP_MAX_CONNECTIONS": "300"})
    assert (s.http.header_timeout_seconds, s.http.body_timeout_seconds, s.http.max_connections) == (15, 60, 300)
    assert (s.mllp.max_connections, s.mllp.max_buffered_bytes) == (200, 256 * 1024 * 1024)
    f = tmp_path / "c.toml"
    f.write_text("[mllp]\nmax_buffered_bytes = 0\n[http]\nheader_timeout_seconds = 0\nmax_connections = -1\n")
    with pytest.raises(ConfigFileError) as info:
        load_settings(f, env={})
    text = str(info.value)
    for key in ("mllp.max_buffered_bytes", "http.header_timeout_seconds", "http.max_connections"):
        assert f"{key}: must be greater than 0" in text
    (tmp_path / "d.yaml").write_text("name: d\nconnector: {type: dicom}\noptions:\n"
                                     "  association_request_timeout_seconds: 0\n")
    _, problems = load_channels(tmp_path, connector_specs())
    assert any("d.yaml:4: options.association_request_timeout_seconds: must be greater than 0" in str(p)
               for p in problems)
    channels, _ = load_channels(REPO / "channels", connector_specs())
    inbound = next(c for c in channels if c.name == "hl7-inbound")
    assert inbound.options.idle_timeout_seconds == 120


def test_lease_seconds_defaults_to_30_and_must_be_at_least_1() -> None:
    assert load_settings(REPO / "config" / "radbridge.toml", env={}).database.lease_seconds == 30
    assert load_settings(env={"RADBRIDGE_DATABASE_LEASE_SECONDS": "5"}).database.lease_seconds == 5
    with pytest.raises(ConfigFileError) as info:
        load_settings(env={"RADBRIDGE_DATABASE_LEASE_SECONDS": "0.5"})
    assert "database.lease_seconds: must be at least 1 (seconds)" in str(info.value)


def test_channel_problems_name_file_line_and_field(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "name: bad\nconnector: {type: smoke-signal}\noptions:\n  max_message_bytes: -5\n  colour: red\n"
        "routes:\n  - messages: [ADT^A01]\n    action: patient.teleport\n    mappings: [nope]\n")
    channels, problems = load_channels(tmp_path, connector_specs(), {"hl7-patient"})
    assert channels == []
    text = "\n".join(str(p) for p in problems)
    f = str(tmp_path / "bad.yaml")
    assert f"{f}:2: connector.type: unknown connector type 'smoke-signal'" in text
    assert f"{f}:4: options.max_message_bytes: must be greater than 0" in text
    assert f"{f}:5: options.colour: unknown option" in text
    assert f"{f}:8: routes[1].action: unknown action 'patient.teleport'" in text
    assert f"{f}:9: routes[1].mappings: no mapping named 'nope'" in text



def test_zero_idle_timeout_and_wildcard_codes(tmp_path: Path) -> None:
    """Review regression: idle_timeout_seconds 0 is refused (must be greater than 0), and a
    route's wildcard message code (O*^O01) makes the channel know ORM but not ADT."""
    (tmp_path / "c.yaml").write_text("name: c\nconnector: {type: mllp}\noptions:\n  idle_timeout_seconds: 0\n"
                                     "routes:\n  - messages: [O*^O01]\n    action: ignore\n")
    channels, problems = load_channels(tmp_path, connector_specs())
    assert any("options.idle_timeout_seconds: must be greater than 0" in str(p) for p in problems)
    (tmp_path / "c.yaml").write_text("name: c\nconnector: {type: mllp}\n"
                                     "routes:\n  - messages: [O*^O01]\n    action: ignore\n")
    (ch,), _ = load_channels(tmp_path, connector_specs())
    assert ch.knows_code("ORM") and not ch.knows_code("ADT")


def test_zero_message_size_says_greater_than_zero(tmp_path: Path) -> None:
    """Review regression: max_message_bytes 0 gets exactly one problem, which says the value must
    be greater than 0."""
    (tmp_path / "c.yaml").write_text("name: c\nconnector: {type: mllp}\noptions:\n  max_message_bytes: 0\n"
                                     "routes:\n  - messages: [ADT^*]\n    action: ignore\n")
    _channels, problems = load_channels(tmp_path, connector_specs())
    assert [str(p).split(": ", 1)[1] for p in problems] == ["options.max_message_bytes: must be greater than 0"]

def test_migrations_build_exactly_the_models_schema(db_url: str) -> None:
    db = open_database(db_url)
    try:
        migrate.upgrade(db)
        assert migrate.current_revision(db) == migrate.head_revision()
        with db.writer.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        migrate.upgrade(db)  # idempotent
    finally:
        db.dispose()


def test_sqlite_runs_in_wal_with_full_sync(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'x.db'}")
    with db.writer.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    db.dispose()
