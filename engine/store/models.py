"""Typed ORM models of the index.

Messages keep their metadata (one row each, never rewritten) apart from their content (raw bytes,
mapped fields, ACK), so retention can drop content in small batches without touching what the
admin API lists.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from engine.store.states import CommitmentState, DeliveryState, FindingStatus, ReconState, StudyState
from engine.store.types import JSONType, UTCDateTime, utcnow

# Auto-increment BIGINT on PostgreSQL, INTEGER PRIMARY KEY (the rowid) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSONType, datetime: UTCDateTime}


# --- messages --------------------------------------------------------------------------------------

class Message(Base):
    """One inbound or outbound message as the engine saw it."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(64))
    direction: Mapped[str] = mapped_column(String(3), default="in")  # in / out
    protocol: Mapped[str] = mapped_column(String(8), default="hl7v2")
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    remote: Mapped[str | None] = mapped_column(String(64))
    # MSH-10 may be 199 characters (v2.7+) and MSH-3/-4 (HD) 227: kept whole, so duplicate detection
    # compares the whole control ID of the whole sender
    control_id: Mapped[str | None] = mapped_column(String(199))
    sending_app: Mapped[str | None] = mapped_column(String(227))
    sending_facility: Mapped[str | None] = mapped_column(String(227))
    # HL7: Message.content_digest() (the message without MSH-7); a resend matches it, a reused
    # control ID with other content does not
    content_digest: Mapped[str | None] = mapped_column(String(64))
    message_type: Mapped[str | None] = mapped_column(String(32))
    version: Mapped[str | None] = mapped_column(String(16))
    charset: Mapped[str | None] = mapped_column(String(32))
    size: Mapped[int] = mapped_column(Integer, default=0)
    # MessageStatus: received -> processed | filtered | error (AE) | rejected (AR) | duplicate (re-ACKed)
    status: Mapped[str] = mapped_column(String(16))
    ack_code: Mapped[str | None] = mapped_column(String(2))
    error: Mapped[str | None] = mapped_column(Text)
    processed_at: Mapped[datetime | None]
    # indexed (ix_messages_duplicate_of, only the duplicates): deleting a message (retention) must
    # find what refers to it without a scan
    duplicate_of: Mapped[int | None] = mapped_column(BigId, ForeignKey("messages.id", ondelete="SET NULL"))
    patient_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("patients.id", ondelete="SET NULL"))
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    content_pruned: Mapped[bool] = mapped_column(Boolean, default=False)

    content: Mapped[MessageContent | None] = relationship(
        back_populates="message", cascade="all, delete-orphan", passive_deletes=True, uselist=False)
    events: Mapped[list[MessageEvent]] = relationship(
        back_populates="message", cascade="all, delete-orphan", passive_deletes=True,
        order_by="MessageEvent.id")

    __table_args__ = (
        Index("ix_messages_control", "control_id", "sending_app", "sending_facility"),
        Index("ix_messages_received", "received_at"),
        Index("ix_messages_patient", "patient_id"),
        # The console's message search (migration 0018): a filter with id, so "newest first, 50 at a
        # time" reads one index range backwards on PostgreSQL too (SQLite's indexes end in the rowid
        # anyway). (status, id) replaced (status); channels are few, so a channel filter reads the
        # primary key backwards and needs no index of its own (one index less on every insert).
        Index("ix_messages_status_id", "status", "id"),
        Index("ix_messages_type_id", "message_type", "id"),
        # Nearly every message is not a duplicate: an index of all rows would be one more page in
        # every durable commit for entries nobody looks up (migration 0010).
        Index("ix_messages_duplicate_of", "duplicate_of", sqlite_where=text("duplicate_of IS NOT NULL"),
              postgresql_where=text("duplicate_of IS NOT NULL")),
    )


class MessageContent(Base):
    """What was received and what became of it; dropped by retention before the metadata row."""

    __tablename__ = "message_content"

    message_id: Mapped[int] = mapped_column(BigId, ForeignKey("messages.id", ondelete="CASCADE"),
                                            primary_key=True)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    mapped: Mapped[dict[str, Any] | None]
    ack: Mapped[str | None] = mapped_column(Text)

    message: Mapped[Message] = relationship(back_populates="content")


