"""MongoStore: the Store port on MongoDB, through PyMongo's async API.

Layout (database ``hie`` by default):

* one collection per resource type (named after it, e.g. ``Patient``), one document per
  resource: ``{_id: id, v: version, lu: last_updated, m: method, r: resource | None,
  idx: [{p, s, t, lo, hi, nl, nh, g}], sk: {param: {min, max}}}``. ``r`` is the FHIR
  JSON as a subdocument (``None`` for a tombstone); ``idx`` holds the current version's
  index rows (param, system, text, low, high, nlow, nhigh; absent columns are omitted),
  a composite row's components as the nested array ``g`` in component order (queried
  as ``g.0.t`` inside the ``$elemMatch``). Multikey indexes ``(idx.p, idx.t, idx.s)``,
  ``(idx.p, idx.lo)``, ``(idx.p, idx.hi)``, ``(idx.p, idx.nl)``, ``(idx.p, idx.nh)``
  and ``(idx.p, idx.g.0.t, idx.g.0.s)`` (a composite's first component) cover them;
  ``(lu desc, _id)`` serves the default search order. Resource type names are
  capitalised, so they never collide with the lower-case collections below.
* ``sk`` holds each parameter's sort keys, precomputed on write: ``min`` of the rows'
  ascending values and ``max`` of their descending ones (see :mod:`hie.store.query`).
  The first time a type is sorted on a parameter, ``(sk.P.min, lu desc, _id)`` and
  ``(sk.P.max desc, lu desc, _id)`` are created so that a sorted page is an index walk
  (deployments that sort on many parameters should build these ahead of time: the first
  build on a large collection takes a while). Resources without a value come after the
  others: a second query for ``sk.P.min`` (or ``max``) absent.
* ``history``: every version ever written, ``{t, i, v, lu, m, r, seq}``, where ``seq``
  is the outbox sequence number of the write and so orders commits.
* ``outbox``: one event per write, ``{_id: seq, t, i, v, m}``.
* ``counters``: ``{_id: name, n}`` for :meth:`MongoStore.next_value`; the outbox
  sequence is the document with the integer ``_id`` 0, which no counter name can take.
* ``snapshots``: ``{_id: key, refs: [...], n, exp}``, removed by a TTL index on ``exp``
  (MongoDB's TTL monitor runs about once a minute, so loading also checks ``exp``). One
  document per snapshot: 16 MB holds some 300,000 references.
* ``claims``: ``{_id: key, exp}`` for :meth:`MongoStore.claim`, removed by a TTL index on
  ``exp`` (claiming also checks ``exp``, the TTL monitor being that slow).

Chains and ``_has`` are resolved before the query runs: the inner query first (ids of
the chain's targets, or the ``Type/id`` references of the ``_has`` resources), then
the outer query with ``$in`` over what it returned. The ``$in`` list is as long as the
inner result, so a broad inner query (``subject:Patient.gender=female``) makes a large
command (a million ids approach the 16 MB command limit) and a slow one; selective
inner criteria are cheap.

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
(reads, ``read_many`` and compare-and-set writes target one shard each; searches,
chain and ``_has`` inner queries scatter to every shard and mongos merges the sorted
streams, each shard walking its own ``sk``/``lu`` index, so a page costs one index
walk per shard); ``history`` on ``{t: 1, i: 1}`` (instance history targets one
shard, and the unique ``(t, i, v)`` index is prefixed by the shard key); ``snapshots``
and ``claims`` on ``{_id: "hashed"}`` (a page load or a claim targets one shard; TTL
deletion works per shard);
``outbox`` and ``counters`` stay unsharded on the primary shard. ``scan`` walks ``_id``
in order, which a hashed key scatters: reindexing reads every shard.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from bson.decimal128 import Decimal128
from pymongo import (
    ASCENDING,
    DESCENDING,
    AsyncMongoClient,
    IndexModel,
    ReturnDocument,
    UpdateOne,
)
from pymongo.errors import CollectionInvalid, DuplicateKeyError, OperationFailure

from hie import jsonio
from hie.store.port import (
    INTERNAL_TYPES,
    JOURNAL_TYPES,
    REGISTER_TYPES,
    SEARCHED_INTERNAL_TYPES,
    ConditionConflict,
    Event,
    Page,
    Store,
    TransactionsUnavailable,
    Version,
    VersionConflict,
    Write,
    keeps_history,
)
from hie.store.query import (
    NUMBER_COLUMNS,
    AnyOf,
    Chain,
    Cond,
    Has,
    IdIn,
    IdSet,
    IndexRow,
    Match,
    Not,
    Query,
    Sort,
    Term,
    WrittenAfter,
)

#: Parses stored JSON with FHIR decimals as BSON Decimal128 (precision intact);
#: :func:`hie.jsonio.dumps` writes them back as the same text.
_BSON_JSON = json.JSONDecoder(parse_float=Decimal128)
_OUTBOX_SEQ = 0
_NAMESPACE_EXISTS = 48
_COLUMNS = {"system": "s", "text": "t", "low": "lo", "high": "hi", "nlow": "nl", "nhigh": "nh"}
_OPS = {"eq": "$eq", "lt": "$lt", "le": "$lte", "gt": "$gt", "ge": "$gte"}
_RESOURCE_INDEXES = [
    IndexModel([("idx.p", ASCENDING), ("idx.t", ASCENDING), ("idx.s", ASCENDING)]),
    IndexModel([("idx.p", ASCENDING), ("idx.lo", ASCENDING)]),
    IndexModel([("idx.p", ASCENDING), ("idx.hi", ASCENDING)]),
    IndexModel([("idx.p", ASCENDING), ("idx.nl", ASCENDING)]),
    IndexModel([("idx.p", ASCENDING), ("idx.nh", ASCENDING)]),
    IndexModel([("idx.p", ASCENDING), ("idx.g.0.t", ASCENDING), ("idx.g.0.s", ASCENDING)]),
    IndexModel([("lu", DESCENDING), ("_id", ASCENDING)]),
]
_HISTORY_INDEXES = [
    IndexModel([("t", ASCENDING), ("i", ASCENDING), ("v", ASCENDING)], unique=True),
    IndexModel([("lu", DESCENDING), ("seq", DESCENDING)]),
    IndexModel([("t", ASCENDING), ("lu", DESCENDING), ("seq", DESCENDING)]),
]
#: The outbox by type and sequence (what a type had written after a point).
_OUTBOX_INDEXES = [IndexModel([("t", ASCENDING), ("_id", ASCENDING)])]
#: For the ``snapshots`` and ``claims`` collections.
_EXPIRY_INDEXES = [IndexModel([("exp", ASCENDING)], expireAfterSeconds=0)]
_HISTORY_ORDER = {"lu": -1, "seq": -1}
_LIVE = {"r": {"$ne": None}}


class _Conflict(Exception):
    """A compare-and-set failed inside :meth:`MongoStore._apply`."""

    def __init__(self, write: Write):
        self.write = write


def to_filter(query: Query) -> dict[str, Any]:
    """Translate a query (AND of terms) into a MongoDB filter on resource documents.

    Chains and ``_has`` terms must have been resolved (:meth:`MongoStore.resolve`)."""
    return {"$and": [_term(t) for t in query]} if query else {}


def _term(term: Term) -> dict[str, Any]:
    if isinstance(term, Match):
        return {"idx": {"$elemMatch": _match(term)}}
    if isinstance(term, IdIn | IdSet):
        return {"_id": {"$in": list(term.ids)}}
    if isinstance(term, AnyOf):
        return {"$or": [_term(t) for t in term.terms]} if term.terms else {"_id": {"$in": []}}
    if isinstance(term, Not):
        return {"$nor": [_term(term.term)]}
    if isinstance(term, Chain | Has | WrittenAfter):
        raise TypeError(f"resolve chains, _has and WrittenAfter before translating: {term!r}")
    raise TypeError(f"not a query term: {term!r}")


def _match(term: Match) -> dict[str, Any]:
    """The ``$elemMatch`` body; operators repeated on one field go to an ``$and``."""
    cond: dict[str, Any] = {"p": term.param}
    repeated = []
    for c in term.conds:
        field = _COLUMNS[c.column] if c.part is None else f"g.{c.part}.{_COLUMNS[c.column]}"
        if c.part is not None:
            cond[f"g.{c.part}"] = {"$exists": True}
        op, value = _operator(c)
        ops = cond.setdefault(field, {})
        if op in ops:
            repeated.append({field: {op: value}})
        else:
            ops[op] = value
    return {"$and": [cond, *repeated]} if repeated else cond


def _operator(c: Cond) -> tuple[str, Any]:
    if c.column not in _COLUMNS:
        raise ValueError(f"unknown index column {c.column!r}")
    number = c.column in NUMBER_COLUMNS
    if c.op == "null":
        return "$eq", None
    if c.op in ("prefix", "contains"):
        if number:
            raise ValueError(f"{c.op} needs a text column, not {c.column!r}")
        return "$regex", ("^" if c.op == "prefix" else "") + re.escape(c.value)
    if c.op in ("in", "nin"):
        values = [float(v) for v in c.value] if number else list(c.value)
        return ("$in", values) if c.op == "in" else ("$nin", [*values, None])
    value = float(c.value) if number else c.value
    if c.op == "ne":  # a present value that differs: missing columns are not stored
        return "$nin", [value, None]
    if c.op not in _OPS:
        raise ValueError(f"unknown operator {c.op!r}")
    return _OPS[c.op], value


def _columns(row: IndexRow) -> dict[str, Any]:
    return {short: v for col, short in _COLUMNS.items() if (v := getattr(row, col)) is not None}


def _index_doc(rows: Sequence[IndexRow]) -> list[dict[str, Any]]:
    return [
        {"p": row.param}
        | _columns(row)
        | ({"g": [_columns(p) for p in row.parts]} if row.parts else {})
        for row in rows
    ]


def _bson_order(value: str | float) -> tuple[bool, str | float]:
    """Sort key of a value as BSON orders it: numbers before strings."""
    return isinstance(value, str), value


def _sort_keys(rows: Sequence[IndexRow]) -> dict[str, dict[str, Any]]:
    """``{param: {min, max}}``: the smallest ascending and largest descending value of
    each parameter's rows (absent when no row has one)."""
    keys: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = keys.setdefault(row.param, {})
        low = next((v for v in (row.low, row.nlow, row.text) if v is not None), None)
        high = next((v for v in (row.high, row.nhigh, row.text) if v is not None), None)
        if low is not None and ("min" not in entry or _bson_order(low) < _bson_order(entry["min"])):
            entry["min"] = low
        if high is not None and (
            "max" not in entry or _bson_order(high) > _bson_order(entry["max"])
        ):
            entry["max"] = high
    return {param: entry for param, entry in keys.items() if entry}


