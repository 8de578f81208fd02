"""The DICOM index: record received instances, study stability, study events.

A study is *receiving* while instances arrive and becomes *stable* when none arrived for
``dicom.stable_seconds``; that raises a ``study.stable`` domain event (reconciliation and outbound
act on it). An instance arriving for a stable study reopens it (``study.reopened``) and it becomes
stable again later. Stability is claimed with a conditional UPDATE, so several engine processes
sharing a database raise each event once.

The functions here return the events they raise (``StoreResult.events``, ``mark_stable``); the
caller publishes them on the bus in the same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypedDict

from sqlalchemy import Connection, Table, bindparam, or_, select

from engine.dicom.headers import InstanceHeader
from engine.domain.events import (
    DuplicateIgnored,
    DuplicateRejected,
    Event,
    InstanceDuplicate,
    InstanceOverwritten,
    InstanceReceived,
    StudyReceived,
    StudyReopened,
    StudyStable,
)
from engine.domain.records import add, fetch, fetch_all, update_row
from engine.domain.rows import InstanceRow, SeriesRow, StudyRow
from engine.storage.base import StoredObject
from engine.store.models import Finding, Instance, InstanceRevision, Series, Study
from engine.store.states import InstanceOutcome, StudyState
from engine.store.types import utcnow

STUDIES: Table = Study.__table__  # type: ignore[assignment]
SERIES: Table = Series.__table__  # type: ignore[assignment]
INSTANCES: Table = Instance.__table__  # type: ignore[assignment]
FINDINGS: Table = Finding.__table__  # type: ignore[assignment]
REVISIONS: Table = InstanceRevision.__table__  # type: ignore[assignment]

STUDY_BY_UID = select(STUDIES).where(STUDIES.c.study_uid == bindparam("uid"))
SERIES_BY_UID = select(SERIES).where(SERIES.c.series_uid == bindparam("uid"))
INSTANCE_BY_UID = select(INSTANCES).where(INSTANCES.c.sop_instance_uid == bindparam("uid"))
STUDY_ATTRS = {  # header keyword -> studies column
    "PatientID": "dicom_patient_id", "IssuerOfPatientID": "dicom_issuer", "PatientName": "patient_name",
    "PatientBirthDate": "patient_birth_date", "PatientSex": "patient_sex", "AccessionNumber": "accession",
    "StudyID": "study_id", "StudyDate": "study_date", "StudyTime": "study_time",
    "StudyDescription": "description", "ReferringPhysicianName": "referring_physician",
    "SpecificCharacterSet": "specific_charset",
}
SERIES_ATTRS = {"Modality": "modality", "SeriesNumber": "series_number", "SeriesDescription": "description",
                "BodyPartExamined": "body_part", "StationName": "station_name"}
LIMITS = {"patient_name": 324, "referring_physician": 324, "description": 255, "dicom_patient_id": 64,
          "dicom_issuer": 64, "accession": 64, "study_id": 16, "study_date": 8, "study_time": 16,
          "patient_birth_date": 8, "patient_sex": 16, "specific_charset": 64, "modality": 16, "body_part": 64,
          "station_name": 64}


class _StudyCounts(TypedDict):
    """What indexing an instance reads of its study (all of a StudyRow, or a study just added)."""

    id: int
    state: str
    num_series: int
    num_instances: int
    size_bytes: int
    modalities: str | None


class _StudyChanges(TypedDict, total=False):
    """What indexing an instance changes on its study."""

    last_received_at: datetime
    state: str
    num_series: int
    num_instances: int
    size_bytes: int
    modalities: str


class _DuplicateResult(TypedDict):
    instance_id: int
    study_id: int
    identical: bool


class _ReportRef(TypedDict):
    id: int
    sop_class_uid: str


@dataclass
class StoreResult:
    outcome: InstanceOutcome
    instance_id: int | None  # None: refused (UID_CONFLICT), nothing indexed
    study_id: int
    stored_key: str | None  # the key the index points at now (None: refused)
    replaced_key: str | None = None  # a file no longer referenced (overwrite): delete after commit
    identical: bool = False
    events: list[Event] = field(default_factory=list)  # for the caller to publish
    refusal: str | None = None  # UID_CONFLICT: why, short enough for an Error Comment (64)


SERIES_OF_ANOTHER_STUDY = "SeriesInstanceUID already belongs to another study"
INSTANCE_OF_ANOTHER_SERIES = "SOPInstanceUID already stored in another study or series"


def clip(column: str, value: Any) -> Any:
    limit = LIMITS.get(column)
    if limit and isinstance(value, str) and len(value) > limit:
        return value[:limit]
    return value


def record_instance(conn: Connection, hdr: InstanceHeader, stored: StoredObject, *, policy: str, channel: str,
                    calling_aet: str | None, remote: str | None) -> StoreResult:
    """Index one received file (already durable in storage). Runs inside the writer's transaction;
    the caller publishes ``events`` of the result in it."""
    now = utcnow()
    existing = fetch(conn, INSTANCE_BY_UID, InstanceRow, uid=hdr.sop_instance_uid)
    if existing is not None:
        return _duplicate(conn, existing, hdr, stored, policy=policy, now=now, calling_aet=calling_aet)
    events: list[Event] = []
    study: _StudyCounts | None = fetch(conn, STUDY_BY_UID, StudyRow, uid=hdr.study_uid)
    series = fetch(conn, SERIES_BY_UID, SeriesRow, uid=hdr.series_uid)
    if series is not None and (study is None or series["study_id"] != study["id"]):
        # A series belongs to one study: never attach this instance to another study's series
        # (nor make its study, which would be left without it). Refused before anything is written.
        return StoreResult(InstanceOutcome.UID_CONFLICT, None, series["study_id"], None,
                           refusal=SERIES_OF_ANOTHER_STUDY)
    if study is None:
        values = {col: clip(col, hdr.attrs.get(kw)) for kw, col in STUDY_ATTRS.items()}
        study_id = add(conn, STUDIES, study_uid=hdr.study_uid, state=StudyState.RECEIVING, channel=channel,
                       first_received_at=now, last_received_at=now, num_series=0, num_instances=0,
                       size_bytes=0, times_stable=0, **values)
        study = {"id": study_id, "state": StudyState.RECEIVING, "num_series": 0, "num_instances": 0, "size_bytes": 0,
                 "modalities": None}
        # images received: the order can move to in progress
        events.append(StudyReceived(study_id=study_id, study_uid=hdr.study_uid, accession=values["accession"],
                                    channel=channel, calling_aet=calling_aet))
    study_changes: _StudyChanges = {"last_received_at": now}
    if study["state"] == StudyState.STABLE:
        study_changes["state"] = StudyState.RECEIVING
        events.append(StudyReopened(study_id=study["id"], study_uid=hdr.study_uid,
                                    sop_instance_uid=hdr.sop_instance_uid))
    if series is None:
        values = {col: clip(col, hdr.attrs.get(kw)) for kw, col in SERIES_ATTRS.items()}
        series_id = add(conn, SERIES, study_id=study["id"], series_uid=hdr.series_uid, num_instances=1,
                        created_at=now, **values)
        study_changes["num_series"] = study["num_series"] + 1
        modality = hdr.attrs.get("Modality")
        if modality:
            mods = set(filter(None, (study["modalities"] or "").split("\\"))) | {modality}
            study_changes["modalities"] = "\\".join(sorted(mods))[:64]
    else:
        series_id = series["id"]
        update_row(conn, SERIES, series_id, num_instances=series["num_instances"] + 1)
    study_changes["num_instances"] = study["num_instances"] + 1
    study_changes["size_bytes"] = study["size_bytes"] + stored.size
    update_row(conn, STUDIES, study["id"], **study_changes)
    instance_id = add(conn, INSTANCES, series_id=series_id, study_id=study["id"],
                      sop_instance_uid=hdr.sop_instance_uid, sop_class_uid=hdr.sop_class_uid,
                      instance_number=hdr.attrs.get("InstanceNumber"),
                      number_of_frames=hdr.attrs.get("NumberOfFrames"), transfer_syntax=hdr.transfer_syntax,
                      storage_key=stored.key, size_bytes=stored.size, sha256=stored.sha256,
                      calling_aet=calling_aet, remote=remote, received_at=now, duplicates=0)
    events.append(InstanceReceived(study_id=study["id"], instance_id=instance_id, sop_instance_uid=hdr.sop_instance_uid,
                                   modality=hdr.attrs.get("Modality"), accession=hdr.attrs.get("AccessionNumber"),
                                   calling_aet=calling_aet, channel=channel))
    return StoreResult(InstanceOutcome.STORED, instance_id, study["id"], stored.key, events=events)


def _duplicate(conn: Connection, existing: InstanceRow, hdr: InstanceHeader, stored: StoredObject, *,
               policy: str, now: datetime, calling_aet: str | None) -> StoreResult:
    identical = existing["sha256"] == stored.sha256

    def event(kind: type[InstanceDuplicate]) -> InstanceDuplicate:
        return kind(study_id=existing["study_id"], sop_instance_uid=hdr.sop_instance_uid, identical=identical,
                    policy=policy, calling_aet=calling_aet, sha256=stored.sha256, stored_sha256=existing["sha256"])
    base: _DuplicateResult = {"instance_id": existing["id"], "study_id": existing["study_id"], "identical": identical}
    if identical or policy == "ignore":
        update_row(conn, INSTANCES, existing["id"], duplicates=existing["duplicates"] + 1)
        events: list[Event] = [] if identical else [event(DuplicateIgnored)]
        return StoreResult(InstanceOutcome.DUPLICATE, stored_key=existing["storage_key"], events=events, **base)
    if policy == "reject":
        return StoreResult(InstanceOutcome.REJECTED, stored_key=existing["storage_key"], events=[event(DuplicateRejected)],
                           **base)
    # overwrite: the new file takes the index row; the study's size follows; the old file goes.
    # Only within the instance's own study and series: the row cannot follow it elsewhere.
    found = fetch(conn, STUDY_BY_UID, StudyRow, uid=hdr.study_uid)
    series = fetch(conn, SERIES_BY_UID, SeriesRow, uid=hdr.series_uid)
    if found is None or found["id"] != existing["study_id"] or series is None or series["id"] != existing["series_id"]:
        return StoreResult(InstanceOutcome.UID_CONFLICT, existing["id"], existing["study_id"], existing["storage_key"],
                           refusal=INSTANCE_OF_ANOTHER_SERIES)
    update_row(conn, STUDIES, found["id"], last_received_at=now,
               size_bytes=found["size_bytes"] - existing["size_bytes"] + stored.size)
    update_row(conn, INSTANCES, existing["id"], storage_key=stored.key, size_bytes=stored.size,
               sha256=stored.sha256, transfer_syntax=hdr.transfer_syntax, received_at=now,
               calling_aet=calling_aet, duplicates=existing["duplicates"] + 1)
    return StoreResult(InstanceOutcome.OVERWRITTEN, stored_key=stored.key, replaced_key=existing["storage_key"],
                       events=[event(InstanceOverwritten)], **base)


def stability_candidates(conn: Connection, cutoff: datetime, limit: int = 500) -> list[int]:
    stmt = (select(STUDIES.c.id).where(STUDIES.c.state == StudyState.RECEIVING, STUDIES.c.last_received_at < cutoff)
            .order_by(STUDIES.c.last_received_at).limit(limit))
    return [r[0] for r in conn.execute(stmt)]


def mark_stable(conn: Connection, study_id: int, cutoff: datetime) -> StudyStable | None:
    """Claim one study's stability (once, whichever process gets there first): the event, for the
    caller to publish in this transaction, or None when the study was not (or no longer) due."""
    now = utcnow()
    result = conn.execute(
        STUDIES.update()
        .where(STUDIES.c.id == study_id, STUDIES.c.state == StudyState.RECEIVING, STUDIES.c.last_received_at < cutoff)
        .values(state=StudyState.STABLE, stable_at=now, times_stable=STUDIES.c.times_stable + 1))
    if result.rowcount != 1:
        return None
    row = conn.execute(select(STUDIES.c.study_uid, STUDIES.c.accession, STUDIES.c.num_instances,
                              STUDIES.c.times_stable).where(STUDIES.c.id == study_id)).one()
    return StudyStable(study_id=study_id, study_uid=row.study_uid, accession=row.accession,
                       instances=row.num_instances, times_stable=row.times_stable)


def stability_cutoff(stable_seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=stable_seconds)



# Instances that are reports (structured reports, encapsulated PDF): a reconciled study's reports are
# delivered on their own (report.received). The same list as engine/outbound/context.py
# REPORT_CLASSES, which renders them (tests/test_domain_events.py checks they agree).
REPORT_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
)
REPORTS_OF_STUDY = (select(INSTANCES.c.id, INSTANCES.c.sop_class_uid)
                    .where(INSTANCES.c.study_id == bindparam("study_id"),
                           or_(*(INSTANCES.c.sop_class_uid == c for c in REPORT_SOP_CLASSES)))
                    .order_by(INSTANCES.c.id))


def report_instances(conn: Connection, study_id: int) -> list[tuple[int, str]]:
    """(instance id, SOP class) of the study's reports, in the order they were received."""
    return [(r["id"], r["sop_class_uid"]) for r in fetch_all(conn, REPORTS_OF_STUDY, _ReportRef, study_id=study_id)]
