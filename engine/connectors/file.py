"""Connector type ``file``: HL7 v2 files dropped in a directory, read like Mirth's File Reader
(docs/channels.md, "file").

    connector: {type: file, directory: /data/hl7-in}

Every ``poll_seconds`` the directory is listed; a file matching ``pattern`` that has not changed for
``min_age_seconds`` is read whole. It holds one message, several (each starting with MSH), or an HL7
batch (FHS/BHS ... BTS/FTS: the envelope segments are not messages). Each message goes through the
same ``prepare``/``store`` as one received over MLLP (same message rows, dedup and stored ACK;
remote ``file:NAME#N``), one at a time and in file order.

Exactly once: the writer job that stores message N also records ``messages_done = N`` for the file's
content (SHA-256) in ``file_progress``, in the same transaction. After kill -9 the next pass reads the
file again, skips what is recorded and goes on. Only when every message is committed is the file
moved to ``done_dir`` (or ``error_dir`` with NAME.error.txt when a message was rejected or failed);
a file whose progress says complete is only moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.channels import (
    Channel,
    ChannelOptions,
    ConnectorSpec,
    RoutesKind,
    check_hl7_options,
    check_positive,
)
from engine.connectors.base import ConnectorContext
from engine.connectors.hl7channel import HL7Channel
from engine.connectors.minute_figures import MinuteFigures
from engine.errors import RadBridgeError
from engine.hl7 import errors as E
from engine.hl7.errors import HL7Error
from engine.pipeline.hl7_inbound import Prepared, Stored, guess_control_id
from engine.pipeline.writer import StorageUnavailable
from engine.store.models import FileProgress
from engine.store.states import MessageStatus
from engine.store.types import utcnow
from engine.yamlfile import ConfigProblem, LineDict

log = logging.getLogger(__name__)

ENVELOPE = (b"FHS", b"BHS", b"BTS", b"FTS")
LINE_BREAK = re.compile(rb"\r\n|\r|\n")
FAILED_STATUSES = (MessageStatus.ERROR, MessageStatus.REJECTED)
REMOTE_MAX = 64  # messages.remote


@dataclass
class FileOptions(ChannelOptions):
    """Options of a file channel: the HL7 ones (ChannelOptions) and how the directory is read."""

    pattern: str = "*.hl7"  # which file names are read (glob; names starting with "." never are)
    poll_seconds: float = 2.0
    min_age_seconds: float = 1.0  # a file changed more recently than this is still being written
    done_dir: str = "done"  # under the directory unless absolute
    error_dir: str = "error"
    max_files_per_poll: int = 100
    max_file_bytes: int = 100 * 1024 * 1024  # a larger file goes to error_dir unread


def check_file_options(opts: FileOptions, raw: Any, file: str, line: int, problems: list[ConfigProblem]) -> None:
    check_hl7_options(opts, raw, file, line, problems)
    check_positive(opts, raw, file, line, problems, ("poll_seconds", "max_files_per_poll", "max_file_bytes"))

    def at(key: str) -> int:
        return raw.line_of(key) if isinstance(raw, LineDict) and key in raw else line

    if not opts.pattern or "/" in opts.pattern:
        problems.append(ConfigProblem(file, at("pattern"), "options.pattern",
                                      "a file name pattern such as *.hl7 (no directory part)"))
    for key in ("done_dir", "error_dir"):
        if not getattr(opts, key).strip():
            problems.append(ConfigProblem(file, at(key), f"options.{key}", "a directory name is required"))
    if opts.done_dir.strip() and opts.done_dir == opts.error_dir:
        problems.append(ConfigProblem(file, at("error_dir"), "options.error_dir", "must differ from done_dir"))


def check_file_connector(conn: Any, file: str, line: int, problems: list[ConfigProblem]) -> None:
    directory = conn.get("directory")
    dline = conn.line_of("directory") if isinstance(conn, LineDict) and "directory" in conn else line
    if directory is None:
        problems.append(ConfigProblem(file, line, "connector.directory",
                                      "a file channel needs connector: {type: file, directory: PATH}"))
    elif not isinstance(directory, str) or not directory.strip():
        problems.append(ConfigProblem(file, dline, "connector.directory",
                                      f"directory is a path (relative to the engine's working directory), "
                                      f"got {directory!r}"))


class NotHL7(RadBridgeError, ValueError):
    """The file's content is not HL7 v2 messages (or a batch of them)."""


