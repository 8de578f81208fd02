#!/usr/bin/env python3
"""MLLP ingest benchmark: the engine end to end against a minimal durable baseline.

Run on demand (it is not a test); see bench/README.md. In one run, for each connection count:

* baseline: a minimal asyncio MLLP server (in this file) that stores each frame's raw bytes in one
  table and commits (same database, same SQLite journal mode and ``synchronous`` setting as the
  engine, one writer thread with group commit like the engine's) and then sends a template ACK;
* engine: ``python -m engine.cli run`` (what ``radbridge run`` runs) in a subprocess on a fresh
  database, fed the same message set, which it parses, maps and applies to patients and orders
  before its ACK.

The same clients drive both: one process per connection, blocking sockets, TCP_NODELAY, one message
in flight per connection (send, wait for the ACK, send the next), as real senders do. Every ACK
must be AA or CA and name the message's MSH-10. After each engine run the database is opened to
check that the messages were applied (patients, identifiers and orders created), not only stored.

Usage:
    python bench/mllp_ingest.py --messages 3000
    python bench/mllp_ingest.py --messages 3000 --postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres
    python bench/mllp_ingest.py --memory-run 100000
    python bench/mllp_ingest.py --tls --connections 8 --messages 3000   # engine plain vs MLLP/TLS, same run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import math
import multiprocessing as mp
import os
import queue
import random
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from benchutil import describe_source, die_with_parent, json_option, mib, proc_status, write_figures

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
SB, EB, CR = b"\x0b", b"\x1c", b"\r"
CHANNEL = "hl7-inbound"
STARTUP_TIMEOUT = 90.0  # seconds for a server to start listening
STOP_TIMEOUT = 30.0

# =====================================================================================================
# Messages
# =====================================================================================================
# The timed run is a repeating block of five messages (index i, block k = i // 5):
#   0  ADT^A01  new patient 2k
#   1  ORM^O01  NW order for patient 2k
#   2  ADT^A01  new patient 2k+1
#   3  ADT^A08  update of an earlier patient (address, phone, sometimes the family name)
#   4  ORM^O01  NW order for an earlier patient
# i.e. 40 % A01, 20 % A08, 40 % ORM. Every message has its own MSH-10, every order its own placer,
# filler and accession number; patients have three PID-3 repetitions (MR, SS, PI) that are unique
# to them. ADT comes from "EPIC" in enhanced mode (MSH-15 AL, MSH-16 NE: one CA), orders from "RIS"
# in original mode (one AA). Some names are not ASCII; those messages declare UNICODE UTF-8.

FAMILY = ("Smith", "Johnson", "Williams", "Brown", "Jones", "García", "Miller", "Davis", "Rodríguez",
          "Martinez", "Hernández", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore",
          "Jackson", "Martin", "Lee", "Pérez", "Thompson", "White", "Harris", "Sánchez", "Clark", "Lewis",
          "Robinson", "Müller", "O'Brien", "Nguyễn", "Kowalski", "Østergaard", "Smith-Jones", "Walker")
GIVEN_M = ("James", "John", "Robert", "Michael", "William", "David", "José", "Thomas", "Charles", "Daniel",
           "Matthew", "Łukasz", "Anthony", "Mark", "Jürgen", "Paul", "Steven", "Andrew", "Kenji", "Omar")
GIVEN_F = ("Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica", "Zoë",
           "Sarah", "Karen", "Chloé", "Nancy", "Lisa", "Margaret", "Sandra", "Ashley", "Aoife", "Emily", "Ana")
MIDDLE = ("A", "B", "C", "D", "E", "J", "K", "L", "M", "R", "S", "")
STREETS = ("Main St", "Oak Ave", "Maple Dr", "Cedar Ln", "Elm St", "Washington Blvd", "Lake Rd", "Hill St",
           "Park Ave", "Pine Ct", "River Rd", "2nd St")
CITIES = (("Springfield", "IL", "627"), ("Peoria", "IL", "616"), ("Champaign", "IL", "618"),
          ("Decatur", "IL", "625"), ("Bloomington", "IL", "617"), ("Urbana", "IL", "618"))
RACES = ("2106-3^White^HL70005", "2054-5^Black or African American^HL70005", "2028-9^Asian^HL70005",
         "2131-1^Other Race^HL70005", "")
MARITAL = ("S", "M", "D", "W", "")
PROVIDERS = (("1234", "Welby", "Marcus"), ("5678", "House", "Gregory"), ("9012", "Quinn", "Michaela"),
             ("3456", "Grey", "Meredith"), ("7890", "Kildare", "James"))
PROCEDURES = (("71046", "XR Chest 2 views", "CR"), ("74177", "CT Abdomen Pelvis with contrast", "CT"),
              ("70553", "MRI Brain with and without contrast", "MR"), ("76700", "US Abdomen complete", "US"),
              ("77067", "Screening mammography bilateral", "MG"), ("78815", "PET CT skull base to mid-thigh", "PT"),
              ("72148", "MRI Lumbar spine without contrast", "MR"), ("73030", "XR Shoulder 2 views", "DX"))
REASONS = ("Cough and fever", "Abdominal pain", "Headache, rule out mass", "Follow-up", "Screening",
           "Low back pain", "Shoulder pain after fall", "Staging")
ALLERGIES = (("70618", "Penicillin", "Hives"), ("2670", "Codeine", "Nausea"), ("1191", "Aspirin", "Rash"),
             ("4053", "Erythromycin", "Itching"))
DIAGNOSES = (("R05.9", "Cough, unspecified"), ("R10.9", "Abdominal pain"), ("R51.9", "Headache"),
             ("M54.50", "Low back pain"), ("Z12.31", "Screening mammogram"), ("S43.004A", "Shoulder dislocation"))
INSURERS = (("BCBS01", "Blue Cross Blue Shield of Illinois"), ("AETNA7", "Aetna"), ("MCARE", "Medicare Part B"),
            ("UHC22", "UnitedHealthcare"))
BASE_TIME = datetime(2024, 3, 1, 7, 0, 0)


@dataclass(frozen=True)
class Plan:
    """What message ``index`` is, without its text: enough to know what it should do to the store."""

    index: int
    kind: str  # A01 | A08 | ORM
    patient: int


def plan(index: int) -> Plan:
    k, pos = divmod(index, 5)
    if pos == 0:
        return Plan(index, "A01", 2 * k)
    if pos == 1:
        return Plan(index, "ORM", 2 * k)
    if pos == 2:
        return Plan(index, "A01", 2 * k + 1)
    rng = random.Random(index * 1_000_003 + pos)
    return Plan(index, "A08" if pos == 3 else "ORM", rng.randrange(0, 2 * k + 2))


def expected_effects(indices: Iterable[int]) -> tuple[int, int]:
    """(patients, orders) that the messages with these indices should leave in the store."""
    patients: set[int] = set()
    orders = 0
    for i in indices:
        p = plan(i)
        patients.add(p.patient)
        orders += p.kind == "ORM"
    return len(patients), orders


def _seg(name: str, fields: dict[int, str]) -> str:
    """A segment from {field number: value}; trailing empty fields and components are left out."""
    n = max(k for k, v in fields.items() if v)
    return name + "|" + "|".join(fields.get(k, "").rstrip("^") for k in range(1, n + 1))


def _msh(fields: dict[int, str]) -> str:
    n = max(k for k, v in fields.items() if v)
    return "MSH|^~\\&|" + "|".join(fields.get(k, "") for k in range(3, n + 1))


def _ts(t: datetime) -> str:
    return t.strftime("%Y%m%d%H%M%S")


@dataclass
class Person:
    mrn: str
    ssn: str
    enterprise_id: str
    family: str
    given: str
    middle: str
    prefix: str
    sex: str
    dob: str
    race: str
    marital: str
    street: str
    city: tuple[str, str, str]
    phone: str
    account: str


def person(tag: str, p: int) -> Person:
    rng = random.Random(p * 7919 + 17)
    sex = rng.choice("MF")
    given = rng.choice(GIVEN_M if sex == "M" else GIVEN_F)
    prefix = rng.choice(("Mr", "Dr", "")) if sex == "M" else rng.choice(("Ms", "Mrs", "Dr", ""))
    dob = BASE_TIME - timedelta(days=rng.randrange(365, 95 * 365))
    # tag keeps warm-up and timed patients apart; p keeps every patient's identifiers its own
    return Person(
        mrn=f"{tag}{p:08d}", ssn=f"9{p // 1_000_000 % 100:02d}-{p // 10_000 % 100:02d}-{p % 10_000:04d}{tag}",
        enterprise_id=f"E{tag}{p:08d}", family=rng.choice(FAMILY), given=given, middle=rng.choice(MIDDLE),
        prefix=prefix, sex=sex, dob=dob.strftime("%Y%m%d"), race=rng.choice(RACES), marital=rng.choice(MARITAL),
        street=f"{rng.randrange(1, 9999)} {rng.choice(STREETS)}", city=rng.choice(CITIES),
        phone=f"(217)555-{rng.randrange(0, 10_000):04d}", account=f"ACCT{tag}{p:08d}")


def _charset(*texts: str) -> str:
    return "" if all(t.isascii() for t in texts) else "UNICODE UTF-8"


def _pid_full(pe: Person) -> str:
    city, state, zip3 = pe.city
    return _seg("PID", {
        1: "1",
        3: f"{pe.mrn}^^^GENHOSP^MR~{pe.ssn}^^^SSA^SS~{pe.enterprise_id}^^^GENHOSP&1.2.3.4&ISO^PI",
        5: f"{pe.family}^{pe.given}^{pe.middle}^^{pe.prefix}", 7: pe.dob, 8: pe.sex, 10: pe.race,
        11: f"{pe.street}^^{city}^{state}^{zip3}{int(pe.mrn[-2:]):02d}", 13: pe.phone, 16: pe.marital,
        18: pe.account})


def build_message(index: int, tag: str) -> tuple[str, bytes]:
    """(MSH-10, message bytes with CR segment terminators) of message ``index``."""
    pl = plan(index)
    pe = person(tag, pl.patient)
    rng = random.Random(index * 31 + 7)
    now = BASE_TIME + timedelta(seconds=index)
    control = f"{tag}{index:010d}"
    prov = rng.choice(PROVIDERS)
    if pl.kind == "A01":
        visit = f"V{tag}{index:09d}"
        algs = rng.sample(ALLERGIES, rng.randrange(0, 3))
        dx_code, dx_text = rng.choice(DIAGNOSES)
        ins_id, ins_name = rng.choice(INSURERS)
        segs = [
            _msh({3: "EPIC", 4: "GENHOSP", 5: "RADBRIDGE", 6: "RAD", 7: _ts(now), 9: "ADT^A01^ADT_A01",
                  10: control, 11: "P", 12: "2.5.1", 15: "AL", 16: "NE",
                  18: _charset(pe.family, pe.given)}),
            _seg("EVN", {1: "A01", 2: _ts(now), 5: "OPER1^Clerk^Ann"}),
            _pid_full(pe),
            _seg("PD1", {3: "GENHOSP CLINIC^^1234", 4: f"{prov[0]}^{prov[1]}^{prov[2]}"}),
            _seg("NK1", {1: "1", 2: f"{pe.family}^{rng.choice(GIVEN_F + GIVEN_M)}", 3: "SPO^Spouse^HL70063",
                         5: pe.phone}),
            _seg("PV1", {1: "1", 2: "O", 3: "RAD^XR1^01^GENHOSP", 7: f"{prov[0]}^{prov[1]}^{prov[2]}",
                         8: "2222^Referring^Rita", 10: "RAD", 18: "OP", 19: visit, 44: _ts(now)}),
            *(_seg("AL1", {1: str(n + 1), 2: "DA", 3: f"{code}^{name}^RXNORM", 4: "MO", 5: reaction})
              for n, (code, name, reaction) in enumerate(algs)),
            _seg("DG1", {1: "1", 3: f"{dx_code}^{dx_text}^I10", 6: "A"}),
            _seg("IN1", {1: "1", 2: "PPO^Preferred Provider", 3: ins_id, 4: ins_name, 36: f"POL{index:09d}"}),
        ]
    elif pl.kind == "A08":
        city, state, zip3 = rng.choice(CITIES)
        family = pe.family if rng.random() < 0.8 else rng.choice(FAMILY)  # a name change now and then
        street = f"{rng.randrange(1, 9999)} {rng.choice(STREETS)}"
        segs = [
            _msh({3: "EPIC", 4: "GENHOSP", 5: "RADBRIDGE", 6: "RAD", 7: _ts(now), 9: "ADT^A08^ADT_A01",
                  10: control, 11: "P", 12: "2.5.1", 15: "AL", 16: "NE", 18: _charset(family, pe.given)}),
            _seg("EVN", {1: "A08", 2: _ts(now), 5: "OPER2^Clerk^Bob"}),
            _seg("PID", {1: "1", 3: f"{pe.mrn}^^^GENHOSP^MR~{pe.ssn}^^^SSA^SS",
                         5: f"{family}^{pe.given}^{pe.middle}^^{pe.prefix}", 7: pe.dob, 8: pe.sex,
                         11: f"{street}^^{city}^{state}^{zip3}{index % 100:02d}",
                         13: f"(217)555-{rng.randrange(0, 10_000):04d}", 16: pe.marital, 18: pe.account}),
            _seg("PV1", {1: "1", 2: "O", 3: "RAD^XR1^01^GENHOSP"}),
        ]
    else:
        code, text, modality = rng.choice(PROCEDURES)
        sched = _ts(now + timedelta(days=rng.randrange(1, 30), hours=rng.randrange(0, 9)))
        prio = rng.choice("RRRRSA")
        placer, filler, acc = f"PL{tag}{index:09d}", f"FL{tag}{index:09d}", f"A{tag}{index:09d}"
        segs = [
            _msh({3: "RIS", 4: "GENHOSP", 5: "RADBRIDGE", 6: "RAD", 7: _ts(now), 9: "ORM^O01", 10: control,
                  11: "P", 12: "2.3.1", 18: _charset(pe.family, pe.given)}),
            _seg("PID", {1: "1", 3: f"{pe.mrn}^^^GENHOSP^MR", 5: f"{pe.family}^{pe.given}^{pe.middle}",
                         7: pe.dob, 8: pe.sex}),
            _seg("PV1", {1: "1", 2: "O", 3: "RAD"}),
            _seg("ORC", {1: "NW", 2: f"{placer}^EPIC", 3: f"{filler}^RIS", 5: "SC", 7: f"^^^{sched}^^{prio}",
                         9: _ts(now), 12: f"{prov[0]}^{prov[1]}^{prov[2]}^^^Dr"}),
            _seg("OBR", {1: "1", 2: f"{placer}^EPIC", 3: f"{filler}^RIS", 4: f"{code}^{text}^C4", 18: acc,
                         19: f"RP{tag}{index:09d}", 20: f"SPS{tag}{index:09d}", 24: modality,
                         27: f"^^^{sched}^^{prio}", 31: f"^{rng.choice(REASONS)}"}),
            _seg("NTE", {1: "1", 3: "Patient prefers morning appointments"}),
            _seg("ZDS", {1: f"1.2.826.0.1.3680043.10.543.{sum(map(ord, tag))}.{index}^RIS^Application^DICOM"}),
        ]
    return control, ("\r".join(segs) + "\r").encode("utf-8")


def frame(payload: bytes) -> bytes:
    return SB + payload + EB + CR


# =====================================================================================================
# Clients (one process per connection)
# =====================================================================================================

@dataclass
class ClientSpec:
    host: str
    port: int
    tag: str
    total: int  # messages over all connections
    connections: int
    timeout: float
    ca: str = ""  # MLLP over TLS, the server's certificate checked against this CA (--tls)


class MLLPConnection:
    """A blocking MLLP connection: one frame out, one reply frame back (over TLS with ``ca``)."""

    def __init__(self, host: str, port: int, timeout: float, ca: str = "") -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ca:
            ctx = ssl.create_default_context(cafile=ca)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            sock = ctx.wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.buf = b""

    def exchange(self, framed: bytes) -> bytes:
        self.sock.sendall(framed)
        while True:
            end = self.buf.find(EB)
            if end >= 0:
                break
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection before its ACK")
            self.buf += chunk
        start = self.buf.find(SB)
        payload = self.buf[start + 1:end] if 0 <= start < end else self.buf[:end]
        self.buf = self.buf[end + 1:].lstrip(b"\r\n")
        return payload

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def ack_problem(payload: bytes, control: str) -> str | None:
    """None when the reply is an AA/CA for ``control``, else what is wrong with it."""
    text = payload.decode("latin-1")
    for seg in text.split("\r"):
        if seg.startswith("MSA"):
            parts = seg.split(text[3] if len(text) > 3 else "|")
            code = parts[1] if len(parts) > 1 else ""
            ref = parts[2] if len(parts) > 2 else ""
            if code not in ("AA", "CA"):
                return f"{control}: {code} {text[:300]!r}"
            if ref != control:
                return f"{control}: ACK names {ref!r}"
            return None
    return f"{control}: no MSA in reply {text[:200]!r}"


def client_main(spec: ClientSpec, conn: int, progress: Any, start: Any, results: Any) -> None:
    """One connection's messages: indices conn, conn + connections, ... (run in a child process)."""
    sent = 0
    lat = array("d")
    failures: list[str] = []
    failed = 0
    t_start = t_end = 0.0
    error: str | None = None
    mc: MLLPConnection | None = None
    try:
        msgs = [build_message(i, spec.tag) for i in range(conn, spec.total, spec.connections)]
        framed = [(ctl, frame(data)) for ctl, data in msgs]
        del msgs
        mc = MLLPConnection(spec.host, spec.port, spec.timeout, spec.ca)
        results.put(("ready", conn))
        if not start.wait(STARTUP_TIMEOUT):
            raise TimeoutError("no start signal")
        t_start = time.monotonic()
        clock = time.perf_counter
        for n, (ctl, data) in enumerate(framed, 1):
            t0 = clock()
            reply = mc.exchange(data)
            lat.append(clock() - t0)
            problem = ack_problem(reply, ctl)
            if problem is not None:
                failed += 1
                if len(failures) < 10:
                    failures.append(problem)
            sent = n
            if not n & 31:
                progress[conn] = n
        t_end = time.monotonic()
    except Exception as exc:
        t_end = time.monotonic()
        error = f"connection {conn}: {type(exc).__name__}: {exc}"
    finally:
        progress[conn] = sent
        if mc is not None:
            mc.close()
    results.put(("done", conn, {"sent": sent, "latencies": lat.tobytes(), "failed": failed, "failures": failures,
                                "t_start": t_start, "t_end": t_end, "error": error}))


