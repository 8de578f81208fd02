#!/usr/bin/env python3
"""DICOM C-STORE ingest benchmark: the engine against Orthanc and dcmtk's storescp.

Run on demand (it is not a test); see bench/README.md. Every run gets a fresh set of N copies of
pydicom-data's 512x512 uncompressed CT (``693_UNCI.dcm``), each with its own SOP Instance UID and
one new study and series for the set, and sends it with dcmtk's ``storescu`` in one association
(``TCP_NODELAY=1``) to a freshly started target with empty storage. With ``--associations N`` the set
is split into N parts, sent by N storescu processes at once (N associations, as PACS routers send),
and every target gets the same N associations; ``--associations 1,4`` measures both in turns:

* engine (fsync): ``python -m engine.cli run`` (what ``radbridge run`` runs), durable default: each
  file and its directory are fsynced before the C-STORE success;
* engine (no fsync): the same with ``RADBRIDGE_DICOM_FSYNC=false``, as Orthanc and storescp store;
* orthanc: the Debian package's ``Orthanc``, no plugins, no compression, SQLite index;
* storescp: dcmtk's ``storescp -od DIR``, which only writes files.

It times storescu from start to exit, checks its exit code and one success response per instance,
and asks the target afterwards how many instances it holds. All traffic is on 127.0.0.1; Orthanc
and storescp listen on every interface, so when we are root they run, with their storescu, in a
new network namespace that has nothing but ``lo``.

Usage:
    python bench/dicom_ingest.py --instances 500
    python bench/dicom_ingest.py --instances 500 --repeat 3
    python bench/dicom_ingest.py --instances 500 --associations 1,4   # one association, then four at once
    python bench/dicom_ingest.py --instances 200 --large-mb 1024      # plus a ~1 GB study, RSS every 10 %
    python bench/dicom_ingest.py --database postgresql+psycopg://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchutil import (
    cpu_seconds,
    describe_source,
    die_with_parent,
    json_option,
    mib,
    proc_status,
    write_figures,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# dcmtk's tools by absolute path: with the virtualenv activated, pynetdicom's storescu (other options,
# other output) comes first on PATH, and every target reported FAILED
from tests.dicomutil import DcmtkMissing, dcmtk_tool  # noqa: E402

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 90.0  # seconds for a target to listen
STOP_TIMEOUT = 30.0
COUNT_TIMEOUT = 30.0  # seconds for a target's count to reach what was sent
ORTHANC = "/usr/sbin/Orthanc"
AETS = {"engine": "RADBRIDGE", "orthanc": "ORTHANC", "storescp": "STORESCP"}
RESULT_PREFIX = "RESULT "


def template_path() -> Path:
    import data_store  # pydicom-data

    return Path(data_store.__file__).parent / "data" / "693_UNCI.dcm"


# =====================================================================================================
# Instances
# =====================================================================================================

@dataclass
class InstanceSet:
    study_uid: str
    files: list[Path]
    size_bytes: int


def make_instances(directory: Path, count: int) -> InstanceSet:
    """``count`` copies of the CT, one new study and series, a new SOP Instance UID each."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(template_path())
    study_uid, series_uid = generate_uid(), generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    directory.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    size = 0
    for i in range(count):
        sop_uid = generate_uid()
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = i + 1
        path = directory / f"{i:06d}.dcm"
        ds.save_as(path)
        files.append(path)
        size += path.stat().st_size
    return InstanceSet(study_uid, files, size)


# =====================================================================================================
# Processes, ports, /proc
# =====================================================================================================



