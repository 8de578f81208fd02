"""The audit trail (issue 15 item 3), on SQLite and PostgreSQL, through the real API of a running
engine and the real `radbridge` command: every action that changes state leaves exactly one row
naming who did it (the token's name over HTTP, cli:<os user> from the CLI, engine:<host> for the
engine itself), on what, and how it ended; the exports parse (RFC 5424 by regex, AuditEvent with
fhir.resources R4B); nothing in the engine but retention deletes or updates the rows."""

from __future__ import annotations

import ast
import getpass
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from sqlalchemy import insert, select

from engine.config import RetentionSettings, load_settings
from engine.standin_ehr import StandInEHR
from engine.store.audit import AUDIT
from engine.store.db import open_database
from engine.store.models import AuditEvent, Delivery, Message
from engine.store.retention import prune
from engine.store.types import utcnow
from tests.conftest import REPO, TOKEN, RunningEngine, make_settings, start_dicom_engine
from tests.dicomutil import require_dcmtk
from tests.fhirutil import call, patient
from tests.hl7util import ack_code, adt, orm, send
from tests.test_outbound import order_and_images, wake
from tests.test_outbound import start as start_with_ehr
from tests.test_reconciliation import findings, hl7, post, settle, store, work
from tests.waiting import wait_until

CLI_ACTOR = f"cli:{getpass.getuser()}"
WAIT = 30.0

# RFC 5424: <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP STRUCTURED-DATA [SP MSG]
SD_PARAM = r'[^\s=\]"]{1,32}="(?:[^"\\\]]|\\["\\\]])*"'
SD_ELEMENT = rf"\[[^\s=\]\"]{{1,32}}(?: {SD_PARAM})*\]"
RFC5424 = re.compile(
    r"^<(?P<pri>\d{1,3})>(?P<version>1) "
    r"(?P<timestamp>-|\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})) "
    r"(?P<hostname>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) "
    rf"(?P<sd>-|(?:{SD_ELEMENT})+)(?: (?P<msg>.*))?$")


def cli(e: RunningEngine, *args: str) -> subprocess.CompletedProcess[str]:
    s = e.settings
    env = {**os.environ, "RADBRIDGE_DATABASE_URL": s.database_url, "RADBRIDGE_STORAGE_DIR": s.storage.dir,
           "RADBRIDGE_CHANNELS_DIR": s.channels_dir, "RADBRIDGE_MAPPINGS_DIR": s.mappings_dir,
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=REPO)


def trail(e: RunningEngine, **where: Any) -> list[AuditEvent]:
    with e.db.read_session() as s:
        stmt = select(AuditEvent)
        for k, v in where.items():
            stmt = stmt.where(getattr(AuditEvent, k) == v)
        return list(s.execute(stmt.order_by(AuditEvent.id)).scalars())


def api_agent(e: RunningEngine) -> str:
    """Who the test's token is in the trail: whatever a read of patient data records (a name, not
    the token)."""
    status, _ = e.api("/api/patients?identifier=NOBODY")
    assert status == 200
    agent = trail(e, action="search", resource_type="Patient")[-1].agent
    assert agent not in ("", "anonymous") and TOKEN not in agent
    return agent


def one_new(e: RunningEngine, before: int, action: str) -> AuditEvent:
    """Exactly one row of ``action`` written since id ``before``."""
    rows = [a for a in trail(e, action=action) if a.id > before]
    assert len(rows) == 1, [(a.action, a.agent, a.status, a.detail) for a in rows]
    return rows[0]


def last_id(e: RunningEngine) -> int:
    rows = trail(e)
    return rows[-1].id if rows else 0


def message_id(e: RunningEngine, control_id: str) -> Message:
    with e.db.read_session() as s:
        return s.execute(select(Message).where(Message.control_id == control_id)).scalar_one()


# --- actions through the API and the CLI ---------------------------------------------------------

