"""The ``hie`` command line: ``serve``, ``token``, ``client``, ``key``, ``reindex``, ``audit``
and ``mpi``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import typer

from hie.config import Settings

if TYPE_CHECKING:
    from hie.store import Store

T = TypeVar("T")

app = typer.Typer(help="HIE: FHIR R4 health information exchange server.", no_args_is_help=True)
client_app = typer.Typer(help="Register the client systems of member institutions.")
key_app = typer.Typer(help="The server's signing keys (access tokens, audit seals).")
app.add_typer(client_app, name="client", no_args_is_help=True)
audit_app = typer.Typer(help="The tamper-evident audit log.")
app.add_typer(key_app, name="key", no_args_is_help=True)
app.add_typer(audit_app, name="audit", no_args_is_help=True)
mpi_app = typer.Typer(help="The master patient index: train its model, rematch records.")
app.add_typer(mpi_app, name="mpi", no_args_is_help=True)

#: The server's own administrative client, for tokens minted by ``hie token``.
LOCAL_ADMIN = "local-admin"
_DATA_DIR_HELP = "Data directory (embedded store, signing keys; env HIE_DATA_DIR)."


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _run(settings: Settings, fn: Callable[[Store], Awaitable[T]]) -> T:
    """``fn(store)`` on the store the settings select, opened for the call."""
    import asyncio

    from hie.app import open_store

    async def run() -> T:
        store = open_store(settings)
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _registry(store: Store):
    from hie.access.clients import ClientRegistry

    return ClientRegistry(store)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8080, help="TCP port."),
    data_dir: Path = typer.Option(
        None, help="Embedded store and key directory [env HIE_DATA_DIR, default ./hie-data]."
    ),
    workers: int = typer.Option(1, help="Worker processes."),
) -> None:
    """Run the FHIR server; base URL http://HOST:PORT/fhir."""
    import os

    import uvicorn

    if data_dir is not None:
        os.environ["HIE_DATA_DIR"] = str(data_dir)
    settings = Settings.from_env()
    store = "MongoDB" if settings.mongodb_uri else f"SQLite in {settings.data_dir.resolve()}"
    typer.echo(
        f"HIE on http://{host}:{port}/fhir ({store}; auth {'on' if settings.auth else 'OFF'})"
    )
    uvicorn.run(
        "hie.cli:asgi_app",
        host=host,
        port=port,
        workers=workers,
        factory=True,
        log_level="warning",
        access_log=False,
        proxy_headers=True,
        # Longer than clients' idle-connection expiry (httpx: 5 s, uvicorn's default
        # too): otherwise a pooled connection the server closes as the client reuses it
        # fails with "server disconnected" (nginx keeps 75 s as well).
        timeout_keep_alive=75,
    )


def asgi_app():
    """Application factory for uvicorn (reads settings from the environment)."""
    from hie.app import create_app

    return create_app()


@app.command()
def token(
    client: str = typer.Option(
        None,
        "--client",
        help="A registered client (its organisation, roles, break-glass right; scopes "
        "narrowed to its registered ones). Default: the server's administrative client "
        f"{LOCAL_ADMIN} (role admin).",
    ),
    scope: str = typer.Option(
        None, help="SMART scopes, space-separated (default: system/*.cruds, or the client's)."
    ),
    ttl: int = typer.Option(None, help="Lifetime in seconds (env HIE_TOKEN_TTL_SECONDS)."),
    purpose: str = typer.Option(None, help="PurposeOfUse code (TREAT, ETREAT, ...)."),
    user: str = typer.Option(None, help="Name of the end user the client acts for."),
    user_role: str = typer.Option(None, help="Role code of that end user."),
    data_dir: Path = typer.Option(None, help="Data directory (signing keys, embedded store)."),
) -> None:
    """Mint an access token signed with this server's key (for local use)."""
    from hie.access.keys import KeyRing
    from hie.access.principal import ADMIN
    from hie.access.purpose import BREAK_GLASS, parse_purpose
    from hie.access.scopes import negotiate
    from hie.access.tokens import TokenAuthority
    from hie.fhir.errors import FhirError

    settings = Settings.from_env(data_dir=data_dir)
    try:
        purpose = None if purpose is None else parse_purpose(purpose)
    except FhirError as exc:
        _fail(str(exc))
    if client is None:
        claims = {"roles": (ADMIN,)}
        client, granted = LOCAL_ADMIN, scope or "system/*.cruds"
    else:
        found = _run(settings, lambda store: _registry(store).get(client))
        if found is None or not found.active:
            _fail(f"{client} is not an active registered client (see `hie client list`)")
        granted = negotiate(scope, found.scope) if scope else found.scope
        if not granted:
            _fail(f"none of {scope!r} is registered for {client}: {found.scope}")
        claims = {
            "organization": found.organization,
            "roles": found.roles,
            "break_glass": found.break_glass,
            "source": found.source,
        }
    if purpose in BREAK_GLASS and not claims.get("break_glass"):
        _fail(f"{client} is not registered for break-glass purposes")
    authority = TokenAuthority(KeyRing(settings.keys_path))
    typer.echo(
        authority.mint(
            client,
            granted,
            ttl or settings.token_ttl_seconds,
            purpose=purpose,
            user=user,
            user_role=user_role,
            **claims,
        )
    )


