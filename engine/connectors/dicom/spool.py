"""The temporary files pynetdicom writes received C-STORE data to, and how they end.

With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom (its DUL thread) writes each P-DATA fragment of a
C-STORE-RQ's dataset to a ``tmp*.dcm`` file in the storage's tmp folder as it arrives, and deletes
the file after the C-STORE handler returns. It does not delete it when the association ends before
the handler ran: an A-ABORT or a dropped connection mid-transfer, or a complete request still
queued when the connection went. Those files are deleted here, when the association ends
(``discard_unfinished``), and the engine deletes any left by a crash at start.

``refuse_partial`` stops a transfer in its tracks (free space fell below the floor): the file is
deleted at once, and what still arrives for that request is read and dropped, so the request can
still be answered (A700) when its last fragment comes.

This reaches into pynetdicom: the DIMSE provider's ``message`` and ``msg_queue`` are public, but
the temporary file is only ``DIMSEMessage._data_set_file`` (``C_STORE._dataset_file`` once the
request is complete); pynetdicom 3.0 has no public hook for a request still being received. This
module is the one place allowed to touch them (tests/test_architecture.py), and
tests/test_dicom_store.py (interrupted transfers, free space while receiving) fails if a
pynetdicom release changes them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class DroppedData:
    """Stands in for the temporary file of a request refused while it is received: writes are
    counted and dropped. pynetdicom writes to it, flushes ``.file``, closes it and unlinks ``.name``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.file = self
        self.bytes_dropped = 0

    def write(self, data: bytes) -> int:
        self.bytes_dropped += len(data)
        return len(data)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


def _delete(handle: Any) -> Path | None:
    """Close and delete one temporary file (a real one; a DroppedData has nothing on disk)."""
    if handle is None or isinstance(handle, DroppedData):
        return None
    path = Path(handle.name)
    with contextlib.suppress(OSError):
        handle.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot delete the partial file %s: %s", path, exc)
        return None
    return path


def receiving(assoc: Any) -> tuple[Any, Any] | None:
    """(message, its open temporary file) of the C-STORE-RQ being received on ``assoc``, if any."""
    message = assoc.dimse.message
    if message is None:
        return None
    handle = message._data_set_file
    if handle is None or isinstance(handle, DroppedData):
        return None
    return message, handle


def refuse_partial(assoc: Any) -> Path | None:
    """Delete the partial file of the request being received; the rest of it is dropped as it
    comes. Returns the file's path (the request's ``dataset_path``), None when nothing is received.
    Call from pynetdicom's DUL thread (an EVT_PDU_RECV handler): the thread that writes the file."""
    found = receiving(assoc)
    if found is None:
        return None
    message, handle = found
    message._data_set_file = DroppedData(handle.name)
    _delete(handle)
    return Path(handle.name)


def was_refused(request: Any) -> bool:
    """Whether this complete C-STORE request's data was dropped by ``refuse_partial``."""
    return isinstance(request._dataset_file, DroppedData)


def discard_unfinished(assoc: Any) -> list[Path]:
    """The association is over: delete the file of a request cut off mid-transfer, and of any
    complete request still queued (no answer can reach the peer now; nothing was acknowledged).
    A request already being handled is not queued any more: pynetdicom deletes its file after."""
    deleted: list[Path] = []
    dimse = assoc.dimse
    message = dimse.message
    if message is not None:
        handle, message._data_set_file = message._data_set_file, None
        if (path := _delete(handle)) is not None:
            deleted.append(path)
    pending: queue.Queue[Any] = dimse.msg_queue
    for _ in range(pending.qsize() + 1):  # bounded: the reactor may take items meanwhile
        try:
            _context_id, primitive = pending.get_nowait()
        except queue.Empty:
            break
        # responses and other requests have no file; an aborted peer can leave a None there too
        if (path := _delete(getattr(primitive, "_dataset_file", None))) is not None:
            deleted.append(path)
    return deleted
