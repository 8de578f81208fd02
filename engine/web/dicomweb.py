"""DICOMweb at /dicomweb/ (PS3.18): QIDO-RS searches and WADO-RS retrieves, role ``read``.

QIDO-RS answers from the index with the C-FIND matching (engine/connectors/dicom/query.py and
engine/dicom/matching.py: wildcards, ranges, lists, UID lists), never reading a file. WADO-RS streams
the stored files one by one (multipart/related), reads headers for ``metadata`` (bulk data by URI),
slices native frames, hands encapsulated ones as stored, and renders images with
engine/dicom/thumbnail.py. Stored bytes go out as stored when the Accept takes their syntax; when it
does not, but takes Explicit VR Little Endian (the default), compressed instances are decoded on the fly,
one at a time (engine/dicom/transcode.py; never re-encoded); instances that cannot be decoded are left out
with 206 and a Warning, or 406 when none could be sent.

Every answer holding patient data writes one audit row (engine/web/audit.py record_read) per request.
Errors are JSON ``{"error": ..., "detail": ...}`` and carry no patient data. docs/dicomweb.md says
what is supported and what is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import secrets
import socket
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import pydicom
from aiohttp import web
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import UID as SyntaxUID
from sqlalchemy import Connection, select

from engine.connectors.dicom.query import (
    IMAGE_KEYS,
    PATIENT_KEYS,
    SERIES_KEYS,
    STUDY_KEYS,
    InstanceRef,
    QueryError,
    instances_for,
    statement,
)
from engine.dicom.thumbnail import FrameMissing, ThumbnailError, Window, render
from engine.dicom.transcode import UNCOMPRESSED_LE, TranscodeError, can_decode, decoded_for, syntax_label
from engine.domain.studies import STUDIES
from engine.errors import RadBridgeError
from engine.storage.base import ObjectStorage
from engine.store.tokens import Role
from engine.web.audit import record_read
from engine.web.keys import ENGINE, SETTINGS
from engine.web.reads import on_reader
from engine.web.roles import requires

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

UID = r"[0-9.]{1,64}"
STUDY = r"/studies/{study:" + UID + "}"
SERIES = STUDY + r"/series/{series:" + UID + "}"
INSTANCE = SERIES + r"/instances/{sop:" + UID + "}"
DICOM_JSON = "application/dicom+json"
CHUNK = 1 << 20  # bytes read from a stored file at a time
CRLF = "\r\n"
OPEN_AHEAD = 16  # stored files opened by one worker-thread call while the ones before are sent
DEFAULT_LIMIT = 1000  # QIDO results without a limit; more are there: a Warning header says so
MAX_LIMIT = 10000
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"})
BULK_INLINE_MAX = 1024  # binary values up to this many bytes are given inline (InlineBinary)
METADATA_CACHE_BYTES = 64 << 20  # WADO-RS metadata kept per engine process (about 15,000 CT instances)
NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"}  # little endian, uncompressed
EXPLICIT_LE = "1.2.840.10008.1.2.1"

# the attributes each level answers by default (PS3.18 Tables 6.7.1-2, -2a, -2b), as the index holds them
STUDY_DEFAULT = ("StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability", "ModalitiesInStudy",
                 "ReferringPhysicianName", "RetrieveURL", "PatientName", "PatientID", "PatientBirthDate",
                 "PatientSex", "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
                 "NumberOfStudyRelatedInstances")
SERIES_DEFAULT = ("Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
                  "NumberOfSeriesRelatedInstances", "RetrieveURL")
INSTANCE_DEFAULT = ("SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "RetrieveURL", "InstanceNumber",
                    "NumberOfFrames", "AvailableTransferSyntaxUID")
LEVEL_NAMES = {"STUDY": "studies", "SERIES": "series", "IMAGE": "instances"}
MATCHABLE = {
    "STUDY": {*PATIENT_KEYS, *STUDY_KEYS, "ModalitiesInStudy"},
    "SERIES": {*PATIENT_KEYS, *STUDY_KEYS, *SERIES_KEYS},
    "IMAGE": {*PATIENT_KEYS, *STUDY_KEYS, *SERIES_KEYS, *IMAGE_KEYS},
}
RETURNABLE = {
    "STUDY": {*MATCHABLE["STUDY"], "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"},
    "SERIES": {*MATCHABLE["SERIES"], "NumberOfSeriesRelatedInstances"},
    "IMAGE": {*MATCHABLE["IMAGE"], "AvailableTransferSyntaxUID"},
}
COMPUTED = {"RetrieveURL", "InstanceAvailability"}


class DicomwebError(RadBridgeError):
    """A request answered with an HTTP error status and a reason (no patient data in it)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


ERROR_NAMES = {400: "bad-request", 404: "not-found", 406: "not-acceptable", 503: "unavailable"}


def _error(exc: DicomwebError) -> web.Response:
    return web.json_response({"error": ERROR_NAMES.get(exc.status, "error"), "detail": exc.detail},
                             status=exc.status)


@web.middleware
async def errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except DicomwebError as exc:
        return _error(exc)


# ---------------------------------------------------------------- QIDO-RS


