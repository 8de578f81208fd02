"""Connector type ``dicom-forward``: stored studies (with their reconciled headers) forwarded to PACS or
VNA by C-STORE, through the outbox: a delivery row per destination, written in the transaction of the
event its route names (engine/outbound/forward.py), sent by a worker per destination
(engine/outbound/worker.py) with a DICOM sender (engine/connectors/dicom/forward.py). docs/forwarding.md.

    name: pacs-forward
    connector: {type: dicom-forward}
    destinations:
      pacs: {aet: PACS, host: 10.0.0.20, port: 104}
    routes:
      - when: [study.reconciled, study.corrected]
        filter: {modality: [CT, MR]}
        to: pacs
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.channels import Channel, ConnectorSpec, ForwardDestination, RoutesKind
from engine.connectors.base import ConnectorContext, Definitions
from engine.connectors.dicom.forward import DicomForwarder, forward_tls_context
from engine.connectors.dicom.forward_commitment import CommittingForwarder
from engine.connectors.outbound import DeliveringConnector
from engine.outbound.forward import ForwardOutbox
from engine.outbound.worker import DeliveryWorkers, DestinationWorker
from engine.store import leases
from engine.yamlfile import ConfigProblem


@dataclass
class ForwardOptions:
    """A dicom-forward channel's settings live on its destinations and routes; options: takes nothing yet."""


class ForwardConnector(DeliveringConnector):
    spec = ConnectorSpec("dicom-forward", ForwardOptions, ("type",), RoutesKind.FORWARD)

    def __init__(self, channel: Channel, ctx: ConnectorContext) -> None:
        super().__init__(channel, ctx)
        s = ctx.settings
        self.outbox = ForwardOutbox(channel)
        self.outbox.subscribe(ctx.events)  # deliveries are written in the transaction of their event
        self.service = DeliveryWorkers()
        self.forwarders: dict[str, DicomForwarder] = {}
        worker_id = str(leases.this_process())
        for dest in self.forward_destinations(channel):
            calling = dest.calling_aet or s.dicom.aet
            forwarder = DicomForwarder(dest, ctx.db, ctx.storage(), calling_aet=calling)
            sender: DicomForwarder | CommittingForwarder = forwarder
            if dest.storage_commitment:  # delivered only once the destination reports every instance committed
                sender = CommittingForwarder(forwarder, ctx.writer, calling_aet=calling)
            w = DestinationWorker(dest, dest.address, None, ctx.writer, ctx.metrics, worker_id,
                                  lease_seconds=s.database.lease_seconds, log_patient_details=s.log_patient_details)
            w.sender = sender
            self.forwarders[dest.name] = forwarder
            self.service.workers[dest.name] = w

    @staticmethod
    def forward_destinations(channel: Channel) -> list[ForwardDestination]:
        return [d for d in channel.destinations.values() if isinstance(d, ForwardDestination)]

    @classmethod
    def check(cls, channel: Channel, defs: Definitions) -> list[ConfigProblem]:
        """Destination names are unique across every enabled channel (deliveries are claimed by
        destination name); a destination no enabled route sends to, and storage_commitment without a
        dicom channel to take the reports, are warnings."""
        problems: list[ConfigProblem] = []
        used = {r.to for r in channel.forward_routes if r.enabled}
        mine = defs.channels.index(channel) if channel in defs.channels else len(defs.channels)
        for dest in cls.forward_destinations(channel):
            where = f"destinations.{dest.name}"
            for i, other in enumerate(defs.channels):
                if other is channel or not other.enabled or dest.name not in other.destinations:
                    continue
                if other.connector != channel.connector or i < mine:  # said once per pair
                    problems.append(ConfigProblem(channel.file, dest.line, where,
                                                  f"destination name {dest.name!r} is also used by channel "
                                                  f"{other.name}: deliveries are claimed by destination name, so "
                                                  "every destination of every channel needs a name of its own"))
            if dest.name not in used:
                problems.append(ConfigProblem(channel.file, dest.line, where, "no enabled route sends here",
                                              "warning"))
            if dest.storage_commitment and not any(c.enabled and c.connector == "dicom" for c in defs.channels):
                problems.append(ConfigProblem(channel.file, dest.line, f"{where}.storage_commitment",
                                              "no enabled dicom channel: a destination that sends its storage "
                                              "commitment report on an association of its own (most do) has "
                                              "nowhere to send it, and deliveries wait until "
                                              "commitment_timeout_seconds, again and again", "warning"))
        return problems

    async def open(self) -> None:
        for name, sender in self.forwarders.items():
            sender.tls = forward_tls_context(sender.dest)  # a missing or bad file stops the start, named
            self.service.workers[name].address = sender.target
        await super().open()

    def take_queued(self) -> int:
        return self.outbox.take_queued()

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["destinations"] = self.destinations_status("dicom")
        out["routes"] = [{"when": r.when, "to": r.to, "enabled": r.enabled,
                          "filter": {k: v for k, v in vars(r.filter).items() if v}}
                         for r in self.channel.forward_routes]
        return out

    def health(self) -> dict[str, Any]:
        """Always ok (a PACS being down must not take the engine out of service); says which destination
        is failing."""
        return {"ok": True, "destinations": {
            name: {"address": w.address, "failing": bool(w.failures), "failed_passes_in_a_row": w.failures}
            for name, w in self.service.workers.items()}}
