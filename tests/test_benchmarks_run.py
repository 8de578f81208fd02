"""Every benchmark still runs against this engine (tiny sizes; no figure is asserted).

The scripts under bench/ are not tests and are run by hand, so an engine change that breaks one
(a renamed function, a new way events reach the reconciliation queue) would go unseen until the
next measurement. Each is run here at a size that takes seconds; it must exit 0, which each does
only when its own checks of the store (messages applied, instances indexed, files coerced,
deliveries made) passed, and print its table. Each runs through ``bench/run_all.py --quick --only SCRIPT``
(its tiny sizes, its ``BENCHMARKS``), so run_all itself is exercised too and .ci/run needs no second quick
pass; a script that feeds run_all's table must also hand over its figures (``--json``)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import pg_unavailable

REPO = Path(__file__).resolve().parents[1]


def _bench_module(name: str) -> ModuleType:
    """A script under bench/ as a module (bench/ is not a package; its scripts import their siblings)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return module


RUN_ALL = _bench_module("run_all")
# the tiny sizes are bench/run_all.py's (its --quick runs the same), so the two cannot drift apart
RUNS = {b.script: (b.quick, b.printed) for b in RUN_ALL.BENCHMARKS}


def _compare() -> ModuleType:
    return _bench_module("compare")


def test_every_benchmark_is_covered() -> None:
    assert sorted(RUNS) == sorted(p.name for p in (REPO / "bench").glob("*.py")
                                  if p.name not in ("benchutil.py", "run_all.py"))


@pytest.mark.parametrize("script", sorted(RUNS))
def test_the_benchmark_runs_and_its_checks_pass(script: str, tmp_path: Path) -> None:
    """Through ``bench/run_all.py --quick --only SCRIPT``: the script at its tiny size and run_all's handling
    of it (its argv, its --json figures, its summary), once; .ci/run runs no second quick pass."""
    args, figure = RUNS[script]
    if RUN_ALL.PG in args and (reason := pg_unavailable()):  # as the other PostgreSQL variants do
        pytest.skip(reason)
    keep = tmp_path / "run_all"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "run_all.py"), "--quick", "--only", script,
                          "--keep", str(keep)], cwd=REPO, capture_output=True, text=True, timeout=360,
                         env=bench_env(tmp_path))
    [ran] = json.loads((keep / RUN_ALL.SUMMARY).read_text(encoding="utf-8"))["benchmarks"]
    printed = (keep / ran["log"]).read_text(encoding="utf-8", errors="replace")
    tail = (run.stdout + run.stderr)[-1500:] + "\n--- the benchmark's log:\n" + printed[-3000:]
    assert (ran["script"], ran["argv"][1:len(args) + 1]) == (script, args), tail
    assert ran["returncode"] == 0 and run.returncode == 0, tail
    assert figure in printed, tail
    # every figure bench/run_all.py's table takes from this script is in its --json output
    assert ran["missing"] == [], tail
    assert {n for n in RUN_ALL.needed(script) if ran["figures"].get(n) is not None} == RUN_ALL.needed(script), tail
    compare = _compare()
    if script in compare.FIGURES:  # bench/compare.py reads this table: every figure it knows is found
        found = compare.figures(script, printed)
        for fig in compare.FIGURES[script]:
            column = fig.name.rsplit("}", 1)[-1]  # " msg/s", " CPU ms/msg" ...
            assert any(name.endswith(column) and values for name, values in found.items()), (column, found, tail)


def test_run_all_table_takes_its_figures_from_benchmarks_it_runs() -> None:
    """Every row of bench/run_all.py's table names a benchmark that a full run runs."""
    full = {b.script for b in RUN_ALL.BENCHMARKS if b.full is not None}
    assert {row.script for row in RUN_ALL.ROWS} <= full


def test_run_all_rows_measure_ratio_and_goal() -> None:
    rows = {row.path: row for row in RUN_ALL.ROWS}
    hl7 = rows["HL7 in, 1 connection"]
    m = RUN_ALL.measure(hl7, {"engine sqlite x1 msg/s": 900.0, "baseline sqlite x1 msg/s": 3000.0})
    assert (round(m.ratio, 2), m.met) == (0.3, False)
    assert RUN_ALL.measure(hl7, {"engine sqlite x1 msg/s": 900.0}) is None  # a figure missing: no row
    fhir = rows["FHIR transaction Bundles"]  # a ratio goal and an absolute one
    assert not RUN_ALL.measure(fhir, {"engine res/s": 450.0, "baseline res/s": 1000.0}).met
    assert RUN_ALL.measure(fhir, {"engine res/s": 600.0, "baseline res/s": 1000.0}).met
    qido = rows["DICOMweb QIDO-RS study search (slowest of 5 kinds)"]  # times: reference / engine, worst pair
    times = {name: 10.0 for pair in qido.pairs for name in pair}
    times["PatientID engine p50 ms"] = 40.0
    m = RUN_ALL.measure(qido, times)
    assert (m.ratio, m.query, m.met) == (0.25, "PatientID engine p50 ms", False)
    assert "(PatientID)" in RUN_ALL.table([(qido, m)], markdown=True)


def test_run_all_replaces_the_readme_section_between_its_markers(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme.count(RUN_ALL.README_BEGIN) == readme.count(RUN_ALL.README_END) == 1
    new = RUN_ALL.replace_section(readme, "| new table |")
    assert f"{RUN_ALL.README_BEGIN}\n| new table |\n{RUN_ALL.README_END}" in new
    before, after = readme.split(RUN_ALL.README_BEGIN)[0], readme.split(RUN_ALL.README_END)[1]
    assert new.startswith(before) and new.endswith(after)  # nothing else changes
    with pytest.raises(SystemExit):
        RUN_ALL.replace_section("no markers", "x")


def bench_env(tmp_path: Path) -> dict[str, str]:
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADBRIDGE_")}
    env["TMPDIR"] = str(tmp_path)
    return env


@pytest.mark.parametrize(("script", "args"), [
    ("mllp_ingest.py", ["--tls", "--messages", "20", "--connections", "2", "--warmup", "2"]),
    ("dicom_ingest.py", ["--tls", "--instances", "3", "--warmup", "1"]),
])
def test_the_tls_comparison_runs(script: str, args: list[str], tmp_path: Path) -> None:
    """--tls: the engine plain and over TLS in one run, and what TLS costs."""
    run = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=bench_env(tmp_path))
    tail = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0, tail
    assert "TLS cost" in run.stdout, tail


def test_dicom_ingest_uses_dcmtk_with_the_virtualenv_activated(tmp_path: Path) -> None:
    """bench/README says to activate the venv, which puts pynetdicom's storescu (other options, other
    output) ahead of dcmtk's on PATH: dicom_ingest.py then reported every target FAILED."""
    env = bench_env(tmp_path)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # as `. .venv/bin/activate` does
    env["VIRTUAL_ENV"] = sys.prefix
    assert (Path(sys.executable).parent / "storescu").exists()  # pynetdicom's, first on that PATH
    run = subprocess.run([sys.executable, str(REPO / "bench" / "dicom_ingest.py"), "--instances", "3", "--warmup", "1",
                          "--targets", "engine"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    tail = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0 and "FAILED" not in run.stdout, tail
    assert "dcmtk: storescu v" in run.stdout.splitlines()[0], tail
