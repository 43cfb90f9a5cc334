"""MongoStore specifics beyond the contract: layout, deployments without transactions,
query translation, and the mongomock transaction emulation the contract relies on."""

from __future__ import annotations

import orjson
import pytest
from pymongo.errors import InvalidOperation

from hie.store import TransactionsUnavailable, VersionConflict
from hie.store.mongo import MongoStore, to_filter
from hie.store.query import AnyOf, Cond, IdIn, IndexRow, Match, Not
from tests.store.mongomock_async import AsyncMongomockClient
from tests.store.test_contract import delete, put, ts


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
    }
    first = db["history"].find_one({"i": "a", "v": 1})
    assert first["r"] == orjson.loads(v1.body) and first["t"] == "Patient"
    assert db["history"].find_one({"i": "a", "v": 2})["seq"] > first["seq"]
    assert [d["_id"] for d in db["outbox"].find()] == [first["seq"], first["seq"] + 1]
    keys = [list(ix["key"]) for ix in db["Patient"].index_information().values()]
    assert [("idx.p", 1), ("idx.t", 1), ("idx.s", 1)] in keys
    assert [("idx.p", 1), ("idx.lo", 1)] in keys
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