def listening(port: int) -> bool:
    """Whether a TCP socket of this network namespace listens on ``port`` (no connection is made)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as fh:
                next(fh, None)
                for line in fh:
                    parts = line.split()
                    if len(parts) > 3 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            continue
    return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])




class Server:
    """A target process with its output in files; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], cwd: Path, logdir: Path) -> None:
        self.name = name
        self.out_path = logdir / f"{name}.out"
        self.err_path = logdir / f"{name}.err"
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in stop()
        self._err = open(self.err_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_listening(self, *ports: int) -> None:
        t_limit = time.monotonic() + STARTUP_TIMEOUT
        while not all(listening(p) for p in ports):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before listening:\n"
                                   f"{self.tail()}")
            if time.monotonic() > t_limit:
                raise TimeoutError(f"{self.name} not listening on {ports} after {STARTUP_TIMEOUT:.0f} s:\n"
                                   f"{self.tail()}")
            time.sleep(0.05)

    def tail(self, lines: int = 15) -> str:
        text = ""
        for p in (self.out_path, self.err_path):
            with contextlib.suppress(OSError):
                text += "\n".join(p.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]) + "\n"
        return text.strip()

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


def http_json(url: str, token: str = "") -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"




# =====================================================================================================
# Targets: start one, ask it how many instances it holds
# =====================================================================================================

Counter = Callable[[], int]


def start_engine(spec: RunSpec, work: Path) -> tuple[Server, int, Counter]:
    dicom_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADBRIDGE_")}
    env.update({
        "RADBRIDGE_STORAGE_DIR": str(work / "var"),
        "RADBRIDGE_DICOM_PORT": str(dicom_port),
        "RADBRIDGE_MLLP_PORT": "0",
        "RADBRIDGE_HTTP_PORT": str(http_port),
        "RADBRIDGE_BIND": HOST,
        "RADBRIDGE_API_TOKEN": "bench",
        "RADBRIDGE_RETENTION_ENABLED": "false",
        "RADBRIDGE_STABLE_SECONDS": "3600",
        "RADBRIDGE_DICOM_FSYNC": "true" if spec.fsync else "false",
        "RADBRIDGE_CHANNELS_DIR": str(REPO / "channels"),
        "RADBRIDGE_MAPPINGS_DIR": str(REPO / "mappings"),
        "TCP_NODELAY": "1",
    })
    if spec.tls:
        env["RADBRIDGE_CHANNELS_DIR"] = str(tls_channels(work, spec))
    if spec.database_url:
        env["RADBRIDGE_DATABASE_URL"] = spec.database_url
    server = Server("engine", [sys.executable, "-m", "engine.cli", "run"], env=env, cwd=Path(spec.engine_src or REPO),
                    logdir=work)
    server.wait_listening(dicom_port, http_port)

    spec.metrics_url = f"http://{HOST}:{http_port}/metrics"

    def count() -> int:
        url = f"http://{HOST}:{http_port}/api/studies?study_uid={spec.study_uid}"
        studies = http_json(url, "bench")["studies"]
        return int(studies[0]["number_of_instances"]) if studies else 0

    return server, dicom_port, count


def tls_channels(work: Path, spec: RunSpec) -> Path:
    """A copy of channels/ whose DICOM channel speaks TLS with a test certificate (tests/certs.py);
    storescu then connects with +tla (no client certificate) and checks ours against the test CA."""
    from tests.certs import make_pki
    pki = make_pki(work / "pki")
    channels = work / "channels"
    shutil.copytree(REPO / "channels", channels)
    path = channels / "dicom.yaml"
    path.write_text(path.read_text() + f"\ntls:\n  cert: {pki.server.cert}\n  key: {pki.server.key}\n")
    spec.tls_args = ["+tla", "+cf", str(pki.ca)]
    return channels


def start_orthanc(spec: RunSpec, work: Path) -> tuple[Server, int, Counter]:
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "radbridge-bench",
        "StorageDirectory": str(work / "orthanc-storage"),
        "IndexDirectory": str(work / "orthanc-index"),
        "StorageCompression": False,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
    }
    path = work / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    env = {**os.environ, "TCP_NODELAY": "1"}
    server = Server("orthanc", [ORTHANC, str(path)], env=env, cwd=work, logdir=work)
    server.wait_listening(dicom_port, http_port)

    def count() -> int:
        return int(http_json(f"http://{HOST}:{http_port}/statistics")["CountInstances"]) - spec.warmup

    return server, dicom_port, count