def _keyword(name: str) -> str:
    """An attribute named by keyword or by tag (``0020000D``) as its keyword; DicomwebError otherwise."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        kw = keyword_for_tag(int(name, 16))
        if kw:
            return str(kw)
    elif tag_for_keyword(name) is not None:
        return name
    raise DicomwebError(400, f"{name!r} is neither a DICOM keyword nor a tag (8 hex digits)")


@dataclass
class Search:
    keys: dict[str, str] = field(default_factory=dict)
    include: set[str] = field(default_factory=set)
    include_all: bool = False
    limit: int = DEFAULT_LIMIT
    limited: bool = False  # the client gave the limit
    offset: int = 0


def _number(name: str, raw: str, high: int) -> int:
    if not raw.isdigit() or int(raw) > high:
        raise DicomwebError(400, f"{name} is a whole number from 0 to {high}, not {raw!r}")
    return int(raw)


def parse_search(query: Iterable[tuple[str, str]], level: str) -> Search:
    """The QIDO-RS query parameters (PS3.18 8.3.4) for a search at ``level``."""
    out = Search()
    values: dict[str, list[str]] = {}
    for name, raw in query:
        if name == "limit":
            out.limit, out.limited = _number("limit", raw, MAX_LIMIT), True
        elif name == "offset":
            out.offset = _number("offset", raw, 10 ** 9)
        elif name == "fuzzymatching":
            if raw.strip().lower() != "false":
                raise DicomwebError(400, "fuzzymatching is not supported: give fuzzymatching=false or leave it out")
        elif name == "includefield":
            for part in (p.strip() for p in raw.split(",")):
                if part == "all":
                    out.include_all = True
                elif part:
                    out.include.add(_keyword(part))
        else:
            if "." in name:
                raise DicomwebError(400, f"{name!r}: matching on attributes inside sequences is not supported")
            kw = _keyword(name)
            if kw not in MATCHABLE[level]:
                raise DicomwebError(400, f"{kw} cannot be matched in a {LEVEL_NAMES[level]} search; these can: "
                                         + ", ".join(sorted(MATCHABLE[level])))
            values.setdefault(kw, []).append(raw)
    for kw, raws in values.items():
        vr = _vr(kw)
        parts = [p for raw in raws for p in (raw.split(",") if vr in ("UI", "CS") else [raw])]
        out.keys[kw] = "\\".join(parts)
    return out


def _vr(keyword: str) -> str:
    try:
        return str(dictionary_VR(keyword))
    except KeyError:
        return "UN"


def json_element(keyword: str, value: Any) -> dict[str, Any]:
    """One attribute in the DICOM JSON model (PS3.18 F.2) from an index value."""
    vr = _vr(keyword)
    if value is None or value == "":
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": str(value)}]}
    if vr in ("IS", "US", "UL", "SL", "SS", "SV", "UV"):
        return {"vr": vr, "Value": [int(value)]}
    if vr in ("DS", "FL", "FD"):
        return {"vr": vr, "Value": [float(value)]}
    if vr in ("CS", "UI", "LO", "SH", "AE") and isinstance(value, str) and "\\" in value:
        return {"vr": vr, "Value": value.split("\\")}
    return {"vr": vr, "Value": [str(value)]}


def _tag(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return f"{tag:08X}"


def base_url(request: web.Request) -> str:
    """The DICOMweb base for RetrieveURL and BulkDataURI: ``[http] public_base_url`` when set, else as
    the client reached it (its Host header; with the port the request came in on when the header has
    none, as dicomweb-client sends it)."""
    public = request.config_dict[SETTINGS].http.public_base_url
    if public:
        return public.rstrip("/") + "/dicomweb"
    host = request.host
    if not re.search(r":\d+$", host) and request.transport is not None:
        sockname = request.transport.get_extra_info("sockname")
        port = int(sockname[1]) if sockname else 0
        if port and port != (443 if request.scheme == "https" else 80):
            host = f"{host}:{port}"
    return f"{request.scheme}://{host}/dicomweb"


def _returned(level: str, search: Search, scoped_study: bool, scoped_series: bool) -> list[str]:
    """The attributes each result carries: the level's defaults, those of the levels above when the
    search is not inside them (PS3.18 6.7.1.2.2.1), the keys matched on, and includefield."""
    names: list[str] = []
    if level == "STUDY" or not scoped_study:
        names += STUDY_DEFAULT
    if level == "SERIES" or (level == "IMAGE" and not scoped_series):
        names += SERIES_DEFAULT
    if level == "IMAGE":
        names += INSTANCE_DEFAULT
    names += search.keys
    if search.include_all:
        names += sorted(RETURNABLE[level])
    names += sorted(kw for kw in search.include if kw in RETURNABLE[level] or kw in COMPUTED)
    return list(dict.fromkeys(names))


def _result(row: Any, level: str, names: list[str], base: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kw in names:
        if kw == "RetrieveURL":
            url = f"{base}/studies/{row['StudyInstanceUID']}"
            if level in ("SERIES", "IMAGE"):
                url += f"/series/{row['SeriesInstanceUID']}"
            if level == "IMAGE":
                url += f"/instances/{row['SOPInstanceUID']}"
            out[_tag(kw)] = {"vr": "UR", "Value": [url]}
        elif kw == "InstanceAvailability":
            out[_tag(kw)] = {"vr": "CS", "Value": ["ONLINE"]}
        elif kw in row:
            out[_tag(kw)] = json_element(kw, row[kw])
    return dict(sorted(out.items()))


def _search_rows(conn: Connection, keys: dict[str, str], level: str, limit: int, offset: int) -> list[Any]:
    try:
        stmt = statement(keys, level, conn.dialect.name, fold_names=True)
    except QueryError as exc:
        raise DicomwebError(400, str(exc)) from None
    try:
        return list(conn.execute(stmt.offset(offset).limit(limit)).mappings().all())
    except QueryError as exc:
        raise DicomwebError(400, str(exc)) from None


def patients_of_studies(conn: Connection, study_uids: list[str]) -> list[int]:
    """The store ids of the patients these studies are linked to (for the audit trail)."""
    if not study_uids:
        return []
    found = conn.execute(select(STUDIES.c.patient_id).distinct()
                         .where(STUDIES.c.study_uid.in_(sorted(set(study_uids))),
                                STUDIES.c.patient_id.is_not(None))).scalars()
    return sorted(int(p) for p in found)


async def _qido(request: web.Request, level: str) -> web.Response:
    study, series = request.match_info.get("study"), request.match_info.get("series")
    search = parse_search(request.query.items(), level)
    keys = dict(search.keys)
    if study:
        keys["StudyInstanceUID"] = study
    if series:
        keys["SeriesInstanceUID"] = series
    names = _returned(level, search, bool(study), bool(series))

    def run(conn: Connection) -> tuple[list[Any], list[int]]:
        rows = _search_rows(conn, keys, level, search.limit + 1, search.offset)
        return rows, patients_of_studies(conn, [r["StudyInstanceUID"] for r in rows[:search.limit]])
    rows, patients = await on_reader(request, run)
    more = len(rows) > search.limit
    base = base_url(request)
    body = [_result(r, level, names, base) for r in rows[:search.limit]]
    await record_read(request, "search", "Study", 200, [{"StudyInstanceUID": r["StudyInstanceUID"]}
                                                        for r in rows[:search.limit]], patients,
                      study_uid=study)
    headers = {}
    if more and not search.limited:
        headers["Warning"] = ('299 RadBridge: "The number of results exceeded the maximum supported by the '
                              'server. Additional results can be requested."')
    return web.Response(text=json.dumps(body), content_type=DICOM_JSON, headers=headers)


@routes.get("/studies")
@requires(Role.READ)
async def search_studies(request: web.Request) -> web.Response:
    return await _qido(request, "STUDY")


@routes.get("/series")
@routes.get(STUDY + "/series")
@requires(Role.READ)
async def search_series(request: web.Request) -> web.Response:
    return await _qido(request, "SERIES")


@routes.get("/instances")
@routes.get(STUDY + "/instances")
@routes.get(SERIES + "/instances")
@requires(Role.READ)
async def search_instances(request: web.Request) -> web.Response:
    return await _qido(request, "IMAGE")


# ---------------------------------------------------------------- WADO-RS: what is asked for


@dataclass(frozen=True)
class MediaRange:
    type: str  # application/dicom, application/octet-stream, image/jpeg, */* ...
    multipart: bool
    syntax: str | None  # transfer-syntax parameter; "*" any


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header (q values are not weighed: the first that fits wins)."""
    if not header or not header.strip():
        return [MediaRange("*/*", False, "*")]
    out = []
    for item in _split_outside_quotes(header, ","):
        parts = _split_outside_quotes(item, ";")
        main = parts[0].strip().lower()
        params = {}
        for p in parts[1:]:
            k, _, v = p.partition("=")
            params[k.strip().lower()] = v.strip().strip('"')
        if main == "multipart/related":
            out.append(MediaRange(params.get("type", "application/dicom").lower(), True, params.get("transfer-syntax")))
        else:
            out.append(MediaRange(main, False, params.get("transfer-syntax")))
    return out


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return [p for p in out if p.strip()]