@app.command()
def reindex(
    resource_type: str = typer.Argument(None, help="Only this resource type."),
    data_dir: Path = typer.Option(None, help="Data directory of the embedded store."),
) -> None:
    """Rebuild the search index (after adding or changing a SearchParameter).

    Uses the store the settings select (HIE_MONGODB_URI or the embedded one); a
    running server may keep serving meanwhile."""
    import asyncio

    from hie.access.principal import LOCAL_DEVELOPER
    from hie.app import open_store

    settings = Settings.from_env(data_dir=data_dir)

    async def run() -> int:
        store = open_store(settings)
        await store.open()
        try:
            return await _service(store, settings).reindex(LOCAL_DEVELOPER, resource_type)
        finally:
            await store.close()

    done, skipped = asyncio.run(run())
    for reason in skipped:
        typer.echo(f"skipped {reason}", err=True)
    typer.echo(f"reindexed {done} resources")


@client_app.command("add")
def client_add(
    client_id: str = typer.Argument(..., help="The client_id (A-Z a-z 0-9 . _ -, 64 at most)."),
    org: str = typer.Option(..., help="Its member organisation, Organization/<id>."),
    org_name: str = typer.Option(None, help="Create that Organization with this name if missing."),
    role: list[str] = typer.Option(
        ..., help="member, regional-platform, auditor, admin or steward; repeatable."
    ),
    scope: str = typer.Option(..., help='Scopes it may be granted, e.g. "system/*.rs".'),
    jwks: Path = typer.Option(None, help="File holding its public JWK Set."),
    jwks_url: str = typer.Option(None, help="URL of its public JWK Set (https)."),
    public_key: Path = typer.Option(None, help="PEM file of its public key (RSA or EC P-384)."),
    break_glass: bool = typer.Option(False, help="May assert emergency purposes of use."),
    name: str = typer.Option(None, help="Display name (default: the client_id)."),
    source: str = typer.Option(None, help="URI naming its system (recorded in meta.source)."),
    data_dir: Path = typer.Option(None, help=_DATA_DIR_HELP),
) -> None:
    """Register a client (or replace its registration)."""
    import json

    from hie.access.clients import Client, ClientConflict, ClientError, jwk_of_pem

    if sum(x is not None for x in (jwks, jwks_url, public_key)) != 1:
        _fail("give exactly one of --jwks, --jwks-url and --public-key")
    definition = {
        "client_id": client_id,
        "name": name or client_id,
        "organization": org,
        "roles": role,
        "scope": scope,
        "break_glass": break_glass,
    }
    if source is not None:
        definition["source"] = source
    try:
        if jwks is not None:
            definition["jwks"] = json.loads(jwks.read_text())
        elif public_key is not None:
            definition["jwks"] = {"keys": [jwk_of_pem(public_key.read_bytes())]}
        else:
            definition["jwks_uri"] = jwks_url
        client = Client.from_json(definition)
    except (OSError, ValueError) as exc:
        _fail(str(exc))
    settings = Settings.from_env(data_dir=data_dir)

    async def add(store: Store) -> bool:
        if org_name is not None:
            await _ensure_organization(store, settings, client.organization, org_name)
        return await _registry(store).save(client)

    try:
        created = _run(settings, add)
    except (ClientError, ClientConflict) as exc:
        _fail(str(exc))
    kids = ", ".join(k["kid"] for k in (client.jwks or {}).get("keys", ()))
    keys = f" (assertions signed with kid {kids})" if kids else ""
    typer.echo(f"{'registered' if created else 'updated'} client {client_id}{keys}")