def start_storescp(spec: RunSpec, work: Path) -> tuple[Server, int, Counter]:
    port = free_port()
    out = work / "storescp-out"
    out.mkdir()
    env = {**os.environ, "TCP_NODELAY": "1"}
    server = Server("storescp", [dcmtk_tool("storescp"), "-aet", "STORESCP", "-od", str(out), str(port)], env=env, cwd=work,
                    logdir=work)
    server.wait_listening(port)
    return server, port, lambda: sum(1 for _ in out.iterdir()) - spec.warmup


STARTERS: dict[str, Callable[[RunSpec, Path], tuple[Server, int, Counter]]] = {
    "engine": start_engine, "orthanc": start_orthanc, "storescp": start_storescp}


# =====================================================================================================
# The client: storescu, one association
# =====================================================================================================

@dataclass
class SendResult:
    seconds: float = 0.0
    exit_code: int | None = None
    ok: int = 0  # Store Responses with status Success
    failed: int = 0  # any other status
    log_tail: str = ""


def storescu(aet: str, port: int, files: Sequence[Path], *, timeout: float,
             on_response: Callable[[int], None] | None = None, tls_args: Sequence[str] = ()) -> SendResult:
    """Send ``files`` in one association; ``on_response`` sees the running count of store responses."""
    argv = [dcmtk_tool("storescu"), "-v", "-aec", aet, *tls_args, HOST, str(port), *map(str, files)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    res = SendResult()
    tail: list[str] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, errors="replace", preexec_fn=die_with_parent)

    def read() -> None:  # storescu -v logs to stderr: one "Received Store Response (<status>)" per file
        assert proc.stderr is not None
        for line in proc.stderr:
            if "Received Store Response" in line:
                if "(Success)" in line:
                    res.ok += 1
                else:
                    res.failed += 1
                    tail.append(line.rstrip())
                if on_response is not None:
                    on_response(res.ok + res.failed)
            elif not line.startswith(("I: Sending", "I: Converting")):
                tail.append(line.rstrip())
                del tail[:-20]

    reader = threading.Thread(target=read, name="storescu-reader", daemon=True)
    reader.start()
    try:
        res.exit_code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        tail.append(f"storescu killed after {timeout:.0f} s")
    res.seconds = time.perf_counter() - t0
    reader.join(10)
    res.log_tail = "\n".join(tail[-20:])
    return res


