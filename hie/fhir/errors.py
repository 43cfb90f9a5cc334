"""FHIR errors and OperationOutcome construction: every error leaves as one."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Issue:
    """One OperationOutcome.issue."""

    code: str
    diagnostics: str
    severity: str = "error"
    expression: tuple[str, ...] = ()

    def to_json(self) -> dict:
        """The issue as FHIR JSON."""
        out = {"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics}
        if self.expression:
            out["expression"] = list(self.expression)
        return out


@dataclass
class FhirError(Exception):
    """An error answered with ``status`` and an OperationOutcome of ``issues``."""

    status: int
    issues: list[Issue] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return "; ".join(i.diagnostics for i in self.issues)


def error(status: int, code: str, diagnostics: str, *expression: str) -> FhirError:
    """Shorthand for a FhirError with one issue."""
    return FhirError(status, [Issue(code, diagnostics, expression=expression)])


def outcome(issues: list[Issue]) -> dict:
    """An OperationOutcome resource holding ``issues``."""
    return {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in issues]}


def information(diagnostics: str) -> dict:
    """A success OperationOutcome (for ``Prefer: return=OperationOutcome``)."""
    return outcome([Issue("informational", diagnostics, severity="information")])
