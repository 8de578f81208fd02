#!/usr/bin/env python3
"""Reconciliation benchmark: coercing a stable study's headers, the engine against naive baselines.

Run on demand (it is not a test); see bench/README.md. It builds, through the running engine, a
store holding one study of N copies of pydicom-data's 512x512 uncompressed CT (``693_UNCI.dcm``)
whose headers carry a misspelt PatientName (``SMIHT^JOHN``) for a patient and order the engine got
over MLLP (ADT^A04 Smith^John, ORM^O01 with the study's accession), so under the ``coerce`` policy
every file must be rewritten. Then, each on its own fresh copy of the same files and in its own
process, it times and measures (peak RSS, VmHWM reset just before the timed part):

* engine: the study marked stable (``mark_stable``, untimed), then ``Reconciler.run_pending()``
  built as ``radbridge studies reconcile`` builds it: match, compare, rewrite every file
  (header parsed, pixel data copied in chunks, fsync, rename), index updates, closing transaction;
* naive: per file ``pydicom.dcmread`` (pixel data read), PatientName set, ``save_as``, fsync,
  rename into place, fsync of the directory, old file unlinked;
* copy: per file ``shutil.copyfile``, fsync, rename, fsync of the directory, old file unlinked:
  the floor of rewriting every file durably.

Every run is checked afterwards (outside the timing): names corrected, Original Attributes Sequence
present, pixel data bytes unchanged. ``--large-mb`` adds one multi-frame instance of about that size
(its own study) to show that the engine's memory stays flat where the naive rewrite holds the whole
pixel data.

Usage:
    python bench/reconcile_coerce.py                       # 1,000 instances, one run of each
    python bench/reconcile_coerce.py --repeat 3            # medians of three
    python bench/reconcile_coerce.py --large-mb 512        # plus one ~512 MB instance
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import shutil
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchutil import describe_source, die_with_parent, mib, proc_status
from dicom_ingest import Server, free_port, storescu, template_path, tool_version

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
RESULT_PREFIX = "RESULT "
MRN, ISSUER, ACCESSION = "MRN1", "GENHOSP", "ACC1"
FAMILY, GIVEN, BIRTH_DATE, SEX = "Smith", "John", "19800202", "M"
MISSPELT = "SMIHT^JOHN"  # what the modality typed; the ADT says Smith^John
CORRECT = f"{FAMILY}^{GIVEN}"
AET = "RADBRIDGE"
WAIT_TIMEOUT = 60.0  # seconds for the engine's index / queue to catch up after storescu
SAMPLES = 10  # instances whose pixel data bytes are compared after each run


# =====================================================================================================
# Instances to send
# =====================================================================================================

def _identity(ds: Any, study_uid: str, series_uid: str) -> None:
    ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = MISSPELT, MRN, ISSUER
    ds.PatientBirthDate, ds.PatientSex, ds.AccessionNumber = BIRTH_DATE, SEX, ACCESSION
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid


def make_instances(directory: Path, count: int) -> tuple[str, list[Path]]:
    """``count`` copies of the CT in one new study and series, a new SOP Instance UID each."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(template_path())
    study_uid = generate_uid()
    _identity(ds, study_uid, generate_uid())
    directory.mkdir(parents=True)
    files = []
    for i in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = directory / f"{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study_uid, files


