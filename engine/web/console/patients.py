"""Patients and orders: search, a patient page (identifiers, aliases kept after merges, merges,
demographic history, orders, studies) and an order page (status history, the patient's identifiers,
studies). The queries are the admin API's (engine/web/lookups.py); every read of patient data is on
the audit trail like the API's (engine/web/audit.py ``record_read``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from engine.store.tokens import Role
from engine.web.audit import record_read
from engine.web.console.pages import render
from engine.web.console.paging import PAGE, before_of, first_page, older_page
from engine.web.lookups import (
    ORDER_FILTERS,
    PatientSearch,
    find_orders,
    find_patients,
    order_detail,
    patient_detail,
    read_one,
)
from engine.web.reads import in_read_session
from engine.web.roles import requires

routes = web.RouteTableDef()


@routes.get("/patients")
@requires(Role.READ)
async def patients(request: web.Request) -> web.Response:
    q = request.query
    search = PatientSearch(identifier=q.get("identifier", "").strip() or None,
                           issuer=q.get("issuer", "").strip() or None,
                           name=(q["name"].strip().rstrip("*") + "*") if q.get("name", "").strip() else None,
                           birth_date=q.get("birth_date", "").strip() or None)
    found: list[dict[str, Any]] = []
    if search.given():
        before = before_of(request)
        found = await in_read_session(request, lambda s: find_patients(s, search, PAGE + 1, before=before))
        await record_read(request, "search", "Patient", 200, found[:PAGE], [p["id"] for p in found[:PAGE]])
    return render(request, "patients.html", {"q": q, "searched": search.given(), "patients": found[:PAGE],
                                             "older": older_page(request, found), "newer": first_page(request)})


@routes.get(r"/patients/{id:\d{1,18}}")
@requires(Role.READ)
async def patient(request: web.Request) -> web.Response:
    pid = int(request.match_info["id"])
    body = await read_one(request, "Patient", lambda s: patient_detail(s, pid), lambda _: [pid])
    if body is None:
        return render(request, "record_missing.html", {"what": f"No patient {pid}.", "back": "/patients"}, status=404)
    return render(request, "patient.html", {"p": body})


@routes.get("/orders")
@requires(Role.READ)
async def orders(request: web.Request) -> web.Response:
    filters = {k: v.strip() for k, v in request.query.items() if k in ORDER_FILTERS and v.strip()}
    found: list[dict[str, Any]] = []
    if filters:
        before = before_of(request)
        found = await in_read_session(request, lambda s: find_orders(s, filters, PAGE + 1, before=before))
        await record_read(request, "search", "Order", 200, found[:PAGE],
                          sorted({o["patient_id"] for o in found[:PAGE]}))
    return render(request, "orders.html", {"q": request.query, "searched": bool(filters), "orders": found[:PAGE],
                                           "older": older_page(request, found), "newer": first_page(request)})


@routes.get(r"/orders/{id:\d{1,18}}")
@requires(Role.READ)
async def order(request: web.Request) -> web.Response:
    oid = int(request.match_info["id"])
    body = await read_one(request, "Order", lambda s: order_detail(s, oid), lambda o: [o["patient_id"]])
    if body is None:
        return render(request, "record_missing.html", {"what": f"No order {oid}.", "back": "/orders"}, status=404)
    return render(request, "order.html", {"o": body})
