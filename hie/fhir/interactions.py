"""One dispatcher for every FHIR interaction, used by the HTTP routes and by the
entries of batch and transaction Bundles alike.

A :class:`Call` is an interaction parsed from a URL (method, type, id, version,
parameters, body and conditional headers). :func:`perform` runs it and returns an
:class:`Answer`, which the HTTP layer turns into a response and the Bundle processor
into an ``entry.response``.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson

from hie import jsonio
from hie.access.decision import overridden
from hie.access.principal import Principal
from hie.audit.trail import Trail
from hie.fhir.errors import error, information
from hie.fhir.search.dates import date_range, now, to_fhir_instant
from hie.fhir.search.params import non_negative
from hie.fhir.service import FhirService, Plan, Result, version_of
from hie.fhir.shaping import check_summary, parse_elements, shape
from hie.mpi.state import Pending
from hie.store import INTERNAL_TYPES, Page, Version, Write

Params = list[tuple[str, str]]
_HISTORY_PARAMS = frozenset(
    {"_count", "_offset", "_since", "_at", "_format", "_pretty", "_summary", "_elements"}
)
_STATUS_TEXT = {200: "200 OK", 201: "201 Created", 204: "204 No Content"}


@dataclass
class Call:
    """A FHIR interaction: ``GET Patient/1``, ``POST Observation``, ``PUT Patient?...``."""

    method: str
    type: str | None = None
    id: str | None = None
    vid: str | None = None
    history: bool = False
    search: bool = False
    #: Compartment search ``Patient/123/Observation``: (compartment type, id).
    compartment: tuple[str, str] | None = None
    params: Params = field(default_factory=list)
    body: Any = None
    if_match: int | None = None
    if_none_exist: Params | None = None
    prefer: dict[str, str] = field(default_factory=dict)


@dataclass
class Answer:
    """What an interaction produced: status, body and the version behind it."""

    status: int
    body: bytes | dict | None = None
    version: Version | None = None
    location: bool = False


def parse_url(method: str, url: str) -> Call:
    """Parse a relative FHIR URL (``Type``, ``Type/id``, ``Type/id/_history/v``,
    ``Type?query``, ``_history``, ``Type/_search``) into a :class:`Call`."""
    parts = urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    call = Call(method.upper(), params=parse_qsl(parts.query, keep_blank_values=True))
    if segments[:1] == ["_history"] and len(segments) == 1:
        call.history = True
        return call
    if not segments and method.upper() == "GET" and call.params:
        return call  # system-level search
    if segments == ["_search"]:
        call.search = True
        return call
    if not segments or len(segments) > 4:
        raise error(400, "invalid", f"Not a FHIR interaction URL: {url!r}")
    call.type = segments[0]
    rest = segments[1:]
    if rest == ["_history"]:
        call.history = True
    elif rest == ["_search"]:
        call.search = True
    elif len(rest) == 1:
        call.id = rest[0]
    elif len(rest) == 2 and rest[1] == "_history":
        call.id, call.history = rest[0], True
    elif len(rest) == 2 and not rest[1].startswith(("_", "$")):
        call.compartment = (segments[0], rest[0])
        call.type = rest[1]
    elif len(rest) == 3 and rest[1] == "_history":
        call.id, call.vid = rest[0], rest[2]
    elif rest:
        raise error(400, "invalid", f"Not a FHIR interaction URL: {url!r}")
    return call


def write_plan(
    service: FhirService,
    principal: Principal,
    call: Call,
    where: str = "",
    exclude: Collection[str] = (),
    pending: Pending | None = None,
) -> Callable[[], Awaitable[Plan]] | None:
    """The planner of a write interaction, or None when ``call`` only reads.
    ``exclude``: ids a condition must not match (deleted earlier in a transaction);
    ``pending``: the transaction's master patient index writes."""
    m, t, i = call.method, call.type, call.id
    if m == "POST" and t and not i and not call.search and not call.history:
        return lambda: service.plan_create(
            principal,
            t,
            call.body,
            call.if_none_exist,
            where=where,
            exclude=exclude,
            pending=pending,
        )
    if m not in ("PUT", "PATCH", "DELETE") or t is None or call.history or call.search:
        return None
    if call.vid is not None:
        raise error(405, "not-supported", f"{m} is not allowed on a specific version")

    def on_id(id_: str) -> Awaitable[Plan]:
        if m == "PUT":
            return service.plan_update(
                principal, t, id_, call.body, call.if_match, where=where, pending=pending
            )
        if m == "PATCH":
            return service.plan_patch(principal, t, id_, call.body, call.if_match, pending=pending)
        return service.plan_delete(principal, t, id_, call.if_match, pending=pending)

    if i is not None:
        return lambda: on_id(i)
    condition = criteria(call.params)

    async def on_none() -> Plan:
        if m == "PUT":  # spec: create, with the client's id if the body has one
            body_id = call.body.get("id") if isinstance(call.body, dict) else None
            if body_id is not None:
                return await service.plan_update(
                    principal, t, body_id, call.body, None, where=where, pending=pending
                )
            return await service.plan_create(principal, t, call.body, where=where, pending=pending)
        if m == "PATCH":
            raise error(404, "not-found", f"No {t} matches the condition")
        return None, Result(204, None, f"No {t} matched the condition; nothing deleted")

    async def on_match(id_: str) -> Plan:
        body_id = call.body.get("id") if isinstance(call.body, dict) else None
        if m == "PUT" and body_id is not None and body_id != id_:
            raise error(
                400,
                "invariant",
                f"The resource id {body_id!r} differs from the matched {t}/{id_}",
                f"{where or t}.id",
            )
        if m == "PUT" and isinstance(call.body, dict) and body_id is None:
            call.body = {**call.body, "id": id_}
        return await on_id(id_)

    return lambda: service.plan_conditional(principal, t, condition, on_match, on_none, exclude)


