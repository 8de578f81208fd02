"""``radbridge storage check [--repair]``: the study index against the files in storage;
``radbridge storage cleanup [--dry-run]``: the storage lifecycle's pass ([storage.cleanup], docs/storage.md).

check: exit status 0 when index and files agree, 1 when a problem was found (also when --repair set
orphaned files aside: someone should know), 2 when the check could not run.
cleanup: 0 when the pass ran, 1 when a study could not be deleted, 2 when it could not run (cleanup
not enabled, without --dry-run).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_parser(sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    st = sub.add_parser("storage", help="the study files and their index").add_subparsers(dest="action",
                                                                                          required=True)
    p = with_config(st.add_parser(
        "check", help="compare the index with the files: orphaned files, missing files, wrong checksums"))
    p.add_argument("--repair", action="store_true",
                   help="move orphaned files (no index row points at them) to the orphan folder "
                        "(<storage dir>/orphaned/); missing files and wrong checksums are only reported")
    p.add_argument("--quick", action="store_true", help="do not read the files to verify their SHA-256")
    p.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                   help="unreferenced files younger than this are not judged (default 600: they may be on "
                        "their way into the index)")
    p.set_defaults(fn=cmd_storage)
    c = with_config(st.add_parser(
        "cleanup", help="delete studies that are safely elsewhere, by age and watermark ([storage.cleanup])"))
    c.add_argument("--dry-run", action="store_true",
                   help="list what would be deleted and why (age / watermark / free-space), and what is kept and "
                        "why; delete nothing")
    c.set_defaults(fn=cmd_cleanup)


def cmd_storage(args: argparse.Namespace) -> int:
    from engine.cli.common import NoDatabase, open_db, settings_of
    from engine.domain.integrity import ORPHAN_GRACE_SECONDS, StorageProblem, check_storage
    from engine.storage.local import LocalStorage

    settings = settings_of(args)
    root = Path(settings.storage.dir) / "studies"
    if not root.is_dir():
        print(f"radbridge storage check: no study storage at {root}", file=sys.stderr)
        return 2
    grace = ORPHAN_GRACE_SECONDS if args.grace is None else max(0.0, args.grace)
    storage = LocalStorage(root, fsync=settings.dicom.fsync)
    try:
        db = open_db(settings)
    except NoDatabase:
        raise
    except Exception as exc:
        from engine.redaction import redact_url
        print(f"radbridge storage check: cannot open the database {redact_url(settings.database_url)}: "
              f"{type(exc).__name__}", file=sys.stderr)
        return 2
    try:
        report = check_storage(db.reader, storage, repair=args.repair, checksums=not args.quick,
                               grace_seconds=grace)
    finally:
        db.dispose()
    for f in report.findings:
        moved = f"; moved to {f.set_aside_to}" if f.set_aside_to else ""
        print(f"{f.problem:9} {f.key}  ({f.detail}{moved})")
    counts = [(StorageProblem.ORPHANED, "orphaned" + (" (moved aside)" if args.repair else "")),
              (StorageProblem.MISSING, "missing"), (StorageProblem.CHECKSUM, "checksum wrong")]
    found = ", ".join(f"{report.count(p)} {label}" for p, label in counts if report.count(p))
    young = (f"; {report.too_young} unreferenced file(s) younger than {grace:g} s not judged"
             if report.too_young else "")
    checked = f"{report.files} file(s), {report.instances} instance(s)" + (", sizes only" if args.quick else "")
    print(f"radbridge storage check: {checked}: {found or 'clean'}{young}")
    return 0 if report.clean else 1


def cmd_cleanup(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from engine.cli.common import open_db, settings_of
    from engine.domain.lifecycle import run_cleanup
    from engine.storage.local import LocalStorage
    from engine.store.audit import cli_actor

    settings = settings_of(args)
    policy = settings.storage.cleanup
    if not policy.enabled and not args.dry_run:
        print("radbridge storage cleanup: [storage.cleanup] enabled is false: nothing is deleted "
              "(--dry-run shows what would be)", file=sys.stderr)
        return 2
    if not (policy.max_age_days > 0 or policy.max_storage_mb > 0 or policy.min_free_mb > 0):
        print("radbridge storage cleanup: no rule is set (max_age_days, max_storage_mb, min_free_mb are 0)")
        return 0
    root = Path(settings.storage.dir) / "studies"
    if not root.is_dir():
        print(f"radbridge storage cleanup: no study storage at {root}", file=sys.stderr)
        return 2
    storage = LocalStorage(root, fsync=settings.dicom.fsync)
    db = open_db(settings)

    def write(job: Callable[[Session], Any]) -> Any:
        with db.write_session() as s, s.begin():
            return job(s)
    try:
        report = run_cleanup(db, storage, policy, write=write, actor=cli_actor(), dry_run=args.dry_run)
    finally:
        db.dispose()
    for d in report.decisions:
        what = f"{d.reason}, last instance {d.last_received_at:%Y-%m-%d %H:%M}Z, {d.instances} instance(s), " \
               f"{d.size_bytes} bytes"
        if d.kept:
            print(f"keep    {d.study_uid}  ({what}): {'; '.join(d.kept)}")
        else:
            print(f"{'would delete' if args.dry_run else 'deleted'} {d.study_uid}  ({what})")
    shown = len(report.decisions)
    more = f" (first {shown} listed)" if shown < report.kept + report.deleted + report.would_delete + report.failed else ""
    wanted = f", {report.wanted_bytes} bytes wanted by the watermark/free-space rule" if report.wanted_bytes else ""
    if args.dry_run:
        print(f"radbridge storage cleanup (dry run, nothing deleted): {report.would_delete} study(ies) would be deleted, "
              f"{report.kept} kept{wanted}{more}")
    else:
        print(f"radbridge storage cleanup: {report.deleted} study(ies) deleted, {report.bytes_freed} bytes freed, "
              f"{report.files_deleted} file(s) removed, {report.kept} kept{wanted}"
              f"{f', {report.failed} failed' if report.failed else ''}{more}")
    return 1 if report.failed else 0
