"""The radbridge command as an operator uses it (run as a subprocess)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from importlib.metadata import version
from pathlib import Path

from engine.store.migrate import head_revision
from tests.conftest import REPO, SAMPLES, RunningEngine
from tests.hl7util import adt, send
from tests.waiting import wait_until


def radbridge(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, **(env or {})})


def test_check_passes_on_the_shipped_configuration() -> None:
    out = radbridge("check")
    assert out.returncode == 0, out.stderr
    assert "radbridge check: OK (6 channel(s), 6 mapping(s), 4 outbound mapping(s)" in out.stdout
    # the EHR's addresses are empty by default: said, but not an error
    assert "[ehr] fhir_base is empty (RADBRIDGE_EHR_FHIR_BASE): nothing is sent here (warning)" in out.stdout


def test_check_names_file_line_and_field_and_exits_1(workdir: Path) -> None:
    (workdir / "mappings" / "hl7-orm.yaml").write_text(
        "source: hl7v2\nfields:\n  order.accession: OBR-18\n  order.acession_typo: OBR-3\n")
    ch = workdir / "channels" / "hl7-inbound.yaml"
    ch.write_text(ch.read_text().replace("action: patient.merge", "action: patient.mrege"))
    env = {"RADBRIDGE_CHANNELS_DIR": str(workdir / "channels"), "RADBRIDGE_MAPPINGS_DIR": str(workdir / "mappings")}
    out = radbridge("check", env=env)
    assert out.returncode == 1
    assert f"{workdir}/mappings/hl7-orm.yaml:4: order.acession_typo: unknown domain field" in out.stderr
    line = next(i for i, t in enumerate(ch.read_text().splitlines(), 1) if "patient.mrege" in t)
    assert f"{ch}:{line}: routes[3].action: unknown action 'patient.mrege'" in out.stderr


def test_run_refuses_to_start_with_a_broken_channel(workdir: Path) -> None:
    (workdir / "channels" / "broken.yaml").write_text("name: broken\nconnector: {type: mllp}\n")
    env = {"RADBRIDGE_CHANNELS_DIR": str(workdir / "channels"), "RADBRIDGE_MAPPINGS_DIR": str(workdir / "mappings"),
           "RADBRIDGE_STORAGE_DIR": str(workdir / "var")}
    out = radbridge("run", env=env, cwd=workdir)
    assert out.returncode == 1 and "broken.yaml:1: routes: routes: must list at least one route" in out.stderr


def test_mappings_try_prints_the_mapped_result() -> None:
    out = radbridge("mappings", "try", "hl7-omi", str(SAMPLES / "omi_o23.hl7"))
    assert out.returncode == 0, out.stderr
    assert '"order.station_aet": "CT01"' in out.stdout and '"patient.id"' not in out.stdout
    out = radbridge("mappings", "try", "hl7-patient", str(SAMPLES / "omi_o23.hl7"))
    assert '"patient.family_name": "Müller"' in out.stdout


def test_mappings_try_reports_value_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.hl7"
    bad.write_text(adt("A01", "X", "Y", dob="31.12.1999"))
    out = radbridge("mappings", "try", "hl7-patient", str(bad))
    assert out.returncode == 1 and '"path": "PID-7.1"' in out.stdout


def test_send_messages_list_show_and_reprocess(running: RunningEngine, tmp_path: Path) -> None:
    f = tmp_path / "two.hl7"
    f.write_text((SAMPLES / "adt_a01.hl7").read_text().replace("\r", "\n") + "\n"
                 + (SAMPLES / "orm_o01.hl7").read_text().replace("\r", "\n"))
    out = radbridge("send", "hl7", str(f), "--to", f"127.0.0.1:{running.mllp_port}")
    assert out.returncode == 0, out.stderr
    assert "message 1/2: CA" in out.stdout and "message 2/2: AA" in out.stdout
    # the sample A01 asks for enhanced mode with no application ACK (MSH-15/16 AL/NE): the CA says so,
    # and where the outcome (AA, as `messages list` shows it) is to be found
    assert ("message 1/2: CA (commit ACK: stored; MSH-16 NE asks for no application ACK, the outcome AA/AE is in "
            "`radbridge messages list`)  MSH|") in out.stdout, out.stdout
    send(running.mllp_port, adt("A01", "CLI1", "Err", dob="bad"))
    env = {"RADBRIDGE_DATABASE_URL": running.settings.database_url,
           "RADBRIDGE_CHANNELS_DIR": running.settings.channels_dir,
           "RADBRIDGE_MAPPINGS_DIR": running.settings.mappings_dir}
    out = radbridge("messages", "list", env=env)
    assert out.returncode == 0 and "ORM^O01" in out.stdout and "ORM0001" in out.stdout
    adt_line = next(line for line in out.stdout.splitlines() if " ADT0001 " in line)
    assert adt_line.split()[6:8] == ["processed", "AA"], adt_line
    listed = radbridge("messages", "list", "--help")
    assert "commit ACK CA first" in " ".join(listed.stdout.split())
    err_line = next(line for line in out.stdout.splitlines() if " error " in line)
    mid = err_line.split()[0]
    shown = radbridge("messages", "show", mid, "--validate", env=env)
    assert shown.returncode == 0 and '"status": "error"' in shown.stdout and "validation" in shown.stdout
    again = radbridge("messages", "reprocess", mid, env=env)
    assert again.returncode == 1 and f"message {mid}: error" in again.stdout  # still bad: the data is bad
    assert radbridge("messages", "show", "999999", env=env).returncode == 1



def test_send_shows_both_acks_in_enhanced_mode(running: RunningEngine, tmp_path: Path) -> None:
    """Review regression: with MSH-15/16 AL/AL, `radbridge send` shows both replies to each
    message, the commit ACK (CA) and then the application ACK (AA)."""
    f = tmp_path / "alal.hl7"
    f.write_text(adt("A01", "AL1", "Both", msh_extra="|||AL|AL") + adt("A01", "AL2", "Both", msh_extra="|||AL|AL"))
    out = radbridge("send", "hl7", str(f), "--to", f"127.0.0.1:{running.mllp_port}")
    lines = [line.split("  ")[0] for line in out.stdout.splitlines()]
    assert lines == ["message 1/2: CA", "message 1/2: AA", "message 2/2: CA", "message 2/2: AA"], out.stdout

def test_send_reports_an_unreachable_peer(tmp_path: Path) -> None:
    f = tmp_path / "a.hl7"
    f.write_text(adt("A01", "X", "Y"))
    out = radbridge("send", "hl7", str(f), "--to", "127.0.0.1:1")
    assert out.returncode == 1 and "cannot send to 127.0.0.1:1" in out.stderr


def test_demo_runs_the_whole_flow_to_the_standin_ehr() -> None:
    out = radbridge("demo")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ACK: MSA|AA|ADT0002|duplicate of message" in out.stdout
    assert "status CA; history: NW:SC -> CA:CA" in out.stdout
    assert "C-STORE statuses: 0x0000, 0x0000" in out.stdout
    assert "state reconciled, matched by accession; name in the stored headers now Müller^Zoë" in out.stdout
    assert "available, 1 series, 2 instances" in out.stdout and "accession ACC2002" in out.stdout
    assert "PID|1||200002^^^GENHOSP^MR||Müller^Zoë||19800101|F" in out.stdout


def test_secrets_are_masked_in_output_and_private_on_disk(tmp_path: Path) -> None:
    """Issue 14, item 15: `check --database` printed the database password; radbridge.db (and its
    WAL) were created 0644; api-token was written 0644 and then chmod-ed."""
    url = "postgresql+psycopg://postgres:s3cret-pw@127.0.0.1:5432/postgres"  # trust auth: any password works
    out = radbridge("check", "--database", env={"RADBRIDGE_DATABASE_URL": url})
    assert "s3cret-pw" not in out.stdout + out.stderr
    assert "postgres:***@127.0.0.1" in out.stdout + out.stderr, out.stdout + out.stderr
    bad = radbridge("check", "--database",
                    env={"RADBRIDGE_DATABASE_URL": "postgresql+psycopg://postgres:s3cret-pw@127.0.0.1:1/none"})
    assert bad.returncode == 1 and "s3cret-pw" not in bad.stdout + bad.stderr
    # a fresh storage dir: the database, its WAL and the generated token are the owner's only
    storage = tmp_path / "var"
    env = {"RADBRIDGE_STORAGE_DIR": str(storage), "RADBRIDGE_DATABASE_URL": ""}
    run = subprocess.Popen([sys.executable, "-m", "engine.cli", "run"], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True,
                           env={**{k: v for k, v in os.environ.items() if not k.startswith("RADBRIDGE_")}, **env,
                                "RADBRIDGE_MLLP_PORT": "0", "RADBRIDGE_HTTP_PORT": "0", "RADBRIDGE_DICOM_PORT": "0"})
    try:
        wait_until(lambda: (storage / "api-token").exists() and (storage / "radbridge.db-wal").exists(),
                   timeout=60, message="the engine to create its store and token")
    finally:
        run.terminate()
        run.wait(30)
        assert run.stdout is not None
        run.stdout.close()
    for name in ("radbridge.db", "radbridge.db-wal", "api-token"):
        assert (storage / name).stat().st_mode & 0o077 == 0, f"{name}: {oct((storage / name).stat().st_mode)}"


def test_version_comes_from_the_package_metadata() -> None:
    out = radbridge("--version")
    assert out.returncode == 0 and out.stdout == f"radbridge {version('radbridge')}\n", out.stdout + out.stderr


def test_send_hl7_help_explains_file_timeout_and_ack_modes() -> None:
    out = radbridge("send", "hl7", "--help")
    text = " ".join(out.stdout.split())
    assert out.returncode == 0
    assert "FILE a file of one or more HL7 v2 messages" in text
    assert "--timeout SECONDS how long to wait to connect and for each ACK (default 30)" in text
    assert "Enhanced mode (MSH-15 or MSH-16 set" in text and "commit ACK, CA when the message is stored" in text


def test_mappings_list_shows_kind_and_state_of_every_file(workdir: Path) -> None:
    env = {"RADBRIDGE_MAPPINGS_DIR": str(workdir / "mappings")}
    out = radbridge("mappings", "list", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:-1]}
    assert sorted(rows) == sorted(p.stem for p in (workdir / "mappings").glob("*.yaml"))
    assert rows["hl7-patient"].split()[1:] == ["inbound", "hl7v2", "OK"]
    assert rows["fhir-patient"].split()[1:] == ["inbound", "fhir", "Patient", "OK"]
    assert rows["hl7-oru-images"].split()[1:] == ["outbound", "hl7v2", "ORU^R01", "OK"]
    assert rows["reconciliation"].split()[1:] == ["reconciliation", "rules", "OK"]
    assert out.stdout.splitlines()[-1] == f"{len(rows)} mapping file(s) in {workdir / 'mappings'}: all valid"
    # one broken file: its first error with file:line, the others still OK, exit 1
    (workdir / "mappings" / "hl7-orm.yaml").write_text(
        "source: hl7v2\nfields:\n  order.accession: OBR-18\n  order.acession_typo: OBR-3\n")
    out = radbridge("mappings", "list", env=env)
    assert out.returncode == 1
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:-1]}
    assert rows["hl7-orm"].split(None, 3)[1:] == [
        "inbound", "hl7v2", f"INVALID {workdir}/mappings/hl7-orm.yaml:4: order.acession_typo: unknown domain field; "
        "see docs/mapping-reference.md for the list (site-specific fields go under patient.extra.NAME or "
        "order.extra.NAME)"]
    assert rows["hl7-omi"].split()[-1] == "OK"
    assert out.stdout.splitlines()[-1].endswith(": 1 invalid")


def test_reading_commands_elsewhere_do_not_create_a_store(tmp_path: Path) -> None:
    """Run from a directory without the engine's var/, a command that reads the store says where it
    looked and how the store comes to be, and leaves no empty var/ behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADBRIDGE_")}
    commands = [["messages", "list"], ["messages", "show", "1"], ["deliveries", "list"], ["studies", "list"],
                ["audit"], ["tokens", "list"]]
    for args in commands:
        out = subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path, env=env)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert out.stderr.startswith(f"radbridge: no database at {tmp_path}/var/radbridge.db: the engine creates "
                                     "it when it first starts (`radbridge run`"), (args, out.stderr)
        assert not (tmp_path / "var").exists(), args
    out = subprocess.run([sys.executable, "-m", "engine.cli", "check", "--database"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path, env=env)
    assert out.returncode == 1 and f"no database at {tmp_path}/var/radbridge.db" in out.stderr
    assert not (tmp_path / "var").exists()


def _first_start(tmp_path: Path, *args: str) -> str:
    """`radbridge run` on a fresh store until it says it is running; everything it printed."""
    tmp_path.mkdir()
    log = tmp_path / "run.log"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RADBRIDGE_")},
           "RADBRIDGE_STORAGE_DIR": str(tmp_path / "var"), "RADBRIDGE_MLLP_PORT": "0", "RADBRIDGE_HTTP_PORT": "0",
           "RADBRIDGE_DICOM_PORT": "0"}
    with log.open("wb") as out:
        run = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", *args], cwd=REPO, stdout=out,
                               stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: "radbridge running:" in log.read_text() or run.poll() is not None, timeout=60,
                   message="the engine to start")
    finally:
        run.terminate()
        run.wait(30)
    return log.read_text()


