"""FHIR create, update, conditional create/update and transaction/batch Bundles, applied to the store.

The web layer (engine/web/fhir.py) reads and validates the body, then hands ``FhirInbound.store``
to the ingest writer. In one transaction the raw request is kept as a message (protocol fhir,
``radbridge messages list``), then each interaction is resolved, mapped through the channel's
mapping files and applied by the same domain code as HL7 (patients.py, orders.py) inside a
SAVEPOINT. The HTTP answer goes out after the COMMIT, so a 2xx means the data is on disk.

Rules (docs/fhir.md):
* Identity is the business identifier, as for HL7: a Patient by its identifier (fhir-patient
  mapping), a ServiceRequest by accession, placer or filler number. A plain POST of something the
  store already has is 409 (use PUT, a conditional update, or If-None-Exist).
* PUT Type/id updates that resource; the body's identifiers must not belong to another one (409).
  If-Match with an ETag other than the current version is 412. Ids are ours: PUT to an id that
  does not exist is 405 (no client-assigned ids).
* Conditional update (PUT Type?identifier=...) and conditional create (If-None-Exist): more than
  one match is 412; conditional create with one match answers 200 with that resource, unchanged.
* References: Patient/<id>, a bundle entry's fullUrl (urn:uuid) and Patient?identifier=... are
  read as the patient's identifier before mapping; a logical reference (identifier) is taken as is.
* Patient.link replaces / replaced-by is a merge, as A40.
* A transaction applies every entry or none (Patients first, so ServiceRequests can refer to
  them); a batch applies each entry on its own and answers each.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypedDict
from urllib.parse import unquote

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from engine.channels import Channel, Route
from engine.domain.errors import DomainError
from engine.domain.events import EventBus, PatientCreated
from engine.domain.orders import find_order
from engine.domain.patients import find_patient
from engine.domain.records import (
    CONTENT,
    EVENTS,
    IDENTIFIERS,
    MESSAGES,
    NOT_LOOKED_UP,
    ORDERS,
    PATIENTS,
    Record,
    add,
    fetch,
    identifier_owners,
    update_row,
)
from engine.domain.rows import MessageValues
from engine.fhir.outcome import FhirError, issue
from engine.fhir.paths import FhirSource
from engine.fhir.validate import FHIR_VERSION, local_id
from engine.mappings.fields import MappedFields
from engine.mappings.registry import MappingRegistry
from engine.mappings.spec import Mapping
from engine.outbound.context import system_of
from engine.pipeline import fhir_search as search
from engine.pipeline.actions import apply_action
from engine.pipeline.hl7_inbound import internal_error_text
from engine.pipeline.writer import FINAL_ATTEMPT, RedoJob
from engine.store.prepared import savepoint
from engine.store.types import JsonObject, utcnow

log = logging.getLogger(__name__)
# prebuilt, so the hot path (a Bundle per order) compiles each once (records.fetch)
_VERSION = {t.name: select(t.c.version, t.c.updated_at).where(t.c.id == bindparam("id")) for t in (PATIENTS, ORDERS)}
# A patient's merged_into_id and its identifier (the primary one, else the oldest live one; value None
# when it has none) in one round trip: a reference to a patient that was not merged needs no other
_IDENTIFIED = (select(PATIENTS.c.merged_into_id, IDENTIFIERS.c.value, IDENTIFIERS.c.issuer)
               .select_from(PATIENTS.outerjoin(IDENTIFIERS, (IDENTIFIERS.c.patient_id == PATIENTS.c.id)
                                               & (IDENTIFIERS.c.kind != "alias")))
               .where(PATIENTS.c.id == bindparam("id"))
               .order_by(IDENTIFIERS.c.kind != "primary", IDENTIFIERS.c.id).limit(1))


class _Version(TypedDict):
    version: int
    updated_at: datetime


class _Identified(TypedDict):
    merged_into_id: int | None
    value: str | None
    issuer: str | None


class FhirIdentifier(TypedDict, total=False):
    """A FHIR Identifier as references are given one (system only when the issuer has one)."""

    value: str
    system: str


_LOCAL = re.compile(r"^(Patient|ServiceRequest)/([0-9]{1,18})(?:/_history/[^/]+)?$")
_ETAG = re.compile(r'^(?:W/)?"?([^"]+)"?$')


@dataclass
class Interaction:
    method: str  # POST | PUT
    resource_type: str
    resource: JsonObject  # the body as received (validated)
    id: str | None = None  # PUT Type/id
    condition: str | None = None  # PUT Type?query, or a POST's If-None-Exist
    if_match: str | None = None
    full_url: str | None = None  # a bundle entry's fullUrl (urn:uuid:...)
    where: str = ""  # "Bundle.entry[2]: " in error texts

    def located(self, err: FhirError) -> FhirError:
        if self.where:
            for i in err.issues:
                i["diagnostics"] = f"{self.where}{i['diagnostics']}"
        return err


@dataclass
class Done:
    """What one interaction did (an entry of the response)."""

    status: int  # 200 | 201
    resource_type: str
    id: int
    version: int
    last_updated: datetime | None
    notes: list[str] = field(default_factory=list)
    mapped: MappedFields = field(default_factory=dict)
    created_as: FhirIdentifier | None = None  # a Patient this created: the identifier it has (its primary one)

    @property
    def location(self) -> str:
        return f"{self.resource_type}/{self.id}/_history/{self.version}"


@dataclass
class Applied:
    """What the entries of one request applied so far tell the entries after them."""

    urls: dict[str, tuple[str, int]] = field(default_factory=dict)  # an entry's fullUrl -> (type, id) it became
    # The patient the last Patient entry created, with its identifier: what primary_identifier would
    # read back, as long as no other Patient entry was applied since (it could merge that patient away)
    created: tuple[int, FhirIdentifier] | None = None


@dataclass
class Stored:
    """The writer job's answer: results in entry order (a FhirError in place of a failed batch entry),
    or ``error`` when the request as a whole failed (single interaction or transaction)."""

    message_id: int | None
    results: list[Done | FhirError] = field(default_factory=list)
    error: FhirError | None = None


@dataclass
class FhirRequest:
    """One HTTP request's interactions, prepared for the writer (which may run it twice: ``refused``)."""

    raw: bytes
    kind: str  # what the request was (create, update, transaction ...), for the message store
    interactions: list[Interaction]
    mode: str = "single"  # single | transaction | batch
    remote: str | None = None
    request_id: str | None = None
    agent: str | None = None
    refused: FhirError | None = None  # why an earlier run of the writer's job could not apply it (RedoJob)


