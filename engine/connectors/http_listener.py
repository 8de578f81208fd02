"""The TCP listener of the HTTP server (/health, /metrics, /api/, /fhir/) with a connection cap.

aiohttp's own TCP site accepts every connection. Each one costs a file handle, and the handles are
shared with the MLLP and DICOM listeners: ~20,000 connections that never finished their request
head left none for them. This site counts open connections and answers one over ``max_connections``
with 503 and closes it at once. Each connection gets ``header_timeout`` to send its first complete
request head (timed here), and as long again after each response for the next one (aiohttp's
keep-alive timer, which the engine sets to the same value); each request gets
``body_timeout_seconds`` for its body (engine/web/inputs.py). So slots held by slow or silent
peers come free.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from aiohttp import web

from engine.connectors.limits import LogBudget
from engine.connectors.sharing import check_shared

log = logging.getLogger(__name__)

REFUSAL_BODY = b'{"error": "busy", "detail": "too many open connections (http.max_connections); retry later"}'
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 5\r\n"
           b"Connection: close\r\nContent-Length: " + str(len(REFUSAL_BODY)).encode() + b"\r\n\r\n" + REFUSAL_BODY)


class CountedProtocol(asyncio.Protocol):
    """aiohttp's protocol of one connection, passed everything. It tells the site when it closes,
    and closes the connection when its first request head is not complete within the header
    timeout (aiohttp versions before 3.14 only time a connection out after its first response)."""

    def __init__(self, inner: asyncio.Protocol, site: CappedTCPSite) -> None:
        self.inner = inner
        self.site = site
        self.transport: asyncio.BaseTransport | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes seen, so an end of head split over two reads is found

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(self.site.header_timeout, self._head_too_slow)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            seen = self._tail + data
            if b"\n\n" in seen or b"\n\r\n" in seen:  # the blank line that ends a request head
                self._head_timer.cancel()
                self._head_timer = None
            self._tail = seen[-2:]
        self.inner.data_received(data)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        self.site.head_timeouts_total += 1
        line = self.site.log_budget.note("HTTP connection closed: no complete request head within %gs "
                                         "(http.header_timeout_seconds)")
        if line is not None:
            log.info(line, self.site.header_timeout)
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.transport = None
        self.site.open_connections -= 1
        self.inner.connection_lost(exc)


class RefusedProtocol(asyncio.Protocol):
    """A connection over the cap: 503, then closed (its file handle is free at once)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(REFUSAL)
        transport.close()


class CappedTCPSite(web.BaseSite):
    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, max_connections: int,
                 header_timeout: float, backlog: int = 128, ssl_context: ssl.SSLContext | None = None,
                 reuse_port: bool = False) -> None:
        super().__init__(runner, backlog=backlog)
        self.reuse_port = reuse_port  # SO_REUSEPORT: shared with the other --workers processes
        self.host, self.port = host, port
        self.ssl_context = ssl_context  # HTTPS ([http.tls]); the 503 of a refused connection goes over TLS too
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.open_connections = 0
        self.refused_total = 0
        self.head_timeouts_total = 0
        self.log_budget = LogBudget()

    @property
    def name(self) -> str:
        return f"{'https' if self.ssl_context is not None else 'http'}://{self.host}:{self.port}"

    def _protocol(self) -> asyncio.Protocol:
        if self.open_connections >= self.max_connections:
            self.refused_total += 1
            line = self.log_budget.note("HTTP connection refused: %d open, limit %d (http.max_connections)")
            if line is not None:
                log.warning(line, self.open_connections, self.max_connections)
            return RefusedProtocol()
        server = self._runner.server
        assert server is not None
        self.open_connections += 1
        return CountedProtocol(server(), self)

    async def start(self) -> None:
        if self.reuse_port:
            check_shared(self.port, "the HTTP server")
        await super().start()
        loop = asyncio.get_running_loop()
        # a TLS handshake must be done within the header timeout as well
        self._server = await loop.create_server(
            self._protocol, self.host, self.port, backlog=self._backlog, reuse_address=True, reuse_port=self.reuse_port or None,
            ssl=self.ssl_context,
            ssl_handshake_timeout=self.header_timeout if self.ssl_context is not None else None)