@dataclass
class RunResult:
    messages: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return math.nan
        idx = min(len(self.latencies) - 1, max(0, math.ceil(p / 100 * len(self.latencies)) - 1))
        return self.latencies[idx] * 1000


def drive(spec: ClientSpec, *, deadline: float, on_progress: Callable[[int], None] | None = None) -> RunResult:
    """Run the clients of one scenario; ``on_progress`` sees the running total about every 20 ms."""
    ctx = mp.get_context("spawn")
    progress = ctx.RawArray("q", spec.connections)
    start = ctx.Event()
    results = ctx.Queue()
    procs = [ctx.Process(target=client_main, args=(spec, c, progress, start, results), daemon=True,
                         name=f"mllp-client-{c}") for c in range(spec.connections)]
    out = RunResult()
    started: list[Any] = []
    finished = False

    def check_children() -> None:
        crashed = [p.name for p in started if p.exitcode not in (None, 0)]
        if crashed:
            raise RuntimeError(f"client process(es) died: {', '.join(crashed)}")

    try:
        for p in procs:
            p.start()
            started.append(p)
        ready = 0
        t_limit = time.monotonic() + STARTUP_TIMEOUT
        while ready < spec.connections:
            if time.monotonic() > t_limit:
                raise TimeoutError(f"clients not connected after {STARTUP_TIMEOUT:.0f} s")
            try:
                msg = results.get(timeout=0.1)
            except queue.Empty:
                check_children()
                continue
            if msg[0] == "ready":
                ready += 1
            else:  # a client failed before it was ready
                raise RuntimeError(msg[2]["error"] or "client failed to start")
        start.set()
        done: dict[int, dict[str, Any]] = {}
        t_limit = time.monotonic() + deadline
        while len(done) < spec.connections:
            if time.monotonic() > t_limit:
                raise TimeoutError(f"scenario not finished after {deadline:.0f} s")
            try:
                msg = results.get(timeout=0.02)
            except queue.Empty:
                msg = None
                check_children()
            if msg is not None and msg[0] == "done":
                done[msg[1]] = msg[2]
            if on_progress is not None:
                on_progress(sum(progress))
        if on_progress is not None:
            on_progress(sum(progress))
        lats: list[float] = []
        for d in done.values():
            a = array("d")
            a.frombytes(d["latencies"])
            lats.extend(a)
            out.failed += d["failed"]
            out.failures.extend(d["failures"])
            if d["error"]:
                out.errors.append(d["error"])
        out.messages = sum(d["sent"] for d in done.values())
        active = [d for d in done.values() if d["sent"]]
        if active:
            out.seconds = max(d["t_end"] for d in active) - min(d["t_start"] for d in active)
        lats.sort()
        out.latencies = lats
        finished = True
        return out
    finally:
        for p in started:
            if not finished:
                p.terminate()
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        results.close()