class MessageEvent(Base):
    """Something that happened to a message beyond the ordinary: notes, errors, reprocessing."""

    __tablename__ = "message_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(BigId, ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any] | None]

    message: Mapped[Message] = relationship(back_populates="events")


# --- patients --------------------------------------------------------------------------------------

class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    family_name: Mapped[str | None] = mapped_column(String(128))
    given_name: Mapped[str | None] = mapped_column(String(128))
    middle_name: Mapped[str | None] = mapped_column(String(128))
    prefix: Mapped[str | None] = mapped_column(String(32))
    suffix: Mapped[str | None] = mapped_column(String(32))
    birth_date: Mapped[str | None] = mapped_column(String(10))  # ISO, may be partial (YYYY or YYYY-MM)
    sex: Mapped[str | None] = mapped_column(String(16))
    extra: Mapped[dict[str, Any] | None]
    # PID-11 / Patient.address: {street, other, city, state, postal_code, country, type}, the parts known
    address: Mapped[dict[str, Any] | None]
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    merged_into_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("patients.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # event time of the newest message applied (EVN-2, else MSH-7): older updates do not overwrite
    source_time: Mapped[str | None] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer, default=1)

    identifiers: Mapped[list[PatientIdentifier]] = relationship(
        back_populates="patient", cascade="all, delete-orphan", order_by="PatientIdentifier.id")
    orders: Mapped[list[Order]] = relationship(back_populates="patient", order_by="Order.id")
    history: Mapped[list[PatientChange]] = relationship(
        back_populates="patient", cascade="all, delete-orphan", order_by="PatientChange.id")

    # The message search follows merges (patients merged into the one found); only merged patients
    # are in it, so it costs nothing on ordinary inserts (migration 0018).
    __table_args__ = (Index("ix_patients_merged_into", "merged_into_id", sqlite_where=text("merged_into_id IS NOT NULL"),
                            postgresql_where=text("merged_into_id IS NOT NULL")),)


class PatientChange(Base):
    """What a message did to a patient: created, updated (field: [old, new]), merged, identifiers."""

    __tablename__ = "patient_history"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    patient_id: Mapped[int] = mapped_column(BigId, ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    message_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("messages.id", ondelete="SET NULL"),
                                                   index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))
    changes: Mapped[dict[str, Any] | None]
    source_time: Mapped[str | None] = mapped_column(String(32))

    patient: Mapped[Patient] = relationship(back_populates="history")


class PatientIdentifier(Base):
    """(value, issuer) is unique: the identity rule. kind is primary, other or alias (after a merge)."""

    __tablename__ = "patient_identifiers"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    patient_id: Mapped[int] = mapped_column(BigId, ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    value: Mapped[str] = mapped_column(String(64))
    issuer: Mapped[str] = mapped_column(String(64), default="")
    type_code: Mapped[str | None] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(8), default="primary")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="identifiers")

    __table_args__ = (UniqueConstraint("value", "issuer", name="uq_patient_identifier"),)


# --- orders ----------------------------------------------------------------------------------------

class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    patient_id: Mapped[int] = mapped_column(BigId, ForeignKey("patients.id"), index=True)
    placer_number: Mapped[str | None] = mapped_column(String(64), index=True)
    placer_issuer: Mapped[str | None] = mapped_column(String(64))
    filler_number: Mapped[str | None] = mapped_column(String(64), index=True)
    accession: Mapped[str | None] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(8))
    last_control: Mapped[str | None] = mapped_column(String(4))
    procedure_code: Mapped[str | None] = mapped_column(String(64))
    procedure_text: Mapped[str | None] = mapped_column(String(255))
    procedure_scheme: Mapped[str | None] = mapped_column(String(32))
    modality: Mapped[str | None] = mapped_column(String(16))
    scheduled_at: Mapped[datetime | None] = mapped_column(DateTime)  # wall-clock, the engine's zone
    station_aet: Mapped[str | None] = mapped_column(String(16))
    priority: Mapped[str | None] = mapped_column(String(16))
    requested_procedure_id: Mapped[str | None] = mapped_column(String(64))
    sps_id: Mapped[str | None] = mapped_column(String(64))
    study_uid: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    ordering_provider: Mapped[str | None] = mapped_column(String(255))
    extra: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    source_time: Mapped[str | None] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer, default=1)  # FHIR meta.versionId / ETag

    patient: Mapped[Patient] = relationship(back_populates="orders")
    history: Mapped[list[OrderStatusChange]] = relationship(
        back_populates="order", cascade="all, delete-orphan", order_by="OrderStatusChange.id")