def _takes(ranges: list[MediaRange], media: tuple[str, ...], syntaxes: set[str], default_syntax: str) -> bool:
    """Whether some range takes parts of ``media`` in every one of ``syntaxes``."""
    for r in ranges:
        if r.type not in (*media, "*/*", "*", "multipart/related"):
            continue
        wanted = r.syntax if r.syntax is not None else ("*" if r.type in ("*/*", "*") else default_syntax)
        if wanted == "*" or syntaxes <= {wanted}:
            return True
    return False


def _not_acceptable(what: str, syntaxes: set[str], accept: str | None) -> DicomwebError:
    return DicomwebError(406, f"the {what} is stored in transfer syntax {', '.join(sorted(syntaxes))}; the Accept "
                              f"header ({accept or 'none'}) takes neither it nor Explicit VR Little Endian "
                              f"({EXPLICIT_LE}), the one syntax stored data is decoded to (it is never re-encoded): "
                              'ask with transfer-syntax=* (e.g. multipart/related; type="application/dicom"; '
                              'transfer-syntax=*)')


def _identifier(level: str, study: str, series: str | None = None, sop: str | None = None) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.StudyInstanceUID = study
    if series:
        ds.SeriesInstanceUID = series
    if sop:
        ds.SOPInstanceUID = sop
    return ds


def _storage(request: web.Request) -> ObjectStorage:
    storage = request.config_dict[ENGINE].storage
    if storage is None:
        raise DicomwebError(404, "this engine has no study storage")
    return storage


async def _selected(request: web.Request) -> tuple[str, list[InstanceRef], list[int]]:
    """The instances the path names (study, series or one instance), in order, and the study's
    linked patient for the audit row; 404 when there are none."""
    study = request.match_info["study"]
    series, sop = request.match_info.get("series"), request.match_info.get("sop")
    level = "IMAGE" if sop else "SERIES" if series else "STUDY"

    def run(conn: Connection) -> tuple[list[InstanceRef], list[int]]:
        try:
            refs = instances_for(conn, _identifier(level, study, series, sop))
        except QueryError as exc:  # more instances than one retrieve sends
            raise DicomwebError(400, str(exc)) from None
        return refs, patients_of_studies(conn, [study])
    refs, patients = await on_reader(request, run)
    if not refs:
        what = "instance" if sop else "series" if series else "study"
        raise DicomwebError(404, f"no such {what} here")
    return study, refs, patients


async def _audit(request: web.Request, study: str, refs: list[InstanceRef], patients: list[int]) -> None:
    await record_read(request, "read", "Study", 200, [{"SOPInstanceUID": r.sop_instance_uid} for r in refs],
                      patients, study_uid=study)


# ---------------------------------------------------------------- WADO-RS: instances


async def _multipart(request: web.Request, part_type: str, status: int = 200,
                     headers: dict[str, str] | None = None, *, boundary: str | None = None,
                     length: int | None = None) -> tuple[web.StreamResponse, str]:
    """A multipart/related answer started: with ``length`` its Content-Length, else chunked."""
    boundary = boundary or secrets.token_hex(16)
    response = web.StreamResponse(status=status, headers={
        **(headers or {}), "Content-Type": f'multipart/related; type="{part_type}"; boundary={boundary}'})
    if length is None:
        response.enable_chunked_encoding()
    else:
        response.content_length = length
    await response.prepare(request)
    return response, boundary