def warm_up(host: str, port: int, count: int, timeout: float, ca: str = "") -> list[str]:
    """A few messages (their own tag, so own patients) before timing: imports, caches, the first pages."""
    problems: list[str] = []
    if count <= 0:
        return problems
    mc = MLLPConnection(host, port, timeout, ca)
    try:
        for i in range(count):
            ctl, data = build_message(i, "W")
            problem = ack_problem(mc.exchange(frame(data)), ctl)
            if problem is not None:
                problems.append(problem)
    finally:
        mc.close()
    return problems


# =====================================================================================================
# Baseline server (run as: mllp_ingest.py --baseline-server DB): raw store + commit + template ACK
# =====================================================================================================

class BaselineStore:
    """One table of raw frames, written by one thread with group commit (as the engine's writer)."""

    def __init__(self, target: str, synchronous: str) -> None:
        self.target = target
        self.synchronous = synchronous
        self.is_pg = target.startswith("postgresql")
        self._queue: queue.Queue[tuple[bytes, str, Future[None]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.settings = ""

    def _connect(self) -> Any:
        return self._connect_pg() if self.is_pg else self._connect_sqlite()

    def _connect_pg(self) -> Any:
        import psycopg
        url = re.sub(r"^postgresql\+\w+://", "postgresql://", self.target)
        conn = psycopg.connect(url, autocommit=False)
        conn.execute("CREATE TABLE IF NOT EXISTS raw_messages (id BIGSERIAL PRIMARY KEY, "
                     "received_at DOUBLE PRECISION NOT NULL, control_id TEXT, raw BYTEA NOT NULL)")
        row = conn.execute("SHOW synchronous_commit").fetchone()
        conn.commit()
        self.settings = f"synchronous_commit={row[0] if row else '?'}"
        return conn

    def _connect_sqlite(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.target, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("CREATE TABLE IF NOT EXISTS raw_messages (id INTEGER PRIMARY KEY, received_at REAL NOT NULL, "
                     "control_id TEXT, raw BLOB NOT NULL)")
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        sync = conn.execute("PRAGMA synchronous").fetchone()[0]
        self.settings = f"journal_mode={mode} synchronous={['OFF', 'NORMAL', 'FULL', 'EXTRA'][sync]}"
        return conn

    def start(self) -> None:
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="baseline-writer", daemon=True)
        self._thread.start()
        ready.result(STARTUP_TIMEOUT)

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(STOP_TIMEOUT)

    def submit(self, raw: bytes, control: str) -> Future[None]:
        fut: Future[None] = Future()
        self._queue.put((raw, control, fut))
        return fut

    def _run(self, ready: Future[None]) -> None:
        try:
            conn = self._connect()
        except Exception as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        sql = "INSERT INTO raw_messages (received_at, control_id, raw) VALUES (%s, %s, %s)" if self.is_pg else \
            "INSERT INTO raw_messages (received_at, control_id, raw) VALUES (?, ?, ?)"
        stopping = False
        try:
            while not stopping:
                first = self._queue.get()
                if first is None:
                    break
                batch = [first]
                while len(batch) < 256:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stopping = True
                        break
                    batch.append(nxt)
                try:
                    if self.is_pg:
                        with conn.cursor() as cur:
                            for raw, ctl, _f in batch:
                                cur.execute(sql, (time.time(), ctl, raw))
                        conn.commit()
                    else:
                        conn.execute("BEGIN IMMEDIATE")
                        for raw, ctl, _f in batch:
                            conn.execute(sql, (time.time(), ctl, raw))
                        conn.execute("COMMIT")
                except Exception as exc:
                    with contextlib.suppress(Exception):
                        conn.rollback() if self.is_pg else conn.execute("ROLLBACK")
                    for _r, _c, f in batch:
                        f.set_exception(exc)
                    continue
                for _r, _c, f in batch:
                    f.set_result(None)
        finally:
            conn.close()


def template_ack(raw: bytes, code_ok: str = "AA") -> tuple[str, bytes]:
    """(MSH-10, ACK) from the first segment only: MSH-10, sender, receiver, MSH-15 for CA vs AA."""
    head = raw.split(b"\r", 1)[0].decode("latin-1")
    parts = head.split("|")

    def get(n: int) -> str:  # MSH-n is parts[n - 1]
        return parts[n - 1] if len(parts) >= n else ""

    control = get(10)
    code = "CA" if get(15) else code_ok
    ack = (f"MSH|^~\\&|{get(5)}|{get(6)}|{get(3)}|{get(4)}|{time.strftime('%Y%m%d%H%M%S')}||ACK|"
           f"B{control}|P|{get(12)}\rMSA|{code}|{control}\r")
    return control, ack.encode("latin-1")


async def baseline_serve(target: str, synchronous: str) -> None:
    store = BaselineStore(target, synchronous)
    store.start()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        try:
            while True:
                data = await reader.read(256 * 1024)
                if not data:
                    return
                buf += data
                while (end := buf.find(EB)) >= 0:
                    start = buf.find(SB)
                    raw = buf[start + 1:end] if 0 <= start < end else buf[:end]
                    buf = buf[end + 1:].lstrip(b"\r\n")
                    control, ack = template_ack(raw)
                    await asyncio.wrap_future(store.submit(raw, control))
                    writer.write(SB + ack + EB + CR)
                    await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, HOST, 0, reuse_address=True, limit=1024 * 1024)
    port = server.sockets[0].getsockname()[1]
    print(f"baseline listening on {HOST}:{port} ({store.settings})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()
    await asyncio.to_thread(store.stop)


# =====================================================================================================
# Server processes, /proc sampling
# =====================================================================================================



def proc_cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields_ = fh.read().rsplit(")", 1)[1].split()
        return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0




class ServerProcess:
    """A server subprocess whose stdout names its port; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], cwd: Path, port_re: str) -> None:
        self.name = name
        self.out_path = cwd / f"{name}.out"
        self.err_path = cwd / f"{name}.err"
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in stop()
        self._err = open(self.err_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        try:
            self.port = self._wait_port(port_re)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_port(self, port_re: str) -> int:
        t_limit = time.monotonic() + STARTUP_TIMEOUT
        pattern = re.compile(port_re)
        while time.monotonic() < t_limit:
            m = pattern.search(self.out_path.read_text(encoding="utf-8", errors="replace"))
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before listening:\n{self.tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not listening after {STARTUP_TIMEOUT:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        text = ""
        for p in (self.out_path, self.err_path):
            with contextlib.suppress(OSError):
                text += "\n".join(p.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]) + "\n"
        return text

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
        self._err.close()
        return self.proc.returncode


class Profiler:
    """py-spy attached to a running server (optional: --profile-engine)."""

    def __init__(self, pid: int, out: Path, rate: int) -> None:
        self.out = out
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                                      "--threads", "--function", "--nonblocking", "--output", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent)
        time.sleep(1.0)  # py-spy needs a moment to attach
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise RuntimeError(f"py-spy did not start: {err.strip()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def summarize_profile(path: Path, top: int = 20) -> str:
    """Sample shares from py-spy's raw (collapsed) output: per thread, engine functions inclusive, self."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    if not path.exists():
        return f"(no profile written to {path})"
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        n = int(count_text)
        thread, *frames = stack.split(";")
        threads[re.sub(r"^thread \(0x[0-9a-fA-F]+\)|\(\d+\)", "", thread).strip(" :") or thread] += n
        total += n
        if frames:
            own[frames[-1]] += n
            for f in set(frames):
                if "(engine/" in f:
                    incl[f] += n
    if not total:
        return "(profile is empty)"
    lines = [f"py-spy profile {path} ({total} samples of active threads)", "  by thread:"]
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in threads.most_common()]
    lines.append("  engine functions, inclusive:")
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in incl.most_common(top)]
    lines.append("  self (innermost Python frame; time in C code counts for its caller):")
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    return "\n".join(lines)


