"""MongoStore specifics beyond the contract: layout, deployments without transactions,
query translation, and the mongomock transaction emulation the contract relies on."""

from __future__ import annotations

import orjson
import pytest
from pymongo.errors import InvalidOperation

from hie.store import TransactionsUnavailable, VersionConflict
from hie.store.mongo import MongoStore, to_filter
from hie.store.query import AnyOf, Chain, Cond, Has, IdIn, IndexRow, Match, Not, Sort
from tests.store.mongomock_async import AsyncMongomockClient
from tests.store.test_contract import bp, delete, named, put, ref, ts


async def opened(client: AsyncMongomockClient) -> MongoStore:
    store = MongoStore("mongodb://mongomock", "db", client=client)
    await store.open()
    return store


async def test_standalone_server_refuses_multi_write_commits():
    store = await opened(AsyncMongomockClient(replica_set=False))
    pair = [put("Patient", "a", 1, ts(1)), put("Patient", "b", 1, ts(1))]
    with pytest.raises(TransactionsUnavailable, match="replica set"):
        await store.commit(pair)
    assert await store.read("Patient", "a") is None
    assert await store.read("Patient", "b") is None
    assert (await store.history()).total == 0
    assert await store.events_after(0) == []

    await store.commit(pair[:1])
    assert (await store.read("Patient", "a")).version == 1
    assert [(e.id, e.version) for e in await store.events_after(0)] == [("a", 1)]
    with pytest.raises(VersionConflict):
        await store.commit(pair[:1])
    assert (await store.history()).total == 1


async def test_mongos_runs_transactions():
    client = AsyncMongomockClient(replica_set=False)
    client.hello["msg"] = "isdbgrid"
    store = await opened(client)
    await store.commit([put("Patient", "a", 1, ts(1)), put("Patient", "b", 1, ts(1))])
    assert (await store.history()).total == 2


async def test_document_layout_and_indexes():
    client = AsyncMongomockClient()
    store = await opened(client)
    v1 = put("Patient", "a", 1, ts(1), index=(IndexRow("name", text="ann"), IndexRow("d", low="x")))
    await store.commit([v1])
    await store.commit([delete("Patient", "a", 2, ts(2))])
    await store.open()  # reopening is idempotent

    db = client.sync["db"]
    assert db["Patient"].find_one({"_id": "a"}) == {
        "_id": "a",
        "v": 2,
        "lu": ts(2),
        "m": "DELETE",
        "r": None,
        "idx": [],
        "sk": {},
    }
    first = db["history"].find_one({"i": "a", "v": 1})
    assert first["r"] == orjson.loads(v1.body) and first["t"] == "Patient"
    assert db["history"].find_one({"i": "a", "v": 2})["seq"] > first["seq"]
    assert [d["_id"] for d in db["outbox"].find()] == [first["seq"], first["seq"] + 1]
    keys = [list(ix["key"]) for ix in db["Patient"].index_information().values()]
    assert [("idx.p", 1), ("idx.t", 1), ("idx.s", 1)] in keys
    assert [("idx.p", 1), ("idx.lo", 1)] in keys
    assert [("idx.p", 1), ("idx.nl", 1)] in keys
    assert [("idx.p", 1), ("idx.nh", 1)] in keys
    assert [("idx.p", 1), ("idx.g.0.t", 1), ("idx.g.0.s", 1)] in keys
    assert [("lu", -1), ("_id", 1)] in keys
    unique = [ix for ix in db["history"].index_information().values() if ix.get("unique")]
    assert [list(ix["key"]) for ix in unique] == [[("t", 1), ("i", 1), ("v", 1)]]


async def test_stored_rows_omit_absent_columns():
    client = AsyncMongomockClient()
    store = await opened(client)
    rows = (IndexRow("code", "http://loinc.org", "1-8"), IndexRow("date", low="a", high="b"))
    await store.commit([put("Observation", "o", 1, ts(1), index=rows)])
    assert client.sync["db"]["Observation"].find_one()["idx"] == [
        {"p": "code", "s": "http://loinc.org", "t": "1-8"},
        {"p": "date", "lo": "a", "hi": "b"},
    ]


