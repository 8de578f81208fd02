"""Storage lifecycle: delete studies that are safely elsewhere, by age and by watermark
(``[storage.cleanup]``, docs/storage.md), as Orthanc's MaximumStorageSize and dcm4chee's deletion
rules do, but never a study that is not safely elsewhere unless ``delete_unforwarded`` says so.

**Safely elsewhere** (``kept_reasons``, one function, the same on SQLite and PostgreSQL): a study is
deletable when nothing in this list holds; each item that holds is a reason it is kept.

- it is receiving (not stable), waiting for or in reconciliation (``recon_state`` pending, a row
  in the reconciliation queue), or an exception an analyst must look at (flagged, unmatched,
  quarantined, or an open flagged/rejected finding);
- a forward delivery for it (mapping ``dicom-forward``) is pending (being sent; the files must stay);
- a DICOMweb or API read of it is younger than ``RECENT_READ_SECONDS`` (a retrieval may be
  streaming it; C-MOVE/C-GET write no audit row, see docs/storage.md);
- unless ``delete_unforwarded``: a forward delivery for it is dead, or one of the required
  destinations (``require_forwarded_to``; empty: every destination it has a forward delivery for,
  and at least one) has no *current* copy. A destination has a current copy when a study-level
  forward delivery to it is delivered and was created after the study last changed (its last
  instance arrived, or reconciliation rewrote a file), or when every instance of the study has a
  delivered instance-level forward delivery created after that instance (and the study's last
  rewrite) arrived. "Delivered" is the forwarder's promise that the destination stored (and, when
  it does storage commitment, committed) every instance.

**Deleting** (``delete_study``) is one short transaction through the engine's writer: the study is
locked (``FOR UPDATE`` on PostgreSQL; SQLite writers are serial), the rule is checked again, then its
instance revisions, findings, reconciliation queue row, instances, series and the study row are
deleted; deliveries and domain events keep their rows with ``study_id`` / ``instance_id`` cleared
(the audit row names the study UID and the delivery ids); one audit row (action ``delete``) per
study. Only after the COMMIT are the files deleted from storage, each only if no index row points at
its key again (the same instance sent again meanwhile). A crash between the COMMIT and the file
deletions leaves files no row points at: the engine's start-up sweep and ``radbridge storage check
--repair`` set them aside as orphans (engine/domain/integrity.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import Connection, Table, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from engine.channels import FORWARD_MAPPING
from engine.config import CleanupSettings
from engine.domain.studies import FINDINGS, INSTANCES, REVISIONS, SERIES, STUDIES
from engine.errors import RadBridgeError
from engine.storage.base import ObjectStorage
from engine.store.audit import READS, Actor, AuditAction, Subject, record_action
from engine.store.models import AuditEvent, Delivery, DomainEvent, ReconcileJob
from engine.store.states import DeliveryState, FindingAction, FindingStatus, ReconState, StudyState
from engine.store.types import utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")

QUEUE: Table = ReconcileJob.__table__  # type: ignore[assignment]
DELIVERIES: Table = Delivery.__table__  # type: ignore[assignment]
EVENTS: Table = DomainEvent.__table__  # type: ignore[assignment]
AUDIT: Table = AuditEvent.__table__  # type: ignore[assignment]

MB = 1024 * 1024
RECENT_READ_SECONDS = 600.0  # a study read (WADO-RS, API) this recently may still be streaming out
MAX_BATCHES = 100_000  # a pass looks at at most this many batches of studies (bounded loop)
MAX_LISTED = 10_000  # decisions a report lists (the rest are counted): a pass over a huge archive stays small
ANALYST_STATES = (ReconState.FLAGGED, ReconState.UNMATCHED, ReconState.QUARANTINED)
ANALYST_ACTIONS = (FindingAction.FLAGGED, FindingAction.REJECTED)


class CleanupReason(StrEnum):
    """Why a study is deleted (the audit row's detail, the dry run's listing)."""

    AGE = "age"  # its last instance arrived longer than max_age_days ago
    WATERMARK = "watermark"  # stored studies above max_storage_mb: oldest first down to low_watermark_mb
    FREE_SPACE = "free-space"  # free disk below min_free_mb


class StudyGone(RadBridgeError, LookupError):
    """The study to delete no longer exists (another engine or pass deleted it)."""


@dataclass
class Decision:
    """One study a pass looked at: deleted (or, dry run, would be) for ``reason``, or kept for ``kept``."""

    study_id: int
    study_uid: str
    last_received_at: datetime
    size_bytes: int
    instances: int
    reason: CleanupReason | None = None
    kept: list[str] = field(default_factory=list)
    deleted: bool = False
    files_deleted: int = 0
    error: str | None = None


@dataclass
class CleanupReport:
    """What one pass did (``radbridge storage cleanup``, the engine's loop, GET /api/storage/cleanup)."""

    started_at: datetime
    dry_run: bool = False
    used_bytes: int = 0  # the stored studies' size (index) before the pass
    free_bytes: int | None = None  # free disk before the pass (None: the storage cannot tell)
    wanted_bytes: int = 0  # what the watermark / free-space rules asked to free
    deleted: int = 0
    bytes_freed: int = 0
    files_deleted: int = 0
    failed: int = 0
    kept: int = 0  # studies the rules named but the safety rule kept
    would_delete: int = 0  # dry run: studies that would be deleted
    seconds: float = 0.0
    decisions: list[Decision] = field(default_factory=list)  # at most MAX_LISTED

    def add(self, d: Decision) -> None:
        if len(self.decisions) < MAX_LISTED:
            self.decisions.append(d)

    def summary(self) -> dict[str, Any]:
        return {"started_at": self.started_at.isoformat(), "dry_run": self.dry_run, "used_bytes": self.used_bytes,
                "free_bytes": self.free_bytes, "wanted_bytes": self.wanted_bytes, "studies_deleted": self.deleted,
                "bytes_freed": self.bytes_freed, "files_deleted": self.files_deleted, "failed": self.failed,
                "studies_kept": self.kept, "would_delete": self.would_delete, "seconds": round(self.seconds, 3)}


# --- the rule -------------------------------------------------------------------------------------

def _study_changed_at(conn: Connection, ids: list[int]) -> dict[int, datetime]:
    """When each study last changed: its last instance arrived, or reconciliation rewrote a file."""
    rows = conn.execute(select(STUDIES.c.id, STUDIES.c.last_received_at).where(STUDIES.c.id.in_(ids)))
    changed = {r.id: r.last_received_at for r in rows}
    revised = conn.execute(select(INSTANCES.c.study_id, func.max(REVISIONS.c.at))
                           .join(REVISIONS, REVISIONS.c.instance_id == INSTANCES.c.id)
                           .where(INSTANCES.c.study_id.in_(ids)).group_by(INSTANCES.c.study_id))
    for study_id, at in revised:
        if at is not None and at > changed.get(study_id, at):
            changed[study_id] = at
    return changed


def _forward_reasons(conn: Connection, ids: list[int], policy: CleanupSettings,
                     changed: dict[int, datetime]) -> dict[int, list[str]]:
    """Per study, why it is not (yet) safely at its forward destinations; ``delete_unforwarded``
    waives all but a pending forward (its sender reads the files)."""
    reasons: dict[int, list[str]] = {i: [] for i in ids}
    fwd = and_(DELIVERIES.c.mapping == FORWARD_MAPPING, DELIVERIES.c.study_id.in_(ids))
    states = conn.execute(select(DELIVERIES.c.study_id, DELIVERIES.c.destination, DELIVERIES.c.state,
                                 func.count()).where(fwd)
                          .group_by(DELIVERIES.c.study_id, DELIVERIES.c.destination, DELIVERIES.c.state))
    has: dict[int, set[str]] = {i: set() for i in ids}
    said: set[tuple[int, str]] = set()  # (study, destination) already named pending or dead
    for study_id, dest, state, n in states:
        has[study_id].add(dest)
        if state == DeliveryState.PENDING:
            reasons[study_id].append(f"forward to {dest} pending ({n})")
            said.add((study_id, dest))
        elif state == DeliveryState.DEAD and not policy.delete_unforwarded:
            reasons[study_id].append(f"forward to {dest} dead-lettered ({n})")
            said.add((study_id, dest))
    if policy.delete_unforwarded:
        return reasons
    # study-level deliveries: delivered, created after the study last changed
    whole: dict[tuple[int, str], datetime] = {}
    for study_id, dest, created in conn.execute(
            select(DELIVERIES.c.study_id, DELIVERIES.c.destination, func.max(DELIVERIES.c.created_at))
            .where(fwd, DELIVERIES.c.instance_id.is_(None), DELIVERIES.c.state == DeliveryState.DELIVERED)
            .group_by(DELIVERIES.c.study_id, DELIVERIES.c.destination)):
        whole[(study_id, dest)] = created
    # instance-level deliveries: every instance covered by a delivered one created after it arrived
    counts: dict[int, int] = {
        study_id: n for study_id, n in conn.execute(select(INSTANCES.c.study_id, func.count())
                                                    .where(INSTANCES.c.study_id.in_(ids)).group_by(INSTANCES.c.study_id))}
    last_rev = (select(INSTANCES.c.study_id.label("study_id"), func.max(REVISIONS.c.at).label("at"))
                .join(REVISIONS, REVISIONS.c.instance_id == INSTANCES.c.id)
                .where(INSTANCES.c.study_id.in_(ids)).group_by(INSTANCES.c.study_id).subquery())
    covered: dict[tuple[int, str], int] = {}
    for study_id, dest, n in conn.execute(
            select(INSTANCES.c.study_id, DELIVERIES.c.destination, func.count(func.distinct(INSTANCES.c.id)))
            .join(DELIVERIES, DELIVERIES.c.instance_id == INSTANCES.c.id)
            .outerjoin(last_rev, last_rev.c.study_id == INSTANCES.c.study_id)
            .where(INSTANCES.c.study_id.in_(ids), DELIVERIES.c.mapping == FORWARD_MAPPING,
                   DELIVERIES.c.state == DeliveryState.DELIVERED, DELIVERIES.c.created_at >= INSTANCES.c.received_at,
                   or_(last_rev.c.at.is_(None), DELIVERIES.c.created_at >= last_rev.c.at))
            .group_by(INSTANCES.c.study_id, DELIVERIES.c.destination)):
        covered[(study_id, dest)] = n
    for study_id in ids:
        required = sorted(set(policy.require_forwarded_to) or has[study_id])
        if not required:
            reasons[study_id].append("not forwarded anywhere")
            continue
        for dest in required:
            at = whole.get((study_id, dest))
            if at is not None and study_id in changed and at >= changed[study_id]:
                continue
            if counts.get(study_id, 0) and covered.get((study_id, dest), 0) >= counts[study_id]:
                continue
            if (study_id, dest) in said:
                continue  # its pending or dead forward is the reason already
            if dest not in has[study_id]:
                reasons[study_id].append(f"not forwarded to {dest}")
            elif at is None and (study_id, dest) in covered:
                reasons[study_id].append(f"{covered[(study_id, dest)]} of {counts.get(study_id, 0)} instance(s) "
                                         f"delivered to {dest} since they last changed")
            elif at is not None:
                reasons[study_id].append(f"changed since its forward to {dest} (a new instance or a rewrite)")
            else:
                reasons[study_id].append(f"not delivered to {dest}")
    return reasons


def kept_reasons(conn: Connection, study_ids: Iterable[int], policy: CleanupSettings, *,
                 now: datetime | None = None) -> dict[int, list[str]]:
    """The "safely elsewhere" rule (module docstring): for each study, why it must be kept; an
    empty list means it may be deleted. Studies that do not exist are left out."""
    ids = sorted(set(study_ids))
    if not ids:
        return {}
    now = now or utcnow()
    rows = list(conn.execute(select(STUDIES.c.id, STUDIES.c.study_uid, STUDIES.c.state, STUDIES.c.recon_state)
                             .where(STUDIES.c.id.in_(ids))))
    ids = [r.id for r in rows]
    reasons: dict[int, list[str]] = {i: [] for i in ids}
    if not ids:
        return reasons
    for r in rows:
        if r.state != StudyState.STABLE:
            reasons[r.id].append(f"{r.state} (not stable)")
        if r.recon_state == ReconState.PENDING:
            reasons[r.id].append("reconciliation pending")
        elif r.recon_state in ANALYST_STATES:
            reasons[r.id].append(f"{r.recon_state}: needs an analyst")
    for study_id in conn.execute(select(QUEUE.c.study_id).where(QUEUE.c.study_id.in_(ids))).scalars():
        reasons[study_id].append("queued for reconciliation")
    for study_id, n in conn.execute(select(FINDINGS.c.study_id, func.count())
                                    .where(FINDINGS.c.study_id.in_(ids), FINDINGS.c.status == FindingStatus.OPEN,
                                           FINDINGS.c.action.in_(ANALYST_ACTIONS))
                                    .group_by(FINDINGS.c.study_id)):
        reasons[study_id].append(f"{n} open finding(s) for an analyst")
    uids = {r.study_uid: r.id for r in rows}
    recent = now - timedelta(seconds=RECENT_READ_SECONDS)
    for uid in conn.execute(select(AUDIT.c.study_uid).distinct()
                            .where(AUDIT.c.at >= recent, AUDIT.c.study_uid.in_(list(uids)),
                                   AUDIT.c.action.in_([str(a) for a in READS]))).scalars():
        reasons[uids[uid]].append(f"read in the last {RECENT_READ_SECONDS / 60:g} minutes (may be being retrieved)")
    changed = _study_changed_at(conn, ids)
    for study_id, why in _forward_reasons(conn, ids, policy, changed).items():
        reasons[study_id].extend(why)
    return reasons


# --- deleting one study ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Deleted:
    """What ``delete_study`` removed from the index: the files to delete once it is committed."""

    study_uid: str
    keys: list[str]
    size_bytes: int


def delete_study(session: Session, study_id: int, policy: CleanupSettings, reason: CleanupReason, actor: Actor, *,
                 now: datetime | None = None) -> Deleted | list[str]:
    """Delete one study's index rows in the caller's transaction (a writer job), after checking the
    rule again under a lock; the reasons to keep it instead (nothing deleted) when it no longer
    qualifies. Raises StudyGone when it is not there."""
    conn = session.connection()
    row = conn.execute(select(STUDIES.c.id, STUDIES.c.study_uid, STUDIES.c.size_bytes, STUDIES.c.patient_id,
                              STUDIES.c.manual_patient_id)
                       .where(STUDIES.c.id == study_id).with_for_update()).first()
    if row is None:
        raise StudyGone(study_id)
    kept = kept_reasons(conn, [study_id], policy, now=now).get(study_id, [])
    if kept:
        return kept
    instance_ids = select(INSTANCES.c.id).where(INSTANCES.c.study_id == study_id).scalar_subquery()
    keys = list(conn.execute(select(INSTANCES.c.storage_key).where(INSTANCES.c.study_id == study_id)).scalars())
    delivery_ids = list(conn.execute(select(DELIVERIES.c.id).where(DELIVERIES.c.study_id == study_id)
                                     .order_by(DELIVERIES.c.id)).scalars())
    conn.execute(update(DELIVERIES).where(DELIVERIES.c.instance_id.in_(instance_ids)).values(instance_id=None))
    conn.execute(update(DELIVERIES).where(DELIVERIES.c.study_id == study_id).values(study_id=None))
    conn.execute(update(EVENTS).where(EVENTS.c.study_id == study_id).values(study_id=None))
    conn.execute(delete(REVISIONS).where(REVISIONS.c.instance_id.in_(instance_ids)))
    conn.execute(delete(FINDINGS).where(FINDINGS.c.study_id == study_id))
    conn.execute(delete(QUEUE).where(QUEUE.c.study_id == study_id))
    conn.execute(delete(INSTANCES).where(INSTANCES.c.study_id == study_id))
    conn.execute(delete(SERIES).where(SERIES.c.study_id == study_id))
    conn.execute(delete(STUDIES).where(STUDIES.c.id == study_id))
    kept_deliveries = f"; deliveries kept: {', '.join(map(str, delivery_ids))}" if delivery_ids else ""
    patients = [p for p in (row.patient_id, row.manual_patient_id) if p]
    record_action(conn, actor, AuditAction.DELETE, Subject(
        "Study", patients, study_uid=row.study_uid, count=len(keys),
        detail=f"storage cleanup ({reason}): {len(keys)} instance(s), {row.size_bytes} bytes{kept_deliveries}"))
    return Deleted(row.study_uid, keys, int(row.size_bytes))


def delete_files(db_reader: Any, storage: ObjectStorage, keys: list[str]) -> int:
    """Delete the files of a committed deletion, except any a new index row points at again (the
    same instance received meanwhile, under the same key); how many were deleted."""
    if not keys:
        return 0
    with db_reader.connect() as conn:
        again = set(conn.execute(select(INSTANCES.c.storage_key).where(INSTANCES.c.storage_key.in_(keys))).scalars())
    done = 0
    for key in keys:
        if key in again:
            continue
        try:
            storage.delete(key)
            done += 1
        except OSError as exc:  # left for `storage check --repair` (an orphan now)
            log.warning("storage cleanup: file %s not deleted: %s", key, type(exc).__name__)
    return done


# --- a pass -----------------------------------------------------------------------------------------

WriteRunner = Callable[[Callable[[Session], T]], T]


def _candidates(conn: Connection, after: tuple[datetime, int] | None, limit: int) -> list[Any]:
    q = select(STUDIES.c.id, STUDIES.c.study_uid, STUDIES.c.last_received_at, STUDIES.c.size_bytes,
               STUDIES.c.num_instances)
    if after is not None:
        at, sid = after
        q = q.where(or_(STUDIES.c.last_received_at > at, and_(STUDIES.c.last_received_at == at, STUDIES.c.id > sid)))
    return list(conn.execute(q.order_by(STUDIES.c.last_received_at, STUDIES.c.id).limit(limit)))


def used_bytes(conn: Connection) -> int:
    """The stored studies' size as the index records it (what the watermarks compare)."""
    return int(conn.execute(select(func.coalesce(func.sum(STUDIES.c.size_bytes), 0))).scalar() or 0)


def run_cleanup(db: Any, storage: ObjectStorage, policy: CleanupSettings, *, write: WriteRunner[Any], actor: Actor,
                dry_run: bool = False, now: datetime | None = None, stop: threading.Event | None = None,
                ) -> CleanupReport:
    """One pass: oldest first (by the last instance's arrival), delete every study the age rule
    names and, while the watermark or free-space rule wants bytes, older ones still; every study
    looked at is a Decision (deleted or kept, and why). ``write`` runs a job in a write transaction
    (the engine's writer, or a plain transaction for the CLI); ``dry_run`` changes nothing."""
    now = now or utcnow()
    t0 = time.perf_counter()
    report = CleanupReport(started_at=now, dry_run=dry_run)
    with db.reader.connect() as conn:
        report.used_bytes = used_bytes(conn)
    report.free_bytes = storage.free_bytes()
    if policy.max_storage_mb > 0 and report.used_bytes > policy.max_storage_mb * MB:
        low = policy.low_watermark_mb or policy.max_storage_mb
        report.wanted_bytes = int(report.used_bytes - low * MB)
    if policy.min_free_mb > 0 and report.free_bytes is not None and report.free_bytes < policy.min_free_mb * MB:
        report.wanted_bytes = max(report.wanted_bytes, int(policy.min_free_mb * MB - report.free_bytes))
    watermark = CleanupReason.WATERMARK if report.wanted_bytes and policy.max_storage_mb > 0 and \
        report.used_bytes > policy.max_storage_mb * MB else CleanupReason.FREE_SPACE
    age_cutoff = now - timedelta(days=policy.max_age_days) if policy.max_age_days > 0 else None
    planned = 0  # bytes deleted, or in a dry run that would be
    after: tuple[datetime, int] | None = None
    for _ in range(MAX_BATCHES):
        if stop is not None and stop.is_set():
            break
        with db.reader.connect() as conn:
            batch = _candidates(conn, after, policy.batch_size)
            if not batch:
                break
            wanted = [r for r in batch if (age_cutoff is not None and r.last_received_at < age_cutoff)
                      or planned < report.wanted_bytes]
            reasons = kept_reasons(conn, [r.id for r in wanted], policy, now=now)
        done = False
        for r in batch:
            if stop is not None and stop.is_set():
                done = True
                break
            old = age_cutoff is not None and r.last_received_at < age_cutoff
            if not old and planned >= report.wanted_bytes:
                done = True  # oldest first: nothing younger is old, and the watermark is met
                break
            d = Decision(r.id, r.study_uid, r.last_received_at, int(r.size_bytes), int(r.num_instances),
                         reason=CleanupReason.AGE if old else watermark, kept=list(reasons.get(r.id, ["gone"])))
            report.add(d)
            if not d.kept:
                if dry_run:
                    report.would_delete += 1
                    planned += d.size_bytes
                    continue
                _delete_one(db, storage, policy, d, write=write, actor=actor, now=now, report=report)
            if d.deleted:
                planned += d.size_bytes
            else:
                report.kept += 1
        if done or len(batch) < policy.batch_size:
            break
        after = (batch[-1].last_received_at, batch[-1].id)
    report.seconds = time.perf_counter() - t0
    if report.deleted:
        log.info("storage cleanup: %d study(ies) deleted, %d bytes freed, %.2fs", report.deleted, report.bytes_freed,
                 report.seconds)
    return report


def _delete_one(db: Any, storage: ObjectStorage, policy: CleanupSettings, d: Decision, *, write: WriteRunner[Any],
                actor: Actor, now: datetime, report: CleanupReport) -> None:
    reason = d.reason or CleanupReason.AGE
    try:
        result = write(lambda s: delete_study(s, d.study_id, policy, reason, actor, now=now))
    except StudyGone:
        d.kept = ["gone (deleted meanwhile)"]
        return
    except Exception as exc:  # one study's failure (a row of another feature referring to it) ends nothing else
        log.warning("storage cleanup: study id %d not deleted: %s", d.study_id, type(exc).__name__)
        d.error = type(exc).__name__
        d.kept = [f"deletion failed ({type(exc).__name__})"]
        report.failed += 1
        return
    if isinstance(result, list):  # changed since it was looked at
        d.kept = result
        return
    d.deleted = True
    d.files_deleted = delete_files(db.reader, storage, result.keys)
    report.deleted += 1
    report.bytes_freed += result.size_bytes
    report.files_deleted += d.files_deleted
