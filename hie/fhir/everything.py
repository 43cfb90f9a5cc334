"""``Patient/[id]/$everything`` (FHIR R4 Patient-everything): a person's whole record.

The searchset Bundle holds the Patient and every resource in the Patient compartment
(``conformance/r4/CompartmentDefinition-patient.json``) of each of the person's
Patient records, whichever member keeps them: by default the master patient index
widens the Patient to the golden record and all member records (as HAPI FHIR's
``_mdm=true``; ``_mdm=false`` keeps to the record asked for). Each page also holds,
as ``include`` entries, the resources outside the compartment that the page's
resources refer to (Practitioner, Organization, Location, Medication...).

Parameters: ``start``/``end`` keep resources whose care date
(:data:`~hie.fhir.search.registry.CARE_DATES`) overlaps the range; resources without
one (a Patient, a Coverage) are always kept.
``_since`` keeps resources updated at or after the instant. ``_type`` (repeatable,
comma-separated) limits the types returned, referenced ones included. ``_count`` is
the page size: without it a page is as large as the server allows (``max_count``), as
the operation asks for the whole record at once; larger records page with ``next``
links, through the same snapshots as searches (newest first, at most
``search_max_results`` resources). GET with URL parameters, or POST with a Parameters
body.

Access: the caller needs read on Patient; a type is returned only if the token may
read and search it (types named in ``_type`` and left out are reported in an
``outcome`` entry); audit records are never part of it (``$access-report``). Every
resource passes :func:`~hie.access.decision.disclose`, and the operation is audited.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from hie.access.decision import (
    AUDIT_TYPES,
    consent_filter,
    consent_state,
    disclose,
    overridden,
    permits,
    released,
    require,
)
from hie.access.principal import Principal
from hie.audit.events import operation_coding
from hie.audit.trail import Trail
from hie.fhir.errors import Issue, error, outcome
from hie.fhir.http import fhir_response, parameter_items
from hie.fhir.routes import base_url, operation
from hie.fhir.search.dates import date_range, now, to_fhir_instant
from hie.fhir.search.engine import Found, SearchEngine
from hie.fhir.search.mdm import SamePerson
from hie.fhir.search.params import Include, SearchRequest, non_negative
from hie.fhir.search.registry import Registry, care_date
from hie.fhir.service import FhirService
from hie.fhir.types import served_types
from hie.store import Version
from hie.store.query import AnyOf, Cond, IdIn, Match, Not, Query

router = APIRouter(prefix="/fhir")
EVERYTHING = operation_coding("$everything")
#: The ``kind`` of this operation's paging snapshots.
KIND = "$everything"
#: The parameters of a first request, and of a later page.
PARAMS = frozenset({"start", "end", "_since", "_type", "_count", "_mdm", "_format", "_pretty"})
PAGE_PARAMS = frozenset({"_getpages", "_getpagesoffset", "_count", "_format", "_pretty"})
#: Value types a POSTed Parameters part may use, by parameter.
VALUE_KEYS = {
    "start": ("valueDate", "valueDateTime"),
    "end": ("valueDate", "valueDateTime"),
    "_since": ("valueInstant", "valueDateTime"),
    "_type": ("valueCode", "valueString"),
    "_count": ("valueInteger", "valuePositiveInt", "valueUnsignedInt"),
    "_mdm": ("valueBoolean",),
}
#: Every reference of the page's resources (filtered to the referenced types).
_REFERENCED = (Include("*", "*", None, iterate=False, reverse=False),)


@dataclass
class Ask:
    """A parsed first request of ``$everything``."""

    mdm: bool = True
    types: list[str] | None = None  # None: every type
    start: str | None = None
    end: str | None = None
    since: str | None = None
    count: int | None = None
    used: list[tuple[str, str]] = field(default_factory=list)


@router.get("/Patient/{patient_id}/$everything")
@router.post("/Patient/{patient_id}/$everything")
async def everything(request: Request, patient_id: str) -> Response:
    """The person's record as a searchset Bundle (see the module docstring)."""

    async def run(principal: Principal, trail: Trail) -> dict:
        service: FhirService = request.app.state.service
        items = list(request.query_params.multi_items())
        if request.method == "POST":
            items += await parameter_items(request, VALUE_KEYS, "$everything")
        base = base_url(request)
        if any(k == "_getpages" for k, _ in items):
            bundle, shown = await _later_page(service, principal, patient_id, items, base)
        else:
            bundle, shown = await _first_page(service, principal, patient_id, items, base)
        touched = trail.touched(shown)
        if touched:
            touched["patients"] = [f"Patient/{patient_id}", *touched["patients"]]
        query = f"Patient/{patient_id}/$everything?{urlencode(items)}"
        await trail.record(
            trail.event("operation", status=200, subtype_coding=EVERYTHING, query=query, **touched)
        )
        return bundle

    fmt, result = await operation(request, EVERYTHING, run)
    return fhir_response(200, result, fmt)


