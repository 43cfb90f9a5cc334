"""Batch and transaction Bundles posted to the base URL.

Transaction (all or nothing): entries are processed in the order the spec gives
(DELETE, POST, PUT/PATCH, then GET/HEAD), ``urn:uuid:`` full URLs and conditional
references (``Patient?identifier=...``) are resolved first and rewritten wherever they
occur in the entries' resources, every write is planned against the current state and
then all are committed in one atomic store commit. Any failure fails the whole
transaction with an OperationOutcome naming the entry; only the reads (GET/HEAD), which
run after the commit so that they see its writes, answer a failure in their own entry.

Batch: each entry runs on its own; failures become that entry's response.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Collection
from typing import Any

import orjson

from hie.access.principal import Principal
from hie.audit.trail import Trail
from hie.fhir.errors import FhirError, Issue, error, outcome
from hie.fhir.http import parse_etag
from hie.fhir.interactions import (
    Answer,
    Call,
    attempted,
    criteria,
    interaction,
    parse_url,
    perform,
    status_line,
    write_answer,
    write_plan,
)
from hie.fhir.search.dates import now, to_fhir_instant
from hie.fhir.service import RETRIES, FhirService, backoff, new_id, version_of
from hie.fhir.validation import check_resource
from hie.mpi.state import Pending
from hie.store import INTERNAL_TYPES, ConditionConflict, VersionConflict

_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}


class _Entry:
    __slots__ = ("index", "call", "full_url", "where")

    def __init__(self, index: int, call: Call, full_url: str | None):
        self.index = index
        self.call = call
        self.full_url = full_url
        self.where = f"Bundle.entry[{index}].resource"


def _parse_entries(bundle: dict, base: str, prefer: dict[str, str]) -> list[_Entry]:
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise error(400, "structure", "Bundle.entry must be an array", "Bundle.entry")
    parsed = []
    for index, entry in enumerate(entries):
        where = f"Bundle.entry[{index}]"
        if not isinstance(entry, dict):
            raise error(400, "structure", "A Bundle entry must be an object", where)
        request = entry.get("request")
        if not isinstance(request, dict):
            raise error(400, "required", "Each entry needs a request", f"{where}.request")
        method, url = request.get("method"), request.get("url")
        if method not in _ORDER:
            raise error(
                400, "value", f"Unsupported request.method {method!r}", f"{where}.request.method"
            )
        if not isinstance(url, str) or not url:
            raise error(400, "required", "request.url is required", f"{where}.request.url")
        if url.startswith(base + "/"):
            url = url[len(base) + 1 :]
        try:
            call = parse_url(method, url)
        except FhirError as exc:  # name the entry: the URL alone may not identify it
            raise error(exc.status, "invalid", str(exc), f"{where}.request.url") from None
        call.body = entry.get("resource")
        call.prefer = prefer
        if method in ("POST", "PUT") and not isinstance(call.body, dict):
            raise error(400, "required", f"A {method} entry needs a resource", f"{where}.resource")
        if_match = request.get("ifMatch")
        if if_match is not None:
            call.if_match = parse_etag(str(if_match), f"{where}.request.ifMatch")
        if_none_exist = request.get("ifNoneExist")
        if if_none_exist is not None:
            call.if_none_exist = parse_url("GET", f"X?{if_none_exist}").params
        full_url = entry.get("fullUrl")
        parsed.append(_Entry(index, call, full_url if isinstance(full_url, str) else None))
    return parsed


def _response_entry(answer: Answer, base: str) -> dict:
    response: dict[str, Any] = {"status": status_line(answer.status)}
    v = answer.version
    if v is not None:
        if answer.location:
            response["location"] = f"{v.type}/{v.id}/_history/{v.version}"
        response["etag"] = f'W/"{v.version}"'
        response["lastModified"] = to_fhir_instant(v.last_updated)
    entry: dict[str, Any] = {}
    if v is not None and not v.deleted:
        entry["fullUrl"] = f"{base}/{v.type}/{v.id}"
    if isinstance(answer.body, bytes):
        entry["resource"] = orjson.Fragment(answer.body)
    elif isinstance(answer.body, dict):
        if answer.body.get("resourceType") == "OperationOutcome":
            response["outcome"] = answer.body
        else:
            entry["resource"] = answer.body
    entry["response"] = response
    return entry


def _shell(kind: str) -> dict:
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": to_fhir_instant(now())},
        "type": kind,
        "entry": [],
    }


async def process(
    service: FhirService,
    principal: Principal,
    bundle: Any,
    base: str,
    prefer: dict[str, str],
    trail: Trail,
) -> dict:
    """Process a batch or transaction Bundle and return the response Bundle. Each
    entry is audited; a transaction's records commit with its writes."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise error(400, "structure", "POST to the base URL takes a Bundle")
    kind = bundle.get("type")
    if kind not in ("batch", "transaction"):
        raise error(
            400, "value", f"Bundle.type must be batch or transaction, not {kind!r}", "Bundle.type"
        )
    if kind == "batch":
        entries = _parse_entries(bundle, base, prefer)
        response = await _batch(service, principal, entries, base, trail)
        await trail.record(trail.event("batch", status=200))
        return response
    for attempt in range(RETRIES):
        if attempt:
            await backoff(attempt)
        entries = _parse_entries(bundle, base, prefer)
        try:
            async with _serial(service, entries):
                return await _transaction(service, principal, entries, base, trail)
        except (ConditionConflict, VersionConflict):
            continue  # lost a race to a concurrent write: plan again on the new state
    raise error(409, "conflict", "The transaction kept losing races to concurrent writes; retry")


