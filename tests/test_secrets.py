"""Issue 15 item 5: secrets (database password, EHR token and password, API tokens) come from the
environment or from files (containers, systemd credentials) and are never printed: not by
`radbridge check`, not in log lines, not in API answers, not in errors."""

from __future__ import annotations

import base64
import io
import json
import logging
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import select

from engine.config import load_settings
from engine.redaction import redact_url, scrub_logs
from engine.standin_ehr import StandInEHR
from engine.store.models import DeliveryAttempt
from engine.yamlfile import ConfigFileError
from tests.conftest import REPO, RunningEngine, make_settings
from tests.dicomutil import require_dcmtk
from tests.hl7util import adt, send
from tests.processes import EngineProcess
from tests.test_cli import radbridge
from tests.test_outbound import deliveries, fast_retries, order_and_images, wake
from tests.test_reconciliation import settle
from tests.waiting import wait_until

TOKEN_FROM_FILE = "ehr-token-from-file-93d1"
PASSWORD_FROM_FILE = "db-pw-from-file-6a2f"
API_TOKEN_FROM_FILE = "api-token-from-file-c07e"


def secret_file(path: Path, value: str, newline: str = "\n") -> Path:
    path.write_text(value + newline)
    path.chmod(0o600)
    return path


def test_secret_files_are_read_with_their_trailing_newline_stripped(tmp_path: Path) -> None:
    token = secret_file(tmp_path / "fhir-token", TOKEN_FROM_FILE)
    cfg = tmp_path / "radbridge.toml"
    cfg.write_text(f'[database]\nurl = "postgresql+psycopg://rb@127.0.0.1/rb"\npassword_file = "db-password"\n'
                   f'[ehr]\nfhir_base = "http://127.0.0.1:1/fhir"\nfhir_token_file = "{token}"\n')
    # a relative name is looked up in $CREDENTIALS_DIRECTORY (systemd LoadCredential=)
    creds = tmp_path / "credentials"
    creds.mkdir()
    secret_file(creds / "db-password", PASSWORD_FROM_FILE, newline="\r\n")
    s = load_settings(cfg, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert s.ehr.fhir_token == TOKEN_FROM_FILE
    assert s.database_url == f"postgresql+psycopg://rb:{PASSWORD_FROM_FILE}@127.0.0.1/rb"
    # the environment's *_FILE variables do the same, RADBRIDGE_API_TOKEN_FILE too
    api = secret_file(tmp_path / "api-token", API_TOKEN_FROM_FILE)
    s = load_settings(env={"RADBRIDGE_EHR_FHIR_PASSWORD_FILE": str(token), "RADBRIDGE_API_TOKEN_FILE": str(api),
                           "RADBRIDGE_EHR_FHIR_USERNAME": "rb"})
    assert s.ehr.fhir_password == TOKEN_FROM_FILE and s.api_tokens() == [API_TOKEN_FROM_FILE]


def test_unreadable_or_doubled_secrets_are_check_errors_with_file_and_line(tmp_path: Path) -> None:
    secret_file(tmp_path / "empty", "", newline="")
    cfg = tmp_path / "radbridge.toml"
    cfg.write_text('[database]\nurl = "postgresql+psycopg://rb:inline-pw-1@127.0.0.1/rb"\n'
                   f'password_file = "{tmp_path / "pw"}"\n\n'
                   f'[ehr]\nfhir_token = "inline-token-2"\nfhir_token_file = "{tmp_path / "missing"}"\n'
                   f'fhir_password_file = "{tmp_path / "empty"}"\nfhir_base = "ftp://u:url-pw-3@ehr.example/fhir"\n')
    secret_file(tmp_path / "pw", "file-pw-4")
    out = radbridge("check", "--config", str(cfg))
    assert out.returncode == 1
    printed = out.stdout + out.stderr
    assert f"{cfg}:3: database.password_file: the database URL has a password already" in printed, printed
    assert f"{cfg}:7: ehr.fhir_token_file: cannot read {tmp_path / 'missing'}: No such file or directory" in printed
    assert f"{cfg}:8: ehr.fhir_password_file: {tmp_path / 'empty'} is empty" in printed
    assert f"{cfg}:9: ehr.fhir_base: 'ftp://u:***@ehr.example/fhir' is not an http(s):// URL" in printed
    for secret in ("inline-pw-1", "inline-token-2", "url-pw-3", "file-pw-4"):
        assert secret not in printed


def test_an_unparsable_database_url_is_named_not_echoed(tmp_path: Path) -> None:
    env = {"RADBRIDGE_DATABASE_URL": "postgres ql://rb:pw-in-bad-url-5@127.0.0.1/rb",
           "RADBRIDGE_STORAGE_DIR": str(tmp_path / "var")}
    for command in (["check", "--database"], ["run"]):
        out = radbridge(*command, env=env, cwd=tmp_path)
        assert out.returncode == 1
        assert "environment: RADBRIDGE_DATABASE_URL: not a database URL" in out.stderr, out.stderr
        assert "pw-in-bad-url-5" not in out.stdout + out.stderr and "Traceback" not in out.stderr


def test_a_real_run_with_secrets_from_files_never_prints_them(workdir: Path, tmp_path: Path, pg_url: str) -> None:
    """`radbridge run` with the database password, the EHR token and the API token in files: the API
    token from its file opens /api/, and none of them is in the log, in API answers or in `check`."""
    files = {"RADBRIDGE_DATABASE_PASSWORD_FILE": secret_file(tmp_path / "db-pw", PASSWORD_FROM_FILE),
             "RADBRIDGE_EHR_FHIR_TOKEN_FILE": secret_file(tmp_path / "ehr-token", TOKEN_FROM_FILE),
             "RADBRIDGE_API_TOKEN_FILE": secret_file(tmp_path / "api-token", API_TOKEN_FROM_FILE)}
    env = {k: str(v) for k, v in files.items()}
    # PostgreSQL at 127.0.0.1 trusts the postgres user, so any password gets in: the one from the file
    # is sent (and would be refused by a server that checks it)
    eng = EngineProcess(workdir, pg_url, None, RADBRIDGE_API_TOKEN="", RADBRIDGE_LOG_LEVEL="INFO",
                        RADBRIDGE_EHR_FHIR_BASE="http://127.0.0.1:1/fhir", **env).start()
    answers = []
    try:
        send(eng.mllp, adt("A04", "MRN-S1", "Smith", "Ann"))
        for path in ("/api/channels", "/api/deliveries", "/health", "/fhir/metadata", "/api/messages?limit=5"):
            req = urllib.request.Request(f"http://127.0.0.1:{eng.http}{path}",
                                         headers={"Authorization": f"Bearer {API_TOKEN_FROM_FILE}"})
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
                assert resp.status == 200, path
                answers.append(resp.read().decode())
    finally:
        eng.stop()
    check = radbridge("check", "--database", env={**env, "RADBRIDGE_DATABASE_URL": pg_url,
                                                  "RADBRIDGE_API_TOKEN": ""})
    assert check.returncode == 0, check.stdout + check.stderr
    assert "postgres:***@127.0.0.1" in check.stdout  # the password from the file is in the URL, masked
    printed = "\n".join([eng.log.read_text(errors="replace"), check.stdout, check.stderr, *answers])
    assert "HTTP on http://127.0.0.1" in printed  # the log was written at INFO
    for secret in (PASSWORD_FROM_FILE, TOKEN_FROM_FILE, API_TOKEN_FROM_FILE):
        assert secret not in printed


def test_credentials_in_the_ehr_url_are_used_but_never_shown(workdir: Path, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    require_dcmtk()
    caplog.set_level(logging.INFO)
    with StandInEHR() as ehr:
        fast_retries(workdir)
        s = make_settings(workdir, f"sqlite:///{workdir / 'var' / 'radbridge.db'}")
        s.dicom.stable_seconds = 3600
        s.ehr.mllp = ehr.mllp_address
        s.ehr.fhir_base = ehr.fhir_base.replace("http://", "http://ehr-user:url-pw-5521@")
        eng = RunningEngine(s).start()
        try:
            order_and_images(eng, tmp_path / "a", "MRN-C1", "ACC-C1", n=1)
            settle(eng)
            wake(eng)
            assert ehr.wait_for(lambda: any(r["method"] == "PUT" for r in ehr.fhir_requests), 30)
            basic = "Basic " + base64.b64encode(b"ehr-user:url-pw-5521").decode()
            assert {r["authorization"] for r in ehr.fhir_requests} == {basic}  # the URL's credentials, as Basic
            ehr.set_fhir_down(True)
            order_and_images(eng, tmp_path / "b", "MRN-C2", "ACC-C2", n=1)
            settle(eng)
            wake(eng)
            wait_until(lambda: [d for d in deliveries(eng) if d.destination == "fhir" and d.attempts >= 2
                                and d.state == "pending"], timeout=30, message="a failing FHIR delivery")
            answers = [json.dumps(eng.api(path)[1]) for path in
                       ("/api/channels", "/api/deliveries", *(f"/api/deliveries/{d.id}" for d in deliveries(eng)))]
            targets = [d.target or "" for d in deliveries(eng)]
            with eng.db.read_session() as session:  # what each attempt recorded (shown by the API and CLI)
                recorded = [f"{a.error} {a.response}" for a in session.execute(select(DeliveryAttempt)).scalars()]
        finally:
            eng.stop()
    assert any("127.0.0.1" in t and "/fhir/" in t for t in targets)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "failing" in logged
    for text in (logged, *answers, *targets, *recorded):
        assert "url-pw-5521" not in text
    assert "ehr-user:***@127.0.0.1" in answers[0]  # /api/channels names the address, password masked


def test_shipped_config_names_the_secret_files() -> None:
    text = (REPO / "config" / "radbridge.toml").read_text()
    for key in ("fhir_token_file", "fhir_password_file", "password_file", "url_file"):
        assert f"\n{key} = " in text


@pytest.mark.parametrize(("url", "shown"), [
    ("https://rb:pa:ss@ehr.example:8443/fhir", "https://rb:***@ehr.example:8443/fhir"),
    ("http://ehr.example/fhir?access_token=abc123&x=1", "http://ehr.example/fhir?access_token=***&x=1"),
    ("http://ehr.example/fhir", "http://ehr.example/fhir"),
    ("", ""),
])
def test_urls_are_shown_with_their_secrets_masked(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_secret_that_reaches_a_log_line_anyway_is_masked() -> None:
    """`radbridge run` puts this filter on its log handlers with every configured secret."""
    logger = logging.Logger("scrubbed")  # a logger of its own, no handler of another test on it
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    try:
        scrub_logs(["s3cret-value-77", "short"], logger)
        try:
            raise RuntimeError("connect to postgresql://rb:s3cret-value-77@db/rb failed")
        except RuntimeError:
            logger.exception("driver said %s", "password s3cret-value-77 refused")
        logger.warning("a short word stays short")
    finally:
        logger.removeHandler(handler)
    printed = stream.getvalue()
    assert "s3cret-value-77" not in printed and "password *** refused" in printed and "rb:***@db" in printed
    assert "a short word stays short" in printed  # secrets under 6 characters are not masked everywhere


def test_credentials_in_the_ehr_url_and_a_token_besides_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "radbridge.toml"
    cfg.write_text('[ehr]\nfhir_base = "https://rb:url-pw-6@ehr.example/fhir"\nfhir_token = "tok-7-abcdef"\n'
                   'dicomweb_base = "https://rb:url-pw-6@pacs.example/wado"\n')
    out = radbridge("check", "--config", str(cfg))
    assert out.returncode == 1
    assert f"{cfg}:2: ehr.fhir_base: it holds a user and password" in out.stderr, out.stderr
    assert f"{cfg}:4: ehr.dicomweb_base: it holds a password, and it is published" in out.stderr
    assert "url-pw-6" not in out.stdout + out.stderr and "tok-7-abcdef" not in out.stdout + out.stderr


def test_a_database_that_cannot_be_reached_stops_the_start_with_one_line(tmp_path: Path) -> None:
    """It used to end in a traceback; the line names the database with its password masked."""
    env = {"RADBRIDGE_DATABASE_URL": "postgresql+psycopg://rb:unreachable-pw-8@127.0.0.1:1/rb",
           "RADBRIDGE_STORAGE_DIR": str(tmp_path / "var"), "RADBRIDGE_MLLP_PORT": "0", "RADBRIDGE_HTTP_PORT": "0",
           "RADBRIDGE_DICOM_PORT": "0"}
    out = radbridge("run", env=env)
    assert out.returncode == 1
    assert "radbridge: not started: database postgresql+psycopg://rb:***@127.0.0.1:1/rb: " in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "unreachable-pw-8" not in out.stdout + out.stderr


def test_the_whole_database_url_from_a_file(tmp_path: Path) -> None:
    url_file = secret_file(tmp_path / "db-url", f"postgresql+psycopg://rb:{PASSWORD_FROM_FILE}@127.0.0.1/rb")
    assert load_settings(env={"RADBRIDGE_DATABASE_URL_FILE": str(url_file)}).database_url == url_file.read_text()[:-1]
    secret_file(url_file, f"postgres ql://rb:{PASSWORD_FROM_FILE}@127.0.0.1/rb")
    with pytest.raises(ConfigFileError) as info:
        load_settings(env={"RADBRIDGE_DATABASE_URL_FILE": str(url_file)})
    assert "environment: RADBRIDGE_DATABASE_URL_FILE: not a database URL" in str(info.value)
    assert PASSWORD_FROM_FILE not in str(info.value)
