"""Connector type ``outbound``: deliveries to the EHR (ORU^R01 over MLLP, FHIR ImagingStudy), one
worker per destination, fed by the transactional outbox (engine/outbound/)."""

from __future__ import annotations

from typing import Any

from engine.channels import Channel, ConnectorSpec, OutboundOptions, RoutesKind
from engine.connectors.base import Connector, ConnectorContext, Definitions
from engine.outbound.mapping import OutboundMapping
from engine.outbound.worker import DeliveryWorkers, DestinationWorker, OutboundService, address_of
from engine.yamlfile import ConfigProblem


class DeliveringConnector(Connector):
    """A connector whose workers send rows of the deliveries table (outbound, dicom-forward): the
    runtime wakes them after a pass that queued deliveries, and stops them before the writer."""

    service: DeliveryWorkers

    def take_queued(self) -> int:
        """Deliveries this channel's routes queued since the last call."""
        return 0

    async def open(self) -> None:
        self.service.start()

    async def close(self) -> None:
        await self.service.stop()  # a batch being sent finishes and is recorded

    def wake(self) -> None:
        """Deliveries were queued or put back: send now rather than at the next poll."""
        self.service.wake()

    def destinations_status(self, kind: str | None = None) -> dict[str, Any]:
        """/api/channels: each destination's address, and whether its worker is pausing after failures."""
        return {name: destination_status(w, kind) for name, w in self.service.workers.items()}


def destination_status(w: DestinationWorker, kind: str | None = None) -> dict[str, Any]:
    return {"type": kind or w.dest.type, "address": w.address, "paused_seconds": w.paused_for,
            "failed_passes_in_a_row": w.failures}


class OutboundConnector(DeliveringConnector):
    spec = ConnectorSpec("outbound", OutboundOptions, ("type",), RoutesKind.OUTBOUND)

    service: OutboundService

    def __init__(self, channel: Channel, ctx: ConnectorContext) -> None:
        super().__init__(channel, ctx)
        self.service = OutboundService(ctx.settings, ctx.db, ctx.writer, ctx.mappings, [channel], ctx.storage(),
                                       ctx.metrics)
        self.service.outbox.subscribe(ctx.events)  # deliveries are written in the transaction of their event

    @classmethod
    def check(cls, channel: Channel, defs: Definitions) -> list[ConfigProblem]:
        """Each route's mapping builds what its destination speaks; a destination without an address is
        a warning (nothing is queued for it), not an error: a site may take only HL7 or only FHIR."""
        problems = []
        for i, r in enumerate(channel.outbound_routes):
            dest = channel.destinations.get(r.to)
            m = defs.mappings.get_as(r.mapping, OutboundMapping)
            where = f"routes[{i + 1}].mapping"
            if m is None:
                problems.append(ConfigProblem(channel.file, r.line, where, f"{r.mapping!r} is not an outbound mapping "
                                              "(a mappings/ file with source: store)"))
            elif dest is not None and m.target != ("fhir" if dest.type == "fhir" else "hl7v2"):
                problems.append(ConfigProblem(channel.file, r.line, where, f"{r.mapping!r} builds {m.target} but "
                                              f"destination {dest.name!r} is {dest.type}"))
            elif "report.received" in r.events and len(r.events) > 1:
                problems.append(ConfigProblem(channel.file, r.line, f"routes[{i + 1}].events",
                                              "report.received builds from the report: give it a route of its own"))
        for dest in channel.destinations.values():
            if not address_of(dest, defs.settings):
                key = "fhir_base" if dest.type == "fhir" else "mllp"
                problems.append(ConfigProblem(channel.file, dest.line, f"destinations.{dest.name}",
                                              f"[ehr] {key} is empty (RADBRIDGE_EHR_{key.upper()}): nothing is sent "
                                              "here", "warning"))
            for other in defs.channels:
                if other is channel or not other.enabled or other.connector != channel.connector:
                    continue
                if dest.name in other.destinations and defs.channels.index(other) < defs.channels.index(channel):
                    problems.append(ConfigProblem(channel.file, dest.line, f"destinations.{dest.name}",
                                                  f"destination name {dest.name!r} is also used by channel "
                                                  f"{other.name}: deliveries are claimed by destination name"))
        return problems

    def take_queued(self) -> int:
        return self.service.outbox.take_queued()

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["destinations"] = self.destinations_status()
        out["routes"] = [{"events": r.events, "to": r.to, "mapping": r.mapping, "enabled": r.enabled}
                         for r in self.channel.outbound_routes]
        return out