async def _part(response: web.StreamResponse, boundary: str, headers: dict[str, str], body: bytes | None = None,
                source: BinaryIO | None = None) -> None:
    head = f"--{boundary}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    await response.write(head.encode())
    if body is not None:
        await response.write(body)
    if source is not None:
        while chunk := await asyncio.to_thread(source.read, CHUNK):
            await response.write(chunk)
    await response.write(b"\r\n")


@routes.get(STUDY)
@routes.get(SERIES)
@routes.get(INSTANCE)
@requires(Role.READ)
async def retrieve(request: web.Request) -> web.StreamResponse:
    study, refs, patients = await _selected(request)
    accept = request.headers.get("Accept")
    plan = plan_retrieve(parse_accept(accept), refs)
    what = "study" if len(refs) > 1 else "instance"
    if plan.left_out and not plan.decodes:  # neither the stored syntax nor explicit VR little endian
        raise _not_acceptable(what, {r.transfer_syntax for r in refs}, accept)
    if not plan.sent:  # nothing asked for can be decoded
        raise DicomwebError(406, f"the {what} cannot be sent: {plan.reasons}; the Accept header "
                                 f"({accept or 'none'}) does not take the stored syntax")
    for ref, _reason in plan.left_out:
        log.warning("WADO-RS: instance %s left out: %s", ref.sop_instance_uid, _why(ref.transfer_syntax))
    storage = _storage(request)
    await asyncio.to_thread(measure_stored, storage, plan)
    if not plan.sent:
        raise DicomwebError(500, f"the stored files of this {what} cannot be read; the engine's log says which")
    await _audit(request, study, plan.sent, patients)
    headers = {}
    if plan.left_out:  # PS3.18: some of what was asked for is not in the answer
        headers["Warning"] = f'299 - "{len(plan.left_out)} of {len(refs)} instances left out: {plan.reasons}"'
    parts = InstanceParts(secrets.token_hex(16), f"{base_url(request)}/studies/{study}/instances")
    response, _ = await _multipart(request, "application/dicom", 206 if plan.left_out else 200, headers,
                                   boundary=parts.boundary, length=parts.length(plan))
    try:
        sent = await _stream_instances(request, response, storage, plan, parts)
    except PartCutShort:  # logged, and the connection aborted: nothing more can be sent
        return response
    await response.write(parts.close(sent))
    await response.write_eof()
    return response


@dataclass
class InstanceParts:
    """The framing of a WADO-RS instances answer: each part's head and the closing delimiter. When
    every instance goes out as stored, their sizes in the index give the whole answer's length before
    a byte is sent (Content-Length: the client reads the body in one piece, not chunk by chunk)."""

    boundary: str
    location: str  # .../studies/{study}/instances

    def head(self, ref: InstanceRef, syntax: str, first: bool) -> bytes:
        """The part's delimiter and headers; every part after the first starts with the CRLF that ends
        the one before."""
        return (f"{'' if first else CRLF}--{self.boundary}{CRLF}Content-Type: application/dicom; "
                f"transfer-syntax={syntax}{CRLF}Content-Location: {self.location}/{ref.sop_instance_uid}"
                f"{CRLF}{CRLF}").encode()

    def close(self, sent: bool) -> bytes:
        return f"{CRLF if sent else ''}--{self.boundary}--{CRLF}".encode()

    def length(self, plan: RetrievePlan) -> int | None:
        """The answer's length in bytes, or None when a part's size is not known before it is sent
        (an instance decoded: known only once it is)."""
        if plan.decode or any(ref.sop_instance_uid not in plan.sizes for ref in plan.sent):
            return None
        return (sum(len(self.head(ref, ref.transfer_syntax, i == 0)) + plan.sizes[ref.sop_instance_uid]
                    for i, ref in enumerate(plan.sent))
                + len(self.close(bool(plan.sent))))


@dataclass
class _Opened:
    """An instance being sent: the file positioned at its start, and its length in bytes."""

    ref: InstanceRef
    syntax: str
    source: BinaryIO
    size: int

    @property
    def as_stored(self) -> bool:
        return self.syntax == self.ref.transfer_syntax

    def close(self) -> None:
        self.source.close()


def _read_upto(source: BinaryIO, size: int) -> tuple[bytes, bool]:
    """Up to ``size`` bytes of ``source``, and whether it ended (short reads of a stream are read on)."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        data = source.read(size - got)
        if not data:
            return b"".join(parts), True
        parts.append(data)
        got += len(data)
    return b"".join(parts), False


def _will_need(source: BinaryIO) -> None:
    """Ask the kernel to start reading the file into the page cache now, so that sending it from the
    event loop (sendfile) does not wait on the disk."""
    with contextlib.suppress(AttributeError, OSError, io.UnsupportedOperation):
        os.posix_fadvise(source.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)


def _open_instance(storage: ObjectStorage, ref: InstanceRef, decode: bool) -> _Opened | None:
    """In a worker thread: the stored file opened (decoded first when ``decode``) and measured, in
    one go; None when it cannot be sent (headers are sent by then: the part is left out, the log
    says why)."""
    try:
        source = storage.open(ref.storage_key)
    except OSError as exc:
        log.error("WADO-RS: the file of instance %s cannot be read (%s)", ref.sop_instance_uid, type(exc).__name__)
        return None
    syntax = ref.transfer_syntax
    try:
        if decode:
            try:  # one instance decoded at a time, spooled to a temporary file
                decoded = _decoded_file(source)
            except TranscodeError as exc:
                log.warning("WADO-RS: instance %s left out: %s", ref.sop_instance_uid, exc)
                source.close()
                return None
            source.close()
            source, syntax = decoded, EXPLICIT_LE
        else:
            _will_need(source)
        size = source.seek(0, os.SEEK_END)
        source.seek(0)
    except BaseException:
        source.close()
        raise
    return _Opened(ref, syntax, source, size)


def _file_descriptor(source: BinaryIO) -> int | None:
    """The OS file behind ``source``, when it has one (a spooled decoded instance in memory has not)."""
    try:
        return source.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


class PartCutShort(RadBridgeError):
    """An instance cannot be sent as the answer's Content-Length promised (its file is gone, or is not
    the size the index holds: rewritten since the answer began); the connection is aborted, so the
    client sees a failed transfer, never a short or malformed one."""


def _abort(request: web.Request, reason: str) -> PartCutShort:
    log.error("WADO-RS: answer aborted: %s", reason)
    if request.transport is not None:
        request.transport.abort()
    return PartCutShort(reason)


async def _send_as_stored(request: web.Request, head: bytes, opened: _Opened, chunked: bool) -> None:
    """The part's head and the whole stored file, the file sent by the kernel (sendfile: no copy
    through Python; asyncio copies in its stead where the transport cannot, e.g. TLS). A chunked
    answer gets one HTTP chunk per part, its length written before the file."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client went away")
    with _corked(transport):  # the head leaves with the file's first bytes, not in a packet of its own
        transport.write((f"{len(head) + opened.size:x}{CRLF}".encode() if chunked else b"") + head)
        sent = await asyncio.get_running_loop().sendfile(transport, opened.source, 0, opened.size)
        if sent != opened.size:
            raise _abort(request, f"instance {opened.ref.sop_instance_uid}: {sent} of {opened.size} bytes read")
        if chunked:
            transport.write(CRLF.encode())