def make_large(directory: Path, mb: int) -> tuple[str, list[Path], int]:
    """One multi-frame instance of about ``mb`` MB: the CT's frame repeated, written as a stream (the
    header by pydicom, then the Pixel Data element by hand: explicit VR little endian, OW)."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.dcmread(template_path())
    if ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian or ds["PixelData"].VR != "OW":
        raise RuntimeError("693_UNCI.dcm is no longer explicit VR little endian with OW pixel data")
    frame = bytes(ds.PixelData)
    frames = math.ceil(mb * 1e6 / len(frame))
    del ds.PixelData
    study_uid = generate_uid()
    _identity(ds, study_uid, generate_uid())
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.NumberOfFrames = frames
    directory.mkdir(parents=True)
    path = directory / "large.dcm"
    with open(path, "wb") as f:
        ds.save_as(f, enforce_file_format=True)
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, len(frame) * frames))
        for _ in range(frames):
            f.write(frame)
    return study_uid, [path], frames


# =====================================================================================================
# Populating a store through the engine (untimed)
# =====================================================================================================

@dataclass
class Store:
    """A stopped engine's storage directory (SQLite database and files) holding one study."""

    var: Path
    study_uid: str
    instances: int
    size_bytes: int = 0
    keys: dict[str, str] = field(default_factory=dict)  # SOP Instance UID: storage key


def hl7_messages() -> list[bytes]:
    ts = "20240315081500"

    def msh(mtype: str, ctrl: str, version: str) -> str:
        return f"MSH|^~\\&|EPIC|{ISSUER}|RADBRIDGE|RAD|{ts}||{mtype}|{ctrl}|P|{version}"

    pid = f"PID|1||{MRN}^^^{ISSUER}^MR||{FAMILY}^{GIVEN}||{BIRTH_DATE}|{SEX}"
    adt = [msh("ADT^A04^ADT_A01", "BENCH-ADT1", "2.5.1"), f"EVN|A04|{ts}", pid]
    obr = ["OBR", "1", "PL1^EPIC", "FPL1^RIS", "CTHEAD^CT head^L"] + [""] * 13 + [ACCESSION, "RPPL1",
                                                                               "SPSPL1", "", "", "", "CT"]
    orm = [msh("ORM^O01", "BENCH-ORM1", "2.3.1"), pid,
           f"ORC|NW|PL1^EPIC|FPL1^RIS||||^^^20240320140000^^R||{ts}", "|".join(obr)]
    return [("\r".join(segs) + "\r").encode() for segs in (adt, orm)]


