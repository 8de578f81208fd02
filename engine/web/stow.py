"""STOW-RS at /dicomweb/ (PS3.18 10.5): ``POST /studies`` and ``POST /studies/{study}``, role ``store``.

The body (multipart/related; type="application/dicom") is read part by part with aiohttp's
MultipartReader, each part written to a temporary file in the storage's spool folder as it arrives
(the folder pynetdicom writes C-STORE data to; files left by a crash are deleted at start): nothing
of an instance is held in memory. Once the body is in, each file goes through the one way instances
are stored, C-STORE's own (``DicomListener.store_file``): the same storage, free-space floor, index,
duplicate policy, domain events and reconciliation; each answered only after its index COMMIT. The
response is sent after every instance's commit, so an instance answered as stored is stored.

Per-instance failures carry C-STORE's status codes as Failure Reason (engine/dicom/status.py).
Statuses: 200 every instance stored, 202 some failed, 409 none stored, 400 a body that is not
multipart or has no part, 408 a body that stalls, 413 a body over ``[http] stow_max_bytes``, 415
another media type, 503 no dicom channel to store through. One audit row per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.hdrs import CONTENT_TYPE
from aiohttp.helpers import parse_mimetype

from engine.connectors.dicom.scp import DicomListener, StoreAnswer
from engine.dicom import status as S
from engine.dicom.headers import InstanceHeader
from engine.store.audit import AuditAction, Subject, record_action
from engine.store.tokens import Role
from engine.web.audit import actor_of
from engine.web.dicomweb import STUDY, DicomwebError, base_url, patients_of_studies
from engine.web.keys import ENGINE, SETTINGS, WRITER
from engine.web.roles import requires

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
CHUNK = 1 << 20  # bytes read from the body at a time


@dataclass
class Spooled:
    """One part of the body: its file, or why it was not kept."""

    path: Path | None
    refusal: StoreAnswer | None = None


@routes.post("/studies")
@requires(Role.STORE)
async def store_instances(request: web.Request) -> web.Response:
    """STOW-RS: store the instances of the body, whatever their study."""
    return await _stow(request, None)


@routes.post(STUDY)
@requires(Role.STORE)
async def store_study_instances(request: web.Request) -> web.Response:
    """STOW-RS: store the instances of the body that belong to this study (others fail: A900)."""
    return await _stow(request, request.match_info["study"])


async def _stow(request: web.Request, study: str | None) -> web.Response:
    listener = request.config_dict[ENGINE].stow_listener()
    try:
        if listener is None:
            raise DicomwebError(503, "no dicom channel is enabled to store instances through")
        _check_media_type(request)
        limit = request.config_dict[SETTINGS].http.stow_max_bytes
        if request.content_length is not None and request.content_length > limit:
            raise DicomwebError(413, f"the body is larger than {limit} bytes (http.stow_max_bytes)")
        parts = await _spool(request, listener, limit)
    except DicomwebError as exc:
        await _audit(request, exc.status, study, [], None)
        raise
    try:
        answers = [await _store(request, listener, part, study) for part in parts]
    finally:
        _discard(parts)  # what store_file did not move into storage
    stored = [a for a in answers if a.stored]
    status = 200 if len(stored) == len(answers) else 202 if stored else 409
    body = _response(request, answers, study)
    await _audit(request, status, study, answers, f"{len(stored)} of {len(answers)} instance(s) stored")
    # exactly application/dicom+json, no charset parameter: clients (dicomweb-client) compare the whole header
    return web.Response(body=json.dumps(body).encode(), status=status, headers={CONTENT_TYPE: DICOM_JSON})


def _check_media_type(request: web.Request) -> None:
    mime = parse_mimetype(request.headers.get(CONTENT_TYPE, ""))
    if (mime.type, mime.subtype) != ("multipart", "related") or mime.parameters.get("type", DICOM).lower() != DICOM:
        raise DicomwebError(415, 'the body must be multipart/related; type="application/dicom"')
    if not mime.parameters.get("boundary"):
        raise DicomwebError(400, "the multipart/related body has no boundary")


async def _spool(request: web.Request, listener: DicomListener, limit: int) -> list[Spooled]:
    """Every part of the body in a file of its own (a part that is not application/dicom, or that
    arrives while free space is below the floor, is read and dropped, and kept as a refusal)."""
    timeout = request.config_dict[SETTINGS].http.body_timeout_seconds
    parts: list[Spooled] = []
    total = 0
    try:
        reader = await request.multipart()
        for _ in range(1_000_000):  # bounded: a body of empty parts still ends
            part = await asyncio.wait_for(reader.next(), timeout)
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise DicomwebError(400, "nested multipart parts are not instances")
            spooled, size = await _spool_part(part, listener, timeout, limit - total)
            total += size
            parts.append(spooled)
    except TimeoutError:
        _discard(parts)
        raise DicomwebError(408, f"the body did not arrive within {timeout:g}s of silence "
                                 "(http.body_timeout_seconds)") from None
    except DicomwebError:
        _discard(parts)
        raise
    except (ValueError, AssertionError, RuntimeError, OSError) as exc:  # what aiohttp raises on a broken body
        _discard(parts)
        log.info("STOW-RS body refused: %s", exc)
        raise DicomwebError(400, "the body is not a readable multipart/related message") from None
    if not parts:
        raise DicomwebError(400, "the body holds no instance")
    return parts


async def _spool_part(part: BodyPartReader, listener: DicomListener, timeout: float,
                      room: int) -> tuple[Spooled, int]:
    """One part into a spool file (the storage's tmp folder: engine/runtime.py points tempfile there)."""
    media = parse_mimetype(part.headers.get(CONTENT_TYPE, DICOM))
    wanted = f"{media.type}/{media.subtype}" == DICOM
    loop = asyncio.get_running_loop()
    handle: Any = None  # the spool file (a tempfile wrapper), None when the part is dropped
    if wanted:
        handle = await loop.run_in_executor(None, lambda: tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="tmp", suffix=".dcm", delete=False))
    refusal = None if wanted else StoreAnswer("invalid", S.CANNOT_UNDERSTAND, "part is not application/dicom")
    size = 0
    try:
        for _ in range(1 << 40):  # bounded by the body: read_chunk returns b"" at the part's end
            chunk = await asyncio.wait_for(part.read_chunk(CHUNK), timeout)
            if not chunk:
                break
            size += len(chunk)
            if size > room:
                raise DicomwebError(413, "the body is larger than http.stow_max_bytes")
            if handle is None:
                continue
            if listener.below_floor():
                refusal = StoreAnswer("out_of_resources", S.OUT_OF_RESOURCES,
                                      "storage full: free space below the floor")
                await loop.run_in_executor(None, _drop, handle)
                handle = None
                continue
            try:
                await loop.run_in_executor(None, handle.write, chunk)
            except OSError as exc:  # the spool's file system is full (or failing): this part is not kept
                log.error("STOW-RS: cannot spool a part: %s", exc)
                refusal = StoreAnswer("out_of_resources", S.OUT_OF_RESOURCES, f"storage error: {exc.strerror or exc}")
                await loop.run_in_executor(None, _drop, handle)
                handle = None
    except BaseException:
        if handle is not None:
            await loop.run_in_executor(None, _drop, handle)
        raise
    if handle is None:
        return Spooled(None, refusal), size
    try:
        await loop.run_in_executor(None, handle.close)
    except OSError as exc:
        log.error("STOW-RS: cannot spool a part: %s", exc)
        await loop.run_in_executor(None, _drop, handle)
        return Spooled(None, StoreAnswer("out_of_resources", S.OUT_OF_RESOURCES,
                                         f"storage error: {exc.strerror or exc}")), size
    return Spooled(Path(handle.name)), size