@contextlib.contextmanager
def _corked(transport: asyncio.BaseTransport) -> Iterator[None]:
    """TCP_CORK on a plain TCP connection while a part is written: small writes wait for the data
    after them (Linux); uncorking sends what is left."""
    sock = None if transport.get_extra_info("sslcontext") is not None else transport.get_extra_info("socket")
    corked = False
    if sock is not None and hasattr(socket, "TCP_CORK"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            corked = True
    try:
        yield
    finally:
        if corked and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)


async def _send_copied(response: web.StreamResponse, head: bytes, opened: _Opened) -> None:
    """The part's head and the file read through Python, CHUNK by CHUNK (a decoded instance)."""
    await response.write(head)
    ended = False
    while not ended:
        chunk, ended = await asyncio.to_thread(_read_upto, opened.source, CHUNK)
        if chunk:
            await response.write(chunk)


def _batches(plan: RetrievePlan) -> list[list[InstanceRef]]:
    """``plan.sent`` in turn, in groups opened by one worker-thread call: up to OPEN_AHEAD files sent
    as stored, or one instance to be decoded."""
    out: list[list[InstanceRef]] = []
    stored: list[InstanceRef] = []
    for ref in plan.sent:
        if ref.sop_instance_uid in plan.decode:
            if stored:
                out.append(stored)
                stored = []
            out.append([ref])
            continue
        stored.append(ref)
        if len(stored) == OPEN_AHEAD:
            out.append(stored)
            stored = []
    if stored:
        out.append(stored)
    return out


def _open_batch(storage: ObjectStorage, refs: list[InstanceRef], decode: set[str]) -> list[_Opened | None]:
    opened: list[_Opened | None] = []
    try:
        for ref in refs:
            opened.append(_open_instance(storage, ref, ref.sop_instance_uid in decode))
    except BaseException:
        _close_all(opened)
        raise
    return opened


def _close_all(opened: list[_Opened | None]) -> None:
    for one in opened:
        if one is not None:
            one.close()


async def _stream_instances(request: web.Request, response: web.StreamResponse, storage: ObjectStorage,
                            plan: RetrievePlan, parts: InstanceParts) -> bool:
    """The parts of ``plan.sent``, file by file (a study is never in memory whole): while a group of
    stored files is sent, the next group is opened, measured and its reading from disk started, in a
    worker thread; one to be decoded is decoded in its turn, not ahead. A part sent as stored goes out
    by sendfile. In a chunked answer an instance that cannot be read is left out (the log says why);
    under a Content-Length the answer is aborted instead. True when a part was sent."""
    batches = _batches(plan)

    def start(k: int) -> asyncio.Future[list[_Opened | None]]:
        return asyncio.ensure_future(asyncio.to_thread(_open_batch, storage, batches[k], plan.decode))

    exact = response.content_length is not None
    pending: asyncio.Future[list[_Opened | None]] | None = None
    first = True
    try:
        for k, batch in enumerate(batches):
            group = await (pending if pending is not None else start(k))
            pending = None
            if k + 1 < len(batches) and batches[k + 1][0].sop_instance_uid not in plan.decode:
                pending = start(k + 1)
            try:
                for ref, opened in zip(batch, group, strict=True):
                    if opened is None:
                        if exact:
                            raise _abort(request, f"instance {ref.sop_instance_uid} cannot be read")
                        continue
                    if exact and opened.size != plan.sizes[ref.sop_instance_uid]:
                        raise _abort(request, f"the file of instance {ref.sop_instance_uid} changed size "
                                              "since the answer began")
                    head = parts.head(ref, opened.syntax, first)
                    if opened.as_stored and opened.size and _file_descriptor(opened.source) is not None:
                        await _send_as_stored(request, head, opened, chunked=not exact)
                    else:
                        await _send_copied(response, head, opened)
                    opened.close()
                    first = False
            finally:
                _close_all(group)
    finally:
        if pending is not None:  # the client went away: the files opened ahead are closed when opened
            pending.add_done_callback(_close_opened)
    return not first


def _close_opened(done: asyncio.Future[list[_Opened | None]]) -> None:
    if not done.cancelled() and done.exception() is None:
        _close_all(done.result())


# ---------------------------------------------------------------- WADO-RS: transcoding on retrieve

BIG_ENDIAN = "1.2.840.10008.1.2.2"
DECODED_SPOOL = 16 * CHUNK  # a decoded instance up to this size stays in memory, a larger one goes to disk


def convertible(syntax: str) -> str | None:
    """None when an instance stored in ``syntax`` can be sent as Explicit VR Little Endian (uncompressed
    little endian re-encoded, compressed decoded); else why not, naming the syntax."""
    if syntax in UNCOMPRESSED_LE:
        return None
    if syntax == BIG_ENDIAN:
        return f"{syntax} is not converted to little endian"
    return None if can_decode(syntax) else f"no decoder for {syntax}"