def application_order(interactions: list[Interaction]) -> list[int]:
    """The order entries are applied in: Patients first (ServiceRequests refer to them), and each
    Patient after the Patient entries its links name (a merge needs the other record first, wherever
    it stands in the Bundle); then the rest, in entry order. A cycle of links keeps entry order."""
    by_url = {it.full_url: i for i, it in enumerate(interactions) if it.full_url}

    def linked(i: int) -> list[int]:
        links = interactions[i].resource.get("link")
        refs = [str((ln.get("other") or {}).get("reference") or "") for ln in links if isinstance(ln, dict)] \
            if isinstance(links, list) else []
        return [j for r in refs if (j := by_url.get(r)) is not None and interactions[j].resource_type == "Patient"]

    out: list[int] = []
    seen: set[int] = set()
    for start in (i for i, it in enumerate(interactions) if it.resource_type == "Patient"):
        stack = [(start, False)]  # a loop, not recursion: a Bundle may hold many entries
        while stack:
            i, ready = stack.pop()
            if ready:
                out.append(i)
                continue
            if i in seen:
                continue
            seen.add(i)
            stack.append((i, True))
            stack.extend((j, False) for j in reversed(linked(i)) if j not in seen)
    return out + [i for i, it in enumerate(interactions) if it.resource_type != "Patient"]