def engine_env(var: Path, conf: Path, **ports: int) -> dict[str, str]:
    """The engine's environment: everything at its defaults (fsync on, SQLite under the storage
    directory) but for the paths, the ports and no stability / retention running by itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADBRIDGE_")}
    env.update({
        "RADBRIDGE_STORAGE_DIR": str(var),
        "RADBRIDGE_CHANNELS_DIR": str(conf / "channels"),
        "RADBRIDGE_MAPPINGS_DIR": str(conf / "mappings"),
        "RADBRIDGE_BIND": HOST,
        "RADBRIDGE_API_TOKEN": "bench",
        "RADBRIDGE_RETENTION_ENABLED": "false",
        "RADBRIDGE_STABLE_SECONDS": "3600",
        "TCP_NODELAY": "1",
    })
    for name, port in ports.items():
        env[f"RADBRIDGE_{name.upper()}_PORT"] = str(port)
    return env


def copy_config(conf: Path) -> str:
    """The repository's channels/ and mappings/ with the DICOM channel's policy set to coerce."""
    import yaml

    shutil.copytree(REPO / "channels", conf / "channels")
    shutil.copytree(REPO / "mappings", conf / "mappings")
    path = conf / "channels" / "dicom.yaml"
    data = yaml.safe_load(path.read_text())
    options = data.setdefault("options", {})
    options["reconciliation"] = "coerce"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(options.get("reconciliation_rules") or "(built-in)")


def db_query(var: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{var / 'radbridge.db'}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def wait_for(what: str, check: Any, timeout: float = WAIT_TIMEOUT) -> None:
    t_limit = time.monotonic() + timeout
    while not check():
        if time.monotonic() > t_limit:
            raise TimeoutError(f"{what} after {timeout:.0f} s")
        time.sleep(0.2)


def populate(work: Path, conf: Path, study_uid: str, files: list[Path]) -> Store:
    """Start the engine on empty storage, send the ADT and the order, then the files with storescu in
    one association; wait until it indexed them all and its reconciliation queue is empty (images
    received: the order went to IP; the study stays receiving), stop it."""
    from engine.connectors.mllp.client import MLLPClient

    var = work / "var"
    work.mkdir(parents=True)
    dicom_port, mllp_port, http_port = free_port(), free_port(), free_port()
    env = engine_env(var, conf, dicom=dicom_port, mllp=mllp_port, http=http_port)
    server = Server("engine", [sys.executable, "-m", "engine.cli", "run"], env=env, cwd=REPO, logdir=work)
    ok = False
    try:
        server.wait_listening(dicom_port, mllp_port, http_port)
        with MLLPClient(HOST, mllp_port, timeout=30) as client:
            for msg in hl7_messages():
                reply = client.send(msg).decode("latin-1")
                if "MSA|AA|" not in reply:
                    raise RuntimeError(f"HL7 not accepted: {reply!r}")
        sent = storescu(AET, dicom_port, files, timeout=120 + 0.5 * len(files))
        if sent.exit_code != 0 or sent.ok != len(files):
            raise RuntimeError(f"storescu exit {sent.exit_code}, {sent.ok}/{len(files)} success responses\n"
                               f"{sent.log_tail}")

        def indexed() -> bool:
            rows = db_query(var, "SELECT num_instances FROM studies WHERE study_uid = ?", study_uid)
            return bool(rows) and rows[0][0] == len(files)

        wait_for("the engine has not indexed every instance", indexed)
        wait_for("the reconciliation queue is not empty",
                 lambda: db_query(var, "SELECT count(*) FROM reconcile_queue")[0][0] == 0)
        ok = True
    finally:
        code = server.stop()
        if not ok or code not in (0, None, -signal.SIGTERM):
            print(f"engine exited with {code}; log tail:\n{server.tail()}", file=sys.stderr)
    (state,) = db_query(var, "SELECT state FROM studies WHERE study_uid = ?", study_uid)[0]
    if state != "receiving":
        raise RuntimeError(f"study is {state} after populating, expected receiving")
    rows = db_query(var, "SELECT i.sop_instance_uid, i.storage_key, i.size_bytes FROM instances i "
                         "JOIN studies s ON s.id = i.study_id WHERE s.study_uid = ?", study_uid)
    return Store(var, study_uid, len(rows), sum(r[2] for r in rows), {r[0]: r[1] for r in rows})


# =====================================================================================================
# Workers: one timed part each, in a process of its own (this script with --worker)
# =====================================================================================================

def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: clear_refs 5), so the peak read at the end
    belongs to the timed part only."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(work: Any) -> dict[str, Any]:
    """Run ``work()``: wall and CPU seconds, RSS before, peak RSS during (from a reset VmHWM)."""
    pid = os.getpid()
    gc.collect()
    before = proc_status(pid, "VmRSS")
    reset = reset_peak()
    cpu0, t0 = os.times(), time.perf_counter()
    extra = work()
    seconds = time.perf_counter() - t0
    cpu1 = os.times()
    return {"seconds": seconds, "cpu": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
            "rss_before_kb": before, "peak_kb": proc_status(pid, "VmHWM"), "peak_reset": reset, **(extra or {})}


def worker_engine(spec: dict[str, Any]) -> dict[str, Any]:
    """Mark the study stable (untimed; that queues it), then time ``Reconciler.run_pending()``."""
    sys.path.insert(0, str(REPO))
    from datetime import timedelta

    from sqlalchemy import select

    from engine.cli.common import open_db
    from engine.cli.studies import reconciler_for_tools
    from engine.config import load_settings
    from engine.domain.events import EventBus
    from engine.domain.studies import STUDIES, mark_stable
    from engine.reconciliation import triggers
    from engine.store.types import utcnow

    settings = load_settings()  # config/radbridge.toml (cwd is the repository) and the environment
    db = open_db(settings)
    try:
        with db.write_session() as s, s.begin():
            conn = s.connection()
            study_id = conn.execute(select(STUDIES.c.id).where(STUDIES.c.study_uid == spec["study_uid"])).scalar_one()
            stable = mark_stable(conn, study_id, utcnow() + timedelta(hours=1))
            if stable is None:
                raise RuntimeError("the study could not be marked stable")
            bus = EventBus()  # as the engine publishes study.stable: the reconciliation queue reacts
            triggers.subscribe(bus)
            bus.publish(conn, stable)
        # as `radbridge studies reconcile` runs it
        results: list[Any] = []
        rec = reconciler_for_tools(db, settings, on_result=results.append)
        policy = rec.policy_for("dicom")[0]
        if policy != "coerce":
            raise RuntimeError(f"the DICOM channel's policy is {policy}, not coerce")
        out = timed(lambda: {"runs": rec.run_pending()})
        out["results"] = [{"state": r.state, "coerced": r.coerced, "checked": r.checked, "findings": r.findings}
                          for r in results]
        out["fsync"] = settings.dicom.fsync
        return out
    finally:
        db.dispose()


def worker_naive(spec: dict[str, Any]) -> dict[str, Any]:
    """Per file: full dcmread (pixel data read), PatientName set, save_as, fsync, rename, fsync dir."""
    import pydicom

    src_dir, out_dir, tmp = Path(spec["in"]), Path(spec["out"]), Path(spec["tmp"])
    files = sorted(src_dir.iterdir())

    def work() -> None:
        for i, src in enumerate(files):
            ds = pydicom.dcmread(src)
            ds.PatientName = CORRECT
            part = tmp / f"{i:06d}.part"
            with open(part, "wb") as f:
                ds.save_as(f, enforce_file_format=True)
                f.flush()
                os.fsync(f.fileno())
            del ds
            os.replace(part, out_dir / src.name)
            fsync_dir(out_dir)
            os.unlink(src)

    return timed(work)


def worker_copy(spec: dict[str, Any]) -> dict[str, Any]:
    """Per file: shutil.copyfile, fsync, rename, fsync dir: the floor of rewriting every file durably."""
    src_dir, out_dir, tmp = Path(spec["in"]), Path(spec["out"]), Path(spec["tmp"])
    files = sorted(src_dir.iterdir())

    def work() -> None:
        for i, src in enumerate(files):
            part = tmp / f"{i:06d}.part"
            shutil.copyfile(src, part)
            fd = os.open(part, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(part, out_dir / src.name)
            fsync_dir(out_dir)
            os.unlink(src)

    return timed(work)


WORKERS = {"engine": worker_engine, "naive": worker_naive, "copy": worker_copy}
LABELS = {"engine": "engine (coerce)", "naive": "naive pydicom", "copy": "copy + fsync"}


# =====================================================================================================
# One measured run: a fresh copy of the store, the worker, the checks
# =====================================================================================================

@dataclass
class Run:
    kind: str
    instances: int
    size_bytes: int
    seconds: float = 0.0
    cpu: float = 0.0
    rss_before_kb: int = 0
    peak_kb: int = 0
    peak_reset: bool = True
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def growth_kb(self) -> int:
        return self.peak_kb - self.rss_before_kb


def run_worker(kind: str, spec: dict[str, Any], env: dict[str, str], timeout: float) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)]
    try:
        proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return dict(json.loads(line[len(RESULT_PREFIX):]))
    return {"error": f"worker exited with {proc.returncode}, no result:\n{(proc.stderr or proc.stdout)[-3000:]}"}


def tail_digest(path: Path) -> str:
    """SHA-256 of a file from its Pixel Data element to the end (the bytes the engine must not change)."""
    from pydicom import dcmread

    h = hashlib.sha256()
    with open(path, "rb") as f:
        dcmread(f, stop_before_pixels=True)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sample(keys: Sequence[str], n: int = SAMPLES) -> list[str]:
    step = max(1, len(keys) // n)
    return list(dict.fromkeys([*keys[::step][:n], keys[-1]]))


def check_header(path: Path, kind: str) -> str | None:
    """What is wrong with a rewritten file's header, if anything."""
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    if str(ds.PatientName).upper() != CORRECT.upper():
        return f"{path.name}: PatientName {ds.PatientName!s}"
    if kind == "engine":
        items = ds.get("OriginalAttributesSequence") or []
        if not items or str(items[-1].ModifiedAttributesSequence[0].PatientName) != MISSPELT \
                or items[-1].ReasonForTheAttributeModification != "COERCE":
            return f"{path.name}: no Original Attributes Sequence item with the old PatientName"
    return None


