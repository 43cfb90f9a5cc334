"""HTTP routes of the FHIR REST API under ``/fhir``.

Each route authenticates the caller, turns the request into a
:class:`~hie.fhir.interactions.Call` and renders the
:class:`~hie.fhir.interactions.Answer`; the FHIR logic lives in the dispatcher.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from starlette.responses import Response

from hie.access import purpose
from hie.access.decision import require_purpose
from hie.access.principal import LOCAL_DEVELOPER, Principal
from hie.audit.events import REST, Where, operation_coding
from hie.audit.trail import Trail
from hie.fhir import bundles
from hie.fhir.capability import capability_statement
from hie.fhir.errors import FhirError, error
from hie.fhir.http import (
    JSON_PATCH,
    Format,
    check_content_type,
    fhir_response,
    negotiate,
    not_modified,
    parse_etag,
    prefer,
    read_body,
    version_headers,
)
from hie.fhir.interactions import Answer, Call, attempted, interaction, perform
from hie.fhir.service import FhirService, check_type
from hie.fhir.validation import parse_json

router = APIRouter(prefix="/fhir")
T = TypeVar("T")

#: Base URLs by the request attributes Starlette builds them from (building one costs
#: more than the rest of a read's routing); bounded, since clients choose the Host.
_BASE_URLS: dict[tuple, str] = {}
_BASE_URLS_LIMIT = 256


def base_url(request: Request) -> str:
    """The FHIR base URL as clients see it."""
    configured = request.app.state.settings.base_url
    if configured:
        return configured
    scope = request.scope
    server = scope.get("server")
    key = (
        scope.get("scheme"),
        tuple(server) if server else None,
        request.headers.get("host"),
        scope.get("app_root_path", scope.get("root_path", "")),
    )
    found = _BASE_URLS.get(key)
    if found is None:
        if len(_BASE_URLS) >= _BASE_URLS_LIMIT:
            _BASE_URLS.clear()
        found = _BASE_URLS[key] = f"{str(request.base_url).rstrip('/')}/fhir"
    return found


async def authenticate(request: Request, trail: Trail) -> Principal:
    """The caller (recorded in ``trail`` as soon as it is known): from the bearer
    token, or the local developer when auth is off, asking for the purpose of use the
    ``X-Purpose-Of-Use`` header names (400 if unknown, 403 for a break-glass purpose
    the client may not assert), with the patients' consent decisions for it."""
    if not request.app.state.settings.auth:
        principal = LOCAL_DEVELOPER
    else:
        principal = request.app.state.tokens.authenticate(request.headers.get("authorization"))
    trail.principal = principal
    header = request.headers.get(purpose.HEADER)
    if header is not None:
        principal = trail.principal = principal.for_purpose(purpose.parse_purpose(header))
    require_purpose(principal)
    view = await request.app.state.consents.view(principal)
    principal = trail.principal = principal.with_consent(view)
    return principal


def open_trail(request: Request) -> Trail:
    """The audit trail of a request."""
    state = request.app.state
    client = request.client
    where = Where(base_url(request), client.host if client else None)
    return Trail(state.audit, state.store, state.patient_links, where)


def _service(request: Request) -> FhirService:
    return request.app.state.service


async def _json_body(request: Request, allowed: set[str] | None = None) -> object:
    if allowed is None:
        check_content_type(request)
    else:
        check_content_type(request, allowed)
    return parse_json(await read_body(request, request.app.state.settings.max_body_bytes))


def _render(
    request: Request, answer: Answer, base: str, fmt: Format, read: bool = False
) -> Response:
    headers = version_headers(answer.version, base, answer.location)
    if read and answer.version is not None and not_modified(request, answer.version):
        return Response(status_code=304, headers=headers)
    return fhir_response(answer.status, answer.body, fmt, headers)


#: Reads a request's body into its Call (after the caller is authenticated).
Loader = Callable[[Request, Call], Awaitable[None]]


async def _load_resource(request: Request, call: Call) -> None:
    call.body = await _json_body(request)


async def _load_patch(request: Request, call: Call) -> None:
    call.body = await _json_body(request, {JSON_PATCH})


async def _load_form(request: Request, call: Call) -> None:
    call.params = await _form(request)


