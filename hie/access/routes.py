"""HTTP routes of authorisation: the SMART configuration, the token endpoint and its
JWK Set, and the client administration API.

``POST /auth/token`` and ``GET /auth/jwks`` are OAuth endpoints (JSON errors per RFC
6749); ``GET /fhir/.well-known/smart-configuration`` is the SMART discovery document;
``/admin/clients`` manages registered clients (JSON in and out, errors as FHIR
OperationOutcomes) and needs a token of a client with the ``admin`` role.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from hie.access.clients import (
    ASSERTION_ALGORITHMS,
    Client,
    ClientConflict,
    ClientError,
    ClientRegistry,
)
from hie.access.decision import require_role
from hie.access.oauth import OAuthError, issue_token
from hie.access.principal import ADMIN, Principal
from hie.audit.events import (
    LOGIN,
    LOGIN_SUBTYPE,
    REST,
    SECURITY_ALERT,
    SECURITY_CHANGED,
    operation_coding,
)
from hie.audit.trail import Trail
from hie.fhir.errors import FhirError, error
from hie.fhir.http import read_body
from hie.fhir.routes import open_trail, operation

router = APIRouter()
T = TypeVar("T")

TOKEN_PATH = "/auth/token"
JWKS_PATH = "/auth/jwks"
#: Largest token request body (an assertion is a few kilobytes).
MAX_FORM_BYTES = 64 * 1024
#: Largest client definition (an inline JWK Set of a few keys).
MAX_CLIENT_BYTES = 256 * 1024
_FORM = "application/x-www-form-urlencoded"
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
#: Scope patterns advertised in the SMART configuration.
SCOPES_SUPPORTED = ("system/*.cruds", "system/*.rs", "system/*.read", "system/*.write")


def register(app: FastAPI) -> None:
    """Put these routes ahead of the FHIR routes (whose ``GET /fhir/{type}/{id}`` would
    take ``/fhir/.well-known/smart-configuration``), and load the client registry
    (``app.state.clients``) once the store is open."""
    app.router.routes[0:0] = router.routes
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator:
        async with inner(app) as state:
            await app.state.clients.refresh()
            yield state

    app.router.lifespan_context = lifespan


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def server_root(request: Request) -> str:
    """The server's URL as clients see it: ``HIE_BASE_URL`` without its ``/fhir``, or
    the request's."""
    configured = request.app.state.settings.base_url
    if configured:
        return configured.removesuffix("/fhir")
    return str(request.base_url).rstrip("/")


# ------------------------------------------------------------------ discovery
@router.get("/fhir/.well-known/smart-configuration")
async def smart_configuration(request: Request) -> Response:
    """The SMART configuration (public): how to get a token here."""
    root = server_root(request)
    return _json(
        200,
        {
            "token_endpoint": root + TOKEN_PATH,
            "jwks_uri": root + JWKS_PATH,
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
            "scopes_supported": list(SCOPES_SUPPORTED),
            "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
        },
    )


@router.get(JWKS_PATH)
async def jwks(request: Request) -> Response:
    """The public keys that verify this server's access tokens."""
    return _json(200, request.app.state.keys.jwks())


# ------------------------------------------------------------------ token
@router.post(TOKEN_PATH)
async def token(request: Request) -> Response:
    """SMART Backend Services token request (see :func:`hie.access.oauth.issue_token`);
    every request, granted or refused, is audited as a login."""
    state = request.app.state
    trail = open_trail(request)
    try:
        issued = await issue_token(
            await _form(request),
            server_root(request) + TOKEN_PATH,
            clients=state.clients,
            tokens=state.tokens,
            store=state.store,
            ttl=state.settings.access_token_ttl,
        )
    except OAuthError as exc:
        trail.principal = _caller(state.clients, exc.client_id)
        failure = f"{exc.error}: {exc.description}"
        return await _login_answer(trail, exc.status, exc.body(), failure)
    trail.principal = _caller(state.clients, issued.client_id, issued.body["scope"])
    return await _login_answer(trail, 200, issued.body, None)


def _caller(clients: ClientRegistry, client_id: str | None, scope: str = "") -> Principal | None:
    """The client a token request came from, as far as it is known (for the audit)."""
    if client_id is None:
        return None
    client = clients.cached(client_id)
    if client is None:
        return Principal(client_id, ())
    return Principal(
        client_id, (), scope, organization=client.organization, roles=frozenset(client.roles)
    )


