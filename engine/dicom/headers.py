"""What the index needs from a received instance, read from its header without its pixel data."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread

from engine.dicom import status as S
from engine.errors import RadBridgeError

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# What the index takes from the header.
HEADER_TAGS = [
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "StudyID", "StudyDate", "StudyTime", "StudyDescription", "ReferringPhysicianName", "Modality",
    "SeriesNumber", "SeriesDescription", "BodyPartExamined", "StationName", "InstanceNumber",
    "NumberOfFrames",
]


class HeaderError(RadBridgeError):
    """The instance cannot be stored; ``status`` is the C-STORE failure status to answer with."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass
class InstanceHeader:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    attrs: dict[str, Any]  # keyword -> text/int value, the index columns' sources


def check_uid(keyword: str, value: Any) -> str:
    text = str(value or "").strip().rstrip("\0")
    if not text:
        raise HeaderError(S.DATASET_MISMATCH, f"{keyword} is missing")
    if len(text) > 64 or not UID_RE.match(text):
        # an Error Comment holds 64 characters: the reason first, then as much of the value as fits
        raise HeaderError(S.INVALID_UID, f"{keyword} is not a valid UID: {text[:26]!r}"[:64])
    return text


def text_value(value: Any) -> str | None:
    if value is None:
        return None
    if hasattr(value, "original_string") and not isinstance(value, (str, bytes)):  # PersonName
        text = str(value)
    elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    text = text.strip()
    return text or None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def read_header(path: Path | BinaryIO, *, command_sop_class: str | None, command_sop_instance: str | None,
                transfer_syntax: str | None) -> InstanceHeader:
    """Parse and check a received instance's header (a file, or its bytes already read). Raises
    HeaderError with the status to send.

    ``command_sop_class``/``command_sop_instance``: the UIDs of the C-STORE command the dataset must
    match (None: no command, as for STOW-RS). ``transfer_syntax``: the presentation context's (None:
    the file's meta information says, as for a STOW-RS part, which is a DICOM file)."""
    try:
        # everything up to the pixel data; pydicom parses it faster than a tag selection
        ds = dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises what it meets: InvalidDicomError, EOFError, NotImplementedError (a VR
        # it does not know), ValueError, ...: each a file it cannot read
        raise HeaderError(S.CANNOT_UNDERSTAND, f"dataset unreadable: {str(exc)[:40]}") from exc
    try:
        sop_class = check_uid("SOPClassUID", ds.get("SOPClassUID"))
        sop_instance = check_uid("SOPInstanceUID", ds.get("SOPInstanceUID"))
        if command_sop_class is not None and sop_class != command_sop_class:
            raise HeaderError(S.DATASET_MISMATCH, "SOPClassUID differs from Affected SOP Class")
        if command_sop_instance is not None and sop_instance != command_sop_instance:
            raise HeaderError(S.DATASET_MISMATCH, "SOPInstanceUID differs from Affected SOP Instance")
        study = check_uid("StudyInstanceUID", ds.get("StudyInstanceUID"))
        series = check_uid("SeriesInstanceUID", ds.get("SeriesInstanceUID"))
        attrs: dict[str, Any] = {}
        for kw in HEADER_TAGS[5:]:
            value = ds.get(kw)
            attrs[kw] = _int(value) if kw in ("SeriesNumber", "InstanceNumber", "NumberOfFrames") else text_value(value)
        charset = ds.get("SpecificCharacterSet")
        attrs["SpecificCharacterSet"] = text_value(charset)
        if transfer_syntax is None:
            meta = getattr(ds, "file_meta", None)
            transfer_syntax = check_uid("TransferSyntaxUID", meta.get("TransferSyntaxUID") if meta is not None else None)
    except HeaderError:
        raise
    except Exception as exc:  # a value that does not decode (bad VR, bad character set ...)
        raise HeaderError(S.CANNOT_UNDERSTAND, f"header not decodable: {str(exc)[:36]}") from exc
    return InstanceHeader(sop_class, sop_instance, study, series, transfer_syntax, attrs)


def storage_key(study_uid: str, series_uid: str, sop_instance_uid: str, sha256: str) -> str:
    """``ab/<study>/<series>/<sop>.<first 12 of sha256>.dcm``: found by UIDs, spread over 256
    top folders, and two different objects under one SOP Instance UID never share a file."""
    shard = hashlib.sha1(study_uid.encode()).hexdigest()[:2]
    return f"{shard}/{study_uid}/{series_uid}/{sop_instance_uid}.{sha256[:12]}.dcm"