# =====================================================================================================
# Scenarios
# =====================================================================================================

@dataclass
class Backend:
    name: str  # sqlite | postgres
    admin_url: str = ""  # postgres: where throwaway databases are created


@dataclass
class RssSample:
    percent: int  # of the scenario's messages acknowledged; -1: before the timed run
    rss_kb: int  # VmRSS
    anon_kb: int  # RssAnon: the heap, without mapped files (SQLite's -shm, shared libraries)


def rss_sample(pid: int, percent: int) -> RssSample:
    return RssSample(percent, proc_status(pid, "VmRSS"), proc_status(pid, "RssAnon"))


@dataclass
class Scenario:
    label: str
    backend: str
    kind: str  # baseline | engine
    connections: int
    result: RunResult
    cpu_seconds: float = 0.0
    rss: list[RssSample] = field(default_factory=list)  # the first one before the timed run
    hwm_kb: int = 0
    applied: str = ""
    notes: list[str] = field(default_factory=list)


class Workspace:
    """Temp dirs and throwaway PostgreSQL databases, removed on exit (unless --keep-tmp)."""

    def __init__(self, root: str | None, keep: bool) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="radbridge-bench-", dir=root))
        self.keep = keep
        self._pg: list[tuple[str, str]] = []  # (admin url, database name)
        self._n = 0

    def subdir(self, name: str) -> Path:
        self._n += 1
        d = self.dir / f"{self._n:02d}-{name}"
        d.mkdir()
        return d

    def pg_database(self, admin_url: str) -> str:
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url
        name = f"radbridge_bench_{uuid.uuid4().hex[:12]}"
        eng = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 10})
        try:
            with eng.connect() as c:
                c.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            eng.dispose()
        self._pg.append((admin_url, name))
        return make_url(admin_url).set(database=name).render_as_string(hide_password=False)

    def close(self) -> None:
        if self._pg:
            from sqlalchemy import create_engine, text
            for admin_url, name in self._pg:
                try:
                    eng = create_engine(admin_url, isolation_level="AUTOCOMMIT")
                    with eng.connect() as c:
                        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                    eng.dispose()
                except Exception as exc:
                    print(f"warning: could not drop database {name}: {exc}", file=sys.stderr)
            self._pg.clear()
        if self.keep:
            print(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)




