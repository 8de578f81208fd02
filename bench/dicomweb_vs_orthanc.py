#!/usr/bin/env python3
"""DICOMweb against Orthanc's DICOMweb plugin, same run, same data: WADO-RS retrieve and QIDO-RS search.

Run on demand (it is not a test); see bench/README.md. Both servers start empty, each in its own process:

* engine: ``python -m engine.cli run`` (SQLite, ``RADBRIDGE_DICOM_FSYNC=false`` as Orthanc stores, the
  repository's channels and mappings), DICOMweb at ``/dicomweb`` with a token (role read);
* orthanc: the Debian package's ``/usr/sbin/Orthanc`` with its DICOMweb plugin at ``/dicom-web``, Orthanc's
  defaults except storage and index directories, ports and no HTTP authentication (the config is printed).

Both are sent the same files by dcmtk's ``storescu`` (one association each set, ``TCP_NODELAY=1``) through
their DICOM SCPs: one study of ``--instances`` copies of pydicom-data's 512x512 CT (``693_UNCI.dcm``,
explicit VR little endian, 526 kB) and ``--studies`` studies of one tiny instance each (8x8 pixels, 3,000
patients, a year of study dates, as bench/dicomweb_qido.py's index). Then, from one client (http.client,
one keep-alive connection per server), alternating engine and Orthanc request by request:

* WADO-RS retrieve of the big study, ``Accept: multipart/related; type="application/dicom";
  transfer-syntax=*`` (the stored syntax), ``--retrieves`` times after one untimed warm-up each: seconds per
  study and MB/s (bytes of the multipart body); every part must arrive;
* WADO-RS metadata of that study (``application/dicom+json``), as often: one object per instance (the
  warm-up round's request, which reads every header, is shown apart as "first request");
* QIDO-RS study searches, ``--repeat`` times each with other values: the first 100 of all studies, by
  PatientID, a month of StudyDate (limit 100), a PatientName wildcard (limit 100), by AccessionNumber.
  Both must give the same number of results (the same studies for PatientID and AccessionNumber).

It prints p50/p95 (and MB/s) per server and the speed ratio Orthanc time / engine time (at or above 1: the
engine is at least as fast). It exits 1 when a check fails. Orthanc listens on every interface: when run
as root the whole benchmark runs in a new network namespace with nothing but ``lo`` (``unshare -n``).

Usage:
    python bench/dicomweb_vs_orthanc.py                       # 500 instances, 10,000 studies
    python bench/dicomweb_vs_orthanc.py --repeat 50 --retrieves 9
    python bench/dicomweb_vs_orthanc.py --quick               # a smoke run of a few seconds
    python bench/dicomweb_vs_orthanc.py --baseline-src DIR    # and the engine of another tree (before/after)
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchutil import cpu_seconds, describe_source, die_with_parent, json_option, percentiles, write_figures
from dicom_ingest import HOST, ORTHANC, Server, free_port, make_instances, netns_available, tool_version
from transcode_retrieve import start_engine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.dicomutil import DcmtkMissing, dcmtk_tool  # noqa: E402

ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
TOKEN = "bench"  # transcode_retrieve.start_engine's token
PATIENTS = 3000
MODALITIES = ["CT", "MR", "CR", "US"]
FAMILIES = ["SMITH", "JONES", "BROWN", "TAYLOR", "WILSON", "DAVIES", "EVANS", "THOMAS", "JOHNSON", "ROBERTS"]
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
RETRIEVE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
HTTP_TIMEOUT = 300.0
SEND_TIMEOUT = 3600.0
READ = 1 << 20


# =====================================================================================================
# Data
# =====================================================================================================

def uid(kind: int, i: int) -> str:
    return f"1.2.826.0.1.3680043.10.7{kind}.{i}"


def patient_of(i: int) -> int:
    return random.Random(i).randrange(PATIENTS)


def make_tiny_studies(directory: Path, count: int) -> None:
    """``count`` studies of one 8x8 secondary capture each; study i: patient ``P%05d`` (3,000 of them),
    name ``FAMILY^PATn``, accession ``ACC%07d``, a date in 2024, one of four modalities."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        p = patient_of(i)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
        meta.MediaStorageSOPInstanceUID = UID(uid(3, i))
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = SECONDARY_CAPTURE, uid(3, i)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uid(1, i), uid(2, i)
        ds.PatientID, ds.PatientName = f"P{p:05d}", f"{FAMILIES[p % len(FAMILIES)]}^PAT{p}"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "FM"[p % 2]
        ds.AccessionNumber, ds.StudyID = f"ACC{i:07d}", str(i)
        ds.StudyDate, ds.StudyTime = f"2024{1 + i % 12:02d}{1 + i % 28:02d}", "101500"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = MODALITIES[i % 4], 1, 1
        ds.ConversionType = "WSD"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = bytes(range(64))
        ds.save_as(directory / f"{i:06d}.dcm", enforce_file_format=True)