def measure_engine(store: Store, conf: Path, run_dir: Path, timeout: float) -> Run:
    run = Run("engine", store.instances, store.size_bytes)
    var = run_dir / "var"
    shutil.copytree(store.var, var)
    os.sync()  # the copy's dirty pages must not be flushed by the timed part's fsyncs
    res = run_worker("engine", {"study_uid": store.study_uid}, engine_env(var, conf), timeout)
    if "error" in res:
        run.problems.append(res["error"])
        return run
    for k in ("seconds", "cpu", "rss_before_kb", "peak_kb", "peak_reset"):
        setattr(run, k, res[k])
    if not res["fsync"]:
        run.problems.append("the engine ran with dicom.fsync off")
    r = res["results"][0] if len(res["results"]) == 1 else None
    if r is None or res["runs"] != 1 or r["state"] != "reconciled" or r["coerced"] != store.instances:
        run.problems.append(f"expected one run, reconciled, {store.instances} coerced; got {res['runs']} run(s): "
                            f"{res['results']}")
    # the checks, untimed: index, files, Original Attributes Sequence, pixel data, no leftovers
    rows = db_query(var, "SELECT i.sop_instance_uid, i.storage_key FROM instances i JOIN studies s "
                         "ON s.id = i.study_id WHERE s.study_uid = ?", store.study_uid)
    keys = {sop: key for sop, key in rows}
    (state, recon), = db_query(var, "SELECT state, recon_state FROM studies WHERE study_uid = ?", store.study_uid)
    revisions = db_query(var, "SELECT count(*) FROM instance_revisions")[0][0]
    if (state, recon, revisions, len(keys)) != ("stable", "reconciled", store.instances, store.instances):
        run.problems.append(f"study {state}/{recon}, {revisions} revisions, {len(keys)} instances")
    root = var / "studies"
    bad = [msg for key in keys.values() if (msg := check_header(root / key, "engine"))]
    files = sum(1 for p in root.rglob("*") if p.is_file())
    # tmp/.engines is the running engines' lock (docs/scaling.md), not a leftover of a transfer
    leftovers = [p for p in (var / "tmp").iterdir() if p.name != ".engines"]
    if bad or files != store.instances or leftovers:
        run.problems.append(f"{len(bad)} bad headers {bad[:3]}; {files} files in storage; tmp holds {leftovers[:3]}")
    for sop in sample(sorted(keys)):
        if keys[sop] == store.keys[sop] or tail_digest(root / keys[sop]) != tail_digest(store.var / "studies" /
                                                                                       store.keys[sop]):
            run.problems.append(f"{sop}: not rewritten, or its pixel data bytes changed")
    return run


