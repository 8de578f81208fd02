"""TLS with real handshakes: MLLP/TLS (openssl s_client and our own client), HTTPS (curl), DICOM
TLS (dcmtk's echoscu/storescu with +tls), mutual TLS, certificate reload, radbridge check."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from engine.config import Settings
from engine.connectors.base import ListeningConnector
from engine.connectors.mllp.client import MLLPClient
from engine.store.models import AuditEvent
from engine.tls import TLSError, client_context
from tests.certs import PKI, make_pki, serial_of
from tests.conftest import SAMPLES, RunningEngine, make_settings

ADT = (SAMPLES / "adt_a01.hl7").read_bytes()


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """TLS sits in front of the store: these tests run on SQLite (the ACK-after-commit one on both)."""
    return f"sqlite:///{tmp_path / 'tls.db'}"


def with_tls(workdir: Path, channel: str, block: dict[str, Any], **options: Any) -> None:
    path = workdir / "channels" / f"{channel}.yaml"
    data = yaml.safe_load(path.read_text())
    data["tls"] = block
    if options:
        data.setdefault("options", {}).update(options)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def mllp_block(pki: PKI, client_certs: str = "off", **extra: Any) -> dict[str, Any]:
    return {"cert": str(pki.server.cert), "key": str(pki.server.key), "ca": str(pki.ca),
            "client_certs": client_certs, **extra}


def start(workdir: Path, db_url: str, settings_fn: Any = None) -> RunningEngine:
    settings = make_settings(workdir, db_url)
    if settings_fn is not None:
        settings_fn(settings)
    return RunningEngine(settings).start()


@pytest.fixture
def engine_factory() -> Iterator[Any]:
    started: list[RunningEngine] = []

    def make(workdir: Path, db_url: str, settings_fn: Any = None) -> RunningEngine:
        eng = start(workdir, db_url, settings_fn)
        started.append(eng)
        return eng

    yield make
    for eng in started:
        eng.stop()


def ack_code(reply: bytes) -> str:
    msa = next(s for s in reply.decode("latin-1").split("\r") if s.startswith("MSA"))
    return msa.split("|")[1]


def s_client(port: int, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """openssl s_client; it returns when the server closes the connection (the channel's idle
    timeout, set short in these tests)."""
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet",
                           "-verify_return_error", *args], input=stdin, capture_output=True, timeout=60)


def served_serial(port: int, ca: Path) -> int:
    """The serial number of the certificate a TLS listener presents in a new handshake (openssl
    s_client; without -quiet it ends the connection when its input ends)."""
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca),
                          "-verify_return_error", "-showcerts"], input=b"", capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pem = out.stdout.decode()
    begin = pem.index("-----BEGIN CERTIFICATE-----")
    end = pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    return serial_of(pem[begin:end])


def swap_and_wait(eng: RunningEngine, reloading: Any, pki: PKI) -> int:
    """Renew the server certificate on disk (key first, then certificate); wait, bounded, until the
    listener has loaded it; return the new serial."""
    renewed = pki.authority.issue("renewed", "localhost")
    reloads = reloading.reloads
    shutil.copyfile(renewed.key, pki.server.key)
    shutil.copyfile(renewed.cert, pki.server.cert)
    for _ in range(600):  # bounded: the watcher looks every 0.1 s
        if reloading.reloads > reloads:
            break
        eng.call(_sleep(0.05))
    return renewed.serial


# --- MLLP ----------------------------------------------------------------------------------------------
def test_mllp_tls_listener_acks_our_client_after_commit(workdir: Path, db_url: str, pki: PKI,
                                                        engine_factory: Any) -> None:
    with_tls(workdir, "hl7-inbound", mllp_block(pki))
    eng = engine_factory(workdir, db_url)
    conn = eng.engine.connector("hl7-inbound", ListeningConnector)
    assert conn.has_tls and conn.status()["tls"]["client_certs"] == "off"
    with MLLPClient("127.0.0.1", eng.mllp_port, timeout=30, tls=client_context(str(pki.ca))) as client:
        reply = client.send(ADT)
        assert client.peer_certificate is not None
    assert ack_code(reply) == "CA"
    status, body = eng.api("/api/patients?identifier=100001")
    assert status == 200 and body  # the ACK came after the commit


def test_mllp_tls_openssl_s_client_gets_an_ack(workdir: Path, sqlite_url: str, pki: PKI,
                                              engine_factory: Any) -> None:
    with_tls(workdir, "hl7-inbound", mllp_block(pki), idle_timeout_seconds=2)
    eng = engine_factory(workdir, sqlite_url)
    out = s_client(eng.mllp_port, "-CAfile", str(pki.ca), stdin=b"\x0b" + ADT + b"\x1c\r")
    assert b"\x1c" in out.stdout, out.stderr.decode()
    assert ack_code(out.stdout.split(b"\x0b", 1)[1]) == "CA"


def test_mllp_tls_refuses_plain_text_and_old_protocols(workdir: Path, sqlite_url: str, pki: PKI,
                                                      engine_factory: Any) -> None:
    with_tls(workdir, "hl7-inbound", mllp_block(pki), idle_timeout_seconds=2)
    eng = engine_factory(workdir, sqlite_url)
    with socket.create_connection(("127.0.0.1", eng.mllp_port), timeout=30) as plain:
        plain.sendall(b"\x0b" + ADT + b"\x1c\r")
        answer = b""
        for _ in range(100):  # until the server closes (it answers a failed handshake by closing)
            try:
                chunk = plain.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    assert b"MSA" not in answer
    old = s_client(eng.mllp_port, "-CAfile", str(pki.ca), "-tls1_1")
    assert old.returncode != 0
    # the listener is still there for the next real client
    with MLLPClient("127.0.0.1", eng.mllp_port, tls=client_context(str(pki.ca))) as client:
        assert ack_code(client.send(ADT)) in ("CA", "AA")


def test_mllp_mutual_tls_refuses_untrusted_and_missing_client_certificates(workdir: Path, sqlite_url: str,
                                                                           pki: PKI, engine_factory: Any) -> None:
    with_tls(workdir, "hl7-inbound", mllp_block(pki, "required"), idle_timeout_seconds=2)
    eng = engine_factory(workdir, sqlite_url)
    port = eng.mllp_port
    trusted = client_context(str(pki.ca), str(pki.client.cert), str(pki.client.key))
    with MLLPClient("127.0.0.1", port, tls=trusted) as client:
        assert ack_code(client.send(ADT)) == "CA"
    for ctx in (client_context(str(pki.ca), str(pki.rogue_client.cert), str(pki.rogue_client.key)),
                client_context(str(pki.ca))):
        # TLS 1.3: the server checks the client certificate after the client's handshake is done,
        # so the refusal shows at the first read at the latest
        with pytest.raises((ssl.SSLError, ConnectionError)), MLLPClient("127.0.0.1", port, tls=ctx) as client:
            client.send(ADT)
    refused = s_client(port, "-CAfile", str(pki.ca), "-cert", str(pki.rogue_client.cert),
                       "-key", str(pki.rogue_client.key), stdin=b"\x0b" + ADT + b"\x1c\r")
    assert b"MSA" not in refused.stdout
    accepted = s_client(port, "-CAfile", str(pki.ca), "-cert", str(pki.client.cert), "-key", str(pki.client.key),
                        stdin=b"\x0b" + ADT + b"\x1c\r")
    assert b"MSA|CA" in accepted.stdout


def test_radbridge_send_hl7_over_tls(workdir: Path, sqlite_url: str, pki: PKI, engine_factory: Any,
                                     tmp_path: Path) -> None:
    with_tls(workdir, "hl7-inbound", mllp_block(pki, "required"))
    eng = engine_factory(workdir, sqlite_url)
    msg = tmp_path / "adt.hl7"
    msg.write_bytes(ADT)
    base = [sys.executable, "-m", "engine.cli", "send", "hl7", str(msg), "--to", f"127.0.0.1:{eng.mllp_port}"]
    ok = subprocess.run([*base, "--ca", str(pki.ca), "--cert", str(pki.client.cert), "--key", str(pki.client.key)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "message 1/1: CA" in ok.stdout, ok.stderr
    untrusted = subprocess.run([*base, "--tls"], capture_output=True, text=True, timeout=60)
    assert untrusted.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr


def test_client_context_refuses_a_missing_file(pki: PKI) -> None:
    with pytest.raises(TLSError, match="file not found"):
        client_context(str(pki.directory / "nope.pem"))


def _mllp_receiver(pki: PKI, client_certs: ssl.VerifyMode) -> tuple[socket.socket, ssl.SSLContext]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    ctx.load_verify_locations(str(pki.ca))
    ctx.verify_mode = client_certs
    listener = socket.create_server(("127.0.0.1", 0))
    return listener, ctx


def test_outbound_mllp_sender_over_mutual_tls(pki: PKI) -> None:
    """The outbound MLLP sender ([ehr] mllp_tls) against a TLS receiver that requires a client
    certificate (a stand-in EHR made of the standard library)."""
    import asyncio
    import threading

    from engine.channels import Destination
    from engine.config import EHRSettings
    from engine.outbound.senders import MLLPSender, mllp_tls_context
    from engine.store.states import AttemptOutcome

    listener, ctx = _mllp_receiver(pki, ssl.CERT_REQUIRED)
    port = listener.getsockname()[1]
    seen: list[str | None] = []

    def serve() -> None:
        raw, _ = listener.accept()
        with ctx.wrap_socket(raw, server_side=True) as conn:
            peer = conn.getpeercert()
            seen.append(str(peer["subject"]) if peer else None)
            data = b""
            while b"\x1c" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            conn.sendall(b"\x0bMSH|^~\\&|EHR|H|RB|H|20240101||ACK|A1|P|2.5\rMSA|AA|OUT1\x1c\r")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ehr = EHRSettings(mllp=f"localhost:{port}", mllp_tls=True, mllp_ca_file=str(pki.ca),
                      mllp_cert_file=str(pki.client.cert), mllp_key_file=str(pki.client.key))
    sender = MLLPSender(ehr.mllp, Destination("ehr", "mllp", timeout_seconds=30), mllp_tls_context(ehr))

    async def go() -> Any:
        try:
            return await sender.send("MSH|^~\\&|RB|H|EHR|H|20240101||ORU^R01|OUT1|P|2.5\r", "OUT1")
        finally:
            await sender.close()

    outcome = asyncio.run(go())
    thread.join(30)
    listener.close()
    assert outcome.outcome is AttemptOutcome.DELIVERED, outcome
    assert seen and "MODALITY1" in str(seen[0])


def test_outbound_mllp_sender_refuses_an_untrusted_receiver(pki: PKI, tmp_path: Path) -> None:
    import asyncio
    import threading

    from engine.channels import Destination
    from engine.config import EHRSettings
    from engine.outbound.senders import MLLPSender, mllp_tls_context
    from engine.store.states import AttemptOutcome

    listener, ctx = _mllp_receiver(pki, ssl.CERT_NONE)
    port = listener.getsockname()[1]

    def serve() -> None:
        raw, _ = listener.accept()
        try:
            ctx.wrap_socket(raw, server_side=True).close()
        except (ssl.SSLError, OSError):
            raw.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ehr = EHRSettings(mllp=f"localhost:{port}", mllp_tls=True, mllp_ca_file=str(pki.rogue_ca))
    sender = MLLPSender(ehr.mllp, Destination("ehr", "mllp", timeout_seconds=30), mllp_tls_context(ehr))

    async def go() -> Any:
        try:
            return await sender.send("MSH|^~\\&|RB|H|EHR|H|20240101||ORU^R01|OUT2|P|2.5\r", "OUT2")
        finally:
            await sender.close()

    outcome = asyncio.run(go())
    thread.join(30)
    listener.close()
    assert outcome.outcome is AttemptOutcome.RETRY and outcome.status == "tls", outcome


# --- HTTPS ---------------------------------------------------------------------------------------------------
def https_settings(pki: PKI, client_certs: str = "off", reload_seconds: float = 5.0) -> Any:
    from engine.tls import ClientCerts, TLSSettings

    def apply(s: Settings) -> None:
        s.http.tls = TLSSettings(cert=str(pki.server.cert), key=str(pki.server.key), ca=str(pki.ca),
                                 client_certs=ClientCerts(client_certs), reload_seconds=reload_seconds)
    return apply


def curl(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "30", "-H", "Authorization: Bearer test-token", *args, url],
                          capture_output=True, text=True, timeout=60)


def test_https_with_curl(workdir: Path, sqlite_url: str, pki: PKI, engine_factory: Any) -> None:
    from tests.conftest import TOKEN
    eng = engine_factory(workdir, sqlite_url, https_settings(pki))
    port = eng.engine.http_port
    ok = subprocess.run(["curl", "-sS", "--max-time", "30", "--cacert", str(pki.ca), "-H",
                         f"Authorization: Bearer {TOKEN}", f"https://localhost:{port}/api/channels"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert '"hl7-inbound"' in ok.stdout
    health = curl(f"https://127.0.0.1:{port}/health", "--cacert", str(pki.ca))
    assert health.returncode == 0 and '"ok"' in health.stdout, health.stderr
    untrusted = curl(f"https://localhost:{port}/health", "--cacert", str(pki.rogue_ca))
    assert untrusted.returncode == 60  # curl: peer certificate cannot be authenticated
    plain = curl(f"http://127.0.0.1:{port}/health")
    assert "ok" not in plain.stdout  # plain HTTP to the TLS port gets no answer
    old = curl(f"https://localhost:{port}/health", "--cacert", str(pki.ca), "--tls-max", "1.1")
    assert old.returncode != 0
    assert curl(f"https://localhost:{port}/health", "--cacert", str(pki.ca)).returncode == 0  # still serving


def test_https_expired_certificate_is_refused_by_curl(workdir: Path, sqlite_url: str, pki: PKI,
                                                     engine_factory: Any) -> None:
    from engine.tls import TLSSettings

    def apply(s: Settings) -> None:
        s.http.tls = TLSSettings(cert=str(pki.expired.cert), key=str(pki.expired.key))

    eng = engine_factory(workdir, sqlite_url, apply)
    out = curl(f"https://localhost:{eng.engine.http_port}/health", "--cacert", str(pki.ca))
    assert out.returncode == 60 and "expired" in out.stderr, out.stderr


def test_https_certificate_rotation_shows_in_the_next_handshake(workdir: Path, sqlite_url: str, pki: PKI,
                                                               engine_factory: Any) -> None:
    eng = engine_factory(workdir, sqlite_url, https_settings(pki, reload_seconds=0.1))
    port = eng.engine.http_port
    assert eng.engine.http_tls is not None
    assert served_serial(port, pki.ca) == pki.server.serial
    renewed = swap_and_wait(eng, eng.engine.http_tls, pki)
    assert served_serial(port, pki.ca) == renewed


def test_https_client_certificates_required(workdir: Path, sqlite_url: str, pki: PKI, engine_factory: Any) -> None:
    eng = engine_factory(workdir, sqlite_url, https_settings(pki, "required"))
    url = f"https://localhost:{eng.engine.http_port}/health"
    assert curl(url, "--cacert", str(pki.ca)).returncode != 0
    assert curl(url, "--cacert", str(pki.ca), "--cert", str(pki.rogue_client.cert),
                "--key", str(pki.rogue_client.key)).returncode != 0
    ok = curl(url, "--cacert", str(pki.ca), "--cert", str(pki.client.cert), "--key", str(pki.client.key))
    assert ok.returncode == 0 and '"ok"' in ok.stdout, ok.stderr


def test_the_audit_trail_names_the_client_certificate(workdir: Path, sqlite_url: str, pki: PKI,
                                                      engine_factory: Any) -> None:
    """Who read patient data over mutual TLS: the token's name and the certificate's subject."""
    eng = engine_factory(workdir, sqlite_url, https_settings(pki, "required"))
    got = curl(f"https://localhost:{eng.engine.http_port}/api/patients?identifier=NOBODY", "--cacert", str(pki.ca),
               "--cert", str(pki.client.cert), "--key", str(pki.client.key))
    assert got.returncode == 0 and '"patients"' in got.stdout, got.stderr + got.stdout
    with eng.db.read_session() as s:
        (subject,) = s.execute(select(AuditEvent.cert_subject).where(AuditEvent.action == "search")).scalars()
    assert subject is not None and "CN=MODALITY1" in subject


# --- certificate reload -------------------------------------------------------------------------------
def test_mllp_certificate_rotation_is_picked_up_without_restart(workdir: Path, sqlite_url: str, pki: PKI,
                                                               engine_factory: Any) -> None:
    with_tls(workdir, "hl7-inbound", mllp_block(pki, reload_seconds=0.1))
    eng = engine_factory(workdir, sqlite_url)
    port = eng.mllp_port
    conn = eng.engine.connector("hl7-inbound", ListeningConnector)
    assert conn.tls is not None

    def served_serial() -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
                client_context(str(pki.ca)).wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return serial_of(ssl.DER_cert_to_PEM_cert(der))

    assert served_serial() == pki.server.serial
    renewed = pki.authority.issue("renewed", "localhost")
    reloads = conn.tls.reloads
    shutil.copyfile(renewed.key, pki.server.key)  # a half-done swap (new key, old cert) is not taken
    shutil.copyfile(renewed.cert, pki.server.cert)
    for _ in range(600):  # bounded: the watcher looks every 0.1 s
        if conn.tls.reloads > reloads:
            break
        eng.call(_sleep(0.05))
    assert conn.tls.reloads > reloads
    assert served_serial() == renewed.serial
    # a certificate changed at run time is on the audit trail, by the engine, naming the channel
    for _ in range(200):  # bounded: the row is written through the writer right after the reload
        with eng.db.read_session() as s:
            rows = s.execute(select(AuditEvent.agent, AuditEvent.detail, AuditEvent.status)
                             .where(AuditEvent.action == "config-reload")).all()
        if rows:
            break
        eng.call(_sleep(0.05))
    assert [(r.agent.startswith("engine:"), r.status) for r in rows] == [(True, 200)], rows
    assert "channel hl7-inbound" in (rows[0].detail or "") and str(pki.server.cert) in (rows[0].detail or "")


async def _sleep(seconds: float) -> None:
    import asyncio
    await asyncio.sleep(seconds)


# --- configuration and check -----------------------------------------------------------------------------
def test_tls_block_errors_name_file_and_line(workdir: Path, pki: PKI) -> None:
    from engine.runtime import load_definitions
    path = workdir / "channels" / "hl7-inbound.yaml"
    text = path.read_text() + "tls:\n  cert: server.crt\n  client_certs: sometimes\n  colour: blue\n"
    path.write_text(text)
    lines = text.splitlines()
    settings = make_settings(workdir, "sqlite://")
    _, _, problems = load_definitions(settings)
    found = {(p.field, p.line) for p in problems}
    assert ("tls.client_certs", lines.index("  client_certs: sometimes") + 1) in found
    assert ("tls.colour", lines.index("  colour: blue") + 1) in found
    assert ("tls.key", lines.index("tls:") + 1) in found


def run_check(workdir: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=workdir)


def write_config(workdir: Path, extra: str) -> Path:
    config = workdir / "radbridge.toml"
    config.write_text(f'channels_dir = "{workdir / "channels"}"\nmappings_dir = "{workdir / "mappings"}"\n'
                      f'[storage]\ndir = "{workdir / "var"}"\n{extra}')
    return config


def test_check_reports_expired_and_mismatched_certificates_with_file_and_line(workdir: Path, pki: PKI) -> None:
    config = write_config(workdir, f'[http]\nport = 0\n[http.tls]\ncert = "{pki.expired.cert}"\n'
                                   f'key = "{pki.expired.key}"\n[ehr]\nmllp = "localhost:6661"\nmllp_tls = true\n'
                                   f'mllp_ca_file = "{pki.directory / "no-ehr-ca.pem"}"\n')
    with_tls(workdir, "hl7-inbound", {"cert": str(pki.server.cert), "key": str(pki.client.key)})
    with_tls(workdir, "dicom", {"cert": str(pki.server.cert), "key": str(pki.server.key),
                                "ca": str(pki.directory / "missing-ca.pem"), "client_certs": "required"})
    out = run_check(workdir, config)
    assert out.returncode == 1
    err = out.stderr
    cert_line = config.read_text().splitlines().index(f'cert = "{pki.expired.cert}"') + 1
    assert f"{config}:{cert_line}: http.tls.cert: {pki.expired.cert}: certificate (CN=localhost,O=RadBridge tests) expired" in err
    hl7 = workdir / "channels" / "hl7-inbound.yaml"
    key_line = hl7.read_text().splitlines().index(f"  key: {pki.client.key}") + 1
    assert f"{hl7}:{key_line}: tls.key: {pki.client.key}: this key does not belong to the certificate" in err
    dicom = workdir / "channels" / "dicom.yaml"
    ca_line = dicom.read_text().splitlines().index(f"  ca: {pki.directory / 'missing-ca.pem'}") + 1
    assert f"{dicom}:{ca_line}: tls.ca: {pki.directory / 'missing-ca.pem'}: file not found" in err
    ehr_line = config.read_text().splitlines().index(f'mllp_ca_file = "{pki.directory / "no-ehr-ca.pem"}"') + 1
    assert f"{config}:{ehr_line}: ehr.mllp_ca_file: {pki.directory / 'no-ehr-ca.pem'}: file not found" in err


def test_check_passes_good_certificates(workdir: Path, pki: PKI) -> None:
    config = write_config(workdir, f'[http]\nport = 0\n[http.tls]\ncert = "{pki.server.cert}"\n'
                                   f'key = "{pki.server.key}"\n')
    with_tls(workdir, "hl7-inbound", mllp_block(pki, "required"))
    out = run_check(workdir, config)
    assert out.returncode == 0, out.stderr


def test_config_tls_settings_from_environment(pki: PKI) -> None:
    from engine.config import load_settings
    from engine.tls import ClientCerts
    from engine.yamlfile import ConfigFileError
    s: Settings = load_settings(None, env={"RADBRIDGE_HTTP_TLS_CERT": str(pki.server.cert),
                                     "RADBRIDGE_HTTP_TLS_KEY": str(pki.server.key),
                                     "RADBRIDGE_HTTP_TLS_CLIENT_CERTS": "optional"})
    assert s.http.tls.enabled and s.http.tls.client_certs is ClientCerts.OPTIONAL
    with pytest.raises(ConfigFileError, match="required or optional or off"):
        load_settings(None, env={"RADBRIDGE_HTTP_TLS_CLIENT_CERTS": "maybe"})


# --- DICOM TLS -------------------------------------------------------------------------------------------------
def dicom_block(pki: PKI, client_certs: str = "off", **extra: Any) -> dict[str, Any]:
    return {"cert": str(pki.server.cert), "key": str(pki.server.key), "ca": str(pki.ca),
            "client_certs": client_certs, **extra}


def dcmtk(tool: str, port: int, *args: str, calling: str = "MODALITY1") -> subprocess.CompletedProcess[str]:
    from tests.dicomutil import require_dcmtk, run
    require_dcmtk()
    return run([tool, "-v", "-aet", calling, "-aec", "RADBRIDGE", *args, "127.0.0.1", str(port)])


def tls_args(pki: PKI, who: Any = None) -> list[str]:
    who = who or pki.client
    return ["+tls", str(who.key), str(who.cert), "+cf", str(pki.ca)]


def test_dicom_tls_echoscu_and_storescu(workdir: Path, db_url: str, pki: PKI, engine_factory: Any,
                                        tmp_path: Path) -> None:
    from sqlalchemy import func, select

    from engine.store.models import Instance
    from tests.dicomutil import make_instance, run
    with_tls(workdir, "dicom", dicom_block(pki, "required"))
    eng = engine_factory(workdir, db_url)
    port = eng.dicom_port
    echo = dcmtk("echoscu", port, *tls_args(pki))
    assert echo.returncode == 0, echo.stdout + echo.stderr
    obj = make_instance(tmp_path / "ct.dcm")
    stored = run(["storescu", "-v", "-aet", "MODALITY1", "-aec", "RADBRIDGE", *tls_args(pki), "127.0.0.1",
                  str(port), str(obj.path)], timeout=120)
    assert stored.returncode == 0 and "Received Store Response (Success)" in stored.stderr, stored.stdout + stored.stderr
    with eng.db.read_session() as s:
        assert s.execute(select(func.count()).select_from(Instance)
                         .where(Instance.sop_instance_uid == obj.sop_uid)).scalar_one() == 1


def test_dicom_tls_refuses_plain_untrusted_and_anonymous_peers_and_stays_up(workdir: Path, sqlite_url: str,
                                                                           pki: PKI, engine_factory: Any) -> None:
    with_tls(workdir, "dicom", dicom_block(pki, "required"), acse_timeout_seconds=5,
             association_request_timeout_seconds=5)
    eng = engine_factory(workdir, sqlite_url)
    port = eng.dicom_port
    plain = dcmtk("echoscu", port)
    assert plain.returncode != 0
    untrusted = dcmtk("echoscu", port, "+tls", str(pki.rogue_client.key), str(pki.rogue_client.cert),
                      "+cf", str(pki.ca))
    assert untrusted.returncode != 0
    anonymous = dcmtk("echoscu", port, "+tla", "+cf", str(pki.ca))
    assert anonymous.returncode != 0
    # a connection that never says anything does not stop others from being accepted
    with socket.create_connection(("127.0.0.1", port), timeout=30):
        again = dcmtk("echoscu", port, *tls_args(pki))
    assert again.returncode == 0, again.stdout + again.stderr


def test_dicom_tls_binds_the_calling_ae_title_to_the_certificate(workdir: Path, sqlite_url: str, pki: PKI,
                                                                engine_factory: Any) -> None:
    with_tls(workdir, "dicom", dicom_block(pki, "required", bind_ae_title=True))
    eng = engine_factory(workdir, sqlite_url)
    port = eng.dicom_port
    assert dcmtk("echoscu", port, *tls_args(pki), calling="MODALITY1").returncode == 0
    other = dcmtk("echoscu", port, *tls_args(pki), calling="MODALITY2")
    assert other.returncode != 0
    assert "Calling AE Title Not Recognized" in other.stdout + other.stderr


def test_dicom_c_move_to_a_tls_destination(workdir: Path, sqlite_url: str, pki: PKI, engine_factory: Any,
                                           tmp_path: Path) -> None:
    """C-MOVE over DICOM TLS, its sub-association too: dcmtk's storescp +tls is the destination
    (dcmtk's movescu has no TLS, so pynetdicom asks for the move)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]

    from tests.dicomutil import DCMTK_ENV, free_port, make_instance, run
    from tests.waiting import wait_for_listener
    both = pki.authority.issue("engine", "localhost", client=True)  # our certificate, as server and as client
    dest_port = free_port()

    def settings_fn(s: Settings) -> None:
        s.dicom.destinations = [f"DEST=tls://localhost:{dest_port}"]

    with_tls(workdir, "dicom", {"cert": str(both.cert), "key": str(both.key), "ca": str(pki.ca),
                                "client_certs": "off"})
    eng = engine_factory(workdir, sqlite_url, settings_fn)
    port = eng.dicom_port
    obj = make_instance(tmp_path / "ct.dcm", accession="MOVE1")
    sent = run(["storescu", "-aet", "MODALITY1", "-aec", "RADBRIDGE", "+tla", "+cf", str(pki.ca), "127.0.0.1",
                str(port), str(obj.path)], timeout=120)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    out_dir = tmp_path / "received"
    out_dir.mkdir()
    scp = subprocess.Popen(["storescp", "-aet", "DEST", "-od", str(out_dir), "+tls", str(pki.server.key),
                            str(pki.server.cert), "+cf", str(pki.ca), str(dest_port)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=DCMTK_ENV)
    try:
        wait_for_listener(dest_port, scp, what="storescp +tls")
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", port, ae_title="RADBRIDGE",
                             tls_args=(client_context(str(pki.ca)), "localhost"))
        assert assoc.is_established
        from pydicom.dataset import Dataset
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = obj.study_uid
        statuses = [int(st.Status) for st, _ in assoc.send_c_move(query, "DEST",
                                                                  StudyRootQueryRetrieveInformationModelMove) if st]
        assoc.release()
    finally:
        scp.terminate()
        scp.wait(30)
    assert statuses and statuses[-1] == 0x0000, [hex(s) for s in statuses]
    assert len(list(out_dir.iterdir())) == 1


def test_dicom_certificate_rotation_shows_in_the_next_handshake(workdir: Path, sqlite_url: str, pki: PKI,
                                                               engine_factory: Any) -> None:
    with_tls(workdir, "dicom", dicom_block(pki, reload_seconds=0.1))
    eng = engine_factory(workdir, sqlite_url)
    port = eng.dicom_port
    conn = eng.engine.connector("dicom", ListeningConnector)
    assert served_serial(port, pki.ca) == pki.server.serial
    renewed = swap_and_wait(eng, conn.tls, pki)
    assert served_serial(port, pki.ca) == renewed
    assert dcmtk("echoscu", port, "+tla", "+cf", str(pki.ca)).returncode == 0


def test_mllp_optional_client_certificates(workdir: Path, sqlite_url: str, pki: PKI, engine_factory: Any) -> None:
    with_tls(workdir, "hl7-inbound", mllp_block(pki, "optional"))
    eng = engine_factory(workdir, sqlite_url)
    port = eng.mllp_port
    with MLLPClient("127.0.0.1", port, tls=client_context(str(pki.ca))) as client:  # none: fine
        assert ack_code(client.send(ADT)) == "CA"
    trusted = client_context(str(pki.ca), str(pki.client.cert), str(pki.client.key))
    with MLLPClient("127.0.0.1", port, tls=trusted) as client:
        assert ack_code(client.send(ADT)) == "CA"
    rogue = client_context(str(pki.ca), str(pki.rogue_client.cert), str(pki.rogue_client.key))
    with pytest.raises((ssl.SSLError, ConnectionError)), MLLPClient("127.0.0.1", port, tls=rogue) as client:
        client.send(ADT)
