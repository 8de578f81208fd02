#!/usr/bin/env python3
"""Retention benchmark: does pruning old messages disturb ingest?

In one run, on one SQLite (or PostgreSQL) store holding N old messages (content and rows past the
retention limits), it measures the ACK latency of a steady MLLP sender twice: once with no pruning,
once while a full retention pass deletes all N old messages' content and rows. It prints the
pruning rate and the ingest figures side by side (ratio = with pruning / without).

Usage:
    python bench/retention.py                       # 100,000 old messages, 3,000 live ones, SQLite
    python bench/retention.py --old 200000 --live 5000
    python bench/retention.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchutil import bench_settings, make_store  # noqa: E402
from sqlalchemy import create_engine, func, insert, select  # noqa: E402

from engine.connectors.mllp.channel import MllpConnector  # noqa: E402
from engine.runtime import Engine  # noqa: E402
from engine.store.models import Message, MessageContent  # noqa: E402
from engine.store.retention import prune  # noqa: E402
from engine.store.types import utcnow  # noqa: E402
from engine.web.app import build_app  # noqa: E402

RAW = (b"MSH|^~\\&|EPIC|GENHOSP|RADBRIDGE|RAD|20240101000000||ADT^A08^ADT_A01|OLD|P|2.5.1\r"
       b"EVN|A08|20240101000000\rPID|1||OLD^^^GENHOSP^MR||Old^Message||19700101|F\r" + b"NTE|1||" + b"x" * 300 + b"\r")


def adt(i: int) -> bytes:
    return (f"MSH|^~\\&|EPIC|GENHOSP|RADBRIDGE|RAD|20240315081500||ADT^A01^ADT_A01|LIVE{i:07d}|P|2.5.1\r"
            f"EVN|A01|20240315081500\rPID|1||L{i}^^^GENHOSP^MR||Live^Pat{i}||19700101|F\r").encode()


def seed_old(url: str, count: int) -> None:
    """Insert ``count`` messages received 400 days ago (past both retention limits), in bulk."""
    eng = create_engine(url)
    old = utcnow() - timedelta(days=400)
    with eng.begin() as conn:
        for start in range(0, count, 5000):
            n = min(5000, count - start)
            rows = [{"channel": "hl7-inbound", "direction": "in", "protocol": "hl7v2", "received_at": old,
                     "control_id": f"OLD{start + k}", "sending_app": "EPIC", "sending_facility": "GENHOSP",
                     "message_type": "ADT^A08", "version": "2.5.1", "charset": "utf-8", "size": len(RAW),
                     "status": "processed", "ack_code": "AA", "attempts": 1, "content_pruned": False}
                    for k in range(n)]
            conn.execute(insert(Message), rows)
        ids = list(conn.execute(select(Message.id).where(Message.received_at < utcnow() - timedelta(days=1))).scalars())
        for start in range(0, len(ids), 5000):
            conn.execute(insert(MessageContent), [{"message_id": i, "raw": RAW, "mapped": None, "ack": "MSA|AA|OLD"}
                                                  for i in ids[start:start + 5000]])
    eng.dispose()


def send_stream(port: int, first: int, count: int) -> list[float]:
    latencies: list[float] = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(first, first + count):
            t0 = time.perf_counter()
            s.sendall(b"\x0b" + adt(i) + b"\x1c\r")
            buf = b""
            while not buf.endswith(b"\x1c\r"):
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("engine closed the connection")
                buf += chunk
            if b"MSA|AA|" not in buf and b"MSA|CA|" not in buf:
                raise RuntimeError(f"not acknowledged: {buf[:200]!r}")
            latencies.append(time.perf_counter() - t0)
    return latencies


def figures(lat: list[float], seconds: float) -> tuple[float, float, float, float]:
    ordered = sorted(lat)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return len(lat) / seconds, statistics.median(ordered) * 1000, p99 * 1000, ordered[-1] * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=int, default=100_000, help="old messages to prune")
    ap.add_argument("--live", type=int, default=3000, help="messages sent in each phase")
    ap.add_argument("--batch", type=int, default=500, help="retention batch size")
    ap.add_argument("--postgres", help="admin URL; a throwaway database is created and dropped")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="radbridge-retention-"))
    url, drop = make_store(args.postgres, work)
    try:
        s = bench_settings(work, url, "bench")  # retention off: the bench runs the pass itself, at a known moment
        s.retention.batch_size = args.batch
        s.mappings.reload_seconds = 0

        loop = asyncio.new_event_loop()
        runner = threading.Thread(target=loop.run_forever, daemon=True)
        runner.start()
        engine = Engine(s, http_app=build_app)
        asyncio.run_coroutine_threadsafe(engine.start(), loop).result(60)
        try:
            print(f"seeding {args.old:,} old messages into {url.split('://')[0]} ...", flush=True)
            t = time.perf_counter()
            seed_old(url, args.old)
            print(f"  seeded in {time.perf_counter() - t:.1f}s")
            port = engine.connector("hl7-inbound", MllpConnector).port
            send_stream(port, 0, 200)  # warm-up
            print("  warm-up done; ingest without pruning ...", flush=True)

            t = time.perf_counter()
            quiet = send_stream(port, 1000, args.live)
            quiet_s = time.perf_counter() - t

            report_box: list[object] = []
            print(f"  {args.live} messages in {time.perf_counter() - t:.1f}s; ingest while pruning ...", flush=True)
            pruner = threading.Thread(target=lambda: report_box.append(prune(engine.db, s.retention)))
            t = time.perf_counter()
            pruner.start()
            busy = send_stream(port, 1000 + args.live, args.live)
            busy_s = time.perf_counter() - t
            pruner.join(600)
            report = report_box[0] if report_box else None

            with engine.db.read_session() as sess:
                left = sess.execute(select(func.count()).select_from(Message)
                                    .where(Message.received_at < utcnow() - timedelta(days=1))).scalar()
        finally:
            asyncio.run_coroutine_threadsafe(engine.stop(), loop).result(60)
            loop.call_soon_threadsafe(loop.stop)

        q = figures(quiet, quiet_s)
        b = figures(busy, busy_s)
        print(f"\nretention pass: {report}")
        if report is not None:
            rows = report.content + report.messages  # type: ignore[attr-defined]
            print(f"  pruned {rows:,} rows ({report.content:,} contents + {report.messages:,} messages) in "  # type: ignore[attr-defined]
                  f"{report.seconds:.1f}s: {rows / max(report.seconds, 1e-9):,.0f} rows/s; old messages left: {left}")  # type: ignore[attr-defined]
        print(f"\n{'ingest (1 connection)':28} {'msg/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        print(f"{'without pruning':28} {q[0]:8.0f} {q[1]:8.2f} {q[2]:8.2f} {q[3]:8.1f}")
        print(f"{'while pruning':28} {b[0]:8.0f} {b[1]:8.2f} {b[2]:8.2f} {b[3]:8.1f}")
        print(f"{'ratio (while / without)':28} {b[0] / q[0]:8.2f} {b[1] / q[1]:8.2f} {b[2] / q[2]:8.2f} {b[3] / q[3]:8.1f}")
        if left:
            print(f"WARNING: {left} old messages were not pruned")
            return 1
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
        drop()


if __name__ == "__main__":
    sys.exit(main())
