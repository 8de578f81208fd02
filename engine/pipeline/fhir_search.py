"""FHIR search on the store: the parameters an EHR uses, as SQL on patients, orders and studies.

Supported (and listed in the CapabilityStatement; anything else is refused with 400, never
silently ignored, so a misspelt parameter cannot return every patient):

    Patient         _id, identifier, family, given, birthdate, gender, _lastUpdated
    ServiceRequest  _id, identifier (accession, placer or filler number; identifier:of-type with
                    v2-0203 ACSN / PLAC / FILL), patient / subject, status, _lastUpdated
    ImagingStudy    _id, identifier (urn:dicom:uid|urn:oid:UID, or the accession number),
                    patient / subject, basedon, _lastUpdated
    all             _count, _offset (paging), _format=json, _total=accurate|none
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, and_, func, or_, select

from engine.domain.records import IDENTIFIERS, ORDERS, PATIENTS
from engine.domain.studies import STUDIES
from engine.fhir.outcome import FhirError
from engine.fhir.validate import local_id

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
ORDER_ID_TYPES = {"ACSN": "accession", "PLAC": "placer_number", "FILL": "filler_number"}
# ServiceRequest.status (request-status) <-> HL7 table 0038 order status as the store keeps it
SR_STATUS = {"SC": "active", "IP": "active", "A": "active", "HD": "on-hold", "CA": "revoked", "DC": "revoked",
             "CM": "completed", "ER": "entered-in-error", "RP": "active"}
STATUS_OF_SR: dict[str, set[str]] = {}
for _ours, _theirs in SR_STATUS.items():
    STATUS_OF_SR.setdefault(_theirs, set()).add(_ours)
GENDER = {"M": "male", "F": "female", "O": "other", "U": "unknown", "A": "other", "N": "unknown"}

SEARCH_PARAMS: dict[str, dict[str, str]] = {
    "Patient": {
        "_id": "token", "identifier": "token", "family": "string", "given": "string", "birthdate": "date",
        "gender": "token", "_lastUpdated": "date"},
    "ServiceRequest": {
        "_id": "token", "identifier": "token", "patient": "reference", "subject": "reference",
        "status": "token", "_lastUpdated": "date"},
    "ImagingStudy": {
        "_id": "token", "identifier": "token", "patient": "reference", "subject": "reference",
        "basedon": "reference", "_lastUpdated": "date"},
}
CONTROL_PARAMS = ("_count", "_offset", "_format", "_total")


@dataclass
class Query:
    resource_type: str
    where: list[ColumnElement[bool]] = field(default_factory=list)
    count: int = 50
    offset: int = 0
    total: bool = True


def _bad(text: str, param: str = "") -> FhirError:
    return FhirError(400, text, "invalid", param or None)


def split_token(value: str) -> tuple[str | None, str]:
    """system|code -> (system, code); |code -> ("", code); code -> (None, code)."""
    if "|" in value:
        system, _, code = value.partition("|")
        return system, code
    return None, value


def _ids(value: str, name: str, rtype: str) -> list[int]:
    out = []
    for part in value.split(","):
        part = part.strip()
        tail = part.rsplit("/", 1)[-1] if part.startswith(f"{rtype}/") or "/" not in part else None
        if tail is None or not tail.isdigit():
            raise _bad(f"{name}={value}: expected {rtype}/ID or ID (ids here are numbers)", name)
        if (local := local_id(tail)) is not None:  # a longer number is none of ours: it matches nothing
            out.append(local)
    return out


_DATE = re.compile(r"^(eq|ne|gt|ge|lt|le|sa|eb)?(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?"
                   r"(Z|[+-]\d{2}:\d{2})?)?)?)?$")


def date_range(value: str, name: str) -> tuple[str, datetime, datetime]:
    """A FHIR date search value -> (prefix, start, end) in naive UTC; the precision given sets the range."""
    m = _DATE.match(value)
    if not m:
        raise _bad(f"{name}={value}: expected [prefix]YYYY[-MM[-DD[Thh:mm[:ss][zone]]]] "
                   "(prefixes eq, ne, gt, ge, lt, le)", name)
    prefix, y, mo, d, hh, mi, ss, zone = m.groups()
    prefix = prefix or "eq"
    if prefix in ("sa", "eb"):
        raise _bad(f"{name}: prefix {prefix} is not supported (eq, ne, gt, ge, lt, le)", name)
    try:
        if hh is not None:
            start = datetime(int(y), int(mo), int(d), int(hh), int(mi), int(ss or 0))
            if zone and zone != "Z":
                sign = 1 if zone[0] == "+" else -1
                start -= sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
            elif zone is None:  # no zone: the engine's local time
                offset = datetime.now().astimezone().utcoffset() or timedelta(0)
                start -= offset
            end = start + (timedelta(seconds=1) if ss is not None else timedelta(minutes=1))
        elif d is not None:
            start = datetime(int(y), int(mo), int(d))
            end = start + timedelta(days=1)
        elif mo is not None:
            start = datetime(int(y), int(mo), 1)
            end = datetime(int(y) + (int(mo) == 12), int(mo) % 12 + 1, 1)
        else:
            start, end = datetime(int(y), 1, 1), datetime(int(y) + 1, 1, 1)
    except ValueError as exc:
        raise _bad(f"{name}={value}: {exc}", name) from None
    return prefix, start.replace(tzinfo=UTC), end.replace(tzinfo=UTC)


def _date_clause(col: Any, value: str, name: str) -> ColumnElement[bool]:
    prefix, start, end = date_range(value, name)
    return {"eq": and_(col >= start, col < end), "ne": or_(col < start, col >= end), "gt": col >= end,
            "ge": col >= start, "lt": col < start, "le": col < end}[prefix]


def _string_clause(col: Any, value: str, modifier: str) -> ColumnElement[bool]:
    if modifier == "exact":
        return col == value
    # autoescape: % and _ in the value are letters, not LIKE wildcards
    if modifier == "contains":
        return func.lower(col).contains(value.lower(), autoescape=True)
    return func.lower(col).startswith(value.lower(), autoescape=True)


IssuerOf = Callable[[str], set[str]]


def plain_issuers(system: str) -> set[str]:
    return {system, system.removeprefix("urn:oid:")}


def parse(resource_type: str, params: list[tuple[str, str]], *, issuers: IssuerOf = plain_issuers,
          default_count: int = 50, max_count: int = 500) -> Query:
    """Search parameters -> a Query; FhirError 400 naming a parameter that is unknown or malformed."""
    known = SEARCH_PARAMS.get(resource_type)
    if known is None:
        raise FhirError(404, f"{resource_type} cannot be searched here", "not-supported")
    q = Query(resource_type, count=min(default_count, max_count))
    for raw_name, value in params:
        name, _, modifier = raw_name.partition(":")
        if name in CONTROL_PARAMS:
            _control(q, name, value, max_count)
            continue
        if name not in known:
            raise _bad(f"search parameter {name!r} is not supported for {resource_type} "
                       f"(supported: {', '.join(sorted(known))}; see GET /fhir/metadata)", name)
        if modifier and not (modifier in ("exact", "contains") and known[name] == "string"
                             or modifier == "of-type" and name == "identifier" and resource_type != "Patient"):
            raise _bad(f"modifier :{modifier} is not supported on {name}", raw_name)
        if value == "":
            raise _bad(f"search parameter {name} has no value", name)
        q.where.append(_clause(resource_type, name, modifier, value, issuers))
    return q


def _control(q: Query, name: str, value: str, max_count: int) -> None:
    if name == "_count":
        if not value.isdigit():
            raise _bad(f"_count={value}: expected a number", name)
        q.count = min(int(value), max_count)
    elif name == "_offset":
        if not value.isdigit():
            raise _bad(f"_offset={value}: expected a number", name)
        q.offset = int(value)
    elif name == "_format" and value not in ("json", "application/json", "application/fhir+json"):
        raise FhirError(406, f"_format={value}: this server answers in JSON only", "not-supported", name)
    elif name == "_total":
        q.total = value != "none"


def _any_of(value: str, one: Callable[[str], ColumnElement[bool]]) -> ColumnElement[bool]:
    """Comma means OR in FHIR search."""
    parts = [one(v) for v in value.split(",")]
    return parts[0] if len(parts) == 1 else or_(*parts)


def _clause(rtype: str, name: str, modifier: str, value: str, issuers: IssuerOf) -> ColumnElement[bool]:
    if rtype == "Patient":
        return _patient_clause(name, modifier, value, issuers)
    if rtype == "ServiceRequest":
        return _order_clause(name, modifier, value)
    return _study_clause(name, modifier, value)


def _patient_clause(name: str, modifier: str, value: str, issuers: IssuerOf) -> ColumnElement[bool]:
    c = PATIENTS.c
    if name == "_id":
        return c.id.in_(_ids(value, name, "Patient"))
    if name == "identifier":
        def one(v: str) -> ColumnElement[bool]:
            system, code = split_token(v)
            sub = select(IDENTIFIERS.c.patient_id).where(IDENTIFIERS.c.value == code)
            if system:
                sub = sub.where(IDENTIFIERS.c.issuer.in_(issuers(system)))
            elif system == "":
                sub = sub.where(IDENTIFIERS.c.issuer == "")
            return c.id.in_(sub)
        return _any_of(value, one)
    if name == "family":
        return _any_of(value, lambda v: _string_clause(c.family_name, v, modifier))
    if name == "given":
        return _any_of(value, lambda v: or_(_string_clause(c.given_name, v, modifier),
                                            _string_clause(c.middle_name, v, modifier)))
    if name == "birthdate":
        prefix, start, _end = date_range(value, name)
        if prefix != "eq" or "T" in value:
            raise _bad("birthdate: only dates (YYYY, YYYY-MM, YYYY-MM-DD, optionally eq) are supported", name)
        return c.birth_date.startswith(value.removeprefix("eq"), autoescape=True)
    if name == "gender":
        wanted = {g.split("|")[-1] for g in value.split(",")}
        unknown = wanted - set(GENDER.values())
        if unknown:
            raise _bad(f"gender={value}: expected male, female, other or unknown", name)
        return c.sex.in_({k for k, v in GENDER.items() if v in wanted})
    return _date_clause(c.updated_at, value, name)


def _order_clause(name: str, modifier: str, value: str) -> ColumnElement[bool]:
    c = ORDERS.c
    if name == "_id":
        return c.id.in_(_ids(value, name, "ServiceRequest"))
    if name == "identifier":
        def one(v: str) -> ColumnElement[bool]:
            if modifier == "of-type":  # system|TYPE|value
                parts = v.split("|")
                if len(parts) != 3 or parts[1] not in ORDER_ID_TYPES:
                    raise _bad(f"identifier:of-type={v}: expected {V2_0203}|ACSN|VALUE (or PLAC, FILL)", name)
                return getattr(c, ORDER_ID_TYPES[parts[1]]) == parts[2]
            _system, code = split_token(v)
            return or_(c.accession == code, c.placer_number == code, c.filler_number == code)
        return _any_of(value, one)
    if name in ("patient", "subject"):
        return c.patient_id.in_(_ids(value, name, "Patient"))
    if name == "status":
        ours: set[str] = set()
        for s in value.split(","):
            if s not in STATUS_OF_SR and s not in ("draft", "unknown"):
                raise _bad(f"status={s}: expected one of {', '.join(sorted(STATUS_OF_SR))}", name)
            ours |= STATUS_OF_SR.get(s, set())
        return c.status.in_(sorted(ours))
    return _date_clause(c.updated_at, value, name)


def study_updated(c: Any = STUDIES.c) -> Any:
    return func.coalesce(c.reconciled_at, c.last_received_at)


def _study_clause(name: str, modifier: str, value: str) -> ColumnElement[bool]:
    c = STUDIES.c
    if name == "_id":
        return c.id.in_(_ids(value, name, "ImagingStudy"))
    if name == "identifier":
        def one(v: str) -> ColumnElement[bool]:
            if modifier == "of-type":
                parts = v.split("|")
                if len(parts) != 3 or parts[1] != "ACSN":
                    raise _bad(f"identifier:of-type={v}: expected {V2_0203}|ACSN|VALUE", name)
                return c.accession == parts[2]
            system, code = split_token(v)
            uid = code.removeprefix("urn:oid:")
            if system == "urn:dicom:uid":
                return c.study_uid == uid
            return or_(c.study_uid == uid, c.accession == code)
        return _any_of(value, one)
    if name in ("patient", "subject"):
        return c.patient_id.in_(_ids(value, name, "Patient"))
    if name == "basedon":
        return c.order_id.in_(_ids(value, name, "ServiceRequest"))
    return _date_clause(study_updated(c), value, name)


def table_of(resource_type: str) -> Any:
    return {"Patient": PATIENTS, "ServiceRequest": ORDERS, "ImagingStudy": STUDIES}[resource_type]


def id_query(q: Query) -> Select[Any]:
    table = table_of(q.resource_type)
    stmt = select(table.c.id).where(*q.where)
    if q.resource_type == "ImagingStudy":  # a study not placed with a patient is no ImagingStudy yet
        stmt = stmt.where(table.c.patient_id.is_not(None))
    return stmt


def run(conn: Connection, q: Query) -> tuple[list[int], int | None]:
    """One page of ids (in id order) and, when asked for, the total."""
    stmt = id_query(q)
    ids = [int(r[0]) for r in conn.execute(stmt.order_by(table_of(q.resource_type).c.id)
                                           .limit(q.count).offset(q.offset))]
    total = None
    if q.total:
        total = len(ids) + q.offset if len(ids) < q.count and (ids or q.offset == 0) else \
            int(conn.execute(select(func.count()).select_from(stmt.subquery())).scalar_one())
    return ids, total


def matching_ids(conn: Connection, resource_type: str, query: str, issuers: IssuerOf = plain_issuers,
                 limit: int = 2) -> list[int]:
    """Conditional create/update/reference: the ids a query string (identifier=sys|val) matches."""
    from urllib.parse import parse_qsl
    try:
        params = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise _bad(f"conditional query {query!r} is not a query string such as identifier=system|value") from None
    if not params:
        raise _bad("a conditional request needs search parameters (identifier=system|value)")
    q = parse(resource_type, params, issuers=issuers)
    if any(n.partition(":")[0] in CONTROL_PARAMS for n, _v in params):
        raise _bad("a conditional request takes search parameters only, not _count or _offset")
    stmt = id_query(q).order_by(table_of(resource_type).c.id).limit(limit)
    return [int(r[0]) for r in conn.execute(stmt)]