def engine_env(storage: Path, database_url: str, synchronous: str, src: Path = REPO) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADBRIDGE_")}
    env.update({
        "RADBRIDGE_STORAGE_DIR": str(storage / "var"),
        "RADBRIDGE_DATABASE_URL": database_url,
        "RADBRIDGE_DATABASE_SQLITE_SYNCHRONOUS": synchronous,
        "RADBRIDGE_MLLP_PORT": "0",
        "RADBRIDGE_HTTP_PORT": "0",
        "RADBRIDGE_DICOM_PORT": "0",  # the shipped DICOM channel: not 11112, which another engine may hold
        "RADBRIDGE_BIND": HOST,
        "RADBRIDGE_RETENTION_ENABLED": "false",
        "RADBRIDGE_CHANNELS_DIR": str(src / "channels"),
        "RADBRIDGE_MAPPINGS_DIR": str(src / "mappings"),
        "RADBRIDGE_API_TOKEN": "bench",
        "PYTHONPATH": os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH", "")) if p),
    })
    return env


def check_applied(database_url: str, *, timed: int, warmup: int, connections: int) -> tuple[str, bool]:
    """Count what the engine's store holds after a run against what the messages should have done.

    Every A01 carries three identifiers (MR, SS, PI). Over one connection they arrive in order and
    every patient must end with three. Over several, an order or A08 for a patient may overtake its
    A01; the engine then treats the A01 as stale (older event time), so fewer identifiers are fine.
    """
    from sqlalchemy import func, select

    from engine.store.db import open_database
    from engine.store.models import Message, MessageEvent, Order, Patient, PatientIdentifier

    exp_patients, exp_orders = expected_effects(range(timed))
    w_patients, w_orders = expected_effects(range(warmup))
    exp_patients += w_patients
    exp_orders += w_orders
    db = open_database(database_url)
    try:
        with db.read_session() as s:
            statuses = dict(s.execute(select(Message.status, func.count()).group_by(Message.status)).all())
            patients = s.scalar(select(func.count()).select_from(Patient)) or 0
            idents = s.scalar(select(func.count()).select_from(PatientIdentifier)) or 0
            orders = s.scalar(select(func.count()).select_from(Order)) or 0
            noted = s.scalar(select(func.count()).select_from(MessageEvent).where(MessageEvent.kind == "notes")) or 0
    finally:
        db.dispose()
    processed = statuses.get("processed", 0)
    idents_ok = idents == 3 * exp_patients if connections == 1 else exp_patients <= idents <= 3 * exp_patients
    ok = processed == timed + warmup and patients == exp_patients and orders == exp_orders and idents_ok
    others = ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()) if k != "processed")
    text = (f"messages processed {processed}/{timed + warmup}{f' ({others})' if others else ''}; "
            f"patients {patients}/{exp_patients}; identifiers {idents}/{3 * exp_patients}; "
            f"orders {orders}/{exp_orders}; messages with notes {noted} -> {'OK' if ok else 'MISMATCH'}")
    return text, ok


