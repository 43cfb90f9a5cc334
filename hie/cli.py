"""The ``hie`` command line: ``serve``, ``token`` and ``reindex``."""

from __future__ import annotations

from pathlib import Path

import typer

from hie.config import Settings

app = typer.Typer(help="HIE: FHIR R4 health information exchange server.", no_args_is_help=True)


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
    )


def asgi_app():
    """Application factory for uvicorn (reads settings from the environment)."""
    from hie.app import create_app

    return create_app()


@app.command()
def token(
    client_id: str = typer.Option("local-admin", "--client-id", help="Client the token is for."),
    scope: str = typer.Option("system/*.cruds", help="SMART scopes, space-separated."),
    ttl: int = typer.Option(None, help="Lifetime in seconds [env HIE_TOKEN_TTL_SECONDS]."),
    data_dir: Path = typer.Option(None, help="Data directory holding the signing key."),
) -> None:
    """Mint an access token signed with this server's key (for local use)."""
    from hie.access.tokens import TokenAuthority, load_or_create_key

    settings = Settings.from_env(data_dir=data_dir)
    authority = TokenAuthority(load_or_create_key(settings.key_file))
    typer.echo(authority.mint(client_id, scope, ttl or settings.token_ttl_seconds))


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
    from hie.fhir.search.registry import Registry
    from hie.fhir.service import FhirService

    settings = Settings.from_env(data_dir=data_dir)

    async def run() -> int:
        store = open_store(settings)
        await store.open()
        try:
            service = FhirService(store, settings, Registry())
            return await service.reindex(LOCAL_DEVELOPER, resource_type)
        finally:
            await store.close()

    done, skipped = asyncio.run(run())
    for reason in skipped:
        typer.echo(f"skipped {reason}", err=True)
    typer.echo(f"reindexed {done} resources")


if __name__ == "__main__":
    app()
