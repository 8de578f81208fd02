#!/usr/bin/env python3
"""C-GET throughput with transcoding on retrieve, and the engine's memory while it decodes.

Run on demand (it is not a test); see bench/README.md. For each study size N (``--sizes``), a fresh engine
(``python -m engine.cli run``, SQLite, no fsync) is sent N copies of pydicom-data's 512x512 CT stored as
JPEG 2000 lossless (``693_J2KR.dcm``, one study, a new SOP Instance UID each) with dcmtk's storescu, then
the study is retrieved with C-GET, in the same run:

* stored:      pynetdicom as the C-GET SCU, offering JPEG 2000 lossless in a context of its own: the stored
               bytes go out as they are (no decoding);
* decoded:     pynetdicom again, offering explicit VR little endian only: every instance is decoded;
* getscu:      dcmtk's getscu with its default (uncompressed) contexts: decoded too.

Each retrieve is timed from the association request to the final response; the client writes what it
receives to disk (the bytes as received). It checks that every instance arrived in the expected syntax and
exits 1 otherwise. The engine's RSS is sampled every 20 ms during each retrieve (and its VmHWM read), so
that N=20 and N=200 show whether memory stays flat with the size of the study (instances are read,
decoded, sent and dropped one at a time).

Usage:
    python bench/transcode_retrieve.py                      # N = 20 and 200
    python bench/transcode_retrieve.py --sizes 50,500
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchutil import describe_source, die_with_parent, mib, proc_status
from dicom_ingest import HOST, Server, free_port, http_json, tool_version

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.dicomutil import DcmtkMissing, dcmtk_tool, pynetdicom_get  # noqa: E402

J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
COUNT_TIMEOUT = 120.0  # seconds for the engine to index what was sent


def template_path() -> Path:
    import data_store  # pydicom-data

    return Path(data_store.__file__).parent / "data" / "693_J2KR.dcm"


def make_study(directory: Path, count: int) -> tuple[str, str, list[Path]]:
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(template_path())
    assert ds.file_meta.TransferSyntaxUID == J2K_LOSSLESS
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = directory / f"{i:06d}.dcm"
        ds.save_as(path)
        files.append(path)
    return str(ds.StudyInstanceUID), str(ds.SOPClassUID), files


def start_engine(work: Path, src: Path = REPO) -> tuple[Server, int, int]:
    """The engine of the source tree ``src`` (default: this one), on SQLite in ``work``, no fsync."""
    dicom_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADBRIDGE_")}
    env.update({
        "RADBRIDGE_STORAGE_DIR": str(work / "var"), "RADBRIDGE_DICOM_PORT": str(dicom_port),
        "RADBRIDGE_MLLP_PORT": "0", "RADBRIDGE_HTTP_PORT": str(http_port), "RADBRIDGE_BIND": HOST,
        "RADBRIDGE_API_TOKEN": "bench", "RADBRIDGE_RETENTION_ENABLED": "false",
        "RADBRIDGE_STABLE_SECONDS": "3600", "RADBRIDGE_DICOM_FSYNC": "false",
        "RADBRIDGE_CHANNELS_DIR": str(REPO / "channels"), "RADBRIDGE_MAPPINGS_DIR": str(REPO / "mappings"),
        "TCP_NODELAY": "1",
    })
    server = Server("engine", [sys.executable, "-m", "engine.cli", "run"], env=env, cwd=src, logdir=work)
    server.wait_listening(dicom_port, http_port)
    return server, dicom_port, http_port


def store(port: int, files: list[Path]) -> None:
    proc = subprocess.run([dcmtk_tool("storescu"), "-xv", "-aec", "RADBRIDGE", HOST, str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TCP_NODELAY": "1"},
                          preexec_fn=die_with_parent)
    if proc.returncode != 0:
        raise RuntimeError(f"storescu failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


def wait_indexed(http_port: int, study_uid: str, count: int) -> None:
    t_limit = time.monotonic() + COUNT_TIMEOUT
    while True:
        studies = http_json(f"http://{HOST}:{http_port}/api/studies?study_uid={study_uid}", "bench")["studies"]
        if studies and int(studies[0]["number_of_instances"]) >= count:
            return
        if time.monotonic() > t_limit:
            raise TimeoutError(f"the engine indexed {studies[0]['number_of_instances'] if studies else 0} of "
                               f"{count} instances after {COUNT_TIMEOUT:.0f} s")
        time.sleep(0.1)


class RssSampler:
    """The largest VmRSS of ``pid`` seen every 20 ms while in the ``with`` block."""

    def __init__(self, pid: int) -> None:
        self.pid, self.max_kb = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max_kb = max(self.max_kb, proc_status(self.pid, "VmRSS"))
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class Retrieve:
    n: int
    mode: str
    seconds: float
    received: int
    size_bytes: int
    rss_max_kb: int
    hwm_kb: int
    problem: str = ""

    @property
    def rate(self) -> float:
        return self.received / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.size_bytes / 1e6 / self.seconds if self.seconds else 0.0


def get_pynetdicom(port: int, study_uid: str, sop_class: str, syntax: str, out: Path) -> tuple[int, str]:
    """C-GET offering ``syntax`` alone; each instance written as received. (count, problem)"""
    out.mkdir(parents=True, exist_ok=True)
    wrong: list[str] = []

    def on_store(event: Any) -> int:
        if str(event.context.transfer_syntax) != syntax:
            wrong.append(str(event.context.transfer_syntax))
        path = out / str(event.request.AffectedSOPInstanceUID)
        path.write_bytes(event.encoded_dataset())
        return 0

    status, _ = pynetdicom_get(port, study_uid, [(sop_class, [syntax])], on_store, calling="BENCHGET")
    problem = f"final status 0x{int(status.Status):04X}" if int(status.Status) != 0 else ""
    if wrong:
        problem += f" {len(wrong)} received in another syntax ({wrong[0]})"
    return len(list(out.iterdir())), problem.strip()


def get_getscu(port: int, study_uid: str, out: Path) -> tuple[int, str]:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([dcmtk_tool("getscu"), "-S", "-aec", "RADBRIDGE", "-od", str(out),
                           "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", HOST, str(port)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TCP_NODELAY": "1"},
                          preexec_fn=die_with_parent)
    problem = f"getscu exit {proc.returncode}: {proc.stderr[-500:]}" if proc.returncode != 0 else ""
    return len(list(out.iterdir())), problem


def measure(n: int, mode: str, pid: int, out: Path, run: Callable[[], tuple[int, str]]) -> Retrieve:
    with RssSampler(pid) as rss:
        t0 = time.perf_counter()
        received, problem = run()
        seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in out.iterdir())
    if received != n and not problem:
        problem = f"{received} of {n} instances received"
    return Retrieve(n, mode, seconds, received, size, rss.max_kb, proc_status(pid, "VmHWM"), problem)


def run_size(n: int, work: Path) -> list[Retrieve]:
    study_uid, sop_class, files = make_study(work / "objects", n)
    server, dicom_port, http_port = start_engine(work)
    try:
        store(dicom_port, files)
        wait_indexed(http_port, study_uid, n)
        results = []
        for mode in ("stored", "decoded", "getscu"):
            out = work / f"got-{mode}"
            if mode == "stored":
                def fn() -> tuple[int, str]:
                    return get_pynetdicom(dicom_port, study_uid, sop_class, J2K_LOSSLESS, work / "got-stored")
            elif mode == "decoded":
                def fn() -> tuple[int, str]:
                    return get_pynetdicom(dicom_port, study_uid, sop_class, EXPLICIT_LE, work / "got-decoded")
            else:
                def fn() -> tuple[int, str]:
                    return get_getscu(dicom_port, study_uid, work / "got-getscu")
            results.append(measure(n, mode, server.pid, out, fn))
        return results
    finally:
        server.stop()


def print_results(results: list[Retrieve]) -> None:
    head = (f"{'N':>6}  {'retrieve':<10}{'received':>9}{'MB':>9}{'seconds':>9}{'inst/s':>9}{'MB/s':>8}"
            f"{'engine RSS max MiB':>20}{'VmHWM MiB':>11}")
    rows = [f"{r.n:>6}  {r.mode:<10}{r.received:>9}{r.size_bytes / 1e6:>9.1f}{r.seconds:>9.2f}{r.rate:>9.1f}"
            f"{r.mb_per_s:>8.1f}{mib(r.rss_max_kb):>20}{mib(r.hwm_kb):>11}"
            f"{'  FAILED: ' + r.problem if r.problem else ''}" for r in results]
    print("\n".join(["", head, "-" * len(head), *rows, ""]))
    for n in sorted({r.n for r in results}):
        by = {r.mode: r for r in results if r.n == n}
        if by.get("stored") and by.get("decoded") and by["stored"].rate:
            print(f"N={n}: decoded / stored inst/s {by['decoded'].rate / by['stored'].rate:.2f}")
    sizes = sorted({r.n for r in results})
    if len(sizes) > 1:
        low, high = sizes[0], sizes[-1]
        rss = {n: max(r.rss_max_kb for r in results if r.n == n) for n in (low, high)}
        if rss[low]:
            print(f"engine RSS max while retrieving: N={low} {mib(rss[low])} MiB, N={high} {mib(rss[high])} MiB "
                  f"(ratio {rss[high] / rss[low]:.2f})")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="20,200", help="study sizes N, comma-separated (default 20,200)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    try:
        getscu_version = tool_version([dcmtk_tool("getscu"), "--version"])
    except DcmtkMissing as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"engine: {describe_source(REPO)}; dcmtk: {getscu_version}; source: {template_path().name} "
          f"(JPEG 2000 lossless, {template_path().stat().st_size / 1e3:.0f} kB)")
    results: list[Retrieve] = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"transcode-{n}-") as tmp:
            results.extend(run_size(n, Path(tmp)))
    print_results(results)
    return 1 if any(r.problem for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