@dataclass
class Options:
    messages: int
    connections: list[int]
    warmup: int
    timeout: float
    synchronous: str
    backends: list[Backend]
    profile_dir: Path | None
    profile_rate: int
    engine_src: Path = REPO
    tls: bool = False  # each engine run again with MLLP/TLS on its channel (kind engine-tls)


class Bench:
    def __init__(self, opts: Options, ws: Workspace) -> None:
        self.opts = opts
        self.ws = ws
        self._tags = 0

    def _tag(self) -> str:
        self._tags += 1
        return f"T{self._tags}"

    def deadline(self, n: int) -> float:
        return 120.0 + n * 0.05  # at least 20 msg/s before we call it stuck

    def _measure(self, server: ServerProcess, sc: Scenario, spec: ClientSpec, samples: Sequence[int],
                 live: bool = False) -> None:
        """Drive the clients; sample the server's RSS at these percentages of messages acknowledged."""
        pending = sorted(samples)
        total = spec.total
        t0 = time.monotonic()

        def on_progress(done: int) -> None:
            while pending and done * 100 >= pending[0] * total:
                sample = rss_sample(server.pid, pending.pop(0))
                sc.rss.append(sample)
                if live:
                    print(f"  {sample.percent:3d}%  {done:>9} messages  {time.monotonic() - t0:7.1f} s  "
                          f"RSS {mib(sample.rss_kb)} MiB (anon {mib(sample.anon_kb)})", flush=True)

        sc.rss.append(rss_sample(server.pid, -1))
        cpu0 = proc_cpu_seconds(server.pid)
        sc.result = drive(spec, deadline=self.deadline(total), on_progress=on_progress)
        sc.cpu_seconds = proc_cpu_seconds(server.pid) - cpu0
        sc.hwm_kb = proc_status(server.pid, "VmHWM")

    def run_baseline(self, backend: Backend, connections: int, n: int) -> Scenario:
        d = self.ws.subdir(f"baseline-{backend.name}-{connections}")
        target = self.ws.pg_database(backend.admin_url) if backend.name == "postgres" else str(d / "baseline.db")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RADBRIDGE_")}
        server = ServerProcess("baseline", [sys.executable, str(Path(__file__).resolve()), "--baseline-server",
                                            target, "--sqlite-synchronous", self.opts.synchronous],
                               env=env, cwd=d, port_re=r"baseline listening on [\d.]+:(\d+)")
        sc = Scenario(f"baseline {backend.name}", backend.name, "baseline", connections, RunResult())
        try:
            m = re.search(r"\((.*)\)", server.out_path.read_text())
            if m:
                sc.notes.append(m.group(1))
            problems = warm_up(HOST, server.port, self.opts.warmup, self.opts.timeout)
            sc.notes += [f"warm-up: {p}" for p in problems[:3]]
            spec = ClientSpec(HOST, server.port, self._tag(), n, connections, self.opts.timeout)
            self._measure(server, sc, spec, (10, 50, 100))
        finally:
            code = server.stop()
            if code not in (0, None):
                sc.notes.append(f"baseline exited with {code}: {server.tail(5)}")
        return sc

    def tls_channels(self, d: Path) -> tuple[Path, str]:
        """A copy of the engine's channels/ whose MLLP channel speaks TLS with a test certificate
        (tests/certs.py), and the CA the clients check it with."""
        sys.path.insert(0, str(REPO))
        from tests.certs import make_pki
        pki = make_pki(d / "pki")
        channels = d / "channels"
        shutil.copytree(self.opts.engine_src / "channels", channels)
        path = channels / f"{CHANNEL}.yaml"
        path.write_text(path.read_text() + f"\ntls:\n  cert: {pki.server.cert}\n  key: {pki.server.key}\n")
        return channels, str(pki.ca)

    def run_engine(self, backend: Backend, connections: int, n: int, samples: Sequence[int] = (10, 50, 100),
                   label: str = "", live: bool = False, tls: bool = False) -> Scenario:
        d = self.ws.subdir(f"engine{'-tls' if tls else ''}-{backend.name}-{connections}")
        url = self.ws.pg_database(backend.admin_url) if backend.name == "postgres" else \
            f"sqlite:///{d / 'var' / 'radbridge.db'}"
        env = engine_env(d, url, self.opts.synchronous, self.opts.engine_src)
        ca = ""
        if tls:
            channels, ca = self.tls_channels(d)
            env["RADBRIDGE_CHANNELS_DIR"] = str(channels)
        server = ServerProcess("engine", [sys.executable, "-m", "engine.cli", "run"], env=env, cwd=d,
                               port_re=rf"{CHANNEL} on [\d.]+:(\d+)")
        sc = Scenario(label or f"engine {backend.name}{' tls' if tls else ''}", backend.name,
                      "engine-tls" if tls else "engine", connections, RunResult())
        tag = self._tag()
        profiler: Profiler | None = None
        try:
            problems = warm_up(HOST, server.port, self.opts.warmup, self.opts.timeout, ca)
            sc.notes += [f"warm-up: {p}" for p in problems[:3]]
            if self.opts.profile_dir is not None:
                out = self.opts.profile_dir / f"engine-{backend.name}-{connections}conn-{n}.txt"
                profiler = Profiler(server.pid, out, self.opts.profile_rate)
            spec = ClientSpec(HOST, server.port, tag, n, connections, self.opts.timeout, ca)
            try:
                self._measure(server, sc, spec, samples, live)
            finally:
                if profiler is not None:
                    profiler.stop()
                    sc.notes.append(summarize_profile(profiler.out))
        finally:
            code = server.stop()
            if code not in (0, None):
                sc.notes.append(f"engine exited with {code}: {server.tail(10)}")
        try:
            sc.applied, ok = check_applied(url, timed=sc.result.messages, warmup=self.opts.warmup,
                                           connections=connections)
            if not ok:
                sc.notes.append("engine log tail:\n" + server.tail(15))
        except Exception as exc:
            sc.applied = f"could not check the store: {type(exc).__name__}: {exc}"
        return sc


