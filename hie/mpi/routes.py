"""The master patient index's operations on ``/fhir/Patient``.

- ``POST Patient/$match`` (IHE PDQm ITI-119, FHIR ``Patient-match``): a searchset Bundle of
  golden records (one per person), best first, each entry's ``search`` carrying ``score``
  (the match probability), the ``match-grade`` extension and :data:`MATCH_DETAIL`, the
  field-by-field comparison the score came from.
- ``GET|POST Patient/$ihe-pix`` (IHE PIXm ITI-83): the same person's other identifiers
  (``targetIdentifier``) and records (``targetId``: member records and the golden record),
  with the failure modes of ITI-83 (400 unknown source domain, 403 unknown target domain,
  404 unknown source identifier).
- ``POST Patient/$mpi-link``, ``$mpi-unlink``, ``$merge`` (after FHIR R5 ``Patient-merge``,
  ``preview`` included) and ``$unmerge``: manual identity management by a data steward.
- ``GET Patient/$mpi-review``: the queue of possible matches; ``POST Patient/$mpi-resolve``:
  a steward's decision on one (``same`` or ``different``; the engine remembers it).

Every operation authenticates through :func:`hie.fhir.routes.operation`, asks the access
decision point and leaves one AuditEvent naming the patients it touched. Changes are planned
by the engine (``request.app.state.mpi``) under its ``serial()`` lock and committed together
with their audit record; a concurrent change makes them re-plan. Bad input is answered with
an OperationOutcome and changes nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from hie import jsonio
from hie.access.decision import disclose, require, require_role
from hie.access.principal import ADMIN, STEWARD, Principal
from hie.audit.events import operation_coding
from hie.audit.trail import Trail
from hie.fhir.errors import FhirError, Issue, error, information, outcome
from hie.fhir.http import check_content_type, fhir_response, read_body
from hie.fhir.routes import base_url, operation
from hie.fhir.search.dates import now, to_fhir_instant
from hie.fhir.search.params import split, unescape
from hie.fhir.service import RETRIES, backoff
from hie.fhir.validation import check_resource, parse_json, small_int, structural_issues, valid_id
from hie.mpi.index import MatchResult, PatientIndex
from hie.mpi.records import (
    ENTERPRISE_ID_SYSTEM,
    REPLACED_BY,
    REVIEW_STATUSES,
    REVIEW_TYPE,
    golden_of_member,
    is_golden,
    ref_id,
    review_id,
)
from hie.store import ConditionConflict, Version, VersionConflict, Write
from hie.store.query import Cond, Match

router = APIRouter(prefix="/fhir")

MATCH = operation_coding("$match")
PIX = operation_coding("$ihe-pix")
LINK = operation_coding("$mpi-link")
UNLINK = operation_coding("$mpi-unlink")
MERGE = operation_coding("$merge")
UNMERGE = operation_coding("$unmerge")
REVIEW = operation_coding("$mpi-review")
RESOLVE = operation_coding("$mpi-resolve")

MATCH_GRADE = "http://hl7.org/fhir/StructureDefinition/match-grade"
MATCH_DETAIL = "http://hie.example/fhir/StructureDefinition/mpi-match-detail"
"""Extension on ``Bundle.entry.search`` of a ``$match`` result: ``record`` (the member record
the score came from), ``weight`` (the pair's total Fellegi-Sunter weight, log2-odds) and one
``field`` per compared field (``name``, agreement ``level`` and the ``weight`` it added)."""

_CERTAIN = "certain"
_DECISIONS = ("same", "different")
_RESULT_PARAMS = frozenset({"_format", "_pretty"})
#: Longest sourceIdentifier/targetSystem accepted (identifier systems and values are short).
_MAX_TOKEN = 2048


# ---------------------------------------------------------------------- parameters
@dataclass(frozen=True, slots=True)
class Param:
    """An input parameter: the ``value[x]`` (or ``resource``) keys it may be given as, and
    its cardinality (``most`` None: unbounded)."""

    kinds: tuple[str, ...]
    least: int = 0
    most: int | None = 1


MATCH_PARAMS = {
    "resource": Param(("resource",), 1),
    "onlyCertainMatches": Param(("valueBoolean",)),
    "count": Param(("valueInteger", "valuePositiveInt")),
}
PIX_PARAMS = {
    "sourceIdentifier": Param(("valueString", "valueIdentifier"), 1),
    "targetSystem": Param(("valueString", "valueUri"), 0, None),
}
LINK_PARAMS = {
    "patient": Param(("valueReference",), 1),
    "golden": Param(("valueReference",), 1),
    "reason": Param(("valueString",)),
}
UNLINK_PARAMS = {"patient": Param(("valueReference",), 1), "reason": Param(("valueString",))}
MERGE_PARAMS = {
    "source-patient": Param(("valueReference",)),
    "source-patient-identifier": Param(("valueIdentifier",), 0, None),
    "target-patient": Param(("valueReference",)),
    "target-patient-identifier": Param(("valueIdentifier",), 0, None),
    "result-patient": Param(("resource",)),
    "preview": Param(("valueBoolean",)),
}
UNMERGE_PARAMS = {"source-patient": Param(("valueReference",), 1)}
RESOLVE_PARAMS = {
    "review": Param(("valueString", "valueId"), 1),
    "decision": Param(("valueCode", "valueString"), 1),
}
REVIEW_QUERY = {
    "status": Param(("valueCode",)),
    "_count": Param(("valueInteger",)),
    "_offset": Param(("valueInteger",)),
}

_PYTHON_TYPES: dict[str, type | tuple[type, ...]] = {
    "valueBoolean": bool,
    "valueInteger": int,
    "valuePositiveInt": int,
    "valueString": str,
    "valueCode": str,
    "valueUri": str,
    "valueId": str,
    "valueReference": dict,
    "valueIdentifier": dict,
    "resource": dict,
}

Inputs = dict[str, list[Any]]


def _parameters(body: object, specs: dict[str, Param], op: str) -> Inputs:
    """The values of a ``Parameters`` body by name, checked against ``specs``: 400 for a
    body that is not a valid Parameters resource, an unknown parameter, a value of the wrong
    type and a missing or repeated parameter. Resources inside are validated by the caller."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        found = body.get("resourceType") if isinstance(body, dict) else None
        raise error(
            400,
            "invalid",
            f"{op} takes a Parameters resource"
            + (f", not {found}" if isinstance(found, str) else ""),
        )
    items = body.get("parameter", [])
    if not isinstance(items, list) or not all(isinstance(p, dict) for p in items):
        raise error(400, "structure", "Parameters.parameter must be a list of objects")
    shell = {**body, "parameter": [{k: v for k, v in p.items() if k != "resource"} for p in items]}
    issues = structural_issues(shell, "Parameters", "Parameters")
    if issues:
        raise FhirError(400, issues)
    values: Inputs = {}
    for i, item in enumerate(items):
        where = f"Parameters.parameter[{i}]"
        name = item.get("name")
        spec = specs.get(name)
        if spec is None:
            known = ", ".join(specs)
            raise error(
                400,
                "not-supported",
                f"Unknown parameter {name!r} for {op}; it takes {known}",
                where,
            )
        given = [k for k in item if k.startswith("value") or k in ("resource", "part")]
        if len(given) != 1 or given[0] not in spec.kinds:
            raise error(400, "invalid", f"{op}: {name} must be given as {_kinds(spec)}", where)
        kind = given[0]
        value = item[kind]
        python = _PYTHON_TYPES[kind]
        if not isinstance(value, python) or (python is int and isinstance(value, bool)):
            raise error(400, "invalid", f"{op}: {name} must be given as {_kinds(spec)}", where)
        values.setdefault(name, []).append(value)
    _cardinality(values, specs, op)
    return values


def _kinds(spec: Param) -> str:
    return " or ".join(spec.kinds)


def _cardinality(values: Inputs, specs: dict[str, Param], op: str) -> None:
    for name, spec in specs.items():
        n = len(values.get(name, ()))
        if n < spec.least:
            raise error(400, "required", f"{op} needs the parameter {name}")
        if spec.most is not None and n > spec.most:
            raise error(400, "invalid", f"{op}: {name} may be given only once")


def _query(request: Request, specs: dict[str, Param], op: str) -> Inputs:
    """The URL's parameters, checked like :func:`_parameters` (strings converted to the
    boolean or integer their kind says)."""
    values: Inputs = {}
    for name, raw in request.query_params.multi_items():
        if name in _RESULT_PARAMS:
            continue
        spec = specs.get(name)
        if spec is None:
            known = ", ".join(specs)
            raise error(
                400, "not-supported", f"Unknown parameter {name!r} for {op}; it takes {known}"
            )
        kind = spec.kinds[0]
        if kind == "valueBoolean":
            if raw not in ("true", "false"):
                raise error(400, "invalid", f"{op}: {name} must be true or false, got {raw!r}")
            value: Any = raw == "true"
        elif kind in ("valueInteger", "valuePositiveInt"):
            value = small_int(raw)
            if value is None:
                raise error(400, "invalid", f"{op}: {name} must be an integer, got {raw!r}")
        elif kind in ("valueString", "valueUri", "valueCode"):
            value = raw
        else:
            raise error(400, "not-supported", f"{op}: {name} cannot be given in the URL")
        values.setdefault(name, []).append(value)
    _cardinality(values, specs, op)
    return values


def _no_query(request: Request, op: str) -> None:
    """400 for URL parameters on a POSTed operation (its parameters are in the body)."""
    for name in request.query_params:
        if name not in _RESULT_PARAMS:
            raise error(
                400, "not-supported", f"{op} takes its parameters in the body; {name!r} in the URL"
            )


async def _body(request: Request) -> object:
    check_content_type(request)
    return parse_json(await read_body(request, request.app.state.settings.max_body_bytes))


def _first(values: Inputs, name: str, default: Any = None) -> Any:
    found = values.get(name)
    return found[0] if found else default


# ---------------------------------------------------------------------- helpers
def _mpi(request: Request) -> PatientIndex:
    return request.app.state.mpi


def _steward(principal: Principal, op: str) -> None:
    """403 unless the caller may change Patients and is a data steward or administrator."""
    require(principal, "u", "Patient")
    if not principal.has(ADMIN):
        require_role(principal, STEWARD, op)


def _body_of(version: Version) -> dict:
    return jsonio.loads(version.body, trusted=True)


def _reference_id(value: dict, name: str, base: str) -> str:
    """The Patient id a Reference parameter names: ``Patient/<id>`` or ``<base>/Patient/<id>``."""
    ref = value.get("reference")
    if not isinstance(ref, str) or not ref:
        raise error(400, "required", f"{name} must be a Reference with a reference (Patient/<id>)")
    path = ref.removeprefix(base + "/")
    type_, _, id_ = path.partition("/")
    if type_ != "Patient":
        raise error(400, "invalid", f"{name} must reference a Patient, not {ref!r}")
    if not valid_id(id_):
        raise error(400, "value", f"{name}: {ref!r} is not a valid Patient reference")
    return id_


async def _patient(request: Request, id_: str, name: str) -> Version:
    """The current Patient ``id_`` a parameter names: 422 if unknown or deleted."""
    found = await request.app.state.store.read("Patient", id_)
    if found is None or found.deleted:
        state = "was deleted" if found is not None else "is not known"
        raise error(422, "not-found", f"{name}: Patient/{id_} {state}")
    return found


async def _referenced(request: Request, values: Inputs, name: str) -> Version:
    return await _patient(request, _reference_id(values[name][0], name, base_url(request)), name)


async def _commit(
    request: Request,
    trail: Trail,
    coding: dict,
    plan: Callable[[], Awaitable[list[Write]]],
    named: Sequence[str] = (),
) -> list[Write]:
    """Plan under the engine's lock and commit with one AuditEvent naming the patients
    written (and ``named``); a concurrent change re-plans."""
    mpi = _mpi(request)
    for attempt in range(RETRIES):
        if attempt:
            await backoff(attempt)
        async with mpi.serial():
            writes = await plan()
            event = trail.event(
                "operation", status=200, subtype_coding=coding, **_touched(writes, named)
            )
            try:
                await trail.commit(writes, [event])
                return writes
            except (VersionConflict, ConditionConflict):
                continue  # another process changed what the plan read: plan again
    raise error(409, "conflict", "The patient index is being changed concurrently; retry")


def _touched(writes: Sequence[Write], named: Sequence[str] = ()) -> dict:
    patients = [w for w in writes if w.type == "Patient"]
    return {
        "resources": [f"Patient/{w.id}/_history/{w.version}" for w in patients],
        "patients": [*named, *(f"Patient/{w.id}" for w in patients)],
    }


def _written(writes: Sequence[Write], id_: str) -> Version | None:
    for w in writes:
        if w.type == "Patient" and w.id == id_ and w.body is not None:
            return Version(w.type, w.id, w.version, w.last_updated, w.method, w.body)
    return None


async def _current(request: Request, writes: Sequence[Write], id_: str) -> Version | None:
    """Patient ``id_`` as ``writes`` leave it (or as stored, when they do not touch it)."""
    found = _written(writes, id_)
    if found is None:
        stored = await request.app.state.store.read("Patient", id_)
        found = stored if stored is not None and not stored.deleted else None
    return found


def _resources(principal: Principal, named: Sequence[tuple[str, Version | None]]) -> list[dict]:
    """``resource`` out parameters of the versions the caller may read."""
    versions = [v for _, v in named if v is not None]
    allowed = {id(v) for v in disclose(principal, "r", versions)}
    return [
        {"name": name, "resource": orjson.Fragment(v.body)}
        for name, v in named
        if v is not None and id(v) in allowed
    ]


def _result(message: str, *rest: dict) -> dict:
    return {
        "resourceType": "Parameters",
        "parameter": [{"name": "outcome", "resource": information(message)}, *rest],
    }


# ---------------------------------------------------------------------- $match
@router.post("/Patient/$match")
async def match(request: Request) -> Response:
    """PDQm ITI-119: the people a Patient's demographics match, best first."""

    async def run(principal: Principal, trail: Trail) -> dict:
        require(principal, "s", "Patient")
        _no_query(request, "$match")
        body = await _body(request)
        if isinstance(body, dict) and body.get("resourceType") == "Patient":
            values: Inputs = {"resource": [body]}  # PDQm: a bare Patient is allowed
            where = "Patient"
        else:
            values = _parameters(body, MATCH_PARAMS, "$match")
            index = next(i for i, p in enumerate(body["parameter"]) if p.get("name") == "resource")
            where = f"Parameters.parameter[{index}].resource"
        patient = values["resource"][0]
        if patient.get("resourceType") != "Patient":
            raise error(400, "invalid", "$match: resource must be a Patient", where)
        check_resource(patient, "Patient", where)
        for element in ("implicitRules", "modifierExtension"):
            if element in patient:
                raise error(422, "not-supported", f"$match does not accept {element} (PDQm)", where)
        only_certain = _first(values, "onlyCertainMatches", False)
        count = _first(values, "count")
        if count is not None and count < 1:
            raise error(400, "invalid", f"$match: count must be a positive integer, got {count}")
        settings = request.app.state.settings
        limit = min(count or settings.default_count, settings.max_count)
        results = await _mpi(request).match(
            patient, count=None if only_certain else limit, only_certain=only_certain
        )
        notes: list[Issue] = []
        if not _mpi(request).normalize(patient).identifying:
            notes.append(
                Issue(
                    "incomplete",
                    "The Patient has nothing to match a person by (an ID number, a phone, "
                    "or a name with a birth date or an address)",
                    "warning",
                )
            )
        if only_certain:
            certain = [r for r in results if r.grade == _CERTAIN]
            if len(certain) > 1:
                notes.append(
                    Issue(
                        "multiple-matches",
                        f"{len(certain)} people match with certainty; with onlyCertainMatches "
                        "none is returned",
                        "information",
                    )
                )
                certain = []
            results = certain
        results = results[:limit]
        shown = disclose(principal, "s", [r.golden for r in results])
        allowed = {v.id for v in shown}
        results = [r for r in results if r.golden.id in allowed]
        base = base_url(request)
        query = {"onlyCertainMatches": only_certain, "count": count}
        query_text = urlencode({k: str(v).lower() for k, v in query.items() if v is not None})
        query_text = f"Patient/$match?{query_text}".rstrip("?")
        bundle = _searchset(f"{base}/Patient/$match", len(results))
        entries = [_match_entry(r, base) for r in results] + [
            {"resource": outcome([note]), "search": {"mode": "outcome"}} for note in notes
        ]
        if entries:  # FHIR JSON has no empty arrays
            bundle["entry"] = entries
        await trail.record(
            trail.event(
                "operation",
                status=200,
                subtype_coding=MATCH,
                query=query_text,
                resources=[f"Patient/{v.id}/_history/{v.version}" for v in shown],
                patients=[f"Patient/{v.id}" for v in shown],
            )
        )
        return bundle

    fmt, bundle = await operation(request, MATCH, run)
    return fhir_response(200, bundle, fmt)


def _searchset(url: str, total: int) -> dict:
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": to_fhir_instant(now())},
        "type": "searchset",
        "total": total,
        "link": [{"relation": "self", "url": url}],
    }


