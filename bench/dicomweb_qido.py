#!/usr/bin/env python3
"""QIDO-RS benchmark: study and series searches at /dicomweb/ over an index of N studies.

It fills a store (SQLite by default) with N studies (one or two series each, 3,000 patients, a year of
study dates, CT/MR/CR/US) by bulk INSERT through SQLAlchemy Core, not through the engine (no files:
QIDO-RS reads only the index). Then it starts the engine (its HTTP app on loopback) and times, with a
token, searches a viewer makes: the first page of all studies, a deep page, by PatientID, by
AccessionNumber, a month of StudyDate, a PatientName wildcard, ModalitiesInStudy, a UID list, and the
series of one study; each --repeat times with other values. It prints p50 / p95 / max per search and
checks that the searches find what they look for (exit 1 otherwise).

--explain prints the database's plan of each search (EXPLAIN QUERY PLAN / EXPLAIN).

Usage:
    python bench/dicomweb_qido.py                    # 10,000 studies, SQLite
    python bench/dicomweb_qido.py --studies 100000 --repeat 50
    python bench/dicomweb_qido.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres
        (an admin URL: a throwaway database is created there and dropped at the end)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchutil import bench_settings, migrated_store, percentiles, print_plan, timing_arguments  # noqa: E402
from sqlalchemy import create_engine, insert, select  # noqa: E402

from engine.connectors.dicom.query import statement  # noqa: E402
from engine.domain.studies import SERIES, STUDIES  # noqa: E402
from engine.runtime import Engine  # noqa: E402
from engine.web.app import build_app  # noqa: E402
from engine.web.dicomweb import parse_search  # noqa: E402

TOKEN = "rb_bench_dicomweb_token"
PATIENTS = 3000
CHUNK = 10_000
MODALITIES = ["CT", "MR", "CR", "US"]
FAMILIES = ["SMITH", "JONES", "BROWN", "TAYLOR", "WILSON", "DAVIES", "EVANS", "THOMAS", "JOHNSON", "ROBERTS"]


def uid(kind: int, i: int) -> str:
    return f"1.2.826.0.1.3680043.10.{kind}.{i}"


def fill(url: str, count: int, seed: int = 5) -> None:
    rng = random.Random(seed)
    eng = create_engine(url)
    with eng.begin() as conn:
        for start in range(0, count, CHUNK):
            rows = []
            for i in range(start, min(count, start + CHUNK)):
                p = rng.randrange(PATIENTS)
                n_series = 1 + (i % 2)
                mods = sorted({MODALITIES[(i + k) % len(MODALITIES)] for k in range(n_series)})
                rows.append({"study_uid": uid(1, i), "dicom_patient_id": f"P{p:05d}",
                             "patient_name": f"{FAMILIES[p % len(FAMILIES)]}^PAT{p}", "patient_birth_date": "19700101",
                             "patient_sex": "FM"[p % 2], "accession": f"ACC{i:07d}",
                             "study_date": f"2024{1 + i % 12:02d}{1 + i % 28:02d}", "study_time": "101500",
                             "study_id": str(i), "modalities": "\\".join(mods), "num_series": n_series,
                             "num_instances": 10 * n_series, "state": "stable", "recon_state": "matched"})
            conn.execute(insert(STUDIES), rows)
        ids = {row[0]: row[1] for row in conn.execute(select(STUDIES.c.study_uid, STUDIES.c.id))}
        series = []
        for i in range(count):
            for k in range(1 + (i % 2)):
                series.append({"study_id": ids[uid(1, i)], "series_uid": uid(2, 2 * i + k),
                               "modality": MODALITIES[(i + k) % len(MODALITIES)], "series_number": k + 1,
                               "num_instances": 10})
            if len(series) >= CHUNK:
                conn.execute(insert(SERIES), series)
                series = []
        if series:
            conn.execute(insert(SERIES), series)
    eng.dispose()


def searches(rng: random.Random, count: int) -> dict[str, tuple[str, int | None]]:
    """name -> (path and query, how many results it must give; None: some)."""
    i = rng.randrange(count)
    month = rng.randrange(1, 13)
    listed = ",".join(uid(1, rng.randrange(count)) for _ in range(10))
    return {
        "all studies, first 100": ("/studies?limit=100", min(100, count)),
        "all studies, deep page": (f"/studies?limit=100&offset={max(0, count - 150)}", min(100, count)),
        "PatientID": (f"/studies?PatientID=P{rng.randrange(PATIENTS):05d}", None),
        "AccessionNumber": (f"/studies?AccessionNumber=ACC{i:07d}", 1),
        "StudyDate, a month": (f"/studies?StudyDate=2024{month:02d}01-2024{month:02d}31&limit=100", None),
        "PatientName wildcard": (f"/studies?PatientName={FAMILIES[i % len(FAMILIES)].lower()}*&limit=100", None),
        "ModalitiesInStudy": (f"/studies?ModalitiesInStudy={MODALITIES[i % 4]}&limit=100", None),
        "UID list of 10": (f"/studies?StudyInstanceUID={listed}", None),
        "series of a study": (f"/studies/{uid(1, i)}/series", 1 + (i % 2)),
    }


def get(base: str, path: str) -> tuple[float, int]:
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {TOKEN}",
                                                       "Accept": "application/dicom+json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - loopback
        body = resp.read()
        status = resp.status
    elapsed = time.perf_counter() - t0
    if status != 200:
        raise RuntimeError(f"GET {path}: {status}")
    return elapsed * 1000, len(json.loads(body))


def explain(url: str, count: int) -> None:
    eng = create_engine(url)
    with eng.connect() as conn:
        for name, (path, _n) in searches(random.Random(3), count).items():
            if not path.startswith("/studies?"):
                continue
            search = parse_search(urllib.parse.parse_qsl(path.split("?", 1)[1]), "STUDY")
            stmt = statement(search.keys, "STUDY", eng.dialect.name).offset(search.offset).limit(search.limit + 1)
            print_plan(conn, name, str(stmt.compile(eng, compile_kwargs={"literal_binds": True})))
    eng.dispose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=10_000, help="studies in the index")
    timing_arguments(ap, "print the plan of each study search")
    args = ap.parse_args()

    work, url, drop = migrated_store(args.database_url, "radbridge-qido-")
    try:
        s = bench_settings(work, url, TOKEN)
        print(f"filling {url.split('://')[0]} with {args.studies:,} studies ...", flush=True)
        t = time.perf_counter()
        fill(url, args.studies)
        print(f"  filled in {time.perf_counter() - t:.1f}s", flush=True)
        if args.explain:
            explain(url, args.studies)
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        engine = Engine(s, http_app=build_app)
        asyncio.run_coroutine_threadsafe(engine.start(), loop).result(120)
        timings: dict[str, list[float]] = {}
        wrong: list[str] = []
        try:
            base = f"http://127.0.0.1:{engine.http_port}/dicomweb"
            get(base, "/studies?limit=1")  # warm-up: pools opened
            rng = random.Random(11)
            for _ in range(args.repeat):
                for name, (path, expected) in searches(rng, args.studies).items():
                    ms, found = get(base, path)
                    timings.setdefault(name, []).append(ms)
                    if (expected is not None and found != expected) or found == 0 and name != "PatientID":
                        wrong.append(f"{name}: {found} results, expected {expected or 'some'} ({path})")
        finally:
            asyncio.run_coroutine_threadsafe(engine.stop(), loop).result(60)
            loop.call_soon_threadsafe(loop.stop)

        print(f"\n{args.studies:,} studies, {url.split('://')[0]}, {args.repeat} requests each")
        print(f"{'QIDO-RS search':28} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
        for name, values in timings.items():
            p50, p95, most = percentiles(values)
            print(f"{name:28} {p50:8.1f} {p95:8.1f} {most:8.1f}")
        for w in wrong[:10]:
            print("ERROR:", w)
        return 1 if wrong else 0
    finally:
        drop()


if __name__ == "__main__":
    sys.exit(main())
