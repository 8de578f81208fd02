"""Accepted associations wait for work instead of polling (engine/connectors/dicom/reactor.py)."""

from __future__ import annotations

import gc
import inspect
import queue
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

import engine.connectors.dicom.scp as scp
from engine.connectors.dicom import reactor
from tests.conftest import start_dicom_engine
from tests.dicomutil import make_instance, run, storescu
from tests.waiting import wait_until


def test_pynetdicom_still_has_what_the_patch_relies_on() -> None:
    """The two reactor loops sleep through their module's ``time``, and the four queues they read are
    plain attributes made in the constructors: if a pynetdicom release changes that, this fails
    (and the reactors would simply poll again, or, worse, wait on queues nobody wakes)."""
    loops = {reactor._ASSOCIATION_LOOP: Association, reactor._DUL_LOOP: DULServiceProvider}
    for name, cls in loops.items():
        assert "time.sleep(" in inspect.getsource(getattr(cls, name))
    import pynetdicom.association
    import pynetdicom.dul
    for module in (pynetdicom.association, pynetdicom.dul):
        assert module.time is time or module.time is reactor._CLOCK
    assert "self.msg_queue" in inspect.getsource(DIMSEServiceProvider.__init__)
    dul_init = inspect.getsource(DULServiceProvider.__init__)
    for name in ("event_queue", "to_provider_queue", "to_user_queue"):
        assert f"self.{name}" in dul_init
    assert isinstance(reactor._WakingQueue(lambda: None, queue.Queue()), queue.Queue)


def test_a_queue_taken_over_keeps_what_was_queued_and_wakes_on_each_put() -> None:
    old: queue.Queue[Any] = queue.Queue()
    old.put("Evt5")
    woken: list[int] = []
    new = reactor._WakingQueue(lambda: woken.append(1), old)
    new.put("Evt10")
    new.put_nowait("Evt9")
    assert [new.get_nowait() for _ in range(3)] == ["Evt5", "Evt10", "Evt9"]
    assert len(woken) == 2 and old.empty()


def test_an_accepted_association_waits_for_work_and_is_woken_by_it(workdir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle, its reactors wake about every IDLE_SECONDS (pynetdicom's poll every millisecond);
    busy, requests are answered as they come, not when a wait runs out; and a C-STORE is stored.
    (The requests come from dcmtk: a pynetdicom SCU in this process can take its own response off
    its queue when the answer comes very fast, pynetdicom's requestor race, not ours.)"""
    accepted: list[Any] = []

    def watching(assoc: Any) -> None:
        accepted.append(assoc)
        reactor.watch(assoc)

    monkeypatch.setattr(scp, "watch", watching)
    eng = start_dicom_engine(workdir, f"sqlite:///{workdir / 'var' / 'radbridge.db'}")
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", eng.dicom_port, ae_title="RADBRIDGE")
        assert assoc.is_established
        try:
            assert len(accepted) == 1
            waits_before, _ = reactor.idle_waits(accepted[0])
            t0 = time.monotonic()
            time.sleep(0.5)
            idle = time.monotonic() - t0
            waits, _ = reactor.idle_waits(accepted[0])
            # two reactors: pynetdicom's would have looped ~1,000 times; these wait out IDLE_SECONDS
            assert 0 < waits - waits_before <= 2 * (idle / reactor.IDLE_SECONDS + 4)
        finally:
            assoc.release()
        wait_until(lambda: not accepted[0].is_alive(), timeout=10)

        echoes = 100
        done = run(["echoscu", "-aec", "RADBRIDGE", "--repeat", str(echoes), "127.0.0.1", str(eng.dicom_port)])
        assert done.returncode == 0, done.stderr
        assert len(accepted) == 2
        wait_until(lambda: not accepted[1].is_alive(), timeout=10)
        waits, timeouts = reactor.idle_waits(accepted[1])
        for ended in accepted:  # the connection closed: its wake-up pipe too, not when collected
            waiter = reactor._waiters[ended.dul]
            assert isinstance(waiter, reactor._DulWaiter) and waiter.closed
        # had the puts not woken the waits, each echo (its request noticed, its response sent) would
        # have run out at least one
        assert waits > 0 and timeouts < echoes

        obj = make_instance(tmp_path / "ct.dcm")
        assert storescu(eng.dicom_port, [obj.path]).returncode == 0
        assert reactor.idle_waits(accepted[2])[0] > 0
    finally:
        eng.stop()


def test_associations_the_engine_requests_still_sleep_as_pynetdicom_does() -> None:
    """Only watched threads wait for work: a sleep elsewhere is a sleep."""
    reactor.install()
    t0 = time.monotonic()
    reactor._CLOCK.sleep(0.01)
    assert time.monotonic() - t0 >= 0.009


def test_an_association_that_ended_is_not_kept_alive_by_its_waiters(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each waiter refers to its association (or DUL), which is its key in the table of waiters: held
    strongly, neither could ever be collected, and every association an engine accepted kept its
    socket open for good (in a long run, file descriptor numbers past select()'s 1024 stop
    pynetdicom accepting anything)."""
    ended: list[weakref.ref[Any]] = []

    def watching(assoc: Any) -> None:
        ended.append(weakref.ref(assoc))
        reactor.watch(assoc)

    monkeypatch.setattr(scp, "watch", watching)
    eng = start_dicom_engine(workdir, f"sqlite:///{workdir / 'var' / 'radbridge.db'}")
    try:
        for _ in range(3):
            done = run(["echoscu", "-aec", "RADBRIDGE", "127.0.0.1", str(eng.dicom_port)])
            assert done.returncode == 0, done.stderr
        assert len(ended) == 3

        def collected() -> bool:
            gc.collect()
            return all(ref() is None for ref in ended)
        wait_until(collected, timeout=10)
    finally:
        eng.stop()
