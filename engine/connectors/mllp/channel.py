"""Connector type ``mllp``: an HL7 v2 listener on its own port (docs/channels.md)."""

from __future__ import annotations

from typing import Any

from engine.channels import Channel, ChannelOptions, ConnectorSpec, RoutesKind, check_hl7_options
from engine.config import Settings
from engine.connectors.base import ConnectorContext, ConnectorState, Definitions, ListeningConnector
from engine.connectors.hl7channel import HL7Channel
from engine.connectors.mllp.hl7_listener import HL7Listener
from engine.connectors.mllp.server import MLLPServer
from engine.tls import STREAM_TLS_KEYS, ReloadingContext
from engine.yamlfile import ConfigProblem


def claim_port(channel: Channel, port: int, defs: Definitions) -> list[ConfigProblem]:
    """Record who listens on ``port``; a second user is a problem (0: any free port, never shared)."""
    if port and port in defs.ports:
        return [ConfigProblem(channel.file, 0, "connector.port", f"port {port} is also used by {defs.ports[port]}")]
    if port:
        defs.ports[port] = f"channel {channel.name}"
    return []


class MllpConnector(ListeningConnector, HL7Channel):
    listener: HL7Listener

    spec = ConnectorSpec("mllp", ChannelOptions, ("type", "port"), RoutesKind.MESSAGES,
                         check_options=check_hl7_options, tls_keys=STREAM_TLS_KEYS)

    def __init__(self, channel: Channel, ctx: ConnectorContext) -> None:
        super().__init__(channel, ctx)
        s = ctx.settings
        if channel.tls is not None:
            self.tls = ReloadingContext(channel.tls, f"channel {channel.name}")
        self.listener = HL7Listener(channel, self.inbound, ctx.writer, ctx.metrics, host=s.bind,
                                    port=self.configured_port(channel, s), max_connections=s.mllp.max_connections,
                                    max_buffered_bytes=s.mllp.max_buffered_bytes,
                                    tls=self.tls.context if self.tls is not None else None,
                                    reuse_port=ctx.reuse_port)

    @staticmethod
    def configured_port(channel: Channel, settings: Settings) -> int:
        return channel.port if channel.port is not None else settings.mllp.port

    @classmethod
    def check(cls, channel: Channel, defs: Definitions) -> list[ConfigProblem]:
        return claim_port(channel, cls.configured_port(channel, defs.settings), defs)

    @property
    def server(self) -> MLLPServer:
        return self.listener.server

    @property
    def port(self) -> int:
        return self.server.port

    def status(self) -> dict[str, Any]:
        out = super().status()
        srv = self.server
        if self.state is ConnectorState.LISTENING and not srv.running:
            out["state"] = str(ConnectorState.FAILED)
        out["port"] = srv.port
        out["connections"] = {"open": srv.active_connections, "total": srv.connections_total,
                              "refused": srv.refused_total, "closed_for_room": srv.closed_for_room_total,
                              "buffered_bytes": srv.buffered_bytes, "tls_refused": srv.tls_refused_total}
        return out

    def endpoint(self) -> str:
        return f"on {self.ctx.settings.bind}:{self.port}" + (" (TLS)" if self.tls is not None else "")

    def health(self) -> dict[str, Any]:
        return {"ok": self.server.running, "listening": self.server.running, "port": self.server.port}
