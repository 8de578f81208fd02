"""Local folders: one file per object under a root directory.

Durability: a file is fsynced before it is renamed into place, and the directory after, so a
rename that returned survives a power cut. With ``fsync=False`` (test rigs) neither happens.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from engine.storage.base import StorageFull, StoredEntry, StoredObject

CHUNK = 1024 * 1024


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a file created or renamed in it) survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DirectorySync:
    """Group fsync of one directory. A rename is durable once an fsync of its directory that started
    after it has returned; instances of one series arriving on several associations at once land in
    one directory, and one fsync then covers every rename made before it started, instead of one
    fsync each, one after the other. At most one fsync of the directory runs at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cond = threading.Condition()
        self.started = 0  # fsyncs started ...
        self.completed = 0  # ... and returned (in order: one at a time)
        self.running = False
        self.errors: dict[int, OSError] = {}  # the fsyncs that failed, by number (of the last 4096)
        self.users = 0  # callers holding this object (LocalStorage drops it at 0)

    def sync(self) -> None:
        """Returns once an fsync that started after this call began has returned; raises its error."""
        with self.cond:
            need = self.started + 1  # the next fsync to start: the running one may predate our rename
            for _ in range(need - self.completed + 1):  # bounded: each wait ends with an fsync returned
                if self.completed >= need:
                    break
                if self.running:
                    self.cond.wait()
                    continue
                self.running = True
                self.started += 1
                number = self.started
                self.cond.release()
                error: OSError | None = None
                try:
                    fsync_dir(self.directory)
                except OSError as exc:
                    error = exc
                finally:
                    self.cond.acquire()
                    self.running = False
                    self.completed = number
                    if error is not None:
                        self.errors[number] = error
                    self.errors.pop(number - 4096, None)  # a waiter reads its own long before
                    self.cond.notify_all()
            covered = self.completed >= need
            failed = self.errors.get(need)
        if not covered:  # not reached (each turn above ends an fsync), but never return undurable
            fsync_dir(self.directory)
        elif failed is not None:
            raise failed


class LocalStorage:
    name = "local"

    def __init__(self, root: Path, *, fsync: bool = True, orphan_dir: Path | None = None) -> None:
        self.root = root.resolve()
        self.fsync = fsync
        # files no index row points at are moved here (same layout), beside the root by default
        self.orphan_dir = (orphan_dir or self.root.parent / "orphaned").resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()
        self._lock = threading.Lock()
        self._syncing: dict[Path, _DirectorySync] = {}  # directories with a put_file in progress

    def path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"storage key {key!r} leaves the storage root")
        return self.root / key

    def digest(self, source: Path) -> tuple[int, str]:
        h = hashlib.sha256()
        size = 0
        with open(source, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)  # releases the GIL for chunks this size
                size += len(chunk)
        return size, h.hexdigest()

    def flush(self, source: Path) -> None:
        if self.fsync:
            with open(source, "rb") as f:
                os.fsync(f.fileno())

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        with self._lock:
            missing = []
            d = directory
            while not d.exists() and d != self.root:
                missing.append(d)
                d = d.parent
            for m in reversed(missing):
                try:
                    m.mkdir()
                except FileExistsError:
                    pass
                if self.fsync:
                    fsync_dir(m.parent)  # the new directory entry itself must survive
            self._known_dirs.add(directory)

    def put_file(self, source: Path, key: str, *, size: int, sha256: str) -> StoredObject:
        dest = self.path(key)
        self._ensure_dir(dest.parent)
        try:
            try:
                os.replace(source, dest)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self._copy_in(source, dest)
            if self.fsync:
                self._sync_dir(dest.parent)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(exc.errno, f"storage full: {exc.strerror}") from exc
            raise
        return StoredObject(key, size, sha256)

    def _sync_dir(self, directory: Path) -> None:
        """The directory's entries made durable, sharing an fsync with concurrent put_files there."""
        with self._lock:
            sync = self._syncing.get(directory)
            if sync is None:
                sync = self._syncing[directory] = _DirectorySync(directory)
            sync.users += 1
        try:
            sync.sync()
        finally:
            with self._lock:
                sync.users -= 1
                if sync.users == 0:
                    del self._syncing[directory]

    def _copy_in(self, source: Path, dest: Path) -> None:
        """Another file system: copy next to the destination, make it durable, then rename."""
        part = dest.with_name(dest.name + ".part")
        with open(source, "rb") as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
            out.flush()
            if self.fsync:
                os.fsync(out.fileno())
        os.replace(part, dest)
        os.unlink(source)

    def open(self, key: str) -> BinaryIO:
        return open(self.path(key), "rb")

    def local_path(self, key: str) -> Path | None:
        return self.path(key)

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def delete(self, key: str) -> None:
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass

    def free_bytes(self) -> int | None:
        return shutil.disk_usage(self.root).free

    def entries(self) -> Iterator[StoredEntry]:
        for folder, _dirs, files in os.walk(self.root):
            base = Path(folder)
            for name in files:
                path = base / name
                try:
                    st = path.stat()
                except FileNotFoundError:  # deleted meanwhile (an overwrite, a coercion)
                    continue
                yield StoredEntry(path.relative_to(self.root).as_posix(), st.st_size, st.st_mtime)

    def set_aside(self, key: str) -> str:
        source = self.path(key)
        dest = self.orphan_dir / key
        self._move(source, dest)
        return str(dest)

    def put_back(self, key: str) -> None:
        dest = self.path(key)
        self._ensure_dir(dest.parent)
        self._move(self.orphan_dir / key, dest)

    def _move(self, source: Path, dest: Path) -> None:
        """Rename within one file system (the orphan folder sits beside the root), durably."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, dest)
        if self.fsync:
            fsync_dir(dest.parent)
            fsync_dir(source.parent)
