"""Studies: the list with its filters (state, reconciliation state or the exceptions, study date,
modality, accession), a study page (series with their instance counts and a thumbnail each, the
reconciliation findings with their evidence, the events) and the analyst's actions on it: accept a
finding, match by hand to an order or a patient, clear that match, reconcile again.

Reads are the admin API's queries (engine/web/lookups.py), on the audit trail like the API's; the
actions are the API's too (engine/web/study_actions.py): same code, same audit rows, and the page
shows what happened after a redirect (post/redirect/get)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable
from typing import Any
from urllib.parse import quote

from aiohttp import web

from engine.dicom.thumbnail import ThumbnailCache, ThumbnailError, render_png
from engine.reconciliation.manual import ManualError
from engine.store.states import ReconState, StudyState
from engine.store.tokens import Role
from engine.web import study_actions
from engine.web.audit import record_read
from engine.web.console.pages import done, render
from engine.web.console.paging import PAGE, before_of, first_page, older_page
from engine.web.keys import ENGINE
from engine.web.lookups import MODALITY, StudySearch, find_studies, middle_instance, read_one, study_detail
from engine.web.reads import in_read_session
from engine.web.roles import requires

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

UID = r"[0-9.]{1,64}"
EXCEPTIONS = "exceptions"  # the reconciliation filter's choice for every state that needs an analyst
DATE = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})")
THUMBNAILS = ThumbnailCache()


def _date(raw: str) -> str | None:
    """A date from the form (YYYY-MM-DD, or DICOM's YYYYMMDD) as DICOM DA; None when blank or not a date."""
    found = DATE.fullmatch(raw.strip())
    return "".join(found.groups()) if found else None


def _search(request: web.Request) -> tuple[StudySearch, list[str]]:
    """The list's filters from the query string, and what was not understood (shown, then ignored)."""
    q = request.query
    problems: list[str] = []
    state = q.get("state", "")
    if state and state not in list(StudyState):
        problems.append(f"state {state!r} is not one of {', '.join(StudyState)}")
        state = ""
    recon = q.get("reconciliation", "")
    if recon and recon != EXCEPTIONS and recon not in list(ReconState):
        problems.append(f"reconciliation state {recon!r} is not known")
        recon = ""
    modality = q.get("modality", "").strip().upper()
    if modality and not MODALITY.fullmatch(modality):
        problems.append("a modality is letters and digits (CT, MR, ...)")
        modality = ""
    dates = {}
    for key in ("date_from", "date_to"):
        raw = q.get(key, "")
        dates[key] = _date(raw) if raw.strip() else None
        if raw.strip() and dates[key] is None:
            problems.append(f"{raw!r} is not a date (YYYY-MM-DD)")
    search = StudySearch(accession=q.get("accession", "").strip() or None, state=state or None,
                         reconciliation=recon if recon and recon != EXCEPTIONS else None,
                         exceptions=recon == EXCEPTIONS, modality=modality or None, **dates)
    return search, problems


def _patient_ids(studies: list[dict[str, Any]]) -> list[int]:
    return sorted({st["patient_id"] for st in studies if st["patient_id"] is not None})


@routes.get("/studies")
@requires(Role.READ)
async def studies(request: web.Request) -> web.Response:
    search, problems = _search(request)
    before = before_of(request)
    found = await in_read_session(request, lambda s: find_studies(s, search, PAGE + 1, before=before, details=False))
    await record_read(request, "search", "Study", 200, found[:PAGE], _patient_ids(found[:PAGE]))
    return render(request, "studies.html", {
        "q": request.query, "studies": found[:PAGE], "problems": problems, "older": older_page(request, found),
        "newer": first_page(request), "states": list(StudyState), "recon_states": list(ReconState),
        "exceptions": EXCEPTIONS})


@routes.get(r"/studies/{uid:" + UID + "}")
@requires(Role.READ)
async def study(request: web.Request) -> web.Response:
    uid = request.match_info["uid"]
    body = await read_one(request, "Study", lambda s: study_detail(s, uid), lambda st: _patient_ids([st]))
    if body is None:
        return render(request, "record_missing.html", {"what": f"No study {uid}.", "back": "/studies"}, status=404)
    return render(request, "study.html", {"st": body, "r": body["reconciliation"]})


def _no_thumbnail(reason: str) -> web.Response:
    return web.Response(status=404, text=f"no thumbnail: {reason}", content_type="text/plain",
                        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


@routes.get(r"/studies/{uid:" + UID + r"}/series/{series:" + UID + "}/thumbnail.png")
@requires(Role.READ)
async def thumbnail(request: web.Request) -> web.Response:
    """The series' middle instance as a PNG (engine/dicom/thumbnail.py), kept in memory by its SOP
    Instance UID and content; a 404 with the reason (logged) when it cannot be shown."""
    uid, series = request.match_info["uid"], request.match_info["series"]
    found = await in_read_session(request, lambda s: middle_instance(s, uid, series))
    if found is None:
        return _no_thumbnail("no such series in this study")
    key = (found.sop_instance_uid, found.sha256)
    png = THUMBNAILS.get(key)
    if png is None:
        storage = request.config_dict[ENGINE].storage
        if storage is None:
            return _no_thumbnail("this engine has no study storage")

        def make() -> bytes:
            with storage.open(found.storage_key) as f:
                return render_png(f)
        try:
            png = await asyncio.to_thread(make)
        except ThumbnailError as exc:
            log.warning("thumbnail of instance %s (%s): %s", found.sop_instance_uid, found.transfer_syntax, exc)
            return _no_thumbnail(str(exc))
        except OSError as exc:
            log.warning("thumbnail of instance %s: its file cannot be read (%s)", found.sop_instance_uid,
                        type(exc).__name__)
            return _no_thumbnail("the stored file cannot be read")
        THUMBNAILS.put(key, png)
    return web.Response(body=png, content_type="image/png",
                        headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"})


def _page(uid: str) -> str:
    return f"/studies/{quote(uid)}"


async def _form(request: web.Request) -> dict[str, str]:
    form = await request.post()
    return {k: v.strip() for k, v in form.items() if isinstance(v, str)}


async def _act(request: web.Request, uid: str, work: Awaitable[object], success: str) -> web.Response:
    """Run a study action; back to the study page with what came of it."""
    try:
        await work
    except ManualError as exc:
        raise done(request, _page(uid), f"Not done: {exc}") from None
    raise done(request, _page(uid), success)


@routes.post(r"/studies/{uid:" + UID + "}/match")
@requires(Role.OPERATE)
async def match(request: web.Request) -> web.Response:
    uid = request.match_info["uid"]
    form = await _form(request)
    accession, patient, note = form.get("accession", ""), form.get("patient", ""), form.get("note") or None
    if bool(accession) == bool(patient):
        raise done(request, _page(uid), "Not done: give either an accession number or a patient identifier "
                                        "(ID^ISSUER), not both.")
    what = f"order with accession {accession}" if accession else f"patient {patient}"
    return await _act(request, uid, study_actions.match_study(request, uid, accession=accession or None,
                                                              patient=patient or None, note=note),
                      f"Matched to the {what}; the study is queued for reconciliation.")


@routes.post(r"/studies/{uid:" + UID + "}/unmatch")
@requires(Role.OPERATE)
async def unmatch(request: web.Request) -> web.Response:
    uid = request.match_info["uid"]
    return await _act(request, uid, study_actions.clear_match(request, uid),
                      "The manual match is cleared; the study is queued for reconciliation.")


@routes.post(r"/studies/{uid:" + UID + "}/reconcile")
@requires(Role.OPERATE)
async def reconcile(request: web.Request) -> web.Response:
    uid = request.match_info["uid"]
    return await _act(request, uid, study_actions.reconcile_again(request, uid),
                      "The study is queued for reconciliation.")


@routes.post(r"/studies/{uid:" + UID + r"}/findings/{id:\d{1,18}}/accept")
@requires(Role.OPERATE)
async def accept(request: web.Request) -> web.Response:
    uid, fid = request.match_info["uid"], int(request.match_info["id"])
    form = await _form(request)
    return await _act(request, uid, study_actions.accept_finding(request, fid, note=form.get("note") or None),
                      f"Finding {fid} accepted.")