async def _first_page(
    service: FhirService, principal: Principal, patient_id: str, items, base: str
) -> tuple[dict, list[Version]]:
    ask = parse(items, service.settings.max_count)
    await service.read(principal, "Patient", patient_id)  # 403, 400, 404, 410 as a read
    registry = service.registry
    compartment = registry.compartment("Patient")
    wanted = ask.types if ask.types is not None else sorted(served_types() - AUDIT_TYPES)
    allowed = [t for t in wanted if _may_see(principal, t)]
    state = {
        "kind": KIND,
        "patient": patient_id,
        "mdm": ask.mdm,
        "types": [t for t in allowed if t in compartment],
        "referenced": [t for t in allowed if t not in compartment],
        "start": ask.start,
        "end": ask.end,
        "since": ask.since,
        "consent": consent_state(principal),
    }
    count = ask.count if ask.count is not None else service.settings.max_count
    req = SearchRequest((), count, types=state["types"])
    found = await service.engine.search(await _filtered(principal, registry, state), req, state)
    bundle, shown = await _bundle(service.engine, principal, found, state, base)
    self_query = [*ask.used, ("_count", str(count))]
    bundle["link"].insert(0, {"relation": "self", "url": _url(base, patient_id, self_query)})
    left_out = [t for t in ask.types or () if t not in allowed]
    if left_out:
        note = Issue(
            "suppressed",
            f"Not returned: the token's scopes do not permit reading and searching "
            f"{', '.join(left_out)}",
            severity="information",
        )
        bundle["entry"].append({"resource": outcome([note]), "search": {"mode": "outcome"}})
    return bundle, shown


async def _later_page(
    service: FhirService, principal: Principal, patient_id: str, items, base: str
) -> tuple[dict, list[Version]]:
    for key, _ in items:
        if key not in PAGE_PARAMS:
            raise error(400, "invalid", f"A page link takes no other parameter than its own: {key}")
    key = _single(items, "_getpages")
    count = min(_int(items, "_count", service.settings.max_count), service.settings.max_count)
    offset = _int(items, "_getpagesoffset", 0)
    require(principal, "r", "Patient")

    def authorize(types: list[str]) -> None:
        for t in types:
            require(principal, "s", t)
            require(principal, "r", t)

    def accept(state: dict) -> None:
        if state.get("patient") != patient_id:
            raise error(400, "invalid", f"This paging key is not one of Patient/{patient_id}")

    found = await service.engine.page(
        key,
        offset,
        count,
        lambda state: _filtered(principal, service.registry, state),
        authorize,
        kind=KIND,
        accept=accept,
    )
    bundle, shown = await _bundle(service.engine, principal, found, found.state, base)
    self_url = _page_url(base, patient_id, found.snapshot or "", offset, count)
    bundle["link"].insert(0, {"relation": "self", "url": self_url})
    return bundle, shown


def parse(items: list[tuple[str, str]], max_count: int) -> Ask:
    """The parameters of a first request; 400 naming the one that is wrong."""
    ask = Ask()
    seen: set[str] = set()
    for key, value in items:
        if key not in PARAMS:
            raise error(400, "not-supported", f"Unknown parameter {key!r} for $everything")
        if key != "_type" and key in seen:
            raise error(400, "invalid", f"{key} may be given only once")
        seen.add(key)
        if key in ("_format", "_pretty"):
            continue
        if key == "_count":  # the self link gives the page size applied
            ask.count = min(non_negative(key, value), max_count)
            continue
        ask.used.append((key, value))
        if key == "_mdm":
            if value not in ("true", "false"):
                raise error(400, "invalid", f"_mdm must be true or false, got {value!r}")
            ask.mdm = value == "true"
        elif key == "_type":
            ask.types = list(dict.fromkeys([*(ask.types or ()), *_types(value)]))
        elif key == "_since":
            ask.since = _instant(key, value, 0)
        elif key == "start":
            ask.start = _instant(key, value, 0)
        elif key == "end":
            ask.end = _instant(key, value, 1)
    if ask.start and ask.end and ask.start > ask.end:
        raise error(400, "invalid", "start is after end")
    return ask


