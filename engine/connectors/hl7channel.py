"""What every connector that takes HL7 v2 shares (mllp, file): the channel's inbound stage,
its counters, and reprocessing a stored message through the same steps."""

from __future__ import annotations

from typing import Any, TypedDict

from sqlalchemy.orm import Session

from engine.channels import Channel
from engine.connectors.base import Connector, ConnectorContext
from engine.domain.patients import OutcomeSummary
from engine.pipeline.hl7_inbound import HL7Inbound, check_reprocessable, reprocess
from engine.store.models import Message

ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR")



class Reprocessed(TypedDict):
    """What reprocessing a stored message came to (POST /api/messages/{id}/reprocess)."""

    message_id: int | None
    status: str
    error: str | None
    outcome: OutcomeSummary | None


class HL7Counters(TypedDict):
    """A channel's message counters since the engine started (/api/channels)."""

    received: float
    acked: dict[str, float]  # by ACK code, those seen
    duplicates: float
    errors: float
    rejected: float
    not_stored: float

class HL7Channel(Connector):
    """A channel whose messages are HL7 v2: routes, mappings, ACKs."""

    def __init__(self, channel: Channel, ctx: ConnectorContext) -> None:
        super().__init__(channel, ctx)
        s = ctx.settings
        self.inbound = HL7Inbound(channel, ctx.mappings, app_name=s.name, facility=s.facility, bus=ctx.events)

    def reprocess(self, session: Session, row: Message) -> Reprocessed:
        """Run a stored message through prepare and apply again (after a mapping fix)."""
        check_reprocessable(row)
        st = reprocess(session, self.inbound, row)
        return {"message_id": st.message_id, "status": st.status, "error": st.error,
                "outcome": st.outcome.as_dict() if st.outcome else None}

    def counters(self) -> HL7Counters:
        m, name = self.ctx.metrics, self.channel.name
        return {
            "received": m.received.value(channel=name),
            "acked": {c: m.acked.value(channel=name, code=c) for c in ACK_CODES if m.acked.value(channel=name, code=c)},
            "duplicates": m.duplicates.value(channel=name),
            "errors": m.failed.value(channel=name, reason="error"),
            "rejected": m.failed.value(channel=name, reason="rejected"),
            "not_stored": m.failed.value(channel=name, reason="not_stored"),
        }

    def status(self) -> dict[str, Any]:
        out = super().status()
        names = dict.fromkeys(m for r in self.channel.routes for m in r.mappings)  # each once, in route order
        out["counters"] = self.counters()
        out["routes"] = [{"messages": r.messages, "action": r.action, "mappings": r.mappings}
                         for r in self.channel.routes]
        out["mapping_problems"] = [str(p) for n in names for p in self.ctx.mappings.problems(n)]
        return out