def _match_entry(result: MatchResult, base: str) -> dict:
    golden = result.golden
    detail = [
        {"url": "record", "valueReference": {"reference": f"Patient/{result.record_id}"}},
        {"url": "weight", "valueDecimal": round(result.weight, 3)},
    ]
    for part in result.explanation:
        detail.append(
            {
                "url": "field",
                "extension": [
                    {"url": "name", "valueCode": part["field"]},
                    {"url": "level", "valueCode": part["level"]},
                    {"url": "weight", "valueDecimal": round(part["weight"], 3)},
                ],
            }
        )
    return {
        "fullUrl": f"{base}/Patient/{golden.id}",
        "resource": orjson.Fragment(golden.body),
        "search": {
            "extension": [
                {"url": MATCH_GRADE, "valueCode": result.grade},
                {"url": MATCH_DETAIL, "extension": detail},
            ],
            "mode": "match",
            "score": round(min(max(result.probability, 0.0), 1.0), 6),
        },
    }


# ---------------------------------------------------------------------- $ihe-pix
@router.get("/Patient/$ihe-pix")
@router.post("/Patient/$ihe-pix")
async def pix(request: Request) -> Response:
    """PIXm ITI-83: the identifiers and records of the person behind ``sourceIdentifier``."""

    async def run(principal: Principal, trail: Trail) -> dict:
        require(principal, "s", "Patient")
        if request.method == "GET":
            values = _query(request, PIX_PARAMS, "$ihe-pix")
        else:
            _no_query(request, "$ihe-pix")
            values = _parameters(await _body(request), PIX_PARAMS, "$ihe-pix")
        base = base_url(request)
        system, value = _source_identifier(values["sourceIdentifier"][0])
        targets = [_target_system(t) for t in values.get("targetSystem", ())]
        if not await _known_domain(request, system, base):
            raise error(400, "code-invalid", "sourceIdentifier Assigning Authority not found")
        for target in targets:
            if not await _known_domain(request, target, base):
                raise error(403, "code-invalid", "targetSystem not found")
        mpi = _mpi(request)
        if system == base:
            type_, _, id_ = value.partition("/")
            if type_ != "Patient" or not valid_id(id_):
                raise error(404, "not-found", "sourceIdentifier Patient Identifier not found")
            stored = await request.app.state.store.read("Patient", id_)
            sources = [id_] if stored is not None and not stored.deleted else []
        else:
            sources = await mpi.by_identifier(system, value)
        if not sources:
            raise error(404, "not-found", "sourceIdentifier Patient Identifier not found")
        people = {}
        for id_ in sources:
            person = await mpi.person(id_)
            people[person.golden if person is not None else f"unindexed:{id_}"] = person
        if len(people) > 1:
            raise error(
                409,
                "multiple-matches",
                "sourceIdentifier identifies records of several people; a data steward must "
                "resolve them first",
            )
        person = next(iter(people.values()))
        members = list(person.members) if person is not None else list(sources)
        golden = person.golden if person is not None else None
        ids = list(dict.fromkeys([*members, *([golden] if golden else [])]))
        versions = disclose(principal, "s", await request.app.state.store.read_many("Patient", ids))
        result = _cross_references(versions, golden, set(sources), (system, value), targets, base)
        query = urlencode(
            [("sourceIdentifier", f"{system}|{value}"), *(("targetSystem", t) for t in targets)]
        )
        await trail.record(
            trail.event(
                "operation",
                status=200,
                subtype_coding=PIX,
                query=f"Patient/$ihe-pix?{query}",
                resources=[f"Patient/{v.id}/_history/{v.version}" for v in versions],
                patients=[f"Patient/{v.id}" for v in versions],
            )
        )
        return result

    fmt, result = await operation(request, PIX, run)
    return fhir_response(200, result, fmt)