def criteria(params: Params) -> Params:
    """The search criteria of a conditional URL (result parameters dropped)."""
    return [(k, v) for k, v in params if k not in ("_format", "_pretty")]


def write_answer(result: Result, prefer: dict[str, str]) -> Answer:
    """The answer to a completed write, honouring ``Prefer: return``."""
    ret = prefer.get("return", "representation")
    version = result.version
    location = result.status == 201
    if ret == "OperationOutcome":
        status = 200 if result.status == 204 else result.status
        return Answer(status, information(result.message), version, location)
    if ret == "minimal" or version is None or version.deleted:
        return Answer(result.status, None, version, location)
    return Answer(result.status, version.body, version, location)


def interaction(call: Call) -> str:
    """The restful-interaction code of ``call`` (the AuditEvent subtype)."""
    m = call.method
    if call.history:
        return "history-instance" if call.id else "history-type" if call.type else "history-system"
    if m == "POST" and not call.search and call.type:
        return "create"
    if m in ("PUT", "PATCH", "DELETE"):
        return {"PUT": "update", "PATCH": "patch", "DELETE": "delete"}[m]
    if call.vid is not None:
        return "vread"
    if call.id is not None:
        return "read"
    if any(k == "_getpages" for k, _ in call.params):
        return "search"
    return "search-type" if call.type else "search-system"


def attempted(call: Call) -> list[str]:
    """The resource a call names (for the audit record of a failed interaction)."""
    return [f"{call.type}/{call.id}"] if call.type and call.id else []