class OrderStatusChange(Base):
    """Every status an order was asked to take, applied or not, and why."""

    __tablename__ = "order_status_history"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    order_id: Mapped[int] = mapped_column(BigId, ForeignKey("orders.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    control: Mapped[str | None] = mapped_column(String(4))
    from_status: Mapped[str | None] = mapped_column(String(8))
    to_status: Mapped[str] = mapped_column(String(8))
    applied: Mapped[bool] = mapped_column(Boolean, default=True)
    note: Mapped[str | None] = mapped_column(Text)
    message_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("messages.id", ondelete="SET NULL"),
                                                   index=True)
    source_time: Mapped[str | None] = mapped_column(String(32))

    order: Mapped[Order] = relationship(back_populates="history")


# --- studies (the DICOM index; the files themselves live in storage) ------------------------------

class Study(Base):
    """One study as received. Patient attributes are as the headers carry them (C-FIND answers
    with them); ``patient_id`` / ``order_id`` link it to the domain once it is reconciled."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    dicom_patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    dicom_issuer: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))  # DICOM DA, as received
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    accession: Mapped[str | None] = mapped_column(String(64), index=True)
    study_id: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)
    study_time: Mapped[str | None] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(String(255))
    referring_physician: Mapped[str | None] = mapped_column(String(324))
    modalities: Mapped[str | None] = mapped_column(String(64))  # backslash-separated, sorted
    specific_charset: Mapped[str | None] = mapped_column(String(64))
    num_series: Mapped[int] = mapped_column(Integer, default=0)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # receiving -> stable (no new instance for dicom.stable_seconds); a new instance reopens it
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING, index=True)
    channel: Mapped[str | None] = mapped_column(String(64))
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    stable_at: Mapped[datetime | None]
    times_stable: Mapped[int] = mapped_column(Integer, default=0)
    patient_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("patients.id"), index=True)
    order_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("orders.id"), index=True)
    # reconciliation: pending -> reconciled | flagged | unmatched | quarantined (see docs/reconciliation.md)
    recon_state: Mapped[str] = mapped_column(String(16), default=ReconState.PENDING, index=True)
    matched_by: Mapped[str | None] = mapped_column(String(16))  # accession | patient_id | manual
    reconciled_at: Mapped[datetime | None]
    times_reconciled: Mapped[int] = mapped_column(Integer, default=0)
    # an analyst's match (radbridge studies match): used instead of the headers until cleared
    manual_order_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("orders.id"))
    manual_patient_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("patients.id"))

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")
    findings: Mapped[list[Finding]] = relationship(order_by="Finding.id", viewonly=True)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(BigId, ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    description: Mapped[str | None] = mapped_column(String(255))
    body_part: Mapped[str | None] = mapped_column(String(64))
    station_name: Mapped[str | None] = mapped_column(String(64))
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", order_by="Instance.id")


class Instance(Base):
    """One stored file: where it is (storage key), what it is, and its checksum."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    series_id: Mapped[int] = mapped_column(BigId, ForeignKey("series.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(BigId, ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(400))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    remote: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # how often the same SOP Instance UID came again (identical or not), and what was done
    duplicates: Mapped[int] = mapped_column(Integer, default=0)

    series: Mapped[Series] = relationship(back_populates="instances")


class DomainEvent(Base):
    """Something the reconciliation and outbound work act on (study.stable, study.reopened ...).

    Written in the transaction that caused it; consumers keep their own position (id)."""

    __tablename__ = "domain_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    study_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("studies.id", ondelete="SET NULL"))
    patient_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("patients.id", ondelete="SET NULL"))
    order_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("orders.id", ondelete="SET NULL"))
    detail: Mapped[dict[str, Any] | None]

    # Every message writes events, so each index here is pages in every durable commit: only the
    # studies' events are looked up (a study's history), and only they are indexed.
    __table_args__ = (Index("ix_domain_events_study_id", "study_id", sqlite_where=text("study_id IS NOT NULL"),
                            postgresql_where=text("study_id IS NOT NULL")),)