def send(port: int, aet: str, paths: Sequence[str], expected: int) -> float:
    """storescu in one association (``+sd``: the files of a directory); seconds. RuntimeError unless every
    store response is Success."""
    argv = [dcmtk_tool("storescu"), "-v", "+sd", "-aec", aet, HOST, str(port), *paths]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=SEND_TIMEOUT,
                          env={**os.environ, "TCP_NODELAY": "1"}, preexec_fn=die_with_parent)
    seconds = time.perf_counter() - t0
    ok = proc.stderr.count("Received Store Response (Success)")
    if proc.returncode != 0 or ok != expected:
        raise RuntimeError(f"storescu to {aet}: exit {proc.returncode}, {ok}/{expected} success responses\n"
                           f"{proc.stderr[-2000:]}")
    return seconds


# =====================================================================================================
# Orthanc
# =====================================================================================================

def orthanc_config(work: Path, dicom_port: int, http_port: int) -> dict[str, Any]:
    """Orthanc's defaults except what a test server needs: where it stores, its ports, no HTTP
    authentication, the DICOMweb plugin (its own defaults)."""
    return {
        "Name": "radbridge-bench",
        "StorageDirectory": str(work / "orthanc-storage"),
        "IndexDirectory": str(work / "orthanc-index"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "AuthenticationEnabled": False,
        "Plugins": [ORTHANC_DICOMWEB],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }


def start_orthanc(work: Path) -> tuple[Server, int, int, dict[str, Any]]:
    dicom_port, http_port = free_port(), free_port()
    config = orthanc_config(work, dicom_port, http_port)
    path = work / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    server = Server("orthanc", [ORTHANC, str(path)], env={**os.environ, "TCP_NODELAY": "1"}, cwd=work, logdir=work)
    server.wait_listening(dicom_port, http_port)
    return server, dicom_port, http_port, config


# =====================================================================================================
# The client
# =====================================================================================================

class Client:
    """One keep-alive HTTP connection to one server's DICOMweb root."""

    def __init__(self, name: str, port: int, root: str, pid: int, token: str = "") -> None:
        self.name, self.port, self.root, self.pid = name, port, root.rstrip("/"), pid
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.conn = http.client.HTTPConnection(HOST, port, timeout=HTTP_TIMEOUT)

    def _request(self, path: str, accept: str) -> http.client.HTTPResponse:
        for attempt in (1, 2):  # a keep-alive connection the server closed meanwhile: once more on a new one
            try:
                self.conn.request("GET", self.root + path, headers={**self.headers, "Accept": accept})
                return self.conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=HTTP_TIMEOUT)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def json(self, path: str, accept: str = "application/dicom+json") -> tuple[float, Any]:
        t0 = time.perf_counter()
        resp = self._request(path, accept)
        body = resp.read()
        seconds = time.perf_counter() - t0
        if resp.status not in (200, 204):
            raise RuntimeError(f"{self.name} GET {path}: {resp.status} {body[:300]!r}")
        return seconds, json.loads(body) if body else []

    def multipart(self, path: str, accept: str) -> tuple[float, float, int, int]:
        """(seconds to the last byte, the server's CPU seconds meanwhile, body bytes, parts); the body is
        counted as it comes, never kept."""
        cpu0 = cpu_seconds(self.pid)
        t0 = time.perf_counter()
        resp = self._request(path, accept)
        if resp.status != 200:
            raise RuntimeError(f"{self.name} GET {path}: {resp.status} {resp.read()[:300]!r}")
        ctype = resp.getheader("Content-Type", "")
        boundary = next((p.split("=", 1)[1].strip().strip('"') for p in ctype.split(";")
                         if p.strip().lower().startswith("boundary=")), "")
        if not boundary:
            raise RuntimeError(f"{self.name} GET {path}: no boundary in {ctype!r}")
        marker = b"\r\n--" + boundary.encode()
        size, found, tail = 0, 0, b"\r\n"  # the first delimiter has no CRLF before it: as if it had
        while chunk := resp.read(READ):
            size += len(chunk)
            window = tail + chunk
            found += window.count(marker)
            tail = window[-(len(marker) - 1):]
        seconds = time.perf_counter() - t0
        return seconds, cpu_seconds(self.pid) - cpu0, size, found - 1  # the last delimiter closes the body