def split_messages(data: bytes) -> list[bytes]:
    """The messages of a file: each from its MSH to the next MSH or envelope segment, its segments
    joined by CR; FHS/BHS/BTS/FTS are dropped. Any other line outside a message makes it not HL7."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    messages: list[list[bytes]] = []
    inside = False
    for n, line in enumerate(LINE_BREAK.split(data), 1):  # bounded by the file size
        if not line.strip():
            continue
        head = line[:3]
        if head in ENVELOPE:
            inside = False
        elif head == b"MSH":
            messages.append([line])
            inside = True
        elif inside:
            messages[-1].append(line)
        else:
            shown = line[:40].decode("latin-1", "replace")
            raise NotHL7(f"line {n} ({shown!r}) is outside any message: an HL7 file holds messages starting "
                         "with MSH, optionally in an FHS/BHS batch")
    if not messages:
        raise NotHL7("no HL7 message (no MSH segment) in the file")
    return [b"\r".join(m) + b"\r" for m in messages]


def unique_target(directory: Path, name: str) -> Path:
    """``directory/name``, or name-1.ext, name-2.ext ... when taken: nothing is overwritten."""
    target = directory / name
    if not target.exists() and not Path(f"{target}.error.txt").exists():
        return target
    stem, dot, ext = name.partition(".")
    for i in range(1, 10000):
        target = directory / f"{stem}-{i}{dot}{ext}"
        if not target.exists() and not Path(f"{target}.error.txt").exists():
            return target
    return directory / f"{stem}-{time.time_ns()}{dot}{ext}"


class FileFailure(TypedDict):
    """One message of a file that was not applied (file_progress.failures, and the .error.txt report)."""

    index: int  # 1-based, in file order
    control_id: str | None
    status: str  # MessageStatus
    ack: str
    message_id: int | None
    error: str


@dataclass
class Progress:
    """What the store says about a file's content (a snapshot of its file_progress row)."""

    messages_done: int = 0
    total: int = 0
    failures: list[FileFailure] = field(default_factory=list)