def _why(syntax: str) -> str:
    """The reason an instance is left out, for the log (the syntax by name and UID)."""
    reason = convertible(syntax) or "not accepted"
    return reason.replace(syntax, syntax_label(syntax))


@dataclass
class RetrievePlan:
    sent: list[InstanceRef] = field(default_factory=list)  # in order
    decode: set[str] = field(default_factory=set)  # SOP Instance UIDs sent decoded
    left_out: list[tuple[InstanceRef, str]] = field(default_factory=list)  # and why
    decodes: bool = False  # the Accept takes explicit VR little endian
    sizes: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> bytes, of files sent as stored

    @property
    def reasons(self) -> str:
        return "; ".join(sorted({reason for _, reason in self.left_out}))


def plan_retrieve(ranges: list[MediaRange], refs: list[InstanceRef]) -> RetrievePlan:
    """Decided before any header is sent: each instance as stored (the Accept takes its syntax),
    decoded to Explicit VR Little Endian (the Accept takes that and the instance can be), or left out."""
    plan = RetrievePlan(decodes=_takes(ranges, ("application/dicom",), {EXPLICIT_LE}, EXPLICIT_LE))
    for ref in refs:
        syntax = ref.transfer_syntax
        if _takes(ranges, ("application/dicom",), {syntax}, EXPLICIT_LE):
            plan.sent.append(ref)
        elif not plan.decodes:
            plan.left_out.append((ref, f"{syntax} not accepted"))  # the whole request is refused
        elif (reason := convertible(syntax)) is not None:
            plan.left_out.append((ref, reason))
        else:
            plan.sent.append(ref)
            plan.decode.add(ref.sop_instance_uid)
    return plan


def measure_stored(storage: ObjectStorage, plan: RetrievePlan) -> None:
    """In a worker thread, before any header is sent: the size of each file to be sent as stored (the
    answer's Content-Length is made of them); an instance whose file is gone from storage is left
    out, with the reason, and the log names it."""
    kept: list[InstanceRef] = []
    for ref in plan.sent:
        path = None if ref.sop_instance_uid in plan.decode else storage.local_path(ref.storage_key)
        if path is not None:
            try:
                plan.sizes[ref.sop_instance_uid] = path.stat().st_size
            except OSError as exc:
                log.error("WADO-RS: the file of instance %s cannot be read (%s)", ref.sop_instance_uid,
                          type(exc).__name__)
                plan.left_out.append((ref, "its file cannot be read from storage"))
                continue
        kept.append(ref)
    plan.sent = kept


def _decoded_file(source: BinaryIO) -> BinaryIO:
    """The stored instance decoded to Explicit VR Little Endian, as a file positioned at its start."""
    item = decoded_for(source, [EXPLICIT_LE])
    ds = item.dataset
    ds.file_meta.TransferSyntaxUID = SyntaxUID(EXPLICIT_LE)  # uncompressed stored ones are re-encoded here
    out = tempfile.SpooledTemporaryFile(max_size=DECODED_SPOOL)  # noqa: SIM115 - closed by the caller
    try:
        ds.save_as(out, enforce_file_format=True)
    except Exception:
        out.close()
        raise
    out.seek(0)
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------- WADO-RS: metadata and bulk data


def _read(storage: ObjectStorage, key: str, **kwargs: Any) -> Dataset:
    with storage.open(key) as f:
        return pydicom.dcmread(f, **kwargs)


def instance_elements(ds: Dataset) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """The instance's top-level elements in the DICOM JSON model, in tag order: (tag as 8 hex digits,
    its JSON object), or (tag, VR) for a binary value over BULK_INLINE_MAX bytes (the pixel data among
    them), which is given by BulkDataURI; such values are not read."""
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset reads every element; its tags do not
        raw = ds.get_item(tag, keep_deferred=True)
        key = f"{int(tag):08X}"
        vr = (raw.VR if raw is not None else None) or _vr_of_tag(int(tag))
        if vr in BULK_VRS and raw is not None and _length(raw) > BULK_INLINE_MAX:
            if vr in ("OB or OW", "US or OW"):
                vr = "OW" if int(ds.get("BitsAllocated") or 16) > 8 else "OB"
            yield key, vr
            continue
        yield key, ds[tag].to_json_dict(bulk_data_element_handler=None, bulk_data_threshold=1 << 30)


@dataclass(frozen=True)
class InstanceMetadata:
    """One instance's DICOM JSON as text, with a gap for each bulk data element, whose BulkDataURI
    depends on the request (its base URL); ``file_state`` tells whether the file is still the one read."""

    series_uid: str
    pieces: tuple[str, ...]  # the JSON text around the gaps: one more piece than gaps
    bulk: tuple[tuple[str, str], ...]  # each gap's (tag as 8 hex digits, VR)
    file_state: tuple[int, int] | None  # (size, mtime_ns) of the local file read; None: not a local file

    @classmethod
    def of(cls, ds: Dataset, file_state: tuple[int, int] | None) -> InstanceMetadata:
        pieces, bulk, text = [], [], ["{"]
        for i, (key, value) in enumerate(instance_elements(ds)):
            text.append(f'{", " if i else ""}"{key}": ')
            if isinstance(value, str):
                pieces.append("".join(text))
                bulk.append((key, value))
                text = []
            else:
                text.append(json.dumps(value))
        pieces.append("".join(text) + "}")
        return cls(str(ds.SeriesInstanceUID), tuple(pieces), tuple(bulk), file_state)

    @property
    def size(self) -> int:
        """About what it holds, in bytes (for the cache's bound)."""
        return sum(len(p) for p in self.pieces) + 200 + 64 * len(self.bulk)

    def json_text(self, bulk_base: str) -> str:
        """The DICOM JSON object, each bulk data element's BulkDataURI ``{bulk_base}/{tag}``."""
        out = [self.pieces[0]]
        for (key, vr), after in zip(self.bulk, self.pieces[1:], strict=True):
            out += [json.dumps({"vr": vr, "BulkDataURI": f"{bulk_base}/{key}"}), after]
        return "".join(out)