# --- reconciliation --------------------------------------------------------------------------------

class Finding(Base):
    """Something reconciliation found about a study, with its evidence and what was done about it.

    action: coerced (headers rewritten), flagged (kept, needs a look), rejected (study quarantined),
    noted (information). status: open until a later reconciliation no longer finds it, or an
    analyst resolves it."""

    __tablename__ = "study_findings"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(BigId, ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    severity: Mapped[str] = mapped_column(String(8))  # info | warning | error
    attribute: Mapped[str | None] = mapped_column(String(64))
    received: Mapped[str | None] = mapped_column(Text)  # what the headers said
    expected: Mapped[str | None] = mapped_column(Text)  # what the order / patient says
    action: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=FindingStatus.OPEN)  # FindingStatus
    resolved_at: Mapped[datetime | None]
    resolution: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any] | None]

    __table_args__ = (Index("ix_study_findings_status", "status", "study_id"),)


class InstanceRevision(Base):
    """A stored file replaced by a rewritten one (coercion): both checksums, and why."""

    __tablename__ = "instance_revisions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    instance_id: Mapped[int] = mapped_column(BigId, ForeignKey("instances.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    reason: Mapped[str] = mapped_column(String(16))  # COERCE | CORRECT (PS3.3 C.12.1.1.9.2)
    old_key: Mapped[str] = mapped_column(String(400))
    old_sha256: Mapped[str] = mapped_column(String(64))
    old_size: Mapped[int] = mapped_column(BigInteger)
    new_key: Mapped[str] = mapped_column(String(400))
    new_sha256: Mapped[str] = mapped_column(String(64))
    new_size: Mapped[int] = mapped_column(BigInteger)
    changes: Mapped[dict[str, Any] | None]  # attribute: [old, new]


class ReconcileJob(Base):
    """A study waiting to be (re)reconciled: one row per study, written in the transaction that
    caused it (stability, an order or ADT message, a manual match). Workers lease rows (SKIP
    LOCKED on PostgreSQL); a trigger arriving while a row is leased bumps ``generation`` so the
    worker runs it again instead of deleting it."""

    __tablename__ = "reconcile_queue"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(BigId, ForeignKey("studies.id", ondelete="CASCADE"), unique=True)
    reasons: Mapped[str] = mapped_column(String(255))
    generation: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    next_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    leased_until: Mapped[datetime | None]
    leased_by: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)


# --- outbound (transactional outbox) ---------------------------------------------------------------

