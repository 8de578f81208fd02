#!/usr/bin/env python3
"""Scale-out benchmark: `radbridge run` with 1 and then 2 worker processes (`--workers 2`) on
PostgreSQL, fed the same MLLP inbound load, and the scaling ratio of the two (docs/scaling.md).

Run on demand (it is not a test); see bench/README.md. Each run is a fresh database and storage
directory; the engine listens on fixed free loopback ports (`--workers` cannot share port 0). The
clients are bench/mllp_ingest.py's: one process per connection, one message in flight per
connection (send, wait for the ACK, send the next), the same message set in every run. With two
workers the kernel spreads the connections over them (SO_REUSEPORT hashes each connection), so a
run may put more connections on one worker than the other. After each run the store is checked as
mllp_ingest.py checks it (every message applied: patients, identifiers, orders).

The ratio is x2 msg/s over x1 msg/s of the same sitting (runs alternate 1, 2, 1, 2 ... with
--repeat); on a machine with two cores, shared with the database and the client processes, it says
how much a second process gains there, not what it gains on a server with cores to spare.

Usage:
    python bench/scale_out.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres
    python bench/scale_out.py --messages 3000 --connections 8 --repeat 3
    python bench/scale_out.py --quick --json figures.json
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from benchutil import describe_source, json_option, write_figures
from mllp_ingest import (
    HOST,
    ClientSpec,
    ServerProcess,
    Workspace,
    check_applied,
    drive,
    engine_env,
    warm_up,
)

REPO = Path(__file__).resolve().parents[1]
PG = os.environ.get("RADBRIDGE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
WORKERS = (1, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def run_once(ws: Workspace, admin_url: str, workers: int, args: argparse.Namespace, run: int) -> float:
    """One run: a fresh engine with ``workers`` processes, the load, the store checked; its msg/s."""
    d = ws.subdir(f"x{workers}")
    url = ws.pg_database(admin_url)
    env = engine_env(d, url, "full")
    mllp = free_port()
    env.update({"RADBRIDGE_MLLP_PORT": str(mllp), "RADBRIDGE_HTTP_PORT": str(free_port()),
                "RADBRIDGE_DICOM_PORT": str(free_port()), "RADBRIDGE_EHR_MLLP": "", "RADBRIDGE_EHR_FHIR_BASE": ""})
    argv = [sys.executable, "-m", "engine.cli", "run", *(["--workers", str(workers)] if workers > 1 else [])]
    # the single engine names its MLLP port; the supervisor says when every worker listens
    ready = rf"hl7-inbound on [\d.]+:({mllp})" if workers == 1 else rf"radbridge running: ({workers}) workers"
    server = ServerProcess("engine", argv, env=env, cwd=d, port_re=ready)
    try:
        problems = warm_up(HOST, mllp, args.warmup, args.timeout)
        if problems:
            raise SystemExit(f"warm-up: {problems[:3]}")
        result = drive(ClientSpec(HOST, mllp, f"R{run}x{workers}", args.messages, args.connections, args.timeout),
                       deadline=args.deadline)
    finally:
        code = server.stop()
    if code not in (0, None):
        raise SystemExit(f"engine x{workers} exited with {code}:\n{server.tail(20)}")
    if result.failed or result.errors:
        raise SystemExit(f"engine x{workers}: {result.failed} NAK(s), errors {result.errors[:3]} "
                         f"{result.failures[:3]}")
    applied, ok = check_applied(url, timed=result.messages, warmup=args.warmup, connections=args.connections)
    print(f"  run {run}, {workers} process(es): {result.rate:,.0f} msg/s over {result.messages} messages, "
          f"{args.connections} connections; p50 {result.percentile(50):.1f} ms, p95 {result.percentile(95):.1f} ms; "
          f"{applied}", flush=True)
    if not ok:
        raise SystemExit(f"engine x{workers}: the store does not hold what the messages should have done\n"
                         f"{server.tail(20)}")
    return result.rate


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--postgres", default=PG, metavar="ADMIN_URL",
                    help="PostgreSQL to create the throwaway databases on (default: %(default)s)")
    ap.add_argument("--messages", type=int, default=3000, help="timed messages per run, over all connections")
    ap.add_argument("--connections", type=int, default=8, help="client connections (default 8)")
    ap.add_argument("--warmup", type=int, default=50, help="messages before timing, on one connection")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of (1 process, 2 processes); medians reported")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each ACK")
    ap.add_argument("--deadline", type=float, default=900.0, help="seconds a run may take")
    ap.add_argument("--quick", action="store_true", help="a tiny size that only checks the benchmark still runs")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the work directory (engine logs)")
    json_option(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.messages, args.connections, args.warmup, args.repeat = 80, 4, 5, 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"engine: {describe_source(REPO)}; {os.cpu_count()} CPU(s); PostgreSQL; "
          f"{args.messages} messages over {args.connections} connections per run, {args.repeat} round(s)", flush=True)
    ws = Workspace(None, args.keep_tmp)
    rates: dict[int, list[float]] = {w: [] for w in WORKERS}
    try:
        for r in range(1, args.repeat + 1):
            for workers in WORKERS:  # alternating, so drift in the machine's load hits both alike
                rates[workers].append(run_once(ws, args.postgres, workers, args, r))
    finally:
        ws.close()
    one, two = (statistics.median(rates[w]) for w in WORKERS)
    ratio = two / one if one else float("nan")
    print()
    print(f"{'processes':>9}  {'msg/s (median)':>14}  runs")
    for w in WORKERS:
        print(f"{w:>9}  {statistics.median(rates[w]):>14,.0f}  " + ", ".join(f"{x:,.0f}" for x in rates[w]))
    print(f"scaling 2/1: {ratio:.2f} (same sitting; {os.cpu_count()} CPU(s) shared with PostgreSQL and the clients)")
    write_figures(args.json, {"engine x1 msg/s": one, "engine x2 msg/s": two, "scaling 2/1": ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
