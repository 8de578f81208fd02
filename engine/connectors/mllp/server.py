"""An asyncio MLLP server: one task per connection, messages on a connection handled in order.

The handler gets each complete frame and returns the replies to write (usually one ACK). The server
never lets a handler's failure or a client's misbehaviour end the listener: errors are logged and
counted, the offending connection is closed, every other connection goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable

from engine.connectors.mllp import frame
from engine.connectors.mllp.framing import Frame, FrameProblem, MLLPDecoder

log = logging.getLogger(__name__)

FrameHandler = Callable[[Frame, str], Awaitable[list[bytes]]]
ProblemHandler = Callable[[FrameProblem, str], Awaitable[None]]


class MLLPServer:
    def __init__(self, name: str, host: str, port: int, handler: FrameHandler, *,
                 on_problem: ProblemHandler | None = None, max_size: int = 10 * 1024 * 1024,
                 idle_timeout: float = 600.0, max_connections: int = 200) -> None:
        self.name = name
        self.host = host
        self.requested_port = port
        self.handler = handler
        self.on_problem = on_problem
        self.max_size = max_size
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[None], bool] = {}  # task -> busy handling a message
        self._stopping = False
        self.connections_total = 0
        self.refused_total = 0

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self.requested_port
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        self._stopping = False
        self._server = await asyncio.start_server(self._on_connect, self.host, self.requested_port,
                                                  reuse_address=True, limit=1024 * 1024)
        log.info("channel %s: MLLP listening on %s:%d", self.name, self.host, self.port)

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop accepting; let messages being handled finish (their ACK is written), then close."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for task, busy in list(self._conns.items()):
            if not busy:
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

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if self._stopping or len(self._conns) >= self.max_connections:
            self.refused_total += 1
            log.warning("channel %s: connection from %s refused (%d open, limit %d)", self.name, remote,
                        len(self._conns), self.max_connections)
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.current_task()
        assert task is not None
        self._conns[task] = False
        self.connections_total += 1
        try:
            await self._serve(reader, writer, remote, task)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("channel %s: connection %s failed", self.name, remote)
        finally:
            self._conns.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, remote: str,
                     task: asyncio.Task[None]) -> None:
        decoder = MLLPDecoder(self.max_size)
        while not self._stopping:
            try:
                data = await asyncio.wait_for(reader.read(256 * 1024), self.idle_timeout)
            except TimeoutError:
                log.info("channel %s: %s idle for %.0fs, closing", self.name, remote, self.idle_timeout)
                problem = decoder.close()
                if problem is not None:
                    await self._problem(problem, remote)
                return
            except (ConnectionError, OSError):
                return
            if not data:
                problem = decoder.close()
                if problem is not None:
                    await self._problem(problem, remote)
                return
            frames, problems = decoder.feed(data)
            for pr in problems:
                await self._problem(pr, remote)
            for fr in frames:
                self._conns[task] = True
                try:
                    replies = await self.handler(fr, remote)
                finally:
                    self._conns[task] = False
                for reply in replies:
                    writer.write(frame(reply))
                try:
                    await writer.drain()
                except (ConnectionError, OSError):
                    log.info("channel %s: %s went away before its ACK was written", self.name, remote)
                    return

    async def _problem(self, problem: FrameProblem, remote: str) -> None:
        log.warning("channel %s: %s: %s", self.name, remote, problem.detail)
        if self.on_problem is not None:
            try:
                await self.on_problem(problem, remote)
            except Exception:
                log.exception("channel %s: recording a framing problem failed", self.name)