def _serial(service: FhirService, entries: list[_Entry]):
    """The master patient index's lock when the transaction writes a Patient (its
    planning and commit must not interleave with another's), else nothing."""
    writes_patient = any(
        e.call.type == "Patient" and e.call.method in ("POST", "PUT", "PATCH", "DELETE")
        for e in entries
    )
    if service.mpi is not None and writes_patient:
        return service.mpi.serial()
    return contextlib.nullcontext()


async def _batch(
    service: FhirService, principal: Principal, entries: list[_Entry], base: str, trail: Trail
) -> dict:
    response = _shell("batch-response")
    for entry in entries:
        try:
            if entry.call.type is None and not entry.call.history:
                raise error(400, "invalid", "Entries must address a resource type")
            answer = await perform(service, principal, entry.call, base, trail)
            response["entry"].append(_response_entry(answer, base))
        except FhirError as exc:
            await trail.failed(interaction(entry.call), exc, resources=attempted(entry.call))
            response["entry"].append(
                {"response": {"status": str(exc.status), "outcome": outcome(exc.issues)}}
            )
    return response


async def _transaction(
    service: FhirService, principal: Principal, entries: list[_Entry], base: str, trail: Trail
) -> dict:
    deleted = await _deletions(service, principal, entries)
    ids = await _resolve_identities(service, principal, entries, deleted)
    for entry in entries:
        if isinstance(entry.call.body, dict):
            entry.call.body = _rewrite(entry.call.body, ids)
            await _resolve_references(service, principal, entry, deleted)
    ordered = sorted(entries, key=lambda e: (_ORDER[e.call.method], e.index))
    answers: dict[int, Answer] = {}
    writes, touched, events = [], {}, []
    pending = Pending()
    for entry in ordered:
        call = entry.call
        if call.method in ("GET", "HEAD"):
            continue
        exclude = deleted.get(call.type or "", ())
        reserved = ids.get(entry.full_url or "", "")
        if call.method == "POST" and reserved:
            planner = _create_with_id(
                service, principal, entry, reserved.split("/", 1)[1], exclude, pending
            )
        else:
            planner = write_plan(service, principal, call, entry.where, exclude, pending)
            if planner is None:
                raise _at(
                    entry,
                    error(
                        400,
                        "not-supported",
                        f"{call.method} of this URL is not a write interaction",
                    ),
                )
        try:
            write, result = await planner()
        except FhirError as exc:
            raise _at(entry, exc) from None
        if write is not None:
            key = f"{write.type}/{write.id}"
            if key in touched:
                raise _at(
                    entry,
                    error(
                        400,
                        "duplicate",
                        f"{key} is also changed by entry "
                        f"{touched[key]}; a transaction may change a resource once",
                    ),
                )
            touched[key] = entry.index
            writes.append(write)
        shown = [version_of(write)] if write else [result.version] if result.version else []
        events.append(trail.event(interaction(call), status=result.status, **trail.touched(shown)))
        answers[entry.index] = write_answer(result, call.prefer)
    mpi = pending.writes()
    golden = [version_of(w) for w in mpi if w.type not in INTERNAL_TYPES]
    events.append(
        trail.event("transaction", status=200, **(trail.touched(golden) if golden else {}))
    )
    try:
        await trail.commit(writes + mpi, events)
    except VersionConflict as exc:
        index = touched.get(f"{exc.type}/{exc.id}")
        if index is not None and entries[index].call.if_match is not None:
            # The entry's ifMatch no longer holds: 412, as for a lone If-Match write.
            raise _at(entries[index], error(412, "conflict", f"Version conflict: {exc}")) from None
        raise
    for entry in ordered:
        if entry.call.method in ("GET", "HEAD"):
            try:
                answers[entry.index] = await perform(service, principal, entry.call, base, trail)
            except FhirError as exc:
                await trail.failed(interaction(entry.call), exc, resources=attempted(entry.call))
                # The writes are committed: failing the whole response now would report
                # a transaction that was in fact applied. The read answers in its entry.
                answers[entry.index] = Answer(exc.status, outcome(exc.issues))
    response = _shell("transaction-response")
    response["entry"] = [_response_entry(answers[e.index], base) for e in entries]
    return response


async def _deletions(
    service: FhirService, principal: Principal, entries: list[_Entry]
) -> dict[str, set[str]]:
    """The ids each DELETE entry removes, by type: DELETEs are processed first, so the
    transaction's conditional creates, updates and references must not see them."""
    deleted: dict[str, set[str]] = {}
    for entry in entries:
        call = entry.call
        if call.method != "DELETE" or call.type is None or call.history or call.search:
            continue
        if call.id is not None:
            deleted.setdefault(call.type, set()).add(call.id)
            continue
        try:
            _, found = await service.match(
                principal, call.type, criteria(call.params), members_only=True
            )
        except FhirError as exc:
            raise _at(entry, exc) from None
        if len(found) == 1:
            deleted.setdefault(call.type, set()).add(found[0].id)
    return deleted


