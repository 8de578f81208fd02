"""Transcoding on retrieve: a stored instance in a transfer syntax its receiver accepts.

Used where the engine sends stored instances (C-GET and C-MOVE in engine/connectors/dicom/scp.py; WADO-RS
may use it the same way). Decoding only, on the fly and one instance at a time:

- the receiver accepts the stored syntax: the dataset is sent as stored (no transcoding at all);
- it is stored uncompressed (implicit/explicit VR little endian, deflated): it is sent as stored and the
  network layer re-encodes it to the accepted uncompressed syntax (pynetdicom does explicit <-> implicit
  VR, deflated <-> inflated);
- it is stored compressed (JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE): its pixel data is decoded by pydicom with
  the decoders the engine depends on (pylibjpeg with its libjpeg, openjpeg and RLE plugins, as the console's
  thumbnails, engine/dicom/thumbnail.py) and the dataset becomes explicit VR little endian (the network layer
  may then send it implicit VR when that is all the receiver took). The SOP Instance UID is kept (the pixel
  values are those stored: nothing is re-encoded). A lossy-stored image keeps saying so: Lossy Image
  Compression "01" (and the method) is added when the header lacks it.

Never done: encoding into any compressed syntax (so never lossy to another lossy syntax, never lossless to
lossy), big endian to little endian, writing to the stored file (it is read, never changed).

A syntax without a decoder (MPEG and HEVC video, JPEG 2000 Part 2, JPIP, private syntaxes), pixel data its
decoder refuses, or a receiver that takes neither the stored syntax nor an uncompressed one raise a
``TranscodeError`` naming the syntax (``.syntax`` holds its UID).

API::

    item = decoded_for(path_or_file_or_dataset, accepted_syntaxes)
    item.dataset      # to send or write; item.dataset.file_meta.TransferSyntaxUID is its encoding
    item.syntax       # the syntax to send it in (one of accepted_syntaxes)
    item.transcoded   # False: the stored bytes go out unchanged
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)

from engine.errors import RadBridgeError

# Syntaxes a dataset read by pydicom can be sent in without decoding pixels (re-encoded by the writer)
UNCOMPRESSED_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
# What a decoded dataset can go out as, in order of preference
DECODED_TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Always-lossy syntaxes: their decoded copy carries Lossy Image Compression "01" and the method
LOSSY_METHOD = {JPEGBaseline8Bit: "ISO_10918_1", JPEGExtended12Bit: "ISO_10918_1",
                JPEGLSNearLossless: "ISO_14495_1"}
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class TranscodeError(RadBridgeError):
    """The instance cannot be sent in any syntax the receiver accepts; the message names the stored syntax
    (and nothing of the patient). ``syntax`` is the stored transfer syntax UID."""

    reason = "cannot send"  # a few words for a DICOM Error Comment (64 characters with the UID)

    def __init__(self, syntax: str, message: str) -> None:
        super().__init__(message)
        self.syntax = str(syntax)

    @property
    def comment(self) -> str:
        """'no decoder for 1.2.840.10008.1.2.4.92': short enough for an Error Comment (LO, 64 chars)."""
        return f"{self.reason} {self.syntax}"


class NoDecoder(TranscodeError):
    """No decoder for the stored syntax is installed (or pydicom knows none)."""

    reason = "no decoder for"


class DecodeFailed(TranscodeError):
    """The decoder refused this instance's pixel data (damaged or unsupported data)."""

    reason = "cannot decode"


class NotAccepted(TranscodeError):
    """The receiver accepts neither the stored syntax nor an uncompressed one this module produces."""

    reason = "not accepted, not convertible:"


def syntax_label(uid: str) -> str:
    """'JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91)', or the UID alone when pydicom has no name."""
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else str(uid)


def can_decode(syntax: str) -> bool:
    """Whether pixel data in ``syntax`` can be decoded here (a decoder and one of its plugins installed)."""
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(UID(syntax)).is_available)
    except (NotImplementedError, ValueError):
        return False


def _is_encapsulated(syntax: str) -> bool:
    """A transfer syntax pydicom knows whose pixel data is encapsulated (False for private or unknown UIDs)."""
    try:
        return bool(UID(syntax).is_encapsulated)
    except ValueError:
        return False


def _is_uncompressed_le(syntax: str) -> bool:
    return syntax in UNCOMPRESSED_LE


def target_syntax(stored: str, accepted: Iterable[str]) -> str | None:
    """The syntax to send an instance stored in ``stored`` to a receiver accepting ``accepted``: the stored
    one when accepted, else explicit VR little endian, else implicit VR little endian (an uncompressed stored
    one also to deflated); None when nothing fits."""
    taken = [str(s) for s in accepted]
    if stored in taken:
        return stored
    for candidate in DECODED_TARGETS:
        if candidate in taken:
            return candidate
    if _is_uncompressed_le(stored) and DeflatedExplicitVRLittleEndian in taken:
        return DeflatedExplicitVRLittleEndian
    return None


@dataclass
class Retrieved:
    dataset: Dataset
    stored_syntax: str
    syntax: str  # what to send it in (the network layer re-encodes uncompressed little endian syntaxes)
    transcoded: bool  # False: sent as stored


Source = str | os.PathLike[str] | BinaryIO | Dataset


def _read(source: Source) -> Dataset:
    if isinstance(source, Dataset):
        return source
    if isinstance(source, (str, os.PathLike)):
        return pydicom.dcmread(os.fspath(source))
    return pydicom.dcmread(source)


def decoded_for(source: Source, accepted_syntaxes: Iterable[str]) -> Retrieved:
    """``source`` (a path, an open binary file or a dataset already read) as it should go to a receiver
    accepting ``accepted_syntaxes``. A dataset passed in may be changed in place when it is decoded; a file
    is only read. Raises ``NoDecoder``, ``DecodeFailed`` or ``NotAccepted`` (all ``TranscodeError``)."""
    ds = _read(source)
    stored = str(ds.file_meta.TransferSyntaxUID)
    target = target_syntax(stored, accepted_syntaxes)
    if target is None:
        raise NotAccepted(stored, f"the receiver accepts neither {syntax_label(stored)} nor an uncompressed syntax")
    if target == stored:
        return Retrieved(ds, stored, target, transcoded=False)
    if _is_uncompressed_le(stored):
        return Retrieved(ds, stored, target, transcoded=True)  # re-encoded by the writer, pixels untouched
    if UID(stored) == "1.2.840.10008.1.2.2":
        raise NotAccepted(stored, f"{syntax_label(stored)} is not converted to little endian")
    if _is_encapsulated(stored) and not any(k in ds for k in PIXEL_KEYWORDS):
        # nothing encapsulated: the rest of a dataset in a (known) compressed syntax is explicit VR little endian
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return Retrieved(ds, stored, target, transcoded=True)
    if not can_decode(stored):
        raise NoDecoder(stored, f"no decoder for {syntax_label(stored)}")
    try:
        ds.decompress(generate_instance_uid=False)
    except Exception as exc:  # the plugins raise their own types (RuntimeError, ValueError ...)
        raise DecodeFailed(stored, f"{syntax_label(stored)} pixel data could not be decoded: "
                                   f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    method = LOSSY_METHOD.get(UID(stored))
    if method is not None and "LossyImageCompression" not in ds:
        ds.LossyImageCompression = "01"
        if "LossyImageCompressionMethod" not in ds:
            ds.LossyImageCompressionMethod = method
    return Retrieved(ds, stored, target, transcoded=True)