def test_reprocess_is_recorded_from_the_api_and_the_cli(running: RunningEngine) -> None:
    agent = api_agent(running)
    assert ack_code(send(running.mllp_port, adt("A04", "AUD1", "Audit", ctrl="AUDCTL1"))) == "AA"
    msg = message_id(running, "AUDCTL1")
    assert msg.patient_id is not None
    # reading the message (its raw content holds the patient's details) is on the trail too
    before = last_id(running)
    assert running.api(f"/api/messages/{msg.id}")[0] == 200
    row = one_new(running, before, "read")
    assert (row.agent, row.status, row.message_id, row.patient_ids, row.resource_type) == (
        agent, 200, msg.id, [msg.patient_id], "Message")
    before = last_id(running)
    status, body = running.api(f"/api/messages/{msg.id}/reprocess", method="POST")
    assert status == 200, body
    row = one_new(running, before, "reprocess")
    assert (row.agent, row.remote, row.status, row.message_id, row.patient_ids, row.resource_type) == (
        agent, "127.0.0.1", 200, msg.id, [msg.patient_id], "Message")
    assert row.cert_subject is None  # plain HTTP: no client certificate
    # refused: no such message, and a FHIR request (not reprocessed from here): one failure row each
    before = last_id(running)
    assert running.api("/api/messages/999999/reprocess", method="POST")[0] == 404
    row = one_new(running, before, "reprocess")
    assert (row.agent, row.status, row.message_id) == (agent, 404, 999999)
    made = call(running, "POST", "Patient", patient("AUDF1", "Fhirish"))
    with running.db.read_session() as s:
        fhir_msg = s.execute(select(Message).where(Message.protocol == "fhir").order_by(Message.id.desc())
                             ).scalars().first()
    assert made.status == 201 and fhir_msg is not None
    before = last_id(running)
    assert running.api(f"/api/messages/{fhir_msg.id}/reprocess", method="POST")[0] == 409
    assert one_new(running, before, "reprocess").status == 409
    # the CLI: the OS user is the actor
    before = last_id(running)
    out = cli(running, "messages", "reprocess", str(msg.id))
    assert out.returncode == 0, out.stderr
    row = one_new(running, before, "reprocess")
    assert (row.agent, row.status, row.message_id, row.patient_ids, row.remote) == (
        CLI_ACTOR, 200, msg.id, [msg.patient_id], None)
    before = last_id(running)
    assert cli(running, "messages", "reprocess", "999999").returncode == 1
    assert (one_new(running, before, "reprocess").status, CLI_ACTOR) == (404, CLI_ACTOR)


@pytest.fixture
def dcmtk() -> None:
    require_dcmtk()


