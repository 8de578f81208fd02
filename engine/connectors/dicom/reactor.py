"""Accepted associations wait for work instead of polling for it.

pynetdicom runs two threads per association, and both poll: the association's reactor sleeps 1 ms
before each look for a complete DIMSE message, and the DUL's reactor sleeps 1 ms whenever the
socket, its event queue and the primitives to send were all empty. That is about 2,000 wake-ups a
second per association, idle or busy, each taking the GIL: four idle associations cost a third of
a CPU, and every C-STORE waits up to a millisecond for the message to be noticed and another for
its response to be sent.

``watch`` (called for every connection the SCP accepts, before its threads start: EVT_CONN_OPEN) makes those two
sleeps end as soon as there is work and last up to ``IDLE_SECONDS`` when there is none:

* the association's reactor waits on an Event set by every put into the queues it reads (the
  DIMSE messages and the DUL's primitives for the user: a request, a release, an abort);
* the DUL's reactor waits in ``select`` on the socket and a pipe written by every put into the
  queues it reads (the primitives to send, the state machine's events).

Everything else pynetdicom's loops do (timers, release, abort, the state machine) is untouched:
they still run on every wake-up, and at least every ``IDLE_SECONDS``, so a timer expires at most
that late. Only those two sleeps of watched threads change (recognised by the function that calls
``sleep``); any other sleep, and every association the engine requests (C-MOVE, forwarding), sleeps
as before. tests/test_dicom_reactor.py fails if a pynetdicom release changes what this relies on.
"""

from __future__ import annotations

import inspect
import os
import queue
import select
import ssl
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import pynetdicom.association
import pynetdicom.dul

IDLE_SECONDS = 0.05  # longest wait without work: how late a timer (ARTIM, network_timeout) may fire

_ASSOCIATION_LOOP = "_run_reactor"  # pynetdicom's functions whose 1 ms sleep is replaced
_DUL_LOOP = "run_reactor"


class _WakingQueue(queue.Queue[Any]):
    """A queue that calls ``wake`` after each put."""

    def __init__(self, wake: Callable[[], None], replaces: queue.Queue[Any]) -> None:
        super().__init__()
        self.wake = wake
        for _ in range(replaces.qsize()):  # what is queued already (the socket's Evt5) stays, in order
            try:
                super().put(replaces.get_nowait())
            except queue.Empty:
                break

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.wake()


class _Waiter(ABC):
    """What replaces one reactor's 1 ms sleep: ``idle`` returns when there is work, or after
    IDLE_SECONDS."""

    def __init__(self) -> None:
        self.waits = 0  # idle waits ...
        self.timeouts = 0  # ... of which no work ended (IDLE_SECONDS passed)

    @abstractmethod
    def idle(self) -> None: ...


class _AssociationWaiter(_Waiter):
    def __init__(self, assoc: Any) -> None:
        super().__init__()
        # weak: the association is this waiter's key in _waiters, and a value that held its key
        # would keep both (and the connection's socket) alive for good
        self.assoc = weakref.ref(assoc)
        self.work = threading.Event()

    def pending(self) -> bool:
        assoc = self.assoc()
        return assoc is None or bool(assoc.dimse.msg_queue.qsize() or assoc.dul.to_user_queue.qsize())

    def idle(self) -> None:
        self.work.clear()  # before looking: a put after this sets it again
        if not self.pending():
            self.waits += 1
            if not self.work.wait(IDLE_SECONDS):
                self.timeouts += 1