# =====================================================================================================
# SQL statements per message (in-process, a steadier figure than msg/s)
# =====================================================================================================
STATEMENT_BATCHES = (1, 8)


def statements_worker(database_url: str, batch: int, n: int, src: Path) -> None:
    """Apply ``n`` timed-set messages through the engine's own stage and group-commit writer (from
    ``src``, on PYTHONPATH), ``batch`` jobs per COMMIT, counting the DBAPI calls (``execute`` and
    ``executemany``, each one round trip to a server; COMMIT not included); prints one line."""
    from sqlalchemy import event

    from engine.config import load_settings
    from engine.pipeline.hl7_inbound import HL7Inbound
    from engine.pipeline.writer import InlineWriter
    from engine.runtime import load_definitions
    from engine.store import migrate
    from engine.store.db import open_database

    calls, trips, piped = [0], [0], [False]  # PostgreSQL: round trips (a pipelined run counts once)
    storage = Path(tempfile.mkdtemp(prefix="radbridge-statements-"))
    env = engine_env(storage, database_url, "FULL", src)
    settings = load_settings(None, env=env)
    registry, channels, _problems = load_definitions(settings)
    inbound = HL7Inbound(next(c for c in channels if c.name == CHANNEL), registry)
    db = open_database(database_url)
    migrate.upgrade(db)
    db.writer.dispose()  # the writer's connections from here on are counted

    if db.is_sqlite:
        class SqliteCursor(sqlite3.Cursor):
            def execute(self, *a: Any) -> Any:
                calls[0] += 1
                return super().execute(*a)

            def executemany(self, *a: Any) -> Any:
                calls[0] += 1
                return super().executemany(*a)

        class SqliteConnection(sqlite3.Connection):
            def cursor(self, factory: Any = SqliteCursor) -> Any:
                return super().cursor(factory)

        connection_args: dict[str, Any] = {"factory": SqliteConnection}
    else:
        import psycopg

        class PgCursor(psycopg.Cursor[Any]):
            def execute(self, *a: Any, **kw: Any) -> Any:
                calls[0] += 1
                if self.connection.pgconn.pipeline_status:  # pipeline mode: a run of them is one round trip
                    trips[0] += 0 if piped[0] else 1
                    piped[0] = True
                else:
                    trips[0] += 1
                    piped[0] = False
                return super().execute(*a, **kw)

            def executemany(self, *a: Any, **kw: Any) -> Any:
                calls[0] += 1
                trips[0] += 0 if piped[0] and self.connection.pgconn.pipeline_status else 1
                return super().executemany(*a, **kw)

        connection_args = {"cursor_factory": PgCursor}

    @event.listens_for(db.writer, "do_connect")
    def _counting(_dialect: Any, _rec: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        cparams.update(connection_args)

    async def run() -> int:
        writer = InlineWriter(db.writer)
        writer.start()
        await writer.run(lambda _s: None)  # connect (PRAGMAs) before counting
        calls[0] = trips[0] = 0
        for start in range(0, n, batch):  # jobs submitted in one loop iteration share one COMMIT
            prepared = [inbound.prepare(build_message(i, "S")[1], "bench") for i in range(start, min(n, start + batch))]
            futures = [writer.submit(functools.partial(inbound.apply, p=p)) for p in prepared]
            for f in futures:
                await asyncio.wrap_future(f)
        counted = calls[0]
        writer.stop()
        return counted

    try:
        counted = asyncio.run(run())
    finally:
        db.dispose()
        shutil.rmtree(storage, ignore_errors=True)
    print(f"statements {counted / n:.2f}" + (f" round-trips {trips[0] / n:.2f}" if trips[0] else ""))


def statements_per_message(opts: Options, ws: Workspace, backend: Backend, batch: int, n: int = 200) -> str:
    url = ws.pg_database(backend.admin_url) if backend.name == "postgres" else \
        f"sqlite:///{ws.subdir(f'statements-{batch}') / 'radbridge.db'}"
    env = engine_env(ws.dir, url, opts.synchronous, opts.engine_src)
    run = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--statements-worker", url,
                          "--statements-batch", str(batch), "--messages", str(n), "--engine-src",
                          str(opts.engine_src)], env=env, capture_output=True, text=True, timeout=300)
    m = re.search(r"statements ([\d.]+)(?: round-trips ([\d.]+))?", run.stdout)
    if m is None:
        print(f"  statements per message not counted: {run.stderr.strip()[-300:]}", file=sys.stderr)
        return "?"
    return m.group(1) + (f" ({m.group(2)} round trips)" if m.group(2) else "")


# =====================================================================================================
# Output
# =====================================================================================================



def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def print_table(scenarios: list[Scenario]) -> dict[str, float]:
    """One row per run; an engine run's ratio is against the median baseline of its backend and connections.
    Returns the median msg/s of each scenario kind, backend and connection count (``--json``)."""
    rates: dict[tuple[str, str, int], list[float]] = {}
    for s in scenarios:
        rates.setdefault((s.kind, s.backend, s.connections), []).append(s.result.rate)
    baseline = {(b, c): _median(v) for (k, b, c), v in rates.items() if k == "baseline"}
    head = (f"{'scenario':<18}{'conns':>6}{'messages':>10}{'msg/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
            f"{'srv CPU ms/msg':>16}{'srv CPU %':>11}{'failed':>8}{'ratio':>8}")
    print()
    print(head)
    print("-" * len(head))
    for s in scenarios:
        r = s.result
        base = baseline.get((s.backend, s.connections))
        ratio = f"{r.rate / base:.2f}" if s.kind == "engine" and base else "-"
        cpu_ms = 1000 * s.cpu_seconds / r.messages if r.messages else math.nan
        cpu_pct = 100 * s.cpu_seconds / r.seconds if r.seconds else math.nan
        mx = r.latencies[-1] * 1000 if r.latencies else math.nan
        print(f"{s.label:<18}{s.connections:>6}{r.messages:>10}{r.rate:>10.0f}{r.percentile(50):>9.2f}"
              f"{r.percentile(99):>9.2f}{mx:>9.1f}{cpu_ms:>16.3f}{cpu_pct:>11.0f}{r.failed + len(r.errors):>8}"
              f"{ratio:>8}")
    repeated = [(b, c) for (k, b, c), v in rates.items() if k == "engine" and len(v) > 1 and (b, c) in baseline]
    if repeated:
        print("\nmedians:")
        for b, c in repeated:
            eng = rates[("engine", b, c)]
            ref = rates[("baseline", b, c)]
            print(f"  {b} x{c}: engine {_median(eng):.0f} msg/s (min {min(eng):.0f}, max {max(eng):.0f}), baseline "
                  f"{_median(ref):.0f} msg/s (min {min(ref):.0f}, max {max(ref):.0f}), ratio "
                  f"{_median(eng) / _median(ref):.2f}")
    tls_pairs = [(b, c) for (k, b, c) in rates if k == "engine-tls" and ("engine", b, c) in rates]
    if tls_pairs:
        print("\nTLS cost (engine with MLLP/TLS against the same engine plain, medians of this run):")
        for b, c in tls_pairs:
            plain, tls = _median(rates[("engine", b, c)]), _median(rates[("engine-tls", b, c)])
            print(f"  {b} x{c}: plain {plain:.0f} msg/s, TLS {tls:.0f} msg/s: TLS costs {100 * (1 - tls / plain):.1f} %")
    print()
    for s in scenarios:
        rss = ", ".join(f"{'start' if r.percent < 0 else f'{r.percent}%'} {mib(r.rss_kb)} ({mib(r.anon_kb)})"
                        for r in s.rss)
        print(f"{s.label} x{s.connections}: RSS MiB (anon) {rss}; peak (VmHWM) {mib(s.hwm_kb)}")
        if s.applied:
            print(f"  applied: {s.applied}")
        for e in s.result.errors:
            print(f"  client error: {e}")
        for f in s.result.failures:
            print(f"  bad ACK: {f}")
        for note in s.notes:
            print("  " + note.replace("\n", "\n  "))
    return {f"{k} {b} x{c} msg/s": _median(v) for (k, b, c), v in rates.items()}