class Delivery(Base):
    """One message owed to a destination (an ImagingStudy to the EHR's FHIR server, an ORU^R01 to its
    results inbox), written in the transaction of the domain change that causes it.

    state: pending (waiting, being sent or backing off) -> delivered | dead (attempts exhausted or a
    permanent refusal; ``radbridge deliveries retry`` puts it back) | discarded (by an operator) |
    superseded (a newer ImagingStudy for the same study replaced it before it was sent).
    Deliveries with the same ``order_key`` (the patient) for one destination go out in id order."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    channel: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str] = mapped_column(String(64))
    mapping: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(32))  # study.reconciled | study.corrected | report.received
    study_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("studies.id", ondelete="SET NULL"), index=True)
    instance_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("instances.id", ondelete="SET NULL"))
    patient_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("patients.id", ondelete="SET NULL"))
    order_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("orders.id", ondelete="SET NULL"))
    order_key: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[datetime] = mapped_column(default=utcnow)
    leased_until: Mapped[datetime | None]
    leased_by: Mapped[str | None] = mapped_column(String(64))
    # what is sent: rendered from the store at the first attempt and kept, so every retry sends the
    # same bytes (the same MSH-10); `deliveries retry --rebuild` renders it again
    payload: Mapped[str | None] = mapped_column(Text)
    content_type: Mapped[str | None] = mapped_column(String(64))
    control_id: Mapped[str | None] = mapped_column(String(64))  # MSH-10 / request id, from the id
    target: Mapped[str | None] = mapped_column(String(512))  # the URL or host:port it went to
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None]
    detail: Mapped[dict[str, Any] | None]

    __table_args__ = (
        Index("ix_deliveries_due", "destination", "state", "next_at"),
        Index("ix_deliveries_order", "destination", "order_key", "state", "id"),
        Index("ix_deliveries_state", "state", "id"),
    )


class DeliveryAttempt(Base):
    """One try at sending a delivery, with what came back."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(BigId, ForeignKey("deliveries.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str] = mapped_column(String(16))  # delivered | retry | dead
    status: Mapped[str | None] = mapped_column(String(32))  # ACK code, HTTP status, timeout, refused ...
    response: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(64))


class StorageCommitment(Base):
    """One Storage Commitment (Push Model) transaction asked of a DICOM destination
    (engine/store/commitments.py): what was asked, and what the destination's N-EVENT-REPORT said.

    state: requested -> committed (every instance committed) | failed (failures reported, or fewer
    instances accounted for, or the N-ACTION refused / no report in time: ``error`` says which).
    Only the first report of a transaction is recorded (``answered_at`` set); a repeat changes nothing."""

    __tablename__ = "storage_commitments"

    transaction_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    destination: Mapped[str] = mapped_column(String(64))
    delivery_id: Mapped[int | None] = mapped_column(BigInteger, index=True)  # deliveries.id (no FK)
    study_id: Mapped[int | None] = mapped_column(BigInteger)  # studies.id (no FK: retention may drop the study)
    requested_at: Mapped[datetime] = mapped_column(default=utcnow)
    state: Mapped[str] = mapped_column(String(16), default=CommitmentState.REQUESTED)
    instances: Mapped[int] = mapped_column(Integer)  # SOP instances asked for
    committed: Mapped[int] = mapped_column(Integer, default=0)  # listed in the report's Referenced SOP Sequence
    failed: Mapped[list[Any] | None] = mapped_column(JSONType)  # [{sop_instance_uid, reason}] (Failure Reason)
    answered_at: Mapped[datetime | None]
    answered_by: Mapped[str | None] = mapped_column(String(16))  # calling AE title of the report
    error: Mapped[str | None] = mapped_column(Text)  # why failed without (or besides) a failure list

    __table_args__ = (Index("ix_storage_commitments_state", "state", "requested_at"),)


# --- audit ------------------------------------------------------------------------------------------