class _DulWaiter(_Waiter):
    """The DUL thread's wait: ``select`` on the socket and a pipe that ``wake`` writes to. The pipe
    is closed with the connection (``close``, EVT_CONN_CLOSE), never while a wake or a read could
    still use its numbers (the lock): after that the thread sleeps as pynetdicom would until it ends."""

    def __init__(self, dul: Any) -> None:
        super().__init__()
        self.dul = weakref.ref(dul)  # weak, as _AssociationWaiter.assoc
        self.lock = threading.Lock()
        self.closed = False
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self._finalizer = weakref.finalize(self, _close, self.read_fd, self.write_fd)  # if never closed

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self._finalizer()

    def wake(self) -> None:
        with self.lock:
            if self.closed:
                return
            try:
                os.write(self.write_fd, b"\0")
            except OSError:  # full (BlockingIOError): it is awake already
                pass

    def pending(self) -> bool:
        dul = self.dul()
        if dul is None:
            return True
        return bool(dul.event_queue.qsize() or dul.to_provider_queue.qsize())

    def idle(self) -> None:
        if self.pending():
            return
        dul = self.dul()
        sock = getattr(dul.socket, "socket", None) if dul is not None else None
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted data that select cannot see
        with self.lock:
            closed = self.closed
        if sock is None or closed:
            time.sleep(0.001)  # no connection to wait on: as pynetdicom would
            return
        self.waits += 1
        try:
            ready, _, _ = select.select([sock, self.read_fd], [], [], IDLE_SECONDS)
        except (OSError, ValueError):  # the socket was closed meanwhile: pynetdicom notices
            time.sleep(0.001)
            return
        if not ready:
            self.timeouts += 1
        if self.read_fd in ready:
            with self.lock:
                if self.closed:
                    return
                try:
                    while os.read(self.read_fd, 4096):
                        pass
                except OSError:  # drained (BlockingIOError)
                    pass


def _close(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


_waiters: weakref.WeakKeyDictionary[threading.Thread, _Waiter] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class _Clock:
    """What pynetdicom's association and DUL modules see as ``time``: the real module, except that
    the reactor sleeps of a watched thread wait for work."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        waiter = _waiters.get(threading.current_thread())
        if waiter is not None:
            frame = inspect.currentframe()
            caller = frame.f_back.f_code.co_name if frame is not None and frame.f_back is not None else ""
            del frame
            if caller == (_ASSOCIATION_LOOP if isinstance(waiter, _AssociationWaiter) else _DUL_LOOP):
                waiter.idle()
                return
        time.sleep(seconds)


_CLOCK = _Clock()


def install() -> None:
    """Route pynetdicom's association and DUL sleeps through ``_Clock`` (idempotent)."""
    for module in (pynetdicom.association, pynetdicom.dul):
        setattr(module, "time", _CLOCK)  # noqa: B010 - a module, not an object of ours


def watch(assoc: Any) -> None:
    """Make an accepted association's two reactors wait for work. Call before its threads start
    (pynetdicom's EVT_CONN_OPEN); the queues they read are replaced while still empty."""
    install()
    dul = assoc.dul
    on_assoc, on_dul = _AssociationWaiter(assoc), _DulWaiter(dul)
    assoc.dimse.msg_queue = _WakingQueue(on_assoc.work.set, assoc.dimse.msg_queue)
    dul.to_user_queue = _WakingQueue(on_assoc.work.set, dul.to_user_queue)
    dul.to_provider_queue = _WakingQueue(on_dul.wake, dul.to_provider_queue)
    dul.event_queue = _WakingQueue(on_dul.wake, dul.event_queue)
    with _lock:
        _waiters[assoc] = on_assoc
        _waiters[dul] = on_dul


def unwatch(assoc: Any) -> None:
    """The connection is closed: release what ``watch`` took for it (its DUL's wake-up pipe)."""
    waiter = _waiters.get(assoc.dul)
    if isinstance(waiter, _DulWaiter):
        waiter.close()


def idle_waits(assoc: Any) -> tuple[int, int]:
    """(waits for work, of which ended by IDLE_SECONDS passing) of a watched association's two
    reactors so far; (0, 0) for one not watched."""
    found = [w for w in (_waiters.get(assoc), _waiters.get(assoc.dul)) if w is not None]
    return sum(w.waits for w in found), sum(w.timeouts for w in found)