async def _run(request: Request, call: Call, read: bool = False, load: Loader | None = None):
    """Authenticate, read the body, perform the interaction and answer it; every
    outcome, refusals and failures included, leaves an audit record."""
    trail = open_trail(request)
    try:
        fmt = negotiate(request)
        principal = await authenticate(request, trail)
        if call.method in ("PUT", "PATCH", "DELETE"):
            call.if_match = _if_match(request)
        if load is not None:
            await load(request, call)
        call.prefer = prefer(request)
        base = base_url(request)
        answer = await perform(_service(request), principal, call, base, trail)
    except FhirError as exc:
        await trail.failed(interaction(call), exc, resources=attempted(call))
        raise
    return _render(request, answer, base, fmt, read)


async def operation(
    request: Request,
    coding: dict,
    run: Callable[[Principal, Trail], Awaitable[T]],
    kind: dict = REST,
) -> tuple[Format, T]:
    """Run an operation for the authenticated caller: ``run(principal, trail)``
    records its own success; a refusal or failure is recorded here (as ``kind``,
    subtype ``coding``)."""
    trail = open_trail(request)
    try:
        fmt = negotiate(request)
        principal = await authenticate(request, trail)
        return fmt, await run(principal, trail)
    except FhirError as exc:
        await trail.failed("operation", exc, subtype_coding=coding, kind=kind)
        raise


REINDEX = operation_coding("$reindex")


def _params(request: Request) -> list[tuple[str, str]]:
    return list(request.query_params.multi_items())


def _if_match(request: Request) -> int | None:
    return parse_etag(request.headers.get("if-match"), "If-Match")


@router.get("/metadata")
async def metadata(request: Request) -> Response:
    """The CapabilityStatement (public, as SMART requires)."""
    settings = request.app.state.settings
    return fhir_response(
        200,
        capability_statement(base_url(request), settings.auth, request.app.state.service.registry),
        negotiate(request),
    )


@router.post("")
@router.post("/")
async def batch_or_transaction(request: Request) -> Response:
    """Process a batch or transaction Bundle."""
    trail = open_trail(request)
    kind = "batch"
    try:
        fmt = negotiate(request)
        principal = await authenticate(request, trail)
        bundle = await _json_body(request)
        if isinstance(bundle, dict) and bundle.get("type") == "transaction":
            kind = "transaction"
        base = base_url(request)
        result = await bundles.process(
            _service(request), principal, bundle, base, prefer(request), trail
        )
    except FhirError as exc:
        await trail.failed(kind, exc)
        raise
    return fhir_response(200, result, fmt)


@router.get("")
@router.get("/")
async def search_system(request: Request) -> Response:
    """System-level search (``?_type=``) and the later pages of every search."""
    return await _run(request, Call("GET", params=_params(request)))


@router.post("/_search")
async def search_system_post(request: Request) -> Response:
    """System-level search with form-encoded parameters."""
    return await _run(request, Call("POST", search=True), load=_load_form)


@router.post("/$reindex")
async def reindex_all(request: Request) -> Response:
    """Rebuild the search index of every type (after adding a SearchParameter)."""
    return await _reindex(request, None)


@router.post("/{type_}/$reindex")
async def reindex_type(request: Request, type_: str) -> Response:
    """Rebuild the search index of one type."""
    return await _reindex(request, type_)


async def _reindex(request: Request, type_: str | None) -> Response:
    async def run(principal: Principal, trail: Trail) -> tuple[int, list[str]]:
        if type_ is not None:
            check_type(type_)
        for key, _ in _params(request):
            if key not in ("_format", "_pretty"):
                raise error(400, "not-supported", f"Unknown parameter {key!r} for $reindex")
        found = await _service(request).reindex(principal, type_)
        await trail.record(trail.event("operation", status=200, subtype_coding=REINDEX))
        return found

    fmt, (done, skipped) = await operation(request, REINDEX, run)
    result = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "type", "valueString": type_ or "*"},
            {"name": "resources", "valueInteger": done},
            *({"name": "skipped", "valueString": reason} for reason in skipped),
        ],
    }
    return fhir_response(200, result, fmt)


