"""An asyncio MLLP server: one task per connection, messages on a connection handled in order.

The handler gets each complete frame and returns the replies to write (usually one ACK). The server
never lets a handler's failure or a client's misbehaviour end the listener: errors are logged and
counted, the offending connection is closed, every other connection goes on.

Hostile or broken peers cannot lock real senders out: when every connection slot is taken, the
idlest connection (not handling a message) is closed to make room; when the half-sent frames of all
connections together hold more than ``max_buffered_bytes``, the idlest holders are closed until they
fit. Framing problems are gathered per connection (``FramingReport``) and handed on once, before
the connection's next complete frame or when it ends, and logged within a budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ssl import SSLContext

from engine.connectors.limits import LogBudget
from engine.connectors.mllp import frame
from engine.connectors.mllp.framing import Frame, FrameProblem, FramingReport, MLLPDecoder
from engine.connectors.sharing import check_shared

log = logging.getLogger(__name__)

FrameHandler = Callable[[Frame, str], Awaitable[list[bytes]]]
ProblemCounter = Callable[[FrameProblem], None]
ReportHandler = Callable[[FramingReport, str], Awaitable[None]]


@dataclass(eq=False)
class Connection:
    remote: str
    writer: asyncio.StreamWriter
    decoder: MLLPDecoder
    last_received: float = field(default_factory=time.monotonic)  # monotonic time of its last bytes
    busy: bool = False  # a message of it is being handled (its ACK is owed): never closed for room
    closed_because: str = ""  # why the server closed it to make room
    report: FramingReport = field(default_factory=FramingReport)

    def close_for_room(self, reason: str) -> FrameProblem | None:
        """Close it; what its open frame held is freed now, and returned as a truncation."""
        self.closed_because = reason
        self.writer.close()  # the connection's read ends; its task records its problems and exits
        problem = self.decoder.close()
        self.decoder = MLLPDecoder(self.decoder.max_size)
        return problem


class MLLPServer:
    def __init__(self, name: str, host: str, port: int, handler: FrameHandler, *,
                 on_problem: ProblemCounter | None = None, on_report: ReportHandler | None = None,
                 max_size: int = 10 * 1024 * 1024, idle_timeout: float = 120.0, max_connections: int = 200,
                 max_buffered_bytes: int = 256 * 1024 * 1024, tls: SSLContext | None = None,
                 reuse_port: bool = False) -> None:
        self.name = name
        self.reuse_port = reuse_port  # SO_REUSEPORT: shared with the other --workers processes
        self.ssl = tls  # TLS only when given (a channel's tls: block); updated in place on reload
        self.host = host
        self.requested_port = port
        self.handler = handler
        self.on_problem = on_problem  # each problem as it is found (counters)
        self.on_report = on_report  # each connection's problems, once (the stored record)
        self.max_size = max_size
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_buffered_bytes = max_buffered_bytes
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[None], Connection] = {}
        self._stopping = False
        self._log_budget = LogBudget()
        self.connections_total = 0
        self.refused_total = 0
        self.closed_for_room_total = 0
        self.tls_refused_total = 0  # TLS handshakes that failed

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self.requested_port
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    @property
    def buffered_bytes(self) -> int:
        """What the half-received frames of all connections hold."""
        return sum(c.decoder.buffered_bytes for c in self._conns.values())

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        self._stopping = False
        if self.reuse_port:
            check_shared(self.requested_port, f"channel {self.name}")
        # TLS is started on each connection (_on_connect), so a refused handshake is logged with its peer
        self._server = await asyncio.start_server(self._on_connect, self.host, self.requested_port,
                                                  reuse_address=True, limit=1024 * 1024,
                                                  reuse_port=self.reuse_port or None)
        log.info("channel %s: MLLP%s listening on %s:%d", self.name, "/TLS" if self.ssl else "", self.host, self.port)

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop accepting; let messages being handled finish (their ACK is written), then close."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for task, conn in list(self._conns.items()):
            if not conn.busy:
                task.cancel()
        pending = list(self._conns)
        if pending:
            _done, still = await asyncio.wait(pending, timeout=drain_timeout)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=2)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        self._server = None

    def _warn(self, msg: str, *args: object) -> None:
        line = self._log_budget.note(msg)
        if line is not None:
            log.warning("channel %s: " + line, self.name, *args)

    def _idlest(self, conns: list[Connection]) -> Connection | None:
        candidates = [c for c in conns if not c.busy and not c.closed_because]
        return min(candidates, key=lambda c: c.last_received) if candidates else None

    def _make_room(self) -> bool:
        """A new connection came with every slot taken: close the idlest one (False: all are busy)."""
        victim = self._idlest(list(self._conns.values()))
        if victim is None:
            return False
        idle = time.monotonic() - victim.last_received
        self._close_for_room(victim, f"closed to make room for a new connection ({len(self._conns)} open, "
                                     f"limit {self.max_connections}; idle {idle:.0f}s)")
        return True

    def _close_for_room(self, victim: Connection, reason: str) -> None:
        self.closed_for_room_total += 1
        problem = victim.close_for_room(reason)
        if problem is not None:
            self._problem(victim, problem)

    def _limit_buffers(self) -> None:
        """Close the idlest connections holding a half-sent frame until all of them fit."""
        total = self.buffered_bytes
        while total > self.max_buffered_bytes:
            victim = self._idlest([c for c in self._conns.values() if c.decoder.buffered_bytes])
            if victim is None:
                return
            total -= victim.decoder.buffered_bytes
            self._close_for_room(victim, f"closed: half-sent frames of all connections exceed {self.max_buffered_bytes} "
                                         "bytes (max_buffered_bytes) and this one was the idlest")

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if self._stopping or (len(self._conns) >= self.max_connections and not self._make_room()):
            self.refused_total += 1
            self._warn("connection from %s refused (%d open and busy, limit %d)", remote, len(self._conns),
                       self.max_connections)
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl is not None and not await self._start_tls(writer, remote):
            return
        task = asyncio.current_task()
        assert task is not None
        conn = Connection(remote, writer, MLLPDecoder(self.max_size))
        self._conns[task] = conn
        self.connections_total += 1
        try:
            await self._serve(reader, conn)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("channel %s: connection %s failed", self.name, remote)
        finally:
            conn.busy = True  # its problems are recorded before stop() may cancel it
            try:
                problem = conn.decoder.close()
                if problem is not None:
                    self._problem(conn, problem)
                await self._hand_on_report(conn)
            except asyncio.CancelledError:
                pass
            finally:
                self._conns.pop(task, None)
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1)

    async def _start_tls(self, writer: asyncio.StreamWriter, remote: str) -> bool:
        """The TLS handshake of a new connection, within the idle timeout (at most a minute); a
        failure (plain text, an untrusted or missing client certificate, TLS older than 1.2) is
        logged with the peer and the connection closed."""
        assert self.ssl is not None
        try:
            await writer.start_tls(self.ssl, ssl_handshake_timeout=min(self.idle_timeout, 60.0))
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            self.tls_refused_total += 1
            reason = getattr(exc, "reason", None) or type(exc).__name__
            self._warn("TLS handshake with %s failed: %s", remote, reason)
            writer.close()
            return False
        return True

    async def _serve(self, reader: asyncio.StreamReader, conn: Connection) -> None:
        writer, remote = conn.writer, conn.remote
        while not self._stopping:
            try:
                data = await asyncio.wait_for(reader.read(256 * 1024), self.idle_timeout)
            except TimeoutError:
                log.info("channel %s: %s idle for %.0fs, closing", self.name, remote, self.idle_timeout)
                return
            except (ConnectionError, OSError):
                return
            if conn.closed_because:
                log.info("channel %s: %s %s", self.name, remote, conn.closed_because)
                return
            if not data:
                return
            conn.last_received = time.monotonic()
            frames, problems = conn.decoder.feed(data)
            for pr in problems:
                self._problem(conn, pr)
            self._limit_buffers()
            for fr in frames:
                conn.busy = True
                try:
                    await self._hand_on_report(conn)  # the problems before this frame are recorded first
                    replies = await self.handler(fr, remote)
                finally:
                    conn.busy = False
                for reply in replies:
                    writer.write(frame(reply))
                try:
                    await writer.drain()
                except (ConnectionError, OSError):
                    log.info("channel %s: %s went away before its ACK was written", self.name, remote)
                    return

    def _problem(self, conn: Connection, problem: FrameProblem) -> None:
        if conn.report.total == 0:
            self._warn("%s: %s", conn.remote, problem.detail)
        conn.report.add(problem)
        if self.on_problem is not None:
            self.on_problem(problem)

    async def _hand_on_report(self, conn: Connection) -> None:
        report = conn.report
        if report.total == 0:
            return
        conn.report = FramingReport()
        if report.total > 1:
            self._warn("%s: %s", conn.remote, report.summary())
        if self.on_report is not None:
            try:
                await self.on_report(report, conn.remote)
            except Exception:
                log.exception("channel %s: recording framing problems failed", self.name)
