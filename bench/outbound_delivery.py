#!/usr/bin/env python3
"""Outbound delivery benchmark: from a study turning stable to the EHR accepting its ImagingStudy and
ORU^R01, and deliveries/s with a backlog of queued studies, against plain clients measured in the
same run.

Everything runs in this process on 127.0.0.1, as the tests run it: the engine on its own event loop
in a thread (``tests.conftest.RunningEngine``), the stand-in EHR (``engine.standin_ehr``) in another,
images sent with dcmtk's ``storescu``, ADT/ORM with python-hl7's MLLP client. The stand-in is
subclassed only to note, on its own thread, the moment it stores an ImagingStudy and the moment it
accepts an ORU (no polling). Phases, each on a fresh engine, database and stand-in:

* latency (settled): per study, one at a time, ADT^A04 + ORM^O01 NW for a new patient, 1-2 small CT
  instances, the images-received pass worked; then ``check_stability()`` with stable_seconds 0 (as the
  tests' ``settle``) and the time from its return to the ImagingStudy stored / the ORU accepted.
* latency (natural): an engine with a short ``stable_seconds``; nothing is forced: the time from
  the moment ``stable_seconds`` had elapsed since the study's last instance to the EHR accepting it
  (the stability poll, the reconcile loop and delivery all included).
* throughput: N studies ingested and reconciled while the stand-in is down (2N deliveries queued),
  the backlog then released at once (due now, rendered afresh) with the stand-in up: deliveries/s.
* baselines (fresh stand-in each): the same requests and messages sent by plain clients: aiohttp
  (the ImagingStudy PUTs alone, and the engine's whole FHIR request log, reference searches
  included) and a blocking socket for MLLP, sequential for latency, concurrency 4 + one MLLP
  connection at the same time for throughput.

Usage:
    python bench/outbound_delivery.py                                   # 50 + 20 latency, 1,000 queued
    python bench/outbound_delivery.py --studies 100 --latency-studies 10 --natural-studies 5
    python bench/outbound_delivery.py --db postgresql --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode


def engine_src(argv: Sequence[str]) -> Path:
    """The tree the engine is imported from: --engine-src (read before the imports), else this script's."""
    for i, a in enumerate(argv):
        if a == "--engine-src" and i + 1 < len(argv):
            return Path(argv[i + 1]).resolve()
        if a.startswith("--engine-src="):
            return Path(a.split("=", 1)[1]).resolve()
    return Path(__file__).resolve().parents[1]


REPO = engine_src(sys.argv[1:])
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import pydicom  # noqa: E402
from benchutil import describe_source, json_option, write_figures  # noqa: E402
from mllp_ingest import Profiler, summarize_profile  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from sqlalchemy import create_engine, func, select, text, update  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from engine.connectors.outbound import OutboundConnector  # noqa: E402
from engine.domain.studies import STUDIES  # noqa: E402
from engine.outbound import outbox  # noqa: E402
from engine.outbound.outbox import ATTEMPTS, DELIVERIES  # noqa: E402
from engine.standin_ehr import FS, VT, StandInEHR, msh_fields  # noqa: E402
from engine.store.types import utcnow  # noqa: E402
from tests.conftest import PG_ADMIN_URL, RunningEngine, make_settings  # noqa: E402
from tests.dicomutil import bundled  # noqa: E402
from tests.dicomutil import run as run_dcmtk  # noqa: E402  (storescu with TCP_NODELAY=1)
from tests.hl7util import ack_code, adt, orm, send_many  # noqa: E402

HOST = "127.0.0.1"
TOKEN = "tok"
ISSUER = "GENHOSP"
FAMILY, GIVEN, DOB, SEX = "Doe", "Jane", "19700101", "F"
DICOM_NAME = "DOE^JANE"
IS_SYSTEM = "urn:dicom:uid"
CONCURRENCY = 4  # channels/ehr-outbound.yaml fhir concurrency; the FHIR baseline uses the same
DELIVERY_TIMEOUT = 30.0  # seconds one study may take from stable to both deliveries
STORESCU_CHUNK = 250  # files per storescu association in the throughput setup


# =====================================================================================================
# The stand-in EHR, with the moment of acceptance noted on its own thread
# =====================================================================================================