def measure_baseline(kind: str, store: Store, run_dir: Path, timeout: float) -> Run:
    run = Run(kind, store.instances, store.size_bytes)
    src, out, tmp = run_dir / "in", run_dir / "out", run_dir / "tmp"
    for d in (src, out, tmp):
        d.mkdir(parents=True)
    names = {}
    for i, (sop, key) in enumerate(sorted(store.keys.items())):
        names[sop] = f"{i:06d}.dcm"
        shutil.copyfile(store.var / "studies" / key, src / names[sop])
    os.sync()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADBRIDGE_")}
    res = run_worker(kind, {"in": str(src), "out": str(out), "tmp": str(tmp)}, env, timeout)
    if "error" in res:
        run.problems.append(res["error"])
        return run
    for k in ("seconds", "cpu", "rss_before_kb", "peak_kb", "peak_reset"):
        setattr(run, k, res[k])
    done = sorted(p.name for p in out.iterdir())
    if done != sorted(names.values()) or any(src.iterdir()) or any(tmp.iterdir()):
        run.problems.append(f"{len(done)} files written of {store.instances}, or inputs / parts left over")
        return run
    if kind == "naive":
        bad = [msg for name in done if (msg := check_header(out / name, kind))]
        if bad:
            run.problems.append(f"{len(bad)} bad headers: {bad[:3]}")
    for sop in sample(sorted(store.keys)):
        if tail_digest(out / names[sop]) != tail_digest(store.var / "studies" / store.keys[sop]):
            run.problems.append(f"{sop}: pixel data bytes changed")
    return run


