"""Query/Retrieve over the index: C-FIND answers at PATIENT, STUDY, SERIES and IMAGE level and the
instance lists that C-MOVE and C-GET send. Only the index is read, never the files.

Keys the index holds are matched in SQL; any other key asked for is returned empty (PS3.4 allows
that for optional keys). Unique keys of higher levels (PatientID, StudyInstanceUID ...) narrow a
lower-level query, so both Patient Root and Study Root information models are served.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from sqlalchemy import Connection, Select, exists, func, select

from engine.dicom.matching import Match, parse, sql_condition
from engine.domain.studies import INSTANCES, SERIES, STUDIES
from engine.errors import RadBridgeError
from engine.store.states import ReconState

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")

# keyword -> (level, column) for the keys matched in the index
PATIENT_KEYS = {
    "PatientID": STUDIES.c.dicom_patient_id, "IssuerOfPatientID": STUDIES.c.dicom_issuer,
    "PatientName": STUDIES.c.patient_name, "PatientBirthDate": STUDIES.c.patient_birth_date,
    "PatientSex": STUDIES.c.patient_sex,
}
STUDY_KEYS = {
    "StudyInstanceUID": STUDIES.c.study_uid, "StudyDate": STUDIES.c.study_date, "StudyTime": STUDIES.c.study_time,
    "AccessionNumber": STUDIES.c.accession, "StudyID": STUDIES.c.study_id,
    "StudyDescription": STUDIES.c.description, "ReferringPhysicianName": STUDIES.c.referring_physician,
}
SERIES_KEYS = {
    "SeriesInstanceUID": SERIES.c.series_uid, "Modality": SERIES.c.modality,
    "SeriesNumber": SERIES.c.series_number, "SeriesDescription": SERIES.c.description,
    "BodyPartExamined": SERIES.c.body_part, "StationName": SERIES.c.station_name,
}
IMAGE_KEYS = {
    "SOPInstanceUID": INSTANCES.c.sop_instance_uid, "SOPClassUID": INSTANCES.c.sop_class_uid,
    "InstanceNumber": INSTANCES.c.instance_number, "NumberOfFrames": INSTANCES.c.number_of_frames,
}
KEYS_AT = {"PATIENT": PATIENT_KEYS, "STUDY": STUDY_KEYS, "SERIES": SERIES_KEYS, "IMAGE": IMAGE_KEYS}
COUNTS = {
    "NumberOfStudyRelatedSeries": STUDIES.c.num_series,
    "NumberOfStudyRelatedInstances": STUDIES.c.num_instances,
    "NumberOfSeriesRelatedInstances": SERIES.c.num_instances,
}


class QueryError(RadBridgeError):
    """The identifier cannot be answered (status 0xA900 / 0xC001 with this comment)."""


@dataclass
class InstanceRef:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    storage_key: str


class TooManyMatches(QueryError):
    """More matches than the channel answers (options.query_max_results)."""


def _vr(keyword: str) -> str:
    try:
        return str(dictionary_VR(keyword))
    except KeyError:
        return "LO"


def _keys(identifier: Dataset) -> dict[str, Any]:
    out = {}
    for elem in identifier:
        if elem.keyword in ("QueryRetrieveLevel", "SpecificCharacterSet") or not elem.keyword:
            continue
        out[elem.keyword] = None if elem.VR == "SQ" else elem.value
    return out


def level_of(identifier: Dataset) -> str:
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in LEVELS:
        raise QueryError(f"QueryRetrieveLevel {level!r} is not PATIENT, STUDY, SERIES or IMAGE")
    return level


def _conditions(keys: dict[str, Any], level: str, dialect: str, fold_names: bool) -> list[Any]:
    """Conditions from this level's keys and the unique/other keys of the levels above it."""
    conds = []
    depth = LEVELS.index(level)
    for lvl in LEVELS[: depth + 1]:
        for kw, column in KEYS_AT[lvl].items():
            if kw not in keys:
                continue
            vr = _vr(kw)
            m: Match = parse(_text(keys[kw]), vr, fold_case=fold_names and vr == "PN")
            cond: Any
            if vr in ("IS", "US") and m.kind == "single":
                try:
                    cond = column == int(m.values[0])
                except ValueError:
                    raise QueryError(f"{kw} {m.values[0]!r} is not a number") from None
            else:
                cond = sql_condition(column, m, vr, dialect)
            if cond is not None:
                conds.append(cond)
    if "ModalitiesInStudy" in keys and level in ("PATIENT", "STUDY"):
        m = parse(_text(keys["ModalitiesInStudy"]), "CS")
        cond = sql_condition(SERIES.c.modality, m, "CS", dialect)
        if cond is not None:
            conds.append(exists().where(SERIES.c.study_id == STUDIES.c.id, cond))
    # a quarantined study (reconciliation policy reject) is kept but neither found nor retrieved
    conds.append(STUDIES.c.recon_state != ReconState.QUARANTINED)
    return conds


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def statement(keys: dict[str, Any], level: str, dialect: str, *, fold_names: bool = True) -> Select[Any]:
    """The SELECT answering a query at ``level`` with ``keys`` (keyword -> value as sent; a list or a
    backslash-separated text is list matching), rows labelled by keyword (the index's keys of the level
    and those above it, ModalitiesInStudy and the Number Of ... Related counts), in arrival order.
    C-FIND and QIDO-RS (engine/web/dicomweb.py) both answer with it."""
    if level not in LEVELS:
        raise QueryError(f"level {level!r} is not PATIENT, STUDY, SERIES or IMAGE")
    conds = _conditions(keys, level, dialect, fold_names)
    if level == "PATIENT":
        cols = [c.label(k) for k, c in PATIENT_KEYS.items() if k not in ("PatientID", "IssuerOfPatientID")]
        return (select(STUDIES.c.dicom_patient_id.label("PatientID"), STUDIES.c.dicom_issuer.label("IssuerOfPatientID"),
                       *[func.max(c).label(c.key) for c in cols],
                       func.count().label("NumberOfPatientRelatedStudies"),
                       func.sum(STUDIES.c.num_series).label("NumberOfPatientRelatedSeries"),
                       func.sum(STUDIES.c.num_instances).label("NumberOfPatientRelatedInstances"))
                .where(*conds).group_by(STUDIES.c.dicom_patient_id, STUDIES.c.dicom_issuer)
                .order_by(STUDIES.c.dicom_patient_id))
    if level == "STUDY":
        return (select(*[c.label(k) for k, c in {**PATIENT_KEYS, **STUDY_KEYS}.items()],
                       STUDIES.c.modalities.label("ModalitiesInStudy"),
                       STUDIES.c.num_series.label("NumberOfStudyRelatedSeries"),
                       STUDIES.c.num_instances.label("NumberOfStudyRelatedInstances"))
                .where(*conds).order_by(STUDIES.c.id))
    if level == "SERIES":
        return (select(*[c.label(k) for k, c in {**PATIENT_KEYS, **STUDY_KEYS, **SERIES_KEYS}.items()],
                       SERIES.c.num_instances.label("NumberOfSeriesRelatedInstances"))
                .select_from(SERIES.join(STUDIES, SERIES.c.study_id == STUDIES.c.id))
                .where(*conds).order_by(SERIES.c.id))
    return (select(*[c.label(k) for k, c in {**PATIENT_KEYS, **STUDY_KEYS, **SERIES_KEYS, **IMAGE_KEYS}.items()],
                   INSTANCES.c.transfer_syntax.label("AvailableTransferSyntaxUID"))
            .select_from(INSTANCES.join(SERIES, INSTANCES.c.series_id == SERIES.c.id)
                         .join(STUDIES, INSTANCES.c.study_id == STUDIES.c.id))
            .where(*conds).order_by(INSTANCES.c.id))