async def _form(request: Request) -> list[tuple[str, str]]:
    check_content_type(request, {"application/x-www-form-urlencoded"})
    body = await read_body(request, request.app.state.settings.max_body_bytes)
    try:
        form = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise error(400, "invalid", "The _search body is not form-encoded") from None
    return _params(request) + form


@router.get("/_history")
async def history_system(request: Request) -> Response:
    """History of every resource on the server."""
    return await _run(request, Call("GET", history=True, params=_params(request)))


@router.get("/{type_}")
async def search(request: Request, type_: str) -> Response:
    """Search (GET)."""
    return await _run(request, Call("GET", type_, params=_params(request)))


@router.post("/{type_}/_search")
async def search_post(request: Request, type_: str) -> Response:
    """Search (POST with form-encoded parameters, merged with the URL's)."""
    return await _run(request, Call("POST", type_, search=True), load=_load_form)


@router.post("/{type_}")
async def create(request: Request, type_: str) -> Response:
    """Create, conditional with If-None-Exist."""
    call = Call("POST", type_)
    inx = request.headers.get("if-none-exist")
    if inx is not None:
        call.if_none_exist = parse_qsl(
            inx.removeprefix(f"{type_}?").lstrip("?"), keep_blank_values=True
        )
    return await _run(request, call, load=_load_resource)


@router.put("/{type_}")
async def conditional_update(request: Request, type_: str) -> Response:
    """Conditional update: ``PUT Type?criteria``."""
    call = Call("PUT", type_, params=_params(request))
    return await _run(request, call, load=_load_resource)


@router.patch("/{type_}")
async def conditional_patch(request: Request, type_: str) -> Response:
    """Conditional patch: ``PATCH Type?criteria`` with a JSON Patch body."""
    call = Call("PATCH", type_, params=_params(request))
    return await _run(request, call, load=_load_patch)


@router.delete("/{type_}")
async def conditional_delete(request: Request, type_: str) -> Response:
    """Conditional delete: ``DELETE Type?criteria`` (412 on several matches)."""
    return await _run(request, Call("DELETE", type_, params=_params(request)))


@router.get("/{type_}/_history")
async def history_type(request: Request, type_: str) -> Response:
    """History of all resources of a type."""
    return await _run(request, Call("GET", type_, history=True, params=_params(request)))


@router.get("/{type_}/{id_}")
async def read(request: Request, type_: str, id_: str) -> Response:
    """Read, with If-None-Match / If-Modified-Since answered by 304."""
    return await _run(request, Call("GET", type_, id_, params=_params(request)), read=True)


@router.put("/{type_}/{id_}")
async def update(request: Request, type_: str, id_: str) -> Response:
    """Update, or create with the client's id."""
    call = Call("PUT", type_, id_)
    return await _run(request, call, load=_load_resource)


@router.patch("/{type_}/{id_}")
async def patch(request: Request, type_: str, id_: str) -> Response:
    """Patch with a JSON Patch (RFC 6902) document."""
    call = Call("PATCH", type_, id_)
    return await _run(request, call, load=_load_patch)


@router.delete("/{type_}/{id_}")
async def delete(request: Request, type_: str, id_: str) -> Response:
    """Delete (logical: a later read gives 410)."""
    return await _run(request, Call("DELETE", type_, id_))


@router.get("/{type_}/{id_}/_history")
async def history_instance(request: Request, type_: str, id_: str) -> Response:
    """History of one resource."""
    return await _run(request, Call("GET", type_, id_, history=True, params=_params(request)))


@router.get("/{type_}/{id_}/_history/{vid}")
async def vread(request: Request, type_: str, id_: str, vid: str) -> Response:
    """Read a specific version."""
    call = Call("GET", type_, id_, vid=vid, params=_params(request))
    return await _run(request, call, read=True)


@router.get("/{compartment}/{id_}/{type_}")
async def search_compartment(request: Request, compartment: str, id_: str, type_: str) -> Response:
    """Compartment search: ``Patient/123/Observation`` or ``Patient/123/*``."""
    if type_.startswith(("$", "_")):
        raise error(404, "not-found", f"No FHIR interaction at {request.url.path}")
    call = Call("GET", type_, params=_params(request), compartment=(compartment, id_))
    return await _run(request, call)