class FhirInbound:
    """The fhir channel: routes resource types to actions and mapping files."""

    def __init__(self, channel: Channel, mappings: MappingRegistry, *, bus: EventBus) -> None:
        self.channel = channel
        self.mappings = mappings
        self.bus = bus  # the domain events of what it applies are published here
        self._issuers: dict[tuple[str, tuple[int, ...]], set[str]] = {}

    # --- routing and mapping ------------------------------------------------------------------------
    def route(self, resource_type: str) -> Route:
        r = self.channel.route_for(resource_type)
        if r is None:
            raise FhirError(405, f"{resource_type} is not accepted by channel {self.channel.name} "
                                 f"(routes take {', '.join(m for r in self.channel.routes for m in r.messages)})",
                            "not-supported")
        return r

    def _mappings(self, route: Route) -> list[Mapping]:
        out = []
        for name in route.mappings:
            m = self.mappings.get(name)
            if m is None:
                raise FhirError(500, f"mapping {name!r} is not loaded (see radbridge check)", "exception")
            out.append(m)
        return out

    def map(self, route: Route, resource: JsonObject) -> MappedFields:
        values: MappedFields = {}
        problems = []
        src = FhirSource(resource)
        for m in self._mappings(route):
            res = m.apply(src)
            values.update(res.values)
            for e in res.errors:
                expr = f"{resource.get('resourceType')}.{e.path}" if e.path else None
                problems.append(issue(f"{e.field}: {e.message}", "required" if "required" in e.message
                                      else "value", expression=expr))
        if problems:
            first = problems[0]
            raise FhirError(422, str(first["diagnostics"]), str(first["code"]),
                            (first.get("expression") or [None])[0], more=problems[1:])
        return values

    def issuers(self, system: str) -> set[str]:
        """The assigning authorities an identifier system stands for, as the Patient mapping maps it
        (remembered per system until the mapping file is reloaded)."""
        route = self.channel.route_for("Patient")
        mappings = [m for m in (self.mappings.get(n) for n in route.mappings) if m is not None] if route else []
        key = (system, tuple(id(m) for m in mappings))
        found = self._issuers.get(key)
        if found is not None:
            return found
        out = {system, system.removeprefix("urn:oid:")}
        probe = {"resourceType": "Patient", "identifier": [{"system": system, "value": "x"}]}
        for m in mappings:
            v = m.apply(FhirSource(probe), only=("patient.issuer",)).values.get("patient.issuer")
            if isinstance(v, str):
                out.add(v)
        if len(self._issuers) > 1000:
            self._issuers.clear()
        self._issuers[key] = out
        return out

    def matching(self, conn: Connection, resource_type: str, query: str, *,
                 unowned: set[tuple[str, str]] | None = None) -> list[int]:
        """The ids a conditional query matches; identifier=system|value on Patient, what EHRs send with
        nearly every order, by the prebuilt identifier lookup, anything else through search.
        ``unowned`` gets the (value, issuer) pairs that lookup found belong to no patient."""
        name, eq, value = query.partition("=")
        if resource_type == "Patient" and name == "identifier" and eq and "&" not in value and "," not in value:
            system, code = search.split_token(unquote(value))
            if system and code:  # every issuer the system stands for, in one statement
                keys = [(code, issuer) for issuer in sorted(self.issuers(system))]
                owners = identifier_owners(conn, keys)
                if unowned is not None:
                    unowned.update(k for k in keys if k not in owners)
                return sorted(set(owners.values()))[:2]
        return search.matching_ids(conn, resource_type, query, self.issuers)

    # --- the inbound stage (engine/pipeline/stage.py) ---------------------------------------------------
    def prepare(self, raw: bytes, kind: str, interactions: list[Interaction], *, mode: str = "single",
                remote: str | None = None, request_id: str | None = None, agent: str | None = None) -> FhirRequest:
        """The validated request (the web layer parsed and checked the body into ``interactions``)."""
        return FhirRequest(raw, kind, interactions, mode, remote, request_id, agent)

    def apply(self, session: Session, req: FhirRequest) -> Stored:
        """Keep the request, then apply it (in the writer's transaction): ``mode`` single | transaction | batch."""
        raw, kind, interactions, mode = req.raw, req.kind, req.interactions, req.mode
        remote, request_id, agent = req.remote, req.request_id, req.agent
        conn = session.connection()
        row: MessageValues = {"channel": self.channel.name, "protocol": "fhir", "remote": remote, "size": len(raw),
               "received_at": utcnow(), "attempts": 1, "control_id": (request_id or "")[:64] or None,
               "sending_app": (agent or "")[:64] or None, "message_type": kind[:32], "version": FHIR_VERSION,
               "charset": "utf-8", "status": "processed", "ack_code": "AA", "processed_at": utcnow()}
        message_id = add(conn, MESSAGES, **row)
        out = Stored(message_id)
        applied = Applied()
        order = application_order(interactions)
        results: dict[int, Done | FhirError] = {}
        try:
            if mode == "batch":
                for i in order:
                    results[i] = self._guarded(conn, session, interactions[i], message_id, applied, isolate=True)
            elif req.refused is not None:  # an earlier run of this job failed: kept as refused, nothing applied
                raise req.refused
            else:
                # All or nothing: the first failure rolls back rb_fhir, so entries need no savepoint of
                # their own. In the group-commit writer with a run to come, not even rb_fhir (two
                # statements, two round trips on PostgreSQL): the first failure undoes the whole job
                # (RedoJob: its SAVEPOINT or transaction), and the next run stores it as refused.
                redo = not session.info.get(FINAL_ATTEMPT, True)
                with contextlib.nullcontext() if redo else savepoint(conn, "rb_fhir"):
                    for i in order:
                        r = self._guarded(conn, session, interactions[i], message_id, applied, isolate=False)
                        if isinstance(r, FhirError):
                            if redo:
                                req.refused = r
                                raise RedoJob(f"FHIR request {message_id} not applied; stored as refused next run")
                            raise r
                        results[i] = r
        except FhirError as exc:
            out.error = exc
        out.results = [results[i] for i in range(len(interactions))] if out.error is None else []
        self._finish(conn, message_id, raw, out)
        return out

    def _guarded(self, conn: Connection, session: Session, it: Interaction, message_id: int,
                 applied: Applied, *, isolate: bool) -> Done | FhirError:
        """One interaction; a refusal or failure is returned, not raised. With ``isolate`` (a batch
        entry) in its own SAVEPOINT, so it leaves the other entries untouched; without, the caller
        rolls back its enclosing SAVEPOINT on the first failure (a transaction: nothing is kept)."""
        try:
            if isolate:
                with savepoint(conn, "rb_entry"):
                    done = self.apply_interaction(conn, it, message_id, applied)
            else:
                done = self.apply_interaction(conn, it, message_id, applied)
        except FhirError as exc:
            return it.located(exc)
        except DomainError as exc:
            return it.located(FhirError(422, str(exc), "business-rule", exc.field or None))
        except OperationalError:
            raise
        except IntegrityError as exc:
            if not session.info.get(FINAL_ATTEMPT, True):
                raise  # another engine process created the same patient: the writer retries
            return it.located(FhirError(409, internal_error_text(exc, "channel %s: FHIR request %s conflicted on every"
                                                                " attempt", self.channel.name, message_id), "conflict"))
        except Exception as exc:
            return it.located(FhirError(500, internal_error_text(exc, "channel %s: applying FHIR request %s failed",
                                                                self.channel.name, message_id), "exception"))
        if it.full_url:
            applied.urls[it.full_url] = (done.resource_type, done.id)
        if it.resource_type == "Patient":
            applied.created = (done.id, done.created_as) if done.created_as is not None else None
        return done

    def _finish(self, conn: Connection, message_id: int, raw: bytes, out: Stored) -> None:
        failures = [r for r in out.results if isinstance(r, FhirError)]
        if out.error is not None:
            failures = [out.error]
        mapped = [r.mapped for r in out.results if isinstance(r, Done)]
        done = [r for r in out.results if isinstance(r, Done)]
        patient_id = next((r.id for r in done if r.resource_type == "Patient"), None)
        if failures:
            update_row(conn, MESSAGES, message_id, status="error" if not done else "processed",
                       ack_code="AE", error="; ".join(f.diagnostics for f in failures)[:4000])
            add(conn, EVENTS, message_id=message_id, kind="error",
                detail={"errors": [{"status": f.status, "issues": f.issues} for f in failures]})
        if patient_id is not None:
            update_row(conn, MESSAGES, message_id, patient_id=patient_id)
        notes = [n for r in done for n in r.notes]
        if notes:
            add(conn, EVENTS, message_id=message_id, kind="notes", detail={"notes": notes})
        add(conn, CONTENT, message_id=message_id, raw=raw, mapped={"entries": mapped} if mapped else None, ack=None)

    # --- one interaction ------------------------------------------------------------------------------
    def apply_interaction(self, conn: Connection, it: Interaction, message_id: int,
                          applied: Applied) -> Done:
        route = self.route(it.resource_type)
        resource = self._resolve_references(conn, it, applied)
        existing: int | None = None
        unowned: set[tuple[str, str]] = set()  # identifiers the condition's lookup found no patient for
        if it.id is not None:
            existing = self._target_by_id(conn, it)
        elif it.condition is not None:
            matches = self.matching(conn, it.resource_type, it.condition, unowned=unowned)
            if len(matches) > 1:
                raise FhirError(412, f"{it.resource_type}?{it.condition} matches more than one resource "
                                     f"({', '.join(f'{it.resource_type}/{m}' for m in matches)}...)", "multiple-matches")
            if matches and it.method == "POST":  # If-None-Exist: it is there already
                return self._done(conn, it.resource_type, matches[0], 200, ["conditional create: already exists"])
            existing = matches[0] if matches else None
            body_id = resource.get("id")
            if existing is not None and body_id is not None and str(body_id) != str(existing):
                raise FhirError(409, f"the body's id {body_id} is not the resource the condition found "
                                     f"({it.resource_type}/{existing})", "conflict", f"{it.resource_type}.id")
        values = self.map(route, resource)
        action = route.action
        retired = bool(values.get("merge.survivor_id"))  # this Patient is the one merged away
        looked_up: Record | None  # handed to the domain, which then does not look it up again
        if it.resource_type == "Patient":
            action, values = _patient_action(action, values)
            looked_up = self._patient_for(conn, values, unowned)
        else:
            looked_up = order = find_order(conn, values)
            if order is not None and values.get("order.control") == "NW":
                values["order.control"] = "XO"  # FHIR says update; the order history should too
            if order is not None and values.get("order.status") == "SC" and order["status"] in ("IP", "A"):
                del values["order.status"]  # "active" covers in progress: images moved it on, keep that
        found = looked_up.id if looked_up is not None else None
        if existing is not None and found is not None and found != existing and action != "patient.merge":
            raise FhirError(409, f"the identifiers in the body belong to {it.resource_type}/{found}, not to "
                                 f"{it.resource_type}/{existing}", "conflict", f"{it.resource_type}.identifier")
        if existing is not None and found is None and action != "patient.merge":
            raise FhirError(409, f"none of the body's identifiers is one of {it.resource_type}/{existing}'s; an "
                                 "identifier change is a merge (Patient.link replaces) or a new resource", "conflict",
                            f"{it.resource_type}.identifier")
        if existing is None and found is not None and it.method == "POST" and action != "patient.merge":
            raise FhirError(409, f"{it.resource_type}/{found} already has these identifiers; update it with PUT "
                                 f"{it.resource_type}/{found}, a conditional update, or send If-None-Exist",
                            "duplicate", f"{it.resource_type}.identifier")
        out = apply_action(conn, action, values, [], self.channel.fhir, message_id, bus=self.bus,
                           found=looked_up if action != "patient.merge" else NOT_LOOKED_UP)
        written = out.patient if it.resource_type == "Patient" else (out.orders[0] if out.orders else None)
        rid = written.id if written is not None else None
        if retired and existing is not None:
            rid = existing  # the answer is about the resource sent: now inactive, replaced-by the survivor
        if rid is None:
            raise FhirError(500, "the store applied the resource but returned no id", "exception")
        done = self._done(conn, it.resource_type, rid, 200 if found is not None else 201, out.notes,
                          written if written is not None and written.id == rid else None)
        done.mapped = values
        if it.resource_type == "Patient" and action != "patient.merge" and any(
                isinstance(e, PatientCreated) and e.patient_id == rid for e in out.events):
            done.created_as = fhir_identifier(str(values["patient.id"]), str(values.get("patient.issuer") or ""))
        return done

    def _patient_for(self, conn: Connection, values: MappedFields, unowned: set[tuple[str, str]]) -> Record | None:
        if not values.get("patient.id"):
            return None
        key = (str(values["patient.id"]), str(values.get("patient.issuer") or ""))
        if key in unowned:  # looked up a moment ago for the condition, in this transaction: no one's
            return None
        return find_patient(conn, *key)

    def _target_by_id(self, conn: Connection, it: Interaction) -> int:
        assert it.id is not None
        body_id = it.resource.get("id")
        if body_id is None or str(body_id) != it.id:
            raise FhirError(400, f"the body's id ({body_id!r}) must equal the id in the URL ({it.id})", "invalid",
                            f"{it.resource_type}.id")
        table = PATIENTS if it.resource_type == "Patient" else ORDERS
        cols = [table.c.id, table.c.version] + ([PATIENTS.c.merged_into_id] if table is PATIENTS else [])
        local = local_id(it.id)
        row = conn.execute(select(*cols).where(table.c.id == local)).first() if local is not None else None
        if row is None:
            raise FhirError(405, f"{it.resource_type}/{it.id} does not exist, and ids are assigned here: create it "
                                 f"with POST {it.resource_type} or a conditional update", "not-supported")
        if it.if_match is not None:
            m = _ETAG.match(it.if_match.strip())
            if m is None or m.group(1) != str(row.version):
                raise FhirError(412, f"If-Match {it.if_match} is not the current version of {it.resource_type}/{it.id} "
                                     f"(W/\"{row.version}\"): read it again and reapply the change", "conflict")
        if table is PATIENTS and row.merged_into_id is not None:
            raise FhirError(409, f"Patient/{it.id} was merged into Patient/{row.merged_into_id}; update that one",
                            "conflict")
        return int(row.id)

    def _done(self, conn: Connection, rtype: str, rid: int, status: int, notes: list[str],
              written: Record | None = None) -> Done:
        """The entry's answer; ``written`` is the row as the domain wrote it (else it is read)."""
        if written is not None and written.get("updated_at") is not None:
            return Done(status, rtype, rid, int(written["version"]), written["updated_at"], list(notes))
        row = fetch(conn, _VERSION["patients" if rtype == "Patient" else "orders"], _Version, id=rid)
        return Done(status, rtype, rid, int(row["version"]) if row else 1, row["updated_at"] if row else None,
                    list(notes))

    # --- references -----------------------------------------------------------------------------------
    def _resolve_references(self, conn: Connection, it: Interaction, applied: Applied) -> JsonObject:
        """A copy of the resource whose patient references carry the patient's identifier."""
        resource = it.resource
        if it.resource_type == "ServiceRequest" and isinstance(resource.get("subject"), dict):
            resource = copy.copy(resource)
            resource["subject"] = self._with_identifier(conn, resource["subject"], applied, "ServiceRequest.subject")
        elif it.resource_type == "Patient" and resource.get("link"):
            resource = copy.copy(resource)
            resource["link"] = [
                {**link, "other": self._with_identifier(conn, link.get("other") or {}, applied,
                                                        f"Patient.link[{i}].other")}
                if link.get("type") in ("replaces", "replaced-by") else link
                for i, link in enumerate(resource["link"])]
        return resource

    def _with_identifier(self, conn: Connection, ref: JsonObject, applied: Applied, where: str) -> JsonObject:
        text = ref.get("reference")
        if not text:
            if ref.get("identifier"):
                return ref  # a logical reference: the identifier is what the mapping reads
            raise FhirError(422, f"{where} has neither a reference nor an identifier", "required", where)
        text = str(text)
        patient_id: int | None = None
        if text in applied.urls:
            rtype, patient_id = applied.urls[text]
            if rtype != "Patient":
                raise FhirError(422, f"{where} refers to a {rtype} entry, not a Patient", "invalid", where)
        elif text.startswith("urn:uuid:") or text.startswith("urn:oid:"):
            raise FhirError(422, f"{where}: {text} is not the fullUrl of a Patient entry in this Bundle", "not-found",
                            where)
        elif text.startswith("Patient?"):
            matches = self.matching(conn, "Patient", text[len("Patient?"):])
            if len(matches) != 1:
                raise FhirError(422 if not matches else 412, f"{where}: {text} matches "
                                f"{'no patient' if not matches else 'more than one patient'}", "not-found", where)
            patient_id = matches[0]
        else:
            m = _LOCAL.match(text)
            if m is None or m.group(1) != "Patient":
                if ref.get("identifier"):
                    return {k: v for k, v in ref.items() if k != "reference"}
                raise FhirError(422, f"{where}: {text!r} is not a patient here; send Patient/<id> of this server, a "
                                     "bundle entry's fullUrl, Patient?identifier=system|value, or an identifier",
                                "invalid", where)
            patient_id = int(m.group(2))
        if applied.created is not None and applied.created[0] == patient_id:
            ident: FhirIdentifier | None = applied.created[1]
        else:
            ident = primary_identifier(conn, patient_id)
        if ident is None:
            missing = conn.execute(select(PATIENTS.c.id).where(PATIENTS.c.id == patient_id)).first() is None
            raise FhirError(404 if missing else 422, f"{where}: Patient/{patient_id} "
                            f"{'does not exist' if missing else 'has no identifier'}", "not-found", where)
        return {**ref, "identifier": ident}


