"""MongoStore: the Store port on MongoDB, through PyMongo's async API.

Layout (database ``hie`` by default):

* one collection per resource type (named after it, e.g. ``Patient``), one document per
  resource: ``{_id: id, v: version, lu: last_updated, m: method, r: resource | None,
  idx: [{p, s, t, lo, hi}]}``. ``r`` is the FHIR JSON as a subdocument (``None`` for a
  tombstone); ``idx`` holds the current version's index rows (param, system, text, low,
  high; absent columns are omitted), covered by the multikey indexes ``(idx.p, idx.t,
  idx.s)``, ``(idx.p, idx.lo)`` and ``(idx.p, idx.hi)``; ``(lu desc, _id)`` serves the
  search order. Resource type names are capitalised, so they never collide with the
  lower-case collections below.
* ``history``: every version ever written, ``{t, i, v, lu, m, r, seq}``, where ``seq``
  is the outbox sequence number of the write and so orders commits.
* ``outbox``: one event per write, ``{_id: seq, t, i, v, m}``.
* ``counters``: ``{_id: name, n}`` for :meth:`MongoStore.next_value`; the outbox
  sequence is the document with the integer ``_id`` 0, which no counter name can take.

A commit is one multi-document transaction (``session.with_transaction``, which starts
it with ``start_transaction`` and retries transient write conflicts); each write is a
compare-and-set on ``v``. The outbox counter is incremented inside the transaction, so
concurrent commits serialise on it and ``seq`` order is commit order; that is also what
makes a write's ``guard`` (checked inside the transaction) safe against a concurrent
conditional create: the later commit conflicts on the counter, and its retry sees the
earlier one's resource. Transactions need
a replica set or a sharded cluster: on a standalone server a commit of more than one
write raises :class:`TransactionsUnavailable`; a single write still proceeds (its
compare-and-set is atomic on its own; the history and outbox appends follow it without
a transaction, so a crash in between can lose them, and its guard is checked but not
atomically with it).

``Version.body`` is the stored resource re-serialised with :mod:`hie.jsonio`: identical
to the written bytes when the caller produced them with ``jsonio.dumps``. FHIR
decimals are stored as BSON ``Decimal128``, which keeps their precision (``1.00``).

Sharding (scale-out on a sharded cluster): resource collections on ``{_id: "hashed"}``
(reads and compare-and-set writes target one shard; searches scatter and merge on the
``(lu, _id)`` order); ``history`` on ``{t: 1, i: 1}`` (instance history targets one
shard, and the unique ``(t, i, v)`` index is prefixed by the shard key); ``outbox`` and
``counters`` stay unsharded on the primary shard.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from bson.decimal128 import Decimal128
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel, ReturnDocument
from pymongo.errors import CollectionInvalid, DuplicateKeyError, OperationFailure

from hie import jsonio
from hie.store.port import (
    ConditionConflict,
    Event,
    Page,
    Store,
    TransactionsUnavailable,
    Version,
    VersionConflict,
    Write,
)
from hie.store.query import AnyOf, IdIn, Match, Not, Query, Term

#: Parses stored JSON with FHIR decimals as BSON Decimal128 (precision intact);
#: :func:`hie.jsonio.dumps` writes them back as the same text.
_BSON_JSON = json.JSONDecoder(parse_float=Decimal128)
_OUTBOX_SEQ = 0
_NAMESPACE_EXISTS = 48
_COLUMNS = {"system": "s", "text": "t", "low": "lo", "high": "hi"}
_OPS = {"eq": "$eq", "lt": "$lt", "le": "$lte", "gt": "$gt", "ge": "$gte"}
_RESOURCE_INDEXES = [
    IndexModel([("idx.p", ASCENDING), ("idx.t", ASCENDING), ("idx.s", ASCENDING)]),
    IndexModel([("idx.p", ASCENDING), ("idx.lo", ASCENDING)]),
    IndexModel([("idx.p", ASCENDING), ("idx.hi", ASCENDING)]),
    IndexModel([("lu", DESCENDING), ("_id", ASCENDING)]),
]
_HISTORY_INDEXES = [
    IndexModel([("t", ASCENDING), ("i", ASCENDING), ("v", ASCENDING)], unique=True),
    IndexModel([("lu", DESCENDING), ("seq", DESCENDING)]),
    IndexModel([("t", ASCENDING), ("lu", DESCENDING), ("seq", DESCENDING)]),
]
_SEARCH_ORDER = {"lu": -1, "_id": 1}
_HISTORY_ORDER = {"lu": -1, "seq": -1}


class _Conflict(Exception):
    """A compare-and-set failed inside :meth:`MongoStore._apply`."""

    def __init__(self, write: Write):
        self.write = write


def to_filter(query: Query) -> dict[str, Any]:
    """Translate a query (AND of terms) into a MongoDB filter on resource documents."""
    return {"$and": [_term(t) for t in query]} if query else {}


def _term(term: Term) -> dict[str, Any]:
    if isinstance(term, Match):
        return {"idx": {"$elemMatch": _match(term)}}
    if isinstance(term, IdIn):
        return {"_id": {"$in": list(term.ids)}}
    if isinstance(term, AnyOf):
        return {"$or": [_term(t) for t in term.terms]} if term.terms else {"_id": {"$in": []}}
    if isinstance(term, Not):
        return {"$nor": [_term(term.term)]}
    raise TypeError(f"not a query term: {term!r}")


def _match(term: Match) -> dict[str, Any]:
    """The ``$elemMatch`` body; operators repeated on one column go to an ``$and``."""
    cond: dict[str, Any] = {"p": term.param}
    repeated = []
    for c in term.conds:
        if c.op == "null":
            op, value = "$eq", None
        elif c.op == "prefix":
            op, value = "$regex", "^" + re.escape(c.value or "")
        else:
            op, value = _OPS[c.op], c.value
        ops = cond.setdefault(_COLUMNS[c.column], {})
        if op in ops:
            repeated.append({_COLUMNS[c.column]: {op: value}})
        else:
            ops[op] = value
    return {"$and": [cond, *repeated]} if repeated else cond


def _index_doc(write: Write) -> list[dict[str, str]]:
    return [
        {"p": row.param}
        | {short: v for col, short in _COLUMNS.items() if (v := getattr(row, col)) is not None}
        for row in write.index
    ]


def _version(type_: str, id_: str, doc: dict[str, Any]) -> Version:
    body = None if doc["r"] is None else jsonio.dumps(doc["r"])
    return Version(type_, id_, doc["v"], doc["lu"], doc["m"], body)


def _history_version(doc: dict[str, Any]) -> Version:
    return _version(doc["t"], doc["i"], doc)


class MongoStore(Store):
    """The Store port on MongoDB (see the module docstring for layout and sharding)."""

    def __init__(self, uri: str, database: str = "hie", *, client: Any = None):
        self._uri = uri
        self._database = database
        self._injected = client
        self._client: Any = None
        self._db: Any = None
        self._transactions = False
        self._indexed: set[str] = set()

    async def open(self) -> None:
        """Connect, detect transaction support, create shared indexes and counters."""
        self._client = AsyncMongoClient(self._uri) if self._injected is None else self._injected
        self._db = self._client[self._database]
        hello = await self._client.admin.command("hello")
        self._transactions = "setName" in hello or hello.get("msg") == "isdbgrid"
        self._indexed = set()
        await self._db["history"].create_indexes(_HISTORY_INDEXES)
        try:  # up front: a cross-shard transaction cannot create a collection
            await self._db.create_collection("outbox")
        except CollectionInvalid:
            pass
        except OperationFailure as exc:
            if exc.code != _NAMESPACE_EXISTS:
                raise
        await self._db["counters"].update_one(
            {"_id": _OUTBOX_SEQ}, {"$setOnInsert": {"n": 0}}, upsert=True
        )

    async def close(self) -> None:
        """Close the client unless it was injected."""
        if self._client is not None and self._injected is None:
            await self._client.close()
        self._client = self._db = None

    async def read(self, type_: str, id_: str) -> Version | None:
        """The current version (possibly a tombstone), or None."""
        doc = await self._db[type_].find_one({"_id": id_})
        return None if doc is None else _version(type_, id_, doc)

    async def vread(self, type_: str, id_: str, version: int) -> Version | None:
        """A specific version from the history collection, or None."""
        doc = await self._db["history"].find_one({"t": type_, "i": id_, "v": version})
        return None if doc is None else _history_version(doc)

    async def commit(self, writes: Sequence[Write]) -> None:
        """Apply ``writes`` in one transaction, each as compare-and-set on ``v``."""
        if not writes:
            return
        if len(writes) > 1 and not self._transactions:
            raise TransactionsUnavailable(
                "MongoDB server is standalone: atomic multi-resource commits need a replica "
                "set or sharded cluster (start mongod with --replSet and initiate it)"
            )
        await self._ensure_indexes(w.type for w in writes)
        try:
            if self._transactions:
                async with self._client.start_session() as session:
                    await session.with_transaction(lambda s: self._apply(writes, s))
            else:
                await self._apply(writes, None)
        except _Conflict as conflict:
            w = conflict.write
            current = await self.read(w.type, w.id)
            actual = 0 if current is None else current.version
            raise VersionConflict(w.type, w.id, w.prev_version, actual) from None

    async def _ensure_indexes(self, types: Iterable[str]) -> None:
        for type_ in set(types) - self._indexed:
            await self._db[type_].create_indexes(_RESOURCE_INDEXES)
            self._indexed.add(type_)

    async def _apply(self, writes: Sequence[Write], session: Any) -> None:
        resources = [None if w.body is None else _BSON_JSON.decode(w.body.decode()) for w in writes]
        for w in writes:
            if w.guard:
                written = [x.id for x in writes if x.type == w.type]
                others = {"r": {"$ne": None}, "_id": {"$nin": written}} | to_filter(w.guard)
                if await self._db[w.type].find_one(others, {"_id": 1}, session=session):
                    raise ConditionConflict(w.type, w.id)
        for w, resource in zip(writes, resources, strict=True):
            doc = {
                "_id": w.id,
                "v": w.version,
                "lu": w.last_updated,
                "m": w.method,
                "r": resource,
                "idx": _index_doc(w),
            }
            coll = self._db[w.type]
            if w.prev_version == 0:
                try:
                    await coll.insert_one(doc, session=session)
                except DuplicateKeyError:
                    raise _Conflict(w) from None
            else:
                done = await coll.replace_one(
                    {"_id": w.id, "v": w.prev_version}, doc, session=session
                )
                if done.matched_count == 0:
                    raise _Conflict(w)
        counter = await self._db["counters"].find_one_and_update(
            {"_id": _OUTBOX_SEQ},
            {"$inc": {"n": len(writes)}},
            return_document=ReturnDocument.AFTER,
            session=session,
        )
        first = counter["n"] - len(writes) + 1
        await self._db["history"].insert_many(
            [
                {"t": w.type, "i": w.id, "v": w.version, "lu": w.last_updated, "m": w.method}
                | {"r": resource, "seq": first + k}
                for k, (w, resource) in enumerate(zip(writes, resources, strict=True))
            ],
            session=session,
        )
        await self._db["outbox"].insert_many(
            [
                {"_id": first + k, "t": w.type, "i": w.id, "v": w.version, "m": w.method}
                for k, w in enumerate(writes)
            ],
            session=session,
        )

    async def history(
        self,
        type_: str | None = None,
        id_: str | None = None,
        *,
        since: str | None = None,
        at: str | None = None,
        count: int = 50,
        offset: int = 0,
    ) -> Page:
        """Versions newest first (by ``lu``, then commit ``seq``); see :class:`Store`."""
        match: dict[str, Any] = {}
        if type_ is not None:
            match["t"] = type_
            if id_ is not None:
                match["i"] = id_
        if at is None:
            if since is not None:
                match["lu"] = {"$gte": since}
            pipeline: list[dict[str, Any]] = [{"$match": match}]
        else:
            match["lu"] = {"$lte": at}
            pipeline = [
                {"$match": match},
                {"$sort": _HISTORY_ORDER},
                {"$group": {"_id": {"t": "$t", "i": "$i"}, "d": {"$first": "$$ROOT"}}},
                {"$replaceRoot": {"newRoot": "$d"}},
            ]
            if since is not None:
                pipeline.append({"$match": {"lu": {"$gte": since}}})
        docs, total = await self._page("history", pipeline, _HISTORY_ORDER, count, offset)
        return Page([_history_version(d) for d in docs], total)

    async def search(self, type_: str, query: Query, *, count: int = 50, offset: int = 0) -> Page:
        """Current, non-deleted resources matching ``query``, newest first then by id."""
        match = {"r": {"$ne": None}} | to_filter(query)
        docs, total = await self._page(type_, [{"$match": match}], _SEARCH_ORDER, count, offset)
        return Page([_version(type_, d["_id"], d) for d in docs], total)

    async def _page(
        self, collection: str, pipeline: list[dict[str, Any]], order: dict, count: int, offset: int
    ) -> tuple[list[dict[str, Any]], int]:
        coll = self._db[collection]
        counted = await (await coll.aggregate([*pipeline, {"$count": "n"}])).to_list()
        total = counted[0]["n"] if counted else 0
        if count == 0:
            return [], total
        stages = [{"$sort": order}, *([{"$skip": offset}] if offset else []), {"$limit": count}]
        return await (await coll.aggregate([*pipeline, *stages])).to_list(), total

    async def events_after(self, seq: int, limit: int = 100) -> list[Event]:
        """Outbox events with ``seq`` greater than ``seq``, oldest first."""
        if limit <= 0:
            return []
        cursor = self._db["outbox"].find({"_id": {"$gt": seq}}).sort("_id", ASCENDING)
        return [
            Event(d["_id"], d["t"], d["i"], d["v"], d["m"])
            for d in await cursor.limit(limit).to_list()
        ]

    async def next_value(self, counter: str) -> int:
        """Atomically increment and return counter ``counter`` (first value 1)."""
        doc = await self._db["counters"].find_one_and_update(
            {"_id": counter}, {"$inc": {"n": 1}}, upsert=True, return_document=ReturnDocument.AFTER
        )
        return doc["n"]
