"""Reconcile one study: match it, compare, coerce / flag / quarantine, record why, move the order.

    lease a queued study (queue.py)
    read it and match it to an order and patient (matching.py) on a read connection
    receiving?  only "images received" moves the order (IP); the rest waits for stability
    compare the headers with the authority (compare.py), per the channel's policy:
      coerce      rewrite the files that differ (coerce.py), in batches, each batch's index
                  update committed before the old files are deleted
      flag        keep the files; the differences are open findings
      reject      keep the files, quarantine the study (hidden from query/retrieve)
    one transaction: links, state, index columns, findings, order status, queue row, and the
                  domain events published on the bus (study.reconciled ... and a report.received
                  per report), whose subscribers (the outbox) write in it too

Runs in a worker thread; writes go through ``tx`` (the engine's writer, or a plain session for the
CLI). A run that fails is retried with backoff; a run overtaken by a newer trigger runs again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypedDict, TypeVar

from sqlalchemy import Connection, select, update
from sqlalchemy.orm import Session

from engine.channels import Channel, DicomOptions
from engine.dicom.headers import text_value
from engine.domain.events import (
    Event,
    EventBus,
    OrderStatusAdvanced,
    ReconcileOutcome,
    ReportReceived,
    StudyCorrected,
    StudyQuarantined,
    StudyReconciled,
    StudyUnmatched,
    Subscriber,
)
from engine.domain.orders import advance_for_images
from engine.domain.records import add, all_as, first_as, update_row
from engine.domain.rows import StudyRow
from engine.domain.studies import (
    FINDINGS,
    INSTANCES,
    REVISIONS,
    SERIES,
    STUDIES,
    STUDY_ATTRS,
    clip,
    report_instances,
)
from engine.reconciliation import queue
from engine.reconciliation.coerce import Rewritten, Target, rewrite_instance
from engine.reconciliation.compare import FindingData, authoritative, differences
from engine.reconciliation.matching import Match, match_study
from engine.reconciliation.rules import ReconciliationRules, default_rules
from engine.storage.base import ObjectStorage
from engine.store import leases as work_leases
from engine.store.db import Database
from engine.store.states import FindingAction, FindingStatus, ReconState, StudyState
from engine.store.types import utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")

OK_STATES = (ReconState.RECONCILED, ReconState.FLAGGED)  # placed: outbound acts on them
OUTCOMES: dict[str, type[ReconcileOutcome]] = {  # the event a run raises
    "study.reconciled": StudyReconciled, "study.corrected": StudyCorrected, "study.unmatched": StudyUnmatched,
    "study.quarantined": StudyQuarantined}
EXCEPTION_STATES = (ReconState.UNMATCHED, ReconState.FLAGGED, ReconState.QUARANTINED)  # need an analyst's look
BATCH = 100
R = TypeVar("R", bound=Mapping[str, Any])


class _StoredFile(TypedDict):
    """What coercion reads of an instance (one page of the index at a time)."""

    id: int
    sop_instance_uid: str
    storage_key: str
    sha256: str
    size_bytes: int
    calling_aet: str | None
    series_id: int


class TxRunner(Protocol):
    def run_sync(self, work: Callable[[Session], T], timeout: float | None = ...) -> T: ...


class SessionRunner:
    """Each job in its own write transaction (CLI commands, tools)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def run_sync(self, work: Callable[[Session], T], timeout: float | None = None) -> T:
        with self.db.write_session() as s, s.begin():
            return work(s)


@dataclass
class Result:
    study_id: int
    study_uid: str = ""
    state: str = ""
    matched_by: str | None = None
    order_id: int | None = None
    patient_id: int | None = None
    coerced: int = 0
    checked: int = 0
    findings: list[str] = field(default_factory=list)
    event: str | None = None
    again: bool = False