async def perform(
    service: FhirService, principal: Principal, call: Call, base: str, trail: Trail
) -> Answer:
    """Run one interaction to completion (writes are committed on their own, each
    with its audit record; reads are recorded before they are answered)."""
    subtype = interaction(call)
    plan = write_plan(service, principal, call)
    if plan is not None:
        committed = False

        async def commit(writes: list[Write], result: Result) -> None:
            nonlocal committed
            touched = trail.touched(version_of(w) for w in writes if w.type not in INTERNAL_TYPES)
            await trail.commit(writes, [trail.event(subtype, status=result.status, **touched)])
            committed = True

        serial = call.type == "Patient"
        result = await service.run(plan, call.if_match is not None, commit, serial=serial)
        if not committed:  # nothing to write (an existing match, an absent resource)
            shown = [result.version] if result.version is not None else []
            touched = trail.touched(shown) if shown else {"resources": attempted(call)}
            await trail.record(trail.event(subtype, status=result.status, **touched))
        return write_answer(result, call.prefer)
    if call.method not in ("GET", "HEAD") and not (call.method == "POST" and call.search):
        raise error(405, "not-supported", f"{call.method} is not supported on this URL")
    summary = check_summary(_param(call.params, "_summary"))
    elements = parse_elements(_param(call.params, "_elements"))
    if call.history:
        bundle, shown = await _history(service, principal, call, base, summary, elements)
    elif call.id is not None:
        if call.vid is not None:
            found = await service.vread(principal, call.type, call.id, call.vid)
        else:
            found = await service.read(principal, call.type, call.id)
        await trail.record(trail.event(subtype, status=200, **trail.touched([found])))
        return Answer(200, _shaped(found.body, summary, elements), found)
    else:
        bundle, shown = await _search(service, principal, call, base, summary, elements)
    query = f"{call.type or ''}?{urlencode(call.params)}"
    await trail.record(trail.event(subtype, status=200, query=query, **trail.touched(shown)))
    return Answer(200, bundle)


async def _search(
    service: FhirService,
    principal: Principal,
    call: Call,
    base: str,
    summary: str | None,
    elements: frozenset[str] | None,
) -> tuple[dict, list[Version]]:
    """A searchset Bundle (type, system, compartment search or a later page) and the
    resources it shows."""
    key = _param(call.params, "_getpages")
    if key is not None:
        offset = _int_param(call.params, "_getpagesoffset", 0)
        count = min(
            _int_param(call.params, "_count", service.settings.default_count),
            service.settings.max_count,
        )
        found, includes = await service.search_page(principal, key, offset, count, call.params)
        used = [(k, v) for k, v in call.params if k in _CARRIED]
        self_url = _page_url(base, key, offset, count, used)
    else:
        strict = call.prefer.get("handling") == "strict"
        req = service.parse(
            call.type, call.params, strict=strict, base=base, compartment=call.compartment
        )
        if summary == "count":
            req.count = 0
        found = await service.search(principal, call.type, req, call.compartment, base)
        includes = req.includes
        used = [(k, v) for k, v in req.used if k in _CARRIED]
        path = "/".join(p for p in (base, *(call.compartment or ()), call.type) if p)
        applied = [(k, v) for k, v in req.used if k not in ("_count", "_offset")]
        if call.type is None and (types := _param(call.params, "_type")):
            applied.insert(0, ("_type", types))
        query = [*applied, ("_count", str(found.count))]
        if found.offset:
            query.append(("_offset", str(found.offset)))
        self_url = f"{path}?{urlencode(query)}"
    if includes and found.matches:
        found.included = await service.include(principal, found.matches, includes)
    bundle = _shell("searchset", found.total)
    if security := overridden(principal):
        bundle["meta"]["security"] = security
    links = [{"relation": "self", "url": self_url}]
    if found.snapshot and found.count:

        def page(relation: str, off: int) -> dict:
            return {
                "relation": relation,
                "url": _page_url(base, found.snapshot, off, found.count, used),
            }

        links.append(page("first", 0))
        if found.offset > 0:
            links.append(page("previous", max(found.offset - found.count, 0)))
        if found.more:
            links.append(page("next", found.offset + found.count))
    bundle["link"] = links
    bundle["entry"] = [
        _search_entry(v, base, "match", summary, elements) for v in found.matches
    ] + [_search_entry(v, base, "include", summary, elements) for v in found.included]
    return bundle, found.matches + found.included


#: Result parameters that later pages of a search keep applying.
_CARRIED = (
    "_include",
    "_revinclude",
    "_include:iterate",
    "_revinclude:iterate",
    "_summary",
    "_elements",
    "_total",
)


def _page_url(base: str, key: str, offset: int, count: int, carried: Params) -> str:
    query = [("_getpages", key), ("_getpagesoffset", str(offset)), ("_count", str(count))]
    return f"{base}?{urlencode(query + list(carried))}"


def _search_entry(v: Version, base: str, mode: str, summary, elements) -> dict:
    return {
        "fullUrl": f"{base}/{v.type}/{v.id}",
        "resource": _fragment(v.body, summary, elements),
        "search": {"mode": mode},
    }