class AuditEvent(Base):
    """One entry of the audit trail (engine/store/audit.py): a read of patient data (a FHIR read or
    search, an admin API lookup), written before the data is sent, or an action that changes state
    (reprocess, retry, match, mapping reload, start...), written in the action's own transaction.
    Who, from where, what, on which patient/study/message/delivery, and how it ended (``status``:
    an HTTP status, also for CLI and engine actions; below 400 is success). Append-only: only
    retention (``[retention] audit_days``) deletes rows."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    agent: Mapped[str] = mapped_column(String(64), index=True)  # token name, "cli:<os user>", "engine:<host>"
    remote: Mapped[str | None] = mapped_column(String(64))
    cert_subject: Mapped[str | None] = mapped_column(String(256))  # the client certificate's subject (mutual TLS)
    action: Mapped[str] = mapped_column(String(16))  # engine.store.audit.AuditAction
    resource_type: Mapped[str] = mapped_column(String(32))
    query: Mapped[str | None] = mapped_column(Text)  # the request path and query string, or the command
    status: Mapped[int] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(Integer, default=0)  # resources returned (reads), objects changed
    patient_ids: Mapped[list[int] | None] = mapped_column(JSONType)  # whose data was read or changed
    study_uid: Mapped[str | None] = mapped_column(String(64))
    message_id: Mapped[int | None] = mapped_column(BigId)
    delivery_id: Mapped[int | None] = mapped_column(BigId)
    detail: Mapped[str | None] = mapped_column(Text)


# --- file connector ---------------------------------------------------------------------------------

class FileProgress(Base):
    """How far a file channel got with one file's content: written in the same transaction as each of
    its messages, so a restart resumes after the last committed message (engine/connectors/file.py)."""

    __tablename__ = "file_progress"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(64))
    file_name: Mapped[str] = mapped_column(String(512))  # the name it had when it was read
    sha256: Mapped[str] = mapped_column(String(64))  # of the whole content: the same bytes are read once
    messages_done: Mapped[int] = mapped_column(Integer, default=0)  # messages committed, in file order
    total: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16))  # reading | done | error (some message was AE/AR)
    failures: Mapped[list[Any] | None] = mapped_column(JSONType)  # [{index, control_id, status, error}]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("channel", "sha256", name="uq_file_progress"),)


# --- HTTP tokens ------------------------------------------------------------------------------------

class ApiToken(Base):
    """A named bearer token for /api/, /fhir/ and /metrics, with its roles (engine/store/tokens.py).

    Only the SHA-256 of the secret is kept: the secret is printed once, by ``radbridge tokens
    create``. Revoked tokens stay (revoked_at set) so the audit trail's names keep meaning one token."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)  # hex
    roles: Mapped[str] = mapped_column(String(128))  # Role values, sorted, comma-separated
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]



class ConsoleSession(Base):
    """A login to the operator console (engine/store/sessions.py): the cookie's secret is kept only
    as its SHA-256; the token it was opened with is named and hashed, so revoking the token ends it."""

    __tablename__ = "console_sessions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)  # hex
    token_name: Mapped[str] = mapped_column(String(64))
    token_sha256: Mapped[str] = mapped_column(String(64))  # hex, of the token's secret
    csrf: Mapped[str] = mapped_column(String(64))  # the hidden field of every form of this session
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class MessageMinute(Base):
    """Messages of one channel in one minute: counts by ACK code and the ACK latency in buckets
    (engine/store/minutes.py). The overview's hour/day figures and 24-hour chart read these rows
    (1,440 per channel and day) rather than the messages table; written by the listeners every few
    seconds, so they survive a restart; older than two days they are dropped."""

    __tablename__ = "message_minutes"

    channel: Mapped[str] = mapped_column(String(64), primary_key=True)
    minute: Mapped[datetime] = mapped_column(primary_key=True)  # the minute's start, UTC
    received: Mapped[int] = mapped_column(Integer, default=0)
    aa: Mapped[int] = mapped_column(Integer, default=0)
    ae: Mapped[int] = mapped_column(Integer, default=0)
    ar: Mapped[int] = mapped_column(Integer, default=0)
    other: Mapped[int] = mapped_column(Integer, default=0)  # duplicates re-ACKed with CA/CE/..., none sent
    latency_sum_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    # ACK latency histogram: l0 counts ACKs within LATENCY_BOUNDS_MS[0], ..., l10 the rest
    l0: Mapped[int] = mapped_column(Integer, default=0)
    l1: Mapped[int] = mapped_column(Integer, default=0)
    l2: Mapped[int] = mapped_column(Integer, default=0)
    l3: Mapped[int] = mapped_column(Integer, default=0)
    l4: Mapped[int] = mapped_column(Integer, default=0)
    l5: Mapped[int] = mapped_column(Integer, default=0)
    l6: Mapped[int] = mapped_column(Integer, default=0)
    l7: Mapped[int] = mapped_column(Integer, default=0)
    l8: Mapped[int] = mapped_column(Integer, default=0)
    l9: Mapped[int] = mapped_column(Integer, default=0)
    l10: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (Index("ix_message_minutes_minute", "minute"),)
