#!/usr/bin/env python3
"""FHIR ingest benchmark: Patient + ServiceRequest transaction Bundles posted to the engine's FHIR
endpoint over keep-alive connections, against a minimal durable baseline measured in the same run.

Run on demand (it is not a test). Each scenario gets a fresh database in a temp directory and its own
server process, so the client in this process never shares a GIL with the server:

* baseline: a minimal aiohttp server (in this file, run as ``--baseline-server``) answering
  ``POST /fhir/``: bearer token checked, body parsed as JSON (a transaction Bundle), the raw body
  inserted into one table and committed (SQLite WAL with ``synchronous=FULL``, or the server's
  ``synchronous_commit`` on PostgreSQL), then a template transaction-response (``201 Created`` per
  entry). Commits are grouped as the engine's writer groups them (on SQLite inline on the event loop,
  on PostgreSQL in one writer thread); ``--baseline-commit each`` commits every request on its own.
* engine: ``python -m engine.cli run`` (what ``radbridge run`` runs) on a fresh database with free
  ports on 127.0.0.1, the repository's ``channels/`` and ``mappings/``, everything else at its
  defaults (fsync on), fed the same bundles.

Every bundle holds a Patient (conditional create: ``ifNoneExist`` on its MRN) and a ServiceRequest
for it (a unique accession and placer number, ``subject`` the Patient's ``urn:uuid:``): two resources.
About ``--reuse`` (20 %) of the bundles name the MRN of a patient sent at least 200 bundles earlier
(or in the warm-up), so the engine must answer ``200 OK`` for those Patients and ``201 Created`` for
the rest. The client is one aiohttp ``ClientSession`` with ``TCPConnector(limit=connections)`` and as
many workers pulling bundles from one queue: one request in flight per connection. Every response must
be 200 with a transaction-response Bundle whose entries answer 201 (or 200 for a matched Patient) with
a location of the right type; anything else is counted as failed and the first bodies are printed.
After each engine run 20 sampled accessions are looked up through the admin API (``/api/orders``,
``/api/patients``), and after it stopped its database is counted (patients, orders).

Usage:
    python bench/fhir_ingest.py                                 # 2,000 bundles over 8 connections, SQLite
    python bench/fhir_ingest.py --bundles 500 --repeat 3        # medians of three baseline/engine pairs
    python bench/fhir_ingest.py --db postgresql                 # throwaway PostgreSQL databases
    python bench/fhir_ingest.py --no-baseline --bundles 50      # the engine alone, a quick check
    python bench/fhir_ingest.py --baseline-only --bundles 500   # the rig alone, without the engine
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import math
import os
import queue
import random
import re
import signal
import sqlite3
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from benchutil import describe_source, json_option, mib, proc_status, write_figures
from mllp_ingest import HOST, ServerProcess, Workspace, engine_env, proc_cpu_seconds

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("RADBRIDGE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
FHIR_JSON = "application/fhir+json"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
MRN_SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"
ACSN_SYSTEM = "urn:oid:1.2.3.4.5"
PLAC_SYSTEM = "urn:oid:1.2.3.4.6"
REUSE_DISTANCE = 200  # a reused MRN is one sent at least this many bundles earlier (surely committed by then)
SAMPLE_CHECKS = 20  # accessions looked up through the admin API after each engine run
BASELINE_TOKEN = "bench"  # the baseline's token; the engine's is engine_env's RADBRIDGE_API_TOKEN

# =====================================================================================================
# Bundles
# =====================================================================================================

FAMILY = ("Smith", "Johnson", "Williams", "Brown", "Jones", "García", "Miller", "Davis", "Rodríguez",
          "Martinez", "Hernández", "Lopez", "Wilson", "Anderson", "Taylor", "Müller", "O'Brien", "Nguyễn",
          "Kowalski", "Østergaard", "Smith-Jones", "Walker", "Lee", "Pérez")
GIVEN_M = ("James", "John", "Robert", "Michael", "David", "José", "Thomas", "Daniel", "Łukasz", "Jürgen",
           "Kenji", "Omar")
GIVEN_F = ("Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Susan", "Zoë", "Sarah", "Chloé", "Aoife",
           "Emily", "Ana")


@dataclass(frozen=True)
class BundleSpec:
    index: int
    mrn: str
    accession: str
    reused: bool  # the MRN was sent before (and committed): the Patient's ifNoneExist should match
    body: bytes


def patient_resource(mrn: str) -> dict[str, Any]:
    """The same demographics every time an MRN is sent (seeded by the MRN)."""
    rng = random.Random(mrn)
    male = rng.random() < 0.5
    given = [rng.choice(GIVEN_M if male else GIVEN_F)]
    if rng.random() < 0.3:
        given.append(rng.choice(GIVEN_M if male else GIVEN_F))
    return {
        "resourceType": "Patient",
        "identifier": [{"use": "usual", "type": {"coding": [{"system": V2_0203, "code": "MR"}]},
                        "system": MRN_SYSTEM, "value": mrn}],
        "name": [{"family": rng.choice(FAMILY), "given": given}],
        "gender": "male" if male else "female",
        "birthDate": f"{rng.randrange(1925, 2020)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}",
    }


def bundle_body(mrn: str, accession: str, placer: str) -> bytes:
    patient_ref = f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": patient_ref,
             "resource": patient_resource(mrn),
             "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={MRN_SYSTEM}|{mrn}"}},
            {"resource": {
                "resourceType": "ServiceRequest",
                "status": "active",
                "intent": "order",
                "identifier": [
                    {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "system": ACSN_SYSTEM,
                     "value": accession},
                    {"type": {"coding": [{"system": V2_0203, "code": "PLAC"}]}, "system": PLAC_SYSTEM,
                     "value": placer}],
                "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "Chest CT"}],
                         "text": "Chest CT"},
                "subject": {"reference": patient_ref},
                "occurrenceDateTime": "2026-11-23T09:30:00+01:00",
                "priority": "routine"},
             "request": {"method": "POST", "url": "ServiceRequest"}},
        ],
    }
    return json.dumps(bundle, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def make_bundles(tag: str, count: int, reuse: float, committed: Sequence[str] = ()) -> list[BundleSpec]:
    """``count`` bundles; about ``reuse`` of them name an MRN from ``committed`` or one sent at least
    REUSE_DISTANCE bundles earlier in this set, the rest a new patient. Accessions are all new."""
    rng = random.Random(f"bundles-{tag}")
    pool = list(committed)  # MRNs a bundle may reuse
    fresh: list[tuple[int, str]] = []  # (bundle index, MRN) of the new patients in this set
    ready = 0  # fresh[:ready] are in the pool
    out = []
    for i in range(count):
        while ready < len(fresh) and fresh[ready][0] <= i - REUSE_DISTANCE:
            pool.append(fresh[ready][1])
            ready += 1
        reused = bool(pool) and rng.random() < reuse
        if reused:
            mrn = rng.choice(pool)
        else:
            mrn = f"{tag}M{len(fresh):07d}"
            fresh.append((i, mrn))
        acc = f"{tag}A{i:07d}"
        out.append(BundleSpec(i, mrn, acc, reused, bundle_body(mrn, acc, f"{tag}P{i:07d}")))
    return out


# =====================================================================================================
# Client: one ClientSession, N keep-alive connections, one request in flight on each
# =====================================================================================================

@dataclass
class LoadResult:
    sent: int = 0  # requests answered (any status) or failed on the wire
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # sorted, seconds, every answered request
    http: Counter[str] = field(default_factory=Counter)  # HTTP status (or client error) -> requests
    entries: Counter[str] = field(default_factory=Counter)  # "Patient 201 Created" -> entries
    failed: int = 0
    failures: list[str] = field(default_factory=list)  # the first few, with the response body
    conditional: Counter[str] = field(default_factory=Counter)  # conditional creates answered otherwise
    ok: list[BundleSpec] = field(default_factory=list)
    client_cpu: float = 0.0
    timed_out: bool = False

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return math.nan
        idx = min(len(self.latencies) - 1, max(0, math.ceil(p / 100 * len(self.latencies)) - 1))
        return self.latencies[idx] * 1000


def check_response(b: BundleSpec, status: int, raw: bytes, res: LoadResult, conditional: bool) -> str | None:
    """None when the transaction-response is what the bundle must get, else what is wrong."""
    res.http[str(status)] += 1
    if status != 200:
        return f"HTTP {status}"
    try:
        data = json.loads(raw)
    except ValueError:
        return "response is not JSON"
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle" or data.get("type") != "transaction-response":
        return "response is not a transaction-response Bundle"
    entries = data.get("entry")
    if not isinstance(entries, list) or len(entries) != 2:
        return f"transaction-response has {len(entries) if isinstance(entries, list) else 'no'} entries, not 2"
    problems = []
    for kind, e in zip(("Patient", "ServiceRequest"), entries, strict=True):
        r = e.get("response") if isinstance(e, dict) else None
        st = str(r.get("status", "")) if isinstance(r, dict) else ""
        loc = str(r.get("location", "")) if isinstance(r, dict) else ""
        res.entries[f"{kind} {st or '(no status)'}"] += 1
        code = st.split(" ", 1)[0]
        if code not in (("200", "201") if kind == "Patient" else ("201",)):
            problems.append(f"{kind} answered {st!r}")
        elif not loc.startswith(f"{kind}/"):
            problems.append(f"{kind} location {loc!r}")
        elif kind == "Patient" and conditional:
            if code == "200" and not b.reused:
                res.conditional["new MRN matched an existing Patient (200)"] += 1
                problems.append("new MRN answered 200")
            elif code == "201" and b.reused:
                res.conditional["known MRN created again (201)"] += 1
                problems.append("known MRN answered 201")
    return "; ".join(problems) or None


async def send_all(session: aiohttp.ClientSession, url: str, token: str, bundles: Sequence[BundleSpec],
                   connections: int, deadline: float, conditional: bool) -> LoadResult:
    """POST every bundle; ``connections`` workers take them from one queue in order."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    todo: asyncio.Queue[BundleSpec] = asyncio.Queue()
    for b in bundles:
        todo.put_nowait(b)
    res = LoadResult()
    lat: list[float] = []
    clock = time.perf_counter

    def fail(b: BundleSpec, problem: str, body: bytes = b"") -> None:
        res.failed += 1
        if len(res.failures) < 5:
            text = body[:600].decode("utf-8", errors="replace")
            res.failures.append(f"bundle {b.index} (accession {b.accession}): {problem}{': ' + text if text else ''}")

    async def worker() -> None:
        while True:
            try:
                b = todo.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = clock()
            try:
                async with session.post(url, data=b.body, headers=headers) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                res.sent += 1
                res.http[f"client error {type(exc).__name__}"] += 1
                fail(b, f"{type(exc).__name__}: {exc}")
                continue
            lat.append(clock() - t0)
            res.sent += 1
            problem = check_response(b, status, raw, res, conditional)
            if problem is None:
                res.ok.append(b)
            else:
                fail(b, problem, raw)

    cpu0 = time.process_time()
    t_start = clock()
    tasks = [asyncio.create_task(worker()) for _ in range(min(connections, len(bundles)))]
    if tasks:
        _done, pending = await asyncio.wait(tasks, timeout=deadline)
        for t in pending:
            t.cancel()
        if pending:
            res.timed_out = True
            await asyncio.gather(*pending, return_exceptions=True)
        for t in tasks:
            exc = None if t.cancelled() else t.exception()
            if exc is not None:
                raise exc
    res.seconds = clock() - t_start
    res.client_cpu = time.process_time() - cpu0
    res.latencies = sorted(lat)
    return res


