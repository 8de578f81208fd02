"""Every benchmark under bench/, then one table: each path's engine figure, its same-run reference,
the ratio and the goal (issue 18's table, DICOMweb against Orthanc, forwarding against storescu).

    python bench/run_all.py --quick            # every benchmark at a tiny size: does each still run?
    python bench/run_all.py                    # the sizes behind the README's figures (about half an hour)
    python bench/run_all.py --markdown         # the table as markdown
    python bench/run_all.py --write-readme     # ... and put it in README.md between the run_all markers

Each benchmark runs as its own process, one after the other, with ``--json FILE`` when it feeds the
table (the figures are read from that file, never from the printed text); its output goes to a log
in the work directory (printed at the end of a failed run, kept with ``--keep DIR``, with
``run_all.json``: each benchmark's exit code, log and figures). ``--quick`` is
for correctness only: each benchmark must exit 0 and hand over its figures, which at those sizes mean
nothing. tests/test_benchmarks_run.py runs ``--quick`` one benchmark at a time (``--only``), so the
test suite, and .ci/run through it, keeps every benchmark and this script from rotting.
Exit code 1 when a benchmark failed or did not give a figure the table needs; a goal not met is
printed, not an exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PG = os.environ.get("RADBRIDGE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
README_BEGIN = "<!-- bench/run_all.py: begin -->"
README_END = "<!-- bench/run_all.py: end -->"
SUMMARY = "run_all.json"  # in the work directory (--keep DIR): each benchmark's exit code, log name and figures


@dataclass(frozen=True)
class Benchmark:
    script: str
    quick: list[str]  # a tiny size: seconds, correctness only
    full: list[str] | None  # the sizes behind the README's figures; None: not part of a full run
    printed: str  # text the script prints with its table (checked by tests/test_benchmarks_run.py)
    why_not_full: str = ""


BENCHMARKS: list[Benchmark] = [
    Benchmark("mllp_ingest.py", ["--messages", "40", "--connections", "1,8", "--warmup", "5", "--postgres", PG],
              ["--messages", "3000", "--repeat", "3", "--postgres", PG], "srv CPU ms/msg"),
    Benchmark("fhir_ingest.py", ["--bundles", "20", "--connections", "2", "--warmup", "2"],
              ["--bundles", "2000", "--repeat", "3"], "resources/s"),
    Benchmark("dicom_ingest.py", ["--instances", "5", "--warmup", "1", "--targets", "engine,orthanc",
                                  "--associations", "1,4"],
              ["--instances", "500", "--repeat", "2", "--associations", "1,4"], "inst/s"),
    Benchmark("outbound_delivery.py", ["--studies", "10", "--latency-studies", "2", "--natural-studies", "2",
                                       "--warmup", "1"], [], "deliveries/s"),
    Benchmark("dicomweb_vs_orthanc.py", ["--quick"], [], "speed engine/orthanc"),
    Benchmark("dicom_forward.py", ["--instances", "5"], ["--instances", "500", "--repeat", "3"],
              "ratio engine / storescu inst/s"),
    Benchmark("reconcile_coerce.py", ["--instances", "5"], ["--repeat", "3", "--large-mb", "512"],
              "engine / naive time"),
    Benchmark("retention.py", ["--old", "500", "--live", "50", "--batch", "100"], [], "while pruning"),
    Benchmark("console.py", ["--messages", "3000", "--repeat", "2", "--explain"], [], "p95 < 300 ms"),
    Benchmark("dicomweb_qido.py", ["--studies", "300", "--repeat", "2", "--explain"], [], "QIDO-RS search"),
    Benchmark("transcode_retrieve.py", ["--sizes", "3,6"], [], "decoded / stored inst/s"),
    Benchmark("scale_out.py", ["--quick", "--postgres", PG], ["--postgres", PG, "--repeat", "3"], "scaling 2/1"),
    Benchmark("instructions.py", ["--messages", "5", "--warmup", "2"], ["--messages", "300"], "instructions"),
    # this tree against itself, one pair: the same-run comparison of two commits still works
    Benchmark("compare.py", ["--baseline", str(REPO), "--pairs", "1", "fhir_ingest.py", "--bundles", "20",
                             "--connections", "2", "--warmup", "2", "--no-baseline"],
              None, "engine sqlite res/s", why_not_full="it compares two trees; run it by hand with --baseline"),
]


@dataclass(frozen=True)
class Row:
    """One path of the table: the engine's figure against the reference's of the same run. With
    several (engine, reference) pairs the one with the lowest ratio is shown (the path's worst case)."""

    path: str
    script: str
    pairs: tuple[tuple[str, str], ...]  # figure names in the script's --json output
    reference: str  # what the reference is
    unit: str
    goal: float  # the ratio to reach
    lower_is_better: bool = False  # a time: the ratio is reference / engine (a speed)
    engine_at_least: float | None = None  # an absolute goal as well

    def goal_text(self) -> str:
        absolute = f">= {self.engine_at_least:,.0f} {self.unit} and " if self.engine_at_least else ""
        return f"{absolute}>= {self.goal:g}"


_QIDO = ("all studies, first 100", "PatientID", "StudyDate, a month (100)", "PatientName wildcard (100)",
         "AccessionNumber")
ROWS: list[Row] = [
    Row("HL7 in, 1 connection", "mllp_ingest.py", (("engine sqlite x1 msg/s", "baseline sqlite x1 msg/s"),),
        "minimal durable MLLP server", "msg/s", 0.5),
    Row("HL7 in, 8 connections", "mllp_ingest.py", (("engine sqlite x8 msg/s", "baseline sqlite x8 msg/s"),),
        "minimal durable MLLP server", "msg/s", 0.3),
    Row("HL7 in, PostgreSQL, 8 connections", "mllp_ingest.py",
        (("engine postgres x8 msg/s", "baseline postgres x8 msg/s"),), "minimal durable MLLP server", "msg/s", 0.25),
    Row("DICOM C-STORE, one association, 512x512 CT", "dicom_ingest.py",
        (("engine (fsync) inst/s", "orthanc inst/s"),), "Orthanc", "inst/s", 1.0),
    Row("DICOM C-STORE, 4 associations at once, 512x512 CT", "dicom_ingest.py",
        (("engine (fsync) x4 inst/s", "orthanc x4 inst/s"),), "Orthanc", "inst/s", 1.0),
    Row("FHIR transaction Bundles", "fhir_ingest.py", (("engine res/s", "baseline res/s"),),
        "aiohttp + durable insert", "res/s", 0.2, engine_at_least=500),
    Row("ORU^R01 delivery from a backlog", "outbound_delivery.py", (("rate.e_mllp", "rate.b_mllp"),),
        "plain MLLP client", "deliv/s", 0.5),
    Row("ImagingStudy delivery from a backlog", "outbound_delivery.py", (("rate.e_fhir", "rate.r_fhir"),),
        "plain client GET+GET+PUT", "deliv/s", 0.5),
    Row("DICOMweb WADO-RS retrieve of a study", "dicomweb_vs_orthanc.py",
        (("WADO-RS retrieve engine p50 ms", "WADO-RS retrieve orthanc p50 ms"),), "Orthanc", "ms p50", 1.0,
        lower_is_better=True),
    Row("DICOMweb WADO-RS metadata of a study", "dicomweb_vs_orthanc.py",
        (("WADO-RS metadata engine p50 ms", "WADO-RS metadata orthanc p50 ms"),), "Orthanc", "ms p50", 1.0,
        lower_is_better=True),
    Row("DICOMweb WADO-RS metadata, first request (every header read)", "dicomweb_vs_orthanc.py",
        (("WADO-RS metadata, first request engine p50 ms", "WADO-RS metadata, first request orthanc p50 ms"),),
        "Orthanc", "ms", 1.0, lower_is_better=True),
    Row("DICOMweb QIDO-RS study search (slowest of 5 kinds)", "dicomweb_vs_orthanc.py",
        tuple((f"{q} engine p50 ms", f"{q} orthanc p50 ms") for q in _QIDO), "Orthanc", "ms p50", 1.0,
        lower_is_better=True),
    Row("HL7 in, PostgreSQL, 2 engine processes (run --workers 2)", "scale_out.py",
        (("engine x2 msg/s", "engine x1 msg/s"),), "the same engine, 1 process", "msg/s", 1.0),
    Row("DICOM forwarding of a study", "dicom_forward.py", (("engine inst/s", "storescu inst/s"),),
        "dcmtk storescu", "inst/s", 0.8),
]


def needed(script: str) -> set[str]:
    """The figures of ``script`` the table needs."""
    return {name for row in ROWS if row.script == script for pair in row.pairs for name in pair}


@dataclass
class Measured:
    row: Row
    engine: float
    reference: float
    ratio: float
    query: str  # which pair (its engine figure's name) when a row has several

    @property
    def met(self) -> bool:
        return (self.ratio >= self.row.goal
                and (self.row.engine_at_least is None or self.engine >= self.row.engine_at_least))


def measure(row: Row, figures: dict[str, float | None]) -> Measured | None:
    """The row's figures from a script's output; None when one is missing."""
    found = []
    for eng_name, ref_name in row.pairs:
        eng, ref = figures.get(eng_name), figures.get(ref_name)
        if eng is None or ref is None or not eng or not ref:
            return None
        ratio = ref / eng if row.lower_is_better else eng / ref
        found.append(Measured(row, eng, ref, ratio, eng_name))
    return min(found, key=lambda m: m.ratio) if found else None


def _number(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def table(measured: list[tuple[Row, Measured | None]], markdown: bool) -> str:
    head = ["path", "engine", "same-run reference", "ratio", "goal", "met"]
    lines = []
    for row, m in measured:
        if m is None:
            lines.append([row.path, "-", row.reference, "-", row.goal_text(), "no figures"])
            continue
        what = f" ({m.query.rsplit(' engine ', 1)[0]})" if len(row.pairs) > 1 else ""
        lines.append([row.path + what, f"{_number(m.engine)} {row.unit}",
                      f"{row.reference} {_number(m.reference)}", f"{m.ratio:.2f}", row.goal_text(),
                      "yes" if m.met else "no"])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(c) for c in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head).rstrip(), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    return "\n".join(out + [fmt.format(*cells).rstrip() for cells in lines])


def replace_section(text: str, section: str) -> str:
    """``text`` with what lies between the run_all markers replaced by ``section``."""
    pattern = re.compile(re.escape(README_BEGIN) + r"\n.*?" + re.escape(README_END), re.S)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"README.md must hold the markers {README_BEGIN} ... {README_END} once")
    return pattern.sub(lambda _: f"{README_BEGIN}\n{section}\n{README_END}", text)


