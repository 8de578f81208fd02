"""Connector type ``fhir``: the FHIR R4 endpoint at /fhir/ on the engine's HTTP port.

The channel owns routing and mapping (``FhirInbound``); the HTTP server serves it. One fhir channel
can be enabled (it owns the /fhir/ path)."""

from __future__ import annotations

from typing import Any

from engine.channels import (
    FHIR_ROUTE_RESOURCES,
    Channel,
    ConnectorSpec,
    FhirOptions,
    RoutesKind,
    check_fhir_options,
)
from engine.connectors.base import Connector, ConnectorContext, Definitions
from engine.outbound.mapping import OutboundMapping
from engine.pipeline.fhir_inbound import FhirInbound
from engine.yamlfile import ConfigProblem


class FhirConnector(Connector):
    spec = ConnectorSpec("fhir", FhirOptions, ("type",), RoutesKind.MESSAGES, route_resources=FHIR_ROUTE_RESOURCES,
                         check_options=check_fhir_options)

    def __init__(self, channel: Channel, ctx: ConnectorContext) -> None:
        super().__init__(channel, ctx)
        self.inbound = FhirInbound(channel, ctx.mappings, bus=ctx.events)

    @classmethod
    def check(cls, channel: Channel, defs: Definitions) -> list[ConfigProblem]:
        """One fhir channel (it owns /fhir/); each route's mappings read the resource it routes."""
        problems = []
        others = [c.name for c in defs.channels if c.enabled and c.connector == channel.connector and c is not channel]
        first = next((c for c in defs.channels if c.enabled and c.connector == channel.connector), channel)
        if others and first is not channel:
            problems.append(ConfigProblem(channel.file, 0, "connector.type", f"channel {first.name} already serves "
                                          "/fhir/; only one fhir channel can be enabled"))
        for i, r in enumerate(channel.routes):
            for name in r.mappings:
                m = defs.mappings.get(name)
                if m is None:
                    continue  # reported with the mapping file's own problems
                if m.source != "fhir" or m.resource not in r.messages:
                    problems.append(ConfigProblem(channel.file, r.line, f"routes[{i + 1}].mappings",
                                                  f"{name!r} reads {m.source} {m.resource or ''}".rstrip() +
                                                  f"; this route takes {', '.join(r.messages)} (source: fhir, "
                                                  f"resource: {r.messages[0]})"))
        if defs.mappings.get_as(channel.fhir.imagingstudy_mapping, OutboundMapping) is None:
            problems.append(ConfigProblem(channel.file, 0, "options.imagingstudy_mapping",
                                          f"no outbound mapping named {channel.fhir.imagingstudy_mapping!r} "
                                          "(source: store, resource: ImagingStudy) for ImagingStudy reads"))
        return problems

    async def open(self) -> None:
        """Nothing to bind: the HTTP server routes /fhir/ here once it is up."""

    async def close(self) -> None:
        """Requests in hand finish with the HTTP server's shutdown."""

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["path"] = "/fhir/"
        out["routes"] = [{"messages": r.messages, "action": r.action, "mappings": r.mappings}
                         for r in self.channel.routes]
        names = dict.fromkeys(m for r in self.channel.routes for m in r.mappings)
        out["mapping_problems"] = [str(p) for n in names for p in self.ctx.mappings.problems(n)]
        return out