class EndpointMissing(RuntimeError):
    """Every warm-up bundle failed: the server does not take FHIR transactions (yet)."""


@dataclass
class Scenario:
    kind: str  # baseline | engine
    backend: str  # sqlite | postgresql
    run: int
    result: LoadResult = field(default_factory=LoadResult)
    warm: LoadResult = field(default_factory=LoadResult)
    new_connections: int = 0  # opened during the timed part (all should have been opened in the warm-up)
    warm_connections: int = 0
    server_cpu: float = 0.0
    hwm_kb: int = 0
    verified: str = ""
    counted: str = ""
    check_failed: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.backend}"

    @property
    def resources_per_s(self) -> float:
        return 2 * self.result.rate

    @property
    def failed(self) -> bool:
        r = self.result
        return bool(r.failed or r.timed_out or self.check_failed or not r.sent)


async def verify_sample(session: aiohttp.ClientSession, base: str, token: str, ok: Sequence[BundleSpec],
                        n: int) -> tuple[str, bool]:
    """Look up ``n`` accessions (half of them from bundles with a reused MRN) through the admin API:
    one order each, linked to the one patient that carries the bundle's MRN."""
    rng = random.Random(4711)
    reused = [b for b in ok if b.reused]
    new = [b for b in ok if not b.reused]
    pick = rng.sample(reused, min(len(reused), n // 2))
    pick += rng.sample(new, min(len(new), n - len(pick)))
    headers = {"Authorization": f"Bearer {token}"}
    problems: list[str] = []

    async def get(path: str, **params: str) -> Any:
        async with session.get(base + path, params=params, headers=headers) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"GET {path} {params}: HTTP {resp.status}: {body[:200]!r}")
            return json.loads(body)

    good = 0
    for b in pick:
        try:
            orders = (await get("/api/orders", accession=b.accession))["orders"]
            patients = (await get("/api/patients", identifier=b.mrn))["patients"]
        except Exception as exc:
            problems.append(f"{b.accession}: {type(exc).__name__}: {exc}")
            continue
        if len(orders) != 1:
            problems.append(f"{b.accession}: {len(orders)} orders")
        elif len(patients) != 1:
            problems.append(f"MRN {b.mrn}: {len(patients)} patients")
        elif orders[0].get("patient_id") != patients[0].get("id"):
            problems.append(f"{b.accession}: order's patient {orders[0].get('patient_id')} is not MRN {b.mrn}'s "
                            f"patient {patients[0].get('id')}")
        else:
            good += 1
    n_re = sum(b.reused for b in pick)
    ok_ = good == len(pick) and len(pick) > 0
    text = (f"admin API: {good}/{len(pick)} sampled accessions ({n_re} with a reused MRN) have one order, linked "
            f"to the one patient with the bundle's MRN -> {'OK' if ok_ else 'MISMATCH'}")
    if problems:
        text += "; " + "; ".join(problems[:3])
    return text, ok_


async def drive(port: int, token: str, warm: Sequence[BundleSpec], timed: Sequence[BundleSpec],
                connections: int, timeout: float, server_pid: int, sc: Scenario) -> None:
    """Warm-up (same connections), the timed run, then for the engine the admin API sample."""
    base = f"http://{HOST}:{port}"
    url = f"{base}/fhir/"
    opened = 0

    async def on_conn(_session: Any, _ctx: Any, _params: Any) -> None:
        nonlocal opened
        opened += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_conn)
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    conditional = sc.kind == "engine"
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace],
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        if warm:
            sc.warm = await send_all(session, url, token, warm, connections, 60 + 0.5 * len(warm), conditional)
            if not sc.warm.ok:
                first = sc.warm.failures[0] if sc.warm.failures else "no answer"
                raise EndpointMissing(f"{sc.label}: no warm-up bundle was accepted by POST {url}; first: {first}")
        sc.warm_connections = opened
        cpu0 = proc_cpu_seconds(server_pid)
        sc.result = await send_all(session, url, token, timed, connections, 120 + 0.05 * len(timed), conditional)
        sc.server_cpu = proc_cpu_seconds(server_pid) - cpu0
        sc.hwm_kb = proc_status(server_pid, "VmHWM")
        sc.new_connections = opened - sc.warm_connections
        if sc.kind == "engine":
            sc.verified, ok = await verify_sample(session, base, token, sc.warm.ok + sc.result.ok, SAMPLE_CHECKS)
            sc.check_failed |= not ok


