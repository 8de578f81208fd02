"""Listening ports shared by several engine processes (`radbridge run --workers N`, docs/scaling.md).

With ``reuse_port`` each listener (MLLP, DICOM, HTTP) sets SO_REUSEPORT before it binds, so every
worker process of one `run` binds the same port and the kernel spreads new connections over them.
Only the workers of ``--workers`` ask for it: a single engine still fails loudly when its port is
taken. Port 0 (any free port) cannot be shared: each process would get a port of its own.
"""

from __future__ import annotations

import socket

from engine.errors import RadBridgeError


class UnsharablePort(RadBridgeError, OSError):
    """A listener asked to share port 0, or a platform without SO_REUSEPORT."""


def check_shared(port: int, what: str) -> None:
    """Refuse what SO_REUSEPORT cannot share (raised at start: the engine is not started)."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise UnsharablePort(f"{what}: this platform has no SO_REUSEPORT; run one process per port instead of --workers")
    if port == 0:
        raise UnsharablePort(f"{what}: port 0 (any free port) cannot be shared by --workers processes; "
                             "configure a fixed port")


def set_reuse_port(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