async def _login_answer(trail: Trail, status: int, body: dict, failure: str | None) -> Response:
    """Record the token request, then answer it (503 if it cannot be recorded)."""
    event = trail.event(
        "login",
        status=status,
        detail=failure,
        kind=LOGIN,
        subtype_coding=LOGIN_SUBTYPE,
        action="E",
    )
    try:
        await trail.record(event)
    except FhirError:
        unavailable = {
            "error": "temporarily_unavailable",
            "error_description": "the audit log cannot be written; retry later",
        }
        return _json(503, unavailable, _NO_STORE)
    return _json(status, body, _NO_STORE)


async def _form(request: Request) -> dict[str, str]:
    """The form parameters of a token request; ``invalid_request`` for another content
    type, an oversized or malformed body, or a repeated parameter."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != _FORM:
        raise OAuthError(400, "invalid_request", f"the request body must be {_FORM}")
    try:
        text = (await read_body(request, MAX_FORM_BYTES)).decode()
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
    except FhirError:
        raise OAuthError(400, "invalid_request", "the request body is too large") from None
    except ValueError:
        raise OAuthError(400, "invalid_request", "the request body is not a valid form") from None
    form = dict(pairs)
    if len(form) != len(pairs):
        raise OAuthError(400, "invalid_request", "a parameter is repeated")
    return form


# ------------------------------------------------------------------ admin
CLIENT_READ = operation_coding("client-read")


async def _administer(
    request: Request, change: bool, run: Callable[[ClientRegistry], Awaitable[T]]
):
    """Run ``run(registry)`` for an administrator (401 without a token, 403 without the
    admin role); audited: changes as security-attribute changes, reads as an operation."""
    coding = SECURITY_CHANGED if change else CLIENT_READ
    kind = SECURITY_ALERT if change else REST

    async def audited(principal: Principal, trail: Trail) -> T:
        require_role(principal, ADMIN, "Client administration")
        result = await run(request.app.state.clients)
        detail = f"{request.method} {request.url.path}"
        await trail.record(
            trail.event("operation", status=200, detail=detail, kind=kind, subtype_coding=coding)
        )
        return result

    _, result = await operation(request, coding, audited, kind=kind)
    return result


async def _definition(request: Request, client_id: str | None = None) -> Client:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise error(415, "not-supported", "A client definition is sent as application/json")
    try:
        data = orjson.loads(await read_body(request, MAX_CLIENT_BYTES))
        return Client.from_json(data, client_id)
    except orjson.JSONDecodeError as exc:
        raise error(400, "invalid", f"The body is not JSON: {exc}") from None
    except ClientError as exc:
        raise error(400, "invalid", f"Invalid client: {exc}") from None


async def _save(registry: ClientRegistry, client: Client, *, create: bool) -> bool:
    try:
        return await registry.save(client, create=create)
    except ClientError as exc:
        raise error(400, "invalid", f"Invalid client: {exc}") from None
    except ClientConflict as exc:
        raise error(409, "conflict", str(exc)) from None


async def _known(registry: ClientRegistry, client_id: str) -> Client:
    client = await registry.get(client_id)
    if client is None:
        raise error(404, "not-found", f"No registered client {client_id!r}")
    return client


@router.get("/admin/clients")
async def list_clients(request: Request) -> Response:
    """Every registered client."""

    async def run(registry: ClientRegistry) -> list:
        return [c.to_json() for c in await registry.all()]

    return _json(200, await _administer(request, False, run))


@router.post("/admin/clients")
async def add_client(request: Request) -> Response:
    """Register a new client (409 if its id is taken)."""

    async def run(registry: ClientRegistry) -> Client:
        client = await _definition(request)
        await _save(registry, client, create=True)
        return client

    client = await _administer(request, True, run)
    location = {"Location": f"/admin/clients/{client.client_id}"}
    return _json(201, client.to_json(), location)


@router.get("/admin/clients/{client_id}")
async def show_client(request: Request, client_id: str) -> Response:
    """One registered client."""

    async def run(registry: ClientRegistry) -> Client:
        return await _known(registry, client_id)

    return _json(200, (await _administer(request, False, run)).to_json())


@router.put("/admin/clients/{client_id}")
async def put_client(request: Request, client_id: str) -> Response:
    """Register or replace the client ``client_id``."""

    async def run(registry: ClientRegistry) -> tuple[Client, bool]:
        client = await _definition(request, client_id)
        return client, await _save(registry, client, create=False)

    client, created = await _administer(request, True, run)
    return _json(201 if created else 200, client.to_json())


@router.delete("/admin/clients/{client_id}")
async def remove_client(request: Request, client_id: str) -> Response:
    """Deactivate a client: it gets no more tokens (its registration stays)."""

    async def run(registry: ClientRegistry) -> Client:
        client = await registry.deactivate(client_id)
        if client is None:
            raise error(404, "not-found", f"No registered client {client_id!r}")
        return client

    return _json(200, (await _administer(request, True, run)).to_json())
