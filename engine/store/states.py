"""The states the store keeps, as StrEnums: each compares equal to the text stored in its column and
shown by the API and the CLI, so a state is written and tested by name, never as a bare string.
The life of each is documented where it changes (docs/channels.md, docs/reconciliation.md,
docs/outbound.md)."""

from __future__ import annotations

from enum import StrEnum


class MessageStatus(StrEnum):
    """An inbound message (messages.status)."""

    RECEIVED = "received"  # stored, not yet applied (only inside the storing transaction)
    PROCESSED = "processed"  # applied; AA / CA
    FILTERED = "filtered"  # a route with action ignore took it; stored and acknowledged, nothing applied
    ERROR = "error"  # could not be applied; AE with ERR; reprocess after fixing the mapping
    REJECTED = "rejected"  # unreadable or unsupported; AR
    DUPLICATE = "duplicate"  # a resend of a message already applied; ACKed again, not applied
    NOT_STORED = "not_stored"  # the store could not take it (never a row: a metrics reason); AR


class StudyState(StrEnum):
    """Study stability (studies.state)."""

    RECEIVING = "receiving"
    STABLE = "stable"  # no new instance for dicom.stable_seconds


class ReconState(StrEnum):
    """Reconciliation of a study (studies.recon_state); docs/reconciliation.md."""

    PENDING = "pending"
    RECONCILED = "reconciled"
    FLAGGED = "flagged"
    UNMATCHED = "unmatched"
    QUARANTINED = "quarantined"


class FindingStatus(StrEnum):
    """A reconciliation finding (findings.status)."""

    OPEN = "open"
    ACCEPTED = "accepted"  # an analyst accepted the difference
    RESOLVED = "resolved"  # coerced, or no longer found


class DeliveryState(StrEnum):
    """An outbound delivery (deliveries.state); docs/outbound.md."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"
    DISCARDED = "discarded"
    SUPERSEDED = "superseded"
