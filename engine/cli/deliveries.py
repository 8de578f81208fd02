"""``radbridge deliveries``: what was sent to the EHR, what is waiting, what is dead; send it again.

retry / discard change the store only; a running engine picks retried deliveries up within a
second (its workers poll). ``radbridge mappings try OUTBOUND_MAPPING STUDY`` (in cli.py) shows the
message a stored study would produce, through ``try_outbound`` of engine/pipeline/dry_run.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any


def add_parser(sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    from engine.outbound.outbox import STATES
    dp = sub.add_parser("deliveries", help="outbound deliveries to the EHR: list, show, retry, discard"
                        ).add_subparsers(dest="action", required=True)
    p = with_config(dp.add_parser("list", help="deliveries, newest first, with counts per destination and state"))
    p.add_argument("--state", choices=STATES)
    p.add_argument("--destination", help="destination name (fhir, mllp, or a dicom-forward destination such as pacs)")
    p.add_argument("--study", help="Study Instance UID")
    p.add_argument("--limit", type=int, default=50)
    p = with_config(dp.add_parser("show", help="one delivery: the message sent and every attempt with its answer"))
    p.add_argument("id", type=int)
    p = with_config(dp.add_parser("retry", help="send dead (or given) deliveries again"))
    p.add_argument("ids", type=int, nargs="*", metavar="ID")
    p.add_argument("--dead", action="store_true", help="every dead delivery (of --destination)")
    p.add_argument("--destination")
    p.add_argument("--rebuild", action="store_true", help="build the message again from the store and mappings "
                   "(after a mapping fix) instead of resending the kept one")
    p = with_config(dp.add_parser("discard", help="give up on pending or dead deliveries"))
    p.add_argument("ids", type=int, nargs="+", metavar="ID")
    p.add_argument("--note", default="", help="why (kept with the delivery)")
    for name in ("list", "show", "retry", "discard"):
        dp.choices[name].set_defaults(fn=cmd_deliveries)


def cmd_deliveries(args: argparse.Namespace) -> int:
    from engine.cli.common import open_db, settings_of
    from engine.outbound import admin, outbox
    from engine.store.states import DeliveryState
    settings = settings_of(args)
    db = open_db(settings)
    try:
        if args.action == "list":
            with db.reader.connect() as conn:
                rows = admin.list_deliveries(conn, state=args.state, destination=args.destination,
                                             study_uid=args.study, limit=max(1, min(args.limit, 1000)))
                counts = outbox.counts(conn)
            if counts:  # one row per destination, one column per state, under a header
                states = list(DeliveryState)
                print(f"{'destination':<12}" + "".join(f"{st.value:>11}" for st in states))
                for dest, by_state in sorted(counts.items()):
                    print(f"{dest:<12}" + "".join(f"{by_state.get(st.value, 0):>11}" for st in states))
                print()
            if not rows:
                print("no deliveries" + (f" in state {args.state}" if args.state else ""))
            else:
                print(f"{'id':>7} {'created (UTC)':19} {'dest':<8} {'state':<10} {'try':>3} {'mapping':<22} "
                      f"{'event':<17} {'accession':<12} study UID")
            for r in rows:
                err = f"  {r['last_error'][:80]}" if r["last_error"] and r["state"] != "delivered" else ""
                print(f"{r['id']:>7} {r['created_at'][:19]} {r['destination']:<8} {r['state']:<10} "
                      f"{r['attempts']:>2}x {r['mapping']:<22} {r['event']:<17} {r.get('accession') or '-':<12} "
                      f"{r.get('study_uid') or '-'}{err}")
            return 0
        if args.action == "show":
            with db.reader.connect() as conn:
                d = admin.show_delivery(conn, args.id)
            if d is None:
                print(f"no delivery {args.id}", file=sys.stderr)
                return 1
            payload, attempts = d["payload"], d["attempts_made"]
            rest = {k: v for k, v in d.items() if k not in ("payload", "attempts_made")}
            print(json.dumps(rest, indent=2, ensure_ascii=False, default=str))
            print("\nmessage" + (" (not built yet: it is built at the first attempt)" if payload is None else ":"))
            if payload is not None:
                print(payload.replace("\r", "\n") if payload.startswith("MSH") else
                      json.dumps(json.loads(payload), indent=2, ensure_ascii=False))
            print(f"\n{len(attempts)} attempt(s):")
            for a in attempts:
                print(f"  {a['at'][:23]} {a['outcome']:<9} {a.get('status') or '':<8} {a['duration_ms']} ms "
                      f"{a.get('error') or ''}")
                if a["response"]:
                    print("    " + a["response"][:500].replace("\r", "\n    "))
            return 0
        from engine.store.audit import AuditAction, cli_actor, record_action
        actor, command = cli_actor(), f"radbridge deliveries {args.action}"
        if args.action == "retry":
            if not args.ids and not args.dead:
                print("give delivery ids, or --dead for every dead delivery", file=sys.stderr)
                return 2
            n = 0
            with db.writer.begin() as conn:
                if args.ids:  # one audit row per delivery named: which one, whose, and whether it went back
                    for did in args.ids:
                        one = outbox.retry(conn, [did], destination=args.destination, rebuild=args.rebuild)
                        record_action(conn, actor, AuditAction.RETRY, admin.retry_subject(conn, did, args.rebuild),
                                      status=200 if one else 409, query=command)
                        n += one
                else:
                    n = outbox.retry(conn, None, destination=args.destination, rebuild=args.rebuild)
                    record_action(conn, actor, AuditAction.RETRY,
                                  admin.retry_dead_subject(n, args.destination, args.rebuild), query=command)
            print(f"{n} deliver{'y' if n == 1 else 'ies'} queued again"
                  + (" (to be built again)" if args.rebuild else "") + "; a running engine sends within a second")
            return 0 if n or args.dead else 1
        n = 0
        with db.writer.begin() as conn:
            for did in args.ids:
                one = outbox.discard(conn, [did], args.note)
                record_action(conn, actor, AuditAction.DISCARD, admin.discard_subject(conn, did, args.note),
                              status=200 if one else 409, query=command)
                n += one
        print(f"{n} deliver{'y' if n == 1 else 'ies'} discarded")
        return 0 if n else 1
    finally:
        db.dispose()
