"""What the order and patient say a study's headers should hold, and where the headers differ.

Pure functions over rows already loaded: unit-testable, and the same comparison decides both the
study's findings and, file by file, whether a stored instance needs rewriting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.domain.rows import OrderRow, PatientRow
from engine.reconciliation.rules import NAME_COMPONENTS, AttributeRule, NameRules, ReconciliationRules
from engine.store.states import FindingAction
from engine.store.types import JsonObject

PN_COMPONENTS = NAME_COMPONENTS  # DICOM PN order: family^given^middle^prefix^suffix


@dataclass
class Authority:
    """The authoritative side: the (surviving) patient, the identifier to use, and the order."""

    patient: PatientRow | None = None
    identifier: tuple[str, str] | None = None  # (value, issuer)
    order: OrderRow | None = None


@dataclass
class FindingData:
    kind: str
    severity: str  # info | warning | error
    attribute: str | None = None
    received: str | None = None
    expected: str | None = None
    detail: JsonObject = field(default_factory=dict)  # the evidence, kept as JSON
    action: FindingAction = FindingAction.NOTED

    def key(self) -> tuple[Any, ...]:
        return (self.kind, self.attribute, self.received, self.expected)

    def describe(self) -> str:
        if self.attribute:
            return f"{self.attribute}: header {self.received!r}, expected {self.expected!r}"
        return self.kind


def person_name(p: PatientRow) -> str | None:
    columns: Mapping[str, Any] = p  # by component name: family -> family_name ...
    parts = [(columns.get(f"{c}_name") if c in ("family", "given", "middle") else columns.get(c)) or ""
             for c in PN_COMPONENTS]
    text = "^".join(parts).rstrip("^")
    return text or None


def dicom_date(value: Any) -> str | None:
    """ISO date to DA; a partial date (YYYY, YYYY-MM) has no DA form and is not coerced."""
    text = str(value or "").replace("-", "")
    return text if len(text) == 8 and text.isdigit() else None


def authoritative(rule: AttributeRule, auth: Authority) -> str | None:
    """The value ``rule``'s attribute should hold, or None when the authority has none."""
    src = rule.source
    value: Any = None
    if src.startswith("patient."):
        p = auth.patient
        if p is None:
            return None
        if src == "patient.name":
            value = person_name(p)
        elif src == "patient.id":
            value = auth.identifier[0] if auth.identifier else None
        elif src == "patient.issuer":
            value = (auth.identifier[1] or None) if auth.identifier else None
        elif src == "patient.birth_date":
            value = dicom_date(p.get("birth_date"))
        elif src.startswith("patient.extra."):
            value = (p.get("extra") or {}).get(src[len("patient.extra."):])
        else:
            value = _column(p, src[len("patient."):])
    else:
        o = auth.order
        if o is None:
            return None
        if src.startswith("order.extra."):
            value = (o.get("extra") or {}).get(src[len("order.extra."):])
        else:
            value = _column(o, src[len("order."):])
    if value is None or value == "":
        return None
    text = str(value)
    return rule.table.get(text, text)


def _column(row: Mapping[str, Any], name: str) -> Any:
    """A column a rule names (``source: order.modality``): known only when the rules are read."""
    return row.get(name)


def _norm(text: str, names: NameRules) -> str:
    if names.whitespace == "collapse":
        text = " ".join(text.split())
    elif names.whitespace == "ignore":
        text = "".join(text.split())
    return text if names.case_sensitive else text.casefold()


def names_agree(received: str | None, expected: str, names: NameRules) -> bool:
    """Component-wise, on the alphabetic group (before any '=' ideographic/phonetic groups)."""
    got = (received or "").split("=", 1)[0].split("^")
    want = expected.split("=", 1)[0].split("^")
    for i, comp in enumerate(PN_COMPONENTS):
        if comp not in names.components:
            continue
        a = _norm(got[i] if i < len(got) else "", names)
        b = _norm(want[i] if i < len(want) else "", names)
        if a == b or (not a and names.missing_components_match):
            continue
        return False
    return True


def agrees(rule: AttributeRule, received: str | None, expected: str, names: NameRules) -> bool:
    if rule.vr == "PN":
        return names_agree(received, expected, names)
    return (received or "").strip() == expected.strip()


def differences(rules: ReconciliationRules, auth: Authority, received: dict[str, str | None]
                ) -> dict[str, tuple[str | None, str]]:
    """{attribute: (header value, authoritative value)} for every rule whose values disagree."""
    out: dict[str, tuple[str | None, str]] = {}
    for rule in rules.attributes:
        expected = authoritative(rule, auth)
        if expected is None:
            continue
        got = received.get(rule.keyword)
        if not agrees(rule, got, expected, rules.names):
            out[rule.keyword] = (got, expected)
    return out