# =====================================================================================================
# CLI
# =====================================================================================================

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=5000, help="timed messages per scenario (default 5000)")
    ap.add_argument("--connections", default="1,8", help="comma-separated connection counts (default 1,8)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each baseline/engine pair this many times, alternating; ratios use median rates")
    ap.add_argument("--warmup", type=int, default=100,
                    help="untimed messages before each scenario, on one connection (default 100)")
    ap.add_argument("--postgres", metavar="URL", default="",
                    help="also run against PostgreSQL: an admin URL where a throwaway database may be created "
                         "(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/postgres); dropped afterwards")
    ap.add_argument("--memory-run", type=int, default=0, metavar="N",
                    help="instead of the comparison: one engine run of N messages, RSS every 10%%")
    ap.add_argument("--memory-connections", type=int, default=8,
                    help="connections for --memory-run (default 8)")
    ap.add_argument("--sqlite-synchronous", default="FULL", choices=("OFF", "NORMAL", "FULL", "EXTRA"),
                    help="PRAGMA synchronous for engine and baseline alike (default FULL, the engine's default)")
    ap.add_argument("--timeout", type=float, default=30.0, help="socket timeout in seconds (default 30)")
    ap.add_argument("--tls", action="store_true",
                    help="run the engine plain and with MLLP/TLS (a test certificate) in turn, no baseline, and "
                         "print what TLS costs")
    ap.add_argument("--tmpdir", default=None, help="where the temp storage goes (default: the system temp dir)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep databases and server logs for inspection")
    ap.add_argument("--profile-engine", metavar="DIR", default=None,
                    help="attach py-spy to the engine during timed runs; raw stacks in DIR, summary printed")
    ap.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second (default 200)")
    ap.add_argument("--engine-src", metavar="DIR", default=str(REPO),
                    help="source tree to run the engine from, e.g. an exported older commit to compare "
                         "(default: this repository); its channels/ and mappings/ are used")
    ap.add_argument("--baseline-server", metavar="DB", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--statements-worker", metavar="URL", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--statements-batch", type=int, default=1, help=argparse.SUPPRESS)
    json_option(ap)
    args = ap.parse_args(argv)
    try:
        args.connection_counts = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        ap.error("--connections: comma-separated integers, e.g. 1,8")
    if not args.connection_counts or min(args.connection_counts) < 1 or args.messages < 1 or args.repeat < 1:
        ap.error("--messages, --repeat and every --connections value must be at least 1")
    if args.messages < max(args.connection_counts):
        ap.error("--messages must be at least the number of connections")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.baseline_server:
        asyncio.run(baseline_serve(args.baseline_server, args.sqlite_synchronous))
        return 0
    if args.statements_worker:
        statements_worker(args.statements_worker, args.statements_batch, args.messages, Path(args.engine_src))
        return 0

    def on_term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    backends = [Backend("sqlite")]
    if args.postgres:
        backends.append(Backend("postgres", args.postgres))
    profile_dir = Path(args.profile_engine).resolve() if args.profile_engine else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    opts = Options(messages=args.messages, connections=args.connection_counts, warmup=args.warmup,
                   timeout=args.timeout, synchronous=args.sqlite_synchronous, backends=backends,
                   profile_dir=profile_dir, profile_rate=args.profile_rate,
                   engine_src=Path(args.engine_src).resolve(), tls=args.tls)
    ws = Workspace(args.tmpdir, args.keep_tmp)
    print(f"radbridge MLLP ingest benchmark: {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}, "
          f"storage in {ws.dir}, SQLite synchronous={args.sqlite_synchronous}, warm-up {args.warmup} msg, "
          f"engine from {describe_source(opts.engine_src)}")
    scenarios: list[Scenario] = []
    bench = Bench(opts, ws)
    failed = False
    try:
        if args.memory_run:
            for b in backends:
                print(f"memory run: engine {b.name}, {args.memory_run} messages over "
                      f"{args.memory_connections} connection(s) ...", flush=True)
                sc = bench.run_engine(b, args.memory_connections, args.memory_run, samples=range(10, 101, 10),
                                      label=f"engine {b.name} mem", live=True)
                scenarios.append(sc)
        else:
            for b in backends:
                if not opts.tls:
                    counts = {k: statements_per_message(opts, ws, b, k) for k in STATEMENT_BATCHES}
                    print(f"SQL statements per message, {b.name} (DBAPI calls, COMMIT not counted): "
                          + ", ".join(f"{v} in batches of {k}" for k, v in counts.items()), flush=True)
                for c in opts.connections:
                    for rep in range(1, args.repeat + 1):
                        for kind in (("engine", "engine-tls") if opts.tls else ("baseline", "engine")):
                            what = f" (run {rep} of {args.repeat})" if args.repeat > 1 else ""
                            print(f"{kind} {b.name}, {opts.messages} messages over {c} connection(s){what} ...",
                                  flush=True)
                            if kind == "baseline":
                                scenarios.append(bench.run_baseline(b, c, opts.messages))
                            else:
                                scenarios.append(bench.run_engine(b, c, opts.messages, tls=kind == "engine-tls"))
        write_figures(args.json, print_table(scenarios))
        failed = any(s.result.failed or s.result.errors or "MISMATCH" in s.applied for s in scenarios)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        ws.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