def primary_identifier(conn: Connection, patient_id: int) -> FhirIdentifier | None:
    """The patient's identifier (following a merge to the survivor) as a FHIR Identifier."""
    row = fetch(conn, _IDENTIFIED, _Identified, id=patient_id)
    for _ in range(32):
        if row is None or row["merged_into_id"] is None:
            break
        row = fetch(conn, _IDENTIFIED, _Identified, id=int(row["merged_into_id"]))
    if row is None or row["value"] is None:
        return None
    return fhir_identifier(row["value"], row["issuer"] or "")


def fhir_identifier(value: str, issuer: str) -> FhirIdentifier:
    """A patient identifier as a FHIR Identifier (system only when the issuer has one)."""
    out: FhirIdentifier = {"value": value}
    system = system_of(issuer)
    if system:
        out["system"] = system
    return out


def _patient_action(action: str, values: MappedFields) -> tuple[str, MappedFields]:
    """Patient.link: replaces -> merge the named record into this one; replaced-by -> merge this
    record into the named one (its demographics are the retired record's and are not applied)."""
    if values.get("merge.survivor_id"):
        if values.get("merge.prior_id"):
            raise FhirError(422, "Patient.link has both replaces and replaced-by", "business-rule", "Patient.link")
        merged = {"patient.id": values["merge.survivor_id"], "patient.issuer": values.get("merge.survivor_issuer", ""),
                  "merge.prior_id": values.get("patient.id"), "merge.prior_issuer": values.get("patient.issuer", "")}
        if "message.event_time" in values:
            merged["message.event_time"] = values["message.event_time"]
        return "patient.merge", merged
    if values.get("merge.prior_id"):
        same = (str(values["merge.prior_id"]), str(values.get("merge.prior_issuer") or "")) == \
            (str(values.get("patient.id")), str(values.get("patient.issuer") or ""))
        if not same:
            return "patient.merge", values
        # link.other names a record already merged into this one (its reference now resolves here):
        # a resend, or a read-modify-write of the survivor; nothing more to merge
    return action, {k: v for k, v in values.items() if not k.startswith("merge.")}