def count_engine_store(url: str, ok: Sequence[BundleSpec]) -> tuple[str, bool]:
    """Patients and orders in the engine's database against what the accepted bundles must create."""
    from sqlalchemy import func, select

    from engine.store.db import open_database
    from engine.store.models import Order, Patient

    exp_patients, exp_orders = len({b.mrn for b in ok}), len(ok)
    db = open_database(url)
    try:
        with db.read_session() as s:
            patients = s.scalar(select(func.count()).select_from(Patient)) or 0
            orders = s.scalar(select(func.count()).select_from(Order)) or 0
    finally:
        db.dispose()
    good = patients == exp_patients and orders == exp_orders
    return (f"store after stop: patients {patients}/{exp_patients} (one per MRN), orders {orders}/{exp_orders} "
            f"-> {'OK' if good else 'MISMATCH'}"), good


def count_baseline_store(target: str, expected: int) -> tuple[str, bool]:
    from sqlalchemy import create_engine, text
    url = target if target.startswith("postgresql") else f"sqlite:///{target}"
    eng = create_engine(url)
    try:
        with eng.connect() as c:
            rows = c.execute(text("SELECT count(*) FROM bundles")).scalar() or 0
    finally:
        eng.dispose()
    return f"baseline stored {rows}/{expected} bundles -> {'OK' if rows == expected else 'MISMATCH'}", rows == expected


