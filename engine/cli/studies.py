"""``radbridge studies``: list exceptions, show a study's reconciliation, match it by hand.

match / reconcile / accept write their request (and a domain event) to the store, then do the
reconciliation right here, as one more worker on the queue; a running engine would do the same
within a second. ``--no-wait`` leaves it to the engine.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import selectinload

if TYPE_CHECKING:
    from engine.config import Settings
    from engine.reconciliation.reconciler import Reconciler, Result
    from engine.store.db import Database


def add_parser(sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    st = sub.add_parser("studies", help="studies and their reconciliation").add_subparsers(dest="action",
                                                                                           required=True)
    p = with_config(st.add_parser("list", help="studies, newest first (--exceptions: those needing a look)"))
    p.add_argument("--exceptions", action="store_true", help="unmatched, flagged and quarantined studies only")
    p.add_argument("--state", help="reconciliation state: pending, reconciled, flagged, unmatched, quarantined")
    p.add_argument("--limit", type=int, default=50)
    p = with_config(st.add_parser("show", help="one study with its findings, links and events"))
    p.add_argument("study", help="Study Instance UID or index id")
    p = with_config(st.add_parser("match", help="match a study to an order or a patient by hand, then reconcile"))
    p.add_argument("study", help="Study Instance UID or index id")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--order", metavar="ACCESSION", help="the order's accession number")
    which.add_argument("--patient", metavar="ID^ISSUER", help="the patient's identifier and issuer")
    which.add_argument("--clear", action="store_true", help="drop the manual match: match from the headers again")
    p.add_argument("--note", help="why (kept with the decision)")
    p.add_argument("--no-wait", action="store_true", help="only queue it for the running engine")
    p = with_config(st.add_parser("reconcile", help="reconcile a study again (after a rules or policy change)"))
    p.add_argument("study", help="Study Instance UID or index id")
    p.add_argument("--no-wait", action="store_true", help="only queue it for the running engine")
    p = with_config(st.add_parser("accept", help="accept a finding as it is: it no longer flags its study"))
    p.add_argument("finding", type=int, help="finding id (see studies show)")
    p.add_argument("--note", help="why (kept with the decision)")
    p.add_argument("--no-wait", action="store_true", help="only queue it for the running engine")
    for parser in st.choices.values():
        parser.set_defaults(fn=cmd_studies)


def cmd_studies(args: argparse.Namespace) -> int:
    from engine.cli.common import open_db, settings_of
    settings = settings_of(args)
    db = open_db(settings)
    try:
        if args.action == "list":
            return _list(db, args)
        if args.action == "show":
            return _show(db, args.study)
        from engine.reconciliation import manual
        from engine.store.audit import AuditAction, cli_actor, finding_subject, record_action, study_subject
        actor = cli_actor()
        action = {"match": AuditAction.UNMATCH if args.action == "match" and args.clear else AuditAction.MATCH,
                  "reconcile": AuditAction.RECONCILE, "accept": AuditAction.ACCEPT}[args.action]
        command = f"radbridge studies {args.action}" + (" --clear" if action == AuditAction.UNMATCH else "")

        def about(conn: Any) -> Any:
            found = finding_subject(conn, args.finding) if args.action == "accept" else study_subject(conn, args.study)
            if action == AuditAction.MATCH:
                found.detail = f"accession {args.order}" if args.order else f"patient {args.patient}"
            return found
        try:
            with db.write_session() as s, s.begin():
                conn = s.connection()
                if action == AuditAction.UNMATCH:
                    out = manual.clear_match(conn, args.study, by=actor.name, note=args.note)
                elif action == AuditAction.MATCH:
                    out = manual.match(conn, args.study, accession=args.order, patient=args.patient, by=actor.name,
                                       note=args.note)
                elif action == AuditAction.RECONCILE:
                    out = manual.request(conn, args.study, by=actor.name)
                else:
                    manual.accept_finding(conn, args.finding, by=actor.name, note=args.note)
                    out = {}
                record_action(conn, actor, action, about(conn), query=command)
        except manual.ManualError as exc:
            with db.write_session() as s, s.begin():  # the refusal is in the trail too
                record_action(s.connection(), actor, action, about(s.connection()), status=exc.status, query=command)
            print(f"radbridge studies {args.action}: {exc}", file=sys.stderr)
            return 1
        if args.no_wait:
            print("queued; the running engine reconciles it")
            return 0
        _work_queue(db, settings)
        if "study_uid" in out:
            return _show(db, out["study_uid"])
        return 0
    finally:
        db.dispose()


def _work_queue(db: Any, settings: Any) -> None:
    reconciler_for_tools(db, settings).run_pending()


def reconciler_for_tools(db: Database, settings: Settings,
                         on_result: Callable[[Result], None] | None = None) -> Reconciler:
    """The reconciler as `radbridge studies reconcile` runs it outside the engine (also used by
    bench/reconcile_coerce.py): each study in its own transaction; the deliveries a run owes the EHR
    are queued in the outbox, and the running engine sends them."""
    from engine.outbound.worker import build_outbox
    from engine.reconciliation.reconciler import Reconciler, SessionRunner
    from engine.reconciliation.rules import ReconciliationRules
    from engine.runtime import load_definitions
    from engine.storage.local import LocalStorage
    registry, channels, _problems = load_definitions(settings)
    storage = LocalStorage(Path(settings.storage.dir) / "studies", fsync=settings.dicom.fsync)
    tmp = Path(settings.storage.dir) / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return Reconciler(db, SessionRunner(db), storage, channels={c.name: c for c in channels},
                      rules=lambda name: registry.get_as(name, ReconciliationRules),
                      modifying_system=settings.dicom.aet, tmp_dir=tmp, fsync=settings.dicom.fsync,
                      on_result=on_result, outbox=build_outbox(settings, registry, channels),
                      lease_seconds=settings.database.lease_seconds)


def _list(db: Any, args: argparse.Namespace) -> int:
    from engine.reconciliation.reconciler import EXCEPTION_STATES
    from engine.store.models import Study
    from engine.store.states import FindingStatus
    with db.read_session() as s:
        stmt = select(Study).options(selectinload(Study.findings)).order_by(Study.id.desc()).limit(args.limit)
        if args.exceptions:
            stmt = stmt.where(Study.recon_state.in_(EXCEPTION_STATES))
        if args.state:
            stmt = stmt.where(Study.recon_state == args.state)
        rows = list(s.execute(stmt).scalars())
        print(f"{'id':>6}  {'state':9} {'reconciliation':14} {'accession':12} {'patient id':12} {'images':>6}  "
              f"{'study instance uid':44}  open findings")
        for st in rows:
            open_ = [f"{f.kind}{':' + f.attribute if f.attribute else ''}" for f in st.findings
                     if f.status == FindingStatus.OPEN and f.severity != "info"]
            print(f"{st.id:>6}  {st.state:9} {st.recon_state:14} {(st.accession or '-')[:12]:12} "
                  f"{(st.dicom_patient_id or '-')[:12]:12} {st.num_instances:>6}  {st.study_uid:44}  "
                  f"{', '.join(open_)}")
    return 0


def _show(db: Any, ref: str) -> int:
    from engine.reconciliation.manual import ManualError, find_study
    from engine.store.models import DomainEvent, ReconcileJob, Study
    from engine.web.serialize import study_json
    with db.read_session() as s:
        try:
            sid = find_study(s.connection(), ref)["id"]
        except ManualError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        st = s.get(Study, sid, options=[selectinload(Study.series), selectinload(Study.findings)])
        events = list(s.execute(select(DomainEvent).where(DomainEvent.study_id == sid).order_by(DomainEvent.id))
                      .scalars())
        job = s.execute(select(ReconcileJob).where(ReconcileJob.study_id == sid)).scalar()
        print(json.dumps(study_json(st, events=events, findings=True, job=job), indent=2, ensure_ascii=False))
    return 0
