"""``radbridge audit``: the audit trail, filtered, as text, JSON lines, RFC 5424 syslog lines or a
FHIR Bundle of AuditEvent (for a SIEM or an IHE ATNA repository)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

FORMATS = ("text", "json", "syslog", "fhir")


def add_parser(sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    p = with_config(sub.add_parser("audit", help="the audit trail: who read patient data or changed what"))
    p.add_argument("--since", help="an ISO 8601 time (UTC unless it says) or an age: 30m, 1h, 7d")
    p.add_argument("--since-id", type=int, metavar="N", help="only rows after id N (poll with the last id seen)")
    p.add_argument("--who", help="the actor: a token name, cli:<os user>, engine:<host>")
    p.add_argument("--patient", help="a patient identifier (ID or ID^ISSUER) or Patient/<index id>")
    p.add_argument("--action", help="read, search, reprocess, retry, discard, match, accept, start, stop...")
    p.add_argument("--limit", type=int, default=1000, help="at most this many entries (the newest), default 1000")
    p.add_argument("--format", choices=FORMATS, default="text",
                   help="text (default), json (one object per line), syslog (RFC 5424), fhir (Bundle of AuditEvent)")
    p.set_defaults(fn=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from engine.cli.common import open_db, settings_of
    from engine.fhir.auditevent import audit_bundle
    from engine.store.audit import AuditQueryError, find_events, parse_since, patients_named, syslog_line
    settings = settings_of(args)
    try:
        since = parse_since(args.since) if args.since else None
    except AuditQueryError as exc:
        print(f"radbridge audit: --{exc}", file=sys.stderr)
        return 2
    db = open_db(settings)
    try:
        with db.reader.connect() as conn:
            patients = patients_named(conn, args.patient) if args.patient else None
            if patients == []:
                print(f"radbridge audit: no patient with identifier {args.patient!r}", file=sys.stderr)
                return 1
            events = find_events(conn, since=since, who=args.who, patient_ids=patients, action=args.action,
                                 since_id=args.since_id, limit=max(1, min(args.limit, 100_000)),
                                 oldest_first=args.since_id is not None)
    finally:
        db.dispose()
    if args.since_id is None:
        events.reverse()  # oldest first, as a log reads
    if args.format == "json":
        for e in events:
            print(json.dumps(e, ensure_ascii=False))
    elif args.format == "syslog":
        for e in events:
            print(syslog_line(e))
    elif args.format == "fhir":
        print(json.dumps(audit_bundle(events, observer=settings.name), indent=2, ensure_ascii=False))
    else:
        for e in events:
            target = e["study_uid"] or (f"message {e['message_id']}" if e["message_id"] else "") \
                or (f"delivery {e['delivery_id']}" if e["delivery_id"] else "")
            patients_txt = ",".join(str(p) for p in e["patient_ids"])
            print(f"{e['at'][:19]}  {e['agent'][:24]:24} {(e['remote'] or '-')[:15]:15} {e['action']:14} "
                  f"{e['resource_type'][:14]:14} {e['outcome']:7} {e['status']}  "
                  f"patients={patients_txt or '-'} {target} {e['detail'] or ''}".rstrip())
    return 0