# =====================================================================================================
# Baseline server (run as: fhir_ingest.py --baseline-server DB): parse, store the body, commit, answer
# =====================================================================================================

class SqliteStore:
    """One table of raw bundles; commits on the event loop after every request of one loop iteration
    has been queued (group commit, as the engine's inline writer does), or one commit per request."""

    def __init__(self, path: str, max_batch: int) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.execute("CREATE TABLE IF NOT EXISTS bundles (id INTEGER PRIMARY KEY, received_at REAL NOT NULL, "
                          "body BLOB NOT NULL)")
        mode = self.conn.execute("PRAGMA journal_mode").fetchone()[0]
        sync = self.conn.execute("PRAGMA synchronous").fetchone()[0]
        self.settings = f"journal_mode={mode} synchronous={['OFF', 'NORMAL', 'FULL', 'EXTRA'][sync]}"
        self.max_batch = max_batch
        self._pending: list[tuple[bytes, asyncio.Future[int]]] = []
        self._scheduled = False

    async def store(self, body: bytes) -> int:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._pending.append((body, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._drain)
        return await fut

    def _drain(self) -> None:
        self._scheduled = False
        while self._pending:
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                ids = [self.conn.execute("INSERT INTO bundles (received_at, body) VALUES (?, ?)",
                                         (time.time(), body)).lastrowid for body, _f in batch]
                self.conn.execute("COMMIT")
            except Exception as exc:
                with contextlib.suppress(Exception):
                    self.conn.execute("ROLLBACK")
                for _b, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            for (_b, f), rid in zip(batch, ids, strict=True):
                if not f.done():
                    f.set_result(int(rid or 0))

    def close(self) -> None:
        self.conn.close()


class PgStore:
    """The same on PostgreSQL, committed by one writer thread (as the engine's threaded writer)."""

    def __init__(self, url: str, max_batch: int) -> None:
        import psycopg
        self.conn = psycopg.connect(re.sub(r"^postgresql\+\w+://", "postgresql://", url), autocommit=False)
        self.conn.execute("CREATE TABLE IF NOT EXISTS bundles (id BIGSERIAL PRIMARY KEY, "
                          "received_at DOUBLE PRECISION NOT NULL, body BYTEA NOT NULL)")
        row = self.conn.execute("SHOW synchronous_commit").fetchone()
        self.conn.commit()
        self.settings = f"synchronous_commit={row[0] if row else '?'}"
        self.max_batch = max_batch
        self._queue: queue.Queue[tuple[bytes, concurrent.futures.Future[int]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="baseline-writer", daemon=True)
        self._thread.start()

    async def store(self, body: bytes) -> int:
        fut: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._queue.put((body, fut))
        return await asyncio.wrap_future(fut)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            try:
                ids = []
                with self.conn.cursor() as cur:
                    for body, _f in batch:
                        cur.execute("INSERT INTO bundles (received_at, body) VALUES (%s, %s) RETURNING id",
                                    (time.time(), body))
                        row = cur.fetchone()
                        ids.append(int(row[0]) if row else 0)
                self.conn.commit()
            except Exception as exc:
                with contextlib.suppress(Exception):
                    self.conn.rollback()
                for _b, f in batch:
                    f.set_exception(exc)
                continue
            for (_b, f), rid in zip(batch, ids, strict=True):
                f.set_result(rid)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(30)
        self.conn.close()


def _fhir_error(status: int, text: str) -> web.Response:
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "invalid", "diagnostics": text}]}
    return web.Response(status=status, body=json.dumps(body).encode(), content_type=FHIR_JSON)