def send_parallel(aet: str, port: int, files: Sequence[Path], associations: int, *, timeout: float,
                  on_response: Callable[[int], None] | None = None,
                  tls_args: Sequence[str] = ()) -> list[SendResult]:
    """``files`` split into ``associations`` parts (every n-th file), each sent by its own storescu, all
    started at once; ``on_response`` sees the running count of store responses over all of them.
    Each result's ``seconds`` runs from the common start to that storescu's exit."""
    parts = [list(files[k::associations]) for k in range(associations)]
    results: list[SendResult] = [SendResult() for _ in parts]
    lock = threading.Lock()
    counts = [0] * len(parts)

    def counted(k: int) -> Callable[[int], None] | None:
        if on_response is None:
            return None

        def seen(done: int) -> None:
            with lock:  # one caller at a time: on_response keeps its own state
                counts[k] = done
                on_response(sum(counts))
        return seen

    t0 = time.perf_counter()

    def one(k: int) -> None:
        results[k] = storescu(aet, port, parts[k], timeout=timeout, on_response=counted(k), tls_args=tls_args)
        results[k].seconds = time.perf_counter() - t0

    if len(parts) == 1:
        one(0)
        return results
    threads = [threading.Thread(target=one, args=(k,), name=f"storescu-{k}", daemon=True) for k in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    return results


# =====================================================================================================
# One run of one target (in this process, or in a worker in a network namespace)
# =====================================================================================================

@dataclass
class RunSpec:
    kind: str  # engine | orthanc | storescp
    label: str
    work: str  # an empty directory for this run: instance sets, storage, logs
    instances: int
    warmup: int
    fsync: bool = True
    database_url: str = ""
    rss_percents: list[int] = field(default_factory=lambda: [10, 50, 100])
    live: bool = False  # print each RSS sample as it is taken
    study_uid: str = ""  # of the timed set; filled in by run_target
    tls: bool = False  # the engine's DICOM channel speaks TLS (a test certificate); storescu +tla
    tls_args: list[str] = field(default_factory=list)  # storescu's TLS options, filled in by start_engine
    associations: int = 1  # storescu processes sending the timed set at once, a part each
    engine_src: str = ""  # the source tree the engine runs from (--engine-src); empty: this repository
    metrics_url: str = ""  # the engine's /metrics, filled in by start_engine


@dataclass
class RunResult:
    label: str
    kind: str
    associations: int = 1
    instances: int = 0
    size_bytes: int = 0
    seconds: float = 0.0
    exit_code: int | None = None
    responses_ok: int = 0
    responses_failed: int = 0
    stored: int = -1
    rss: list[tuple[int, int]] = field(default_factory=list)  # (percent of responses, VmRSS kB); -1: start
    rss_polled_max_kb: int = 0
    hwm_kb: int = 0
    per_association: list[float] = field(default_factory=list)  # inst/s of each storescu (its part / its time)
    writer_jobs: int = 0  # engine: jobs and commits of its ingest writer during the timed set
    writer_commits: int = 0
    cpu_seconds: float = 0.0  # CPU (user + system) the target process used during the timed set
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.instances / self.seconds if self.seconds > 0 and self.ok else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.size_bytes / 1e6 / self.seconds if self.seconds > 0 and self.ok else 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def cpu_ms(self) -> float:
        """The target's CPU milliseconds per instance (less noisy than inst/s on a shared machine)."""
        return 1000 * self.cpu_seconds / self.instances if self.instances and self.ok else 0.0


def writer_counts(url: str) -> tuple[int, int]:
    """(jobs, commits) of the engine's ingest writer so far, from its /metrics."""
    req = urllib.request.Request(url, headers={"Authorization": "Bearer bench"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("radbridge_writer_jobs_total", "radbridge_writer_batches_total"):
            found[name] = int(float(value))
    return found.get("radbridge_writer_jobs_total", 0), found.get("radbridge_writer_batches_total", 0)


def send_deadline(n: int) -> float:
    return 60.0 + n * 0.5  # at least 2 instances/s before we call it stuck


def run_target(spec: RunSpec) -> RunResult:
    """Generate the sets, start the target, warm up, time the set, check the target's count, stop it."""
    work = Path(spec.work)
    result = RunResult(spec.label, spec.kind, associations=spec.associations, instances=spec.instances)
    server: Server | None = None
    try:
        warm = make_instances(work / "warmup", spec.warmup) if spec.warmup else None
        timed = make_instances(work / "instances", spec.instances)
        spec.study_uid = timed.study_uid
        result.size_bytes = timed.size_bytes
        server, port, count = STARTERS[spec.kind](spec, work)
        aet = AETS[spec.kind]
        if warm is not None:
            w = storescu(aet, port, warm.files, timeout=send_deadline(spec.warmup), tls_args=spec.tls_args)
            if w.exit_code != 0 or w.ok != spec.warmup:
                result.problems.append(f"warm-up: storescu exit {w.exit_code}, {w.ok}/{spec.warmup} ok\n{w.log_tail}")
                return result
        pid = server.pid
        pending = sorted(spec.rss_percents)
        stop_polling = threading.Event()
        t0 = time.monotonic()

        def on_response(done: int) -> None:
            while pending and done * 100 >= pending[0] * spec.instances:
                sample = (pending.pop(0), proc_status(pid, "VmRSS"))
                result.rss.append(sample)
                if spec.live:
                    print(f"  {sample[0]:3d}%  {done:>7} instances  {time.monotonic() - t0:7.1f} s  "
                          f"RSS {sample[1] / 1024:.1f} MiB", flush=True)

        def poll() -> None:
            while not stop_polling.wait(0.2):
                result.rss_polled_max_kb = max(result.rss_polled_max_kb, proc_status(pid, "VmRSS"))

        writer_before = writer_counts(spec.metrics_url) if spec.metrics_url else (0, 0)
        result.rss.append((-1, proc_status(pid, "VmRSS")))
        cpu_before = cpu_seconds(pid)
        if spec.live:
            print(f"  start  RSS {result.rss[0][1] / 1024:.1f} MiB", flush=True)
        poller = threading.Thread(target=poll, name="rss-poller", daemon=True)
        poller.start()
        try:
            sent = send_parallel(aet, port, timed.files, spec.associations, timeout=send_deadline(spec.instances),
                                 on_response=on_response, tls_args=spec.tls_args)
        finally:
            stop_polling.set()
            poller.join(5)
        result.cpu_seconds = cpu_seconds(pid) - cpu_before
        result.hwm_kb = proc_status(pid, "VmHWM")
        result.rss_polled_max_kb = max([result.rss_polled_max_kb, *(kb for _p, kb in result.rss)])
        result.seconds = max(s.seconds for s in sent)
        result.per_association = [(s.ok + s.failed) / s.seconds if s.seconds > 0 else 0.0 for s in sent]
        bad = [s for s in sent if s.exit_code != 0]
        result.exit_code = bad[0].exit_code if bad else 0
        result.responses_ok, result.responses_failed = sum(s.ok for s in sent), sum(s.failed for s in sent)
        if bad or result.responses_ok != spec.instances:
            tails = "\n".join(s.log_tail for s in sent if s.log_tail)
            result.problems.append(f"storescu exit {[s.exit_code for s in sent]}, {result.responses_ok}/"
                                   f"{spec.instances} success responses, {result.responses_failed} other\n{tails}")
        t_limit = time.monotonic() + COUNT_TIMEOUT
        while True:
            result.stored = count()
            if result.stored == spec.instances or time.monotonic() > t_limit:
                break
            time.sleep(0.5)
        if result.stored != spec.instances:
            result.problems.append(f"target holds {result.stored} of the {spec.instances} instances sent")
        if spec.metrics_url:
            jobs, commits = writer_counts(spec.metrics_url)
            result.writer_jobs, result.writer_commits = jobs - writer_before[0], commits - writer_before[1]
    except Exception as exc:
        result.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        if server is not None:
            code = server.stop()
            if code not in (0, None, -signal.SIGTERM):
                result.problems.append(f"{server.name} exited with {code}:\n{server.tail()}")
            elif result.problems:
                result.problems.append(f"{server.name} log tail:\n{server.tail()}")
    return result


def netns_available() -> bool:
    """Whether we can run a target in a new network namespace (root, unshare and ip present)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    try:
        return subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def run_in_netns(spec: RunSpec) -> RunResult:
    """``run_target`` in a worker (this script) inside a new network namespace with only ``lo``."""
    argv = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
            sys.executable, str(Path(__file__).resolve()), "--run-target", json.dumps(asdict(spec))]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, preexec_fn=die_with_parent,
                              timeout=STARTUP_TIMEOUT + 2 * send_deadline(spec.instances) + 120)
    except subprocess.TimeoutExpired:
        return RunResult(spec.label, spec.kind, problems=["worker in the network namespace timed out"])
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            data = json.loads(line[len(RESULT_PREFIX):])
            data["rss"] = [tuple(x) for x in data["rss"]]
            return RunResult(**data)
    return RunResult(spec.label, spec.kind, problems=[f"worker exited with {proc.returncode}, no result:\n"
                                                      f"{(proc.stderr or proc.stdout)[-2000:]}"])


# =====================================================================================================
# Throwaway PostgreSQL databases (--database)
# =====================================================================================================

def _psycopg_url(url: str) -> str:
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url)


def create_database(admin_url: str) -> tuple[str, str]:
    """(name, SQLAlchemy URL) of a new database next to the one ``admin_url`` names."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"radbridge_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_psycopg_url(admin_url), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    import psycopg

    try:
        with psycopg.connect(_psycopg_url(admin_url), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception as exc:
        print(f"warning: could not drop database {name}: {exc}", file=sys.stderr)


# =====================================================================================================
# Output
# =====================================================================================================



def rss_text(r: RunResult) -> str:
    parts = [f"{'start' if p < 0 else f'{p}%'} {mib(kb)}" for p, kb in r.rss]
    return f"{', '.join(parts)}; max sampled {mib(r.rss_polled_max_kb)}; peak (VmHWM) {mib(r.hwm_kb)}"


def labelled(label: str, associations: int) -> str:
    """A target's label with its number of associations: ``engine (fsync)`` for one (the names
    bench/run_all.py reads), ``engine (fsync) x4`` for four."""
    return label if associations == 1 else f"{label} x{associations}"


def fanout(label: str) -> int:
    """The number of associations a label names (``labelled``'s inverse)."""
    head, _, tail = label.rpartition(" x")
    return int(tail) if head and tail.isdigit() else 1


def print_results(results: list[RunResult], labels: list[str]) -> dict[str, float]:
    """The runs, best and median per target, the ratios and RSS; returns each target's median inst/s of
    its good runs (``--json``)."""
    head = (f"{'target':<24}{'run':>4}{'instances':>11}{'MB':>9}{'seconds':>9}{'inst/s':>9}{'MB/s':>8}"
            f"{'CPU ms/inst':>12}{'stored':>8}{'peak RSS MiB':>14}")
    print()
    print(head)
    print("-" * len(head))
    runs: dict[str, int] = {}
    for r in results:
        runs[r.label] = runs.get(r.label, 0) + 1
        print(f"{r.label:<24}{runs[r.label]:>4}{r.instances:>11}{r.size_bytes / 1e6:>9.1f}{r.seconds:>9.2f}"
              f"{r.rate:>9.1f}{r.mb_per_s:>8.1f}{r.cpu_ms:>12.2f}{r.stored:>8}{mib(r.hwm_kb):>14}{'' if r.ok else '  FAILED'}")
        if len(r.per_association) > 1:
            print(f"{'':<28}each association, inst/s: {', '.join(f'{x:.1f}' for x in r.per_association)}")
        if r.writer_commits:
            print(f"{'':<28}index: {r.writer_jobs} writer jobs in {r.writer_commits} commits "
                  f"({r.writer_jobs / r.writer_commits:.2f} a commit)")

    def rates(label: str) -> list[float]:
        return [r.rate for r in results if r.label == label and r.ok]

    def mbs(label: str) -> list[float]:
        return [r.mb_per_s for r in results if r.label == label and r.ok]

    def cpus(label: str) -> list[float]:
        return [r.cpu_ms for r in results if r.label == label and r.ok]

    head = (f"{'target':<24}{'ok runs':>8}{'best inst/s':>13}{'median':>9}{'best MB/s':>11}{'median':>9}"
            f"{'CPU ms/inst, median':>21}")
    print()
    print(head)
    print("-" * len(head))
    for label in labels:
        rs, ms = rates(label), mbs(label)
        best = (f"{max(rs):>13.1f}{statistics.median(rs):>9.1f}{max(ms):>11.1f}{statistics.median(ms):>9.1f}"
                f"{statistics.median(cpus(label)):>21.2f}") if rs else f"{'-':>13}{'-':>9}{'-':>11}{'-':>9}{'-':>21}"
        print(f"{label:<24}{len(rs):>8}{best}")

    def ratio(a: str, b: str, pick: Callable[[list[float]], float]) -> str:
        ra, rb = rates(a), rates(b)
        return f"{pick(ra) / pick(rb):.2f}" if ra and rb else "-"

    print()
    print("ratios of inst/s, medians (best runs in brackets):")
    for eng in (x for x in labels if x.startswith("engine")):
        for other in (x for x in labels if not x.startswith("engine") and fanout(x) == fanout(eng)):
            print(f"  {eng + ' / ' + other:<40}{ratio(eng, other, statistics.median):>6} "
                  f"({ratio(eng, other, max)})")
    tls_label, plain_label = TARGETS["engine-tls"][1], TARGETS["engine"][1]
    if rates(tls_label) and rates(plain_label):
        cost = 100 * (1 - statistics.median(rates(tls_label)) / statistics.median(rates(plain_label)))
        print(f"  TLS costs {cost:.1f} % of inst/s ({tls_label} / {plain_label}: "
              f"{ratio(tls_label, plain_label, statistics.median)}, medians)")
    print()
    print("RSS MiB (VmRSS before the timed set and at 10/50/100 % of the store responses, the largest of those\n"
          "and of samples every 0.2 s, and the process's peak since it started):")
    runs.clear()
    for r in results:
        runs[r.label] = runs.get(r.label, 0) + 1
        print(f"  {r.label} run {runs[r.label]}: {rss_text(r)}")
        for p in r.problems:
            print("    " + p.replace("\n", "\n    "))
    figures = {f"{label} inst/s": statistics.median(rates(label)) for label in labels if rates(label)}
    figures.update({f"{label} CPU ms/inst": statistics.median(cpus(label)) for label in labels if rates(label)})
    return figures


# =====================================================================================================
# CLI
# =====================================================================================================

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=500, help="instances in the timed set (default 500)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per target, in turns (default 1)")
    ap.add_argument("--associations", default="1", metavar="N[,N...]",
                    help="storescu processes sending the timed set at once, a part each, to every target; "
                         "several counts run in turns (e.g. 1,4; default 1)")
    ap.add_argument("--warmup", type=int, default=5,
                    help="untimed instances (their own study, own association) before the timed set (default 5)")
    ap.add_argument("--large-mb", type=int, default=0, metavar="MB",
                    help="then one engine run (fsync) of a study of about this many MB, RSS every 10%% "
                         "(e.g. 1024; default 0: none)")
    ap.add_argument("--targets", default="engine,engine-nofsync,orthanc,storescp",
                    help="comma-separated, from engine, engine-nofsync, orthanc, storescp (default: all)")
    ap.add_argument("--tls", action="store_true",
                    help="targets engine and engine-tls only: the engine plain and with DICOM TLS (a test "
                         "certificate; storescu +tla), to see what TLS costs")
    ap.add_argument("--database", metavar="URL", default="",
                    help="run the engine on PostgreSQL: an admin URL where a throwaway database may be created "
                         "for each engine run (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/postgres)")
    ap.add_argument("--engine-src", metavar="DIR", default="",
                    help="run the engine from another source tree (e.g. a git worktree of an older commit, for a "
                         "before/after comparison in one sitting); channels/ and mappings/ stay this repository's")
    ap.add_argument("--no-netns", action="store_true",
                    help="run Orthanc and storescp in this network namespace (they listen on every interface)")
    ap.add_argument("--tmpdir", default=None, help="where the instances and storage go (default: system temp)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep instances, storage and logs for inspection")
    ap.add_argument("--run-target", metavar="JSON", default=None, help=argparse.SUPPRESS)
    json_option(ap)
    args = ap.parse_args(argv)
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.tls:  # TLS against plain, in the same run
        args.target_list = ["engine", "engine-tls"]
    unknown = set(args.target_list) - set(TARGETS)
    if unknown or not args.target_list:
        ap.error(f"--targets: unknown {', '.join(sorted(unknown))}" if unknown else "--targets: none given")
    try:
        args.association_counts = [int(n) for n in args.associations.split(",") if n.strip()]
    except ValueError:
        ap.error(f"--associations: not a list of numbers: {args.associations!r}")
    if not args.association_counts or min(args.association_counts) < 1 \
            or max(args.association_counts) > args.instances:
        ap.error("--associations: each count at least 1 and at most --instances")
    if args.instances < 1 or args.repeat < 1 or args.warmup < 0 or args.large_mb < 0:
        ap.error("--instances and --repeat must be at least 1, --warmup and --large-mb at least 0")
    return args


TARGETS: dict[str, tuple[str, str, bool]] = {  # name: (kind, label, fsync)
    "engine": ("engine", "engine (fsync)", True),
    "engine-tls": ("engine", "engine (fsync, TLS)", True),
    "engine-nofsync": ("engine", "engine (no fsync)", False),
    "orthanc": ("orthanc", "orthanc", True),
    "storescp": ("storescp", "storescp", True),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_target:  # worker: one run, result on the last line of stdout
        res = run_target(RunSpec(**json.loads(args.run_target)))
        print(RESULT_PREFIX + json.dumps(asdict(res)), flush=True)
        return 0

    def on_term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    missing = []
    for tool in ("storescu", *(("storescp",) if "storescp" in args.target_list else ())):
        try:
            dcmtk_tool(tool)
        except DcmtkMissing as exc:
            missing.append(str(exc))
    if "orthanc" in args.target_list and not os.access(ORTHANC, os.X_OK):
        missing.append(f"{ORTHANC} (Debian package orthanc)")
    if missing:
        print("missing: " + "; ".join(missing), file=sys.stderr)
        return 2
    netns = not args.no_netns and netns_available()
    import pydicom

    size = template_path().stat().st_size
    root = Path(tempfile.mkdtemp(prefix="radbridge-dicom-bench-", dir=args.tmpdir))
    print(f"radbridge DICOM ingest benchmark: {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}, "
          f"pydicom {pydicom.__version__}, {tool_version([dcmtk_tool('storescu'), '--version']).strip('$ ')}, "
          f"{tool_version([ORTHANC, '--version'])}; engine from "
          f"{describe_source(Path(args.engine_src).resolve() if args.engine_src else REPO)}, database "
          f"{'PostgreSQL (throwaway database per run)' if args.database else 'SQLite'}")
    print(f"{args.instances} instances of 693_UNCI.dcm (CT 512x512, {size:,} bytes) per run, sent over "
          f"{' then '.join(map(str, args.association_counts))} association(s) at once, "
          f"{args.warmup} warm-up instances first; storage in {root}; Orthanc and storescp "
          f"{'in a new network namespace (lo only)' if netns else 'in this network namespace'}", flush=True)
    results: list[RunResult] = []
    labels = [labelled(TARGETS[t][1], n) for n in args.association_counts for t in args.target_list]
    failed = False
    n_run = 0

    def one(name: str, instances: int, percents: list[int], live: bool = False, associations: int = 1) -> RunResult:
        nonlocal n_run
        kind, label, fsync = TARGETS[name]
        label = labelled(label, associations)
        n_run += 1
        work = root / f"{n_run:02d}-{name}"
        work.mkdir()
        db_name = ""
        spec = RunSpec(kind, label, str(work), instances, args.warmup, fsync=fsync, rss_percents=percents,
                       live=live, tls=name == "engine-tls", associations=associations,
                       engine_src=str(Path(args.engine_src).resolve()) if args.engine_src else "")
        try:
            if kind == "engine" and args.database:
                db_name, spec.database_url = create_database(args.database)
            return run_in_netns(spec) if netns and kind != "engine" else run_target(spec)
        finally:
            if db_name:
                drop_database(args.database, db_name)
            if not args.keep_tmp:
                shutil.rmtree(work, ignore_errors=True)

    try:
        for rep in range(1, args.repeat + 1):
            for n in args.association_counts:
                for name in args.target_list:
                    what = f" (run {rep} of {args.repeat})" if args.repeat > 1 else ""
                    print(f"{labelled(TARGETS[name][1], n)}: {args.instances} instances over {n} association(s)"
                          f"{what} ...", flush=True)
                    results.append(one(name, args.instances, [10, 50, 100], associations=n))
        write_figures(args.json, print_results(results, labels))
        failed = any(not r.ok for r in results)
        if args.large_mb:
            n = math.ceil(args.large_mb * 1e6 / size)
            print(f"\nlarge study: engine (fsync), {n} instances ({n * size / 1e6:.0f} MB) in one association ...",
                  flush=True)
            big = one("engine", n, list(range(10, 101, 10)), live=True)
            print(f"large study: {big.instances} instances, {big.size_bytes / 1e6:.0f} MB in {big.seconds:.1f} s, "
                  f"{big.rate:.1f} inst/s, {big.mb_per_s:.1f} MB/s, stored {big.stored}; RSS MiB {rss_text(big)}")
            for p in big.problems:
                print("  " + p.replace("\n", "\n  "))
            failed = failed or not big.ok
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep_tmp:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
