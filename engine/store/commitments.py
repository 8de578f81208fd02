"""Storage Commitment transactions (the ``storage_commitments`` table): what was asked of a DICOM
destination and what its N-EVENT-REPORT answered (docs/dicom.md, "Storage commitment").

The caller records the request (``record_request``) and commits it *before* it sends the N-ACTION:
a destination may send its report at once, on another association, and a report is only taken
for a transaction the store knows. ``record_report`` takes the first report of a known transaction
and ignores any repeat (one conditional UPDATE: two reports racing on two associations are applied
once); ``record_failure`` ends a transaction that will get no report (N-ACTION refused, no report
in time). ``result_of`` and ``outstanding`` read them back.

Every function takes a Connection inside the caller's transaction (in the writer: ``session.connection()``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, Table, insert, select, update

from engine.store.models import StorageCommitment
from engine.store.states import CommitmentState
from engine.store.types import utcnow

log = logging.getLogger(__name__)

COMMITMENTS: Table = StorageCommitment.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class FailedInstance:
    """One instance the destination did not commit, with its Failure Reason (0008,1197), e.g. 0x0112
    no such object instance, 0x0119 class/instance conflict, 0x0110 processing failure."""

    sop_instance_uid: str
    reason: int


@dataclass(frozen=True)
class CommitmentResult:
    """A transaction as the store has it (``result_of``)."""

    transaction_uid: str
    destination: str
    delivery_id: int | None
    study_id: int | None
    state: CommitmentState
    instances: int  # asked for
    committed: int  # committed by the report
    failed: tuple[FailedInstance, ...]
    requested_at: datetime
    answered_at: datetime | None  # when the report was recorded; None: no report (yet)
    answered_by: str | None  # the calling AE title the report came from
    error: str | None

    @property
    def answered(self) -> bool:
        return self.answered_at is not None


def record_request(conn: Connection, transaction_uid: str, *, destination: str, instances: int,
                   delivery_id: int | None = None, study_id: int | None = None) -> None:
    """A new transaction (state requested). Commit it before the N-ACTION goes out. A Transaction UID
    is used once: recording one twice raises the database's IntegrityError."""
    if instances < 1:
        raise ValueError("a storage commitment request names at least one instance")
    conn.execute(insert(COMMITMENTS).values(
        transaction_uid=transaction_uid, destination=destination, delivery_id=delivery_id, study_id=study_id,
        requested_at=utcnow(), state=CommitmentState.REQUESTED, instances=instances, committed=0))


def record_report(conn: Connection, transaction_uid: str, committed_uids: Sequence[str],
                  failed: Iterable[tuple[str, int]], peer_ae: str) -> bool:
    """The N-EVENT-REPORT of ``transaction_uid``: the instances it commits and those it lists as failed
    (SOP Instance UID, Failure Reason), from calling AE title ``peer_ae``. Returns whether the transaction
    is known: False means nothing was stored (answer the report with an error status).

    Only a transaction's first report is recorded; a repeat (the destination sending it again, or one
    racing on another association) is known but changes nothing. A transaction already failed by
    ``record_failure`` (no report in time) still takes its first report: it is what the destination says.
    committed when nothing failed and every instance asked for is committed; failed otherwise."""
    failures = [{"sop_instance_uid": uid, "reason": int(reason)} for uid, reason in failed]
    committed = len(set(committed_uids))
    row = conn.execute(select(COMMITMENTS.c.instances, COMMITMENTS.c.answered_at)
                       .where(COMMITMENTS.c.transaction_uid == transaction_uid)).first()
    if row is None:
        return False
    if row.answered_at is not None:
        log.info("storage commitment %s: repeated report from %s ignored (the first, of %s, is kept)",
                 transaction_uid, peer_ae, row.answered_at.isoformat(timespec="seconds"))
        return True
    error = None
    accounted = committed + len({f["sop_instance_uid"] for f in failures})
    if accounted != row.instances:
        error = f"the report accounts for {accounted} of the {row.instances} instances asked for"
    state = CommitmentState.COMMITTED if not failures and error is None else CommitmentState.FAILED
    # answered_at IS NULL again: of two reports racing, the second finds the row answered and stores nothing
    done = conn.execute(update(COMMITMENTS).where(COMMITMENTS.c.transaction_uid == transaction_uid,
                                                  COMMITMENTS.c.answered_at.is_(None))
                        .values(state=state, committed=committed, failed=failures or None, answered_at=utcnow(),
                                answered_by=peer_ae[:16], error=error)).rowcount
    if not done:
        log.info("storage commitment %s: repeated report from %s ignored", transaction_uid, peer_ae)
    return True


def record_failure(conn: Connection, transaction_uid: str, error: str) -> bool:
    """End a transaction still waiting for its report (state requested -> failed, with ``error``): the
    N-ACTION was refused, or no report came in time. False when it is not waiting (unknown, or already
    answered or failed). A report arriving later is still recorded (``record_report``)."""
    return bool(conn.execute(update(COMMITMENTS).where(COMMITMENTS.c.transaction_uid == transaction_uid,
                                                       COMMITMENTS.c.state == CommitmentState.REQUESTED)
                             .values(state=CommitmentState.FAILED, error=error[:1000])).rowcount)


def _result(row: Row[Any]) -> CommitmentResult:
    failed = tuple(FailedInstance(str(f["sop_instance_uid"]), int(f["reason"])) for f in row.failed or [])
    return CommitmentResult(
        transaction_uid=row.transaction_uid, destination=row.destination, delivery_id=row.delivery_id,
        study_id=row.study_id, state=CommitmentState(row.state), instances=row.instances, committed=row.committed,
        failed=failed, requested_at=row.requested_at, answered_at=row.answered_at, answered_by=row.answered_by,
        error=row.error)


def result_of(conn: Connection, transaction_uid: str) -> CommitmentResult | None:
    """The transaction as stored, or None when there is no such transaction."""
    row = conn.execute(select(COMMITMENTS).where(COMMITMENTS.c.transaction_uid == transaction_uid)).first()
    return _result(row) if row is not None else None


def outstanding(conn: Connection, *, requested_before: datetime | None = None,
                destination: str | None = None, limit: int = 1000) -> list[CommitmentResult]:
    """Transactions still waiting for their report (state requested), oldest first; only those
    requested before ``requested_before`` / for ``destination`` when given."""
    stmt = select(COMMITMENTS).where(COMMITMENTS.c.state == CommitmentState.REQUESTED)
    if requested_before is not None:
        stmt = stmt.where(COMMITMENTS.c.requested_at < requested_before)
    if destination is not None:
        stmt = stmt.where(COMMITMENTS.c.destination == destination)
    return [_result(r) for r in conn.execute(stmt.order_by(COMMITMENTS.c.requested_at).limit(limit))]