def _sort_field(key: Sort) -> str:
    if key.param == "_id":
        return "_id"
    if key.param == "_lastUpdated":
        return "lu"
    return f"sk.{key.param}.{'max' if key.descending else 'min'}"


def _order(sort: Sequence[Sort]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """``$addFields`` stages and the ``$sort`` spec for ``sort``, missing values last,
    ties by ``lu`` descending then ``_id``."""
    flags: dict[str, Any] = {}
    spec: dict[str, int] = {}
    for n, key in enumerate(sort):
        field = _sort_field(key)
        if field in spec:
            continue
        if field.startswith("sk."):
            flags[f"_missing{n}"] = {"$eq": [{"$ifNull": [f"${field}", None]}, None]}
            spec[f"_missing{n}"] = 1
        spec[field] = -1 if key.descending else 1
        if field == "_id":
            break
    else:
        spec.setdefault("lu", -1)
        spec["_id"] = 1
    return ([{"$addFields": flags}] if flags else []), spec


def _version(type_: str, id_: str, doc: dict[str, Any]) -> Version:
    body = None if doc["r"] is None else jsonio.dumps(doc["r"])
    return Version(type_, id_, doc["v"], doc["lu"], doc["m"], body)


def _history_version(doc: dict[str, Any]) -> Version:
    return _version(doc["t"], doc["i"], doc)


def _utc(value: str | dt.datetime) -> dt.datetime:
    """An instant as an aware UTC datetime (BSON dates come back naive, in UTC)."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


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
        """Connect, detect transaction support, create shared indexes and counters, and
        drop history versions and outbox events of register types that older versions
        kept."""
        self._client = AsyncMongoClient(self._uri) if self._injected is None else self._injected
        self._db = self._client[self._database]
        hello = await self._client.admin.command("hello")
        self._transactions = "setName" in hello or hello.get("msg") == "isdbgrid"
        self._indexed = set()
        await self._db["history"].create_indexes(_HISTORY_INDEXES)
        await self._db["snapshots"].create_indexes(_EXPIRY_INDEXES)
        await self._db["claims"].create_indexes(_EXPIRY_INDEXES)
        try:  # up front: a cross-shard transaction cannot create a collection
            await self._db.create_collection("outbox")
        except CollectionInvalid:
            pass
        except OperationFailure as exc:
            if exc.code != _NAMESPACE_EXISTS:
                raise
        await self._db["outbox"].create_indexes(_OUTBOX_INDEXES)
        for name in ("history", "outbox"):  # left by versions that kept them (indexed by t)
            await self._db[name].delete_many({"t": {"$in": sorted(REGISTER_TYPES)}})
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
        """A specific version from the history collection (a journal or register type's
        from its own collection), or None."""
        if not keeps_history(type_):
            doc = await self._db[type_].find_one({"_id": id_, "v": version})
            return None if doc is None else _version(type_, id_, doc)
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

    async def _ensure_indexes(self, types: Iterable[str], sort: Sequence[Sort] = ()) -> None:
        """Create each type's search indexes and those of ``sort``'s parameter keys
        (internal types that are never searched get none)."""
        for type_ in set(types) - set(INTERNAL_TYPES).difference(SEARCHED_INTERNAL_TYPES):
            wanted = {type_: _RESOURCE_INDEXES}
            for key in sort:
                field = _sort_field(key)
                if field.startswith("sk."):
                    direction = DESCENDING if key.descending else ASCENDING
                    order = [(field, direction), ("lu", DESCENDING), ("_id", ASCENDING)]
                    wanted[f"{type_}:{field}"] = [IndexModel(order)]
            for name, models in wanted.items():
                if name not in self._indexed:
                    await self._db[type_].create_indexes(models)
                    self._indexed.add(name)

    async def _apply(self, writes: Sequence[Write], session: Any) -> None:
        resources = [None if w.body is None else _BSON_JSON.decode(w.body.decode()) for w in writes]
        for w in writes:
            if w.guard:
                written = [x.id for x in writes if x.type == w.type]
                guard = await self.resolve(w.type, w.guard, session)
                others = _LIVE | {"_id": {"$nin": written}} | to_filter(guard)
                if await self._db[w.type].find_one(others, {"_id": 1}, session=session):
                    raise ConditionConflict(w.type, w.id)
        for w, resource in zip(writes, resources, strict=True):
            if w.type in JOURNAL_TYPES and w.prev_version:
                raise ValueError(f"{w.type}/{w.id}: journal resources are never changed")
            rows = w.index if resource is not None else ()
            doc = {
                "_id": w.id,
                "v": w.version,
                "lu": w.last_updated,
                "m": w.method,
                "r": resource,
                "idx": _index_doc(rows),
                "sk": _sort_keys(rows),
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
        pairs = zip(writes, resources, strict=True)
        kept = [(w, r) for w, r in pairs if keeps_history(w.type)]
        if not kept:
            return
        writes = [w for w, _ in kept]
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
                for k, (w, resource) in enumerate(kept)
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

    async def resolve(self, type_: str, query: Query, session: Any = None) -> Query:
        """``query`` with its chains, ``_has`` and :class:`WrittenAfter` terms replaced
        by what the inner queries found: a chain by a ``Match`` of its parameter's
        ``text`` ``in`` the targets' references, a ``_has`` by an :class:`IdIn` of the
        referenced ids, a :class:`WrittenAfter` by one of the ids the outbox shows."""
        return tuple([await self._resolve(type_, t, session) for t in query])

    async def _resolve(self, type_: str, term: Term, session: Any) -> Term:
        if isinstance(term, Chain):
            inner = _LIVE | to_filter(await self.resolve(term.target, term.query, session))
            docs = await self._db[term.target].find(inner, {"_id": 1}, session=session).to_list()
            refs = tuple(f"{term.target}/{d['_id']}" for d in docs)
            return Match(term.param, (Cond("text", "in", refs),))
        if isinstance(term, Has):
            prefix = f"{type_}/"
            inner = _LIVE | to_filter(await self.resolve(term.type, term.query, session))
            pipeline = [
                {"$match": inner},
                {"$unwind": "$idx"},
                {"$match": {"idx.p": term.param, "idx.t": {"$regex": "^" + re.escape(prefix)}}},
                {"$group": {"_id": "$idx.t"}},
            ]
            docs = await (await self._db[term.type].aggregate(pipeline, session=session)).to_list()
            return IdIn(tuple(d["_id"][len(prefix) :] for d in docs))
        if isinstance(term, WrittenAfter):
            events = {"t": type_, "_id": {"$gt": term.seq}}
            docs = await self._db["outbox"].find(events, {"i": 1}, session=session).to_list()
            return IdIn(tuple(dict.fromkeys(d["i"] for d in docs)))
        if isinstance(term, AnyOf):
            return AnyOf(tuple([await self._resolve(type_, t, session) for t in term.terms]))
        if isinstance(term, Not):
            return Not(await self._resolve(type_, term.term, session))
        return term

    async def history(
        self,
        type_: str | None = None,
        id_: str | None = None,
        *,
        since: str | None = None,
        at: str | None = None,
        count: int = 50,
        offset: int = 0,
        exclude: Collection[str] = (),
    ) -> Page:
        """Versions newest first (by ``lu``, then commit ``seq``); see :class:`Store`."""
        if type_ in JOURNAL_TYPES:
            return await self._journal_history(type_, id_, since, at, count, offset)
        match: dict[str, Any] = {}
        if type_ is not None:
            match["t"] = type_
            if id_ is not None:
                match["i"] = id_
        elif exclude:
            match["t"] = {"$nin": list(exclude)}
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
        total = await self._count("history", pipeline)
        docs = []
        if count > 0:
            docs = await self._aggregate("history", pipeline, _HISTORY_ORDER, count, offset)
        return Page([_history_version(d) for d in docs], total)

    async def _journal_history(
        self,
        type_: str,
        id_: str | None,
        since: str | None,
        at: str | None,
        count: int,
        offset: int,
    ) -> Page:
        """The history of a journal type: its resources' one version each, newest
        first (commit order: id order)."""
        match: dict[str, Any] = {} if id_ is None else {"_id": id_}
        if since is not None or at is not None:
            match["lu"] = {k: v for k, v in (("$gte", since), ("$lte", at)) if v is not None}
        pipeline: list[dict[str, Any]] = [{"$match": match}]
        total = await self._count(type_, pipeline)
        docs = []
        if count > 0:
            order = {"lu": DESCENDING, "_id": DESCENDING}
            docs = await self._aggregate(type_, pipeline, order, count, offset)
        return Page([_version(type_, d["_id"], d) for d in docs], total)

    async def search(
        self,
        type_: str,
        query: Query,
        *,
        sort: Sequence[Sort] = (),
        count: int = 50,
        offset: int = 0,
    ) -> Page:
        """Current, non-deleted resources matching ``query`` in ``sort`` order."""
        match = _LIVE | to_filter(await self.resolve(type_, query))
        total = await self._count(type_, [{"$match": match}])
        if count <= 0 or total <= offset:
            return Page([], total)
        docs = await self._sorted(type_, match, sort, count, offset, None)
        return Page([_version(type_, d["_id"], d) for d in docs], total)

    async def match_ids(
        self, type_: str, query: Query, *, sort: Sequence[Sort] = (), limit: int
    ) -> list[tuple[str, str]]:
        """``(id, last_updated)`` of the first ``limit`` matches, projected from the
        documents (no resource bodies are read back)."""
        if limit <= 0:
            return []
        match = _LIVE | to_filter(await self.resolve(type_, query))
        docs = await self._sorted(type_, match, sort, limit, 0, {"lu": 1})
        return [(d["_id"], d["lu"]) for d in docs]

    async def any_ids(self, type_: str, query: Query, *, limit: int) -> list[str]:
        """Ids of up to ``limit`` matches in the order the query plan finds them."""
        if limit <= 0:
            return []
        match = _LIVE | to_filter(await self.resolve(type_, query))
        docs = await self._db[type_].find(match, {"_id": 1}).limit(limit).to_list()
        return [d["_id"] for d in docs]

    async def _sorted(
        self,
        type_: str,
        match: dict[str, Any],
        sort: Sequence[Sort],
        limit: int,
        offset: int,
        projection: dict[str, int] | None,
    ) -> list[dict[str, Any]]:
        """Documents ``offset`` to ``offset + limit`` of ``match`` in ``sort`` order.

        With a parameter as first key, the documents that have its sort key come first
        (an index walk of ``sk.P``), then the others."""
        if not sort or not _sort_field(sort[0]).startswith("sk."):
            stages, spec = _order(sort)
            return await self._aggregate(
                type_, [{"$match": match}, *stages], spec, limit, offset, projection
            )
        await self._ensure_indexes([type_], sort[:1])
        field = _sort_field(sort[0])
        stages, spec = _order(sort[1:])
        having = [{"$match": {"$and": [match, {field: {"$exists": True}}]}}, *stages]
        first = {field: -1 if sort[0].descending else 1} | spec
        docs = await self._aggregate(type_, having, first, limit, offset, projection)
        if len(docs) == limit:
            return docs
        before = offset + len(docs) if docs else await self._count(type_, having)
        without = [{"$match": {"$and": [match, {field: {"$exists": False}}]}}, *stages]
        rest, skip = limit - len(docs), max(0, offset - before)
        return docs + await self._aggregate(type_, without, spec, rest, skip, projection)

    async def _count(self, collection: str, pipeline: list[dict[str, Any]]) -> int:
        coll = self._db[collection]
        counted = await (await coll.aggregate([*pipeline, {"$count": "n"}])).to_list()
        return counted[0]["n"] if counted else 0

    async def _aggregate(
        self,
        collection: str,
        pipeline: list[dict[str, Any]],
        order: dict[str, int],
        limit: int,
        offset: int,
        projection: dict[str, int] | None = None,
    ) -> list[dict[str, Any]]:
        stages = [{"$sort": order}, *([{"$skip": offset}] if offset else []), {"$limit": limit}]
        if projection:
            stages.append({"$project": projection})
        return await (await self._db[collection].aggregate([*pipeline, *stages])).to_list()

    async def read_many(self, type_: str, ids: Sequence[str]) -> list[Version]:
        """Live versions of ``ids`` in the given order (one ``$in`` query)."""
        docs = await self._db[type_].find(_LIVE | {"_id": {"$in": list(set(ids))}}).to_list()
        found = {d["_id"]: _version(type_, d["_id"], d) for d in docs}
        return [found[id_] for id_ in ids if id_ in found]

    async def scan(
        self, type_: str, *, after: str | None = None, limit: int = 500
    ) -> list[Version]:
        """Live resources by ascending ``_id`` after ``after``."""
        if limit <= 0:
            return []
        where = _LIVE | ({"_id": {"$gt": after}} if after is not None else {})
        docs = await self._db[type_].find(where).sort("_id", ASCENDING).limit(limit).to_list()
        return [_version(type_, d["_id"], d) for d in docs]

    async def set_index(
        self, type_: str, entries: Sequence[tuple[str, int, Sequence[IndexRow]]]
    ) -> int:
        """Replace ``idx`` and ``sk`` of each live resource still at its given version
        in one bulk write; returns how many matched."""
        if not entries:
            return 0
        await self._ensure_indexes([type_])
        done = await self._db[type_].bulk_write(
            [
                UpdateOne(
                    _LIVE | {"_id": id_, "v": version},
                    {"$set": {"idx": _index_doc(rows), "sk": _sort_keys(rows)}},
                )
                for id_, version, rows in entries
            ],
            ordered=False,
        )
        return done.matched_count

    async def save_snapshot(self, key: str, refs: Sequence[str], expires: str) -> None:
        """Store ``refs`` under ``key`` until ``expires`` (a TTL index removes it)."""
        doc = {"_id": key, "refs": list(refs), "n": len(refs), "exp": _utc(expires)}
        await self._db["snapshots"].replace_one({"_id": key}, doc, upsert=True)

    async def load_snapshot(
        self, key: str, offset: int, count: int
    ) -> tuple[list[str], int] | None:
        """A page of snapshot ``key``, or None when unknown or expired."""
        page = {"refs": {"$slice": [max(offset, 0), count]}} if count > 0 else {}
        doc = await self._db["snapshots"].find_one({"_id": key}, page | {"n": 1, "exp": 1})
        if doc is None or _utc(doc["exp"]) <= dt.datetime.now(dt.UTC):
            return None
        return doc.get("refs", []), doc["n"]

    async def claim(self, key: str, expires: str) -> bool:
        """Insert ``{_id: key}``; on a duplicate, take it over only if it has expired
        (one atomic conditional update, so one of concurrent claimers wins)."""
        claims = self._db["claims"]
        exp = _utc(expires)
        try:
            await claims.insert_one({"_id": key, "exp": exp})
            return True
        except DuplicateKeyError:
            now = dt.datetime.now(dt.UTC)
            taken = await claims.update_one(
                {"_id": key, "exp": {"$lte": now}}, {"$set": {"exp": exp}}
            )
            return taken.matched_count == 1

    async def events_after(self, seq: int, limit: int = 100) -> list[Event]:
        """Outbox events with ``seq`` greater than ``seq``, oldest first."""
        if limit <= 0:
            return []
        cursor = self._db["outbox"].find({"_id": {"$gt": seq}}).sort("_id", ASCENDING)
        return [
            Event(d["_id"], d["t"], d["i"], d["v"], d["m"])
            for d in await cursor.limit(limit).to_list()
        ]

    async def last_event(self) -> int:
        """The newest outbox event's ``seq`` (0 when there is none)."""
        cursor = self._db["outbox"].find({}, {"_id": 1}).sort("_id", DESCENDING)
        newest = await cursor.limit(1).to_list()
        return newest[0]["_id"] if newest else 0

    async def next_value(self, counter: str) -> int:
        """Atomically increment and return counter ``counter`` (first value 1)."""
        doc = await self._db["counters"].find_one_and_update(
            {"_id": counter}, {"$inc": {"n": 1}}, upsert=True, return_document=ReturnDocument.AFTER
        )
        return doc["n"]
