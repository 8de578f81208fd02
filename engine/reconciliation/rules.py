"""Reconciliation rules: a mapping file with ``source: reconciliation`` (docs/reconciliation.md).

It says how a stable study is matched (accession, then patient ID + issuer), how header values are
compared with the order's and patient's, which DICOM attributes are made to agree and where their
authoritative value comes from, and what the images do to the order's status. Problems name the
file, line and key, like every other mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_dict

from engine.yamlfile import ConfigProblem, LineDict

NAME_COMPONENTS = ("family", "given", "middle", "prefix", "suffix")
SOURCES = {
    "patient.name": "the patient's name as DICOM PN (family^given^middle^prefix^suffix)",
    "patient.id": "the patient's identifier (the primary one; the header's issuer or default_issuer preferred)",
    "patient.issuer": "that identifier's issuer (assigning authority)",
    "patient.birth_date": "birth date as YYYYMMDD (a partial date is not coerced)",
    "patient.sex": "administrative sex (M, F, O, U ...), through the attribute's table",
    "order.accession": "the order's accession number",
    "order.placer_number": "placer order number",
    "order.filler_number": "filler order number",
    "order.requested_procedure_id": "requested procedure ID",
    "order.procedure_code": "procedure code",
    "order.procedure_text": "procedure description",
    "order.ordering_provider": "ordering provider as sent (XCN)",
}
PREFIX_SOURCES = ("patient.extra.", "order.extra.")
# Attributes a rule may not rewrite: identity of the object, its encoding, and the pixel data.
PROTECTED = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "SpecificCharacterSet",
             "TransferSyntaxUID", "PixelData", "OriginalAttributesSequence", "Modality"}
TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT"}
SEVERITIES = ("info", "warning", "error")


@dataclass
class AttributeRule:
    keyword: str
    source: str
    vr: str
    severity: str = "warning"  # of a mismatch finding; info ones never flag or quarantine a study
    table: dict[str, str] = field(default_factory=dict)  # authoritative value -> DICOM value
    line: int = 0


@dataclass
class NameRules:
    case_sensitive: bool = False
    whitespace: str = "collapse"  # collapse | exact | ignore
    components: tuple[str, ...] = NAME_COMPONENTS
    missing_components_match: bool = False  # the header leaving a component empty is not a mismatch


@dataclass
class MatchRules:
    by_accession: bool = True
    by_patient_id: bool = True
    patient_only: str = "reconcile"  # reconcile | exception: a study with a patient but no order
    missing_issuer: str = "any"  # any | default | unmatched
    default_issuer: str = ""
    trusted_issuers: list[str] = field(default_factory=list)  # empty: every issuer
    patient_conflict: str = "follow_order"  # follow_order | exception


@dataclass
class OrderStatusRules:
    images_received: str = "IP"  # "" leaves the order's status alone
    study_stable: str = "CM"


@dataclass
class ReconciliationRules:
    name: str
    file: str
    match: MatchRules = field(default_factory=MatchRules)
    names: NameRules = field(default_factory=NameRules)
    attributes: list[AttributeRule] = field(default_factory=list)
    order_status: OrderStatusRules = field(default_factory=OrderStatusRules)
    description: str = ""


def default_rules() -> ReconciliationRules:
    """What applies when a channel names no rules file: the shipped file's content."""
    rules = ReconciliationRules(name="(built-in)", file="")
    rules.attributes = [
        AttributeRule("PatientName", "patient.name", "PN"),
        AttributeRule("PatientID", "patient.id", "LO"),
        AttributeRule("IssuerOfPatientID", "patient.issuer", "LO", severity="info"),
        AttributeRule("PatientBirthDate", "patient.birth_date", "DA"),
        AttributeRule("PatientSex", "patient.sex", "CS", table={"U": "O", "A": "O", "N": "O"}),
        AttributeRule("AccessionNumber", "order.accession", "SH"),
    ]
    return rules


class _Checker:
    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[ConfigProblem] = []

    def problem(self, line: int, key: str, message: str) -> None:
        self.problems.append(ConfigProblem(self.file, line, key, message))

    @staticmethod
    def line(d: Any, key: str, default: int) -> int:
        return d.line_of(key) if isinstance(d, LineDict) and key in d else default

    def section(self, data: dict[str, Any], key: str, line: int) -> dict[str, Any]:
        value = data.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(self.line(data, key, line), key, f"{key}: is a mapping of options")
            return {}
        return value

    def options(self, raw: dict[str, Any], where: str, target: Any, choices: dict[str, tuple[str, ...]],
                line: int) -> None:
        names = {k for k in vars(target)}
        for key, value in raw.items():
            kline = self.line(raw, key, line)
            if key not in names:
                self.problem(kline, f"{where}.{key}", f"unknown option; expected one of {', '.join(sorted(names))}")
                continue
            current = getattr(target, key)
            if isinstance(current, bool):
                ok = isinstance(value, bool)
            elif isinstance(current, list):
                ok = isinstance(value, list) and all(isinstance(v, (str, int)) for v in value)
                value = [str(v) for v in value] if ok else value
            elif isinstance(current, tuple):
                ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
                value = tuple(value) if ok else value
            else:
                ok = isinstance(value, str)
            if not ok:
                self.problem(kline, f"{where}.{key}", f"expected {type(current).__name__}, got {value!r}")
                continue
            allowed = choices.get(key)
            if allowed is not None:
                bad = [v for v in (value if isinstance(value, tuple) else (value,)) if v not in allowed]
                if bad:
                    self.problem(kline, f"{where}.{key}", f"{bad[0]!r} is not one of {', '.join(allowed)}")
                    continue
            setattr(target, key, value)