def _source_identifier(raw: object) -> tuple[str, str]:
    """``system|value`` of a sourceIdentifier token (or Identifier); 400 if it lacks either."""
    if isinstance(raw, dict):
        system, value = raw.get("system"), raw.get("value")
    elif len(raw) > _MAX_TOKEN:
        raise error(400, "too-long", f"sourceIdentifier is longer than {_MAX_TOKEN} characters")
    else:
        pieces = split(raw, "|", 1)
        system, value = (unescape(p) for p in pieces) if len(pieces) == 2 else (None, None)
    if not isinstance(system, str) or not isinstance(value, str) or not system or not value:
        raise error(
            400,
            "invalid",
            "sourceIdentifier must name the assigning authority and the value: system|value",
        )
    if len(system) + len(value) > _MAX_TOKEN:
        raise error(400, "too-long", f"sourceIdentifier is longer than {_MAX_TOKEN} characters")
    return system, value


def _target_system(raw: str) -> str:
    if not raw or len(raw) > _MAX_TOKEN or any(c.isspace() for c in raw):
        raise error(400, "invalid", f"targetSystem must be a URI, got {raw[:100]!r}")
    return raw


async def _known_domain(request: Request, system: str, base: str) -> bool:
    """Whether ``system`` is a Patient identifier domain this server knows: the enterprise
    id, this server's base URL (logical ids), or a system some Patient's identifier uses."""
    if system in (ENTERPRISE_ID_SYSTEM, base):
        return True
    query = (Match("identifier", (Cond("system", "eq", system),)),)
    return bool(await request.app.state.store.any_ids("Patient", query, limit=1))