async def _ensure_organization(store: Store, settings: Settings, ref: str, name: str) -> None:
    """Create the Organization ``ref`` named ``name`` unless it exists."""
    org_id = ref.split("/", 1)[1]
    found = await store.read("Organization", org_id)
    if found is None or found.deleted:
        service = _service(store, settings)
        resource = {"resourceType": "Organization", "active": True, "name": name}
        await store.commit([service.new_write("Organization", org_id, resource, found, "PUT")])
        typer.echo(f"created {ref}")


@client_app.command("list")
def client_list(data_dir: Path = typer.Option(None, help=_DATA_DIR_HELP)) -> None:
    """List the registered clients."""
    clients = _run(Settings.from_env(data_dir=data_dir), lambda store: _registry(store).all())
    for c in clients:
        state = "active" if c.active else "inactive"
        typer.echo(f"{c.client_id}\t{c.organization}\t{','.join(c.roles)}\t{state}\t{c.scope}")


@client_app.command("show")
def client_show(
    client_id: str = typer.Argument(...), data_dir: Path = typer.Option(None, help=_DATA_DIR_HELP)
) -> None:
    """Show a registered client as JSON."""
    import json

    found = _run(
        Settings.from_env(data_dir=data_dir), lambda store: _registry(store).get(client_id)
    )
    if found is None:
        _fail(f"no registered client {client_id}")
    typer.echo(json.dumps(found.to_json(), indent=2, ensure_ascii=False))


@client_app.command("remove")
def client_remove(
    client_id: str = typer.Argument(...), data_dir: Path = typer.Option(None, help=_DATA_DIR_HELP)
) -> None:
    """Deactivate a client: it gets no more tokens (the registration stays)."""
    settings = Settings.from_env(data_dir=data_dir)
    if _run(settings, lambda store: _registry(store).deactivate(client_id)) is None:
        _fail(f"no registered client {client_id}")
    typer.echo(f"deactivated client {client_id}")


def _key_ring(data_dir: Path | None):
    from hie.access.keys import KeyRing

    return KeyRing(Settings.from_env(data_dir=data_dir).keys_path)


@key_app.command("list")
def key_list(data_dir: Path = typer.Option(None, help=_DATA_DIR_HELP)) -> None:
    """List the keys that verify access tokens; the active one signs."""
    ring = _key_ring(data_dir)
    for kid in sorted(ring.token_keys()):
        typer.echo(f"{kid}\t{'active' if kid == ring.active_kid else 'verifies'}")


@key_app.command("rotate")
def key_rotate(data_dir: Path = typer.Option(None, help=_DATA_DIR_HELP)) -> None:
    """Create a new signing key; tokens signed by older keys stay valid."""
    typer.echo(_key_ring(data_dir).rotate())


@key_app.command("retire")
def key_retire(
    kid: str = typer.Argument(
        ...,
        help="The key's kid (see `hie key list`); after `--` if it starts with a dash, "
        "as a base64url thumbprint may: `hie key retire -- -CXK...`.",
    ),
    data_dir: Path = typer.Option(None, help=_DATA_DIR_HELP),
) -> None:
    """Delete a key's private part: tokens it signed are no longer accepted; its public
    part stays, so audit seals it made remain verifiable."""
    try:
        _key_ring(data_dir).retire(kid)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(f"retired {kid}")


@audit_app.command("verify")
def audit_verify(
    data_dir: Path = typer.Option(None, help="Data directory (store and keys)."),
) -> None:
    """Check the whole audit chain and its signed seals; exit 1 and name the first
    record altered, removed or reordered if it is not intact."""
    from hie.access.keys import KeyRing
    from hie.audit.verify import verify

    settings = Settings.from_env(data_dir=data_dir)
    keys = KeyRing(settings.keys_path)
    report = _run(settings, lambda store: verify(store, keys))
    typer.echo(
        f"{report.records} records, {report.seals} seals, sealed through "
        f"{report.sealed_through}, {report.unsealed} after the last seal"
    )
    if not report.ok:
        _fail(f"NOT INTACT ({report.kind}): {report.record or '-'}: {report.problem}")
    typer.echo("intact")