async def baseline_serve(target: str, commit: str) -> None:
    max_batch = 1 if commit == "each" else 256
    store: SqliteStore | PgStore = PgStore(target, max_batch) if target.startswith("postgresql") else \
        SqliteStore(target, max_batch)
    expected = f"Bearer {BASELINE_TOKEN}"

    async def transaction(request: web.Request) -> web.Response:
        if request.headers.get("Authorization", "") != expected:
            return _fhir_error(401, "unauthorized")
        raw = await request.read()
        try:
            bundle = json.loads(raw)
        except ValueError:
            return _fhir_error(400, "not JSON")
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            return _fhir_error(400, "not a transaction Bundle")
        entries = bundle.get("entry") or []
        rid = await store.store(raw)
        out = {"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "201 Created",
                          "location": f"{(e.get('request') or {}).get('url', 'Resource')}/{rid}-{k}/_history/1"}}
            for k, e in enumerate(entries)]}
        return web.Response(body=json.dumps(out).encode(), content_type=FHIR_JSON)

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/fhir/", transaction)
    app.router.add_post("/fhir", transaction)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0, reuse_address=True)
    await site.start()
    server = getattr(site, "_server", None)
    port = server.sockets[0].getsockname()[1] if server is not None and server.sockets else 0
    print(f"baseline listening on {HOST}:{port} ({store.settings}, "
          f"{'one commit per request' if commit == 'each' else 'group commit'})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    store.close()


# =====================================================================================================
# Scenarios
# =====================================================================================================

@dataclass
class Options:
    bundles: int
    connections: int
    warmup: int
    reuse: float
    timeout: float
    db: str
    pg_admin: str
    baseline_commit: str
    engine_src: Path


class Bench:
    def __init__(self, opts: Options, ws: Workspace) -> None:
        self.opts = opts
        self.ws = ws

    def _sets(self, run: int) -> tuple[list[BundleSpec], list[BundleSpec]]:
        """Warm-up and timed bundles of one run (new MRNs and accessions; the timed set reuses warm-up MRNs too)."""
        warm = make_bundles(f"W{run}", self.opts.warmup, 0.0)
        timed = make_bundles(f"T{run}", self.opts.bundles, self.opts.reuse, [b.mrn for b in warm])
        return warm, timed

    def run(self, kind: str, run: int) -> Scenario:
        o = self.opts
        sc = Scenario(kind, o.db, run)
        d = self.ws.subdir(f"{kind}-{o.db}-{run}")
        warm, timed = self._sets(run)
        pg = self.ws.pg_database(o.pg_admin) if o.db == "postgresql" else ""
        if kind == "engine":
            target = pg or f"sqlite:///{d / 'var' / 'radbridge.db'}"
            env = engine_env(d, target, "FULL", o.engine_src)
            env["RADBRIDGE_DICOM_PORT"] = "0"
            token = env["RADBRIDGE_API_TOKEN"]
            server = ServerProcess("engine", [sys.executable, "-m", "engine.cli", "run"], env=env, cwd=d,
                                   port_re=r"HTTP on http://[\d.]+:(\d+)/")
        else:
            target = pg or str(d / "baseline.db")
            env = {k: v for k, v in os.environ.items() if not k.startswith("RADBRIDGE_")}
            token = BASELINE_TOKEN
            server = ServerProcess("baseline", [sys.executable, str(Path(__file__).resolve()), "--baseline-server",
                                                target, "--baseline-commit", o.baseline_commit],
                                   env=env, cwd=d, port_re=r"baseline listening on [\d.]+:(\d+)")
            m = re.search(r"\((.*)\)", server.out_path.read_text())
            if m:
                sc.notes.append(f"baseline: {m.group(1)}")
        try:
            asyncio.run(drive(server.port, token, warm, timed, o.connections, o.timeout, server.pid, sc))
        except EndpointMissing as exc:
            raise EndpointMissing(f"{exc}\n{kind} log tail:\n{server.tail(10)}") from None
        finally:
            code = server.stop()
            if code not in (0, None):
                sc.notes.append(f"{kind} exited with {code}: {server.tail(10)}")
                sc.check_failed = True
        ok = sc.warm.ok + sc.result.ok
        try:
            if kind == "engine":
                sc.counted, good = count_engine_store(target, ok)
            else:
                sc.counted, good = count_baseline_store(target, len(ok))
            sc.check_failed |= not good
        except Exception as exc:
            sc.counted = f"could not count the store: {type(exc).__name__}: {exc}"
            sc.check_failed = True
        if sc.failed and kind == "engine":
            sc.notes.append("engine log tail:\n" + server.tail(15))
        return sc


# =====================================================================================================
# Output
# =====================================================================================================

def _median(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


def print_table(scenarios: list[Scenario], opts: Options) -> dict[str, float]:
    """The table, the ratios and the goal; returns the median resources/s of engine and baseline (``--json``)."""
    head = (f"{'scenario':<20}{'run':>4}{'bundles':>9}{'res/s':>9}{'bundles/s':>11}{'p50 ms':>9}{'p95 ms':>9}"
            f"{'p99 ms':>9}{'max ms':>9}{'srv CPU ms/bdl':>16}{'srv CPU %':>11}{'cli CPU %':>11}{'failed':>8}"
            f"{'peak RSS MiB':>14}")
    print()
    print(head)
    print("-" * len(head))
    for s in scenarios:
        r = s.result
        mx = r.latencies[-1] * 1000 if r.latencies else math.nan
        cpu_ms = 1000 * s.server_cpu / r.sent if r.sent else math.nan
        cpu_pct = 100 * s.server_cpu / r.seconds if r.seconds else math.nan
        cli_pct = 100 * r.client_cpu / r.seconds if r.seconds else math.nan
        print(f"{s.label:<20}{s.run:>4}{r.sent:>9}{s.resources_per_s:>9.0f}{r.rate:>11.0f}{r.percentile(50):>9.2f}"
              f"{r.percentile(95):>9.2f}{r.percentile(99):>9.2f}{mx:>9.1f}{cpu_ms:>16.2f}{cpu_pct:>11.0f}"
              f"{cli_pct:>11.0f}{r.failed:>8}{mib(s.hwm_kb):>14}")

    eng = [s for s in scenarios if s.kind == "engine"]
    base = [s for s in scenarios if s.kind == "baseline"]
    runs = max((s.run for s in scenarios), default=1)
    if eng and base:
        e_rate, b_rate = _median([s.resources_per_s for s in eng]), _median([s.resources_per_s for s in base])
        e_p99 = _median([s.result.percentile(99) for s in eng])
        b_p99 = _median([s.result.percentile(99) for s in base])
        what = f"medians of {runs} runs" if runs > 1 else "same run"
        print(f"\nengine / baseline ({what}, {opts.db}, {opts.connections} connections):")
        print(f"  resources/s  {e_rate / b_rate if b_rate else math.nan:6.2f}   "
              f"(engine {e_rate:.0f}, baseline {b_rate:.0f}; higher is better)")
        print(f"  p99 latency  {e_p99 / b_p99 if b_p99 else math.nan:6.2f}   "
              f"(engine {e_p99:.1f} ms, baseline {b_p99:.1f} ms; lower is better)")
        if runs > 1:
            pairs = [(e, b) for e in eng for b in base if e.run == b.run and b.resources_per_s > 0]
            rr = [e.resources_per_s / b.resources_per_s for e, b in pairs]
            if rr:
                print(f"  resources/s ratio of each run: {', '.join(f'{x:.2f}' for x in rr)}")
    if eng:
        e_rate = _median([s.resources_per_s for s in eng])
        verdict = "met" if e_rate >= 500 and not any(s.failed for s in eng) else "NOT met"
        print(f"goal: at least 500 resources/s, durable, {opts.db}, {opts.connections} connections: "
              f"engine {e_rate:.0f} resources/s{' (median)' if len(eng) > 1 else ''} -> {verdict}")

    print()
    for s in scenarios:
        r = s.result
        print(f"{s.label} run {s.run}:")
        print(f"  HTTP statuses: {', '.join(f'{k} x{v}' for k, v in sorted(r.http.items())) or '-'}")
        if r.entries:
            print(f"  entry statuses: {', '.join(f'{k} x{v}' for k, v in sorted(r.entries.items()))}")
        reused = sum(b.reused for b in r.ok)
        print(f"  bundles accepted {len(r.ok)}/{opts.bundles} ({reused} naming a known MRN); warm-up "
              f"{len(s.warm.ok)}/{opts.warmup}; connections opened: {s.warm_connections} in the warm-up, "
              f"{s.new_connections} during the timed run; {r.seconds:.2f} s")
        for k, v in sorted(r.conditional.items()):
            print(f"  conditional create: {k} x{v}")
        if r.timed_out:
            print("  the timed run did not finish before its deadline")
        if s.verified:
            print(f"  {s.verified}")
        if s.counted:
            print(f"  {s.counted}")
        for f in r.failures + s.warm.failures[:2]:
            print(f"  failed: {f}")
        for note in s.notes:
            print("  " + note.replace("\n", "\n  "))
    return {f"{kind} res/s": _median([s.resources_per_s for s in scenarios if s.kind == kind])
            for kind in sorted({s.kind for s in scenarios})}


# =====================================================================================================
# CLI
# =====================================================================================================

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", type=int, default=2000, help="timed bundles per scenario, 2 resources each "
                    "(default 2000)")
    ap.add_argument("--connections", type=int, default=8, help="keep-alive connections, one request in flight "
                    "on each (default 8)")
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite",
                    help="database of engine and baseline (default sqlite; postgresql: a throwaway database each)")
    ap.add_argument("--pg-admin", default=PG_ADMIN_URL,
                    help=f"PostgreSQL admin URL for --db postgresql (default {PG_ADMIN_URL}, or $RADBRIDGE_TEST_PG)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="baseline/engine pairs, alternating; figures then compared as medians (default 1)")
    ap.add_argument("--no-baseline", action="store_true", help="run the engine only")
    ap.add_argument("--baseline-only", action="store_true", help="run the baseline only (checks the rig)")
    ap.add_argument("--baseline-commit", choices=("group", "each"), default="group",
                    help="baseline commits: grouped as the engine's writer does (default) or one per request")
    ap.add_argument("--warmup", type=int, default=50,
                    help="untimed bundles first, over the same connections (default 50)")
    ap.add_argument("--reuse", type=float, default=0.2,
                    help="share of timed bundles naming a known MRN (conditional create matches; default 0.2)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    ap.add_argument("--tmpdir", default=None, help="where the databases go (default: the system temp dir)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep databases and server logs for inspection")
    ap.add_argument("--engine-src", metavar="DIR", default=str(REPO),
                    help="source tree to run the engine from (default: this repository)")
    ap.add_argument("--baseline-server", metavar="DB", default=None, help=argparse.SUPPRESS)
    json_option(ap)
    args = ap.parse_args(argv)
    if args.bundles < 1 or args.connections < 1 or args.repeat < 1 or args.warmup < 0:
        ap.error("--bundles, --connections and --repeat must be at least 1, --warmup at least 0")
    if not 0 <= args.reuse <= 1:
        ap.error("--reuse is a share from 0 to 1")
    if args.no_baseline and args.baseline_only:
        ap.error("--no-baseline and --baseline-only exclude each other")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.baseline_server:
        asyncio.run(baseline_serve(args.baseline_server, args.baseline_commit))
        return 0

    def on_term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    opts = Options(bundles=args.bundles, connections=args.connections, warmup=args.warmup, reuse=args.reuse,
                   timeout=args.timeout, db=args.db, pg_admin=args.pg_admin, baseline_commit=args.baseline_commit,
                   engine_src=Path(args.engine_src).resolve())
    kinds = ["baseline"] * (not args.no_baseline) + ["engine"] * (not args.baseline_only)
    ws = Workspace(args.tmpdir, args.keep_tmp)
    print(f"radbridge FHIR ingest benchmark: {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}, "
          f"aiohttp {aiohttp.__version__}; engine from {describe_source(opts.engine_src)}")
    print(f"{opts.bundles} transaction Bundles ({2 * opts.bundles} resources: Patient + ServiceRequest) over "
          f"{opts.connections} keep-alive connections, {opts.reuse:.0%} naming a known MRN, warm-up "
          f"{opts.warmup}; {'PostgreSQL (throwaway database each)' if opts.db == 'postgresql' else 'SQLite'}"
          f"; client in this process, each server in its own; work dir {ws.dir}", flush=True)
    scenarios: list[Scenario] = []
    bench = Bench(opts, ws)
    try:
        for rep in range(1, args.repeat + 1):
            for kind in kinds:
                what = f" (run {rep} of {args.repeat})" if args.repeat > 1 else ""
                print(f"{kind} {opts.db}: {opts.bundles} bundles over {opts.connections} connections{what} ...",
                      flush=True)
                scenarios.append(bench.run(kind, rep))
        write_figures(args.json, print_table(scenarios, opts))
    except EndpointMissing as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        ws.close()
    return 1 if any(s.failed for s in scenarios) else 0


if __name__ == "__main__":
    sys.exit(main())
