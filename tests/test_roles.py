"""Roles (issue 15 item 2): every HTTP route x every role, and no, a wrong and a revoked token, is
allowed or refused (401 / 403 naming the role), nothing else; ``radbridge tokens`` on a real engine;
secrets stored only as SHA-256. Real HTTP to a running engine, SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import html
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import select

from engine.config import Settings
from engine.store import tokens
from engine.store.db import open_database
from engine.store.migrate import upgrade
from engine.store.models import ApiToken, AuditEvent
from engine.store.tokens import Role
from engine.web.auth import is_console_path
from engine.web.roles import requires, route_table, undeclared_routes
from tests.conftest import TOKEN, RunningEngine
from tests.fhirutil import patient
from tests.test_cli import radbridge

MRN = "urn:oid:1.2.36.146.595.217.0.1"
FORM = "application/x-www-form-urlencoded"
FHIR_JSON = "application/fhir+json"

# the tokens of the matrix: one per role, one with two roles; the configured TOKEN holds every role
ROLE_TOKENS: dict[str, frozenset[Role]] = {
    **{f"only-{r.value}": frozenset({r}) for r in Role},
    "reader-operator": frozenset({Role.READ, Role.OPERATE}),
}


@dataclass(frozen=True)
class Call:
    """One request exercising one route, and the role that route declares (None: public)."""

    method: str
    path: str
    route: str  # the route's canonical path, as the router lists it
    role: Role | None
    body: Any = None
    ctype: str = "application/json"
    answers_401: bool = False  # the handler's own answer is 401 (a login form told a wrong token)

    def data(self) -> bytes | None:
        if self.body is None:
            return None
        return self.body.encode() if isinstance(self.body, str) else json.dumps(self.body).encode()


def _txn(resource: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [{"fullUrl": "urn:uuid:5b2a1f3c-0c1e-4a7e-9d55-7f0b8f6c0a11", "resource": resource,
                       "request": {"method": "POST", "url": "Patient"}}]}


CALLS = [
    Call("GET", "/health", "/health", None),
    # the console (HTML): no token is a redirect to the login form, a missing role a 403 page naming it
    Call("GET", "/login", "/login", None),
    Call("POST", "/login", "/login", None, "token=rb_nothing", FORM, answers_401=True),
    Call("POST", "/logout", "/logout", None, "", FORM),
    Call("GET", "/static/console.css", "/static/{name}", None),
    Call("GET", "/favicon.ico", "/favicon.ico", None),
    Call("GET", "/", "/", Role.READ),
    Call("GET", "/overview/live", "/overview/live", Role.READ),
    Call("GET", "/deliveries?state=dead", "/deliveries", Role.READ),
    Call("GET", "/deliveries/999999", "/deliveries/{id}", Role.READ),
    Call("GET", "/deliveries/999999/live", "/deliveries/{id}/live", Role.READ),
    Call("POST", "/deliveries/999999/retry", "/deliveries/{id}/retry", Role.OPERATE, "rebuild=1", FORM),
    Call("POST", "/deliveries/retry", "/deliveries/retry", Role.OPERATE, "destination=nowhere", FORM),
    Call("POST", "/deliveries/999999/discard", "/deliveries/{id}/discard", Role.OPERATE, "note=not+needed", FORM),
    Call("GET", "/messages/999999", "/messages/{id}", Role.READ),
    Call("POST", "/messages/999999/reprocess", "/messages/{id}/reprocess", Role.OPERATE, "", FORM),
    Call("GET", "/mappings", "/mappings", Role.READ),
    Call("GET", "/mappings/hl7-patient.yaml", "/mappings/{name}", Role.READ),
    Call("GET", "/mappings/channels/hl7-inbound.yaml", "/mappings/channels/{name}", Role.READ),
    Call("POST", "/mappings/hl7-patient.yaml", "/mappings/{name}", Role.ADMIN, "text=source%3A+nothing%0A", FORM),
    Call("GET", "/mappings/hl7-patient.yaml/edit", "/mappings/{name}/edit", Role.ADMIN),
    Call("GET", "/mappings/try", "/mappings/try", Role.READ),
    Call("POST", "/mappings/try", "/mappings/try", Role.READ, "mapping=hl7-patient&sample=MSH", FORM),
    Call("GET", "/patients?identifier=RM1", "/patients", Role.READ),
    Call("GET", "/patients/1", "/patients/{id}", Role.READ),
    Call("GET", "/orders?accession=NOPE", "/orders", Role.READ),
    Call("GET", "/orders/1", "/orders/{id}", Role.READ),
    Call("GET", "/studies?reconciliation=exceptions", "/studies", Role.READ),
    Call("GET", "/studies/1.2.3.999", "/studies/{uid}", Role.READ),
    Call("GET", "/studies/1.2.3.999/series/1.2.3.998/thumbnail.png", "/studies/{uid}/series/{series}/thumbnail.png",
         Role.READ),
    Call("POST", "/studies/1.2.3.999/match", "/studies/{uid}/match", Role.OPERATE, "accession=NOPE", FORM),
    Call("POST", "/studies/1.2.3.999/unmatch", "/studies/{uid}/unmatch", Role.OPERATE, "", FORM),
    Call("POST", "/studies/1.2.3.999/reconcile", "/studies/{uid}/reconcile", Role.OPERATE, "", FORM),
    Call("POST", "/studies/1.2.3.999/findings/999999/accept", "/studies/{uid}/findings/{id}/accept", Role.OPERATE,
         "", FORM),
    Call("GET", "/overview/chart", "/overview/chart", Role.READ),
    Call("GET", "/messages?status=error", "/messages", Role.READ),
    Call("GET", "/metrics", "/metrics", Role.METRICS),
    # admin API
    Call("GET", "/api/audit", "/api/audit", Role.READ),
    Call("GET", "/api/patients?identifier=RM1", "/api/patients", Role.READ),
    Call("GET", "/api/patients/1", "/api/patients/{id}", Role.READ),
    Call("GET", "/api/orders?accession=NOPE", "/api/orders", Role.READ),
    Call("GET", "/api/messages", "/api/messages", Role.READ),
    Call("GET", "/api/messages/1", "/api/messages/{id}", Role.READ),
    Call("POST", "/api/messages/999999/reprocess", "/api/messages/{id}/reprocess", Role.OPERATE),
    Call("GET", "/api/studies?accession=NOPE", "/api/studies", Role.READ),
    Call("POST", "/api/studies/1.2.3.999/match", "/api/studies/{ref}/match", Role.OPERATE, {"accession": "NOPE"}),
    Call("DELETE", "/api/studies/1.2.3.999/match", "/api/studies/{ref}/match", Role.OPERATE),
    Call("POST", "/api/studies/1.2.3.999/reconcile", "/api/studies/{ref}/reconcile", Role.OPERATE),
    Call("POST", "/api/findings/999999/accept", "/api/findings/{id}/accept", Role.OPERATE, {}),
    Call("GET", "/api/channels", "/api/channels", Role.READ),
    Call("GET", "/api/storage/cleanup", "/api/storage/cleanup", Role.READ),
    Call("GET", "/api/tokens", "/api/tokens", Role.ADMIN),
    Call("GET", "/api/deliveries", "/api/deliveries", Role.READ),
    Call("GET", "/api/deliveries/999999", "/api/deliveries/{id}", Role.READ),
    Call("POST", "/api/deliveries/999999/retry", "/api/deliveries/{id}/retry", Role.OPERATE),
    Call("POST", "/api/deliveries/retry", "/api/deliveries/retry", Role.OPERATE, {"state": "dead"}),
    Call("POST", "/api/deliveries/999999/discard", "/api/deliveries/{id}/discard", Role.OPERATE),
    # FHIR
    Call("GET", "/fhir/metadata", "/fhir/metadata", None),
    Call("POST", "/fhir/", "/fhir/", Role.FHIR_WRITE, _txn(patient("RM4")), FHIR_JSON),
    Call("POST", "/fhir", "/fhir", Role.FHIR_WRITE, _txn(patient("RM5")), FHIR_JSON),
    Call("POST", "/fhir/Patient/_search", "/fhir/{type}/_search", Role.READ, f"identifier={MRN}|RM1", FORM),
    Call("POST", "/fhir/Patient", "/fhir/{type}", Role.FHIR_WRITE, patient("RM1"), FHIR_JSON),
    Call("PUT", "/fhir/Patient/1", "/fhir/{type}/{id}", Role.FHIR_WRITE, patient("RM1", id="1"), FHIR_JSON),
    Call("PUT", f"/fhir/Patient?identifier={MRN}|RM3", "/fhir/{type}", Role.FHIR_WRITE, patient("RM3"), FHIR_JSON),
    Call("GET", "/fhir/Patient/1/_history/1", "/fhir/{type}/{id}/_history/{vid}", Role.READ),
    Call("GET", "/fhir/Patient/1", "/fhir/{type}/{id}", Role.READ),
    Call("GET", f"/fhir/Patient?identifier={MRN}|RM1", "/fhir/{type}", Role.READ),
    Call("DELETE", "/fhir/Patient/1", "/fhir/{tail}", Role.FHIR_WRITE),
    Call("PATCH", "/fhir/Patient/1", "/fhir/{tail}", Role.FHIR_WRITE, {}, "application/json-patch+json"),
    # DICOMweb (JSON refusals; answers about studies that are not there are 404s)
    Call("GET", "/dicomweb/studies?PatientID=RM1",
         "/dicomweb/studies", Role.READ),
    Call("GET", "/dicomweb/series?Modality=CT",
         "/dicomweb/series", Role.READ),
    Call("GET", "/dicomweb/instances?SOPInstanceUID=1.2.3.997",
         "/dicomweb/instances", Role.READ),
    Call("GET", "/dicomweb/studies/1.2.3.999/series",
         "/dicomweb/studies/{study}/series", Role.READ),
    Call("GET", "/dicomweb/studies/1.2.3.999/instances",
         "/dicomweb/studies/{study}/instances", Role.READ),
    Call("GET", "/dicomweb/studies/1.2.3.999/series/1.2.3.998/instances",
         "/dicomweb/studies/{study}/series/{series}/instances", Role.READ),
    Call("GET", "/dicomweb/studies/1.2.3.999",
         "/dicomweb/studies/{study}", Role.READ),
    Call("GET", "/dicomweb/studies/1.2.3.999/series/1.2.3.998",
         "/dicomweb/studies/{study}/series/{series}", Role.READ),
    Call("GET", "/dicomweb/studies/1.2.3.999/series/1.2.3.998/instances/1.2.3.997",
         "/dicomweb/studies/{study}/series/{series}/instances/{sop}", Role.READ),
    Call("GET", "/dicomweb/studies/1.2.3.999/metadata",
         "/dicomweb/studies/{study}/metadata", Role.READ),
    Call("GET", "/dicomweb/studies/1.2.3.999/series/1.2.3.998/metadata",
         "/dicomweb/studies/{study}/series/{series}/metadata", Role.READ),
    Call("GET", "/dicomweb/studies/1.2.3.999/series/1.2.3.998/instances/1.2.3.997/metadata",
         "/dicomweb/studies/{study}/series/{series}/instances/{sop}/metadata", Role.READ),
    Call("GET", "/dicomweb/studies/1.2.3.999/series/1.2.3.998/instances/1.2.3.997/bulkdata/7FE00010",
         "/dicomweb/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}", Role.READ),
    Call("GET", "/dicomweb/studies/1.2.3.999/series/1.2.3.998/instances/1.2.3.997/frames/1",
         "/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/{frames}", Role.READ),
    Call("GET", "/dicomweb/studies/1.2.3.999/series/1.2.3.998/instances/1.2.3.997/rendered",
         "/dicomweb/studies/{study}/series/{series}/instances/{sop}/rendered", Role.READ),
    Call("GET", "/dicomweb/studies/1.2.3.999/series/1.2.3.998/instances/1.2.3.997/frames/1/rendered",
         "/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/{frame}/rendered", Role.READ),
    # STOW-RS: an empty multipart body (400 for a token with the role: nothing is stored)
    Call("POST", "/dicomweb/studies", "/dicomweb/studies", Role.STORE, "--b--\r\n",
         'multipart/related; type="application/dicom"; boundary=b'),
    Call("POST", "/dicomweb/studies/1.2.3.999", "/dicomweb/studies/{study}", Role.STORE, "--b--\r\n",
         'multipart/related; type="application/dicom"; boundary=b'),
]


@dataclass
class Answer:
    status: int
    body: Any
    location: str | None = None  # of a redirect


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect is an answer of its own here (the console's way of saying "log in")


NO_REDIRECT = urllib.request.build_opener(_NoRedirect)


def request(eng: RunningEngine, call: Call, token: str | None) -> Answer:
    url = f"http://127.0.0.1:{eng.engine.http_port}{urllib.parse.quote(call.path, safe='/?=&|:')}"
    req = urllib.request.Request(url, data=call.data(), method=call.method)
    if call.body is not None:
        req.add_header("Content-Type", call.ctype)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with NO_REDIRECT.open(req, timeout=30) as resp:
            status, ctype, raw, location = resp.status, resp.headers.get("Content-Type", ""), resp.read(), None
    except urllib.error.HTTPError as exc:
        status, ctype, raw = exc.code, exc.headers.get("Content-Type", ""), exc.read()
        location = exc.headers.get("Location")
    return Answer(status, json.loads(raw) if raw and "json" in ctype else raw.decode(), location)


def create_tokens(settings: Settings, names: dict[str, frozenset[Role]], revoked: tuple[str, ...] = ()) -> dict[str, str]:
    """Named tokens straight in the store (as `radbridge tokens create` makes them); their secrets."""
    db = open_database(settings.database_url)
    try:
        upgrade(db)
        with db.writer.begin() as conn:
            secrets = {name: tokens.create(conn, name, roles) for name, roles in names.items()}
            for name in revoked:
                tokens.revoke(conn, name)
    finally:
        db.dispose()
    return secrets


@pytest.fixture
def matrix(settings: Settings) -> Iterator[tuple[RunningEngine, dict[str, str]]]:
    secrets = create_tokens(settings, {**ROLE_TOKENS, "retired": frozenset(Role)}, revoked=("retired",))
    eng = RunningEngine(settings).start()
    try:
        yield eng, secrets
    finally:
        eng.stop()


def refusal(call: Call, answer: Answer, status: int, role: Role | None) -> str | None:
    """Why ``answer`` is not the refusal expected (None when it is)."""
    if is_console_path(call.path):  # the console: to the login form, or a page naming the role
        if status == 401:
            return None if answer.status == 303 and (answer.location or "").startswith("/login?next=") \
                else f"status {answer.status} to {answer.location}, expected 303 to the login form"
        if answer.status != 403 or role is None or f"'{role.value}'" not in html.unescape(answer.body):
            return f"status {answer.status}, expected a 403 page naming {role}: {answer.body!r}"[:300]
        return None
    if answer.status != status:
        return f"status {answer.status}, expected {status}"
    body = answer.body
    if call.path.startswith("/fhir"):
        if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
            return f"not an OperationOutcome: {body!r}"
        code = body["issue"][0]["code"]
        if code != ("forbidden" if status == 403 else "login"):
            return f"issue code {code}"
        text = body["issue"][0]["diagnostics"]
    else:
        if not isinstance(body, dict) or body.get("error") != ("forbidden" if status == 403 else "unauthorized"):
            return f"not a JSON error: {body!r}"
        if role is not None and body.get("missing_role") != role.value:
            return f"missing_role is {body.get('missing_role')!r}"
        text = body["detail"]
    if role is not None and f"'{role.value}'" not in text:
        return f"the refusal does not name the role: {text}"
    return None


def test_every_route_and_role_is_allowed_or_refused_nothing_else(matrix: tuple[RunningEngine, dict[str, str]]) -> None:
    eng, secrets = matrix
    assert eng.engine.http_runner is not None
    served = {(m, p) for m, p, _h in route_table(eng.engine.http_runner.app) if m != "HEAD"}
    assert served == {(c.method, c.route) for c in CALLS}  # a new route needs its row here
    principals: dict[str, tuple[str | None, frozenset[Role]]] = {
        **{name: (secrets[name], roles) for name, roles in ROLE_TOKENS.items()},
        "configured": (TOKEN, frozenset(Role)), "none": (None, frozenset()), "wrong": ("rb_wrong", frozenset()),
        "revoked": (secrets["retired"], frozenset())}
    wrong: list[str] = []
    for call in CALLS:
        for who, (secret, roles) in principals.items():
            answer = request(eng, call, secret)
            where = f"{call.method} {call.path} as {who}"
            if call.role is None or call.role in roles:  # the handler answers: anything but a refusal or a crash
                if answer.status in (401, 403) and not (call.answers_401 and answer.status == 401) \
                        or answer.status >= 500:
                    wrong.append(f"{where}: {answer.status} {answer.body!r}"[:300])
            elif (why := refusal(call, answer, 401 if secret in (None, "rb_wrong", secrets["retired"]) else 403,
                                 call.role if secret not in (None, "rb_wrong", secrets["retired"]) else None)):
                wrong.append(f"{where}: {why}"[:300])
    assert wrong == []
    # an unknown path answers 404 only to a valid token: without one, nothing says what exists
    unknown = Call("GET", "/api/no-such-thing", "", Role.READ)
    assert request(eng, unknown, None).status == 401 and request(eng, unknown, secrets["only-metrics"]).status == 404


def test_the_audit_trail_names_the_token_and_write_only_tokens_get_no_patient_data(
        matrix: tuple[RunningEngine, dict[str, str]]) -> None:
    eng, secrets = matrix
    created = request(eng, Call("POST", "/fhir/Patient", "", Role.FHIR_WRITE, patient("WO1"), FHIR_JSON),
                      secrets["only-fhir-write"])
    assert created.status == 201 and created.body["resourceType"] == "OperationOutcome"  # not the Patient
    again = request(eng, Call("POST", "/fhir/Patient", "", Role.FHIR_WRITE, patient("WO2"), FHIR_JSON), TOKEN)
    assert again.status == 201 and again.body["resourceType"] == "Patient"
    found = request(eng, Call("GET", f"/fhir/Patient?identifier={MRN}|WO1", "", Role.READ), secrets["only-read"])
    assert found.status == 200 and found.body["total"] == 1
    trail = request(eng, Call("GET", "/api/audit?agent=only-read", "", Role.READ), secrets["only-read"]).body
    assert [(e["agent"], e["resource_type"]) for e in trail["events"]] == [("only-read", "Patient")]
    configured = tokens.config_token_name(TOKEN)
    assert configured.startswith("config:") and TOKEN not in configured
    trail = request(eng, Call("GET", f"/api/audit?agent={configured}", "", Role.READ), TOKEN).body
    assert trail["events"] and all(e["agent"] == configured for e in trail["events"])
    with eng.db.read_session() as s:  # the last use is recorded, for the tokens used only
        used = {t.name: t.last_used_at for t in s.execute(select(ApiToken)).scalars()}
    assert used["only-read"] is not None and used["only-fhir-write"] is not None and used["only-admin"] is None


def test_tokens_cli_create_list_revoke_with_a_running_engine(running: RunningEngine) -> None:
    env = {"RADBRIDGE_DATABASE_URL": running.settings.database_url,
           "RADBRIDGE_CHANNELS_DIR": running.settings.channels_dir,
           "RADBRIDGE_MAPPINGS_DIR": running.settings.mappings_dir}
    out = radbridge("tokens", "create", "pacs-dashboard", "--role", "read", "--role", "metrics", env=env)
    assert out.returncode == 0, out.stderr
    secret = out.stdout.strip()
    assert len(secret.splitlines()) == 1 and len(secret) > 40 and "shown this once" in out.stderr
    metrics, channels = Call("GET", "/metrics", "", Role.METRICS), Call("GET", "/api/channels", "", Role.READ)
    retry = Call("POST", "/api/deliveries/999999/retry", "", Role.OPERATE)
    assert request(running, metrics, secret).status == 200 and request(running, channels, secret).status == 200
    assert request(running, retry, secret).body["missing_role"] == "operate"
    # the secret is printed once and not kept: the store holds its SHA-256 only
    with running.db.read_session() as s:
        row = s.execute(select(ApiToken).where(ApiToken.name == "pacs-dashboard")).scalar_one()
        assert row.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest() and row.roles == "metrics,read"
        with s.connection().exec_driver_sql("SELECT * FROM api_tokens") as every:
            assert not any(secret in str(v) for r in every for v in r)
    listed = radbridge("tokens", "list", env={**env, "RADBRIDGE_API_TOKEN": "cli-config-token"})
    assert listed.returncode == 0 and secret not in listed.stdout and "cli-config-token" not in listed.stdout
    assert f"{tokens.config_token_name('cli-config-token')} " in listed.stdout  # configured ones are named too
    line = next(x for x in listed.stdout.splitlines() if x.startswith("pacs-dashboard"))
    assert "metrics,read" in line and "active" in line and "last used never" not in line
    # names are unique, roles are known, and a token without roles is refused
    assert radbridge("tokens", "create", "pacs-dashboard", "--role", "read", env=env).returncode == 1
    bad = radbridge("tokens", "create", "x", "--role", "root", env=env)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    assert radbridge("tokens", "create", "generated", "--role", "read", env=env).returncode == 1
    # revoked: refused at once by the running engine, still listed, its name not reused
    out = radbridge("tokens", "revoke", "pacs-dashboard", env=env)
    assert out.returncode == 0 and "revoked" in out.stdout
    assert request(running, metrics, secret).status == 401
    line = next(x for x in radbridge("tokens", "list", env=env).stdout.splitlines() if x.startswith("pacs-dashboard"))
    assert "revoked 20" in line
    again = radbridge("tokens", "create", "pacs-dashboard", "--role", "read", env=env)
    assert again.returncode == 1 and "not reused" in again.stderr
    assert radbridge("tokens", "revoke", "nobody", env=env).returncode == 1
    # each change, and each refusal, is one row of the audit trail, by the operator who ran it
    with running.db.read_session() as s:
        trail = s.execute(select(AuditEvent.action, AuditEvent.agent, AuditEvent.status, AuditEvent.detail)
                          .where(AuditEvent.action.in_(["token-create", "token-revoke"]))
                          .order_by(AuditEvent.id)).all()
    assert [(a, st) for a, _who, st, _d in trail] == [
        ("token-create", 200), ("token-create", 400), ("token-create", 400), ("token-revoke", 200),
        ("token-create", 400), ("token-revoke", 400)]
    assert all(who.startswith("cli:") for _a, who, _st, _d in trail)
    assert trail[0][3] == "pacs-dashboard (metrics, read)" and not any(secret in (d or "") for *_x, d in trail)


def test_the_generated_token_holds_every_role_until_named_tokens_exist(settings: Settings) -> None:
    settings.http.tokens = []
    eng = RunningEngine(settings).start()
    try:
        secret = (Path(eng.settings.storage.dir) / "api-token").read_text().strip()
        assert request(eng, Call("GET", "/metrics", "", Role.METRICS), secret).status == 200
        assert request(eng, Call("GET", "/api/tokens", "", Role.ADMIN), secret).status == 200
    finally:
        eng.stop()
    named = create_tokens(settings, {"ops": frozenset({Role.OPERATE})})
    eng = RunningEngine(settings).start()
    try:  # once named tokens exist the generated one is retired: it held every role
        assert request(eng, Call("GET", "/metrics", "", Role.METRICS), secret).status == 401
        assert request(eng, Call("GET", "/metrics", "", Role.METRICS), named["ops"]).status == 403
    finally:
        eng.stop()


async def _declared(request: web.Request) -> web.Response:
    return web.Response()


async def _forgotten(request: web.Request) -> web.Response:
    return web.Response()


async def _nested(request: web.Request) -> web.Response:
    return web.Response()


def test_a_route_without_a_declared_role_is_refused_at_build_time() -> None:
    routes = web.RouteTableDef()
    routes.get("/declared")(requires(Role.READ)(_declared))
    routes.get("/forgotten")(_forgotten)
    app = web.Application()
    app.add_routes(routes)
    sub = web.Application()
    sub.router.add_post("/nested", _nested)
    app.add_subapp("/sub/", sub)
    missing = undeclared_routes(app)
    assert [m.split(" (")[0] for m in missing if not m.startswith("HEAD")] == ["GET /forgotten", "POST /sub/nested"]


def test_a_token_store_failure_answers_503_and_configured_tokens_need_no_database(
        matrix: tuple[RunningEngine, dict[str, str]]) -> None:
    eng, secrets = matrix
    with eng.db.writer.begin() as conn:  # the named tokens become unreadable (a real database error)
        conn.exec_driver_sql("DROP TABLE api_tokens")
    metrics = Call("GET", "/metrics", "", Role.METRICS)
    refused = request(eng, metrics, secrets["only-metrics"])
    assert refused.status == 503 and refused.body["error"] == "unavailable" and "SELECT" not in str(refused.body)
    fhir = request(eng, Call("GET", f"/fhir/Patient?identifier={MRN}|X", "", Role.READ), secrets["only-read"])
    assert fhir.status == 503 and fhir.body["issue"][0]["code"] == "transient"
    assert request(eng, metrics, TOKEN).status == 200  # checked without the database