@dataclass
class Ran:
    bench: Benchmark
    argv: list[str]
    seconds: float
    returncode: int
    log: Path
    figures: dict[str, float | None]

    @property
    def missing(self) -> list[str]:
        """Figures the table needs that the run did not give."""
        return sorted(n for n in needed(self.bench.script) if self.figures.get(n) is None)

    @property
    def failed(self) -> bool:
        return self.returncode != 0 or bool(self.missing)


def run_one(bench: Benchmark, args: list[str], work: Path, timeout: float, tmpdir: Path | None) -> Ran:
    """One benchmark in its own process; ``tmpdir`` (TMPDIR) takes what it leaves in temp directories."""
    from benchutil import die_with_parent
    stem = bench.script.removesuffix(".py")
    log, out = work / f"{stem}.log", work / f"{stem}.json"
    argv = [sys.executable, str(REPO / "bench" / bench.script), *args]
    if needed(bench.script):
        argv += ["--json", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADBRIDGE_") or k == "RADBRIDGE_TEST_PG"}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    t0 = time.monotonic()
    with log.open("w", encoding="utf-8") as fh:  # die_with_parent: stopping run_all stops the benchmark
        proc = subprocess.Popen(argv, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=die_with_parent)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM: the scripts stop their servers and remove their temp dirs
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            fh.write(f"\nrun_all: stopped after {timeout:.0f} s\n")
            rc = -1
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    seconds = time.monotonic() - t0
    figures = json.loads(out.read_text(encoding="utf-8"))["figures"] if out.exists() else {}
    return Ran(bench, argv[1:], seconds, rc, log, figures)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every benchmark at a tiny size (correctness only)")
    ap.add_argument("--only", default="", help="comma-separated scripts to run (default: all)")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument("--write-readme", action="store_true",
                    help="replace README.md's performance table (between the run_all markers); not with --quick")
    ap.add_argument("--keep", type=Path, default=None, metavar="DIR", help="write the logs and figures to DIR")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per benchmark (default 300 with --quick, 3600 without)")
    args = ap.parse_args(argv)
    if args.write_readme and (args.quick or args.only):
        ap.error("--write-readme takes the figures of a full run of every benchmark (not --quick or --only)")
    known = {b.script for b in BENCHMARKS}
    args.scripts = [s.strip() for s in args.only.split(",") if s.strip()] or [b.script for b in BENCHMARKS]
    if unknown := set(args.scripts) - known:
        ap.error(f"--only: unknown {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from benchutil import describe_source  # a sibling: bench/ is on sys.path when this runs as a script

    args = parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="radbridge-run-all-"))
    work.mkdir(parents=True, exist_ok=True)
    timeout = args.timeout or (300.0 if args.quick else 3600.0)
    started = datetime.datetime.now(datetime.UTC)
    print(f"bench/run_all.py{' --quick' if args.quick else ''}: engine from {describe_source(REPO)}, "
          f"{os.cpu_count()} CPU(s); logs in {work}", flush=True)
    t0 = time.monotonic()
    ran: list[Ran] = []
    for bench in BENCHMARKS:
        if bench.script not in args.scripts:
            continue
        bench_args = bench.quick if args.quick else bench.full
        if bench_args is None:
            print(f"  {bench.script}: not run ({bench.why_not_full})", flush=True)
            continue
        # --quick: temp dirs under the work dir (compare.py keeps its outputs; a failed tiny run's stores
        # stay with its log); a full run leaves them where the scripts put them (fsync costs depend on it)
        tmpdir = work / "tmp" if args.quick else None
        if tmpdir is not None:
            tmpdir.mkdir(exist_ok=True)
        r = run_one(bench, bench_args, work, timeout, tmpdir)
        status = f"FAILED (exit {r.returncode})" if r.failed else "ok"
        shown = " ".join(Path(a).name if a.endswith(".py") else a for a in r.argv[:len(r.argv) - 2 * ("--json" in r.argv)])
        print(f"  {status:<18}{r.seconds:7.1f} s  {shown}"
              + (f"\n      missing figures: {', '.join(r.missing)}" if r.missing else ""), flush=True)
        ran.append(r)
    total = time.monotonic() - t0
    figures = {r.bench.script: r.figures for r in ran}
    measured = [(row, measure(row, figures.get(row.script, {}))) for row in ROWS if row.script in figures]
    failed = [r for r in ran if r.failed]
    print(f"\n{len(ran)} benchmarks in {total:.0f} s; {len(failed)} failed"
          + (" (--quick: tiny sizes, the figures say nothing about speed)" if args.quick else ""))
    met = sum(1 for _row, m in measured if m is not None and m.met)
    if measured:
        print("\n" + table(measured, args.markdown))
        print(f"\ngoals met: {met} of {len(measured)}; ratio = engine / reference (for times: reference / engine)")
    for r in failed:
        print(f"\n{r.bench.script} FAILED (exit {r.returncode}); the end of {r.log}:")
        print("  " + "\n  ".join(r.log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]))
    if args.write_readme and not failed:
        section = (f"Measured with `python bench/run_all.py` on {started:%Y-%m-%d} ({os.cpu_count()} CPUs), engine "
                   f"at {describe_source(REPO).rsplit(' at ', 1)[-1]}; every ratio is against a reference measured "
                   f"in the same run; {met} of {len(measured)} goals met.\n\n{table(measured, markdown=True)}")
        readme = REPO / "README.md"
        readme.write_text(replace_section(readme.read_text(encoding="utf-8"), section), encoding="utf-8")
        print(f"\nwrote the table into {readme}")
    summary = [{"script": r.bench.script, "argv": r.argv, "seconds": round(r.seconds, 1), "returncode": r.returncode,
                "missing": r.missing, "log": r.log.name, "figures": r.figures} for r in ran]
    (work / SUMMARY).write_text(json.dumps({"quick": args.quick, "benchmarks": summary}, indent=1), encoding="utf-8")
    if args.keep is None and not failed:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
