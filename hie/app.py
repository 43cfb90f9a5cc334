"""The ASGI application: store, services and routes wired from :class:`Settings`."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from hie.access.clients import ClientRegistry
from hie.access.consent_decision import router as consent_router
from hie.access.consents import ConsentBook
from hie.access.keys import KeyRing
from hie.access.patients import PatientLinks
from hie.access.routes import register as register_auth_routes
from hie.access.tokens import ExternalIssuer, TokenAuthority
from hie.audit.log import AuditLog
from hie.audit.routes import router as audit_router
from hie.config import Settings
from hie.fhir.errors import FhirError, Issue, outcome
from hie.fhir.everything import router as everything_router
from hie.fhir.http import Format, fhir_response
from hie.fhir.routes import router
from hie.fhir.search.registry import Registry
from hie.fhir.service import FhirService
from hie.mpi.index import PatientIndex
from hie.mpi.routes import router as mpi_router
from hie.store import Store

log = logging.getLogger("hie")


def open_store(settings: Settings) -> Store:
    """The store the settings select: MongoDB when a URI is set, else embedded SQLite."""
    if settings.mongodb_uri:
        from hie.store.mongo import MongoStore

        return MongoStore(settings.mongodb_uri, settings.mongodb_database)
    from hie.store.sqlite import SqliteStore

    return SqliteStore(settings.data_dir, synchronous=settings.sqlite_synchronous)


def audit_log(service: FhirService, keys: KeyRing, settings: Settings) -> AuditLog:
    """The audit log of ``service``'s store, seals signed with ``keys``; its records are
    built (search index rows included) by ``service``."""
    return AuditLog(
        service.store,
        keys,
        lambda type_, id_, resource, instant: service.new_write(
            type_, id_, resource, None, "POST", instant=instant
        ),
        seal_records=settings.audit_seal_records,
        seal_seconds=settings.audit_seal_seconds,
    )


def _error_response(status: int, issues: list[Issue], headers: dict | None = None) -> Response:
    return fhir_response(status, outcome(issues), Format(), headers)


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    """Build the application; ``store`` overrides the one the settings select."""
    settings = settings or Settings.from_env()
    store = store or open_store(settings)

    service = FhirService(store, settings, Registry())
    mpi = PatientIndex(
        store,
        service.new_write,
        link_threshold=settings.mpi_link_threshold,
        review_threshold=settings.mpi_review_threshold,
        id_systems=settings.mpi_id_systems,
    )
    if settings.mpi:
        service.mpi = mpi  # every Patient write passes through the master patient index
    service.engine.persons = mpi.person  # :mdm and $everything widen to the person
    links = PatientLinks(service.registry, settings.base_url)
    consents = ConsentBook(
        store,
        service.registry,
        links,
        mpi.person,
        default=settings.consent_default,
        enabled=settings.consent,
        base=settings.base_url,
    )
    service.consents = consents
    keys = KeyRing(settings.keys_path)
    audit = audit_log(service, keys, settings) if settings.audit else None
    if audit is None and settings.auth:
        raise ValueError("HIE_AUDIT=off is allowed only with HIE_AUTH=off (local development)")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.auth:
            log.warning(
                "AUTHENTICATION IS OFF (HIE_AUTH=off): every caller has every right. "
                "For local development only; never expose this server."
            )
        if audit is None:
            log.warning("AUDITING IS OFF (HIE_AUDIT=off): accesses leave no record.")
        if not settings.consent:
            log.warning("CONSENT IS OFF (HIE_CONSENT=off): patients' consents are not enforced.")
        if not settings.mpi:
            log.warning("THE MASTER PATIENT INDEX IS OFF (HIE_MPI=off): Patients are not linked.")
        await store.open()
        await service.load_custom_parameters()
        await mpi.start()
        if audit is not None:
            await audit.start()
        tasks = [asyncio.create_task(service.refresh_index())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await consents.idle()  # withheld sets being computed read the store
            if audit is not None:
                await audit.stop()
            await store.close()

    app = FastAPI(title="HIE", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.store = store
    app.state.service = service
    app.state.mpi = mpi
    app.state.keys = keys
    app.state.audit = audit
    app.state.patient_links = links
    app.state.consents = consents
    app.state.clients = ClientRegistry(store)
    app.state.tokens = TokenAuthority(
        keys, app.state.clients, ExternalIssuer.from_settings(settings)
    )
    register_auth_routes(app)  # token endpoint, SMART discovery, client admin; before FHIR
    # The FHIR routes go straight onto the app's router. With include_router, FastAPI
    # matches every request through its lazy _IncludedRouter (twice, with context-var
    # bookkeeping per candidate route): a quarter of a read's server CPU. The routes
    # use no dependencies, so the include's dependency overrides are not missed.
    # Operations with fixed paths first: the FHIR routes' patterns would take them.
    app.router.routes.extend(audit_router.routes)
    app.router.routes.extend(mpi_router.routes)
    app.router.routes.extend(everything_router.routes)
    app.router.routes.extend(consent_router.routes)
    app.router.routes.extend(router.routes)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.exception_handler(FhirError)
    async def fhir_error(request: Request, exc: FhirError) -> Response:
        return _error_response(exc.status, exc.issues, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = f"No FHIR interaction at {request.url.path}"
        return _error_response(exc.status_code, [Issue(code, detail)], dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def request_error(request: Request, exc: RequestValidationError) -> Response:
        return _error_response(400, [Issue("invalid", str(exc.errors()))])

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(500, [Issue("exception", "Internal server error")])

    return app
