"""Purpose of use (HL7 v3 ``PurposeOfUse``, from ActReason): from the token or the
``X-Purpose-Of-Use`` request header, defaulting to treatment."""

from __future__ import annotations

from hie.fhir.errors import error

SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
HEADER = "x-purpose-of-use"

#: The PurposeOfUse codes this server accepts, with their display.
PURPOSES = {
    "TREAT": "treatment",
    "ETREAT": "emergency treatment",
    "BTG": "break the glass",
    "CAREMGT": "care management",
    "COC": "coordination of care",
    "HPAYMT": "healthcare payment",
    "HOPERAT": "healthcare operations",
    "HQUALIMP": "health quality improvement",
    "HRESCH": "healthcare research",
    "PUBHLTH": "public health",
    "HLEGAL": "legal",
    "HSYSADMIN": "system administration",
    "PATRQT": "patient requested",
    "FAMRQT": "family requested",
    "PWATRNY": "power of attorney",
    "COMPL": "compliance",
    "HCOMPL": "health compliance",
}
#: Purposes that override a patient's refusal (break-glass): allowed only to clients
#: registered for it, and flagged in the audit record.
BREAK_GLASS = frozenset({"ETREAT", "BTG"})


def parse_purpose(value: str) -> str:
    """The PurposeOfUse code of a header or claim value (``CODE`` or ``system|CODE``);
    400 for an unknown one."""
    system, sep, code = value.strip().rpartition("|")
    if sep and system != SYSTEM:
        raise error(400, "value", f"Purpose of use must be from {SYSTEM}, not {system!r}")
    if code not in PURPOSES:
        known = ", ".join(sorted(PURPOSES))
        raise error(400, "value", f"Unknown purpose of use {code!r}; one of {known}")
    return code


#: The label (``meta.security``) of what only break-glass released, in a response.
BREAK_GLASS_LABEL = {"system": SYSTEM, "code": "BTG", "display": "break the glass"}
