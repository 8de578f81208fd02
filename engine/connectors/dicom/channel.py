"""Connector type ``dicom``: a DICOM SCP (storage, query/retrieve, worklist) on its own port."""

from __future__ import annotations

from typing import Any

from engine.channels import Channel, ConnectorSpec, DicomOptions, RoutesKind, check_dicom_options
from engine.config import Settings
from engine.connectors.base import ConnectorContext, ConnectorState, Definitions, ListeningConnector
from engine.connectors.dicom.scp import DicomListener
from engine.connectors.mllp.channel import claim_port
from engine.reconciliation.rules import ReconciliationRules
from engine.tls import TLS_KEYS, ReloadingContext
from engine.yamlfile import ConfigProblem

STORE_OUTCOMES = ("stored", "duplicate", "overwritten", "rejected_duplicate", "uid_conflict", "invalid",
                  "out_of_resources", "not_stored", "failed")
SERVICES = ("echo", "find", "mwl", "move", "get", "commitment")


class DicomConnector(ListeningConnector):
    listener: DicomListener

    spec = ConnectorSpec("dicom", DicomOptions, ("type", "port", "aet"), RoutesKind.NONE,
                         check_options=check_dicom_options, tls_keys=TLS_KEYS)
    stores_studies = True

    def __init__(self, channel: Channel, ctx: ConnectorContext) -> None:
        super().__init__(channel, ctx)
        s = ctx.settings
        if channel.tls is not None:  # the handshake runs in the association's thread, not the accepting one
            self.tls = ReloadingContext(channel.tls, f"channel {channel.name}", deferred_handshake=True)
        self.listener = DicomListener(channel, s, db=ctx.db, writer=ctx.writer, storage=ctx.storage(),
                                      metrics=ctx.metrics, host=s.bind, port=self.configured_port(channel, s),
                                      bus=ctx.events, ssl_context=self.tls.context if self.tls is not None else None,
                                      reuse_port=ctx.reuse_port)
        if self.tls is not None:
            self.tls.replace = self.listener.use_ssl_context

    @staticmethod
    def configured_port(channel: Channel, settings: Settings) -> int:
        return channel.port if channel.port is not None else settings.dicom.port

    @classmethod
    def check(cls, channel: Channel, defs: Definitions) -> list[ConfigProblem]:
        problems = claim_port(channel, cls.configured_port(channel, defs.settings), defs)
        rules = channel.dicom.reconciliation_rules
        if rules and defs.mappings.get_as(rules, ReconciliationRules) is None:
            problems.append(ConfigProblem(channel.file, 0, "options.reconciliation_rules",
                                          f"no reconciliation rules named {rules!r} in the mappings directory "
                                          "(a file with source: reconciliation; \"\" uses the built-in rules)"))
        return problems

    @property
    def port(self) -> int:
        return self.listener.port

    @property
    def aet(self) -> str:
        return self.listener.aet

    def status(self) -> dict[str, Any]:
        out = super().status()
        d, m, name = self.listener, self.ctx.metrics, self.channel.name
        if self.state is ConnectorState.LISTENING and not d.running:
            out["state"] = str(ConnectorState.FAILED)
        out.update({
            "port": d.port, "aet": d.aet,
            "associations": {"open": d.active_associations, "total": d.associations_total,
                             "refused": d.refused_total},
            "counters": {"instances": {o: m.dicom_stored.value(channel=name, outcome=o) for o in STORE_OUTCOMES
                                       if m.dicom_stored.value(channel=name, outcome=o)},
                         "requests": {sv: m.dicom_requests.value(channel=name, service=sv) for sv in SERVICES
                                      if m.dicom_requests.value(channel=name, service=sv)}},
            "options": {"duplicates": self.channel.dicom.duplicates,
                        "allowed_calling_aets": self.channel.dicom.allowed_calling_aets,
                        "calling_ae_hosts": self.channel.dicom.calling_ae_hosts,
                        "max_associations": self.channel.dicom.max_associations},
        })
        return out

    def endpoint(self) -> str:
        return f"(DICOM {self.aet}) on {self.ctx.settings.bind}:{self.port}" + (" (TLS)" if self.tls is not None else "")

    def health(self) -> dict[str, Any]:
        d = self.listener
        return {"ok": d.running, "listening": d.running, "port": d.port, "aet": d.aet,
                "min_free_mb": self.channel.dicom.min_free_mb}