@mpi_app.command("train")
def mpi_train(data_dir: Path = typer.Option(None, help=_DATA_DIR_HELP)) -> None:
    """Fit the matching model by EM to all member records and store it (running servers
    pick it up within a minute); records are not relinked: see `hie mpi rematch`."""
    settings = Settings.from_env(data_dir=data_dir)

    async def fit(store: Store):
        return await _patient_index(_service(store, settings), settings).train()

    try:
        model = _run(settings, fit)
    except ValueError as exc:
        _fail(f"cannot train: {exc}")
    info = model.info
    typer.echo(
        f"trained on {info.get('records')} records, {info.get('candidate_pairs')} candidate "
        f"pairs; prior {model.prior:.3g}"
    )


@mpi_app.command("rematch")
def mpi_rematch(
    retrain: bool = typer.Option(False, help="Train the model anew first (as `hie mpi train`)."),
    data_dir: Path = typer.Option(None, help=_DATA_DIR_HELP),
) -> None:
    """Index member records not indexed yet and decide the others again with the current
    model (links a steward made are kept). Audited; a running server may keep serving."""
    settings = Settings.from_env(data_dir=data_dir)

    async def rematch(store: Store):
        service = _service(store, settings)
        index = _patient_index(service, settings)
        await index.start()
        audit = _audit_log(service, settings)
        if audit is None:
            return await index.rematch(retrain=retrain)
        await audit.start()
        try:
            return await index.rematch(retrain=retrain, commit=_audited(audit, settings))
        finally:
            await audit.stop()

    try:
        report = _run(settings, rematch)
    except ValueError as exc:
        _fail(f"cannot train: {exc}")
    trained = " (model retrained)" if report.trained else ""
    typer.echo(
        f"{report.records} member records{trained}: {report.indexed} newly indexed, "
        f"{report.relinked} relinked, {report.reviews} reviews opened"
    )


def _service(store: Store, settings: Settings):
    """The FHIR service on ``store`` (its writes, search registry and settings)."""
    from hie.fhir.search.registry import Registry
    from hie.fhir.service import FhirService

    return FhirService(store, settings, Registry())


def _patient_index(service, settings: Settings):
    """The master patient index writing through ``service``'s writes."""
    from hie.mpi.index import PatientIndex

    return PatientIndex(
        service.store,
        service.new_write,
        link_threshold=settings.mpi_link_threshold,
        review_threshold=settings.mpi_review_threshold,
    )


def _audit_log(service, settings: Settings):
    """The audit log the server writes to, through ``service`` (None when auditing is
    off)."""
    if not settings.audit:
        return None
    from hie.access.keys import KeyRing
    from hie.app import audit_log

    return audit_log(service, KeyRing(settings.keys_path), settings)


def _audited(audit, settings: Settings):
    """A commit that records each batch as an AuditEvent of the ``$mpi-rematch``
    operation by the server's administrative client, naming the Patients it changed."""
    from hie.access.principal import ADMIN, Principal
    from hie.access.scopes import ACTIONS, Grant
    from hie.audit.events import Where, audit_event, operation_coding
    from hie.store import INTERNAL_TYPES

    principal = Principal(
        LOCAL_ADMIN, (Grant("system", "*", frozenset(ACTIONS)),), roles=frozenset({ADMIN})
    )
    where = Where(settings.base_url or "urn:hie:cli", None)

    async def commit(writes) -> None:
        patients = [w for w in writes if w.type not in INTERNAL_TYPES]
        event = audit_event(
            where,
            principal,
            "operation",
            status=200,
            subtype_coding=operation_coding("$mpi-rematch"),
            resources=[f"{w.type}/{w.id}/_history/{w.version}" for w in patients],
            patients=[f"Patient/{w.id}" for w in patients],
        )
        await audit.append([event], writes)

    return commit


if __name__ == "__main__":
    app()