def measure(kind: str, store: Store, conf: Path, root: Path, n_run: int, keep: bool) -> Run:
    run_dir = root / f"{n_run:02d}-{kind}"
    timeout = 300 + 2.0 * store.size_bytes / 1e6  # at least 0.5 MB/s before we call it stuck
    try:
        if kind == "engine":
            return measure_engine(store, conf, run_dir, timeout)
        return measure_baseline(kind, store, run_dir, timeout)
    except Exception as exc:
        run = Run(kind, store.instances, store.size_bytes)
        run.problems.append(f"{type(exc).__name__}: {exc}")
        return run
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)


# =====================================================================================================
# Output
# =====================================================================================================

def print_runs(runs: list[Run]) -> None:
    head = (f"{'scenario':<17}{'run':>4}{'instances':>10}{'MB':>8}{'seconds':>9}{'inst/s':>8}{'MB/s':>7}"
            f"{'CPU s':>7}{'RSS before MiB':>16}{'peak MiB':>10}{'growth MiB':>12}")
    print()
    print(head)
    print("-" * len(head))
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.kind] = seen.get(r.kind, 0) + 1
        rate = f"{r.instances / r.seconds:>8.1f}{r.size_bytes / 1e6 / r.seconds:>7.1f}" if r.seconds else \
            f"{'-':>8}{'-':>7}"
        print(f"{LABELS[r.kind]:<17}{seen[r.kind]:>4}{r.instances:>10}{r.size_bytes / 1e6:>8.1f}{r.seconds:>9.2f}"
              f"{rate}{r.cpu:>7.2f}{mib(r.rss_before_kb):>16}{mib(r.peak_kb):>10}{mib(r.growth_kb):>12}"
              f"{'' if r.ok else '  FAILED'}")
    if any(not r.peak_reset for r in runs):
        print("note: VmHWM could not be reset (/proc/self/clear_refs); peaks include everything before the "
              "timed part")


def print_ratios(runs: list[Run]) -> None:
    def med(kind: str, attr: str) -> float | None:
        vals = [float(getattr(r, attr)) for r in runs if r.kind == kind and r.ok]
        return statistics.median(vals) if vals else None

    def pairs(base: str, attr: str) -> list[float]:
        """engine / baseline of each round (the runs made in turns), for the spread."""
        eng = [r for r in runs if r.kind == "engine"]
        other = [r for r in runs if r.kind == base]
        return [getattr(e, attr) / getattr(b, attr) for e, b in zip(eng, other, strict=False)
                if e.ok and b.ok and getattr(b, attr)]

    n = max((sum(1 for r in runs if r.kind == k) for k in WORKERS), default=1)
    print()
    print(f"ratios engine / baseline{' of the medians (range of the rounds in brackets)' if n > 1 else ''}; "
          "time > 1: the engine is slower:")
    for base in ("naive", "copy"):
        parts = []
        for attr, what in (("seconds", "time"), ("cpu", "CPU"), ("peak_kb", "peak RSS")):
            e, b = med("engine", attr), med(base, attr)
            each = pairs(base, attr)
            spread = f" ({min(each):.2f}-{max(each):.2f})" if n > 1 and len(each) > 1 else ""
            parts.append(f"{what} {e / b:.2f}{spread}" if e is not None and b else f"{what} -")
        ge, gb = med("engine", "growth_kb"), med(base, "growth_kb")
        growth = f"RSS growth {ge / 1024:+.1f} vs {gb / 1024:+.1f} MiB" if ge is not None and gb is not None else ""
        print(f"  engine / {base:<6}{'  '.join(parts)}   {growth}")