def _cross_references(
    versions: list[Version],
    golden: str | None,
    sources: set[str],
    source: tuple[str, str],
    targets: list[str],
    base: str,
) -> dict:
    """The ITI-83 answer: identifiers of the person's records (not the one asked about) and
    references to its records other than those carrying the source identifier."""
    wanted = set(targets)
    identifiers: dict[tuple[str, str], dict] = {}
    references = []
    for v in versions:
        resource = _body_of(v)
        is_source = v.id in sources and (
            v.id != golden or source[0] in (ENTERPRISE_ID_SYSTEM, base)
        )
        carries = False
        for ident in resource.get("identifier") or ():
            system, value = ident.get("system"), ident.get("value")
            if not isinstance(system, str) or not isinstance(value, str):
                continue  # without an assigning authority it means nothing elsewhere
            if wanted and system not in wanted:
                continue
            carries = True
            if (system, value) != source:
                identifiers.setdefault(
                    (system, value),
                    {k: ident[k] for k in ("use", "type", "system", "value") if k in ident},
                )
        if v.id == golden:
            carries = not wanted or bool(wanted & {ENTERPRISE_ID_SYSTEM, base})
        elif base in wanted:
            carries = True
        if not is_source and carries:
            references.append(
                {"name": "targetId", "valueReference": {"reference": f"Patient/{v.id}"}}
            )
    found = [
        *({"name": "targetIdentifier", "valueIdentifier": i} for i in identifiers.values()),
        *references,
    ]
    return {"resourceType": "Parameters", **({"parameter": found} if found else {})}