def compile_rules(data: Any, file: str, name: str) -> tuple[ReconciliationRules | None, list[ConfigProblem]]:
    c = _Checker(file)
    if not isinstance(data, dict):
        c.problem(1, "", "a reconciliation file is a YAML mapping with source: reconciliation")
        return None, c.problems
    rules = ReconciliationRules(name=name, file=file, description=str(data.get("description") or ""))
    for key in data:
        if key not in ("source", "description", "match", "compare", "attributes", "order_status"):
            c.problem(c.line(data, key, 1), str(key),
                      "unknown top-level key; expected source, description, match, compare, attributes, order_status")
    match = c.section(data, "match", 1)
    c.options(match, "match", rules.match, {"patient_only": ("reconcile", "exception"),
                                            "missing_issuer": ("any", "default", "unmatched"),
                                            "patient_conflict": ("follow_order", "exception")},
              c.line(data, "match", 1))
    if rules.match.missing_issuer == "default" and not rules.match.default_issuer:
        c.problem(c.line(match, "missing_issuer", 1), "match.missing_issuer",
                  "missing_issuer: default needs default_issuer: (the issuer to assume)")
    compare = c.section(data, "compare", 1)
    for key in compare:
        if key != "name":
            c.problem(c.line(compare, key, 1), f"compare.{key}", "unknown key; expected name")
    c.options(c.section(compare, "name", 1), "compare.name", rules.names,
              {"whitespace": ("collapse", "exact", "ignore"), "components": NAME_COMPONENTS},
              c.line(compare, "name", 1))
    status = c.section(data, "order_status", 1)
    c.options(status, "order_status", rules.order_status,
              {"images_received": ("", "IP", "A", "CM"), "study_stable": ("", "IP", "A", "CM")},
              c.line(data, "order_status", 1))
    attrs = data.get("attributes")
    if attrs is None:
        rules.attributes = default_rules().attributes
    elif not isinstance(attrs, dict) or not attrs:
        c.problem(c.line(data, "attributes", 1), "attributes",
                  "attributes: maps DICOM keywords to sources, e.g. PatientName: {from: patient.name}")
    else:
        for keyword, spec in attrs.items():
            rule = _attribute(c, attrs, str(keyword), spec)
            if rule is not None:
                rules.attributes.append(rule)
    return (None if any(p.severity == "error" for p in c.problems) else rules), c.problems


def _attribute(c: _Checker, attrs: dict[str, Any], keyword: str, spec: Any) -> AttributeRule | None:
    line = c.line(attrs, keyword, 1)
    where = f"attributes.{keyword}"
    if keyword not in keyword_dict:
        c.problem(line, where, f"{keyword!r} is not a DICOM attribute keyword (e.g. PatientName, AccessionNumber)")
        return None
    vr = dictionary_VR(keyword_dict[keyword])
    if keyword in PROTECTED or vr not in TEXT_VRS:
        c.problem(line, where, f"{keyword} ({vr}) cannot be coerced: only text attributes of the patient, study "
                               "and request, not UIDs, the encoding or pixel data")
        return None
    if isinstance(spec, str):
        spec = {"from": spec}
    if not isinstance(spec, dict):
        c.problem(line, where, "expected {from: SOURCE} (optionally severity:, table:)")
        return None
    for key in spec:
        if key not in ("from", "severity", "table"):
            c.problem(c.line(spec, key, line), f"{where}.{key}", "unknown key; expected from, severity, table")
    source = spec.get("from")
    if not isinstance(source, str) or not (source in SOURCES or
                                           any(source.startswith(p) and len(source) > len(p) for p in PREFIX_SOURCES)):
        c.problem(c.line(spec, "from", line), f"{where}.from",
                  f"unknown source {source!r}; expected one of {', '.join(SOURCES)}, patient.extra.NAME, "
                  "order.extra.NAME")
        return None
    if source == "patient.name" and vr != "PN":
        c.problem(c.line(spec, "from", line), f"{where}.from", f"patient.name fills person names (PN); {keyword} is {vr}")
        return None
    severity = spec.get("severity", "warning")
    if severity not in SEVERITIES:
        c.problem(c.line(spec, "severity", line), f"{where}.severity", f"{severity!r} is not one of "
                                                                       f"{', '.join(SEVERITIES)}")
        severity = "warning"
    table = spec.get("table") or {}
    if not isinstance(table, dict):
        c.problem(c.line(spec, "table", line), f"{where}.table", "a table maps authoritative values to DICOM values")
        table = {}
    return AttributeRule(keyword, source, vr, severity, {str(k): str(v) for k, v in table.items()}, line)
