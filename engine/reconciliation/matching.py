"""Which order and patient a study belongs to (IHE SWF: accession first, then patient ID + issuer).

Merges are followed to the surviving patient, and identifiers merged away (aliases) still find it.
Every step that did not go as expected leaves a finding with its evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict, cast

from sqlalchemy import Connection, select

from engine.domain.orders import CANCELLED
from engine.domain.patients import find_patient, get_patient, surviving
from engine.domain.records import IDENTIFIERS, ORDERS, Record, all_as, first_as
from engine.domain.rows import IdentifierRow, OrderRow, PatientRow
from engine.domain.studies import STUDIES
from engine.reconciliation.compare import Authority, FindingData
from engine.reconciliation.rules import MatchRules, ReconciliationRules

if TYPE_CHECKING:  # Python 3.13's typing.ReadOnly; annotations are not evaluated at run time
    from typing_extensions import ReadOnly


class StudyHeaders(TypedDict):
    """What matching reads of a study: a StudyRow, or the headers of a sample file (``radbridge
    rules check``), which has no analyst's match."""

    id: ReadOnly[int]
    study_uid: ReadOnly[str | None]
    dicom_patient_id: ReadOnly[str | None]
    dicom_issuer: ReadOnly[str | None]
    accession: ReadOnly[str | None]
    manual_order_id: ReadOnly[NotRequired[int | None]]
    manual_patient_id: ReadOnly[NotRequired[int | None]]


@dataclass
class Match:
    authority: Authority = field(default_factory=Authority)
    matched_by: str | None = None  # accession | patient_id | manual; None: unmatched
    findings: list[FindingData] = field(default_factory=list)
    exception: bool = False  # held for an analyst although something was found

    @property
    def patient_id(self) -> int | None:
        return self.authority.patient["id"] if self.authority.patient else None

    @property
    def order_id(self) -> int | None:
        return self.authority.order["id"] if self.authority.order else None


def _order(conn: Connection, order_id: int) -> OrderRow | None:
    return first_as(conn, select(ORDERS).where(ORDERS.c.id == order_id), OrderRow)


def _order_by_accession(conn: Connection, accession: str) -> OrderRow | None:
    # the newest order carrying it: a re-ordered procedure reuses the accession of the cancelled one
    return first_as(conn, select(ORDERS).where(ORDERS.c.accession == accession).order_by(ORDERS.c.id.desc())
                    .limit(1), OrderRow)


def _patient_row(p: Record) -> PatientRow:
    """A patient Record's columns (a copy: the match keeps them while the Record may change)."""
    return cast(PatientRow, dict(p.values))


def _patient(conn: Connection, patient_id: int) -> PatientRow | None:
    p = get_patient(conn, patient_id)
    return _patient_row(surviving(conn, p)) if p is not None else None


def _identifiers(conn: Connection, patient_id: int) -> list[IdentifierRow]:
    return all_as(conn, select(IDENTIFIERS).where(IDENTIFIERS.c.patient_id == patient_id).order_by(IDENTIFIERS.c.id),
                  IdentifierRow)


def header_patient(conn: Connection, study: StudyHeaders, rules: MatchRules,
                   findings: list[FindingData] | None) -> PatientRow | None:
    """The patient the header's PatientID (+ issuer) names, following merges; findings say why not."""
    def note(kind: str, severity: str, **detail: Any) -> None:
        if findings is not None:
            findings.append(FindingData(kind, severity, detail=detail))

    value = (study.get("dicom_patient_id") or "").strip()
    issuer = (study.get("dicom_issuer") or "").strip()
    if not value:
        note("patient_id_missing", "warning")
        return None
    trusted = rules.trusted_issuers
    if issuer:
        if trusted and issuer not in trusted:
            note("issuer_not_trusted", "warning", patient_id=value, issuer=issuer, trusted=trusted)
            return None
        p = find_patient(conn, value, issuer)
        if p is None:
            note("patient_unknown", "warning", patient_id=value, issuer=issuer)
        return _patient_row(p) if p is not None else None
    if rules.missing_issuer == "unmatched":
        note("issuer_missing", "warning", patient_id=value,
             rule="match.missing_issuer: unmatched (the header has no IssuerOfPatientID)")
        return None
    if rules.missing_issuer == "default":
        p = find_patient(conn, value, rules.default_issuer)
        if p is None:
            note("patient_unknown", "warning", patient_id=value, issuer=rules.default_issuer,
                 rule="match.missing_issuer: default")
        return _patient_row(p) if p is not None else None
    # any: the one patient holding this value under a trusted issuer
    stmt = select(IDENTIFIERS.c.patient_id, IDENTIFIERS.c.issuer).where(IDENTIFIERS.c.value == value)
    if trusted:
        stmt = stmt.where(IDENTIFIERS.c.issuer.in_(trusted))
    owners: dict[int, PatientRow] = {}
    issuers: list[str] = []
    for pid, iss in conn.execute(stmt.limit(20)):
        found = _patient(conn, pid)
        if found is not None:
            owners[found["id"]] = found
            issuers.append(iss)
    if len(owners) == 1:
        return next(iter(owners.values()))
    if owners:
        note("patient_ambiguous", "warning", patient_id=value, issuers=sorted(set(issuers)),
             patients=sorted(owners), rule="match.missing_issuer: any")
    else:
        note("patient_unknown", "warning", patient_id=value, issuer=None)
    return None