class Reconciler:
    def __init__(self, db: Database, tx: TxRunner, storage: ObjectStorage | None, *,
                 channels: dict[str, Channel], rules: Callable[[str], ReconciliationRules | None],
                 modifying_system: str = "RADBRIDGE", tmp_dir: Path | None = None, fsync: bool = True,
                 on_result: Callable[[Result], None] | None = None, bus: EventBus | None = None,
                 outbox: Subscriber | None = None, lease_seconds: float = work_leases.LEASE_SECONDS) -> None:
        """``bus``: where the runs' events are published (the engine's, with the outbox subscribed);
        without one, a bus of its own, to which ``outbox`` (tools: radbridge studies reconcile)
        subscribes."""
        self.db = db
        self.tx = tx
        self.storage = storage
        self.channels = channels
        self.rules_by_name = rules
        self.modifying_system = modifying_system
        self.tmp_dir = tmp_dir
        self.fsync = fsync
        self.on_result = on_result
        self.bus = bus if bus is not None else EventBus()
        if outbox is not None:
            outbox.subscribe(self.bus)
        self.worker = str(work_leases.this_process())  # who holds the leases
        self.lease_seconds = lease_seconds
        self.stopping = False

    # --- configuration ---------------------------------------------------------------------------
    def policy_for(self, channel: str | None) -> tuple[str, ReconciliationRules]:
        ch = self.channels.get(channel or "")
        if ch is None or ch.connector != "dicom":  # channel renamed or removed: the first DICOM one
            ch = next((c for c in self.channels.values() if c.connector == "dicom"), None)
        opts = ch.dicom if ch is not None else DicomOptions()
        rules = self.rules_by_name(opts.reconciliation_rules) if opts.reconciliation_rules else None
        return opts.reconciliation, rules or default_rules()

    # --- the queue --------------------------------------------------------------------------------
    def run_pending(self, max_jobs: int = 200) -> int:
        """Work the queue until it is empty (or ``max_jobs``); returns how many runs were made."""
        done = 0
        while done < max_jobs and not self.stopping:
            leases = self.tx.run_sync(lambda s: queue.lease(s.connection(), self.worker, limit=10,
                                                            seconds=self.lease_seconds))
            if not leases:
                break
            ids = [j.job_id for j in leases]

            def renew(ids: list[int] = ids) -> int:
                return self.tx.run_sync(lambda s: work_leases.renew(s.connection(), queue.QUEUE, ids, self.worker,
                                                                    self.lease_seconds))
            # short leases, renewed while this batch is worked (a study's coercion may take long)
            with work_leases.Renewing(renew, self.lease_seconds / 3, "reconciliations"):
                for i, job in enumerate(leases):
                    if self.stopping:
                        self.tx.run_sync(lambda s, rest=leases[i:]: queue.release(s.connection(), rest, self.worker))
                        break
                    self.process(job)
                    done += 1
        return done

    def process(self, job: queue.Lease) -> Result | None:
        try:
            result = self.reconcile(job)
        except Exception as exc:
            log.exception("reconciling study %s failed; will retry", job.study_id)
            error = f"{type(exc).__name__}: {exc}"
            try:
                self.tx.run_sync(lambda s: queue.fail(s.connection(), job, error))
            except Exception:
                log.exception("could not record the failure of study %s", job.study_id)
            return None
        if self.on_result is not None:
            self.on_result(result)
        return result

    # --- one study --------------------------------------------------------------------------------
    def _read(self, fn: Callable[[Connection], T]) -> T:
        with self.db.reader.connect() as conn:
            return fn(conn)

    def _rows(self, stmt: Any, row_type: type[R]) -> list[R]:
        """The rows of ``stmt``, which selects the columns of ``row_type``."""
        with self.db.reader.connect() as conn:
            return all_as(conn, stmt, row_type)

    def reconcile(self, job: queue.Lease) -> Result:
        started = utcnow()
        study = self._read(lambda c: _study(c, job.study_id))
        res = Result(job.study_id)
        if study is None:
            self.tx.run_sync(lambda s: queue.finish(s.connection(), job))
            return res
        res.study_uid = study["study_uid"]
        policy, rules = self.policy_for(study["channel"])
        if policy == "off":
            self.tx.run_sync(lambda s: queue.finish(s.connection(), job))
            res.state = study["recon_state"]
            return res
        m = self._read(lambda c: match_study(c, study, rules))
        res.matched_by, res.order_id, res.patient_id = m.matched_by, m.order_id, m.patient_id
        if study["state"] == StudyState.RECEIVING:
            # still arriving: tell the RIS images came (IP); coercion and findings wait for stability
            res.again = self.tx.run_sync(lambda s: self._images_received(s.connection(), study, m, rules, job))
            res.state = study["recon_state"]
            return res
        received = self._received(study, rules)
        diffs = differences(rules, m.authority, received) if m.matched_by and not m.exception else {}
        findings = _findings(m, diffs, rules, policy)
        coerced = 0
        if policy == "coerce" and m.matched_by and not m.exception and self.storage is not None:
            reason = "COERCE" if study["times_reconciled"] == 0 else "CORRECT"
            values = [(r, v) for r in rules.attributes if (v := authoritative(r, m.authority)) is not None]
            target = Target(values, rules.names, reason, self.modifying_system)
            # files already verified against this authority need no second look: only those received
            # since (a study that grew). Anything else (first run, a difference in the index, a study
            # that was unmatched, flagged or quarantined before) checks every file.
            verified = study["recon_state"] == ReconState.RECONCILED and study["times_reconciled"] > 0 and not diffs
            since = study["reconciled_at"] if verified else None
            res.checked, coerced = self._coerce(study, target, since)
        res.coerced = coerced
        res.findings = [f.describe() for f in findings]
        # the index follows the coerced headers (C-FIND answers with them)
        changes = {STUDY_ATTRS[kw]: clip(STUDY_ATTRS[kw], expected) for kw, (_got, expected) in diffs.items()
                   if kw in STUDY_ATTRS} if policy == "coerce" else {}

        def finish(s: Session) -> tuple[str, str | None, bool]:
            conn = s.connection()
            return self._finish(conn, study, m, rules, policy, findings, changes, coerced, started, job)
        res.state, res.event, res.again = self.tx.run_sync(finish)
        return res

    def _received(self, study: StudyRow, rules: ReconciliationRules) -> dict[str, str | None]:
        """Header values: the index's where it keeps them, else the first stored instance's."""
        out: dict[str, str | None] = {}
        columns: Mapping[str, Any] = study  # by the column a rule's keyword is indexed in
        missing = []
        for rule in rules.attributes:
            col = STUDY_ATTRS.get(rule.keyword)
            if col:
                out[rule.keyword] = columns.get(col)
            else:
                missing.append(rule.keyword)
        if missing and self.storage is not None:
            key = self._read(lambda c: c.execute(select(INSTANCES.c.storage_key).where(
                INSTANCES.c.study_id == study["id"]).order_by(INSTANCES.c.id).limit(1)).scalar())
            if key:
                from pydicom import dcmread
                with self.storage.open(key) as f:
                    ds = dcmread(f, stop_before_pixels=True, specific_tags=missing)
                for kw in missing:
                    out[kw] = text_value(ds.get(kw))
        return out

    def _images_received(self, conn: Connection, study: StudyRow, m: Match, rules: ReconciliationRules,
                         job: queue.Lease) -> bool:
        events: list[Event] = []
        if m.order_id is not None and m.matched_by in ("accession", "manual"):
            self._order_status(conn, m.order_id, rules.order_status.images_received,
                               f"images received: study {study['study_uid']}", study["id"], events)
        self.bus.publish_all(conn, events)
        return queue.finish(conn, job)

    @staticmethod
    def _order_status(conn: Connection, order_id: int, target: str, note: str, study_id: int,
                      events: list[Event]) -> None:
        moved = advance_for_images(conn, order_id, target, note)
        if moved:
            events.append(OrderStatusAdvanced(order_id=order_id, study_id=study_id, from_status=moved[0],
                                              status=moved[1], note=note))

    # --- coercion --------------------------------------------------------------------------------
    def _coerce(self, study: StudyRow, target: Target, since: datetime | None) -> tuple[int, int]:
        """Rewrite the files that differ, a batch at a time; (files checked, files rewritten)."""
        assert self.storage is not None
        stmt = (select(INSTANCES.c.id, INSTANCES.c.sop_instance_uid, INSTANCES.c.storage_key, INSTANCES.c.sha256,
                       INSTANCES.c.size_bytes, INSTANCES.c.calling_aet, INSTANCES.c.series_id)
                .where(INSTANCES.c.study_id == study["id"]).order_by(INSTANCES.c.id).limit(BATCH))
        if since is not None:
            stmt = stmt.where(INSTANCES.c.received_at >= since)
        series = dict(self._read(lambda c: list(c.execute(select(SERIES.c.id, SERIES.c.series_uid)
                                                          .where(SERIES.c.study_id == study["id"])))))
        checked = done = 0
        last_id = 0
        # a page of the index at a time, so memory does not grow with the study; bounded by the
        # instances the study holds now (more may arrive meanwhile: their stability runs again)
        for _page in range(study["num_instances"] // BATCH + 2):
            if self.stopping:
                raise InterruptedError("engine stopping; the study will be reconciled again")
            page = self._rows(stmt.where(INSTANCES.c.id > last_id), _StoredFile)
            if not page:
                break
            last_id = page[-1]["id"]
            checked += len(page)
            batch: list[tuple[_StoredFile, Rewritten]] = []
            for inst in page:
                rewritten = rewrite_instance(
                    self.storage, inst["storage_key"], target, study_uid=study["study_uid"],
                    series_uid=series.get(inst["series_id"], "unknown"), sop_instance_uid=inst["sop_instance_uid"],
                    source=inst["calling_aet"], tmp_dir=self.tmp_dir, fsync=self.fsync)
                if rewritten is not None:
                    batch.append((inst, rewritten))
            if batch:
                done += self._commit_batch(study["id"], batch, target.reason)
        return checked, done

    def _commit_batch(self, study_id: int, batch: list[tuple[_StoredFile, Rewritten]], reason: str) -> int:
        """Point the index at the new files (unless an instance changed meanwhile) and record the
        revisions in one transaction; then delete the files no longer referenced."""
        assert self.storage is not None

        def work(s: Session) -> list[bool]:
            conn = s.connection()
            kept, delta = [], 0
            for inst, rw in batch:
                moved = conn.execute(update(INSTANCES).where(INSTANCES.c.id == inst["id"],
                                                             INSTANCES.c.sha256 == inst["sha256"])
                                     .values(storage_key=rw.stored.key, sha256=rw.stored.sha256,
                                             size_bytes=rw.stored.size)).rowcount == 1
                kept.append(moved)
                if moved:  # else the instance was replaced meanwhile (overwrite): ours is stale
                    add(conn, REVISIONS, instance_id=inst["id"], reason=reason, old_key=inst["storage_key"],
                        old_sha256=inst["sha256"], old_size=inst["size_bytes"], new_key=rw.stored.key,
                        new_sha256=rw.stored.sha256, new_size=rw.stored.size, changes=rw.changes)
                    delta += rw.stored.size - inst["size_bytes"]
            if delta:
                conn.execute(update(STUDIES).where(STUDIES.c.id == study_id)
                             .values(size_bytes=STUDIES.c.size_bytes + delta))
            return kept
        try:
            kept = self.tx.run_sync(work)
        except BaseException:
            for _inst, rw in batch:
                self.storage.delete(rw.stored.key)
            raise
        for (inst, rw), ok in zip(batch, kept, strict=True):
            self.storage.delete(inst["storage_key"] if ok else rw.stored.key)
        return sum(kept)

    # --- the closing transaction -----------------------------------------------------------------
    def _finish(self, conn: Connection, study: StudyRow, m: Match, rules: ReconciliationRules, policy: str,
                findings: list[FindingData], changes: dict[str, str],
                coerced: int, started: datetime,
                job: queue.Lease) -> tuple[str, str | None, bool]:
        current = _study(conn, study["id"])
        if current is None:
            queue.finish(conn, job)
            return "", None, False
        open_rows: dict[tuple[Any, ...], int] = {}
        accepted: set[tuple[Any, ...]] = set()
        for r in conn.execute(select(FINDINGS.c.id, FINDINGS.c.status, FINDINGS.c.kind, FINDINGS.c.attribute,
                                     FINDINGS.c.received, FINDINGS.c.expected)
                              .where(FINDINGS.c.study_id == study["id"], FINDINGS.c.status != FindingStatus.RESOLVED)):
            key = (r.kind, r.attribute, r.received, r.expected)
            if r.status == FindingStatus.ACCEPTED:
                accepted.add(key)
            else:
                open_rows[key] = r.id
        findings = [f for f in findings if f.key() not in accepted]  # an analyst said these are fine
        state = _state(m, findings, policy)
        links_changed = (current["patient_id"], current["order_id"]) != (m.patient_id, m.order_id)
        update_row(conn, STUDIES, study["id"], patient_id=m.patient_id, order_id=m.order_id,
                   matched_by=m.matched_by, recon_state=state, reconciled_at=started,
                   times_reconciled=current["times_reconciled"] + 1, **changes)
        ids = _sync_findings(conn, study["id"], findings, open_rows)
        events: list[Event] = []
        if m.order_id is not None and state in OK_STATES and m.matched_by in ("accession", "manual"):
            self._order_status(conn, m.order_id, rules.order_status.images_received,
                               f"images received: study {study['study_uid']}", study["id"], events)
            if current["state"] == StudyState.STABLE:
                self._order_status(conn, m.order_id, rules.order_status.study_stable,
                                   f"study {study['study_uid']} stable: {current['num_instances']} instance(s)",
                                   study["id"], events)
        prev = current["recon_state"]
        kind: str | None = None
        if state in OK_STATES:
            # "stable" stays among the row's reasons when a trigger came while this run was in
            # flight (another worker reconciled a sibling study, an ADT) and the study goes again:
            # that run answers the trigger, not a new stability, so it is no second study.reconciled
            stability_handled = current["reconciled_at"] is not None and current["stable_at"] is not None \
                and current["reconciled_at"] >= current["stable_at"]
            if prev not in OK_STATES or ("stable" in job.reasons and not stability_handled):
                kind = "study.reconciled"
            elif coerced or links_changed or changes:
                kind = "study.corrected"
        elif state != prev:
            kind = f"study.{state}"
        if kind:
            events.append(OUTCOMES[kind](
                study_id=study["id"], patient_id=m.patient_id, order_id=m.order_id, study_uid=study["study_uid"],
                state=state, matched_by=m.matched_by, policy=policy, rules=rules.name,
                accession=m.authority.order.get("accession") if m.authority.order else None,
                coerced_instances=coerced, changes=dict(changes), findings=tuple(ids), reasons=tuple(job.reasons)))
            if kind in ("study.reconciled", "study.corrected"):  # placed: its reports go out with it
                events.extend(ReportReceived(study_id=study["id"], instance_id=iid, patient_id=m.patient_id,
                                             order_id=m.order_id, sop_class_uid=cls)
                              for iid, cls in report_instances(conn, study["id"]))
        self.bus.publish_all(conn, events)
        return state, kind, queue.finish(conn, job)


def _study(conn: Connection, study_id: int) -> StudyRow | None:
    return first_as(conn, select(STUDIES).where(STUDIES.c.id == study_id), StudyRow)


def _findings(m: Match, diffs: dict[str, tuple[str | None, str]], rules: ReconciliationRules,
              policy: str) -> list[FindingData]:
    """The match's findings and one ``mismatch`` per differing attribute, each with what the policy
    does about it."""
    severity = {r.keyword: r.severity for r in rules.attributes}
    out = []
    for f in m.findings:
        f.action = FindingAction.FLAGGED if f.severity != "info" else FindingAction.NOTED
        out.append(f)
    for kw, (got, expected) in diffs.items():
        action = {"coerce": FindingAction.COERCED, "flag": FindingAction.FLAGGED, "reject": FindingAction.REJECTED}[policy]
        if action != FindingAction.COERCED and severity[kw] == "info":
            action = FindingAction.NOTED
        out.append(FindingData("mismatch", severity[kw], kw, got, expected, {"policy": policy}, action))
    return out


def _state(m: Match, findings: list[FindingData], policy: str) -> str:
    if m.matched_by is None or m.exception:
        return ReconState.UNMATCHED
    serious = [f for f in findings if f.severity != "info" and f.action != FindingAction.COERCED]
    if policy == "reject" and any(f.kind == "mismatch" for f in serious):
        return ReconState.QUARANTINED
    return ReconState.FLAGGED if serious else ReconState.RECONCILED


def _sync_findings(conn: Connection, study_id: int, findings: list[FindingData],
                   open_rows: dict[tuple[Any, ...], int]) -> list[int]:
    """Keep open findings that are still true, resolve those that are not, add the new ones.
    Coerced differences are recorded already resolved: the history of what was rewritten.
    ``open_rows``: the study's open findings by key, as the caller read them."""
    now = utcnow()
    wanted = {f.key() for f in findings if f.action != FindingAction.COERCED}
    for key, fid in open_rows.items():
        if key not in wanted:
            conn.execute(update(FINDINGS).where(FINDINGS.c.id == fid).values(
                status=FindingStatus.RESOLVED, resolved_at=now, resolution="no longer found on reconciliation"))
    ids = []
    for f in findings:
        if f.action != FindingAction.COERCED and f.key() in open_rows:
            ids.append(open_rows[f.key()])
            continue
        ids.append(add(conn, FINDINGS, study_id=study_id, at=now, kind=f.kind, severity=f.severity,
                       attribute=f.attribute, received=f.received, expected=f.expected, action=f.action,
                       status=FindingStatus.RESOLVED if f.action == FindingAction.COERCED else FindingStatus.OPEN,
                       resolved_at=now if f.action == FindingAction.COERCED else None,
                       resolution="headers coerced" if f.action == FindingAction.COERCED else None, detail=f.detail or None))
    return ids
