"""Store fixtures: every contract test runs against each adapter."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from pymongo import AsyncMongoClient

from hie.store import Store
from hie.store.mongo import MongoStore
from tests.store.mongomock_async import AsyncMongomockClient

StoreFactory = Callable[[], Store]


@pytest.fixture(params=["sqlite", "mongomock", "mongo"])
async def make_store(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[StoreFactory]:
    """A factory of unopened stores sharing one backing database (for reopening)."""
    if request.param == "sqlite":
        from hie.store.sqlite import SqliteStore

        yield lambda: SqliteStore(tmp_path)
    elif request.param == "mongomock":
        client = AsyncMongomockClient()
        yield lambda: MongoStore("mongodb://mongomock", client=client)
    else:
        uri = os.environ.get("HIE_TEST_MONGODB_URI")
        if not uri:
            pytest.skip("HIE_TEST_MONGODB_URI is not set")
        database = f"hie_test_{uuid.uuid4().hex[:12]}"
        yield lambda: MongoStore(uri, database)
        async with AsyncMongoClient(uri) as client:
            await client.drop_database(database)


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[Store]:
    """An open store on an empty database."""
    opened = make_store()
    await opened.open()
    yield opened
    await opened.close()