def print_problems(runs: list[Run]) -> None:
    for r in runs:
        for p in r.problems:
            print(f"  {LABELS[r.kind]}: " + p.replace("\n", "\n    "))


# =====================================================================================================
# CLI
# =====================================================================================================

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=1000, help="instances in the study (default 1000)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each scenario, in turns (default 1)")
    ap.add_argument("--large-mb", type=int, default=0, metavar="MB",
                    help="then one multi-frame instance of about this many MB, once per scenario (default 0: none)")
    ap.add_argument("--tmpdir", default=None, help="where stores and copies go (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (stores, logs, run copies)")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "JSON"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.instances < 1 or args.repeat < 1 or args.large_mb < 0:
        ap.error("--instances and --repeat must be at least 1, --large-mb at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        kind, spec = args.worker
        print(RESULT_PREFIX + json.dumps(WORKERS[kind](json.loads(spec))), flush=True)
        return 0

    def on_term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    if not shutil.which("storescu"):
        print("missing: storescu (Debian package dcmtk)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    import pydicom

    root = Path(tempfile.mkdtemp(prefix="radbridge-coerce-bench-", dir=args.tmpdir))
    print(f"radbridge coerce reconciliation benchmark: {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}, "
          f"pydicom {pydicom.__version__}, {tool_version(['storescu', '--version']).strip('$ ')}; engine from "
          f"{describe_source(REPO)}; SQLite, fsync on; work in {root}", flush=True)
    failed = False
    n_run = 0
    try:
        conf = root / "conf"
        rules = copy_config(conf)
        print(f"config: repository channels/ and mappings/, DICOM channel policy coerce, rules {rules}")
        plans: list[tuple[str, int]] = [("study", args.instances)]
        if args.large_mb:
            plans.append(("large", args.large_mb))
        for what, n in plans:
            t0 = time.perf_counter()
            if what == "study":
                study_uid, files = make_instances(root / "send-study", n)
                desc = f"{n} instances of 693_UNCI.dcm (CT 512x512)"
            else:
                study_uid, files, frames = make_large(root / "send-large", n)
                desc = f"1 instance, {frames} frames of the CT (~{n} MB)"
            try:
                store = populate(root / f"store-{what}", conf, study_uid, files)
            except Exception as exc:
                print(f"\n{what}: could not store it through the engine: {type(exc).__name__}: {exc}")
                failed = True
                continue
            for f in files:
                f.unlink()
            print(f"\n{what}: {desc}, one study, PatientName {MISSPELT} (ADT: {CORRECT}); stored through the "
                  f"engine (ADT^A04 + ORM^O01 over MLLP, storescu) in {time.perf_counter() - t0:.1f} s: "
                  f"{store.instances} instance(s), {store.size_bytes / 1e6:.1f} MB", flush=True)
            runs: list[Run] = []
            for rep in range(1, (args.repeat if what == "study" else 1) + 1):
                for kind in WORKERS:
                    n_run += 1
                    print(f"  {LABELS[kind]}{f' (run {rep} of {args.repeat})' if args.repeat > 1 and what == 'study' else ''}"
                          " ...", flush=True)
                    runs.append(measure(kind, store, conf, root, n_run, args.keep))
            print_runs(runs)
            print_ratios(runs)
            print_problems(runs)
            failed = failed or any(not r.ok for r in runs)
            if not args.keep:
                shutil.rmtree(store.var.parent, ignore_errors=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
