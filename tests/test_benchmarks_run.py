"""Every benchmark still runs against this engine (tiny sizes; no figure is asserted).

The scripts under bench/ are not tests and are run by hand, so an engine change that breaks one
(a renamed function, a new way events reach the reconciliation queue) would go unseen until the
next measurement. Each is run here at a size that takes seconds; it must exit 0, which each does
only when its own checks of the store (messages applied, instances indexed, files coerced,
deliveries made) passed, and print its table."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]

RUNS = {
    "mllp_ingest.py": (["--messages", "40", "--connections", "1,2", "--warmup", "5"], "srv CPU ms/msg"),
    "fhir_ingest.py": (["--bundles", "20", "--connections", "2", "--warmup", "2"], "resources/s"),
    "dicom_ingest.py": (["--instances", "5", "--warmup", "1", "--targets", "engine"], "inst/s"),
    "dicom_forward.py": (["--instances", "5"], "ratio engine / storescu inst/s"),
    "reconcile_coerce.py": (["--instances", "5"], "engine / naive time"),
    "outbound_delivery.py": (["--studies", "10", "--latency-studies", "2", "--natural-studies", "2",
                              "--warmup", "1"], "deliveries/s"),
    "retention.py": (["--old", "500", "--live", "50", "--batch", "100"], "while pruning"),
    "console.py": (["--messages", "3000", "--repeat", "2", "--explain"], "p95 < 300 ms"),
    "dicomweb_qido.py": (["--studies", "300", "--repeat", "2", "--explain"], "QIDO-RS search"),
    "dicomweb_vs_orthanc.py": (["--quick"], "speed engine/orthanc"),
    "instructions.py": (["--messages", "5", "--warmup", "2"], "instructions"),
    "transcode_retrieve.py": (["--sizes", "3,6"], "decoded / stored inst/s"),
    # this tree against itself, one pair: the same-run comparison of two commits
    "compare.py": (["--baseline", str(REPO), "--pairs", "1", "reconcile_coerce.py", "--instances", "5"],
                   "engine (coerce) inst/s"),
}


def _compare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_compare", REPO / "bench" / "compare.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return module


def test_every_benchmark_is_covered() -> None:
    assert sorted(RUNS) == sorted(p.name for p in (REPO / "bench").glob("*.py") if p.name != "benchutil.py")


@pytest.mark.parametrize("script", sorted(RUNS))
def test_the_benchmark_runs_and_its_checks_pass(script: str, tmp_path: Path) -> None:
    args, figure = RUNS[script]
    run = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=bench_env(tmp_path))
    tail = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0, tail
    assert figure in run.stdout, tail
    compare = _compare()
    if script in compare.FIGURES:  # bench/compare.py reads this table: every figure it knows is found
        found = compare.figures(script, run.stdout)
        for fig in compare.FIGURES[script]:
            column = fig.name.rsplit("}", 1)[-1]  # " msg/s", " CPU ms/msg" ...
            assert any(name.endswith(column) and values for name, values in found.items()), (column, found, tail)


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
