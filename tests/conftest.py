"""API fixtures: a FastAPI TestClient on each store, with a valid bearer token."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from hie.app import create_app
from hie.config import Settings
from hie.store import Store
from hie.store.mongo import MongoStore
from hie.store.sqlite import SqliteStore
from tests.store.mongomock_async import AsyncMongomockClient

FHIR = "application/fhir+json"


def make_store(kind: str, data_dir) -> Store:
    """An unopened store of ``kind`` (``sqlite`` or ``mongomock``)."""
    if kind == "sqlite":
        return SqliteStore(data_dir)
    return MongoStore("mongodb://mongomock", client=AsyncMongomockClient())


@pytest.fixture(params=["sqlite", "mongomock"])
def store_kind(request) -> str:
    """Each API test runs on both stores: nothing above the port may know which."""
    return request.param


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Settings with authentication on (the default) and a small body limit."""
    return Settings(data_dir=tmp_path, max_body_bytes=2 * 1024 * 1024)


@pytest.fixture
def app(settings, store_kind, tmp_path):
    return create_app(settings, make_store(store_kind, tmp_path))


@pytest.fixture
def mint(app) -> Callable[..., str]:
    """Mint a token on the app's key: ``mint(scope="system/*.cruds")`` is an
    administrator's (no member organisation); ``organization=``, ``roles=`` and the
    other claims of :meth:`TokenAuthority.mint` make it a member's, an auditor's..."""

    def _mint(
        scope: str = "system/*.cruds",
        client_id: str = "test-client",
        ttl: int = 600,
        *,
        roles: tuple[str, ...] = ("admin",),
        **claims,
    ):
        return app.state.tokens.mint(client_id, scope, ttl, roles=roles, **claims)

    return _mint


@pytest.fixture
def client(app, mint) -> Iterator[TestClient]:
    """A client authorised for everything (``system/*.cruds``), speaking FHIR JSON."""
    with TestClient(app, base_url="http://hie.test") as c:
        c.headers["Authorization"] = f"Bearer {mint()}"
        c.headers["Content-Type"] = FHIR
        yield c


@pytest.fixture
def anon(app) -> Iterator[TestClient]:
    """A client without any token."""
    with TestClient(app, base_url="http://hie.test") as c:
        yield c