def choose_identifier(conn: Connection, patient_id: int, study: StudyHeaders, rules: MatchRules
                      ) -> tuple[str, str] | None:
    """The identifier the headers should carry: the header's own when it is a live identifier of
    the patient (not an alias left by a merge), else a primary one, the header's issuer or the
    default issuer preferred."""
    idents = _identifiers(conn, patient_id)
    value = (study.get("dicom_patient_id") or "").strip()
    issuer = (study.get("dicom_issuer") or "").strip()
    live = [i for i in idents if i["kind"] != "alias"]
    for i in live:
        if i["value"] == value and (i["issuer"] == issuer or not issuer):
            return i["value"], i["issuer"]
    primary = [i for i in idents if i["kind"] == "primary"] or live or idents
    for wanted in (issuer, rules.default_issuer):
        for i in primary:
            if wanted and i["issuer"] == wanted:
                return i["value"], i["issuer"]
    for i in primary:
        if not rules.trusted_issuers or i["issuer"] in rules.trusted_issuers:
            return i["value"], i["issuer"]
    return (primary[0]["value"], primary[0]["issuer"]) if primary else None


def match_study(conn: Connection, study: StudyHeaders, rules: ReconciliationRules) -> Match:
    m = Match()
    mr = rules.match
    order: OrderRow | None = None
    patient: PatientRow | None = None
    if manual_order := study.get("manual_order_id"):
        order = _order(conn, manual_order)
        m.matched_by = "manual" if order else None
    elif manual_patient := study.get("manual_patient_id"):
        patient = _patient(conn, manual_patient)
        m.matched_by = "manual" if patient else None
    accession = (study.get("accession") or "").strip()
    if m.matched_by is None and mr.by_accession:
        if accession:
            order = _order_by_accession(conn, accession)
            if order is None:
                m.findings.append(FindingData("order_unknown", "warning", "AccessionNumber", accession, None,
                                              {"accession": accession}))
            else:
                m.matched_by = "accession"
        else:
            m.findings.append(FindingData("accession_missing", "info", "AccessionNumber"))
    if order is not None:
        patient = _patient(conn, order["patient_id"])
        named = header_patient(conn, study, mr, None)
        if patient is not None and named is not None and named["id"] != patient["id"]:
            m.findings.append(FindingData(
                "patient_conflict", "warning", "PatientID", study.get("dicom_patient_id"), None,
                {"header_patient": named["id"], "order_patient": patient["id"], "order": order["id"],
                 "rule": f"match.patient_conflict: {mr.patient_conflict}"}))
            if mr.patient_conflict == "exception":
                m.exception = True
        if order["status"] in CANCELLED:
            m.findings.append(FindingData("order_cancelled", "warning", None, None, None,
                                          {"order": order["id"], "status": order["status"],
                                           "accession": order["accession"]}))
        _shared(conn, study, order, m)
    elif patient is None and m.matched_by is None:
        patient = header_patient(conn, study, mr, m.findings)
        if patient is not None:
            if not mr.by_patient_id:
                m.findings.append(FindingData("patient_only_not_allowed", "warning", None, None, None,
                                              {"patient": patient["id"], "rule": "match.by_patient_id: false"}))
                patient = None
            else:
                m.matched_by = "patient_id"
                if mr.patient_only == "exception":
                    m.exception = True
                    m.findings.append(FindingData("order_required", "warning", None, None, None,
                                                  {"patient": patient["id"], "rule": "match.patient_only: exception"}))
    if patient is not None:
        ident = choose_identifier(conn, patient["id"], study, mr)
        m.authority = Authority(patient=patient, identifier=ident, order=order)
    elif order is not None:  # an order whose patient row is gone cannot be: keep it anyway
        m.authority = Authority(order=order)
    if patient is None:
        m.matched_by = None
    return m


def _shared(conn: Connection, study: StudyHeaders, order: OrderRow, m: Match) -> None:
    same = STUDIES.c.order_id == order["id"]
    if order.get("accession"):
        same = same | (STUDIES.c.accession == order["accession"])
    others = [r.study_uid for r in conn.execute(
        select(STUDIES.c.study_uid).where(STUDIES.c.id != study["id"], same).order_by(STUDIES.c.id).limit(10))]
    if others:
        m.findings.append(FindingData("accession_shared", "info", "AccessionNumber", order.get("accession"), None,
                                      {"order": order["id"], "other_studies": others}))
    if order.get("study_uid") and order["study_uid"] != study.get("study_uid"):
        m.findings.append(FindingData("study_uid_differs", "info", "StudyInstanceUID", study.get("study_uid"),
                                      order["study_uid"], {"order": order["id"]}))
