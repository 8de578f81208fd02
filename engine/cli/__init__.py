"""The `radbridge` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from engine.cli.audit import add_parser as add_audit_parser
from engine.cli.commitments import add_parser as add_commitments_parser
from engine.cli.common import NoDatabase, open_db, require_database, settings_of
from engine.cli.deliveries import add_parser as add_deliveries_parser
from engine.cli.storage import add_parser as add_storage_parser
from engine.cli.studies import add_parser as add_studies_parser
from engine.cli.tokens import add_parser as add_tokens_parser
from engine.config import DEFAULT_CONFIG
from engine.reconciliation.rules import ReconciliationRules
from engine.redaction import scrub, scrub_logs
from engine.store.states import MessageStatus
from engine.tls import TLSError
from engine.yamlfile import ConfigFileError

log = logging.getLogger("radbridge.run")

def _print_problems(exc: ConfigFileError) -> None:
    for p in exc.problems:
        print(str(p), file=sys.stderr)


# --- run ----------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from engine.cli.workers import WorkersRefused, check_workers, supervise
    settings = settings_of(args)
    slot: int | None = args.worker_slot  # one of the processes of `run --workers N` (engine/cli/workers.py)
    who = f" [worker {slot} pid %(process)d]" if slot is not None else (" [supervisor]" if args.workers > 1 else "")
    logging.basicConfig(level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s{who} %(name)s: %(message)s")
    if slot is None:
        try:
            check_workers(settings, args.workers)
        except WorkersRefused as exc:
            print(f"radbridge: {exc}", file=sys.stderr)
            return 2
    if not args.verbose:  # a line per migration step on the first start buried the useful lines
        logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))
    # a secret that reaches a log line anyway (a driver's message) is masked, and so are the row
    # values a database error quotes (unless log_patient_details)
    scrub_logs(settings.secret_values(), hide_rows=not settings.log_patient_details)
    from sqlalchemy.exc import SQLAlchemyError

    from engine.redaction import redact_url
    from engine.runtime import Engine
    from engine.web.app import build_app

    if slot is None and args.workers > 1:
        return supervise(args, settings)

    async def main() -> int:
        engine = Engine(settings, http_app=build_app, reuse_port=slot is not None)
        try:
            await engine.start()
        except ConfigFileError as exc:
            print("radbridge: not started, configuration has errors:", file=sys.stderr)
            _print_problems(exc)
            return 1
        except (OSError, TLSError) as exc:
            print(f"radbridge: not started: {exc}", file=sys.stderr)
            return 1
        except SQLAlchemyError as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"radbridge: not started: database {redact_url(settings.database_url)}: "
                  f"{scrub(why, settings.secret_values())}", file=sys.stderr)
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        listening = ", ".join(f"{n} {ep}" for n, c in engine.connectors.items() if (ep := c.endpoint()))
        http = f"{engine.http_scheme}://{settings.bind}:{engine.http_port}/"
        if slot is None:
            print(f"radbridge running: {listening or 'no channels'}; HTTP on {http} "
                  "(Ctrl-C to stop)", flush=True)
        else:
            log.info("worker %d running: %s; HTTP on %s", slot, listening or "no channels", http)
            tell_supervisor(args.ready_fd, stop)
        await stop.wait()
        if slot is None:
            print("radbridge: stopping (finishing messages in hand)...", flush=True)
        await engine.stop()
        return 0

    return asyncio.run(main())


def tell_supervisor(ready_fd: int, stop: asyncio.Event) -> None:
    """A worker of `run --workers N` is listening: one byte on the supervisor's pipe. Should the
    supervisor go away (killed), the worker stops as on SIGTERM rather than run on unsupervised."""
    if ready_fd >= 0:
        with contextlib.suppress(OSError):
            os.write(ready_fd, b"1")
            os.close(ready_fd)
    parent = os.getppid()

    async def watch() -> None:
        while not stop.is_set():  # ends with the engine's stop
            await asyncio.sleep(1.0)
            if os.getppid() != parent:
                log.warning("the supervisor (pid %d) is gone: stopping", parent)
                stop.set()
    watchers.add(asyncio.get_running_loop().create_task(watch()))


watchers: set[asyncio.Task[None]] = set()  # referenced while they run


# --- check --------------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    try:
        settings = settings_of(args)
    except ConfigFileError as exc:
        _print_problems(exc)
        return 1
    from engine.runtime import load_definitions, tls_problems
    registry, channels, problems = load_definitions(settings)
    problems.extend(tls_problems(settings, channels))
    for p in problems:
        print(str(p), file=sys.stderr if p.severity == "error" else sys.stdout)
    errors = [p for p in problems if p.severity == "error"]
    if args.database:
        from engine.redaction import redact_url, scrub
        from engine.store import migrate
        from engine.store.db import open_database
        shown = redact_url(settings.database_url)
        try:
            require_database(settings)
            db = open_database(settings.database_url)
            current = migrate.current_revision(db)
            head = migrate.head_revision()
            db.dispose()
            print(f"database {shown}: schema {current or 'empty'} (latest {head})")
        except Exception as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"database {shown}: cannot connect: {scrub(why, settings.secret_values())}",
                  file=sys.stderr)
            errors.append(None)  # type: ignore[arg-type]
    if errors:
        print(f"radbridge check: {len(errors)} error(s)", file=sys.stderr)
        return 1
    from engine.outbound.mapping import OutboundMapping
    n_rules = len(registry.names_of(ReconciliationRules))
    n_out = len(registry.names_of(OutboundMapping))
    print(f"radbridge check: OK ({len(channels)} channel(s), {len(registry.names()) - n_rules - n_out} mapping(s), "
          f"{n_out} outbound mapping(s), {n_rules} reconciliation rule file(s), {len(problems)} warning(s))")
    return 0


# --- mappings try -------------------------------------------------------------------------------------
def cmd_mappings_try(args: argparse.Namespace) -> int:
    """The dry run is engine/pipeline/dry_run.py's, which the console's "try" shows too."""
    from engine.outbound.mapping import OutboundMapping
    from engine.pipeline.dry_run import (
        Tried,
        TryError,
        load_for_try,
        read_dicom,
        try_inbound,
        try_outbound,
        try_rules,
    )
    from engine.store import migrate
    from engine.store.db import open_database

    settings = settings_of(args)
    path = Path(args.mapping)
    if not path.exists():
        path = Path(settings.mappings_dir) / f"{args.mapping}.yaml"
    mapping, problems = load_for_try(path, structure_version=settings.mappings.hl7_version)
    for p in problems:
        print(str(p), file=sys.stderr)
    if mapping is None:
        return 1
    tried: Tried
    stack = contextlib.ExitStack()
    try:
        if isinstance(mapping, ReconciliationRules | OutboundMapping):
            try:
                db = open_db(settings)
            except NoDatabase as exc:
                if not isinstance(mapping, ReconciliationRules):
                    raise  # an outbound mapping is tried on a stored study: there is none
                # rules are tried on an image file: with no store yet, against an empty one (a throwaway
                # file, deleted after; nothing is left next to the configured store), so every order and
                # patient is unknown
                print(f"{exc.path.absolute()}: no database yet; matching against an empty store", file=sys.stderr)
                scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="radbridge-try-"))
                db = open_database(f"sqlite:///{Path(scratch) / 'empty.db'}")
                migrate.upgrade(db)
            try:
                with db.reader.connect() as conn:
                    if isinstance(mapping, ReconciliationRules):
                        tried = try_rules(mapping, read_dicom(Path(args.sample)), conn)
                    else:
                        from engine.storage.local import LocalStorage
                        storage = LocalStorage(Path(settings.storage.dir) / "studies", fsync=False)
                        tried = try_outbound(mapping, conn, args.sample, storage, settings)
            finally:
                db.dispose()
        else:
            try:
                raw = Path(args.sample).read_bytes()
            except OSError as exc:
                print(f"{args.sample}: cannot read: {exc.strerror}", file=sys.stderr)
                return 1
            tried = try_inbound(mapping, raw)
    except TryError as exc:
        print(f"{args.sample}: {exc}" if exc.of_sample else str(exc), file=sys.stderr)
        return 1
    finally:
        stack.close()
    for block in tried.blocks:
        print(block)
    for note in tried.notes:
        print(f"{args.sample}: {note}", file=sys.stderr)
    return 1 if tried.failed else 0


# --- mappings list ------------------------------------------------------------------------------------
def mapping_kind(data: Any) -> str:
    """What a mapping file is, from its top-level keys: "inbound hl7v2", "inbound fhir Patient",
    "outbound hl7v2 ORU^R01", "outbound fhir ImagingStudy", "reconciliation rules"."""
    if not isinstance(data, dict):
        return "?"
    source = str(data.get("source") or "?")
    if source == "store":
        target = str(data.get("target") or "?")
        return f"outbound {target} {data.get('message') or data.get('resource') or ''}".strip()
    if source == "reconciliation":
        return "reconciliation rules"
    return f"inbound {source} {data.get('resource') or ''}".strip()


def cmd_mappings_list(args: argparse.Namespace) -> int:
    """Every mapping file with its kind and its validation state, as `radbridge check` and the engine
    see it: OK (with its warnings counted) or the first error as file:line. Exit 1 if any is invalid."""
    from engine.runtime import open_mappings
    from engine.yamlfile import load_yaml

    settings = settings_of(args)
    directory = Path(settings.mappings_dir)
    if not directory.is_dir():
        print(f"{directory}: mappings directory not found", file=sys.stderr)
        return 1
    registry = open_mappings(settings)
    registry.load_all()
    names = registry.names()
    if not names:
        print(f"no mapping files (*.yaml) in {directory}")
        return 0
    width = max(len("mapping"), *(len(n) for n in names))
    print(f"{'mapping':<{width}}  {'kind':<32} state")
    invalid = 0
    for name in names:
        path = directory / f"{name}.yaml"
        try:
            kind = mapping_kind(load_yaml(path))
        except ConfigFileError:
            kind = "?"
        problems = registry.problems(name)
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            invalid += 1
            more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
            state = f"INVALID {errors[0]}{more}"
        else:
            state = "OK" + (f" ({len(problems)} warning(s): radbridge check shows them)" if problems else "")
        print(f"{name:<{width}}  {kind:<32} {state}")
    print(f"{len(names)} mapping file(s) in {directory}: " + (f"{invalid} invalid" if invalid else "all valid"))
    return 1 if invalid else 0


# --- messages -----------------------------------------------------------------------------------------
def cmd_messages(args: argparse.Namespace) -> int:
    from sqlalchemy import select
    from sqlalchemy.orm import selectinload

    from engine.store.models import Message
    from engine.web.serialize import message_json

    settings = settings_of(args)
    db = open_db(settings)
    try:
        if args.action == "list":
            with db.read_session() as s:
                stmt = select(Message).order_by(Message.id.desc()).limit(args.limit)
                if args.status:
                    stmt = stmt.where(Message.status == args.status)
                if args.control_id:
                    stmt = stmt.where(Message.control_id == args.control_id)
                rows = list(s.execute(stmt).scalars())
                print(f"{'id':>8}  {'received (UTC)':19}  {'channel':14} {'type':10} {'control id':22} "
                      f"{'status':10} ack  error")  # ack: the application ACK code (see --help)
                for row in rows:
                    print(f"{row.id:>8}  {row.received_at:%Y-%m-%d %H:%M:%S}  {row.channel[:14]:14} "
                          f"{(row.message_type or '-')[:10]:10} {(row.control_id or '-')[:22]:22} {row.status:10} "
                          f"{row.ack_code or '-':3}  {(row.error or '')[:60]}")
            return 0
        if args.action == "show":
            with db.read_session() as s:
                m = s.get(Message, args.id, options=[selectinload(Message.content), selectinload(Message.events)])
                if m is None:
                    print(f"no message {args.id}", file=sys.stderr)
                    return 1
                body = message_json(m, content=True)
                if args.validate and "raw" in body:
                    from engine.hl7.structure import validate_message
                    body["validation"] = validate_message(body["raw"]) or ["valid"]
                if "raw" in body:
                    body["raw"] = body["raw"].replace("\r", "\n")
                if body.get("ack"):
                    body["ack"] = body["ack"].replace("\r", "\n")
                print(json.dumps(body, indent=2, ensure_ascii=False))
            return 0
        # reprocess
        from engine.pipeline.hl7_inbound import HL7Inbound, reprocess
        from engine.runtime import load_definitions
        from engine.store.audit import AuditAction, cli_actor, message_subject, record_action
        registry, channels, problems = load_definitions(settings)
        by_name = {c.name: c for c in channels}
        actor, command = cli_actor(), "radbridge messages reprocess"
        status = 0
        for mid in args.ids:
            failure: tuple[int, str] | None = None
            with db.write_session() as s, s.begin():
                m = s.get(Message, mid, options=[selectinload(Message.content)])
                ch = by_name.get(m.channel) if m is not None else None
                if m is None:
                    failure = (404, f"message {mid}: not found")
                elif ch is None:
                    failure = (409, f"message {mid}: channel {m.channel!r} is not defined any more")
                else:
                    try:  # refused before anything changed (pruned, a duplicate...)
                        st = reprocess(s, HL7Inbound(ch, registry, app_name=settings.name), m)
                    except ValueError as exc:
                        failure = (409, f"message {mid}: {exc}")
                    else:
                        s.flush()
                        subject = message_subject(s.connection(), mid)
                        subject.detail = f"now {st.status}"
                        record_action(s.connection(), actor, AuditAction.REPROCESS, subject, query=command)
                        print(f"message {mid}: {st.status}" + (f" ({st.error})" if st.error else ""))
                        if st.status not in (MessageStatus.PROCESSED, MessageStatus.FILTERED):
                            status = 1
                if failure is not None:
                    record_action(s.connection(), actor, AuditAction.REPROCESS, message_subject(s.connection(), mid),
                                  status=failure[0], query=command)
            if failure is not None:
                print(failure[1], file=sys.stderr)
                status = 1
        return status
    finally:
        db.dispose()


# --- send ---------------------------------------------------------------------------------------------
def _msh_field(message: bytes, n: int) -> str:
    first = message.split(b"\r", 1)[0].decode("latin-1")
    parts = first.split(first[3]) if len(first) > 3 else []
    return parts[n - 1] if len(parts) >= n else ""


def _ack_code(reply: bytes) -> str:
    for seg in reply.decode("latin-1", "replace").split("\r"):
        if seg.startswith("MSA") and len(seg) > 4:
            return seg.split(seg[3])[1]
    return "??"


def cmd_send(args: argparse.Namespace) -> int:
    from engine.connectors.mllp.client import MLLPClient, split_messages
    host, _, port = args.to.rpartition(":")
    if not host or not port.isdigit():
        print(f"--to {args.to!r}: expected HOST:PORT", file=sys.stderr)
        return 2
    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        print(f"{args.file}: cannot read: {exc.strerror}", file=sys.stderr)
        return 1
    messages = split_messages(data)
    if not messages:
        print(f"{args.file}: no HL7 message (nothing starts with MSH)", file=sys.stderr)
        return 1
    failures = 0
    try:
        tls = None
        if args.tls or args.ca or args.cert:
            from engine.tls import TLSError, client_context
            try:
                tls = client_context(args.ca or "", args.cert or "", args.key or "")
            except TLSError as exc:
                print(f"TLS: {exc}", file=sys.stderr)
                return 1
        with MLLPClient(host, int(port), timeout=args.timeout, tls=tls, server_hostname=args.server_name) as client:
            for i, msg in enumerate(messages, 1):
                replies = [client.send(msg)]
                # Enhanced mode: after the commit ACK comes an application ACK when MSH-16 asks for one.
                app_ack = _msh_field(msg, 16).upper()
                if _ack_code(replies[0]) == "CA" and app_ack in ("AL", "ER", "SU"):
                    extra = client.read_reply(timeout=args.timeout if app_ack == "AL" else 1.0)
                    if extra is not None:
                        replies.append(extra)
                for reply_bytes in replies:
                    reply = reply_bytes.decode("latin-1", "replace")
                    code = _ack_code(reply_bytes)
                    note = ""
                    if code == "CA" and len(replies) == 1:  # enhanced mode, no application ACK asked for
                        note = (f" (commit ACK: stored; MSH-16 {app_ack or 'empty'} asks for no application ACK, "
                                "the outcome AA/AE is in `radbridge messages list`)")
                    print(f"message {i}/{len(messages)}: {code}{note}  {reply.replace(chr(13), ' | ').strip(' |')}")
                    if code not in ("AA", "CA"):
                        failures += 1
    except OSError as exc:  # ssl.SSLError too: an untrusted or refused certificate
        print(f"cannot send to {args.to}: {exc}", file=sys.stderr)
        return 1
    return 1 if failures else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from engine.demo import run_demo
    return run_demo(keep=args.keep, serve=args.serve)


def installed_version() -> str:
    """The version of the installed package (its metadata, as pip installed it)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("radbridge")
    except PackageNotFoundError:
        return "(not installed: run scripts/bootstrap)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radbridge", description="RadBridge imaging integration engine")
    parser.add_argument("--version", action="version", version=f"radbridge {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help=f"engine settings (default: {DEFAULT_CONFIG} if present)")
        return p

    p = with_config(sub.add_parser("run", help="start every enabled channel"))
    p.add_argument("--verbose", action="store_true", help="also log each schema migration step (Alembic's INFO "
                   "lines), which a first start has one of per migration")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="run N engine processes serving the "
                   "same MLLP, DICOM and HTTP ports (SO_REUSEPORT), restarted if one dies; N > 1 needs PostgreSQL "
                   "and fixed ports (docs/scaling.md)")
    p.add_argument("--worker-slot", type=int, help=argparse.SUPPRESS)  # set by the supervisor for its workers
    p.add_argument("--ready-fd", type=int, default=-1, help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_run)
    p = with_config(sub.add_parser("check", help="validate config, channels and mappings"))
    p.add_argument("--database", action="store_true", help="also connect to the database and report its schema")
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("demo", help="run a scenario on loopback and print what happened")
    p.add_argument("--keep", action="store_true", help="keep the demo's working directory")
    p.add_argument("--serve", action="store_true", help="then keep the engine (console, API, FHIR) and the stand-in "
                   "EHR running, with their URLs and the token printed, until Ctrl-C or SIGTERM")
    p.set_defaults(fn=cmd_demo)

    mp = sub.add_parser("mappings", help="work with mapping files").add_subparsers(dest="sub", required=True)
    p = with_config(mp.add_parser("try", help="dry-run a mapping on a sample message"))
    p.add_argument("mapping", help="mapping name (file in mappings/ without .yaml) or a path")
    p.add_argument("sample", help="an HL7 message file (inbound mappings), a DICOM file (reconciliation rules), or "
                   "a stored study's UID or accession (outbound mappings: the message it would produce)")
    p.set_defaults(fn=cmd_mappings_try)
    with_config(mp.add_parser("list", help="every mapping file with its kind and validation state (exit 1 if one "
                              "is invalid)")).set_defaults(fn=cmd_mappings_list)

    mg = sub.add_parser("messages", help="browse and reprocess stored messages").add_subparsers(dest="action",
                                                                                                 required=True)
    p = with_config(mg.add_parser("list", help="newest messages first", description="Stored messages, newest "
                                  "first. ack: the application ACK code (AA applied, AE error, AR rejected), which "
                                  "an original-mode sender got; a sender in enhanced mode (MSH-15/16 set) got the "
                                  "commit ACK CA first, and this code only when its MSH-16 asked for it."))
    p.add_argument("--status", help="received, processed, error, rejected, duplicate, filtered")
    p.add_argument("--control-id")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(fn=cmd_messages)
    p = with_config(mg.add_parser("show", help="one message with its content, ACK and history"))
    p.add_argument("id", type=int)
    p.add_argument("--validate", action="store_true", help="validate the raw message against HL7 structures (hl7apy)")
    p.set_defaults(fn=cmd_messages)
    p = with_config(mg.add_parser("reprocess", help="apply stored messages again (after a mapping fix)"))
    p.add_argument("ids", type=int, nargs="+")
    p.set_defaults(fn=cmd_messages)

    add_studies_parser(sub, with_config)
    add_storage_parser(sub, with_config)
    add_deliveries_parser(sub, with_config)
    add_commitments_parser(sub, with_config)
    add_audit_parser(sub, with_config)
    add_tokens_parser(sub, with_config)

    sp = sub.add_parser("send", help="send messages").add_subparsers(dest="kind", required=True)
    p = sp.add_parser("hl7", help="send HL7 v2 messages from a file over MLLP and print the ACKs",
                      description="Send each HL7 v2 message of FILE over MLLP, one at a time, and print every "
                      "reply as 'message N/M: CODE  ACK'. The ACK mode is the message's own: original mode "
                      "(MSH-15 and MSH-16 empty) gets one ACK, AA/AE/AR. Enhanced mode (MSH-15 or MSH-16 set, "
                      "as in the sample ADT with AL/NE) gets a commit ACK, CA when the message is stored, and "
                      "then an application ACK AA/AE only when MSH-16 asks for one (AL, ER, SU); "
                      "`radbridge messages list` shows the application outcome (AA/AE/AR) of every message, "
                      "whichever mode. Exit 1 if any reply is not AA or CA.")
    p.add_argument("file", metavar="FILE", help="a file of one or more HL7 v2 messages (each starts with MSH; "
                   "segments end with CR or a line break); several are sent in order on one connection")
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="the MLLP listener, e.g. 127.0.0.1:2575")
    p.add_argument("--tls", action="store_true", help="MLLP over TLS (TLS 1.2 or newer; the server's certificate "
                   "is checked against --ca, else the system's CAs)")
    p.add_argument("--ca", help="PEM CA bundle the server's certificate must chain to (implies --tls)")
    p.add_argument("--cert", help="PEM client certificate, for servers that require one (implies --tls)")
    p.add_argument("--key", help="PEM private key of --cert")
    p.add_argument("--server-name", help="the name the server's certificate must carry (default: HOST)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait to connect and for each ACK (default 30); in enhanced mode with MSH-16 "
                   "ER or SU, an application ACK that may not come is awaited for at most 1 s")
    p.set_defaults(fn=cmd_send)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except ConfigFileError as exc:
        _print_problems(exc)
        return 1
    except NoDatabase as exc:
        print(f"radbridge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

