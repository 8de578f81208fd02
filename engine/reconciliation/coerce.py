"""Rewrite one stored instance's attributes, keeping the originals in Original Attributes Sequence.

Only the header is parsed (up to the pixel data). The new file is the rewritten header followed by
the original file's bytes from the pixel data element on, copied in chunks, so a 1 GB multi-frame
object costs one chunk of memory, and the pixel data is byte-for-byte the one received (no
transcoding, encapsulated fragments untouched). Deflated objects are the exception: their whole
dataset is compressed, so they are read and written whole.

The new file gets its own storage key (the key carries the checksum); the caller points the index
at it and deletes the old file only after that commit.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from engine.dicom.headers import storage_key, text_value
from engine.reconciliation.compare import agrees
from engine.reconciliation.rules import AttributeRule, NameRules
from engine.storage.base import ObjectStorage, StoredObject

CHUNK = 1024 * 1024
REASONS = ("COERCE", "CORRECT")  # PS3.3 C.12.1.1.9.2 Reason for the Attribute Modification


@dataclass
class Target:
    """What one instance should hold: each rule with its authoritative value."""

    values: list[tuple[AttributeRule, str]]
    names: NameRules
    reason: str  # COERCE | CORRECT
    modifying_system: str


@dataclass
class Rewritten:
    stored: StoredObject
    changes: dict[str, list[str | None]]  # attribute: [old, new]


def file_differences(ds: Dataset, target: Target) -> dict[str, tuple[str | None, str]]:
    out: dict[str, tuple[str | None, str]] = {}
    for rule, value in target.values:
        current = text_value(ds.get(rule.keyword))
        if not agrees(rule, current, value, target.names):
            out[rule.keyword] = (current, value)
    return out


def _encodable(ds: Dataset, values: list[str]) -> bool:
    """Whether the dataset's character set can carry the new values (else it is switched to UTF-8)."""
    if all(v.isascii() for v in values):
        return True
    charset = ds.get("SpecificCharacterSet") or "ISO_IR 6"
    if charset in ("ISO_IR 6", ["ISO_IR 6"], ""):  # the default repertoire is ASCII
        return False
    encodings = convert_encodings(charset)
    if len(encodings) != 1:  # ISO 2022 code extensions: do not try to be clever
        return False
    try:
        for v in values:
            v.encode(encodings[0], errors="strict")
    except (UnicodeError, LookupError):
        return False
    return True


def _use_utf8(ds: Dataset) -> None:
    """Switch the dataset to ISO_IR 192: decode every text value first so it is written again in UTF-8."""
    for elem in ds.iterall():  # converts raw elements using the current character set
        _ = elem.value
    ds.decode()
    ds.SpecificCharacterSet = "ISO_IR 192"


def modified_item(ds: Dataset, changes: dict[str, tuple[str | None, str]], target: Target,
                  source: str | None) -> Dataset:
    """One Original Attributes Sequence item: the values replaced, when, by whom, and why."""
    mod = Dataset()
    for kw in changes:
        if kw in ds:
            old = ds[kw]
            mod.add(DataElement(old.tag, old.VR, old.value))
        else:  # an attribute that was absent is listed with zero length
            mod.add_new(kw, dictionary_VR(kw), None)
    item = Dataset()
    item.ModifiedAttributesSequence = [mod]
    item.AttributeModificationDateTime = datetime.now().astimezone().strftime("%Y%m%d%H%M%S.%f%z")
    item.ModifyingSystem = target.modifying_system[:64]
    item.SourceOfPreviousValues = (source or "")[:64]
    item.ReasonForTheAttributeModification = target.reason
    return item


class _HashingWriter:
    def __init__(self, f: Any) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.h.update(data)
        self.size += len(data)


def rewrite_instance(storage: ObjectStorage, key: str, target: Target, *, study_uid: str, series_uid: str,
                     sop_instance_uid: str, source: str | None, tmp_dir: Path | None = None,
                     fsync: bool = True) -> Rewritten | None:
    """Rewrite the instance stored as ``key`` to ``target``; None when it already agrees."""
    with storage.open(key) as src:
        ds = dcmread(src, stop_before_pixels=True)
        deflated = ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        tail_at: int | None = src.tell()
        if deflated:  # the dataset is one deflate stream: no byte offset to splice at
            src.seek(0)
            ds = dcmread(src)
            tail_at = None
        changes = file_differences(ds, target)
        if not changes:
            return None
        if not _encodable(ds, [new for _old, new in changes.values()]):
            _use_utf8(ds)
        item = modified_item(ds, changes, target, source)
        history = list(ds.get("OriginalAttributesSequence") or [])
        history.append(item)
        ds.OriginalAttributesSequence = history
        for kw, (_old, new) in changes.items():
            setattr(ds, kw, new)
        head = io.BytesIO()
        ds.save_as(head, enforce_file_format=True)
        fd, tmp_name = tempfile.mkstemp(suffix=".dcm", dir=tmp_dir)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as raw_out:
                out = _HashingWriter(raw_out)
                out.write(head.getvalue())
                if tail_at is not None:
                    src.seek(tail_at)
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
                raw_out.flush()
                if fsync:
                    os.fsync(raw_out.fileno())
            sha = out.h.hexdigest()
            stored = storage.put_file(tmp, storage_key(study_uid, series_uid, sop_instance_uid, sha),
                                      size=out.size, sha256=sha)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return Rewritten(stored, {kw: [old, new] for kw, (old, new) in changes.items()})