def test_first_start_is_quiet_unless_verbose(tmp_path: Path) -> None:
    """The first start printed one Alembic INFO line per migration (17) before the useful lines: one
    line says the schema was created; --verbose shows the steps."""
    text = _first_start(tmp_path / "a")
    assert "radbridge running:" in text, text
    assert "alembic" not in text, text
    assert [line.split(" INFO ")[1] for line in text.splitlines() if "engine.store.migrate" in line] == [
        f"engine.store.migrate: database schema created (revision {head_revision()})"], text
    verbose = _first_start(tmp_path / "b", "--verbose")
    assert "INFO alembic.runtime.migration: Running upgrade  -> 0001" in verbose, verbose


def _get_json(url: str, token: str | None = None) -> tuple[int, object]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback URLs the demo printed
        return resp.status, json.loads(resp.read())


def test_demo_serve_keeps_engine_and_standin_ehr_up_until_sigint(tmp_path: Path) -> None:
    """`radbridge demo` ended with URLs already dead; --serve runs the scenario, prints where the engine
    and the stand-in EHR listen, answers there until SIGINT, then stops cleanly with exit 0."""
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        demo = subprocess.Popen([sys.executable, "-m", "engine.cli", "demo", "--serve"], cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT,
                                env={k: v for k, v in os.environ.items() if not k.startswith("RADBRIDGE_")})
    try:
        wait_until(lambda: "The demo keeps running" in log.read_text() or demo.poll() is not None, timeout=120,
                   message="the demo scenario to finish and serve")
        text = log.read_text()
        assert demo.poll() is None, text
        assert "status CA; history: NW:SC -> CA:CA" in text  # the scenario ran first
        http = re.search(r"console +(http://127\.0\.0\.1:\d+)/ +\(log in with the token demo-token\)", text)
        ehr = re.search(r"stand-in EHR +FHIR (http://127\.0\.0\.1:\d+/fhir) \(token ehr-token\)", text)
        assert http and ehr, text
        assert _get_json(f"{http[1]}/health")[0] == 200
        status, patients = _get_json(f"{http[1]}/api/patients?identifier=100001", "demo-token")
        assert status == 200 and isinstance(patients, dict) and len(patients["patients"]) == 1
        status, bundle = _get_json(f"{http[1]}/fhir/Patient?identifier=100001", "demo-token")
        assert status == 200 and isinstance(bundle, dict) and bundle["total"] == 1
        status, studies = _get_json(f"{ehr[1]}/ImagingStudy", "ehr-token")
        assert status == 200 and isinstance(studies, dict) and studies["resourceType"] == "Bundle"
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0, log.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(30)
    assert "radbridge demo: stopping the engine and the stand-in EHR" in log.read_text()
