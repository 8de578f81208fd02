"""OperationOutcome: how the FHIR endpoint says what went wrong (and, for batches, what went right)."""

from __future__ import annotations

from typing import Any

from engine.errors import RadBridgeError

# HTTP status -> the issue-type code (http://hl7.org/fhir/issue-type) that usually goes with it
_DEFAULT_CODE = {400: "structure", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
                 409: "conflict", 410: "deleted", 412: "conflict", 413: "too-costly", 415: "not-supported",
                 422: "processing", 500: "exception", 503: "transient"}


def issue(diagnostics: str, code: str = "processing", severity: str = "error",
          expression: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        out["expression"] = [expression]
    return out


def operation_outcome(*issues: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": list(issues) or [issue("ok", "informational",
                                                                                 "information")]}


class FhirError(RadBridgeError):
    """A request the endpoint refuses: an HTTP status and the OperationOutcome that explains it."""

    def __init__(self, status: int, diagnostics: str, code: str | None = None, expression: str | None = None,
                 *, more: list[dict[str, Any]] | None = None) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.issues = [issue(diagnostics, code or _DEFAULT_CODE.get(status, "processing"), "error", expression),
                       *(more or [])]

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(*self.issues)

    @property
    def diagnostics(self) -> str:
        return "; ".join(str(i.get("diagnostics")) for i in self.issues)