# ---------------------------------------------------------------------- linking
@router.post("/Patient/$mpi-link")
async def link(request: Request) -> Response:
    """Link a member record to a golden record by hand (a data steward's decision)."""

    async def run(principal: Principal, trail: Trail) -> dict:
        _steward(principal, "$mpi-link")
        _no_query(request, "$mpi-link")
        values = _parameters(await _body(request), LINK_PARAMS, "$mpi-link")
        record = await _referenced(request, values, "patient")
        golden = await _referenced(request, values, "golden")
        if is_golden(_body_of(record)):
            raise error(
                422,
                "business-rule",
                f"patient: Patient/{record.id} is a golden record; "
                "link member records to it, or $merge two golden records",
            )
        if not is_golden(_body_of(golden)):
            raise error(422, "business-rule", f"golden: Patient/{golden.id} is not a golden record")
        reason = _first(values, "reason", "")
        writes = await _commit(
            request,
            trail,
            LINK,
            lambda: _mpi(request).plan_link(principal, record.id, golden.id, reason),
            [f"Patient/{record.id}", f"Patient/{golden.id}"],
        )
        return _result(
            f"Patient/{record.id} is linked to golden record Patient/{golden.id}",
            *_resources(
                principal,
                [
                    ("patient", await _current(request, writes, record.id)),
                    ("golden", await _current(request, writes, golden.id)),
                ],
            ),
        )

    fmt, result = await operation(request, LINK, run)
    return fhir_response(200, result, fmt)


