"""A blocking MLLP client: `radbridge send hl7`, the demo, and tests of our own sender side."""

from __future__ import annotations

import re
import socket
import ssl
from typing import Any, overload

from engine.connectors.mllp import EB, frame


class MLLPClient:
    def __init__(self, host: str, port: int, timeout: float = 30.0, *, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> None:
        """``tls``: speak MLLP over TLS with this client context (engine.tls.client_context); the
        server's certificate must name ``server_hostname`` (default: host)."""
        self.host, self.port, self.timeout = host, port, timeout
        self.tls, self.server_hostname = tls, server_hostname or host
        self.sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> MLLPClient:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_hostname=self.server_hostname)
            except BaseException:
                sock.close()
                raise
        self.sock = sock
        return self

    @property
    def peer_certificate(self) -> dict[str, Any] | None:
        """The server's verified certificate (TLS only)."""
        return self.sock.getpeercert() if isinstance(self.sock, ssl.SSLSocket) else None

    def __exit__(self, *_exc: object) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, message: bytes) -> bytes:
        """Send one message and wait for one reply frame; returns its payload."""
        assert self.sock is not None, "use MLLPClient as a context manager"
        self.sock.sendall(frame(message))
        return self.read_reply()

    @overload
    def read_reply(self) -> bytes: ...

    @overload
    def read_reply(self, timeout: float) -> bytes | None: ...

    def read_reply(self, timeout: float | None = None) -> bytes | None:
        """The next reply frame; with ``timeout``, None when none arrives in time."""
        assert self.sock is not None
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            while EB not in self._buf:
                try:
                    chunk = self.sock.recv(65536)
                except TimeoutError:
                    if timeout is None:
                        raise
                    return None
                if not chunk:
                    raise ConnectionError("the server closed the connection before replying")
                self._buf += chunk
        finally:
            if timeout is not None:
                self.sock.settimeout(self.timeout)
        end = self._buf.index(EB)
        payload, self._buf = self._buf[:end], self._buf[end + 1:]
        self._buf = self._buf.lstrip(b"\r")
        return payload.lstrip(b"\x0b")


def split_messages(data: bytes) -> list[bytes]:
    """A file may hold several messages: each starts with MSH; CR, LF or CRLF end segments."""
    text = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    parts = re.split(rb"\r(?=MSH)", text.strip(b"\r"))
    return [p.strip(b"\r") + b"\r" for p in parts if p.strip(b"\r")]
