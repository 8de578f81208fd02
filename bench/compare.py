"""Same-run comparison of two source trees on one benchmark: alternating runs, per-pair ratios.

On a shared 2-core machine a benchmark's figures drift by +-30 % within minutes, so a single run
of the old tree and one of the new says little about a 5 % change. This runs the benchmark
``--pairs`` times for each tree, alternating (old, new, new, old, old, new ...: neither always
goes first), takes the ratio new / old within each pair, and prints the median ratio with the
spread of the pairs, per figure.

    python bench/compare.py --baseline /path/to/old-tree --pairs 9 mllp_ingest.py --messages 3000

``--baseline`` is a checkout of the older commit with its own ``.venv`` (``git worktree add
--detach DIR COMMIT`` then ``scripts/bootstrap test`` in it). Benchmarks that take ``--engine-src``
(mllp_ingest, fhir_ingest, dicom_ingest) run from this tree, with the same client code, against each engine;
the others run each tree's own script with that tree's own interpreter. Arguments after the
benchmark's name are passed to it unchanged. Raw outputs are kept in ``--keep DIR`` if given.
It exits 1 when a run failed (its output is kept), else 0: the verdict is printed, not an exit code.

The figures it compares are the engine's own rows of each benchmark's table (throughput: higher
is better; CPU per item and latency: lower is better), never the benchmark's reference server.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^(?P<label>\S.*?)\s+(?P<nums>-?\d[\d.]*(?:\s+(?:-?\d[\d.]*|-))*)\s*$")


@dataclass(frozen=True)
class Figure:
    """One column of the rows whose label matches ``label``: its name says which row and column."""

    label: str  # a regex on the row's label
    column: int  # index among the row's numbers
    name: str  # a format string: {label} and {n0}, {n1} ... (the row's numbers) may be used
    higher_is_better: bool
    numbers: int | None = None  # how many numbers the row has, where another table has the same labels


FIGURES: dict[str, list[Figure]] = {
    "mllp_ingest.py": [Figure(r"^engine \w+$", 2, "{label} x{n0} msg/s", True),
                       Figure(r"^engine \w+$", 6, "{label} x{n0} CPU ms/msg", False)],
    "fhir_ingest.py": [Figure(r"^engine \w+$", 2, "{label} res/s", True),
                       Figure(r"^engine \w+$", 8, "{label} CPU ms/bundle", False)],
    "dicom_ingest.py": [Figure(r"^engine \(.*\)( x\d+)?$", 4, "{label} inst/s", True, numbers=9),
                        Figure(r"^engine \(.*\)( x\d+)?$", 6, "{label} CPU ms/inst", False, numbers=9)],
    "reconcile_coerce.py": [Figure(r"^engine \(coerce\)$", 4, "{label} inst/s", True),
                            Figure(r"^engine \(coerce\)$", 6, "{label} CPU s", False)],
    "outbound_delivery.py": [Figure(r"^engine (fhir|mllp|both) \(delivered_at", 2, "{label} deliv/s", True),
                             Figure(r"^engine: stable ->", 1, "{label} p50 ms", False)],
}
ENGINE_SRC = {"mllp_ingest.py", "fhir_ingest.py", "dicom_ingest.py"}  # they take --engine-src


def figures(bench: str, output: str, higher: dict[str, bool] | None = None) -> dict[str, list[float]]:
    """Every figure a run printed (a list: repeated runs print one row each); ``higher`` learns
    which figures are better higher."""
    found: dict[str, list[float]] = {}
    for line in output.splitlines():
        m = ROW.match(line.rstrip())
        if m is None:
            continue
        label = m["label"].strip()
        nums = m["nums"].split()
        for fig in FIGURES[bench]:
            if (not re.search(fig.label, label) or fig.column >= len(nums) or nums[fig.column] == "-"
                    or (fig.numbers is not None and len(nums) != fig.numbers)):
                continue
            name = fig.name.format(label=label, **{f"n{i}": v for i, v in enumerate(nums)})
            found.setdefault(name, []).append(float(nums[fig.column]))
            if higher is not None:
                higher[name] = fig.higher_is_better
    return found


def command(bench: str, tree: Path, args: list[str]) -> list[str]:
    if bench in ENGINE_SRC:
        return [sys.executable, str(REPO / "bench" / bench), *args, "--engine-src", str(tree)]
    python = tree / ".venv" / "bin" / "python"
    return [str(python if python.exists() else Path(sys.executable)), str(tree / "bench" / bench), *args]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, metavar="DIR", help="the older source tree (with its own .venv)")
    ap.add_argument("--pairs", type=int, default=9, help="runs of each tree, alternating (default 9)")
    ap.add_argument("--keep", metavar="DIR", default=None, help="keep every run's output here")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it counts as failed")
    ap.add_argument("bench", choices=sorted(FIGURES))
    ap.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    opts = ap.parse_args(argv)
    baseline = Path(opts.baseline).resolve()
    if not (baseline / "bench" / opts.bench).exists() and opts.bench not in ENGINE_SRC:
        ap.error(f"{baseline} has no bench/{opts.bench}")
    keep = Path(opts.keep or tempfile.mkdtemp(prefix="radbridge-compare-"))
    keep.mkdir(parents=True, exist_ok=True)
    trees = {"old": baseline, "new": REPO}
    runs: dict[str, list[dict[str, list[float]]]] = {"old": [], "new": []}
    higher_is_better: dict[str, bool] = {}
    print(f"{opts.bench} {' '.join(opts.args)}: {opts.pairs} pairs, old = {baseline}, new = {REPO}; outputs in {keep}",
          flush=True)
    for pair in range(opts.pairs):
        for which in (("old", "new") if pair % 2 == 0 else ("new", "old")):
            cmd = command(opts.bench, trees[which], opts.args)
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.timeout, check=False)
                output, code = done.stdout + done.stderr, done.returncode
            except subprocess.TimeoutExpired:
                output, code = f"timed out after {opts.timeout:.0f} s", -1
            (keep / f"{which}-{pair + 1}.txt").write_text(output)
            got = figures(opts.bench, output, higher_is_better) if code == 0 else {}
            runs[which].append(got)
            print(f"  pair {pair + 1} {which}: " + (", ".join(f"{k} {statistics.median(v):g}" for k, v in got.items())
                                                    or f"failed (exit {code}, see {keep}/{which}-{pair + 1}.txt)"),
                  flush=True)
    names = [n for n in dict.fromkeys(k for r in runs["old"] + runs["new"] for k in r)]
    print(f"\n{'figure':56} {'pairs':>5} {'old med':>9} {'new med':>9} {'new/old':>8} {'pair range':>13}  verdict")
    print("-" * 116)
    worst = 1.0
    for name in names:
        higher = higher_is_better[name]
        pairs = [(statistics.median(o[name]), statistics.median(n[name]))
                 for o, n in zip(runs["old"], runs["new"], strict=True) if name in o and name in n]
        if not pairs:
            continue
        ratios = [new / old for old, new in pairs if old > 0]
        ratio = statistics.median(ratios)
        better = ratio if higher else 1 / ratio  # > 1: the new tree is faster
        worst = min(worst, better)
        verdict = "faster" if better > 1.05 else "slower" if better < 0.95 else "level (within 5 %)"
        print(f"{name:56} {len(pairs):5d} {statistics.median(p[0] for p in pairs):9.3f} "
              f"{statistics.median(p[1] for p in pairs):9.3f} {ratio:8.3f} {min(ratios):6.2f}-{max(ratios):<6.2f}  {verdict}")
    print("\nnew/old is the median of the per-pair ratios; for CPU and latency figures lower is better.")
    print(f"worst figure: the new tree at {worst:.2f} x the old one's speed"
          + (" (more than 5 % slower)" if worst < 0.95 else ""))
    failed = [f"{w}-{i + 1}" for w, rs in runs.items() for i, r in enumerate(rs) if not r]
    if failed:
        print(f"runs without figures (failed): {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