@router.post("/Patient/$mpi-unlink")
async def unlink(request: Request) -> Response:
    """Detach a member record from its golden record; it gets a golden record of its own."""

    async def run(principal: Principal, trail: Trail) -> dict:
        _steward(principal, "$mpi-unlink")
        _no_query(request, "$mpi-unlink")
        values = _parameters(await _body(request), UNLINK_PARAMS, "$mpi-unlink")
        record = await _referenced(request, values, "patient")
        resource = _body_of(record)
        if is_golden(resource):
            raise error(
                422,
                "business-rule",
                f"patient: Patient/{record.id} is a golden record, not a member record",
            )
        previous = golden_of_member(resource)
        if previous is None:
            raise error(
                422,
                "business-rule",
                f"patient: Patient/{record.id} is not linked to a golden record",
            )
        reason = _first(values, "reason", "")
        writes = await _commit(
            request,
            trail,
            UNLINK,
            lambda: _mpi(request).plan_unlink(principal, record.id, reason),
            [f"Patient/{record.id}", f"Patient/{previous}"],
        )
        after = await _current(request, writes, record.id)
        golden = golden_of_member(_body_of(after)) if after is not None else None
        return _result(
            f"Patient/{record.id} is no longer linked to Patient/{previous}"
            + (f"; its golden record is Patient/{golden}" if golden else ""),
            *_resources(
                principal,
                [
                    ("patient", after),
                    ("golden", await _current(request, writes, golden) if golden else None),
                    ("previous", await _current(request, writes, previous)),
                ],
            ),
        )

    fmt, result = await operation(request, UNLINK, run)
    return fhir_response(200, result, fmt)