class MetadataCache:
    """WADO-RS metadata of instances read before, by storage key, least recently used dropped past
    ``max_bytes``. A storage key names one content (it carries the file's SHA-256; a coerced instance is
    stored under a new key), and an entry of a local file is used only while the file's size and
    modification time are those it was read with, so a file replaced behind the engine's back is read
    again. Per engine process; shared by the requests' worker threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, InstanceMetadata] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str, file_state: tuple[int, int] | None) -> InstanceMetadata | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None or found.file_state != file_state:
                return None
            self._entries.move_to_end(key)
            return found

    def put(self, key: str, metadata: InstanceMetadata) -> None:
        if metadata.size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            self._bytes += metadata.size - (old.size if old is not None else 0)
            self._entries[key] = metadata
            while self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.size

    def __len__(self) -> int:
        return len(self._entries)


METADATA_CACHE = web.AppKey("metadata_cache", MetadataCache)


def file_state(storage: ObjectStorage, key: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of the stored file, None when storage is not a local folder; OSError when gone."""
    path = storage.local_path(key)
    if path is None:
        return None
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def read_metadata(storage: ObjectStorage, cache: MetadataCache, key: str) -> InstanceMetadata:
    """The instance's metadata from the cache, or read from its file (header only) and cached."""
    state = file_state(storage, key)
    found = cache.get(key, state)
    if found is None:
        found = InstanceMetadata.of(_read(storage, key, defer_size=BULK_INLINE_MAX), state)
        cache.put(key, found)
    return found


def _length(raw: Any) -> int:
    """The value's length in bytes, without reading a deferred value."""
    if isinstance(raw, RawDataElement):
        return int(raw.length) if raw.value is None else len(raw.value)
    value = raw.value
    return len(value) if isinstance(value, (bytes, bytearray)) else 0


def _vr_of_tag(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


@routes.get(STUDY + "/metadata")
@routes.get(SERIES + "/metadata")
@routes.get(INSTANCE + "/metadata")
@requires(Role.READ)
async def metadata(request: web.Request) -> web.Response:
    study, refs, patients = await _selected(request)
    storage = _storage(request)
    base = base_url(request)

    cache = request.app[METADATA_CACHE]

    def read_all() -> list[str]:
        out = []
        for ref in refs:
            try:
                meta = read_metadata(storage, cache, ref.storage_key)
            except OSError as exc:
                log.error("WADO-RS metadata: the file of instance %s cannot be read (%s)", ref.sop_instance_uid,
                          type(exc).__name__)
                continue
            out.append(meta.json_text(f"{base}/studies/{study}/series/{meta.series_uid}/instances/"
                                      f"{ref.sop_instance_uid}/bulkdata"))
        return out
    objects = await asyncio.to_thread(read_all)
    await _audit(request, study, refs, patients)
    return web.Response(text="[" + ", ".join(objects) + "]", content_type=DICOM_JSON)



async def _one_instance(request: web.Request) -> tuple[str, InstanceRef, list[int], Dataset]:
    study, refs, patients = await _selected(request)
    return study, refs[0], patients, await _load(request, refs[0])


async def _load(request: web.Request, ref: InstanceRef) -> Dataset:
    storage = _storage(request)
    try:
        ds = await asyncio.to_thread(_read, storage, ref.storage_key)
    except OSError as exc:
        log.error("WADO-RS: the file of instance %s cannot be read (%s)", ref.sop_instance_uid, type(exc).__name__)
        raise DicomwebError(503, "the stored file cannot be read") from None
    return ds


@routes.get(INSTANCE + r"/bulkdata/{tag:[0-9A-Fa-f]{8}}")
@requires(Role.READ)
async def bulkdata(request: web.Request) -> web.StreamResponse:
    """A top-level binary value of the instance as stored (for pixel data: native bytes, or the
    encapsulated fragments as they are in the file)."""
    study, ref, patients, ds = await _one_instance(request)
    tag = int(request.match_info["tag"], 16)
    if tag not in ds or not isinstance(ds[tag].value, (bytes, bytearray)):
        raise DicomwebError(404, f"the instance has no bulk data element {request.match_info['tag'].upper()}")
    await _audit(request, study, [ref], patients)
    response, boundary = await _multipart(request, "application/octet-stream")
    await _part(response, boundary, {"Content-Type": "application/octet-stream"}, body=bytes(ds[tag].value))
    await response.write(f"--{boundary}--\r\n".encode())
    await response.write_eof()
    return response


# ---------------------------------------------------------------- WADO-RS: frames and rendered


def parse_frames(raw: str) -> list[int]:
    try:
        frames = [int(p) for p in raw.split(",") if p.strip()]
    except ValueError:
        frames = []
    if not frames or any(f < 1 for f in frames):
        raise DicomwebError(400, f"{raw!r} is not a list of frame numbers (1, 2, ...)")
    return frames


def frame_bytes(ds: Dataset, syntax: str, numbers: list[int]) -> list[bytes]:
    """The frames' bytes: native pixel data sliced, encapsulated frames as stored."""
    count = int(ds.get("NumberOfFrames") or 1)
    if missing := [n for n in numbers if n > count]:
        raise DicomwebError(404, f"frame(s) {', '.join(map(str, missing))} asked for; the instance has {count}")
    data = ds.PixelData
    if syntax in NATIVE:
        bits = int(ds.BitsAllocated)
        pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1)
        if bits % 8:
            raise DicomwebError(406, f"frames of {bits}-bit pixel data are not sliced here")
        size = pixels * bits // 8
        return [bytes(data[(n - 1) * size:n * size]) for n in numbers]
    return [get_frame(data, n - 1, number_of_frames=count) for n in numbers]