# =====================================================================================================
# Measurements
# =====================================================================================================

@dataclass
class Timings:
    seconds: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # what -> server -> seconds
    sizes: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    server_cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # retrieves only
    problems: list[str] = field(default_factory=list)

    def add(self, what: str, server: str, seconds: float, size: int = 0, cpu: float | None = None) -> None:
        self.seconds.setdefault(what, {}).setdefault(server, []).append(seconds)
        self.sizes.setdefault(what, {}).setdefault(server, []).append(size)
        if cpu is not None:
            self.server_cpu.setdefault(what, {}).setdefault(server, []).append(cpu)


def qido_searches(rng: random.Random, count: int) -> dict[str, str]:
    i = rng.randrange(count)
    month = rng.randrange(1, 13)
    return {
        "all studies, first 100": "/studies?limit=100",
        "PatientID": f"/studies?PatientID=P{patient_of(i):05d}",
        "StudyDate, a month (100)": f"/studies?StudyDate=2024{month:02d}01-2024{month:02d}31&limit=100",
        "PatientName wildcard (100)": f"/studies?PatientName={FAMILIES[rng.randrange(len(FAMILIES))]}*&limit=100",
        "AccessionNumber": f"/studies?AccessionNumber=ACC{i:07d}",
    }


def study_uids(results: list[dict[str, Any]]) -> set[str]:
    return {str(r["0020000D"]["Value"][0]) for r in results}


def run_qido(clients: list[Client], count: int, repeat: int, t: Timings) -> None:
    rng = random.Random(11)
    for c in clients:  # warm-up: connections open, pools and caches filled
        c.json("/studies?limit=1")
    for n in range(repeat):
        for name, path in qido_searches(rng, count).items():
            answers: dict[str, list[dict[str, Any]]] = {}
            for c in clients if n % 2 == 0 else clients[::-1]:
                seconds, answers[c.name] = c.json(path)
                t.add(name, c.name, seconds)
            counts = {k: len(v) for k, v in answers.items()}
            if len(set(counts.values())) != 1 or 0 in counts.values():
                t.problems.append(f"{name} {path}: results {counts}")
            elif name in ("PatientID", "AccessionNumber") and len({frozenset(study_uids(v))
                                                                   for v in answers.values()}) != 1:
                t.problems.append(f"{name} {path}: not the same studies")


def run_retrieve(clients: list[Client], study_uid: str, instances: int, repeat: int, t: Timings) -> None:
    path = f"/studies/{study_uid}"
    for n in range(repeat + 1):  # round 0: warm-up
        for c in clients if n % 2 == 0 else clients[::-1]:
            seconds, cpu, size, parts = c.multipart(path, RETRIEVE_ACCEPT)
            if parts != instances:
                t.problems.append(f"{c.name} retrieve: {parts} of {instances} instances")
            if n:
                t.add("WADO-RS retrieve", c.name, seconds, size, cpu)
            seconds, meta = c.json(path + "/metadata")
            if len(meta) != instances:
                t.problems.append(f"{c.name} metadata: {len(meta)} of {instances} instances")
            # the first request reads every file's header; later ones find the engine's metadata kept
            t.add("WADO-RS metadata" if n else "WADO-RS metadata, first request", c.name, seconds)


def check_counts(clients: list[Client], studies: int) -> list[str]:
    """Each server holds every study sent: offset ``studies`` gives the last one, no more."""
    problems = []
    for c in clients:
        _, last = c.json(f"/studies?limit=5&offset={studies}")
        if len(last) != 1:
            problems.append(f"{c.name} holds {studies + len(last)} studies, not {studies + 1}")
    return problems


