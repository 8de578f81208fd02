#!/usr/bin/env python3
"""Console benchmark: the overview and the message search on a store of N messages.

It fills a store (SQLite by default) with N messages spread over the last 24 hours, three channels,
eight message types, every status and 100,000 patients (with identifiers, and orders with their
accession for the ORM messages), plus the per-minute figures the overview reads; the rows go in by
bulk INSERT through SQLAlchemy Core, not through the engine. Then it starts the engine (its HTTP app
on loopback) and times, with a token, GET / (the overview and its charts), GET /overview/live (what
the page fetches every 5 s) and message searches (by control ID, patient identifier, accession,
status + time range, type, channel; the first page and a deep page), each --repeat times with other
values. It prints p50 / p95 / max per request and whether p95 is under 300 ms, the goal.

--explain prints the database's plan of each search (EXPLAIN QUERY PLAN / EXPLAIN).

Usage:
    python bench/console.py                          # 1,000,000 messages, SQLite
    python bench/console.py --messages 100000 --repeat 50
    python bench/console.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres
        (an admin URL: a throwaway database is created there and dropped at the end)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchutil import bench_settings, make_store, percentiles, print_plan  # noqa: E402
from sqlalchemy import Engine as SAEngine  # noqa: E402
from sqlalchemy import create_engine, insert, text  # noqa: E402

from engine.runtime import Engine  # noqa: E402
from engine.store import migrate, minutes  # noqa: E402
from engine.store.db import open_database  # noqa: E402
from engine.store.message_search import search_statement  # noqa: E402
from engine.store.models import Message, Order, OrderStatusChange, Patient, PatientIdentifier  # noqa: E402
from engine.store.types import utcnow  # noqa: E402
from engine.web.app import build_app  # noqa: E402

GOAL_MS = 300.0
TOKEN = "rb_bench_console_token"
PATIENTS = 100_000
CHUNK = 20_000
CHANNELS = [("hl7-inbound", 80), ("hl7-file", 10), ("fhir-inbound", 10)]
TYPES = [("ADT^A08", 30), ("ORM^O01", 30), ("ADT^A01", 15), ("OMI^O23", 8), ("ADT^A04", 8), ("ADT^A03", 5),
         ("ADT^A40", 2), ("ORU^R01", 2)]
STATUSES = [("processed", 94), ("error", 2), ("rejected", 1), ("duplicate", 2), ("filtered", 1)]
ACK = {"processed": "AA", "filtered": "AA", "error": "AE", "rejected": "AR", "duplicate": "AA"}


def pick(rng: random.Random, weighted: list[tuple[str, int]]) -> str:
    return rng.choices([v for v, _ in weighted], [w for _, w in weighted])[0]


def fill(url: str, count: int, seed: int = 7) -> dict[str, Any]:
    """Bulk-insert ``count`` messages (ids increasing with time over the last 24 h), the patients,
    identifiers and orders they refer to, and message_minutes; returns values to search for."""
    rng = random.Random(seed)
    eng = create_engine(url)
    now = utcnow()
    start = now - timedelta(hours=24)
    step = 24 * 3600 / max(count, 1)
    patients = min(PATIENTS, max(count // 10, 10))
    tally = minutes.MinuteTally()
    with eng.begin() as conn:
        for first in range(0, patients, CHUNK):
            ids = range(first + 1, min(first + CHUNK, patients) + 1)
            conn.execute(insert(Patient), [{"id": i, "family_name": f"Family{i}", "given_name": "Pat",
                                            "birth_date": "1970-01-01", "sex": "F", "active": True,
                                            "created_at": start, "updated_at": start, "version": 1} for i in ids])
            conn.execute(insert(PatientIdentifier), [{"patient_id": i, "value": f"MRN{i:07d}", "issuer": "GENHOSP",
                                                      "type_code": "MR", "kind": "primary", "created_at": start}
                                                     for i in ids])
    orders = 0
    for first in range(0, count, CHUNK):
        with eng.begin() as conn:
            rows, history = [], []
            for i in range(first + 1, min(first + CHUNK, count) + 1):
                at = start + timedelta(seconds=(i - 1) * step)
                channel, mtype, status = pick(rng, CHANNELS), pick(rng, TYPES), pick(rng, STATUSES)
                pid = rng.randint(1, patients) if status == "processed" else None
                rows.append({"id": i, "channel": channel, "direction": "in", "protocol": "hl7v2", "received_at": at,
                             "remote": "127.0.0.1", "control_id": f"C{i:09d}", "sending_app": "EPIC",
                             "sending_facility": "GENHOSP", "content_digest": None, "message_type": mtype,
                             "version": "2.5.1", "charset": "utf-8", "size": 400, "status": status,
                             "ack_code": ACK[status], "error": "PID-7: not a date" if status == "error" else None,
                             "processed_at": at, "duplicate_of": None, "patient_id": pid, "attempts": 1,
                             "content_pruned": False})
                if mtype == "ORM^O01" and pid is not None:
                    orders += 1
                    history.append((orders, pid, i, at))
                tally.add(channel, ACK[status], rng.lognormvariate(-5.5, 0.6), at)
            conn.execute(insert(Message), rows)
            if history:
                conn.execute(insert(Order), [{"id": o, "patient_id": pid, "placer_number": f"PL{o}",
                                              "filler_number": f"FL{o}", "accession": f"ACC{o:08d}", "status": "SC",
                                              "last_control": "NW", "created_at": at, "updated_at": at, "version": 1}
                                             for o, pid, _, at in history])
                conn.execute(insert(OrderStatusChange), [{"order_id": o, "at": at, "control": "NW", "from_status": None,
                                                          "to_status": "SC", "applied": True, "message_id": mid}
                                                         for o, _, mid, at in history])
    with eng.begin() as conn:
        minutes.flush(conn, tally.drain())
    if eng.dialect.name == "postgresql":
        with eng.connect() as conn:  # what autovacuum does on its own after such a load
            conn.execute(text("ANALYZE"))
            conn.commit()
    eng.dispose()
    return {"count": count, "patients": patients, "orders": orders, "start": start, "now": now}


def searches(rng: random.Random, known: dict[str, Any]) -> dict[str, dict[str, str]]:
    """One set of search parameters per kind (new random values on each call)."""
    n, start = known["count"], known["start"]
    since = start + timedelta(hours=rng.uniform(0, 20))
    fmt = "%Y-%m-%dT%H:%M:%S"
    out = {
        "search: control ID": {"control_id": f"C{rng.randint(1, n):09d}"},
        "search: patient identifier": {"identifier": f"MRN{rng.randint(1, known['patients']):07d}"},
        "search: identifier + issuer": {"identifier": f"MRN{rng.randint(1, known['patients']):07d}",
                                        "issuer": "GENHOSP"},
        "search: status + time range": {"status": "error", "received_from": since.strftime(fmt),
                                        "received_to": (since + timedelta(hours=3)).strftime(fmt)},
        "search: processed + time range": {"status": "processed", "received_from": since.strftime(fmt),
                                           "received_to": (since + timedelta(hours=1)).strftime(fmt)},
        "search: type": {"type": rng.choice(["OMI^O23", "ADT^A40", "ORU^R01"])},
        "search: channel": {"channel": "hl7-file"},
        "search: first page": {},
        "search: deep page": {"before_id": str(rng.randint(1, max(n // 100, 2)))},
        "search: deep page, status": {"status": "error", "before_id": str(rng.randint(1, max(n // 50, 2)))},
    }
    if known["orders"]:
        out["search: accession"] = {"accession": f"ACC{rng.randint(1, known['orders']):08d}"}
    return out


def get(base: str, path: str) -> float:
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {TOKEN}"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - loopback
        body = resp.read()
        status = resp.status
    elapsed = time.perf_counter() - t0
    if status != 200 or not body:
        raise RuntimeError(f"GET {path}: {status}")
    return elapsed * 1000


def explain(url: str, known: dict[str, Any]) -> None:
    from engine.web.message_filters import message_filter
    eng: SAEngine = create_engine(url)
    rng = random.Random(3)
    with eng.connect() as conn:
        for name, params in searches(rng, known).items():
            stmt = search_statement(message_filter(params), 51)
            compiled = stmt.compile(eng, compile_kwargs={"literal_binds": True})
            print_plan(conn, f"{name} {params}", str(compiled))
    eng.dispose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1_000_000, help="messages in the store")
    ap.add_argument("--repeat", type=int, default=20, help="requests of each kind")
    ap.add_argument("--database-url", help="PostgreSQL admin URL; a throwaway database is created and dropped")
    ap.add_argument("--explain", action="store_true", help="print the plan of each search")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="radbridge-console-"))
    url, drop = make_store(args.database_url, work)
    try:
        s = bench_settings(work, url, TOKEN)

        loop = asyncio.new_event_loop()
        runner = threading.Thread(target=loop.run_forever, daemon=True)
        runner.start()
        Path(s.storage.dir).mkdir(parents=True, exist_ok=True)
        db = open_database(url)
        migrate.upgrade(db)
        db.dispose()
        print(f"filling {url.split('://')[0]} with {args.messages:,} messages ...", flush=True)
        t = time.perf_counter()
        known = fill(url, args.messages)
        print(f"  filled in {time.perf_counter() - t:.1f}s ({known['patients']:,} patients, "
              f"{known['orders']:,} orders)", flush=True)
        engine = Engine(s, http_app=build_app)
        asyncio.run_coroutine_threadsafe(engine.start(), loop).result(120)
        try:
            if args.explain:
                explain(url, known)
            base = f"http://127.0.0.1:{engine.http_port}"
            rng = random.Random(11)
            timings: dict[str, list[float]] = {"GET / (overview)": [], "GET /overview/live": []}
            found_rows = 0
            get(base, "/")  # warm-up: templates compiled, pools opened
            for _ in range(args.repeat):
                timings["GET / (overview)"].append(get(base, "/"))
                timings["GET /overview/live"].append(get(base, "/overview/live"))
                for name, params in searches(rng, known).items():
                    timings.setdefault(name, []).append(get(base, "/messages?" + urllib.parse.urlencode(params)))
            # the searches find what they look for (a check of the store, not a timing)
            one = urllib.request.Request(base + "/api/messages?control_id=C000000001",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(one, timeout=60) as resp:  # noqa: S310 - loopback
                found_rows = resp.read().count(b'"control_id": "C000000001"')
        finally:
            asyncio.run_coroutine_threadsafe(engine.stop(), loop).result(60)
            loop.call_soon_threadsafe(loop.stop)

        print(f"\n{args.messages:,} messages, {url.split('://')[0]}, {args.repeat} requests each")
        print(f"{'request':32} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}  p95 < {GOAL_MS:g} ms")
        worst = 0.0
        for name, values in timings.items():
            p50, p95, most = percentiles(values)
            worst = max(worst, p95)
            print(f"{name:32} {p50:8.1f} {p95:8.1f} {most:8.1f}  {'yes' if p95 < GOAL_MS else 'NO'}")
        print(f"goal (every p95 under {GOAL_MS:g} ms): {'met' if worst < GOAL_MS else 'NOT met'}")
        if found_rows != 1:
            print("ERROR: the search by control ID did not find the first message")
            return 1
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
        drop()


if __name__ == "__main__":
    sys.exit(main())
