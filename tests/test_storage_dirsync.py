"""put_file makes each rename durable with an fsync of its directory that started after the rename;
concurrent put_files into one directory share such fsyncs (engine/storage/local.py)."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import engine.storage.local as local
from engine.storage.base import StorageFull
from engine.storage.local import LocalStorage

THREADS = 12


def put_many(storage: LocalStorage, tmp_path: Path, n: int) -> list[BaseException | None]:
    sources = []
    for i in range(n):
        src = tmp_path / "in" / f"{i}.dcm"
        src.parent.mkdir(exist_ok=True)
        src.write_bytes(b"%d" % i)
        sources.append(src)
    outcomes: list[BaseException | None] = [None] * n
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait(10)
        try:
            storage.put_file(sources[i], f"aa/study/series/{i}.dcm", size=1, sha256="0" * 64)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            outcomes[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outcomes


def test_every_rename_is_followed_by_an_fsync_that_started_after_it_and_they_are_shared(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = LocalStorage(tmp_path / "studies")
    (tmp_path / "studies" / "aa" / "study" / "series").mkdir(parents=True)
    lock = threading.Lock()
    log: list[tuple[str, Any]] = []
    real_replace, real_fsync_dir = os.replace, local.fsync_dir

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        with lock:
            log.append(("renamed", Path(dst).name))

    def fsync_dir(path: Path) -> None:
        with lock:
            log.append(("fsync started", None))
            mark = len(log)
        time.sleep(0.02)  # a slow disk: others rename meanwhile
        real_fsync_dir(path)
        with lock:
            log.append(("fsync returned", mark))

    returned: dict[str, int] = {}
    real_put = LocalStorage.put_file

    def put_file(self: LocalStorage, source: Path, key: str, **kw: Any) -> Any:
        out = real_put(self, source, key, **kw)
        with lock:
            log.append(("put_file returned", Path(key).name))
            returned[Path(key).name] = len(log)
        return out

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(local, "fsync_dir", fsync_dir)
    monkeypatch.setattr(LocalStorage, "put_file", put_file)
    assert put_many(storage, tmp_path, THREADS) == [None] * THREADS

    fsyncs = [(started_at, i) for i, (what, started_at) in enumerate(log) if what == "fsync returned"]
    for name, back in returned.items():
        renamed = next(i for i, e in enumerate(log) if e == ("renamed", name))
        # some fsync started after the rename (log position) and returned before put_file did
        assert any(started > renamed and ended < back for started, ended in fsyncs), name
    assert len(fsyncs) < THREADS  # shared, not one each


@pytest.mark.parametrize(("code", "raised"), [(errno.EIO, OSError), (errno.ENOSPC, StorageFull)])
def test_a_failed_directory_fsync_fails_every_put_file_relying_on_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, raised: type[Exception]) -> None:
    storage = LocalStorage(tmp_path / "studies")

    def fsync_dir(path: Path) -> None:
        time.sleep(0.01)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(local, "fsync_dir", fsync_dir)
    (tmp_path / "studies" / "aa" / "study" / "series").mkdir(parents=True)
    outcomes = put_many(storage, tmp_path, THREADS)
    assert all(isinstance(o, raised) for o in outcomes), outcomes
    assert storage._syncing == {}  # nothing kept for a directory no one is writing to


def test_without_fsync_nothing_is_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(local, "fsync_dir", calls.append)
    storage = LocalStorage(tmp_path / "studies", fsync=False)
    (tmp_path / "studies" / "aa" / "study" / "series").mkdir(parents=True)
    assert put_many(storage, tmp_path, 3) == [None] * 3
    assert calls == []
