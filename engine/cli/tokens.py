"""``radbridge tokens create|list|revoke``: named bearer tokens with roles for /api/, /fhir/ and /metrics.

``create`` prints the secret once: only its SHA-256 is stored. A running engine checks tokens
against the store on every request, so a new token works and a revoked one is refused at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.store.tokens import Role


def add_parser(sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    tp = sub.add_parser("tokens", help="named HTTP tokens and their roles: create, list, revoke"
                        ).add_subparsers(dest="action", required=True)
    p = with_config(tp.add_parser("create", help="a new token with one or more roles; prints its secret once"))
    p.add_argument("name", help="who or what uses it (a person, a system): the audit trail names it")
    p.add_argument("--role", action="append", required=True, choices=[r.value for r in Role], dest="roles",
                   help="read, operate, admin, fhir-write, metrics or store (repeat for several)")
    with_config(tp.add_parser("list", help="every token: name, roles, created, last used, revoked; and the "
                                          "configured and generated ones (every role)"))
    p = with_config(tp.add_parser("revoke", help="refuse a token from now on (it stays listed)"))
    p.add_argument("name")
    for name in ("create", "list", "revoke"):
        tp.choices[name].set_defaults(fn=cmd_tokens)


def cmd_tokens(args: argparse.Namespace) -> int:
    from engine.cli.common import open_db, settings_of
    from engine.store import tokens
    from engine.store.audit import AuditAction, Subject, cli_actor, record_action
    from engine.store.tokens import TokenError

    settings = settings_of(args)
    db = open_db(settings, create=args.action == "create")  # a token may be made before the first start
    try:
        if args.action == "list":
            with db.reader.connect() as conn:
                rows = tokens.listing(conn)
            if not rows:
                print("no named tokens (radbridge tokens create NAME --role ...)")
            for secret in settings.api_tokens():  # the secrets themselves are never shown
                print(f"{tokens.config_token_name(secret):<24} {'every role':<36} configured ([http] tokens, "
                      "RADBRIDGE_API_TOKEN)")
            generated = Path(settings.storage.dir) / "api-token"
            if generated.exists() and not settings.api_tokens():
                used = "not accepted: named tokens exist, delete the file" if any(not r["revoked_at"] for r in rows) \
                    else "accepted while no named token exists"
                print(f"{tokens.GENERATED:<24} {'every role':<36} {generated} ({used})")
            for r in rows:
                state = f"revoked {r['revoked_at'][:19]}" if r["revoked_at"] else "active"
                used = r["last_used_at"][:19] if r["last_used_at"] else "never"
                print(f"{r['name']:<24} {','.join(r['roles']):<36} created {r['created_at'][:19]}  "
                      f"last used {used:<19}  {state}")
            return 0
        action = AuditAction.TOKEN_CREATE if args.action == "create" else AuditAction.TOKEN_REVOKE
        about = Subject("Token", detail=args.name if args.action != "create"
                        else f"{args.name} ({', '.join(sorted(args.roles))})")
        command = f"radbridge tokens {args.action} {args.name}"
        try:
            with db.writer.begin() as conn:  # the change and its audit row in one transaction
                if args.action == "create":
                    secret = tokens.create(conn, args.name, tokens.parse_roles(args.roles))
                else:
                    tokens.revoke(conn, args.name)
                record_action(conn, cli_actor(), action, about, query=command)
        except TokenError as exc:
            with db.writer.begin() as conn:  # a refusal is on the trail too
                record_action(conn, cli_actor(), action, about, status=400, query=command)
            print(f"radbridge tokens {args.action}: {exc}", file=sys.stderr)
            return 1
        if args.action == "create":
            print(secret)
            print(f"token {args.name!r} created with role(s) {', '.join(sorted(args.roles))}: the line above is its "
                  "secret, shown this once (only its SHA-256 is stored)", file=sys.stderr)
        else:
            print(f"token {args.name!r} revoked")
        return 0
    finally:
        db.dispose()
