"""The subset of PyMongo's async API that MongoStore uses, over a ``mongomock`` client.

mongomock is synchronous and has no sessions. Here a transaction holds the client's
asyncio lock from ``start_transaction`` to commit or abort, and keeps an undo log: the
documents each write in the transaction touches are snapshotted before the write and
restored, newest first, on abort. Operations outside a transaction take the lock too,
so they never see another task's uncommitted writes. An operation issued without the
session by the task that holds a transaction raises instead of deadlocking: with a
real server it would run outside the transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import mongomock
from bson import ObjectId
from pymongo.errors import InvalidOperation


class AsyncMongomockClient:
    """Stands in for ``pymongo.AsyncMongoClient``; ``replica_set=False`` emulates a
    standalone server (its ``hello`` reply has no ``setName``)."""

    def __init__(self, *, replica_set: bool = True):
        self.sync = mongomock.MongoClient()
        self.lock = asyncio.Lock()
        self.owner: asyncio.Task | None = None
        self.hello: dict[str, Any] = {"isWritablePrimary": True, "ok": 1.0}
        if replica_set:
            self.hello["setName"] = "rs0"
        self.admin = _Admin(self)

    def __getitem__(self, name: str) -> _Database:
        return _Database(self, self.sync[name])

    def start_session(self) -> _Session:
        """A session whose transactions are emulated with the lock and an undo log."""
        return _Session(self)

    async def drop_database(self, name: str) -> None:
        """Drop database ``name``."""
        async with self.access(None):
            self.sync.drop_database(name)

    async def close(self) -> None:
        """Nothing to release."""

    @contextlib.asynccontextmanager
    async def access(self, session: _Session | None) -> AsyncIterator[list | None]:
        """Serialise an operation; yields the undo log when it runs in a transaction."""
        if session is not None and session.in_transaction:
            yield session.undo
            return
        if self.owner is not None and self.owner is asyncio.current_task():
            raise InvalidOperation("operation without the session inside a transaction")
        async with self.lock:
            yield None


class _Admin:
    def __init__(self, client: AsyncMongomockClient):
        self._client = client

    async def command(self, name: str) -> dict[str, Any]:
        if name != "hello":
            raise NotImplementedError(name)
        return dict(self._client.hello)


class _Session:
    def __init__(self, client: AsyncMongomockClient):
        self._client = client
        self.undo: list | None = None

    async def __aenter__(self) -> _Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.in_transaction:
            await self.abort_transaction()

    @property
    def in_transaction(self) -> bool:
        return self.undo is not None

    async def start_transaction(self) -> contextlib.AbstractAsyncContextManager:
        if self.in_transaction:
            raise InvalidOperation("Transaction already in progress")
        await self._client.lock.acquire()
        self._client.owner = asyncio.current_task()
        self.undo = []
        return self._context()

    @contextlib.asynccontextmanager
    async def _context(self) -> AsyncIterator[None]:
        try:
            yield
        except BaseException:
            if self.in_transaction:
                await self.abort_transaction()
            raise
        if self.in_transaction:
            await self.commit_transaction()

    async def commit_transaction(self) -> None:
        self._end()

    async def abort_transaction(self) -> None:
        for coll, id_, before in reversed(self.undo or []):
            if before is None:
                coll.delete_one({"_id": id_})
            else:
                coll.replace_one({"_id": id_}, before, upsert=True)
        self._end()

    def _end(self) -> None:
        if not self.in_transaction:
            raise InvalidOperation("No transaction started")
        self.undo = None
        self._client.owner = None
        self._client.lock.release()

    async def with_transaction(self, callback: Callable[[_Session], Awaitable[Any]]) -> Any:
        async with await self.start_transaction():
            return await callback(self)


class _Database:
    def __init__(self, client: AsyncMongomockClient, sync: Any):
        self._client = client
        self._sync = sync

    def __getitem__(self, name: str) -> _Collection:
        return _Collection(self._client, self._sync[name])

    async def create_collection(self, name: str) -> _Collection:
        async with self._client.access(None):
            self._sync.create_collection(name)
        return self[name]


class _Collection:
    def __init__(self, client: AsyncMongomockClient, sync: Any):
        self._client = client
        self._sync = sync

    def _log(self, undo: list | None, ids: list[Any]) -> None:
        """Snapshot documents ``ids`` before a transactional write touches them."""
        if undo is not None:
            for id_ in ids:
                undo.append((self._sync, id_, copy.deepcopy(self._sync.find_one({"_id": id_}))))

    def _target(self, filter_: dict[str, Any], upsert: bool) -> list[Any]:
        """The id a single-document write will touch, if any."""
        doc = self._sync.find_one(filter_)
        if doc is not None:
            return [doc["_id"]]
        if upsert:
            if "_id" not in filter_:
                raise NotImplementedError("transactional upsert without _id in the filter")
            return [filter_["_id"]]
        return []

    async def create_indexes(self, models: list, session: _Session | None = None) -> list[str]:
        async with self._client.access(session):
            return self._sync.create_indexes(models)

    async def insert_one(self, doc: dict[str, Any], session: _Session | None = None) -> Any:
        async with self._client.access(session) as undo:
            doc.setdefault("_id", ObjectId())
            self._log(undo, [doc["_id"]])
            return self._sync.insert_one(doc)

    async def insert_many(self, docs: list[dict[str, Any]], session: _Session | None = None) -> Any:
        async with self._client.access(session) as undo:
            for doc in docs:
                doc.setdefault("_id", ObjectId())
            self._log(undo, [doc["_id"] for doc in docs])
            return self._sync.insert_many(docs)

    async def replace_one(
        self, filter_: dict, doc: dict, upsert: bool = False, session: _Session | None = None
    ) -> Any:
        async with self._client.access(session) as undo:
            self._log(undo, self._target(filter_, upsert))
            return self._sync.replace_one(filter_, doc, upsert=upsert)

    async def update_one(
        self, filter_: dict, update: dict, upsert: bool = False, session: _Session | None = None
    ) -> Any:
        async with self._client.access(session) as undo:
            self._log(undo, self._target(filter_, upsert))
            return self._sync.update_one(filter_, update, upsert=upsert)

    async def delete_many(self, filter_: dict, session: _Session | None = None) -> Any:
        async with self._client.access(session) as undo:
            self._log(undo, [d["_id"] for d in self._sync.find(filter_, {"_id": 1})])
            return self._sync.delete_many(filter_)

    async def bulk_write(
        self, requests: list, ordered: bool = True, session: _Session | None = None
    ) -> Any:
        """``UpdateOne`` requests only (the store's bulk index writes)."""
        async with self._client.access(session) as undo:
            matched = 0
            for r in requests:
                filter_, update = r._filter, r._doc
                self._log(undo, self._target(filter_, False))
                matched += self._sync.update_one(filter_, update).matched_count
            return SimpleNamespace(matched_count=matched)

    async def find_one_and_update(
        self, filter_: dict, update: dict, session: _Session | None = None, **kwargs: Any
    ) -> Any:
        async with self._client.access(session) as undo:
            self._log(undo, self._target(filter_, kwargs.get("upsert", False)))
            return self._sync.find_one_and_update(filter_, update, **kwargs)

    async def find_one(
        self, filter_: dict, projection: dict | None = None, session: _Session | None = None
    ) -> Any:
        async with self._client.access(session):
            return self._sync.find_one(filter_, projection)

    def find(
        self, filter_: dict, projection: dict | None = None, session: _Session | None = None
    ) -> _Cursor:
        return _Cursor(self._client, session, lambda: self._sync.find(filter_, projection))

    async def aggregate(self, pipeline: list, session: _Session | None = None) -> _Cursor:
        async with self._client.access(session):
            docs = list(self._sync.aggregate(pipeline))
        return _Cursor(self._client, session, lambda: docs)


class _Cursor:
    """A lazily run query; ``sort``/``skip``/``limit`` chain as on PyMongo cursors."""

    def __init__(self, client: AsyncMongomockClient, session: _Session | None, run: Callable):
        self._client = client
        self._session = session
        self._run = run
        self._steps: list[tuple[str, tuple]] = []

    def sort(self, *args: Any) -> _Cursor:
        self._steps.append(("sort", args))
        return self

    def skip(self, n: int) -> _Cursor:
        self._steps.append(("skip", (n,)))
        return self

    def limit(self, n: int) -> _Cursor:
        self._steps.append(("limit", (n,)))
        return self

    async def to_list(self, length: int | None = None) -> list[dict[str, Any]]:
        async with self._client.access(self._session):
            cursor = self._run()
            for name, args in self._steps:
                cursor = getattr(cursor, name)(*args)
            docs = list(cursor)
        return docs if length is None else docs[:length]