def test_match_unmatch_reconcile_and_accept_are_recorded(dcmtk: None, workdir: Path, db_url: str,
                                                         tmp_path: Path) -> None:
    e = start_dicom_engine(workdir, db_url, reconciliation="reject")
    try:
        agent = api_agent(e)
        hl7(e, adt("A04", "AUD6", "White", "Eve", dob="19750315"), orm("NW", "PLAUD6", "ACCAUD6", "AUD6"))
        obj = store(e, tmp_path / "a", accession="WRONGAUD", patient_id="TMPAUD", name="UNKNOWN^PATIENT")
        settle(e)
        before = last_id(e)
        status, body = post(e, f"/api/studies/{obj.study_uid}/match", {"accession": "ACCAUD6"})
        assert status == 202, body
        row = one_new(e, before, "match")
        assert (row.agent, row.study_uid, row.status, row.resource_type) == (agent, obj.study_uid, 202, "Study")
        assert row.patient_ids and "ACCAUD6" in (row.detail or "")
        before = last_id(e)
        assert post(e, f"/api/studies/{obj.study_uid}/match", {"accession": "NOSUCH"})[0] == 404
        row = one_new(e, before, "match")
        assert (row.agent, row.status, row.study_uid) == (agent, 404, obj.study_uid)
        work(e)
        before = last_id(e)
        assert e.api(f"/api/studies/{obj.study_uid}/match", method="DELETE")[0] == 202
        assert one_new(e, before, "unmatch").agent == agent
        before = last_id(e)
        assert e.api(f"/api/studies/{obj.study_uid}/reconcile", method="POST")[0] == 202
        assert one_new(e, before, "reconcile").study_uid == obj.study_uid
        work(e)
        # a quarantined study's finding accepted, over the API and (another study) from the CLI
        hl7(e, adt("A04", "AUD4", "Brown", "Ann", dob="19650505"), orm("NW", "PLAUD4", "ACCAUD4", "AUD4"))
        quarantined = []
        for n in (1, 2):
            o = store(e, tmp_path / f"q{n}", accession="ACCAUD4", patient_id="AUD4", name="BROWN^ANN",
                      birth_date="19560505", issuer="GENHOSP")
            quarantined.append(o)
        settle(e)
        f_api = findings(e, quarantined[0].study_uid, kind="mismatch")[0]
        f_cli = findings(e, quarantined[1].study_uid, kind="mismatch")[0]
        before = last_id(e)
        assert e.api(f"/api/findings/{f_api.id}/accept", method="POST")[0] == 200
        row = one_new(e, before, "accept")
        assert (row.agent, row.study_uid, row.resource_type, row.status) == (
            agent, quarantined[0].study_uid, "Finding", 200)
        assert row.patient_ids
        before = last_id(e)
        assert e.api(f"/api/findings/{f_api.id}/accept", method="POST")[0] == 409
        assert one_new(e, before, "accept").status == 409
        before = last_id(e)
        out = cli(e, "studies", "accept", str(f_cli.id), "--no-wait")
        assert out.returncode == 0, out.stderr
        row = one_new(e, before, "accept")
        assert (row.agent, row.study_uid, row.status) == (CLI_ACTOR, quarantined[1].study_uid, 200)
        before = last_id(e)
        out = cli(e, "studies", "match", obj.study_uid, "--order", "ACCAUD6", "--no-wait")
        assert out.returncode == 0, out.stderr
        assert (one_new(e, before, "match").agent, one_new(e, before, "match").study_uid) == (CLI_ACTOR, obj.study_uid)
        before = last_id(e)
        assert cli(e, "studies", "match", obj.study_uid, "--order", "NOSUCH", "--no-wait").returncode == 1
        assert (one_new(e, before, "match").agent, one_new(e, before, "match").status) == (CLI_ACTOR, 404)
        before = last_id(e)
        assert cli(e, "studies", "reconcile", obj.study_uid, "--no-wait").returncode == 0
        assert one_new(e, before, "reconcile").agent == CLI_ACTOR
        before = last_id(e)
        assert cli(e, "studies", "match", obj.study_uid, "--clear", "--no-wait").returncode == 0
        assert (one_new(e, before, "unmatch").agent, one_new(e, before, "unmatch").study_uid) == (
            CLI_ACTOR, obj.study_uid)
    finally:
        e.stop()


@pytest.fixture
def ehr() -> Iterator[StandInEHR]:
    with StandInEHR(token="ehr-secret") as found:
        yield found