# ---------------------------------------------------------------------- merge
@router.post("/Patient/$merge")
async def merge(request: Request) -> Response:
    """Merge ``source-patient`` into ``target-patient`` (FHIR R5 Patient-merge): two golden
    records, or two member records of one member organisation."""

    async def run(principal: Principal, trail: Trail) -> dict:
        _steward(principal, "$merge")
        _no_query(request, "$merge")
        body = await _body(request)
        values = _parameters(body, MERGE_PARAMS, "$merge")
        if "result-patient" in values:
            raise error(
                422,
                "not-supported",
                "result-patient is not supported: the surviving record's content is kept "
                "(a golden record's by survivorship from its member records)",
            )
        for role in ("source", "target"):
            if f"{role}-patient" not in values and f"{role}-patient-identifier" not in values:
                raise error(
                    400, "required", f"$merge needs {role}-patient or {role}-patient-identifier"
                )
        source = await _party(request, values, "source")
        target = await _party(request, values, "target")
        if source.id == target.id:
            raise error(422, "business-rule", f"Patient/{source.id} cannot be merged into itself")
        source_golden, target_golden = is_golden(_body_of(source)), is_golden(_body_of(target))
        if source_golden != target_golden:
            raise error(
                422,
                "business-rule",
                "source-patient and target-patient must both be golden records or both member "
                "records",
            )
        mpi = _mpi(request)

        def plan() -> Awaitable[list[Write]]:
            return mpi.plan_merge(principal, source.id, target.id)

        if _first(values, "preview", False):
            async with mpi.serial():
                writes = await plan()
            await trail.record(
                trail.event(
                    "operation",
                    status=200,
                    subtype_coding=MERGE,
                    detail="preview: nothing was changed",
                    patients=[f"Patient/{source.id}", f"Patient/{target.id}"],
                )
            )
            message = f"Preview: Patient/{source.id} would be merged into Patient/{target.id}"
        else:
            writes = await _commit(
                request, trail, MERGE, plan, [f"Patient/{source.id}", f"Patient/{target.id}"]
            )
            message = f"Patient/{source.id} was merged into Patient/{target.id}"
        moved = [w.id for w in writes if w.type == "Patient" and w.id not in (source.id, target.id)]
        if moved:
            message += f"; {len(moved)} member record(s) now link to Patient/{target.id}"
        return _result(
            message,
            {"name": "input", "resource": body},
            *_resources(principal, [("result", await _current(request, writes, target.id))]),
        )

    fmt, result = await operation(request, MERGE, run)
    return fhir_response(200, result, fmt)


async def _party(request: Request, values: Inputs, role: str) -> Version:
    """The source or target Patient, by reference and/or identifiers (which must all be on
    one Patient, the one referenced if both are given)."""
    ref_name, ident_name = f"{role}-patient", f"{role}-patient-identifier"
    identifiers = []
    for ident in values.get(ident_name, ()):
        system, value = ident.get("system"), ident.get("value")
        if not isinstance(system, str) or not isinstance(value, str):
            raise error(400, "invalid", f"{ident_name} needs a system and a value")
        identifiers.append((system, value))
    found = await _referenced(request, values, ref_name) if ref_name in values else None
    if not identifiers:
        if found is None:
            raise error(400, "required", f"$merge needs {ref_name} or {ident_name}")
        return found
    ids: set[str] = set()
    for i, (system, value) in enumerate(identifiers):
        carrying = set(await _mpi(request).by_identifier(system, value))
        ids = carrying if i == 0 else ids & carrying
    if found is not None:
        if found.id not in ids:
            raise error(
                422,
                "business-rule",
                f"{ident_name} does not identify {ref_name} Patient/{found.id}",
            )
        return found
    if len(ids) > 1:  # golden records carry their members' identifiers too
        stored = await request.app.state.store.read_many("Patient", sorted(ids))
        ids = {v.id for v in stored if not is_golden(_body_of(v))} or ids
    if len(ids) != 1:
        state = "no" if not ids else "more than one"
        raise error(422, "not-found", f"{ident_name} identifies {state} Patient")
    return await _patient(request, next(iter(ids)), ident_name)


@router.post("/Patient/$unmerge")
async def unmerge(request: Request) -> Response:
    """Undo a merge: ``source-patient`` and the record it was merged into are restored as
    they were, member records moved back (new versions: history is kept)."""

    async def run(principal: Principal, trail: Trail) -> dict:
        _steward(principal, "$unmerge")
        _no_query(request, "$unmerge")
        values = _parameters(await _body(request), UNMERGE_PARAMS, "$unmerge")
        source = await _referenced(request, values, "source-patient")
        target = next(
            (
                ref_id(link)
                for link in _body_of(source).get("link") or ()
                if isinstance(link, dict) and link.get("type") == REPLACED_BY
            ),
            None,
        )
        if target is None:
            raise error(422, "business-rule", f"source-patient: Patient/{source.id} is not merged")
        writes = await _commit(
            request,
            trail,
            UNMERGE,
            lambda: _mpi(request).plan_unmerge(principal, source.id),
            [f"Patient/{source.id}", f"Patient/{target}"],
        )
        return _result(
            f"The merge of Patient/{source.id} into Patient/{target} was undone",
            *_resources(
                principal,
                [
                    ("source", await _current(request, writes, source.id)),
                    ("target", await _current(request, writes, target)),
                ],
            ),
        )

    fmt, result = await operation(request, UNMERGE, run)
    return fhir_response(200, result, fmt)


