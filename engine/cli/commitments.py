"""``radbridge commitments``: Storage Commitment transactions asked of DICOM destinations, those still
waiting for their report first (docs/dicom.md, "Storage commitment"). Read-only: the rows name
destinations and SOP Instance UIDs, never a patient.

Exit status: 0; 1 with --older-than when some transaction has waited longer than that (a check for
cron or monitoring), and for a Transaction UID the store does not know.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import timedelta
from typing import Any


def add_parser(sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    p = with_config(sub.add_parser(
        "commitments", help="storage commitment transactions still waiting for the destination's report",
        description="Storage Commitment transactions in state requested (no N-EVENT-REPORT yet), oldest first; "
                    "with a Transaction UID, that one transaction whatever its state."))
    p.add_argument("transaction", nargs="?", help="one Transaction UID: its state, counts and failed instances")
    p.add_argument("--destination", help="only this destination")
    p.add_argument("--older-than", type=float, default=None, metavar="MINUTES",
                   help="only those requested more than MINUTES ago; exit 1 when there is any")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(fn=cmd_commitments)


def cmd_commitments(args: argparse.Namespace) -> int:
    from engine.cli.common import open_db, settings_of
    from engine.store.commitments import outstanding, result_of
    from engine.store.types import utcnow
    settings = settings_of(args)
    db = open_db(settings)
    try:
        with db.reader.connect() as conn:
            if args.transaction:
                row = result_of(conn, args.transaction)
                if row is None:
                    print(f"no storage commitment transaction {args.transaction}")
                    return 1
                print(f"{row.transaction_uid}  {row.state}  destination {row.destination}  "
                      f"delivery {row.delivery_id}  study {row.study_id}")
                print(f"  requested {row.requested_at:%Y-%m-%d %H:%M:%S}Z  instances {row.instances}  "
                      f"committed {row.committed}  failed {len(row.failed)}")
                if row.answered_at is not None:
                    print(f"  answered {row.answered_at:%Y-%m-%d %H:%M:%S}Z by {row.answered_by}")
                if row.error:
                    print(f"  error: {row.error}")
                for f in row.failed:
                    print(f"  failed {f.sop_instance_uid}  reason 0x{f.reason:04X}")
                return 0
            before = utcnow() - timedelta(minutes=args.older_than) if args.older_than is not None else None
            rows = outstanding(conn, requested_before=before, destination=args.destination,
                               limit=max(1, min(args.limit, 1000)))
    finally:
        db.dispose()
    now = utcnow()
    for r in rows:
        waited = int((now - r.requested_at).total_seconds() // 60)
        print(f"{r.transaction_uid}  {r.destination:<12} delivery {r.delivery_id}  study {r.study_id}  "
              f"{r.instances} instance(s)  waiting {waited} min")
    print(f"{len(rows)} transaction(s) waiting for a report" + (f" for more than {args.older_than:g} min"
                                                                  if args.older_than is not None else ""))
    return 1 if rows and args.older_than is not None else 0
