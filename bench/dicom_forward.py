#!/usr/bin/env python3
"""DICOM forwarding benchmark: the engine's dicom-forward connector sending a stored study to dcmtk's
storescp, against dcmtk's storescu sending the same files to the same storescp, in the same run.

Every run gets N copies of pydicom-data's 512x512 uncompressed CT (``693_UNCI.dcm``, as
bench/dicom_ingest.py makes them: one study and series, a SOP Instance UID each). The engine runs in
this process on its own event loop (``tests.conftest.RunningEngine``), with the repository's channels
plus a dicom-forward channel whose route sends on ``study.stable`` to storescp. Per round:

* storescu: ``/usr/bin/storescu`` (dcmtk, TCP_NODELAY=1) sends the N files in one association to a
  freshly started ``storescp -od DIR``; timed from start to exit;
* engine: the N files are stored into the engine with storescu (not timed), the study is made stable
  (``check_stability`` with stable_seconds 0: one delivery row, written with the study.stable event),
  the workers are woken and the time runs until the delivery is recorded as delivered (claim, one
  association, N C-STOREs read one at a time from storage, settle: all of it). Also printed: the
  attempt's own duration (association + C-STOREs) as the engine recorded it;
* pynetdicom: pynetdicom's SCU alone (one association, files streamed from disk, TCP_NODELAY), to the
  same storescp: what the forwarder cost when it was built on it (it has its own lean C-STORE SCU now,
  engine/connectors/dicom/storescu.py).

Both targets are checked: storescp must hold N files afterwards, the delivery must be delivered in one
attempt. Rounds alternate (storescu, engine, pynetdicom) so both see the same machine load.

Usage:
    python bench/dicom_forward.py --instances 500
    python bench/dicom_forward.py --instances 500 --repeat 3
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from benchutil import json_option, write_figures  # noqa: E402
from dicom_ingest import make_instances  # noqa: E402
from sqlalchemy import select  # noqa: E402

from engine.store.models import Delivery, DeliveryAttempt  # noqa: E402
from tests.conftest import RunningEngine, make_settings  # noqa: E402
from tests.dicomutil import DCMTK_ENV, DcmtkMissing, StoreSCP, dcmtk_tool  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

TIMEOUT = 600.0  # seconds for one send of the whole study


@dataclass
class Timing:
    who: str
    instances: int
    seconds: float
    send_seconds: float | None = None  # engine: the attempt's own duration

    @property
    def rate(self) -> float:
        return self.instances / self.seconds if self.seconds > 0 else 0.0


def storescu(port: int, files: list[Path], aet: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run([dcmtk_tool("storescu"), "-aec", aet, "127.0.0.1", str(port), *map(str, files)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=TIMEOUT)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"storescu failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds


def run_storescu(files: list[Path], work: Path) -> Timing:
    scp = StoreSCP(work / "storescp-storescu", unique=False).start()
    try:
        seconds = storescu(scp.port, files, "STORESCP")
        wait_until(lambda: scp.count() >= len(files), timeout=30, message="storescp to hold every file")
        if scp.count() != len(files):
            raise RuntimeError(f"storescp holds {scp.count()} files, {len(files)} were sent")
    finally:
        scp.stop()
    return Timing("storescu -> storescp", len(files), seconds)


def run_pynetdicom(files: list[Path], work: Path) -> Timing:
    """The library's own ceiling: pynetdicom's SCU (what the engine's forwarder is built on) sending the
    files in one association, streamed from disk, Nagle off, nothing else around it."""
    import socket

    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, _config, evt
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    def nodelay(event: Any) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _config.STORE_SEND_CHUNKED_DATASET = True
    scp = StoreSCP(work / "storescp-pynetdicom", unique=False).start()
    try:
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        started = time.perf_counter()
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="STORESCP", evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
        if not assoc.is_established:
            raise RuntimeError("pynetdicom: no association with storescp")
        for n, f in enumerate(files, 1):
            rsp = assoc.send_c_store(str(f), msg_id=n)
            if int(rsp.get("Status", -1)) != 0:
                raise RuntimeError(f"pynetdicom: {f.name} answered {rsp.get('Status')}")
        assoc.release()
        seconds = time.perf_counter() - started
        wait_until(lambda: scp.count() >= len(files), timeout=30, message="storescp to hold every file")
    finally:
        scp.stop()
    return Timing("pynetdicom -> storescp", len(files), seconds)


def run_engine(files: list[Path], work: Path, database_url: str | None) -> Timing:
    scp = StoreSCP(work / "storescp-engine", unique=False).start()
    shutil.copytree(REPO / "channels", work / "channels")
    shutil.copytree(REPO / "mappings", work / "mappings")
    (work / "channels" / "pacs-forward.yaml").write_text(yaml.safe_dump({
        "name": "pacs-forward", "connector": {"type": "dicom-forward"},
        "destinations": {"pacs": {"aet": "STORESCP", "host": "127.0.0.1", "port": scp.port, "timeout_seconds": 60}},
        "routes": [{"when": "study.stable", "to": "pacs"}]}))
    s = make_settings(work, database_url or f"sqlite:///{work / 'var' / 'radbridge.db'}")
    s.dicom.stable_seconds = 3600
    s.dicom.fsync = False  # ingest is not what is measured
    s.mappings.reload_seconds = 0
    s.http.port = 0
    e = RunningEngine(s).start()
    try:
        storescu(e.dicom_port, files, "RADBRIDGE")  # into the engine: not timed
        e.engine.settings.dicom.stable_seconds = 0
        if e.call(e.engine.check_stability()) != 1:
            raise RuntimeError("the study did not become stable")

        def delivered() -> Any:
            with e.db.read_session() as sess:
                row = sess.execute(select(Delivery.id, Delivery.state, Delivery.attempts)
                                   .where(Delivery.channel == "pacs-forward")).first()
            return row if row is not None and row.state == "delivered" else None
        started = time.perf_counter()
        e.loop.call_soon_threadsafe(e.engine.wake_outbound)
        done = wait_until(delivered, timeout=TIMEOUT,
                          interval=0.01, message="the forward delivery to be recorded as delivered")
        seconds = time.perf_counter() - started
        with e.db.read_session() as sess:
            durations = [a for (a,) in sess.execute(select(DeliveryAttempt.duration_ms)
                                                    .where(DeliveryAttempt.delivery_id == done.id))]
        if done.attempts != 1:
            raise RuntimeError(f"the delivery took {done.attempts} attempts")
        wait_until(lambda: scp.count() >= len(files), timeout=30, message="storescp to hold every file")
        if scp.count() != len(files):
            raise RuntimeError(f"storescp holds {scp.count()} files, {len(files)} were forwarded")
    finally:
        e.stop()
        scp.stop()
    return Timing("engine -> storescp", len(files), seconds, durations[0] / 1000)


def print_round(i: int, pair: list[Timing]) -> None:
    base, eng, lib = pair
    print(f"\nround {i}:")
    print(f"{'sender':<24}{'instances':>10}{'seconds':>10}{'inst/s':>10}{'send s':>10}")
    for t in pair:
        send = f"{t.send_seconds:.2f}" if t.send_seconds is not None else "-"
        print(f"{t.who:<24}{t.instances:>10}{t.seconds:>10.2f}{t.rate:>10.1f}{send:>10}")
    print(f"ratio engine / storescu inst/s: {eng.rate / base.rate:.2f} (goal >= 0.8)")
    print(f"ratio engine / pynetdicom inst/s: {eng.rate / lib.rate:.2f} (pynetdicom's SCU, "
          f"which the forwarder used before its lean SCU; pynetdicom / storescu: {lib.rate / base.rate:.2f})")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=1, help="rounds (storescu, then engine, each round)")
    ap.add_argument("--database-url", help="the engine's database (default: SQLite in the work directory)")
    json_option(ap)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        dcmtk_tool("storescu")
        dcmtk_tool("storescp")
    except DcmtkMissing as exc:
        print(f"missing: {exc}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="radbridge-forward-"))
    try:
        study = make_instances(root / "files", args.instances)
        print(f"{args.instances} instances, {study.size_bytes / 1e6:.1f} MB; engine database: "
              f"{'PostgreSQL' if args.database_url else 'SQLite'}; pid {os.getpid()}")
        rounds: list[list[Timing]] = []
        for i in range(1, args.repeat + 1):
            pair = [run_storescu(study.files, root / f"r{i}-storescu"),
                    run_engine(study.files, root / f"r{i}-engine", args.database_url),
                    run_pynetdicom(study.files, root / f"r{i}-pynetdicom")]
            rounds.append(pair)
            print_round(i, pair)
        base = statistics.median(r[0].rate for r in rounds)
        eng = statistics.median(r[1].rate for r in rounds)
        lib = statistics.median(r[2].rate for r in rounds)
        write_figures(args.json, {"storescu inst/s": base, "engine inst/s": eng, "pynetdicom inst/s": lib})
        if len(rounds) > 1:
            print(f"\nmedians: storescu {base:.1f} inst/s, engine {eng:.1f} inst/s, pynetdicom {lib:.1f} inst/s; "
                  f"ratio engine / storescu {eng / base:.2f}, engine / pynetdicom {eng / lib:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