def test_query_translation():
    term = Match(
        "s", (Cond("text", "prefix", "a.b*"), Cond("system", "null"), Cond("low", "ge", "1"))
    )
    assert to_filter((term, Not(IdIn(("x",))))) == {
        "$and": [
            {
                "idx": {
                    "$elemMatch": {
                        "p": "s",
                        "t": {"$regex": "^a\\.b\\*"},
                        "s": {"$eq": None},
                        "lo": {"$gte": "1"},
                    }
                }
            },
            {"$nor": [{"_id": {"$in": ["x"]}}]},
        ]
    }
    twice = Match("d", (Cond("low", "ge", "1"), Cond("low", "ge", "2"), Cond("low", "lt", "5")))
    assert to_filter((twice,)) == {
        "$and": [
            {
                "idx": {
                    "$elemMatch": {
                        "$and": [{"p": "d", "lo": {"$gte": "1", "$lt": "5"}}, {"lo": {"$gte": "2"}}]
                    }
                }
            }
        ]
    }
    assert to_filter((AnyOf(()),)) == {"$and": [{"_id": {"$in": []}}]}
    assert to_filter(()) == {}


async def test_emulated_transaction_undoes_on_abort():
    client = AsyncMongomockClient()
    coll = client["db"]["c"]
    await coll.insert_one({"_id": 1, "n": 1})
    async with client.start_session() as session:
        with pytest.raises(RuntimeError):
            async with await session.start_transaction():
                await coll.insert_one({"_id": 2}, session=session)
                await coll.replace_one({"_id": 1}, {"n": 2}, session=session)
                await coll.find_one_and_update(
                    {"_id": 3}, {"$inc": {"n": 1}}, upsert=True, session=session
                )
                await coll.replace_one({"_id": 1}, {"n": 3}, session=session)
                with pytest.raises(InvalidOperation):
                    await coll.find_one({"_id": 1})
                raise RuntimeError
        assert not session.in_transaction
    assert await coll.find({}).sort("_id").to_list() == [{"_id": 1, "n": 1}]

    async with client.start_session() as session:
        await session.with_transaction(lambda s: coll.insert_one({"_id": 2}, session=s))
    assert await coll.find_one({"_id": 2}) == {"_id": 2}


async def test_composites_and_sort_keys_in_documents():
    client = AsyncMongomockClient()
    store = await opened(client)
    rows = (
        IndexRow("d", low="2020", high="2021"),
        IndexRow("d", low="2019", high="2019-06"),
        IndexRow("n", nlow=1.5, nhigh=1.6),
        IndexRow("n", text="x"),
        bp("8480-6", 120.0),
        IndexRow("t", "sys"),
    )
    await store.commit([put("Observation", "o", 1, ts(1), index=rows)])
    doc = client.sync["db"]["Observation"].find_one()
    assert doc["idx"][4] == {
        "p": "cvq",
        "g": [{"s": "loinc", "t": "8480-6"}, {"nl": 120.0, "nh": 120.0}],
    }
    # Numbers sort before strings, as BSON orders them.
    assert doc["sk"] == {"d": {"min": "2019", "max": "2021"}, "n": {"min": 1.5, "max": "x"}}


