"""``Patient/{id}/$consent-decision``: what an accessor would get of a patient's
record, and why, before it asks.

Parameters (GET query or POST Parameters): ``actor`` (``Organization/<id>``; default
the caller's organisation; another one only for administrators and auditors),
``purpose`` (a PurposeOfUse code; default the caller's), ``class`` (resource types,
comma-separated or repeated; default every Patient-compartment type the person has
data of). The answer is a Parameters resource: ``decision`` (``permit``: everything
visible, ``deny``: nothing, ``partial``: permit with some resources withheld) and one
``class`` part per type with its ``decision``, the ``visible`` and ``withheld`` counts
(over all the person's member records) and the ``reason``s: the Consents that apply
and the default policy. The counts come from the same store filter searches use.
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Request
from starlette.responses import Response

from hie.access import consent as rules
from hie.access.consent import Accessor, Concerns, to_term
from hie.access.consents import ConsentBook
from hie.access.decision import AUDIT_TYPES, MEMBER_TAG_SYSTEM, permits, require
from hie.access.principal import ADMIN, AUDITOR, Principal
from hie.access.purpose import parse_purpose
from hie.audit.events import operation_coding
from hie.audit.trail import Trail
from hie.fhir.errors import error
from hie.fhir.http import fhir_response, parameter_items
from hie.fhir.routes import operation
from hie.fhir.search.dates import now
from hie.fhir.service import check_id

router = APIRouter(prefix="/fhir")
CONSENT_DECISION = operation_coding("$consent-decision")
VALUE_KEYS = {
    "actor": ("valueString", "valueReference"),
    "purpose": ("valueCode", "valueString"),
    "class": ("valueCode", "valueString"),
}
_PASSIVE = frozenset({"_format", "_pretty"})


@router.get("/Patient/{patient_id}/$consent-decision")
@router.post("/Patient/{patient_id}/$consent-decision")
async def consent_decision(request: Request, patient_id: str) -> Response:
    """The consent decision for one patient (see the module docstring)."""

    async def run(principal: Principal, trail: Trail) -> dict:
        items = list(request.query_params.multi_items())
        if request.method == "POST":
            items += await parameter_items(request, VALUE_KEYS, "$consent-decision")
        result = await decide(request.app.state, principal, patient_id, items)
        query = f"Patient/{patient_id}/$consent-decision?{urlencode(items)}"
        await trail.record(
            trail.event(
                "operation",
                status=200,
                subtype_coding=CONSENT_DECISION,
                query=query,
                patients=[f"Patient/{patient_id}"],
            )
        )
        return result

    fmt, result = await operation(request, CONSENT_DECISION, run)
    return fhir_response(200, result, fmt)


async def decide(state, principal: Principal, patient_id: str, items) -> dict:
    """The Parameters answer of ``$consent-decision``."""
    check_id(patient_id)
    require(principal, "r", "Consent")
    book: ConsentBook = state.consents
    known = set(VALUE_KEYS) | _PASSIVE
    for key, _ in items:
        if key not in known:
            raise error(400, "not-supported", f"Unknown parameter {key!r} for $consent-decision")
    actor = _one(items, "actor") or principal.organization
    if actor is None:
        raise error(400, "required", "Name the actor (Organization/<id>) to decide for")
    if not actor.startswith("Organization/") or actor.count("/") != 1:
        raise error(400, "invalid", f"actor must be an Organization reference, not {actor!r}")
    if actor != principal.organization and not (principal.has(ADMIN) or principal.has(AUDITOR)):
        raise error(
            403, "forbidden", "Only administrators and auditors may ask for another organisation"
        )
    purpose = _one(items, "purpose")
    purpose = parse_purpose(purpose) if purpose is not None else principal.purpose
    patient = await state.store.read("Patient", patient_id)
    if patient is None or patient.deleted:
        raise error(404, "not-found", f"Patient/{patient_id} is not known")
    registry = state.service.registry
    compartment = registry.compartment("Patient")
    asked = [t for k, v in items if k == "class" for t in v.split(",") if t]
    for t in asked:
        if t not in compartment or t in AUDIT_TYPES:
            raise error(400, "invalid", f"class {t!r} is not a type of a patient's record")
        require(principal, "s", t)
    same_caller = actor == principal.organization and purpose == principal.purpose
    accessor = Accessor(
        actor,
        purpose,
        now(),
        principal.user if same_caller else None,
        principal.user_role if same_caller else None,
        book.default,
    )
    view = await book.view_for(accessor)
    people = await book.person(f"Patient/{patient_id}")
    policies = view.ledger.by_patient.get(f"Patient/{patient_id}", ())
    types = asked or [
        t for t in sorted(compartment) if t not in AUDIT_TYPES and permits(principal, "s", t)
    ]
    classes, decisions = [], []
    for t in types:
        shape = book.shape(t)
        mine = to_term(Concerns(people), shape, MEMBER_TAG_SYSTEM)
        total = (await state.store.search(t, (mine,), count=0)).total
        if not total and not asked:
            continue
        terms = await view.terms(t) if book.enabled else ()
        visible = total
        if terms and total:
            visible = (await state.store.search(t, (mine, *terms), count=0)).total
        formula = rules.permit_formula(
            policies, accessor, t, view.ledger.actors, view.ledger.related
        )
        decision = _decision(visible, total, formula)
        decisions.append(decision)
        reasons = [
            rules.describe(p, accessor, t, view.ledger.actors, view.ledger.related)
            for p in policies
        ]
        reasons.append(_default_reason(accessor))
        if not book.enabled:
            reasons = ["consent enforcement is off on this server"]
        parts = [
            {"name": "type", "valueCode": t},
            {"name": "decision", "valueCode": decision},
            {"name": "visible", "valueInteger": visible},
            {"name": "withheld", "valueInteger": total - visible},
        ]
        parts += [{"name": "reason", "valueString": r} for r in reasons]
        classes.append({"name": "class", "part": parts})
    overall = "permit"
    if decisions and all(d == "deny" for d in decisions):
        overall = "deny"
    elif any(d != "permit" for d in decisions):
        overall = "partial"
    head = [
        {"name": "decision", "valueCode": overall},
        {"name": "actor", "valueReference": {"reference": actor}},
        {"name": "purpose", "valueCode": purpose},
    ]
    return {"resourceType": "Parameters", "parameter": head + classes}


def _decision(visible: int, total: int, formula: rules.Formula) -> str:
    if total:
        return "permit" if visible == total else "deny" if visible == 0 else "partial"
    if formula == rules.FALSE:
        return "deny"
    return "permit" if formula == rules.TRUE else "partial"


def _default_reason(acc: Accessor) -> str:
    name = f"alliance default policy ({acc.default})"
    if not acc.default_permits():
        if acc.default == rules.OPT_IN:
            return f"{name}: shares only what a Consent permits"
        return (
            f"{name}: purpose {acc.purpose} is not treatment, shared only where a Consent permits"
        )
    return f"{name}: shared for treatment, except sensitive labels; own records always visible"


def _one(items, key: str) -> str | None:
    values = [v for k, v in items if k == key]
    if len(values) > 1:
        raise error(400, "invalid", f"Parameter {key} is given more than once")
    return values[0] if values else None
