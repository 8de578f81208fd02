"""The one small interface every file store implements (local folders now, an object store later).

Keys are relative, '/'-separated names chosen by the caller (see :func:`engine.dicom.headers.storage_key`).
``put_file`` returns only when the object is durable: a C-STORE success is sent after it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from engine.errors import RadBridgeError


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class StoredEntry:
    """One object found in storage (what ``entries`` lists)."""

    key: str
    size: int
    modified: float  # POSIX time of its last change


def digest_bytes(data: bytes) -> tuple[int, str]:
    """Size and SHA-256 of a received file already read whole (what ``digest`` gives for its path)."""
    return len(data), hashlib.sha256(data).hexdigest()  # releases the GIL for data this size


class StorageFull(RadBridgeError, OSError):
    """Not enough free space to take the object (the sender is told: out of resources)."""


class ObjectStorage(Protocol):
    name: str

    def digest(self, source: Path) -> tuple[int, str]:
        """Size and SHA-256 of a received local file (read in chunks). Separate from put_file so
        that it can run while the header is parsed, and from ``flush`` so that both can run at once
        (the C-STORE handler does)."""

    def flush(self, source: Path) -> None:
        """The received local file's data made durable (fsync; nothing where the store does not
        fsync). ``put_file`` of a file not flushed is not durable."""

    def put_file(self, source: Path, key: str, *, size: int, sha256: str) -> StoredObject:
        """Take a digested and flushed ``source`` (consumed: moved, or copied then removed) as ``key``;
        durable on return."""

    def open(self, key: str) -> BinaryIO: ...

    def local_path(self, key: str) -> Path | None:
        """A path that can be read directly, when the store is a file system."""

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def free_bytes(self) -> int | None:
        """Free space left, or None when the store cannot tell."""

    def entries(self) -> Iterator[StoredEntry]:
        """Every object stored, in no particular order (for the index check, which compares)."""

    def set_aside(self, key: str) -> str:
        """Move an object out of the store into its orphan folder (kept, never deleted); returns
        where it went. For files no index row points at."""

    def put_back(self, key: str) -> None:
        """Undo ``set_aside`` (the object turned out to be referenced after all)."""