# ---------------------------------------------------------------------- review queue
@router.get("/Patient/$mpi-review")
async def reviews(request: Request) -> Response:
    """The review queue: pairs the index could not decide, with their comparison."""

    async def run(principal: Principal, trail: Trail) -> dict:
        require(principal, "r", "Patient")
        if not principal.has(ADMIN):
            require_role(principal, STEWARD, "$mpi-review")
        values = _query(request, REVIEW_QUERY, "$mpi-review")
        status = _first(values, "status", "open")
        if status not in REVIEW_STATUSES:
            raise error(
                400,
                "invalid",
                f"status must be one of {', '.join(REVIEW_STATUSES)}, got {status!r}",
            )
        settings = request.app.state.settings
        count = min(_first(values, "_count", settings.default_count), settings.max_count)
        offset = _first(values, "_offset", 0)
        items, total = await _mpi(request).reviews(status, count, offset)
        paging = {"status": status, "_count": count, "_offset": offset}
        patients = []
        for item in items:
            patients += [f"Patient/{item['record']}", f"Patient/{item['candidate']}"]
        await trail.record(
            trail.event(
                "operation",
                status=200,
                subtype_coding=REVIEW,
                query=f"Patient/$mpi-review?{urlencode(paging)}",
                patients=patients,
            )
        )
        return {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "total", "valueInteger": total},
                *(_review(item) for item in items),
            ],
        }

    fmt, result = await operation(request, REVIEW, run)
    return fhir_response(200, result, fmt)


@router.post("/Patient/$mpi-resolve")
async def resolve(request: Request) -> Response:
    """A steward's decision on a review: ``same`` person (links the record to the golden
    record) or ``different`` people (the pair is never proposed or linked again)."""

    async def run(principal: Principal, trail: Trail) -> dict:
        _steward(principal, "$mpi-resolve")
        _no_query(request, "$mpi-resolve")
        values = _parameters(await _body(request), RESOLVE_PARAMS, "$mpi-resolve")
        key, decision = values["review"][0], values["decision"][0]
        if not valid_id(key):
            raise error(400, "value", f"review: {key[:100]!r} is not a review id")
        if decision not in _DECISIONS:
            raise error(
                400, "invalid", f"decision must be same or different, got {decision[:100]!r}"
            )
        stored = await request.app.state.store.read(REVIEW_TYPE, key)
        if stored is None or stored.deleted:
            raise error(422, "not-found", f"review: there is no review {key}")
        item = _body_of(stored)
        pair = [f"Patient/{item['record']}", f"Patient/{item['candidate']}"]
        writes = await _commit(
            request,
            trail,
            RESOLVE,
            lambda: _mpi(request).plan_resolve(principal, key, decision),
            pair,
        )
        after = next((w for w in writes if w.type == REVIEW_TYPE and w.id == key), None)
        if after is not None and after.body is not None:
            item = jsonio.loads(after.body, trusted=True)
        verdict = "the same person" if decision == "same" else "different people"
        return _result(f"Review {key}: {pair[0]} and {pair[1]} are {verdict}", _review(item, key))

    fmt, result = await operation(request, RESOLVE, run)
    return fhir_response(200, result, fmt)


def _review(item: dict, key: str | None = None) -> dict:
    """One review item as a ``review`` parameter with parts."""
    record, candidate = item["record"], item["candidate"]
    parts: list[dict] = [
        {"name": "id", "valueString": key or item.get("id") or review_id(record, candidate)},
        {"name": "status", "valueCode": item.get("status", "open")},
        {"name": "record", "valueReference": {"reference": f"Patient/{record}"}},
        {"name": "candidate", "valueReference": {"reference": f"Patient/{candidate}"}},
    ]
    if item.get("candidateRecord"):
        parts.append(
            {
                "name": "candidateRecord",
                "valueReference": {"reference": f"Patient/{item['candidateRecord']}"},
            }
        )
    if item.get("probability") is not None:
        parts.append({"name": "score", "valueDecimal": round(float(item["probability"]), 6)})
    if item.get("weight") is not None:
        parts.append({"name": "weight", "valueDecimal": round(float(item["weight"]), 3)})
    if item.get("reason"):
        parts.append({"name": "reason", "valueString": str(item["reason"])})
    for field in item.get("explanation") or ():
        parts.append(
            {
                "name": "field",
                "part": [
                    {"name": "name", "valueCode": field["field"]},
                    {"name": "level", "valueCode": field["level"]},
                    {"name": "weight", "valueDecimal": round(float(field["weight"]), 3)},
                ],
            }
        )
    if item.get("decidedBy"):
        parts.append({"name": "decidedBy", "valueString": str(item["decidedBy"])})
    if item.get("decided"):
        parts.append({"name": "decided", "valueDateTime": str(item["decided"])})
    return {"name": "review", "part": parts}
