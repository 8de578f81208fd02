"""What an analyst does to a study over HTTP, for the admin API (/api/studies/..., /api/findings/...)
and the console's study page alike: match by hand to an order or a patient, clear that match,
reconcile again, accept a finding. Each is engine/reconciliation/manual.py's function run on the
writer's connection with its audit row (engine/web/audit.py ``audited``); then the reconciler is
woken for what changed. A request naming something that is not there raises ``ManualError`` (its
``status``: 404, or 409 for a finding no longer open) after the refusal is on the audit trail."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from engine.reconciliation import manual
from engine.reconciliation.manual import ManualResult
from engine.store.audit import AuditAction, Subject, finding_subject, study_subject
from engine.web.audit import actor_of, audited
from engine.web.keys import ENGINE

T = TypeVar("T")


async def _write(request: web.Request, action: AuditAction, fn: Callable[[Any], T],
                 about: Callable[[Any, T | None], Subject], status: int) -> T:
    result = await audited(request, action, fn, about, status=status)
    request.config_dict[ENGINE].wake_reconciler()
    return result


async def match_study(request: web.Request, ref: str, *, accession: str | None, patient: str | None,
                      note: str | None, status: int = 202) -> ManualResult:
    """Match study ``ref`` (UID or index id) to the order with ``accession``, or to the patient
    ``patient`` (``ID^ISSUER``), and queue it."""
    by = actor_of(request).name

    def about(c: Any, _: Any) -> Subject:
        found = study_subject(c, ref)
        found.detail = f"accession {accession}" if accession else f"patient {patient}"
        return found
    return await _write(request, AuditAction.MATCH,
                        lambda c: manual.match(c, ref, accession=accession, patient=patient, by=by, note=note),
                        about, status)


async def clear_match(request: web.Request, ref: str, *, status: int = 202) -> ManualResult:
    by = actor_of(request).name
    return await _write(request, AuditAction.UNMATCH, lambda c: manual.clear_match(c, ref, by=by),
                        lambda c, _: study_subject(c, ref), status)


async def reconcile_again(request: web.Request, ref: str, *, status: int = 202) -> ManualResult:
    by = actor_of(request).name
    return await _write(request, AuditAction.RECONCILE, lambda c: manual.request(c, ref, by=by),
                        lambda c, _: study_subject(c, ref), status)


async def accept_finding(request: web.Request, finding_id: int, *, note: str | None, status: int = 200) -> None:
    by = actor_of(request).name
    await _write(request, AuditAction.ACCEPT, lambda c: manual.accept_finding(c, finding_id, by=by, note=note),
                 lambda c, _: finding_subject(c, finding_id), status)
