"""Retention: prune old message content, then old message rows, in small batches.

Established engines grow their message store without bound, and their pruners take long locks that
deadlock or stall ingest. Here every batch is one short transaction over at most ``batch_size``
rows picked by primary key (oldest first), with a pause between batches, so the ingest writer waits
at most one batch. Messages in error are kept while ``keep_errors`` is set: someone has to look at
them first.

The audit trail has its own, longer setting (``audit_days``, six years by default): this is the one
place that deletes its rows (tests/test_audit_trail.py holds every other code path to that).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Select, delete, select, update

from engine.config import RetentionSettings
from engine.store.db import Database
from engine.store.models import AuditEvent, Message, MessageContent
from engine.store.types import utcnow

log = logging.getLogger(__name__)
KEPT_STATUSES = ("error", "rejected")
MAX_BATCHES_PER_RUN = 10_000


@dataclass
class PruneReport:
    content: int = 0
    messages: int = 0
    audit_events: int = 0
    batches: int = 0
    seconds: float = 0.0


def _batch_ids(db: Database, stmt: Select[int]) -> list[int]:
    with db.read_session() as s:
        return list(s.execute(stmt).scalars())


def prune(db: Database, policy: RetentionSettings, *, stop: threading.Event | None = None) -> PruneReport:
    """One pruning pass; ``stop`` may be a threading.Event to end early (at a batch boundary)."""
    report = PruneReport()
    t0 = time.perf_counter()
    now = utcnow()

    def stopped() -> bool:
        return stop is not None and stop.is_set()

    # Each pass pages by id (keyset): a batch starts where the last one ended instead of scanning
    # past everything already pruned.
    content_cutoff = now - timedelta(days=policy.content_days)
    after = 0
    for _ in range(MAX_BATCHES_PER_RUN):
        if stopped():
            break
        q = select(Message.id).where(Message.id > after, Message.received_at < content_cutoff,
                                     Message.content_pruned.is_(False))
        if policy.keep_errors:
            q = q.where(Message.status.not_in(KEPT_STATUSES))
        ids = _batch_ids(db, q.order_by(Message.id).limit(policy.batch_size))
        if not ids:
            break
        with db.write_session() as s, s.begin():
            s.execute(delete(MessageContent).where(MessageContent.message_id.in_(ids)))
            s.execute(update(Message).where(Message.id.in_(ids)).values(content_pruned=True))
        after = ids[-1]
        report.content += len(ids)
        report.batches += 1
        if len(ids) < policy.batch_size:
            break
        time.sleep(policy.pause_seconds)

    meta_cutoff = now - timedelta(days=policy.metadata_days)
    after = 0
    for _ in range(MAX_BATCHES_PER_RUN):
        if stopped():
            break
        q = select(Message.id).where(Message.id > after, Message.received_at < meta_cutoff)
        if policy.keep_errors:
            q = q.where(Message.status.not_in(KEPT_STATUSES))
        ids = _batch_ids(db, q.order_by(Message.id).limit(policy.batch_size))
        if not ids:
            break
        with db.write_session() as s, s.begin():
            s.execute(update(Message).where(Message.duplicate_of.in_(ids)).values(duplicate_of=None))
            s.execute(delete(Message).where(Message.id.in_(ids)))
        after = ids[-1]
        report.messages += len(ids)
        report.batches += 1
        if len(ids) < policy.batch_size:
            break
        time.sleep(policy.pause_seconds)
    audit_cutoff = now - timedelta(days=max(policy.audit_days, policy.metadata_days))
    for _ in range(MAX_BATCHES_PER_RUN):
        if stopped():
            break
        ids = _batch_ids(db, select(AuditEvent.id).where(AuditEvent.at < audit_cutoff)
                         .order_by(AuditEvent.id).limit(policy.batch_size))
        if not ids:
            break
        with db.write_session() as s, s.begin():
            s.execute(delete(AuditEvent).where(AuditEvent.id.in_(ids)))
        report.audit_events += len(ids)
        report.batches += 1
        if len(ids) < policy.batch_size:
            break
        time.sleep(policy.pause_seconds)
    report.seconds = time.perf_counter() - t0
    if report.audit_events:
        log.info("retention: deleted %d audit row(s) older than %g days", report.audit_events,
                 max(policy.audit_days, policy.metadata_days))
    if report.content or report.messages:
        log.info("retention: pruned content of %d message(s), %d message row(s) in %d batch(es), %.2fs",
                 report.content, report.messages, report.batches, report.seconds)
    return report