def _drop(handle: Any) -> None:
    with contextlib.suppress(OSError):
        handle.close()
    with contextlib.suppress(OSError):
        os.unlink(handle.name)


def _discard(parts: list[Spooled]) -> None:
    for part in parts:
        if part.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(part.path)


async def _store(request: web.Request, listener: DicomListener, part: Spooled, study: str | None) -> StoreAnswer:
    if part.path is None:
        assert part.refusal is not None
        return part.refusal
    path = part.path
    remote = f"{request.remote}" if request.remote else None
    # the C-STORE way in (a thread: it waits for the writer's COMMIT)
    return await asyncio.get_running_loop().run_in_executor(
        None, lambda: listener.store_file(path, calling=None, remote=remote, expected_study=study))


def _uid(vr: str, value: str | None) -> dict[str, Any]:
    return {"vr": vr, "Value": [value]} if value else {"vr": vr}


def _response(request: web.Request, answers: list[StoreAnswer], study: str | None) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-1) as DICOM JSON."""
    base = base_url(request)
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    studies: set[str] = set()
    for answer in answers:
        h = answer.header
        sop_class = h.sop_class_uid if h is not None else None
        sop = h.sop_instance_uid if h is not None else None
        item = {"00081150": _uid("UI", sop_class), "00081155": _uid("UI", sop)}
        if answer.stored and isinstance(h, InstanceHeader):
            studies.add(h.study_uid)
            item["00081190"] = _uid("UR", f"{base}/studies/{h.study_uid}/series/{h.series_uid}/instances/{sop}")
            referenced.append(item)
        else:
            item["00081197"] = {"vr": "US", "Value": [answer.status]}
            failed.append(item)
    body: dict[str, Any] = {}
    one = study or (next(iter(studies)) if len(studies) == 1 else None)
    if one is not None:
        body["00081190"] = _uid("UR", f"{base}/studies/{one}")
    body["00081198"] = {"vr": "SQ", "Value": failed} if failed else {"vr": "SQ"}
    body["00081199"] = {"vr": "SQ", "Value": referenced} if referenced else {"vr": "SQ"}
    return body


async def _audit(request: web.Request, status: int, study: str | None, answers: list[StoreAnswer],
                 detail: str | None) -> None:
    """The request's one audit row: the study (the request's, else the one study stored), the
    patients of the studies stored, how many instances were stored."""
    stored_studies = sorted({a.header.study_uid for a in answers if a.stored and isinstance(a.header, InstanceHeader)})
    study_uid = study or (stored_studies[0] if len(stored_studies) == 1 else None)
    actor = actor_of(request)
    query = f"{request.method} {request.rel_url}"
    count = sum(1 for a in answers if a.stored)

    def job(s: Any) -> None:
        conn = s.connection()
        subject = Subject("Study", patients_of_studies(conn, stored_studies), study_uid=study_uid, detail=detail,
                          count=count)
        record_action(conn, actor, AuditAction.STORE, subject, status=status, query=query)
    try:
        await request.config_dict[WRITER].run(job)
    except Exception:  # the instances are stored: the answer must still say so
        log.exception("a STOW-RS request could not be recorded in the audit trail")


def with_stow(app: web.Application) -> web.Application:
    """The /dicomweb/ sub-app (engine/web/dicomweb.py) with the STOW-RS routes added."""
    app.add_routes(routes)
    return app
