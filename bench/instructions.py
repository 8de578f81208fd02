"""Instructions per ingested HL7 message or FHIR Bundle, counted by valgrind (callgrind): a figure that does not drift.

Throughput on a shared 2-core machine varies by +-30 % between runs, which hides a 5 % change
(see bench/compare.py). The number of machine instructions the engine executes per message
does not depend on what else the machine is doing: the same tree gives the same count to a
fraction of a per cent. It measures CPU work only, not the time a commit waits for fsync.

    python bench/instructions.py --messages 300                         # MLLP, this tree
    python bench/instructions.py --baseline-src /tmp/before             # and an older tree, same run
    python bench/instructions.py --protocol fhir --messages 200         # FHIR transaction Bundles

For each tree: ``python -m engine.cli run`` under ``valgrind --tool=callgrind --instr-atstart=no``
(SQLite, synchronous=FULL, fresh database, the tree's channels/ and mappings/, as mllp_ingest.py
starts it); ``--warmup`` messages over one MLLP connection, untimed and uncounted; then counting is
switched on (``callgrind_control -i on``), ``--messages`` messages of mllp_ingest.py's mix (40 % A01,
20 % A08, 40 % ORM) are sent one at a time over the same connection, each ACK checked, and counting
is switched off. With ``--protocol fhir`` the items are fhir_ingest.py's Patient + ServiceRequest
transaction Bundles (20 % naming a known MRN), POSTed one at a time over one keep-alive HTTP
connection, each answer checked for 200. With ``--protocol dicom``: copies of dicom_ingest.py's CT
(512x512, a new study per run) sent by storescu in one association, every response Success, with
the engine's fsync on. The engine process's instructions over that span, divided
by the items, is the
figure (the event loop waiting in epoll costs none). Beside it, from /proc/PID/io, the bytes the
engine wrote (write() calls: WAL pages and checkpoints) per message, which is what each durable
commit has to fsync. Needs valgrind (Debian package valgrind).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import dicom_ingest as di
import fhir_ingest as fi
import mllp_ingest as mi
from benchutil import describe_source

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Count:
    tree: Path
    messages: int
    instructions: int
    written: int  # bytes the engine passed to write() (WAL pages, checkpoints) over the counted span
    writes: int  # write() calls

    @property
    def per_message(self) -> float:
        return self.instructions / self.messages


def proc_io(pid: int) -> dict[str, int]:
    """/proc/PID/io: wchar (bytes written) and syscw (write calls) do not depend on timing either."""
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = int(value)
    return out


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=300)


def dumped_instructions(directory: Path) -> int:
    """The Ir total of every dump callgrind wrote in ``directory``."""
    total = 0
    for path in directory.glob("callgrind.out*"):
        # "summary:" at the top may say 0 for a dump taken by callgrind_control; "totals:" at the end counts
        found = [int(m.group(1)) for m in re.finditer(r"^(?:summary|totals):\s+(\d+)", path.read_text(errors="replace"),
                                                       re.MULTILINE)]
        total += max(found, default=0)
    return total


def send(conn: mi.MLLPConnection, first: int, count: int, tag: str) -> None:
    for i in range(first, first + count):
        control, payload = mi.build_message(i, tag)
        problem = mi.ack_problem(conn.exchange(mi.frame(payload)), control)
        if problem:
            raise RuntimeError(f"message {i}: {problem}")


class FhirClient:
    """One keep-alive HTTP connection posting transaction Bundles to /fhir/."""

    def __init__(self, port: int) -> None:
        self.http = http.client.HTTPConnection(mi.HOST, port, timeout=300)

    def send(self, first: int, count: int, tag: str) -> None:
        for b in fi.make_bundles(f"{tag}{first}", count, 0.2):
            self.http.request("POST", "/fhir/", body=b.body, headers={
                "Authorization": "Bearer bench", "Content-Type": "application/fhir+json"})
            resp = self.http.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"bundle {b.index}: HTTP {resp.status}: {json.loads(body or b'{}')}")

    def close(self) -> None:
        self.http.close()


class MllpClient:
    def __init__(self, port: int) -> None:
        self.conn = mi.MLLPConnection(mi.HOST, port, 300.0)

    def send(self, first: int, count: int, tag: str) -> None:
        send(self.conn, first, count, tag)

    def close(self) -> None:
        self.conn.close()


class DicomClient:
    """storescu, one association per call: a new study of copies of the CT (dicom_ingest.py's)."""

    def __init__(self, port: int, work: Path) -> None:
        self.port = port
        self.work = work

    def send(self, first: int, count: int, tag: str) -> None:
        files = di.make_instances(self.work / f"{tag}{first}", count).files
        sent = di.storescu(di.AETS["engine"], self.port, files, timeout=120.0 + 60.0 * count)
        if sent.exit_code != 0 or sent.ok != count:
            raise RuntimeError(f"storescu exit {sent.exit_code}, {sent.ok}/{count} stored:\n{sent.log_tail}")

    def close(self) -> None:
        pass


def count(tree: Path, messages: int, warmup: int, work: Path, protocol: str = "mllp") -> Count:
    d = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    out = d / "callgrind"
    out.mkdir()
    env = mi.engine_env(d, f"sqlite:///{d}/radbridge.db", "FULL", tree)
    dicom_port = di.free_port()  # not the default 11112: another engine may be running
    env.update({"RADBRIDGE_DICOM_PORT": str(dicom_port), "RADBRIDGE_DICOM_FSYNC": "true",
                "RADBRIDGE_STABLE_SECONDS": "3600",
                "PYTHONHASHSEED": "0"})  # the same string hashes, dict and set layouts every run
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}/callgrind.out.%p",
            sys.executable, "-m", "engine.cli", "run"]
    mi.STARTUP_TIMEOUT = 900.0  # the engine starts ~20x slower under valgrind
    port_re = rf"{mi.CHANNEL} on [\d.]+:(\d+)" if protocol == "mllp" else r"HTTP on http://[\d.]+:(\d+)/"
    server = mi.ServerProcess("engine", argv, env=env, cwd=d, port_re=port_re)
    try:
        conn: MllpClient | FhirClient | DicomClient
        if protocol == "mllp":
            conn = MllpClient(server.port)
        elif protocol == "fhir":
            conn = FhirClient(server.port)
        else:
            for _ in range(600):  # the DICOM listener starts beside the others: wait for it, bounded
                if di.listening(dicom_port):
                    break
                time.sleep(0.5)
            conn = DicomClient(dicom_port, d)
        try:
            conn.send(0, warmup, "W")
            callgrind_control("--instr=on", str(server.pid))
            io_before = proc_io(server.pid)
            conn.send(0, messages, "T")
            io_after = proc_io(server.pid)
            callgrind_control("--instr=off", str(server.pid))
            callgrind_control("--dump", str(server.pid))
        finally:
            conn.close()
    finally:
        server.stop()
    return Count(tree, messages, dumped_instructions(out), io_after["wchar"] - io_before["wchar"],
                 io_after["syscw"] - io_before["syscw"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", choices=("mllp", "fhir", "dicom"), default="mllp",
                    help="HL7 messages over MLLP, FHIR transaction Bundles over HTTP, or C-STORE of CT instances "
                         "(storescu, one association) (default mllp)")
    ap.add_argument("--messages", type=int, default=300, help="counted messages (or Bundles) per tree (default 300)")
    ap.add_argument("--warmup", type=int, default=50, help="uncounted messages first (default 50)")
    ap.add_argument("--engine-src", metavar="DIR", default=str(REPO), help="the tree to measure (default: this one)")
    ap.add_argument("--baseline-src", metavar="DIR", default=None,
                    help="an older tree to measure in the same run, for the ratio (its own channels/ and mappings/)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tree, to show the count is stable (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (callgrind dumps) for callgrind_annotate")
    opts = ap.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    trees = [Path(opts.engine_src).resolve()]
    if opts.baseline_src:
        trees.insert(0, Path(opts.baseline_src).resolve())
    work = Path(tempfile.mkdtemp(prefix="radbridge-instructions-"))
    item = {"mllp": "MLLP message", "fhir": "FHIR transaction Bundle", "dicom": "C-STORE instance"}[opts.protocol]
    print(f"radbridge instructions per {item} (callgrind): {opts.messages} after {opts.warmup} "
          f"warm-up over one connection, SQLite synchronous=FULL; work in {work}", flush=True)
    results: list[Count] = []
    for _ in range(opts.repeat):
        for tree in trees:
            print(f"  {describe_source(tree)} ...", flush=True)
            results.append(count(tree, opts.messages, opts.warmup, work, opts.protocol))
    print(f"\n{'tree':44} {'messages':>8} {'instructions':>14} {'per item':>12} {'bytes/item':>10} {'writes/item':>11}")
    print("-" * 103)
    for r in results:
        print(f"{describe_source(r.tree)[:44]:44} {r.messages:8d} {r.instructions:14,d} {r.per_message:12,.0f} "
              f"{r.written / r.messages:10,.0f} {r.writes / r.messages:11.1f}")
    if opts.baseline_src:
        old = [r.per_message for r in results if r.tree == trees[0]]
        new = [r.per_message for r in results if r.tree == trees[-1]]
        ratio = (sum(new) / len(new)) / (sum(old) / len(old))
        print(f"\nnew / old instructions per item: {ratio:.3f} (below 1: the new tree does less work)")
        old_bytes = sum(r.written for r in results if r.tree == trees[0])
        new_bytes = sum(r.written for r in results if r.tree == trees[-1])
        print(f"new / old bytes written per item: {new_bytes / old_bytes:.3f}")
    if not opts.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.instructions > 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