class FileConnector(HL7Channel):
    spec = ConnectorSpec("file", FileOptions, ("type", "directory"), RoutesKind.MESSAGES,
                         check_options=check_file_options, check_connector=check_file_connector)

    def __init__(self, channel: Channel, ctx: ConnectorContext) -> None:
        super().__init__(channel, ctx)
        opts = channel.options
        self.opts: FileOptions = opts if isinstance(opts, FileOptions) else FileOptions()
        self.directory = Path(str(channel.connector_args.get("directory", "."))).absolute()
        self.done_dir = self.directory / self.opts.done_dir
        self.error_dir = self.directory / self.opts.error_dir
        self.files_done = 0
        self.files_failed = 0
        self.last_poll: datetime | None = None
        self.last_problem: str | None = None
        self.current: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.minutes = MinuteFigures(channel.name, ctx.writer)  # the overview's figures, as MLLP's

    # --- lifecycle ---------------------------------------------------------------------------------
    async def open(self) -> None:
        self._stopping.clear()
        self.minutes.start()
        self._task = asyncio.create_task(self._poll_loop(), name=f"file-{self.channel.name}")

    async def close(self) -> None:
        self._stopping.set()  # the message in hand is committed; the loop stops before the next one
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.minutes.stop()

    async def _poll_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.poll()
            except Exception as exc:  # a bug or an odd file system: say so, try again next poll
                self.last_problem = f"{type(exc).__name__}: {exc}"
                log.exception("channel %s: polling %s failed", self.channel.name, self.directory)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.opts.poll_seconds)

    # --- one pass ----------------------------------------------------------------------------------
    async def poll(self) -> int:
        """Read the ready files (at most max_files_per_poll); returns how many were finished."""
        self.last_poll = datetime.now(UTC)
        try:
            ready = await asyncio.to_thread(self._ready_files)
        except OSError as exc:
            problem = f"directory {self.directory} cannot be listed: {exc.strerror or exc}"
            if problem != self.last_problem:
                log.error("channel %s: %s", self.channel.name, problem)
            self.last_problem = problem
            return 0
        self.last_problem = None
        finished = 0
        for path in ready:
            if self._stopping.is_set():
                break
            self.current = path.name
            try:
                if await self._read_file(path):
                    finished += 1
            finally:
                self.current = None
        return finished

    def _ready_files(self) -> list[Path]:
        """Files matching the pattern, unchanged for min_age_seconds, oldest first, bounded."""
        now = time.time()
        found: list[tuple[float, str, Path]] = []
        with os.scandir(self.directory) as it:
            for entry in it:  # one pass over the directory
                if entry.name.startswith(".") or not fnmatch.fnmatch(entry.name, self.opts.pattern):
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                if now - mtime >= self.opts.min_age_seconds:
                    found.append((mtime, entry.name, Path(entry.path)))
        found.sort()
        return [p for _m, _n, p in found[: self.opts.max_files_per_poll]]

    async def _read_file(self, path: Path) -> bool:
        """Apply what is left of one file and move it; False when it stays for the next pass."""
        name = self.channel.name
        try:
            before = path.stat()
            if before.st_size > self.opts.max_file_bytes:
                await self._move(path, ok=False, report=f"file of {before.st_size} bytes exceeds max_file_bytes "
                                                        f"({self.opts.max_file_bytes}); nothing was read\n")
                return True
            data = await asyncio.to_thread(path.read_bytes)
            after = path.stat()
        except FileNotFoundError:
            return False  # taken away meanwhile
        except OSError as exc:
            await self._move(path, ok=False, report=f"file could not be read: {exc.strerror or exc}\n")
            return True
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or len(data) != after.st_size:
            return False  # still being written: next pass
        try:
            messages = split_messages(data)
        except NotHL7 as exc:
            await self._move(path, ok=False, report=f"not an HL7 file: {exc}; nothing was applied\n")
            return True
        sha = hashlib.sha256(data).hexdigest()
        progress = await asyncio.to_thread(self._progress, sha)
        total = len(messages)
        if progress.messages_done:
            log.info("channel %s: %s was read before up to message %d of %d; going on from there",
                     name, path.name, progress.messages_done, total)
        failures = list(progress.failures)
        for index in range(progress.messages_done, total):
            if self._stopping.is_set():
                return False
            t0 = time.perf_counter()
            p = self._prepare(messages[index], path.name, index + 1)
            failure = None
            try:
                stored = await self.ctx.writer.run(
                    lambda s, p=p, i=index: self._store(s, p, path.name, sha, i, total, failures))
            except StorageUnavailable as exc:
                self.ctx.metrics.failed.inc(channel=name, reason="not_stored")
                log.error("channel %s: %s message %d not stored (%s); the file is read again next poll",
                          name, path.name, index + 1, exc)
                return False
            except Exception:
                self.ctx.metrics.failed.inc(channel=name, reason="not_stored")
                log.exception("channel %s: %s message %d could not be stored; the file is read again next poll",
                              name, path.name, index + 1)
                return False
            failure = self._count(stored)
            self.minutes.add(stored.ack_code, time.perf_counter() - t0)
            if failure:
                failures.append(self._failure_of(p, index, stored))
        await self._move(path, ok=not failures, report=self._report(path.name, total, failures))
        return True

    def _prepare(self, raw: bytes, file_name: str, number: int) -> Prepared:
        suffix = f"#{number}"
        room = REMOTE_MAX - len("file:") - len(suffix)
        remote = f"file:{file_name if len(file_name) <= room else file_name[-room:]}{suffix}"
        self.ctx.metrics.received.inc(channel=self.channel.name)
        limit = self.opts.max_message_bytes
        if len(raw) <= limit:
            return self.inbound.prepare(raw, remote)
        p = self.inbound.prepare(raw.split(b"\r", 1)[0] + b"\r", remote)  # the MSH names it in the store
        p.raw, p.size = raw[: 64 * 1024], len(raw)
        p.reject = HL7Error(E.INTERNAL_ERROR, f"message of {len(raw)} bytes exceeds this channel's limit of "
                                              f"{limit} bytes (max_message_bytes); only its first bytes were kept")
        return p

    def _count(self, stored: Stored) -> bool:
        """Metrics as the MLLP listener counts them; True when the message failed (AE/AR)."""
        name, m = self.channel.name, self.ctx.metrics
        if stored.status == MessageStatus.DUPLICATE:
            m.duplicates.inc(channel=name)
        elif stored.status in FAILED_STATUSES:
            m.failed.inc(channel=name, reason=stored.status)
        m.acked.inc(channel=name, code=stored.ack_code)
        return stored.status in FAILED_STATUSES

    @staticmethod
    def _failure_of(p: Prepared, index: int, stored: Stored) -> FileFailure:
        control = p.message.control_id if p.message is not None else guess_control_id(p.raw)
        return {"index": index + 1, "control_id": control, "status": stored.status, "ack": stored.ack_code,
                "message_id": stored.message_id, "error": stored.error or ""}

    # --- the writer's side: the message and the file's progress in one transaction -----------------------
    def _store(self, session: Session, p: Prepared, file_name: str, sha: str, index: int, total: int,
               failures: list[FileFailure]) -> Stored:
        stored = self.inbound.apply(session, p)
        failed = stored.status in FAILED_STATUSES
        done_failures = failures + ([self._failure_of(p, index, stored)] if failed else [])
        row = session.execute(select(FileProgress).where(FileProgress.channel == self.channel.name,
                                                         FileProgress.sha256 == sha)).scalar_one_or_none()
        if row is None:
            row = FileProgress(channel=self.channel.name, file_name=file_name[-512:], sha256=sha, total=total)
            session.add(row)
        row.messages_done = index + 1  # set, not added: a retried job writes the same
        row.failures = done_failures or None
        row.state = "reading" if index + 1 < total else ("error" if done_failures else "done")
        row.updated_at = utcnow()
        session.flush()  # inside the job's SAVEPOINT, with the message
        return stored

    def _progress(self, sha: str) -> Progress:
        with self.ctx.db.read_session() as s:
            row = s.execute(select(FileProgress).where(FileProgress.channel == self.channel.name,
                                                       FileProgress.sha256 == sha)).scalar_one_or_none()
            if row is None:
                return Progress()
            return Progress(row.messages_done, row.total, list(row.failures or []))

    # --- moving -----------------------------------------------------------------------------------
    @staticmethod
    def _report(file_name: str, total: int, failures: list[FileFailure]) -> str:
        if not failures:
            return ""
        lines = [f"{file_name}: {len(failures)} of {total} message(s) were not applied; the others were.",
                 "Each is stored (radbridge messages / GET /api/messages) and can be reprocessed once fixed.", ""]
        for f in failures:
            lines.append(f"message {f['index']} (MSH-10 {f['control_id'] or '?'}): {f['status']} ({f['ack']}), "
                         f"message id {f['message_id']}: {f['error']}")
        return "\n".join(lines) + "\n"

    async def _move(self, path: Path, *, ok: bool, report: str) -> None:
        target = await asyncio.to_thread(self._move_sync, path, ok, report)
        if ok:
            self.files_done += 1
            log.info("channel %s: %s read, moved to %s", self.channel.name, path.name, target)
        else:
            self.files_failed += 1
            log.warning("channel %s: %s moved to %s: %s", self.channel.name, path.name, target,
                        report.splitlines()[0] if report else "")

    def _move_sync(self, path: Path, ok: bool, report: str) -> Path:
        directory = self.done_dir if ok else self.error_dir
        directory.mkdir(parents=True, exist_ok=True)
        target = unique_target(directory, path.name)
        if report:
            Path(f"{target}.error.txt").write_text(report, encoding="utf-8")
        os.replace(path, target)  # unique_target: nothing is there
        return target

    # --- what the API shows ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        out = super().status()
        out["directory"] = str(self.directory)
        out["pattern"] = self.opts.pattern
        out["files"] = {"done": self.files_done, "failed": self.files_failed, "current": self.current}
        out["last_poll"] = self.last_poll.isoformat() if self.last_poll else None
        if self.last_problem:
            out["problem"] = self.last_problem
        return out

    def endpoint(self) -> str:
        return f"(file) reading {self.directory}"

    def health(self) -> dict[str, Any]:
        readable = self.directory.is_dir() and os.access(self.directory, os.R_OK | os.X_OK)
        return {"ok": readable, "directory": str(self.directory), "readable": readable}
