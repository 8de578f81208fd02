"""What the HTTP layer may use of the engine: typed aiohttp ``AppKey``s and two small protocols.

``build_app`` is handed the running engine (as ``EngineServices``) and ``provide`` puts the services
handlers need on the root application under the keys below. Handlers are plain module-level
functions; they read ``request.app[KEY]`` in the root app and ``request.config_dict[KEY]`` in the
/api/ and /fhir/ sub-apps (which see the root's keys through it). Nothing in ``engine/web``
imports ``engine.runtime``: the engine is known here only through these protocols.
"""

from __future__ import annotations

import secrets
from typing import Any, Protocol

from aiohttp import web

from engine.config import Settings
from engine.connectors.dicom.scp import DicomListener
from engine.connectors.hl7channel import Reprocessed
from engine.mappings.registry import MappingRegistry
from engine.metrics import Metrics
from engine.pipeline.fhir_inbound import FhirInbound
from engine.pipeline.writer import IngestWriter
from engine.storage.base import ObjectStorage
from engine.store.audit import Actor
from engine.store.db import Database
from engine.store.sessions import OpenSession
from engine.store.tokens import Principal


class EngineControl(Protocol):
    """What handlers ask of the running engine itself, rather than of one of its services."""

    @property
    def storage(self) -> ObjectStorage | None:
        """The study storage (free space for /health), None when no channel stores studies."""

    def configured_tokens(self) -> list[tuple[Principal, bytes]]:
        """The tokens that are not rows of api_tokens, as (principal, SHA-256 of the secret):
        configured (http.tokens, RADBRIDGE_API_TOKEN) and generated (<storage dir>/api-token); each
        holds every role. Hashed once, not per request."""
        ...

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Each channel's health for /health; False when any is not ok."""
        ...

    def storage_floor_mb(self) -> int: ...

    def stow_listener(self) -> DicomListener | None:
        """The DICOM channel STOW-RS stores through (C-STORE's own path), None when none is enabled."""

    def channel_status(self) -> list[dict[str, Any]]: ...

    def cleanup_status(self) -> dict[str, Any]:
        """The storage lifecycle: its settings, the last pass (counts deleted, bytes freed), totals since start."""
        ...

    async def reprocess(self, message_id: int, actor: Actor) -> Reprocessed:
        """Apply a stored message again; its audit row (``actor``) is in the same transaction."""
        ...

    async def reload_mappings(self) -> list[str]:
        """Recompile the mapping files changed on disk now, as the watcher does; the names reloaded."""
        ...

    def wake_reconciler(self) -> None: ...

    def wake_outbound(self) -> None: ...


class EngineServices(EngineControl, Protocol):
    """What ``build_app`` needs of the engine: its services (put under the keys) and its controls."""

    @property
    def settings(self) -> Settings: ...

    @property
    def db(self) -> Database: ...

    @property
    def writer(self) -> IngestWriter: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def mappings(self) -> MappingRegistry: ...

    @property
    def fhir(self) -> FhirInbound | None: ...


SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
WRITER = web.AppKey("writer", IngestWriter)
METRICS = web.AppKey("metrics", Metrics)
MAPPINGS = web.AppKey("mappings", MappingRegistry)
FHIR_INBOUND = web.AppKey[FhirInbound | None]("fhir_inbound")  # None: no fhir channel is enabled (reads only)
ENGINE = web.AppKey[EngineControl]("engine")

# Set on every request that passed the token check (engine/web/auth.py): the token's name and roles
# (with http.auth = "none": "anonymous", every role). Handlers read it with request[PRINCIPAL].
PRINCIPAL = web.RequestKey("radbridge_principal", Principal)
# Set when the request came with a console session cookie (engine/web/auth.py): its CSRF secret
# goes into every form the page renders.
SESSION = web.RequestKey("radbridge_session", OpenSession)
# With [http] auth = "none" there is no session: the console's forms carry this engine-wide secret.
CONSOLE_CSRF = web.AppKey("console_csrf", str)


def provide(app: web.Application, engine: EngineServices) -> None:
    """Put the engine's services on ``app`` (the root app; sub-apps read them via config_dict).

    Called once the connectors have started (the HTTP app is built last), so the fhir channel's
    inbound stage is known by then."""
    app[SETTINGS] = engine.settings
    app[DATABASE] = engine.db
    app[WRITER] = engine.writer
    app[METRICS] = engine.metrics
    app[MAPPINGS] = engine.mappings
    app[FHIR_INBOUND] = engine.fhir
    app[ENGINE] = engine
    app[CONSOLE_CSRF] = secrets.token_urlsafe(24)