def queries(registry: Registry, state: dict) -> dict[str, Query]:
    """One store query per compartment type of ``state`` (also rebuilds a snapshot's)."""
    patient, mdm = state["patient"], state["mdm"]
    compartment = registry.compartment("Patient")
    out: dict[str, Query] = {}
    for t in state["types"]:
        params = registry.params(t)
        links = [_member(p, patient, mdm) for p in compartment.get(t, ()) if p in params]
        if t == "Patient":
            links.append(_member(None, patient, mdm))
        if not links:
            continue
        query = [links[0] if len(links) == 1 else AnyOf(tuple(links))]
        code = care_date(registry, t)
        if code is not None and (state["start"] or state["end"]):
            conds = []
            if state["start"]:
                conds.append(Cond("high", "ge", state["start"]))
            if state["end"]:
                conds.append(Cond("low", "le", state["end"]))
            query.append(AnyOf((Not(Match(code, ())), Match(code, tuple(conds)))))
        if state["since"]:
            query.append(Match("_lastUpdated", (Cond("low", "ge", state["since"]),)))
        out[t] = tuple(query)
    return out


async def _filtered(principal: Principal, registry: Registry, state: dict) -> dict[str, Query]:
    """:func:`queries` with what the patients' consent withholds from the caller left
    out in the store."""
    if principal.consent is not None:
        principal.consent.note_patients([f"Patient/{state['patient']}"])
    return {t: await consent_filter(principal, t, q) for t, q in queries(registry, state).items()}


def _member(param: str | None, patient: str, mdm: bool):
    """``param`` refers to the Patient (``param`` None: the resource is the Patient),
    or with ``mdm`` to any Patient of the same person."""
    if mdm:
        return SamePerson(param, (patient,))
    if param is None:
        return IdIn((patient,))
    return Match(param, (Cond("text", "eq", f"Patient/{patient}"),))


def _may_see(principal: Principal, type_: str) -> bool:
    return permits(principal, "s", type_) and permits(principal, "r", type_)


async def _bundle(
    engine: SearchEngine, principal: Principal, found: Found, state: dict, base: str
) -> tuple[dict, list[Version]]:
    """The searchset Bundle of a page (no ``self`` link yet) and what it shows."""
    referenced = set(state["referenced"])
    matches = released(principal, found.matches, state)
    included = await engine.includes(
        matches, _REFERENCED, lambda t: t in referenced and permits(principal, "r", t)
    )
    included = disclose(principal, "r", included)
    bundle: dict = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": to_fhir_instant(now())},
        "type": "searchset",
    }
    if security := overridden(principal):
        bundle["meta"]["security"] = security
    if found.total is not None:
        bundle["total"] = found.total
    links = []
    if found.snapshot and found.count:
        patient, key, count = state["patient"], found.snapshot, found.count
        links.append({"relation": "first", "url": _page_url(base, patient, key, 0, count)})
        if found.offset > 0:
            previous = max(found.offset - count, 0)
            links.append(
                {"relation": "previous", "url": _page_url(base, patient, key, previous, count)}
            )
        if found.more:
            following = found.offset + count
            links.append(
                {"relation": "next", "url": _page_url(base, patient, key, following, count)}
            )
    bundle["link"] = links
    bundle["entry"] = [_entry(v, base, "match") for v in matches] + [
        _entry(v, base, "include") for v in included
    ]
    return bundle, matches + included


def _entry(v: Version, base: str, mode: str) -> dict:
    return {
        "fullUrl": f"{base}/{v.type}/{v.id}",
        "resource": orjson.Fragment(v.body),
        "search": {"mode": mode},
    }


def _url(base: str, patient: str, query: list[tuple[str, str]]) -> str:
    return f"{base}/Patient/{patient}/$everything?{urlencode(query)}"


def _page_url(base: str, patient: str, key: str, offset: int, count: int) -> str:
    query = [("_getpages", key), ("_getpagesoffset", str(offset)), ("_count", str(count))]
    return _url(base, patient, query)


def _types(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",")]
    served = served_types()
    for name in names:
        if name in AUDIT_TYPES:
            raise error(400, "invalid", f"$everything does not return {name}; use $access-report")
        if name not in served:
            raise error(400, "invalid", f"_type: unknown resource type {name!r}")
    return names


def _instant(key: str, value: str, end: int) -> str:
    try:
        return date_range(value)[end]
    except (ValueError, OverflowError):
        raise error(
            400, "invalid", f"{key} must be a FHIR date or dateTime, got {value!r}"
        ) from None


def _single(items, key: str) -> str | None:
    values = [v for k, v in items if k == key]
    if len(values) > 1:
        raise error(400, "invalid", f"{key} may be given only once")
    return values[0] if values else None


def _int(items, key: str, default: int) -> int:
    value = _single(items, key)
    return default if value is None else non_negative(key, value)