@routes.get(INSTANCE + r"/frames/{frames:[0-9,]+}")
@requires(Role.READ)
async def frames(request: web.Request) -> web.StreamResponse:
    numbers = parse_frames(request.match_info["frames"])
    study, refs, patients = await _selected(request)
    ref = refs[0]
    syntax = EXPLICIT_LE if ref.transfer_syntax in NATIVE else ref.transfer_syntax
    if syntax != EXPLICIT_LE and not SyntaxUID(syntax).is_compressed:  # big endian
        raise _not_acceptable("instance's pixel data", {syntax}, "frames are sent little endian")
    accept = request.headers.get("Accept")
    ranges = parse_accept(accept)
    decode = False
    if not _takes(ranges, ("application/octet-stream",), {syntax}, EXPLICIT_LE):
        # compressed, and the Accept takes uncompressed frames: the pixel data decoded (never re-encoded)
        if syntax == EXPLICIT_LE or not _takes(ranges, ("application/octet-stream",), {EXPLICIT_LE}, EXPLICIT_LE):
            raise _not_acceptable("instance's pixel data", {syntax}, accept)
        if (reason := convertible(syntax)) is not None:
            log.warning("WADO-RS frames: instance %s not sent: %s", ref.sop_instance_uid, _why(syntax))
            raise DicomwebError(406, f"the instance's pixel data cannot be sent uncompressed: {reason}; the "
                                     f"Accept header ({accept or 'none'}) does not take the stored syntax")
        decode = True
    ds = await _load(request, ref)
    if "PixelData" not in ds:
        raise DicomwebError(404, "the instance has no pixel data")
    if decode:
        try:
            ds = (await asyncio.to_thread(decoded_for, ds, [EXPLICIT_LE])).dataset
        except TranscodeError as exc:
            log.warning("WADO-RS frames: instance %s not sent: %s", ref.sop_instance_uid, exc)
            raise DicomwebError(406, f"the instance's pixel data cannot be sent uncompressed: {exc.comment}") from None
        syntax = EXPLICIT_LE
    parts = await asyncio.to_thread(frame_bytes, ds, syntax, numbers)
    await _audit(request, study, [ref], patients)
    response, boundary = await _multipart(request, "application/octet-stream")
    for body in parts:
        await _part(response, boundary, {"Content-Type": f"application/octet-stream; transfer-syntax={syntax}"},
                    body=body)
    await response.write(f"--{boundary}--\r\n".encode())
    await response.write_eof()
    return response


def parse_window(raw: str | None) -> Window | None:
    if raw is None:
        return None
    parts = [p.strip() for p in raw.split(",")]
    try:
        center, width = float(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        raise DicomwebError(400, f"window is center,width[,function], not {raw!r}") from None
    function = (parts[2] if len(parts) > 2 and parts[2] else "linear").upper().replace("-", "_")
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID") or width <= 0:
        raise DicomwebError(400, "window's function is linear, linear-exact or sigmoid, and its width above 0")
    return Window(center, width, function)


def parse_viewport(raw: str | None) -> tuple[int, int] | None:
    if raw is None:
        return None
    parts = raw.split(",")
    if len(parts) not in (2, 6) or not all(p.strip().isdigit() and int(p) > 0 for p in parts[:2]):
        raise DicomwebError(400, f"viewport is vw,vh (pixels), not {raw!r}")
    if len(parts) == 6:
        raise DicomwebError(400, "viewport with a source region (sx,sy,sw,sh) is not supported")
    return int(parts[0]), int(parts[1])


def _rendered_type(accept: str | None) -> str:
    for r in parse_accept(accept):
        if r.type in ("image/jpeg", "image/png"):
            return r.type
        if r.type in ("*/*", "image/*", "*"):
            return "image/jpeg"
    raise DicomwebError(406, "rendered images are image/jpeg (the default) or image/png")


async def _rendered(request: web.Request, frame: int | None) -> web.Response:
    media = _rendered_type(request.headers.get("Accept"))
    window = parse_window(request.query.get("window"))
    viewport = parse_viewport(request.query.get("viewport"))
    quality = _number("quality", request.query.get("quality", "90"), 100)
    study, refs, patients = await _selected(request)
    ref = refs[0]
    storage = _storage(request)

    def make() -> bytes:
        with storage.open(ref.storage_key) as f:
            return render(f, frame=frame, window=window, max_side=None, viewport=viewport,
                          image_format="JPEG" if media == "image/jpeg" else "PNG", quality=max(1, quality))
    try:
        image = await asyncio.to_thread(make)
    except FrameMissing as exc:
        raise DicomwebError(404, str(exc)) from None
    except ThumbnailError as exc:
        log.warning("WADO-RS rendered %s (%s): %s", ref.sop_instance_uid, ref.transfer_syntax, exc)
        raise DicomwebError(406 if "decoded" in str(exc) else 404, str(exc)) from None
    except OSError as exc:
        log.error("WADO-RS rendered: the file of instance %s cannot be read (%s)", ref.sop_instance_uid,
                  type(exc).__name__)
        raise DicomwebError(503, "the stored file cannot be read") from None
    await _audit(request, study, [ref], patients)
    return web.Response(body=image, content_type=media, headers={"X-Content-Type-Options": "nosniff"})


@routes.get(INSTANCE + "/rendered")
@requires(Role.READ)
async def instance_rendered(request: web.Request) -> web.Response:
    return await _rendered(request, None)


@routes.get(INSTANCE + r"/frames/{frame:[0-9]+}/rendered")
@requires(Role.READ)
async def frame_rendered(request: web.Request) -> web.Response:
    numbers = parse_frames(request.match_info["frame"])
    return await _rendered(request, numbers[0])


def dicomweb_app(metadata_cache_bytes: int = METADATA_CACHE_BYTES) -> web.Application:
    app = web.Application(middlewares=[errors_as_json])
    app[METADATA_CACHE] = MetadataCache(metadata_cache_bytes)
    app.add_routes(routes)
    return app