class TimedEHR(StandInEHR):
    """StandInEHR noting (monotonic, wall) when it stores an ImagingStudy (by study UID) and when it
    accepts an ORU (with its text). Hooks the stand-in's ``_store`` and ``_mllp_answer``."""

    def __init__(self, token: str | None = TOKEN) -> None:
        super().__init__(token=token)
        self.cond = threading.Condition()
        self.study_at: dict[str, tuple[float, float]] = {}  # "urn:oid:UID" -> first store
        self.study_times: list[float] = []  # monotonic, every ImagingStudy store
        self.oru: list[tuple[float, float, str]] = []  # (monotonic, wall, text) per accepted ORU

    def _store(self, resource_type: str, rid: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        out = super()._store(resource_type, rid, body)
        if resource_type == "ImagingStudy":
            now = (time.monotonic(), time.time())
            uid = next((i.get("value") for i in body.get("identifier") or []
                        if isinstance(i, dict) and i.get("system") == IS_SYSTEM), None)
            with self.cond:
                if uid:
                    self.study_at.setdefault(str(uid), now)
                self.study_times.append(now[0])
                self.cond.notify_all()
        return out

    def _mllp_answer(self, text: str) -> str:
        answer = super()._mllp_answer(text)
        if answer in ("AA", "CA") and msh_fields(text).get(9, "").startswith("ORU"):
            now = (time.monotonic(), time.time())
            with self.cond:
                self.oru.append((now[0], now[1], text))
                self.cond.notify_all()
        return answer

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def delivered(self, key: str, accession: str, since: int) -> Callable[[], bool]:
        """Both arrived: the ImagingStudy ``key`` ("urn:oid:UID") and an ORU for ``accession``."""
        return lambda: key in self.study_at and self.oru_for(accession, since) is not None

    def oru_for(self, accession: str, since: int = 0) -> tuple[float, float, str] | None:
        needle = f"|{accession}|"
        return next((o for o in self.oru[since:] if needle in o[2]), None)


# =====================================================================================================
# Databases, engines, logs
# =====================================================================================================

class Databases:
    """SQLite files in the work directory, or throwaway PostgreSQL databases (as tests/conftest.py)."""

    def __init__(self, kind: str, admin_url: str) -> None:
        self.kind, self.admin_url = kind, admin_url
        self.created: list[str] = []
        self._admin = create_engine(admin_url, isolation_level="AUTOCOMMIT") if kind == "postgresql" else None

    def url(self, work: Path) -> str:
        if self._admin is None:
            return f"sqlite:///{work / 'var' / 'radbridge.db'}"
        name = f"radbridge_bench_{uuid.uuid4().hex[:12]}"
        with self._admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        if self._admin is None:
            return
        for name in self.created:
            try:
                with self._admin.connect() as c:
                    c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            except Exception as exc:
                print(f"warning: could not drop database {name}: {exc}", file=sys.stderr)
        self.created.clear()

    def close(self) -> None:
        self.drop_all()
        if self._admin is not None:
            self._admin.dispose()


class LogTally(logging.Handler):
    """Counts the engine's warnings and errors (and those with a stack trace), keeps a few of each."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()
        self.samples: dict[str, str] = {}  # first message of each (logger, level, message start)

    def emit(self, record: logging.LogRecord) -> None:
        key = f"{record.levelname} {record.name}: {record.getMessage()[:90]}"
        if record.exc_info:
            key += " [with stack trace]"
        self.counts[key] += 1
        if key not in self.samples and len(self.samples) < 200:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + "".join(logging.Formatter().formatException(record.exc_info).splitlines(True)[-6:])
            self.samples[key] = msg


def setup_logging(root: Path) -> LogTally:
    log = logging.getLogger()
    log.setLevel(logging.INFO)
    fh = logging.FileHandler(root / "engine.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(fh)
    tally = LogTally()
    log.addHandler(tally)
    for noisy in ("pynetdicom", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return tally


@dataclass
class Rig:
    e: RunningEngine
    ehr: TimedEHR
    work: Path

    def stop(self) -> None:
        try:
            self.e.stop()
        finally:
            self.ehr.stop()


def start_rig(dbs: Databases, work: Path, stable_seconds: float, mllp_in_flight: int = 1) -> Rig:
    """A fresh stand-in EHR and a fresh engine pointed at it (repository channels/ and mappings/;
    ``mllp_in_flight`` other than 1 is set on the outbound channel's mllp destination)."""
    work.mkdir(parents=True)
    shutil.copytree(REPO / "channels", work / "channels")
    if mllp_in_flight != 1:
        channel = work / "channels" / "ehr-outbound.yaml"
        text = channel.read_text()
        marker = "    type: mllp\n"
        if marker not in text:
            raise RuntimeError(f"no '{marker.strip()}' destination in {channel}")
        channel.write_text(text.replace(marker, marker + f"    in_flight: {mllp_in_flight}\n", 1))
    shutil.copytree(REPO / "mappings", work / "mappings")
    ehr = TimedEHR()
    ehr.start()
    try:
        s = make_settings(work, dbs.url(work))
        s.dicom.stable_seconds = stable_seconds
        s.mappings.reload_seconds = 0  # no mapping watcher polling during the measurements
        s.ehr.mllp, s.ehr.fhir_base, s.ehr.fhir_token = ehr.mllp_address, ehr.fhir_base, TOKEN
        e = RunningEngine(s).start()
    except BaseException:
        ehr.stop()
        raise
    if {d for c in e.engine.connectors_of(OutboundConnector) for d in c.service.workers} != {"fhir", "mllp"}:
        e.stop()
        ehr.stop()
        raise RuntimeError("the engine started without both delivery workers (fhir, mllp)")
    return Rig(e, ehr, work)


# =====================================================================================================
# Studies: HL7 and images (as tests/test_reconciliation.py's hl7() / store() / settle())
# =====================================================================================================

class Maker:
    """Copies of pydicom's CT_small.dcm (39 kB): one template read once, identity and UIDs set per file."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ds = pydicom.dcmread(bundled("CT_small.dcm"))
        directory.mkdir(parents=True, exist_ok=True)

    def study(self, mrn: str, accession: str, n: int) -> tuple[str, list[Path]]:
        ds = self.ds
        study_uid, series_uid = generate_uid(), generate_uid()
        ds.PatientID, ds.IssuerOfPatientID, ds.PatientName = mrn, ISSUER, DICOM_NAME
        ds.PatientBirthDate, ds.PatientSex, ds.AccessionNumber = DOB, SEX, accession
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        paths = []
        for k in range(n):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            path = self.dir / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        return study_uid, paths


@dataclass
class StudySpec:
    mrn: str
    accession: str
    study_uid: str
    files: list[Path]


def make_specs(maker: Maker, tag: str, count: int, instances: Callable[[int], int]) -> list[StudySpec]:
    out = []
    for i in range(count):
        mrn, acc = f"{tag}{i:05d}", f"A{tag}{i:05d}"
        uid, files = maker.study(mrn, acc, instances(i))
        out.append(StudySpec(mrn, acc, uid, files))
    return out


def hl7_for(specs: Sequence[StudySpec]) -> list[str]:
    msgs = []
    for sp in specs:
        msgs.append(adt("A04", sp.mrn, FAMILY, GIVEN, dob=DOB, sex=SEX, issuer=ISSUER))
        msgs.append(orm("NW", f"P{sp.accession}", sp.accession, sp.mrn, family=FAMILY, modality="CT",
                        proc="CTHEAD^CT head^L", issuer=ISSUER))
    return msgs


def send_hl7(e: RunningEngine, msgs: list[str]) -> None:
    for reply in send_many(e.mllp_port, msgs):
        if ack_code(reply) != "AA":
            raise RuntimeError(f"HL7 not accepted: {reply[:300]!r}")


def send_images(e: RunningEngine, files: list[Path]) -> None:
    for start in range(0, len(files), STORESCU_CHUNK):
        chunk = files[start:start + STORESCU_CHUNK]
        proc = run_dcmtk(["storescu", "-aet", "BENCHSCU", "-aec", "RADBRIDGE", HOST, str(e.dicom_port),
                          *map(str, chunk)], timeout=60 + 0.5 * len(chunk))
        if proc.returncode != 0:
            raise RuntimeError(f"storescu exit {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")


def drain(e: RunningEngine, deadline_s: float = 600.0) -> None:
    """Work the reconciliation queue until a pass does nothing (bounded)."""
    t_end = time.monotonic() + deadline_s
    while time.monotonic() < t_end:
        if e.call(e.engine.reconcile_pending(), timeout=max(1.0, t_end - time.monotonic())) == 0:
            return
    raise TimeoutError(f"reconciliation queue not empty after {deadline_s:.0f} s")


def mark_stable_now(e: RunningEngine) -> int:
    """What settle() does: one stability check with stable_seconds 0 (at most 500 studies a call)."""
    d = e.engine.settings.dicom
    old, d.stable_seconds = d.stable_seconds, 0
    try:
        return int(e.call(e.engine.check_stability(), timeout=120))
    finally:
        d.stable_seconds = old


def db_read(e: RunningEngine, fn: Callable[[Any], Any]) -> Any:
    with e.db.reader.connect() as conn:
        return fn(conn)


def db_write(e: RunningEngine, fn: Callable[[Any], Any], timeout: float = 60.0) -> Any:
    """A write through the engine's own writer (on its loop), as the CLI's operators do."""
    return e.call(e.engine.writer.run(lambda s: fn(s.connection())), timeout=timeout)


def delivery_counts(e: RunningEngine) -> dict[str, dict[str, int]]:
    return db_read(e, outbox.counts)


def study_states(e: RunningEngine) -> dict[str, int]:
    """Studies per (state, reconciliation state)."""
    return db_read(e, lambda c: {f"{st}/{rs}": k for st, rs, k in c.execute(
        select(STUDIES.c.state, STUDIES.c.recon_state, func.count()).group_by(STUDIES.c.state, STUDIES.c.recon_state))})


# =====================================================================================================
# Figures
# =====================================================================================================

def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p99 of fewer than 100 values is the maximum)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


@dataclass
class Series:
    label: str
    ms: list[float] = field(default_factory=list)

    def row(self) -> dict[str, float]:
        return {"n": len(self.ms), "p50": pct(self.ms, 50), "p99": pct(self.ms, 99),
                "max": max(self.ms) if self.ms else math.nan}


@dataclass
class Rate:
    label: str
    n: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else math.nan


@dataclass
class Round:
    latency: dict[str, Series] = field(default_factory=dict)
    natural: dict[str, Series] = field(default_factory=dict)
    rates: dict[str, Rate] = field(default_factory=dict)
    info: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)  # flat, for the medians over rounds


# =====================================================================================================
# Plain clients (the baselines)
# =====================================================================================================

@dataclass
class Req:
    method: str
    path: str  # /fhir/Type
    query: dict[str, str]
    body: Any

    def url(self, base_root: str) -> str:
        q = urlencode(self.query, safe="|:", quote_via=quote) if self.query else ""
        return base_root + self.path + (f"?{q}" if q else "")


def fhir_log(ehr: StandInEHR, start: int = 0, end: int | None = None) -> list[Req]:
    return [Req(r["method"], r["path"], dict(r.get("query") or {}), r.get("body"))
            for r in ehr.fhir_requests[start:end]]


def is_put(r: Req) -> bool:
    return r.method == "PUT" and r.path.endswith("/ImagingStudy")


async def replay(base_root: str, groups: list[list[Req]], concurrency: int,
                 deadline_s: float) -> list[tuple[float, float, list[int]]]:
    """Each group's requests in order (its requests one after another); ``concurrency`` groups at
    once over one aiohttp session (keep-alive, at most ``concurrency`` connections). Returns per group
    (start, end, statuses), monotonic."""
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json",
               "Authorization": f"Bearer {TOKEN}"}
    timeout = aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT)
    out: list[tuple[float, float, list[int]]] = [(0.0, 0.0, [])] * len(groups)
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def one(i: int, group: list[Req]) -> None:
            async with sem:
                t0 = time.monotonic()
                statuses = []
                for r in group:
                    data = json.dumps(r.body, ensure_ascii=False).encode() if r.body is not None else None
                    async with session.request(r.method, r.url(base_root), data=data) as resp:
                        await resp.read()
                        statuses.append(resp.status)
                out[i] = (t0, time.monotonic(), statuses)
        await asyncio.wait_for(asyncio.gather(*(one(i, g) for i, g in enumerate(groups))), deadline_s)
    return out


def mllp_plain(address: str, messages: list[str], deadline_s: float) -> list[tuple[float, float]]:
    """One blocking socket (TCP_NODELAY), one message at a time, each waiting for its ACK (AA)."""
    host, _, port = address.rpartition(":")
    t_end = time.monotonic() + deadline_s
    out = []
    with socket.create_connection((host, int(port)), timeout=DELIVERY_TIMEOUT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for m in messages:
            if time.monotonic() > t_end:
                raise TimeoutError(f"MLLP baseline not done within {deadline_s:.0f} s")
            t0 = time.monotonic()
            s.sendall(VT + m.encode("utf-8") + FS + b"\r")
            buf = b""
            while not buf.endswith(FS + b"\r"):
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("the stand-in closed the connection")
                buf += chunk
            if b"MSA|AA|" not in buf:
                raise RuntimeError(f"not acknowledged: {buf[:200]!r}")
            out.append((t0, time.monotonic()))
    return out


async def plain_both(ehr: StandInEHR, groups: list[list[Req]], orus: list[str], deadline_s: float
                     ) -> tuple[list[tuple[float, float, list[int]]], list[tuple[float, float]]]:
    """The FHIR requests (CONCURRENCY at once) and the ORUs (one connection) at the same time."""
    fhir = asyncio.ensure_future(replay(base_root(ehr), groups, CONCURRENCY, deadline_s))
    mllp = asyncio.ensure_future(asyncio.to_thread(mllp_plain, ehr.mllp_address, orus, deadline_s))
    return await fhir, await mllp


def base_root(ehr: StandInEHR) -> str:
    return ehr.fhir_base[: -len("/fhir")]


def check_statuses(results: list[tuple[float, float, list[int]]], what: str) -> None:
    bad = [st for _a, _b, sts in results for st in sts if not 200 <= st < 300]
    if bad:
        raise RuntimeError(f"{what}: {len(bad)} request(s) not 2xx, e.g. {bad[:5]}")


# =====================================================================================================
# Phase 1: latency, settled (check_stability forced, as the tests' settle)
# =====================================================================================================

def phase_latency(args: argparse.Namespace, dbs: Databases, root: Path, rnd: Round) -> None:
    count, warm = args.latency_studies, args.warmup
    rig = start_rig(dbs, root / "latency", 3600, args.mllp_in_flight)
    e, ehr = rig.e, rig.ehr
    specs = make_specs(Maker(rig.work / "dicom"), "L", warm + count, lambda i: 1 + i % 2)
    s_is, s_oru = Series("engine: stable -> ImagingStudy stored"), Series("engine: stable -> ORU accepted")
    groups: list[list[Req]] = []
    orus: list[str] = []
    try:
        for i, sp in enumerate(specs):
            send_hl7(e, hl7_for([sp]))
            send_images(e, sp.files)
            drain(e)  # images received: the order goes IP; the study is still receiving
            n_req, n_oru = len(ehr.fhir_requests), len(ehr.oru)
            key = f"urn:oid:{sp.study_uid}"
            marked = mark_stable_now(e)
            t_stable = time.monotonic()
            if marked != 1:
                raise RuntimeError(f"study {i}: {marked} studies marked stable, expected 1")
            ok = ehr.wait(ehr.delivered(key, sp.accession, n_oru), DELIVERY_TIMEOUT)
            if not ok:
                raise RuntimeError(f"study {i} ({sp.accession}) not delivered within {DELIVERY_TIMEOUT:.0f} s: "
                                   f"ImagingStudy {'yes' if key in ehr.study_at else 'no'}, deliveries "
                                   f"{delivery_counts(e)}")
            oru = ehr.oru_for(sp.accession, n_oru)
            assert oru is not None
            if i < warm:
                continue
            s_is.ms.append((ehr.study_at[key][0] - t_stable) * 1000)
            s_oru.ms.append((oru[0] - t_stable) * 1000)
            # this study's FHIR requests (the stand-in records a request once it has answered it)
            t_end = time.monotonic() + 5
            while not any(is_put(r) for r in fhir_log(ehr, n_req)) and time.monotonic() < t_end:
                time.sleep(0.005)
            groups.append(fhir_log(ehr, n_req))
            orus.append(oru[2])
        wait_db(e, "deliveries still pending", lambda c: c.execute(select(func.count()).select_from(DELIVERIES)
                                                                   .where(DELIVERIES.c.state == "pending")).scalar() == 0, 10)
        rnd.info.append(f"latency engine: deliveries {delivery_counts(e)}; studies {study_states(e)}; "
                        f"instances coerced {e.engine.metrics.coerced_instances.value():g}")
    finally:
        rig.stop()
    per_study = Counter(len(g) for g in groups)
    methods = Counter(r.method for g in groups for r in g)
    rnd.info.append(f"latency engine: FHIR requests per study {dict(per_study)} ({dict(methods)}): the "
                    f"ImagingStudy's subject and basedOn references are searched on the EHR before the PUT")
    rnd.latency["is"], rnd.latency["oru"] = s_is, s_oru

    # baselines: fresh stand-ins, the same requests one study at a time
    puts = [[r for r in g if is_put(r)][-1:] for g in groups]
    with TimedEHR() as ehr2:
        res_put = asyncio.run(replay(base_root(ehr2), puts, 1, 60 + 5 * len(puts)))
    check_statuses(res_put, "baseline PUT")
    with TimedEHR() as ehr2:
        res_all = asyncio.run(replay(base_root(ehr2), groups, 1, 60 + 5 * len(groups)))
        res_oru = mllp_plain(ehr2.mllp_address, orus, 60 + 5 * len(orus))
    check_statuses(res_all, "baseline replay")
    rnd.latency["b_put"] = Series("baseline: ImagingStudy PUT", [(b - a) * 1000 for a, b, _s in res_put])
    rnd.latency["b_all"] = Series("baseline: the engine's requests (GET, GET, PUT)",
                                  [(b - a) * 1000 for a, b, _s in res_all])
    rnd.latency["b_oru"] = Series("baseline: ORU send -> ACK", [(b - a) * 1000 for a, b in res_oru])


# =====================================================================================================
# Phase 2: latency, natural (the engine's own stability poll and loops)
# =====================================================================================================

def phase_natural(args: argparse.Namespace, dbs: Databases, root: Path, rnd: Round) -> None:
    stable = args.natural_stable_seconds
    rig = start_rig(dbs, root / "natural", stable, args.mllp_in_flight)
    e, ehr = rig.e, rig.ehr
    specs = make_specs(Maker(rig.work / "dicom"), "N", args.warmup + args.natural_studies, lambda i: 1 + i % 2)
    s_is = Series("natural: stable_seconds elapsed -> ImagingStudy stored")
    s_oru = Series("natural: stable_seconds elapsed -> ORU accepted")
    s_det = Series("natural: stable_seconds elapsed -> marked stable (stable_at)")
    s_from = Series("natural: marked stable (stable_at) -> ImagingStudy stored")
    poll = min(5.0, max(0.2, stable / 4))
    rng = random.Random(1)
    try:
        for i, sp in enumerate(specs):
            # sent one at a time right after the previous delivery, every study would end at the same
            # phase of the engine's stability poll: a random pause spreads them over its interval
            time.sleep(rng.uniform(0, poll))
            n_oru = len(ehr.oru)
            send_hl7(e, hl7_for([sp]))
            send_images(e, sp.files)
            key = f"urn:oid:{sp.study_uid}"
            ok = ehr.wait(ehr.delivered(key, sp.accession, n_oru), stable + 10 + DELIVERY_TIMEOUT)
            if not ok:
                raise RuntimeError(f"natural study {i} not delivered within {stable + 10 + DELIVERY_TIMEOUT:.0f} s; "
                                   f"deliveries {delivery_counts(e)}")
            if i < args.warmup:
                continue
            row = db_read(e, study_times_of(sp.study_uid))
            t_ref = row.last_received_at.timestamp() + stable
            oru = ehr.oru_for(sp.accession, n_oru)
            assert oru is not None
            s_is.ms.append((ehr.study_at[key][1] - t_ref) * 1000)
            s_oru.ms.append((oru[1] - t_ref) * 1000)
            s_det.ms.append((row.stable_at.timestamp() - t_ref) * 1000)
            s_from.ms.append((ehr.study_at[key][1] - row.stable_at.timestamp()) * 1000)
    finally:
        rig.stop()
    rnd.info.append(f"natural: stable_seconds {stable:g}: the engine polls stability every {poll:g} s and its "
                    f"reconcile loop every {min(1.0, max(0.1, stable / 4)):g} s (both from stable_seconds)")
    rnd.natural.update(is_=s_is, oru=s_oru, det=s_det, frm=s_from)


# =====================================================================================================
# Phase 3: throughput with a backlog
# =====================================================================================================

def study_times_of(study_uid: str) -> Callable[[Any], Any]:
    query = select(STUDIES.c.last_received_at, STUDIES.c.stable_at).where(STUDIES.c.study_uid == study_uid)
    return lambda conn: conn.execute(query).one()


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) each live thread of this process has used, by native id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for t in threading.enumerate():
        if t.native_id is None:
            continue
        try:
            with open(f"/proc/self/task/{t.native_id}/stat", encoding="ascii") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[t.native_id] = (int(fields[11]) + int(fields[12])) / tick
    return out


@dataclass
class CpuWindow:
    """CPU used while the backlog is delivered: the process's, the stand-in's thread's and this (the
    waiting) thread's; what is left is the engine's (its loop, writer and worker threads, and the
    short-lived ones)."""

    standin: int  # native id of the stand-in's thread
    process0: float = field(default_factory=time.process_time)
    threads0: dict[int, float] = field(default_factory=thread_cpu)

    def split(self) -> dict[str, float]:
        process = time.process_time() - self.process0
        now = thread_cpu()

        def used(tid: int) -> float:
            return now.get(tid, 0.0) - self.threads0.get(tid, 0.0)
        standin, main = used(self.standin), used(threading.main_thread().native_id or 0)
        return {"process": process, "standin": standin, "bench": main, "engine": process - standin - main}


def wait_db(e: RunningEngine, what: str, check: Callable[[Any], bool], deadline_s: float, every: float = 0.1) -> None:
    t_end = time.monotonic() + deadline_s
    while not db_read(e, check):
        if time.monotonic() > t_end:
            raise TimeoutError(f"{what} after {deadline_s:.0f} s")
        time.sleep(every)


def phase_throughput(args: argparse.Namespace, dbs: Databases, root: Path, rnd: Round) -> None:
    n = args.studies
    rig = start_rig(dbs, root / "throughput", 3600, args.mllp_in_flight)
    e, ehr = rig.e, rig.ehr
    try:
        ehr.set_fhir_down(True)
        ehr.set_mllp_down(True)
        t_down = time.monotonic()
        t = time.monotonic()
        specs = make_specs(Maker(rig.work / "dicom"), "T", n, lambda i: 1)
        t_files = time.monotonic() - t
        t = time.monotonic()
        send_hl7(e, hl7_for(specs))
        t_hl7 = time.monotonic() - t
        t = time.monotonic()
        send_images(e, [f for sp in specs for f in sp.files])
        wait_db(e, "not every study indexed", lambda c: c.execute(
            select(func.count()).select_from(STUDIES)).scalar() >= n, 120)
        t_dicom = time.monotonic() - t
        t = time.monotonic()
        drain(e)
        t_end = time.monotonic() + 600
        while mark_stable_now(e):  # at most 500 a call
            drain(e)
            if time.monotonic() > t_end:
                raise TimeoutError("studies still turning stable after 600 s")
        wait_db(e, f"not all {2 * n} deliveries queued", lambda c: c.execute(
            select(func.count()).select_from(DELIVERIES)).scalar() >= 2 * n, 60)
        t_rec = time.monotonic() - t
        rnd.info.append(f"throughput setup: {n} studies: files {t_files:.1f} s, HL7 ({2 * n} messages, one connection) "
                        f"{t_hl7:.1f} s, storescu ({n} instances) {t_dicom:.1f} s, reconciliation "
                        f"(received + stable) {t_rec:.1f} s; total {t_files + t_hl7 + t_dicom + t_rec:.1f} s")

        # hold the backlog (nothing due), wait until no attempt is in flight, hold again
        def hold(conn: Any) -> int:
            return int(conn.execute(update(DELIVERIES).where(DELIVERIES.c.state == "pending")
                                    .values(next_at=utcnow() + timedelta(days=1))).rowcount or 0)
        db_write(e, hold)
        wait_db(e, "deliveries still leased", lambda c: c.execute(
            select(func.count()).select_from(DELIVERIES).where(DELIVERIES.c.leased_until.is_not(None))).scalar() == 0,
            60)
        db_write(e, hold)
        outage = time.monotonic() - t_down
        tried = db_read(e, lambda c: c.execute(
            select(DELIVERIES.c.destination, func.count(), func.count(func.distinct(ATTEMPTS.c.delivery_id)))
            .join(ATTEMPTS, ATTEMPTS.c.delivery_id == DELIVERIES.c.id).group_by(DELIVERIES.c.destination)).all())
        rnd.info.append("throughput outage: " + (", ".join(f"{d}: {a} failed attempts on {k} deliveries"
                                                            for d, a, k in tried) or "no attempts")
                        + f" while the stand-in was down ({outage:.0f} s)")
        counts = delivery_counts(e)
        if any(set(v) != {"pending"} or sum(v.values()) != n for v in counts.values()) or len(counts) != 2:
            raise RuntimeError(f"backlog is not {n} pending per destination: {counts}")

        ehr.set_fhir_down(False)
        ehr.set_mllp_down(False)

        def release(conn: Any) -> int:
            ids = [r[0] for r in conn.execute(select(DELIVERIES.c.id).where(DELIVERIES.c.state == "pending"))]
            return outbox.retry(conn, ids, rebuild=True)  # due now, rendered afresh at the first attempt
        released = db_write(e, release)
        profiler = None
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            profiler = Profiler(os.getpid(), Path(args.profile) / f"throughput-{uuid.uuid4().hex[:6]}.txt",
                                args.profile_rate)
        cpu = CpuWindow(next(t.native_id or 0 for t in threading.enumerate() if t.name == "standin-ehr"))
        t_wake_wall = time.time()
        t_wake = time.monotonic()
        e.loop.call_soon_threadsafe(e.engine.wake_outbound)  # asyncio.Event.set is for the loop's own thread
        deadline = 120 + 0.5 * n
        wait_db(e, f"not all {2 * n} deliveries delivered", lambda c: c.execute(
            select(func.count()).select_from(DELIVERIES).where(DELIVERIES.c.state != "pending")).scalar() >= 2 * n,
            deadline, every=0.05)
        t_all = time.monotonic() - t_wake
        used = cpu.split()
        if profiler is not None:
            profiler.stop()
            rnd.info.append(summarize_profile(profiler.out).replace("\n", "\n  "))
        for who in ("engine", "standin", "bench", "process"):
            rnd.figures[f"cpu.{who}.ms_per_delivery"] = 1000 * used[who] / (2 * n)
        counts = delivery_counts(e)
        if any(v.get("delivered", 0) != n for v in counts.values()):
            raise RuntimeError(f"not every delivery delivered: {counts}")
        spans = db_read(e, lambda c: {d: (lo, hi) for d, lo, hi in c.execute(
            select(DELIVERIES.c.destination, func.min(DELIVERIES.c.delivered_at), func.max(DELIVERIES.c.delivered_at))
            .group_by(DELIVERIES.c.destination))})
        rnd.info.append(f"throughput engine: studies {study_states(e)}; instances coerced "
                        f"{e.engine.metrics.coerced_instances.value():g}")
        sends = db_read(e, lambda c: c.execute(
            select(DELIVERIES.c.destination, func.count(), func.avg(ATTEMPTS.c.duration_ms))
            .join(ATTEMPTS, ATTEMPTS.c.delivery_id == DELIVERIES.c.id)
            .where(ATTEMPTS.c.outcome == "delivered").group_by(DELIVERIES.c.destination)).all())
        rnd.info.append("throughput engine: mean send time per delivered attempt (delivery_attempts.duration_ms): "
                        + ", ".join(f"{d} {float(avg):.1f} ms over {k}" for d, k, avg in sends))
        reqs = fhir_log(ehr)
        orus = [o[2] for o in ehr.oru]
        is_times, oru_times = list(ehr.study_times), [o[0] for o in ehr.oru]
    finally:
        rig.stop()

    def dspan(d: str) -> float:
        return (spans[d][1] - spans[d][0]).total_seconds()
    lo = min(v[0] for v in spans.values())
    hi = max(v[1] for v in spans.values())
    rnd.info.append(f"throughput engine: {released} deliveries released; first delivered "
                    f"{lo.timestamp() - t_wake_wall:.2f} s after the wake, all delivered {t_all:.2f} s after it; "
                    f"{len(reqs)} FHIR requests ({dict(Counter(r.method for r in reqs))})")
    rnd.rates["e_fhir"] = Rate("engine fhir (delivered_at first..last)", n, dspan("fhir"))
    rnd.rates["e_mllp"] = Rate("engine mllp (delivered_at first..last)", n, dspan("mllp"))
    rnd.rates["e_both"] = Rate("engine both (delivered_at first..last)", 2 * n, (hi - lo).total_seconds())
    rnd.rates["e_wall"] = Rate("engine both (wake -> all delivered)", 2 * n, t_all)
    rnd.rates["e_fhir_ehr"] = Rate("engine fhir (EHR stores first..last)", n, max(is_times) - min(is_times))
    rnd.rates["e_mllp_ehr"] = Rate("engine mllp (EHR accepts first..last)", n, max(oru_times) - min(oru_times))

    # baselines: fresh stand-ins; FHIR with CONCURRENCY requests in flight and MLLP at the same time
    put_groups = [[r] for r in reqs if is_put(r)]
    all_groups = [[r] for r in reqs]
    for tag, groups, label in (("b", put_groups, "ImagingStudy PUTs"),
                               ("r", all_groups, "the engine's FHIR requests (GETs + PUTs)")):
        with TimedEHR() as ehr2:
            res_f, res_m = asyncio.run(plain_both(ehr2, groups, orus, 120 + 0.5 * len(groups)))
        check_statuses(res_f, f"baseline {label}")
        f_lo, f_hi = min(a for a, _b, _s in res_f), max(b for _a, b, _s in res_f)
        m_lo, m_hi = min(a for a, _b in res_m), max(b for _a, b in res_m)
        rnd.rates[f"{tag}_fhir"] = Rate(f"plain fhir c={CONCURRENCY}: {label}", len(put_groups), f_hi - f_lo)
        rnd.rates[f"{tag}_mllp"] = Rate("plain mllp 1 connection: ORUs", len(orus), m_hi - m_lo)
        rnd.rates[f"{tag}_both"] = Rate("plain both at once", len(put_groups) + len(orus),
                                        max(f_hi, m_hi) - min(f_lo, m_lo))


# =====================================================================================================
# Output
# =====================================================================================================

LAT_ORDER = [("latency", "is"), ("latency", "oru"), ("natural", "is_"), ("natural", "oru"), ("natural", "det"),
             ("natural", "frm"), ("latency", "b_put"), ("latency", "b_all"), ("latency", "b_oru")]
RATIOS_LAT = [("engine ImagingStudy / baseline PUT", ("latency", "is"), ("latency", "b_put")),
              ("engine ImagingStudy / baseline GET, GET, PUT", ("latency", "is"), ("latency", "b_all")),
              ("engine ORU / baseline ORU", ("latency", "oru"), ("latency", "b_oru"))]
RATE_ORDER = ["e_fhir", "e_mllp", "e_both", "e_wall", "e_fhir_ehr", "e_mllp_ehr", "b_fhir", "b_mllp", "b_both",
              "r_fhir", "r_mllp", "r_both"]
CPU_ROWS = [("engine", "engine threads (process - stand-in - bench)"), ("standin", "stand-in EHR thread"),
            ("bench", "bench thread (waiting, polling the database)"), ("process", "the whole process")]
RATIOS_RATE = [("fhir: engine / plain PUTs", "e_fhir", "b_fhir"),
               ("fhir: engine / plain replay of its requests", "e_fhir", "r_fhir"),
               ("mllp: engine / plain socket", "e_mllp", "b_mllp"),
               ("both: engine / plain (PUTs + ORUs at once)", "e_both", "b_both"),
               ("both: engine / plain (replay + ORUs at once)", "e_both", "r_both")]


def flatten(rnd: Round) -> None:
    f = rnd.figures
    for group, key in LAT_ORDER:
        s = getattr(rnd, group).get(key)
        if s and s.ms:
            for k, v in s.row().items():
                f[f"{group}.{key}.{k}"] = v
    for name, a, b in RATIOS_LAT:
        if f"{a[0]}.{a[1]}.p50" in f and f"{b[0]}.{b[1]}.p50" in f:
            f[f"ratio.{name}.p50"] = f[f"{a[0]}.{a[1]}.p50"] / f[f"{b[0]}.{b[1]}.p50"]
            f[f"ratio.{name}.p99"] = f[f"{a[0]}.{a[1]}.p99"] / f[f"{b[0]}.{b[1]}.p99"]
    for key, r in rnd.rates.items():
        f[f"rate.{key}"] = r.per_s
        f[f"secs.{key}"] = r.seconds
    for label, ka, kb in RATIOS_RATE:
        if ka in rnd.rates and kb in rnd.rates:
            f[f"rratio.{label}"] = rnd.rates[ka].per_s / rnd.rates[kb].per_s


def print_table(head: str, lines: list[str]) -> None:
    print()
    print(head)
    print("-" * len(head))
    for line in lines:
        print(line)


def print_latency(rows: list[tuple[str, dict[str, float]]], title: str) -> None:
    print_table(f"{title:<64}{'n':>5}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}",
                [f"{label:<64}{int(r['n']):>5}{r['p50']:>10.1f}{r['p99']:>10.1f}{r['max']:>10.1f}" for label, r in rows])


def print_rates(rows: list[tuple[str, int, float, float]], title: str) -> None:
    print_table(f"{title:<56}{'n':>6}{'seconds':>10}{'deliv/s':>10}",
                [f"{label:<56}{n:>6}{secs:>10.2f}{rate:>10.1f}" for label, n, secs, rate in rows])


def print_cpu(figures: Callable[[str], float], title: str) -> None:
    print_table(f"{title:<56}{'CPU ms/delivery':>16}",
                [f"{label:<56}{figures(f'cpu.{key}.ms_per_delivery'):>16.3f}" for key, label in CPU_ROWS])


def print_round(rnd: Round, i: int, total: int) -> None:
    what = f" (round {i} of {total})" if total > 1 else ""
    rows = []
    for group, key in LAT_ORDER:
        s = getattr(rnd, group).get(key)
        if s and s.ms:
            rows.append((s.label, s.row()))
    if rows:
        print_latency(rows, f"latency{what}")
        f = rnd.figures
        for name, _a, _b in RATIOS_LAT:
            if f"ratio.{name}.p50" in f:
                print(f"  ratio {name:<48} p50 {f[f'ratio.{name}.p50']:6.1f}   p99 {f[f'ratio.{name}.p99']:6.1f}")
    if rnd.rates:
        print_rates([(r.label, r.n, r.seconds, r.per_s) for k in RATE_ORDER if (r := rnd.rates.get(k))],
                    f"throughput{what}")
        for label, _ka, _kb in RATIOS_RATE:
            if f"rratio.{label}" in rnd.figures:
                print(f"  ratio of deliveries/s, {label:<48} {rnd.figures[f'rratio.{label}']:6.2f}")
    if "cpu.engine.ms_per_delivery" in rnd.figures:
        print_cpu(lambda k: rnd.figures.get(k, math.nan), f"CPU while the backlog is delivered{what}")
    for line in rnd.info:
        print(f"  {line}")


def print_medians(rounds: list[Round]) -> None:
    def med(key: str) -> float:
        vals = [r.figures[key] for r in rounds if key in r.figures and not math.isnan(r.figures[key])]
        return statistics.median(vals) if vals else math.nan

    def rng(key: str) -> str:
        vals = [r.figures[key] for r in rounds if key in r.figures]
        return f"{min(vals):.2f}-{max(vals):.2f}" if vals else "-"
    first = rounds[0]
    rows = []
    for group, key in LAT_ORDER:
        s = getattr(first, group).get(key)
        if s and s.ms:
            rows.append((s.label, {k: med(f"{group}.{key}.{k}") for k in ("n", "p50", "p99", "max")}))
    if rows:
        print_latency(rows, f"latency, medians of {len(rounds)} rounds")
        for name, _a, _b in RATIOS_LAT:
            if f"ratio.{name}.p50" in first.figures:
                print(f"  ratio {name:<48} p50 {med(f'ratio.{name}.p50'):6.1f} ({rng(f'ratio.{name}.p50')})")
    if first.rates:
        print_rates([(r.label, r.n, med(f"secs.{k}"), med(f"rate.{k}")) for k in RATE_ORDER
                     if (r := first.rates.get(k))], f"throughput, medians of {len(rounds)} rounds")
        for label, _ka, _kb in RATIOS_RATE:
            if f"rratio.{label}" in first.figures:
                print(f"  ratio of deliveries/s, {label:<48} {med(f'rratio.{label}'):6.2f} ({rng(f'rratio.{label}')})")
    if "cpu.engine.ms_per_delivery" in first.figures:
        print_cpu(med, f"CPU while the backlog is delivered, medians of {len(rounds)} rounds")


def print_logs(tally: LogTally, limit: int = 12) -> None:
    if not tally.counts:
        print("\nengine log: no warnings or errors")
        return
    total = sum(tally.counts.values())
    traces = sum(v for k, v in tally.counts.items() if k.endswith("[with stack trace]"))
    print(f"\nengine log: {total} warnings/errors ({traces} with a stack trace), most frequent:")
    for key, cnt in tally.counts.most_common(limit):
        print(f"  {cnt:>6} x {key}")
    for key, msg in tally.samples.items():
        if key.endswith("[with stack trace]"):
            print(f"  first {key}:\n    " + msg.replace("\n", "\n    "))
            break


# =====================================================================================================
# CLI
# =====================================================================================================

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite",
                    help="the engine's database (default sqlite; postgresql: a throwaway database per engine)")
    ap.add_argument("--pg-admin", default=PG_ADMIN_URL,
                    help=f"PostgreSQL admin URL for --db postgresql (default {PG_ADMIN_URL}, or $RADBRIDGE_TEST_PG)")
    ap.add_argument("--studies", type=int, default=1000, help="studies queued for the throughput phase (default "
                    "1000: 2,000 deliveries); 0 skips it")
    ap.add_argument("--latency-studies", type=int, default=50,
                    help="timed studies of the settled latency phase (default 50); 0 skips it")
    ap.add_argument("--natural-studies", type=int, default=20,
                    help="timed studies of the natural latency phase (default 20); 0 skips it")
    ap.add_argument("--natural-stable-seconds", type=float, default=2.0,
                    help="stable_seconds of the natural phase's engine (default 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed studies before each latency phase (default 2)")
    ap.add_argument("--mllp-in-flight", type=int, default=1,
                    help="in_flight of the mllp destination (default 1: the shipped setting; messages in flight "
                    "at once, each on its own connection)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every phase; medians printed (default 1)")
    ap.add_argument("--tmpdir", default=None, help="where the databases, files and logs go (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (engine.log, stores)")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="attach py-spy (pip install py-spy) to this process while the backlog is delivered; raw "
                    "stacks in DIR, a summary printed (the stand-in's and the bench's threads are in it too)")
    ap.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second (default 200)")
    ap.add_argument("--engine-src", metavar="DIR", default=None,
                    help="import the engine (and channels/, mappings/, the tests' helpers) from this source tree "
                    "instead of this script's, to measure another commit with this script (read before the "
                    "imports, so give it as --engine-src DIR or --engine-src=DIR)")
    json_option(ap)
    args = ap.parse_args(argv)
    if min(args.studies, args.latency_studies, args.natural_studies, args.warmup) < 0 or args.repeat < 1:
        ap.error("counts must be >= 0 and --repeat >= 1")
    if not 1 <= args.mllp_in_flight <= 16:
        ap.error("--mllp-in-flight is 1 to 16")
    if args.natural_stable_seconds <= 0:
        ap.error("--natural-stable-seconds must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("storescu"):
        print("missing: storescu (Debian package dcmtk)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="radbridge-outbound-bench-", dir=args.tmpdir))
    tally = setup_logging(root)
    dbs = Databases(args.db, args.pg_admin)
    print(f"radbridge outbound delivery benchmark: {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}, "
          f"aiohttp {aiohttp.__version__}; engine from {describe_source(REPO)}; database "
          f"{'PostgreSQL (throwaway database per engine)' if args.db == 'postgresql' else 'SQLite (fsync on)'}")
    print(f"engine, stand-in EHR and clients in this process (one GIL), 127.0.0.1; work dir {root}", flush=True)
    rounds: list[Round] = []
    try:
        for i in range(1, args.repeat + 1):
            rnd = Round()
            rdir = root / f"round{i}"
            what = f" (round {i} of {args.repeat})" if args.repeat > 1 else ""
            if args.latency_studies:
                print(f"latency, settled: {args.latency_studies} studies{what} ...", flush=True)
                phase_latency(args, dbs, rdir, rnd)
            if args.natural_studies:
                print(f"latency, natural (stable_seconds {args.natural_stable_seconds:g}): "
                      f"{args.natural_studies} studies{what} ...", flush=True)
                phase_natural(args, dbs, rdir, rnd)
            if args.studies:
                print(f"throughput: {args.studies} studies queued while the stand-in is down{what} ...", flush=True)
                phase_throughput(args, dbs, rdir, rnd)
            dbs.drop_all()
            flatten(rnd)
            rounds.append(rnd)
            print_round(rnd, i, args.repeat)
        if len(rounds) > 1:
            print_medians(rounds)
        write_figures(args.json, {k: statistics.median(r.figures[k] for r in rounds if k in r.figures)
                                  for k in sorted({k for r in rounds for k in r.figures})})
        print_logs(tally)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        dbs.close()
        logging.shutdown()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