def find(conn: Connection, identifier: Dataset, *, fold_names: bool = True, limit: int = 1000,
         retrieve_aet: str = "") -> Iterator[Dataset]:
    """C-FIND responses for ``identifier`` (each a Dataset with the keys asked for)."""
    level = level_of(identifier)
    keys = _keys(identifier)
    stmt = statement(keys, level, conn.dialect.name, fold_names=fold_names)
    rows = conn.execute(stmt.limit(limit + 1)).mappings().all()
    if len(rows) > limit:  # refused whole, as dcm4chee does: a silently cut list looks complete
        raise TooManyMatches(f"more than {limit} matches (query_max_results); refine your query")
    for row in rows:
        yield _answer(identifier, keys, level, row, retrieve_aet)


def _answer(identifier: Dataset, keys: dict[str, Any], level: str, row: Any, retrieve_aet: str) -> Dataset:
    ds = Dataset()
    non_ascii = False
    for kw in keys:
        value = row.get(kw)
        if value is None:
            elem = identifier[kw]
            setattr(ds, kw, [] if elem.VR == "SQ" else None)
            continue
        if kw == "ModalitiesInStudy":
            value = str(value).split("\\")
        elif isinstance(value, int) or _vr(kw) in ("IS", "US", "UL"):
            value = int(value)
        else:
            value = str(value)
            non_ascii = non_ascii or not value.isascii()
        setattr(ds, kw, value)
    ds.QueryRetrieveLevel = level
    if "RetrieveAETitle" in keys or retrieve_aet:
        ds.RetrieveAETitle = retrieve_aet
    if "InstanceAvailability" in keys:
        ds.InstanceAvailability = "ONLINE"
    if non_ascii:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def instances_for(conn: Connection, identifier: Dataset, *, limit: int = 65535) -> list[InstanceRef]:
    """What a C-MOVE / C-GET at this level selects (unique keys; others narrow it too)."""
    level = level_of(identifier)
    keys = _keys(identifier)
    unique = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
              "IMAGE": "SOPInstanceUID"}[level]
    if not _text(keys.get(unique)).strip():
        raise QueryError(f"a {level} level retrieve needs {unique}")
    conds = _conditions(keys, level, conn.dialect.name, fold_names=False)
    stmt = (select(INSTANCES.c.sop_class_uid, INSTANCES.c.sop_instance_uid, INSTANCES.c.transfer_syntax,
                   INSTANCES.c.storage_key)
            .select_from(INSTANCES.join(SERIES, INSTANCES.c.series_id == SERIES.c.id)
                         .join(STUDIES, INSTANCES.c.study_id == STUDIES.c.id))
            .where(*conds).order_by(INSTANCES.c.study_id, INSTANCES.c.series_id, INSTANCES.c.instance_number,
                                    INSTANCES.c.id).limit(limit + 1))
    refs = [InstanceRef(*r) for r in conn.execute(stmt)]
    if len(refs) > limit:
        raise QueryError(f"more than {limit} instances match; retrieve a narrower level")
    return refs