# =====================================================================================================
# Output
# =====================================================================================================

def print_results(t: Timings, names: list[str]) -> dict[str, float]:
    """Rows per request and server; each engine's speed against Orthanc; with a baseline engine (the
    last name, ``--baseline-src``) this engine's speed against it too. Returns each request's p50 per
    server, "<request> <server> p50 ms" (``--json``)."""
    engine, orthanc = names[:2]
    head = (f"{'request':<28}{'server':<9}{'n':>4}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}{'MB/s p50':>10}"
            f"{'speed engine/orthanc (p50, p95)':>34}")
    print("\n" + head + "\n" + "-" * len(head))
    for what, by in t.seconds.items():
        for server in names:
            values = by.get(server, [])
            if not values:
                continue
            p50, p95, most = percentiles(values)
            sizes = t.sizes[what][server]
            mbs = f"{statistics.median(s / v for s, v in zip(sizes, values, strict=True)) / 1e6:10.1f}" \
                if any(sizes) else f"{'':10}"
            ratio = ""
            if server != orthanc and by.get(orthanc):
                o50, o95, _ = percentiles(by[orthanc])
                ratio = f"{o50 / p50:>26.2f}, {o95 / p95:.2f}"
            print(f"{what:<28}{server:<9}{len(values):>4}{p50 * 1000:10.1f}{p95 * 1000:10.1f}{most * 1000:10.1f}"
                  f"{mbs}{ratio}")
    worst = min((percentiles(by[orthanc])[0] / percentiles(by[engine])[0], what)
                for what, by in t.seconds.items() if by.get(engine) and by.get(orthanc))
    print(f"\nspeed engine/orthanc is Orthanc's time / the engine's (p50): at or above 1.00, the engine is at "
          f"least as fast; lowest: {worst[0]:.2f} ({worst[1]})")
    if len(names) > 2:
        before = names[2]
        print(f"\nthis engine against {before} (its time / this engine's; above 1.00: faster now):")
        for what, by in t.seconds.items():
            if by.get(engine) and by.get(before):
                (n50, n95, _), (b50, b95, _) = percentiles(by[engine]), percentiles(by[before])
                print(f"  {what:<28} p50 {b50 / n50:5.2f}   p95 {b95 / n95:5.2f}")
    for what, by in t.server_cpu.items():
        shown = ", ".join(f"{server} {statistics.median(by[server]) * 1000:.0f} ms" for server in names if by.get(server))
        print(f"\nserver CPU per {what} (p50 of user + system time of the server process, from /proc): {shown}")
    return {f"{what} {server} p50 ms": 1000 * percentiles(values)[0]
            for what, by in t.seconds.items() for server, values in by.items() if values}