def test_translation_of_ne_contains_in_and_components():
    term = Match(
        "x",
        (
            Cond("text", "ne", "a"),
            Cond("text", "contains", "b.c"),
            Cond("nlow", "in", (1, 2.5)),
            Cond("text", "eq", "c", part=1),
            Cond("nhigh", "gt", 3, part=1),
            Cond("system", "null", part=0),
        ),
    )
    assert to_filter((term,)) == {
        "$and": [
            {
                "idx": {
                    "$elemMatch": {
                        "p": "x",
                        "t": {"$nin": ["a", None], "$regex": "b\\.c"},
                        "nl": {"$in": [1.0, 2.5]},
                        "g.1": {"$exists": True},
                        "g.1.t": {"$eq": "c"},
                        "g.1.nh": {"$gt": 3.0},
                        "g.0": {"$exists": True},
                        "g.0.s": {"$eq": None},
                    }
                }
            }
        ]
    }
    with pytest.raises(TypeError, match="resolve"):
        to_filter((Not(Chain("subject", "Patient", ())),))


async def test_chains_and_has_resolve_to_in_lists():
    store = await opened(AsyncMongomockClient())
    await store.commit(
        [
            put("Patient", "p1", 1, ts(1), index=(named("ann"),)),
            put("Patient", "p2", 1, ts(1), index=(named("ann"),)),
            put("Observation", "o1", 1, ts(1), index=(ref("subject", "Patient/p1"),)),
            put("Observation", "o2", 1, ts(1), index=(ref("subject", "Group/p2"),)),
        ]
    )
    ann = (Match("name", (Cond("text", "eq", "ann"),)),)
    chain, has = Chain("subject", "Patient", ann), Has("Observation", "subject", ())
    resolved = await store.resolve("Observation", (Not(chain),))
    refs = resolved[0].term.conds[0]
    assert (refs.column, refs.op, sorted(refs.value)) == (
        "text",
        "in",
        ["Patient/p1", "Patient/p2"],
    )
    assert await store.resolve("Patient", (AnyOf((has,)),)) == (AnyOf((IdIn(("p1",)),)),)


async def test_sorting_creates_the_sort_key_indexes():
    client = AsyncMongomockClient()
    store = await opened(client)
    await store.commit([put("Thing", "a", 1, ts(1), index=(IndexRow("date", low="1", high="2"),))])
    await store.search("Thing", (), sort=(Sort("date"), Sort("name")))
    await store.match_ids("Thing", (), sort=(Sort("date", True),), limit=5)
    await store.search("Thing", (), sort=(Sort("_id"),))
    keys = [list(ix["key"]) for ix in client.sync["db"]["Thing"].index_information().values()]
    assert [("sk.date.min", 1), ("lu", -1), ("_id", 1)] in keys
    assert [("sk.date.max", -1), ("lu", -1), ("_id", 1)] in keys
    assert not any(k[0][0] == "sk.name.min" for k in keys)


async def test_snapshots_expire_through_a_ttl_index():
    client = AsyncMongomockClient()
    store = await opened(client)
    await store.save_snapshot("k", ["Patient/a"], "2999-01-01T00:00:00+02:00")
    indexes = client.sync["db"]["snapshots"].index_information().values()
    assert any(list(ix["key"]) == [("exp", 1)] and ix["expireAfterSeconds"] == 0 for ix in indexes)
    doc = client.sync["db"]["snapshots"].find_one()
    assert (doc["n"], doc["exp"].isoformat()[:19]) == (1, "2998-12-31T22:00:00")


async def test_opening_drops_register_type_versions_older_versions_kept():
    client = AsyncMongomockClient()
    store = await opened(client)
    await store.commit([put("HieAuditHead", "head", 1, ts(1)), put("Patient", "p", 1, ts(1))])
    db = client.sync["db"]
    for n in (1, 2):  # as a version of HIE that kept every head version wrote them
        db["history"].insert_one({"t": "HieAuditHead", "i": "head", "v": n, "seq": 100 + n})
        db["outbox"].insert_one({"_id": 100 + n, "t": "HieAuditHead", "i": "head", "v": n})
    await store.open()
    assert {d["t"] for d in db["history"].find()} == {"Patient"}
    assert {d["t"] for d in db["outbox"].find()} == {"Patient"}
    assert (await store.read("HieAuditHead", "head")).version == 1
