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


class AttemptOutcome(StrEnum):
    """What one delivery attempt came to (delivery_attempts.outcome)."""

    DELIVERED = "delivered"  # the destination took it (AA/CA, 2xx)
    RETRY = "retry"  # try again after a backoff (AR, timeout, refused, 5xx ...)
    DEAD = "dead"  # the answer says the message itself is wrong, or max_attempts was reached
    DISCARDED = "discarded"  # an operator discarded it (no attempt was made)


class FindingAction(StrEnum):
    """What reconciliation did about a finding (findings.action); docs/reconciliation.md."""

    COERCED = "coerced"  # the headers were changed to the order's / patient's values
    FLAGGED = "flagged"  # left as received; the study is flagged for a person to look at
    REJECTED = "rejected"  # the policy says reject: the study is quarantined
    NOTED = "noted"  # an info-level difference: recorded, never flags or quarantines


class InstanceOutcome(StrEnum):
    """What indexing one received DICOM instance came to (the C-STORE / metrics outcome)."""

    STORED = "stored"  # a new instance
    DUPLICATE = "duplicate"  # the same SOP Instance UID with the same content: nothing changed
    OVERWRITTEN = "overwritten"  # the same SOP Instance UID, other content, and the policy replaces
    REJECTED = "rejected"  # the same SOP Instance UID, other content, and the policy refuses
    UID_CONFLICT = "uid_conflict"  # its Series (or SOP Instance) UID is indexed under another study (series): refused


class CommitmentState(StrEnum):
    """A Storage Commitment transaction asked of a DICOM destination (storage_commitments.state);
    docs/dicom.md, "Storage commitment"."""

    REQUESTED = "requested"  # N-ACTION sent (or about to be); no report yet
    COMMITTED = "committed"  # the report commits every instance asked for
    FAILED = "failed"  # the report lists failures (or accounts for fewer instances), the N-ACTION was refused,
    # or the caller gave up waiting; a report arriving later is still recorded