def _create_with_id(
    service: FhirService,
    principal: Principal,
    entry: _Entry,
    id_: str,
    exclude: Collection[str],
    pending: Pending,
):
    call = entry.call
    return lambda: service.plan_create(
        principal,
        call.type,
        call.body,
        call.if_none_exist,
        id_=id_,
        where=entry.where,
        exclude=exclude,
        pending=pending,
    )


async def _resolve_identities(
    service: FhirService,
    principal: Principal,
    entries: list[_Entry],
    deleted: dict[str, set[str]],
) -> dict[str, str]:
    """Map each entry's fullUrl to the ``Type/id`` the resource will have."""
    ids: dict[str, str] = {}
    for entry in entries:
        call, full_url = entry.call, entry.full_url
        if not full_url or call.type is None:
            continue
        target = None
        try:
            if call.method == "POST":
                if call.if_none_exist is not None:
                    check_resource(call.body, call.type, entry.where)
                    _, found = await service.match(
                        principal,
                        call.type,
                        call.if_none_exist,
                        deleted.get(call.type, ()),
                        members_only=True,
                    )
                    if len(found) > 1:
                        raise error(
                            412, "duplicate", f"ifNoneExist matched several {call.type} resources"
                        )
                    target = found[0].id if found else None
                target = target or new_id()
            elif call.method == "PUT" and call.id is not None:
                target = call.id
            elif call.method == "PUT":
                _, found = await service.match(
                    principal,
                    call.type,
                    criteria(call.params),
                    deleted.get(call.type, ()),
                    members_only=True,
                )
                if len(found) > 1:
                    raise error(
                        412,
                        "multiple-matches",
                        f"The condition matched several {call.type} resources",
                    )
                target = found[0].id if found else (call.body or {}).get("id") or new_id()
                if not found:
                    call.id = target
                    call.body = {**call.body, "id": target}
        except FhirError as exc:
            raise _at(entry, exc) from None
        if target is not None:
            if full_url in ids:
                raise _at(entry, error(400, "duplicate", f"fullUrl {full_url} appears twice"))
            ids[full_url] = f"{call.type}/{target}"
    return ids


def _rewrite(node: Any, ids: dict[str, str]) -> Any:
    """Replace every string equal to a resolved fullUrl (references, canonical and
    uri elements) with the resource's ``Type/id``."""
    if isinstance(node, dict):
        return {k: _rewrite(v, ids) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite(v, ids) for v in node]
    if isinstance(node, str) and node in ids:
        return ids[node]
    return node


async def _resolve_references(
    service: FhirService, principal: Principal, entry: _Entry, deleted: dict[str, set[str]]
) -> None:
    """Replace conditional references (``Patient?identifier=...``) with the one resource
    they match; a ``urn:uuid:`` reference no entry resolves is an error."""
    refs: list[dict] = []
    _collect_references(entry.call.body, refs)
    for ref in refs:
        value = ref["reference"]
        if value.startswith("urn:uuid:"):
            raise _at(
                entry,
                error(
                    400,
                    "not-found",
                    f"Reference {value!r} matches no entry's fullUrl in this transaction",
                ),
            )
        head, sep, query = value.partition("?")
        if not sep or "/" in head or ":" in head or head.startswith("#"):
            continue
        params = parse_url("GET", value).params
        try:
            # A member's record first: its identifiers are also on its golden record,
            # which is the match only when nothing else is (an enterprise identifier).
            _, matches = await service.match(
                principal, head, params, deleted.get(head, ()), members_only=True
            )
            if not matches:
                _, matches = await service.match(principal, head, params, deleted.get(head, ()))
        except FhirError as exc:
            raise _at(entry, exc) from None
        if len(matches) != 1:
            what = "no" if not matches else "several"
            raise _at(
                entry,
                error(
                    412,
                    "not-found" if not matches else "multiple-matches",
                    f"Conditional reference {value!r} matched {what} resources; "
                    "it must match exactly one",
                ),
            )
        ref["reference"] = f"{head}/{matches[0].id}"


def _collect_references(node: Any, out: list[dict]) -> None:
    """Every object holding a string ``reference`` (a Reference), at any depth."""
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            out.append(node)
        for value in node.values():
            _collect_references(value, out)
    elif isinstance(node, list):
        for value in node:
            _collect_references(value, out)


def _at(entry: _Entry, exc: FhirError) -> FhirError:
    """Prefix an entry's error so the OperationOutcome says which entry failed."""
    issues = [
        Issue(
            i.code,
            f"Bundle.entry[{entry.index}]: {i.diagnostics}",
            i.severity,
            i.expression or (f"Bundle.entry[{entry.index}]",),
        )
        for i in exc.issues
    ]
    return FhirError(exc.status, issues, exc.headers)