def test_retry_and_discard_are_recorded(dcmtk: None, workdir: Path, db_url: str, ehr: StandInEHR,
                                        tmp_path: Path) -> None:
    ehr.nak = lambda msg: "AE"  # every ORU is refused: its delivery goes dead at the first attempt
    e = start_with_ehr(workdir, db_url, ehr, max_attempts=1)
    try:
        agent = api_agent(e)
        obj = order_and_images(e, tmp_path, "AUDD1", "ACCAUDD1", n=1)
        settle(e)
        wake(e)

        def dead() -> Delivery | None:
            with e.db.read_session() as s:
                return s.execute(select(Delivery).where(Delivery.state == "dead")).scalars().first()
        d = wait_until(dead, timeout=WAIT, message="a dead delivery")
        assert d is not None
        before = last_id(e)
        assert e.api(f"/api/deliveries/{d.id}/discard?note=not%20needed", method="POST")[0] == 200
        row = one_new(e, before, "discard")
        assert (row.agent, row.delivery_id, row.study_uid, row.status, row.resource_type) == (
            agent, d.id, obj.study_uid, 200, "Delivery")
        assert row.patient_ids and "not needed" in (row.detail or "")
        before = last_id(e)
        assert e.api(f"/api/deliveries/{d.id}/discard", method="POST")[0] == 409  # discarded already
        assert one_new(e, before, "discard").status == 409
        before = last_id(e)
        assert e.api("/api/deliveries/999999/retry", method="POST")[0] == 404
        assert one_new(e, before, "retry").status == 404
        before = last_id(e)
        assert e.api(f"/api/deliveries/{d.id}/retry", method="POST")[0] == 200  # discarded -> pending
        row = one_new(e, before, "retry")
        assert (row.agent, row.delivery_id, row.status) == (agent, d.id, 200)
        wake(e)
        wait_until(lambda: dead() is not None, timeout=WAIT, message="the retried delivery dead again")
        before = last_id(e)
        out = cli(e, "deliveries", "discard", str(d.id), "--note", "cli")
        assert out.returncode == 0, out.stderr
        row = one_new(e, before, "discard")
        assert (row.agent, row.delivery_id, row.status) == (CLI_ACTOR, d.id, 200)
        before = last_id(e)
        out = cli(e, "deliveries", "retry", str(d.id))
        assert out.returncode == 0, out.stderr
        assert (one_new(e, before, "retry").agent, one_new(e, before, "retry").delivery_id) == (CLI_ACTOR, d.id)
        # every dead delivery at once: one row saying how many
        wake(e)
        wait_until(lambda: dead() is not None, timeout=WAIT, message="dead again")
        before = last_id(e)
        assert post(e, "/api/deliveries/retry", {"state": "dead"})[0] == 200
        row = one_new(e, before, "retry")
        assert (row.agent, row.count, row.delivery_id, row.detail) == (agent, 1, None, "every dead delivery")
        wake(e)
        wait_until(lambda: dead() is not None, timeout=WAIT, message="dead once more")
        before = last_id(e)
        assert cli(e, "deliveries", "retry", "--dead").returncode == 0
        row = one_new(e, before, "retry")
        assert (row.agent, row.count) == (CLI_ACTOR, 1)
    finally:
        e.stop()


def test_start_stop_and_mapping_reload_are_recorded(workdir: Path, db_url: str) -> None:
    e = RunningEngine(make_settings(workdir, db_url)).start()
    try:
        [started] = trail(e, action="start")
        assert started.agent.startswith("engine:") and started.status == 200 and started.resource_type == "Engine"
        path = workdir / "mappings" / "hl7-patient.yaml"
        before = last_id(e)
        path.write_text(path.read_text() + "\n# touched\n")
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
        row = wait_until(lambda: [a for a in trail(e, action="mapping-reload") if a.id > before], timeout=WAIT,
                         message="the mapping reload in the trail")[0]
        assert row.agent == started.agent and "hl7-patient" in (row.detail or "") and row.status == 200
        assert len([a for a in trail(e, action="mapping-reload") if a.id > before]) == 1
        # a broken edit is refused (the previous version kept): recorded as a failure
        before = last_id(e)
        path.write_text("source: hl7v2\nfields: [not a mapping\n")
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 2_000_000_000))
        row = wait_until(lambda: [a for a in trail(e, action="mapping-reload") if a.id > before], timeout=WAIT,
                         message="the refused reload in the trail")[0]
        assert row.status == 422 and "refused" in (row.detail or "") and "hl7-patient" in (row.detail or "")
    finally:
        e.stop()
    db = open_database(db_url)
    try:
        with db.read_session() as s:
            stops = list(s.execute(select(AuditEvent).where(AuditEvent.action == "stop")).scalars())
        assert [(a.agent, a.status) for a in stops] == [(started.agent, 200)]
    finally:
        db.dispose()


