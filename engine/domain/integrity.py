"""The study index against the files in storage: what one has and the other lacks.

Three problems, found by ``check_storage`` (``radbridge storage check``):

- **orphaned**: a file no instance points at. A file is renamed into storage before its index row
  is committed, and a C-STORE is answered only after that COMMIT, so a crash in between leaves a
  file that was never acknowledged (the sender was never told "stored" and sends it again). The
  old file of a coerced or overwritten instance is deleted after the commit that replaced it; a
  crash in between leaves it too. Neither is referenced by anything: they are moved, never
  deleted, to the storage's orphan folder (``var/orphaned/``, same layout), so a file from some
  other cause (a database restored from an older backup) can still be looked at and sent again.
  (Re-indexing them instead would take in something never acknowledged, past the duplicate
  policy, and bring back the old revision of a coerced instance.)
- **missing**: an instance whose file is not there (can only be reported: restore it, or have the
  sender send it again).
- **checksum**: a file whose size or SHA-256 is not the one recorded (reported likewise).

A file is orphaned only once it is older than a grace period (``ORPHAN_GRACE_SECONDS``): a younger
one may be a file whose index row is still on its way to the writer, here or in another engine
process sharing the storage. A file set aside is looked up once more afterwards and put back if
it became referenced meanwhile.

Files are matched to the index through their key, ``<shard>/<study>/<series>/<sop>.<sha12>.dcm``
(engine.dicom.headers.storage_key): the SOP Instance UID is the index's unique key, so each batch of
files costs one indexed query, whatever the size of the archive.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypedDict, cast

from sqlalchemy import Connection, Engine, Table, select

from engine.storage.base import ObjectStorage, StoredEntry
from engine.store.models import Instance, Study

log = logging.getLogger(__name__)

INSTANCES: Table = Instance.__table__  # type: ignore[assignment]
STUDIES: Table = Study.__table__  # type: ignore[assignment]
ORPHAN_GRACE_SECONDS = 600.0  # younger unreferenced files may still be on their way into the index
BATCH = 500
CHUNK = 1024 * 1024


class StorageProblem(StrEnum):
    ORPHANED = "orphaned"  # a file no instance points at
    MISSING = "missing"  # an instance whose file is not there
    CHECKSUM = "checksum"  # a file whose size or SHA-256 differs from the index


@dataclass(frozen=True)
class StorageFinding:
    problem: StorageProblem
    key: str
    detail: str
    set_aside_to: str | None = None  # an orphaned file moved out of storage (repair), and where


@dataclass
class StorageReport:
    files: int = 0  # files looked at
    instances: int = 0  # index rows looked at
    too_young: int = 0  # unreferenced files younger than the grace period: not judged
    findings: list[StorageFinding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.findings

    def count(self, problem: StorageProblem) -> int:
        return sum(1 for f in self.findings if f.problem is problem)


class _IndexedFile(TypedDict):
    id: int
    sop_instance_uid: str
    storage_key: str
    sha256: str
    size_bytes: int


class _IndexedInstance(TypedDict):
    id: int
    sop_instance_uid: str
    storage_key: str
    study_uid: str


FILES_OF_SOPS = select(INSTANCES.c.id, INSTANCES.c.sop_instance_uid, INSTANCES.c.storage_key, INSTANCES.c.sha256,
                       INSTANCES.c.size_bytes)
INSTANCE_PAGE = (select(INSTANCES.c.id, INSTANCES.c.sop_instance_uid, INSTANCES.c.storage_key, STUDIES.c.study_uid)
                 .join(STUDIES, STUDIES.c.id == INSTANCES.c.study_id).order_by(INSTANCES.c.id))


def sop_of_key(key: str) -> str | None:
    """The SOP Instance UID a storage key names, None for a name storage_key() never makes."""
    parts = key.split("/")
    if len(parts) != 4 or not parts[3].endswith(".dcm"):
        return None
    sop, _, digest = parts[3][:-len(".dcm")].rpartition(".")
    if not sop or len(digest) != 12:
        return None
    return sop


def _indexed(conn: Connection, sops: Iterable[str]) -> dict[str, _IndexedFile]:
    wanted = sorted(set(sops))
    if not wanted:
        return {}
    rows = conn.execute(FILES_OF_SOPS.where(INSTANCES.c.sop_instance_uid.in_(wanted))).mappings()
    return {r["sop_instance_uid"]: cast(_IndexedFile, dict(r)) for r in rows}


def _referenced(reader: Engine, key: str) -> bool:
    sop = sop_of_key(key)
    if sop is None:
        return False
    with reader.connect() as conn:
        found = _indexed(conn, [sop]).get(sop)
    return found is not None and found["storage_key"] == key


def _digest(storage: ObjectStorage, key: str) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with storage.open(key) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _batches(entries: Iterator[StoredEntry]) -> Iterator[list[StoredEntry]]:
    batch: list[StoredEntry] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_files(reader: Engine, storage: ObjectStorage, report: StorageReport, *, grace_seconds: float,
                 checksums: bool, stop: threading.Event | None = None) -> list[StoredEntry]:
    """Every file against the index: the orphaned ones (returned), and with ``checksums`` the
    referenced ones whose content is not what the index recorded (added to the report)."""
    cutoff = time.time() - grace_seconds
    orphans: list[StoredEntry] = []
    for batch in _batches(storage.entries()):
        if stop is not None and stop.is_set():
            break
        report.files += len(batch)
        with reader.connect() as conn:
            indexed = _indexed(conn, filter(None, (sop_of_key(e.key) for e in batch)))
        for entry in batch:
            sop = sop_of_key(entry.key)
            row = indexed.get(sop) if sop is not None else None
            if row is None or row["storage_key"] != entry.key:
                if entry.modified >= cutoff:
                    report.too_young += 1
                else:
                    orphans.append(entry)
                continue
            inst = row["sop_instance_uid"]
            if not checksums:  # sizes only
                if entry.size != row["size_bytes"]:
                    report.findings.append(StorageFinding(
                        StorageProblem.CHECKSUM, entry.key,
                        f"instance {inst}: {entry.size} bytes (index: {row['size_bytes']} bytes)"))
                continue
            try:
                size, sha = _digest(storage, entry.key)
            except FileNotFoundError:  # replaced meanwhile (overwrite, coercion): the missing pass looks again
                continue
            if size != row["size_bytes"] or sha != row["sha256"]:
                report.findings.append(StorageFinding(
                    StorageProblem.CHECKSUM, entry.key,
                    f"instance {inst}: {size} bytes, sha256 {sha} (index: {row['size_bytes']} bytes, "
                    f"sha256 {row['sha256']})"))
    return orphans


def _set_aside(reader: Engine, storage: ObjectStorage, entry: StoredEntry) -> str | None:
    """Move one orphaned file out of storage, then make sure no index row took it meanwhile
    (put it back if one did). Where it went, or None when it stayed (or vanished)."""
    try:
        dest = storage.set_aside(entry.key)
    except FileNotFoundError:
        return None
    if _referenced(reader, entry.key):
        storage.put_back(entry.key)
        return None
    return dest


def _orphan_findings(reader: Engine, storage: ObjectStorage, orphans: list[StoredEntry], *,
                     repair: bool, stop: threading.Event | None = None) -> list[StorageFinding]:
    found = []
    for entry in orphans:
        if stop is not None and stop.is_set():
            break
        if _referenced(reader, entry.key):  # indexed since the batch was read
            continue
        why = "no instance points at it" if sop_of_key(entry.key) else "not a name the engine makes"
        detail = f"{entry.size} bytes, {why}"
        moved = _set_aside(reader, storage, entry) if repair else None
        if repair and moved is None:
            continue
        found.append(StorageFinding(StorageProblem.ORPHANED, entry.key, detail, set_aside_to=moved))
    return found


def _check_instances(reader: Engine, storage: ObjectStorage, report: StorageReport) -> None:
    """Every index row against storage: the ones whose file is not there."""
    last_id = 0
    while True:
        with reader.connect() as conn:
            page = [cast(_IndexedInstance, dict(r))
                    for r in conn.execute(INSTANCE_PAGE.where(INSTANCES.c.id > last_id).limit(BATCH)).mappings()]
        if not page:
            return
        last_id = page[-1]["id"]
        report.instances += len(page)
        for inst in page:
            if storage.exists(inst["storage_key"]):
                continue
            with reader.connect() as conn:  # replaced meanwhile (overwrite, coercion)?
                now = _indexed(conn, [inst["sop_instance_uid"]]).get(inst["sop_instance_uid"])
            if now is None or now["storage_key"] != inst["storage_key"] or storage.exists(inst["storage_key"]):
                continue
            report.findings.append(StorageFinding(
                StorageProblem.MISSING, inst["storage_key"],
                f"instance {inst['sop_instance_uid']} of study {inst['study_uid']}"))


def check_storage(reader: Engine, storage: ObjectStorage, *, repair: bool = False, checksums: bool = True,
                  grace_seconds: float = ORPHAN_GRACE_SECONDS) -> StorageReport:
    """Compare the index with storage both ways (``radbridge storage check``). With ``repair``
    orphaned files are set aside; missing files and wrong checksums can only be reported."""
    report = StorageReport()
    orphans = _check_files(reader, storage, report, grace_seconds=grace_seconds, checksums=checksums)
    report.findings[:0] = _orphan_findings(reader, storage, orphans, repair=repair)
    _check_instances(reader, storage, report)
    return report


def sweep_orphans(reader: Engine, storage: ObjectStorage, *, grace_seconds: float = ORPHAN_GRACE_SECONDS,
                  stop: threading.Event | None = None) -> StorageReport:
    """The engine's sweep at start: orphaned files older than the grace period are set aside
    (what a crash between writing a file and committing its index row leaves). ``stop`` ends it
    early (the engine is stopping), between two files."""
    report = StorageReport()
    orphans = _check_files(reader, storage, report, grace_seconds=grace_seconds, checksums=False, stop=stop)
    report.findings = _orphan_findings(reader, storage, orphans, repair=True, stop=stop)
    for f in report.findings:
        log.warning("storage: %s file %s (%s) moved to %s", f.problem, f.key, f.detail, f.set_aside_to)
    return report
