"""What every connector is: one class per ``connector: type`` in channels/*.yaml.

A connector type says how its channel file reads (``spec``: options dataclass, keys, routes), checks
what only the whole configuration can tell (``check``: mappings of the right kind, ports in use),
and runs one channel (``start``/``stop``) with what the runtime hands every connector
(``ConnectorContext``). Its ``status()`` is what /api/channels shows: the state comes from the
running object, never from a guess by the caller.

Lifecycle, as pynetdicom's association: STOPPED -> STARTING -> LISTENING or RUNNING -> STOPPING
-> STOPPED; a start that raises leaves FAILED with the reason. A disabled channel is never built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol

from engine.channels import Channel, ConnectorSpec
from engine.config import Settings
from engine.domain.events import EventBus
from engine.mappings.registry import MappingRegistry
from engine.metrics import Metrics
from engine.storage.base import ObjectStorage
from engine.store.db import Database
from engine.tls import ReloadingContext
from engine.yamlfile import ConfigProblem

log = logging.getLogger(__name__)


class ConnectorState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    LISTENING = "listening"  # accepting connections on its own port
    RUNNING = "running"  # working without a port of its own (served on HTTP, polling, sending)
    STOPPING = "stopping"
    FAILED = "failed"
    DISABLED = "disabled"


@dataclass
class Definitions:
    """Everything loaded from config/, channels/ and mappings/: what ``check`` may look at."""

    settings: Settings
    mappings: MappingRegistry
    channels: list[Channel]
    ports: dict[int, str] = field(default_factory=dict)  # port -> who uses it, filled while checking


@dataclass
class ConnectorContext:
    """What the runtime hands every connector: shared services, never another connector."""

    settings: Settings
    db: Database
    writer: Any  # engine.pipeline.writer.IngestWriter (or InlineWriter): run(job(Session))
    mappings: MappingRegistry
    metrics: Metrics
    storage: Callable[[], ObjectStorage]  # the study storage, created on first use
    events: EventBus  # the domain event bus: what connectors apply publishes here, outboxes subscribe
    # told of each TLS certificate reload tried (what happened, whether it took): the audit trail
    on_tls_reload: Callable[[str, bool], Awaitable[None]] | None = None
    # listeners bind with SO_REUSEPORT: this is one of the processes of `radbridge run --workers N`
    reuse_port: bool = False


class Connector(ABC):
    """One running channel of one connector type."""

    spec: ClassVar[ConnectorSpec]
    stores_studies: ClassVar[bool] = False  # the runtime runs study stability and reconciliation for these

    def __init__(self, channel: Channel, ctx: ConnectorContext) -> None:
        self.channel = channel
        self.ctx = ctx
        self.state = ConnectorState.STOPPED
        self.failure: str | None = None

    @property
    def name(self) -> str:
        return self.channel.name

    @classmethod
    def check(cls, channel: Channel, defs: Definitions) -> list[ConfigProblem]:
        """Problems only the whole configuration shows (a mapping of the wrong kind, a port in use)."""
        return []

    async def start(self) -> None:
        self.state = ConnectorState.STARTING
        try:
            await self.open()
        except BaseException as exc:
            self.state, self.failure = ConnectorState.FAILED, f"{type(exc).__name__}: {exc}"
            raise
        self.state = self.running_state

    async def stop(self) -> None:
        if self.state in (ConnectorState.STOPPED, ConnectorState.FAILED):
            return
        self.state = ConnectorState.STOPPING
        try:
            await self.close()
        finally:
            self.state = ConnectorState.STOPPED

    @property
    def running_state(self) -> ConnectorState:
        return ConnectorState.RUNNING

    @abstractmethod
    async def open(self) -> None:
        """Start working (bind, start tasks). Raise to fail the engine's start."""

    @abstractmethod
    async def close(self) -> None:
        """Stop taking new work, finish what is in hand (its answers are sent), release resources."""

    def status(self) -> dict[str, Any]:
        """/api/channels: the common part; subclasses add connections and counters."""
        out: dict[str, Any] = {"name": self.channel.name, "connector": self.channel.connector,
                               "enabled": self.channel.enabled, "description": self.channel.description,
                               "state": str(self.state)}
        if self.failure:
            out["failure"] = self.failure
        return out

    def endpoint(self) -> str | None:
        """Where peers reach this channel, for the start-up line "NAME ENDPOINT" (None: nowhere of its own).
        Scripts read that line (e.g. "hl7-inbound on 127.0.0.1:2575"): keep its shape."""
        return None

    def health(self) -> dict[str, Any] | None:
        """/health: None when the connector has nothing to say; else at least {"ok": bool}."""
        return None


def disabled_status(channel: Channel) -> dict[str, Any]:
    return {"name": channel.name, "connector": channel.connector, "enabled": False,
            "description": channel.description, "state": str(ConnectorState.DISABLED)}


ConnectorTypes = Mapping[str, type[Connector]]


class Listener(Protocol):
    """What a connector with a port of its own runs (the MLLP and DICOM listeners)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ListeningConnector(Connector):
    """A connector that accepts connections on its own port: its listener starts and stops with it,
    and ``/api/channels`` reports it ``listening``. Subclasses set ``self.listener``, and
    ``self.tls`` when the channel has a ``tls:`` block (its certificate is then loaded again when
    its files change, while the listener runs)."""

    listener: Listener
    tls: ReloadingContext | None = None
    _tls_watch: asyncio.Task[None] | None = None

    @property
    def running_state(self) -> ConnectorState:
        return ConnectorState.LISTENING

    @property
    def has_tls(self) -> bool:
        """Whether this listener speaks TLS only (the channel's tls: block)."""
        return self.channel.tls is not None

    async def open(self) -> None:
        await self.listener.start()
        if self.tls is not None and self.tls.settings.reload_seconds > 0:
            self.tls.on_reload = self.ctx.on_tls_reload
            self._tls_watch = asyncio.create_task(self.tls.watch(), name=f"tls-reload-{self.name}")

    async def close(self) -> None:
        if self._tls_watch is not None:
            self._tls_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tls_watch
            self._tls_watch = None
        await self.listener.stop()

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["tls"] = self.tls_status()
        return out

    def tls_status(self) -> dict[str, Any] | None:
        if self.tls is None:
            return None
        t = self.tls.settings
        return {"cert": t.cert, "client_certs": str(t.client_certs), "reloads": self.tls.reloads}