# --- reading and exports -------------------------------------------------------------------------

def valid_audit_event(resource: dict[str, Any]) -> dict[str, Any]:
    get_fhir_model_class("AuditEvent").model_validate(resource)
    return resource


def test_filters_and_exports_parse(running: RunningEngine) -> None:
    agent = api_agent(running)
    assert ack_code(send(running.mllp_port, adt("A04", "AUDX1", "Export", ctrl="AUDX1"))) == "AA"
    msg = message_id(running, "AUDX1")
    assert running.api(f"/api/messages/{msg.id}/reprocess", method="POST")[0] == 200
    assert running.api("/api/patients?identifier=AUDX1")[0] == 200
    # the API: who, patient (an identifier), since
    status, body = running.api(f"/api/audit?who={agent}&patient=AUDX1&since=1h")
    assert status == 200
    kinds = sorted(ev["action"] for ev in body["events"])
    assert kinds == ["reprocess", "search"], body
    assert all(ev["agent"] == agent and msg.patient_id in ev["patient_ids"] for ev in body["events"])
    assert running.api("/api/audit?who=nobody")[1]["events"] == []
    assert running.api("/api/audit?since=2999-01-01T00:00:00Z")[1]["events"] == []
    assert running.api("/api/audit?since=yesterday")[0] == 400
    # FHIR AuditEvent (IHE ATNA shape), validated with fhir.resources R4B
    status, bundle = running.api("/api/audit?format=fhir&patient=AUDX1")
    assert status == 200 and bundle["resourceType"] == "Bundle" and bundle["total"] == 2
    for entry in bundle["entry"]:
        ev = valid_audit_event(entry["resource"])
        assert ev["type"]["system"] == "http://dicom.nema.org/resources/ontology/DCM"
        [who] = ev["agent"]
        assert who["requestor"] is True and who["who"]["display"] == agent
        assert who["network"] == {"address": "127.0.0.1", "type": "2"}
        assert {"reference": f"Patient/{msg.patient_id}"} in [x["what"] for x in ev["entity"] if "what" in x]
    codes = {e["resource"]["type"]["code"] for e in bundle["entry"]}
    assert codes == {"110110", "110112"}  # Patient Record (reprocess), Query (search)
    # every kind of row exports as a valid AuditEvent: start (Application Activity) too
    status, bundle = running.api("/api/audit?format=fhir&action=start")
    [start] = [valid_audit_event(x["resource"]) for x in bundle["entry"]]
    assert start["type"]["code"] == "110100" and start["subtype"][0]["code"] == "110120"
    # syslog: RFC 5424 lines
    status, text = running.api(f"/api/audit?format=syslog&who={agent}")
    lines = text.splitlines()
    assert status == 200 and lines
    for line in lines:
        m = RFC5424.match(line)
        assert m, line
        assert int(m["pri"]) // 8 == 13 and m["app"] == "radbridge" and f'agent="{agent}"' in m["sd"]
    # the CLI: same filters, every format
    out = cli(running, "audit", "--since", "1h", "--patient", "AUDX1", "--format", "json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(r["action"] for r in rows) == ["reprocess", "search"]
    out = cli(running, "audit", "--who", agent, "--format", "syslog")
    assert out.returncode == 0 and out.stdout.strip()
    assert all(RFC5424.match(line) for line in out.stdout.splitlines()), out.stdout
    out = cli(running, "audit", "--patient", "AUDX1", "--format", "fhir")
    assert out.returncode == 0, out.stderr
    for entry in json.loads(out.stdout)["entry"]:
        valid_audit_event(entry["resource"])
    out = cli(running, "audit", "--patient", "AUDX1")
    assert out.returncode == 0 and "reprocess" in out.stdout and agent[:24] in out.stdout
    assert cli(running, "audit", "--since", "soon").returncode == 2
    # polling by id: the rows after the last one seen, oldest first, each once
    first = trail(running)[0].id
    polled = running.api(f"/api/audit?since_id={first}&limit=2")[1]["events"]
    assert [ev["id"] for ev in polled] == [a.id for a in trail(running)[1:3]]
    out = cli(running, "audit", "--since-id", str(polled[-1]["id"]), "--format", "json")
    assert [json.loads(line)["id"] for line in out.stdout.splitlines()] == [a.id for a in trail(running)[3:]]


def test_syslog_escapes_structured_data_values() -> None:
    from engine.store.audit import syslog_line
    event = {"id": 1, "at": utcnow().isoformat(), "agent": 'we"ird]na\\me', "remote": None, "cert_subject": "CN=a b",
             "action": "match", "resource_type": "Study", "query": None, "status": 409, "outcome": "failure",
             "count": 1, "patient_ids": [3, 4], "study_uid": "1.2.3", "message_id": None, "delivery_id": None,
             "detail": None}
    line = syslog_line(event, hostname="host name")
    m = RFC5424.match(line)
    assert m and m["pri"] == str(13 * 8 + 4) and m["hostname"] == "hostname" and m["msgid"] == "match"
    assert 'agent="we\\"ird\\]na\\\\me"' in m["sd"] and 'patient_ids="3,4"' in m["sd"]


# --- append-only, and retention ------------------------------------------------------------------

AUDIT_NAMES = {"AuditEvent", "AUDIT", "audit_events"}


def _names_audit(node: ast.AST) -> bool:
    return any((isinstance(n, ast.Name) and n.id in AUDIT_NAMES)
               or (isinstance(n, ast.Attribute) and n.attr in AUDIT_NAMES)
               or (isinstance(n, ast.Constant) and isinstance(n.value, str) and "audit_events" in n.value)
               for n in ast.walk(node))


def test_no_code_path_but_retention_updates_or_deletes_audit_rows() -> None:
    """Walk every engine module: an ``update(...)``/``delete(...)`` (SQLAlchemy), a ``.delete``/
    ``.update`` call, or SQL text with UPDATE/DELETE that names the audit table is allowed only in
    engine/store/retention.py (and only a delete there)."""
    offenders: list[str] = []
    sql = re.compile(r"\b(update|delete\s+from)\s+\"?audit_events", re.IGNORECASE)
    for path in sorted((REPO / "engine").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if "/migrations/" in rel:
            continue
        source = path.read_text()
        if sql.search(source):
            offenders.append(f"{rel}: SQL text changing audit_events")
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if name not in ("update", "delete", "bulk_update_mappings"):
                continue
            target = node.args[0] if node.args else fn.value if isinstance(fn, ast.Attribute) else None
            if target is not None and _names_audit(target):
                if rel == "engine/store/retention.py" and name == "delete":
                    continue
                offenders.append(f"{rel}:{node.lineno}: {name} on the audit table")
    assert offenders == []
    # and the walk does see the one allowed deletion (it would pass vacuously otherwise)
    assert "delete(AuditEvent)" in (REPO / "engine/store/retention.py").read_text()


def test_retention_keeps_the_trail_longer_than_messages(db_url: str) -> None:
    from engine.store import migrate
    db = open_database(db_url)
    try:
        migrate.upgrade(db)
        now = utcnow()
        with db.writer.begin() as conn:
            for days in (10, 400, 3000):  # a young row, one older than message metadata, one past audit_days
                conn.execute(insert(AUDIT).values(at=now - timedelta(days=days), agent=f"age{days}", action="read",
                                                  resource_type="Patient", status=200, count=0))
        policy = RetentionSettings(metadata_days=365, content_days=30, pause_seconds=0)
        assert policy.audit_days == 2190
        assert load_settings(None, env={"RADBRIDGE_RETENTION_AUDIT_DAYS": "3650"}).retention.audit_days == 3650
        report = prune(db, policy)
        assert report.audit_events == 1
        with db.read_session() as s:
            left = sorted(s.execute(select(AuditEvent.agent)).scalars())
        assert left == ["age10", "age400"]
    finally:
        db.dispose()