def _param(params: Params, name: str) -> str | None:
    values = [v for k, v in params if k == name]
    if len(values) > 1:
        raise error(400, "invalid", f"{name} may be given only once")
    return values[0] if values else None


def _shaped(body: bytes, summary: str | None, elements: frozenset[str] | None) -> bytes:
    if summary is None and elements is None:
        return body
    return jsonio.dumps(shape(jsonio.loads(body, trusted=True), summary, elements))


def _fragment(body: bytes, summary: str | None, elements: frozenset[str] | None):
    return orjson.Fragment(_shaped(body, summary, elements))


async def _history(
    service: FhirService,
    principal: Principal,
    call: Call,
    base: str,
    summary: str | None,
    elements: frozenset[str] | None,
) -> tuple[dict, list[Version]]:
    """A history Bundle and the versions it shows."""
    for key, _ in call.params:
        if key not in _HISTORY_PARAMS:
            raise error(400, "not-supported", f"Unknown history parameter {key!r}")
    count = _int_param(call.params, "_count", service.settings.default_count)
    count = min(count, service.settings.max_count)
    offset = _int_param(call.params, "_offset", 0)
    since = _instant_param(call.params, "_since", 0)
    # _at: the versions current at the end of the value's precision, so that a
    # millisecond meta.lastUpdated covers the microsecond instant stored.
    at = _instant_param(call.params, "_at", 1)
    page = await service.history(
        principal, call.type, call.id, since=since, at=at, count=count, offset=offset
    )
    path = "/".join(p for p in (base, call.type, call.id) if p) + "/_history"
    used = [(k, v) for k, v in call.params if k in ("_since", "_at", "_summary", "_elements")]
    bundle = _bundle("history", page, path, used, count, offset)
    if principal.consent is not None:  # the store's count includes withheld versions
        bundle.pop("total", None)
    bundle["entry"] = [_history_entry(v, base, summary, elements) for v in page.items]
    return bundle, page.items


def _history_entry(v: Version, base: str, summary, elements) -> dict:
    entry: dict = {"fullUrl": f"{base}/{v.type}/{v.id}"}
    if v.body is not None:
        entry["resource"] = _fragment(v.body, summary, elements)
    url = v.type if v.method == "POST" else f"{v.type}/{v.id}"
    entry["request"] = {"method": v.method, "url": url}
    status = {"POST": "201 Created", "DELETE": "204 No Content"}.get(v.method, "200 OK")
    entry["response"] = {
        "status": status,
        "etag": f'W/"{v.version}"',
        "lastModified": to_fhir_instant(v.last_updated),
    }
    return entry


def _int_param(params: Params, name: str, default: int) -> int:
    value = _param(params, name)
    return default if value is None else non_negative(name, value)


def _instant_param(params: Params, name: str, end: int) -> str | None:
    """The low (``end=0``) or high (``end=1``) instant of a date/time parameter."""
    value = _param(params, name)
    if value is None:
        return None
    try:
        return date_range(value)[end]
    except ValueError:
        raise error(400, "invalid", f"{name} must be a FHIR instant, got {value!r}") from None


def _shell(kind: str, total: int | None) -> dict:
    """An empty Bundle of ``kind`` with ``total`` (left out when None)."""
    bundle = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": to_fhir_instant(now())},
        "type": kind,
    }
    if total is not None:
        bundle["total"] = total
    return bundle


def _bundle(kind: str, page: Page, path: str, used: Params, count: int, offset: int) -> dict:
    """A history Bundle shell with total and offset paging links."""

    def link(relation: str, off: int) -> dict:
        query = [*used_filtered, ("_count", str(count)), ("_offset", str(off))]
        return {"relation": relation, "url": f"{path}?{urlencode(query)}"}

    used_filtered = [(k, v) for k, v in used if k not in ("_count", "_offset")]
    links = [link("self", offset)]
    if count:
        links.append(link("first", 0))
        if offset > 0:
            links.append(link("previous", max(offset - count, 0)))
        if offset + count < page.total:
            links.append(link("next", offset + count))
    return {**_shell(kind, page.total), "link": links}


def status_line(status: int) -> str:
    """``entry.response.status`` text for an HTTP status."""
    return _STATUS_TEXT.get(status, str(status))
