"""The shapes of the index's rows as the layers pass them around: one TypedDict per table.

A row read with ``select(TABLE)`` (engine/domain/records.py ``fetch``, or ``.mappings()``) is a
plain dict at run time; these types only tell mypy which keys it has and what they hold, so a
misspelt column (``order["acession"]``) fails the type check instead of raising KeyError in
production. Each lists every column of its table (tests/test_rows.py keeps them in step with
engine/store/models.py). ``*Values`` types are the partial dicts written back (INSERT / UPDATE
values): any subset of the columns.
"""

from __future__ import annotations

from datetime import datetime
from typing import TypedDict

from engine.store.types import JsonObject


class PatientRow(TypedDict):
    """patients (engine/store/models.py Patient)."""

    id: int
    family_name: str | None
    given_name: str | None
    middle_name: str | None
    prefix: str | None
    suffix: str | None
    birth_date: str | None  # ISO, may be partial (YYYY or YYYY-MM)
    sex: str | None
    extra: JsonObject | None
    address: JsonObject | None  # street, other, city, state, postal_code, country, type (the parts known)
    active: bool
    merged_into_id: int | None
    created_at: datetime
    updated_at: datetime
    source_time: str | None
    version: int


class IdentifierRow(TypedDict):
    """patient_identifiers (PatientIdentifier): (value, issuer) is the patient's identity."""

    id: int
    patient_id: int
    value: str
    issuer: str
    type_code: str | None
    kind: str  # primary | other | alias
    created_at: datetime


class OrderRow(TypedDict):
    """orders (Order)."""

    id: int
    patient_id: int
    placer_number: str | None
    placer_issuer: str | None
    filler_number: str | None
    accession: str | None
    status: str
    last_control: str | None
    procedure_code: str | None
    procedure_text: str | None
    procedure_scheme: str | None
    modality: str | None
    scheduled_at: datetime | None  # wall-clock, the engine's zone
    station_aet: str | None
    priority: str | None
    requested_procedure_id: str | None
    sps_id: str | None
    study_uid: str | None
    reason: str | None
    ordering_provider: str | None
    extra: JsonObject | None
    created_at: datetime
    updated_at: datetime
    source_time: str | None
    version: int


class StudyRow(TypedDict):
    """studies (Study): the header values as received, and the reconciliation's links and state."""

    id: int
    study_uid: str
    dicom_patient_id: str | None
    dicom_issuer: str | None
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    accession: str | None
    study_id: str | None
    study_date: str | None
    study_time: str | None
    description: str | None
    referring_physician: str | None
    modalities: str | None  # backslash-separated, sorted
    specific_charset: str | None
    num_series: int
    num_instances: int
    size_bytes: int
    state: str  # StudyState
    channel: str | None
    first_received_at: datetime
    last_received_at: datetime
    stable_at: datetime | None
    times_stable: int
    patient_id: int | None
    order_id: int | None
    recon_state: str  # ReconState
    matched_by: str | None
    reconciled_at: datetime | None
    times_reconciled: int
    manual_order_id: int | None
    manual_patient_id: int | None


class SeriesRow(TypedDict):
    """series (Series)."""

    id: int
    study_id: int
    series_uid: str
    modality: str | None
    series_number: int | None
    description: str | None
    body_part: str | None
    station_name: str | None
    num_instances: int
    created_at: datetime


class InstanceRow(TypedDict):
    """instances (Instance): one stored file."""

    id: int
    series_id: int
    study_id: int
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    number_of_frames: int | None
    transfer_syntax: str
    storage_key: str
    size_bytes: int
    sha256: str
    calling_aet: str | None
    remote: str | None
    received_at: datetime
    duplicates: int


class MessageValues(TypedDict, total=False):
    """messages (Message): the columns an inbound pipeline writes, any subset of them."""

    id: int
    channel: str
    direction: str
    protocol: str
    received_at: datetime
    remote: str | None
    control_id: str | None
    sending_app: str | None
    sending_facility: str | None
    content_digest: str | None
    message_type: str | None
    version: str | None
    charset: str | None
    size: int
    status: str  # MessageStatus
    ack_code: str | None
    error: str | None
    processed_at: datetime | None
    duplicate_of: int | None
    patient_id: int | None
    attempts: int
    content_pruned: bool