# =====================================================================================================
# CLI
# =====================================================================================================

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=500, help="instances of the retrieved study (default 500)")
    ap.add_argument("--studies", type=int, default=10_000, help="tiny studies searched (default 10,000)")
    ap.add_argument("--repeat", type=int, default=30, help="requests of each QIDO search per server (default 30)")
    ap.add_argument("--retrieves", type=int, default=5,
                    help="timed retrieves (and metadata) of the study per server (default 5)")
    ap.add_argument("--baseline-src", type=Path, default=None, metavar="DIR",
                    help="a third server: the engine of another source tree (e.g. an older commit, "
                         "`git worktree add --detach DIR COMMIT`), same settings, for before/after figures")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 5 instances, 40 studies, 2 of each request")
    ap.add_argument("--no-netns", action="store_true",
                    help="stay in this network namespace (Orthanc then listens on every interface)")
    ap.add_argument("--tmpdir", default=None, help="where the instances and storage go (default: system temp)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep instances, storage and logs")
    ap.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    json_option(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.instances, args.studies, args.repeat, args.retrieves = 5, 40, 2, 2
    if min(args.instances, args.studies, args.repeat, args.retrieves) < 1:
        ap.error("--instances, --studies, --repeat and --retrieves must be at least 1")
    return args


def in_new_netns(argv: list[str]) -> int:
    """This script again, with ``--in-netns``, in a new network namespace that has only ``lo``."""
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
           sys.executable, str(Path(__file__).resolve()), *argv, "--in-netns"]
    return subprocess.run(cmd, cwd=REPO, preexec_fn=die_with_parent).returncode


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    missing = []
    try:
        dcmtk_tool("storescu")
    except DcmtkMissing as exc:
        missing.append(str(exc))
    missing += [f"{p} (Debian packages orthanc, orthanc-dicomweb)" for p in (ORTHANC, ORTHANC_DICOMWEB)
                if not os.path.exists(p)]
    if missing:
        print("missing: " + "; ".join(missing), file=sys.stderr)
        return 2
    if not args.in_netns and not args.no_netns and netns_available():
        return in_new_netns(raw)
    root = Path(tempfile.mkdtemp(prefix="radbridge-dicomweb-orthanc-", dir=args.tmpdir))
    servers: list[Server] = []
    try:
        return run(args, root, servers)
    finally:
        for s in servers:
            s.stop()
        if args.keep_tmp:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, root: Path, servers: list[Server]) -> int:
    print(f"radbridge DICOMweb vs Orthanc: {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}; engine from "
          f"{describe_source(REPO)}; {tool_version([ORTHANC, '--version'])}, plugin {ORTHANC_DICOMWEB}; "
          f"{'in a new network namespace (lo only)' if args.in_netns else 'in this network namespace'}",
          flush=True)
    t0 = time.perf_counter()
    big = make_instances(root / "big", args.instances)
    make_tiny_studies(root / "tiny", args.studies)
    print(f"made {args.instances} CT instances ({big.size_bytes / 1e6:.1f} MB) and {args.studies:,} one-instance "
          f"studies in {time.perf_counter() - t0:.1f} s", flush=True)

    (root / "engine").mkdir()
    (root / "orthanc").mkdir()
    engine, engine_dicom, engine_http = start_engine(root / "engine")
    servers.append(engine)
    orthanc, orthanc_dicom, orthanc_http, config = start_orthanc(root / "orthanc")
    servers.append(orthanc)
    shown = {k: v for k, v in config.items() if k not in ("StorageDirectory", "IndexDirectory")}
    print(f"orthanc config (its defaults for everything else; storage and index under the temp dir): "
          f"{json.dumps(shown)}")
    print("engine: python -m engine.cli run, SQLite, RADBRIDGE_DICOM_FSYNC=false, RADBRIDGE_STABLE_SECONDS=3600, "
          "the repository's channels/ and mappings/, other settings at their defaults", flush=True)
    clients = [Client("engine", engine_http, "/dicomweb", engine.pid, TOKEN),
               Client("orthanc", orthanc_http, "/dicom-web", orthanc.pid)]
    targets = [("engine", engine_dicom, "RADBRIDGE"), ("orthanc", orthanc_dicom, "ORTHANC")]
    if args.baseline_src:
        (root / "before").mkdir()
        before, before_dicom, before_http = start_engine(root / "before", args.baseline_src.resolve())
        servers.append(before)
        print(f"before: the engine from {describe_source(args.baseline_src.resolve())}, the same settings", flush=True)
        clients.append(Client("before", before_http, "/dicomweb", before.pid, TOKEN))
        targets.append(("before", before_dicom, "RADBRIDGE"))

    for name, port, aet in targets:
        s_big = send(port, aet, [str(root / "big")], args.instances)
        s_tiny = send(port, aet, [str(root / "tiny")], args.studies)
        print(f"{name}: C-STORE {args.instances} CT in {s_big:.1f} s ({args.instances / s_big:.0f} inst/s), "
              f"{args.studies:,} tiny studies in {s_tiny:.1f} s ({args.studies / s_tiny:.0f} inst/s)", flush=True)
    problems = check_counts(clients, args.studies)

    t = Timings()
    if not problems:
        run_retrieve(clients, big.study_uid, args.instances, args.retrieves, t)
        run_qido(clients, args.studies, args.repeat, t)
        print(f"\n{args.instances}-instance study ({big.size_bytes / 1e6:.1f} MB of files) retrieved "
              f"{args.retrieves} times, Accept: {RETRIEVE_ACCEPT}; QIDO-RS over {args.studies + 1:,} studies, "
              f"{args.repeat} requests each; engine and Orthanc alternating")
        write_figures(args.json, print_results(t, [c.name for c in clients]))
    problems += t.problems
    for p in problems[:20]:
        print("ERROR:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
