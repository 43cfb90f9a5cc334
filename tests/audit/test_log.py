"""AuditLog: group commit, atomicity with the request's data writes, conflicts,
failures, several processes on one store, and seals."""

from __future__ import annotations

import asyncio

import pytest

from hie import jsonio
from hie.audit.chain import CHAIN_URL, GENESIS, HEAD_ID, HEAD_TYPE, SEAL_TYPE, record_id
from hie.audit.log import AuditLog, AuditUnavailable
from hie.audit.verify import verify
from hie.fhir.search.dates import now
from hie.store import ConditionConflict, Store, VersionConflict, Write
from hie.store.mongo import MongoStore
from hie.store.query import Cond, IndexRow, Match
from hie.store.sqlite import SqliteStore
from tests.audit.conftest import event, make_write


def patient(id_: str, prev_version: int = 0, index=(), guard=()) -> Write:
    """A data write of the request being audited."""
    w = make_write("Patient", id_, {"active": True})
    return Write(
        w.type, w.id, prev_version, prev_version + 1, w.last_updated, "PUT", w.body, index, guard
    )


def count_commits(store: Store) -> list[int]:
    """Wrap ``store.commit``; the returned list collects each commit's size."""
    commits: list[int] = []
    commit = store.commit

    async def counted(writes):
        commits.append(len(writes))
        await commit(writes)

    store.commit = counted
    return commits


async def stored_ids(store: Store, type_: str = "AuditEvent") -> list[str]:
    return [v.id for v in await store.scan(type_, limit=100_000)]


async def test_records_are_chained_across_group_commits(store, keys, new_log):
    log = await new_log(store)
    ids = []
    for n in range(5):
        ids += await log.append([event(n), event(n + 100)])
    assert ids == [record_id(seq) for seq in range(1, 11)]
    first = jsonio.loads((await store.read("AuditEvent", ids[0])).body)
    assert first["id"] == ids[0]
    assert first["meta"]["versionId"] == "1"
    assert first["extension"][-1] == {
        "url": CHAIN_URL,
        "extension": [{"url": "previous", "valueString": GENESIS}],
    }
    head = jsonio.loads((await store.read(HEAD_TYPE, HEAD_ID)).body)
    assert head["sequence"] == 10
    report = await verify(store, keys)
    assert (report.ok, report.records, report.problem) == (True, 10, None)


async def test_callers_extension_is_kept_and_not_mutated(store, keys, new_log):
    log = await new_log(store)
    mine = {"url": "http://example.org/x", "valueString": "y"}
    sent = event(1) | {"extension": [mine]}
    [id_] = await log.append([sent])
    assert sent["extension"] == [mine]
    stored = jsonio.loads((await store.read("AuditEvent", id_)).body)
    assert stored["extension"][0] == mine
    assert stored["extension"][1]["url"] == CHAIN_URL


async def test_concurrent_appends_share_commits(store, keys, new_log):
    log = await new_log(store)
    commits = count_commits(store)
    results = await asyncio.gather(*(log.append([event(n)]) for n in range(200)))
    ids = [id_ for r in results for id_ in r]
    assert sorted(ids) == [record_id(seq) for seq in range(1, 201)]
    assert len(commits) < 200
    assert (await verify(store, keys)).ok


async def test_appends_while_a_commit_is_in_flight_queue_for_the_next(store, keys, new_log):
    log = await new_log(store)
    commits = count_commits(store)
    first = asyncio.ensure_future(log.append([event(0)]))
    await asyncio.sleep(0)  # the writer takes the first call alone
    rest = [asyncio.ensure_future(log.append([event(n)])) for n in range(1, 50)]
    await asyncio.gather(first, *rest)
    assert len(commits) <= 3
    assert (await verify(store, keys)).records == 50


async def test_data_writes_commit_with_their_events(store, keys, new_log):
    log = await new_log(store)
    [id_] = await log.append([event(1)], [patient("p1")])
    assert id_ == record_id(1)
    assert (await store.read("Patient", "p1")).version == 1
    assert await store.read("AuditEvent", id_) is not None


async def test_a_conflicting_caller_fails_alone(store, keys, new_log):
    await store.commit([patient("taken")])
    log = await new_log(store)
    calls = [log.append([event(n)], [patient(f"p{n}")]) for n in range(5)]
    calls.insert(2, log.append([event(99), event(98)], [patient("taken"), patient("new")]))
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[2], VersionConflict)
    assert results[2].id == "taken"
    ids = [id_ for r in results if isinstance(r, list) for id_ in r]
    assert sorted(ids) == [record_id(seq) for seq in range(1, 6)]
    assert await store.read("Patient", "new") is None  # nothing of the failed call
    assert len(await store.read_many("Patient", [f"p{n}" for n in range(5)])) == 5
    report = await verify(store, keys)
    assert (report.ok, report.records) == (True, 5)


async def test_a_guarded_caller_gets_its_condition_conflict(store, keys, new_log):
    mrn = (IndexRow("identifier", "mrn", "7"),)
    guard = (Match("identifier", (Cond("system", "eq", "mrn"), Cond("text", "eq", "7"))),)
    await store.commit([patient("first", index=mrn)])
    log = await new_log(store)
    results = await asyncio.gather(
        log.append([event(1)], [patient("second", index=mrn, guard=guard)]),
        log.append([event(2)], [patient("other")]),
        return_exceptions=True,
    )
    assert isinstance(results[0], ConditionConflict)
    assert results[1] == [record_id(1)]
    assert await store.read("Patient", "second") is None
    assert (await verify(store, keys)).ok


async def test_two_callers_writing_one_resource_commit_one_after_the_other(store, keys, new_log):
    log = await new_log(store)
    results = await asyncio.gather(
        log.append([event(1)], [patient("p")]),
        log.append([event(2)], [patient("p")]),
        return_exceptions=True,
    )
    assert results[0] == [record_id(1)]
    assert isinstance(results[1], VersionConflict)
    assert (await verify(store, keys)).records == 1


async def test_a_store_failure_is_audit_unavailable_and_stores_nothing(store, keys, new_log):
    log = await new_log(store)
    commit = store.commit

    async def broken(writes):
        raise RuntimeError("disk on fire")

    store.commit = broken
    with pytest.raises(AuditUnavailable) as caught:
        await log.append([event(1)], [patient("p1")])
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert await stored_ids(store) == []
    assert await store.read("Patient", "p1") is None
    assert await store.read(HEAD_TYPE, HEAD_ID) is None
    store.commit = commit
    assert await log.append([event(2)]) == [record_id(1)]
    assert (await verify(store, keys)).ok


async def test_a_record_that_cannot_be_built_fails_only_its_caller(store, keys, tmp_path):
    def picky(type_: str, id_: str, resource: dict, instant: str) -> Write:
        if resource.get("outcome") == "bad":
            raise ValueError("cannot index")
        return make_write(type_, id_, resource, instant)

    log = AuditLog(store, keys, picky)
    await log.start()
    results = await asyncio.gather(
        log.append([event(1)]),
        log.append([event(2) | {"outcome": "bad"}], [patient("p")]),
        log.append([event(3)]),
        return_exceptions=True,
    )
    await log.stop()
    assert isinstance(results[1], AuditUnavailable)
    assert results[0] == [record_id(1)] and results[2] == [record_id(2)]
    assert await store.read("Patient", "p") is None
    assert (await verify(store, keys)).ok


async def test_append_needs_events_and_a_running_log(store, keys, new_log):
    log = AuditLog(store, keys, make_write)
    with pytest.raises(AuditUnavailable):
        await log.append([event(1)])
    log = await new_log(store)
    with pytest.raises(ValueError):
        await log.append([])
    await log.stop()
    with pytest.raises(AuditUnavailable):
        await log.append([event(1)])


async def test_stop_commits_what_is_pending(store, keys, new_log):
    log = await new_log(store)
    pending = [asyncio.ensure_future(log.append([event(n)])) for n in range(30)]
    await asyncio.sleep(0)
    await log.stop()
    assert len({id_ for p in pending for id_ in p.result()}) == 30
    report = await verify(store, keys)
    assert (report.ok, report.records, report.sealed_through) == (True, 30, 30)


def second_store(store: Store, tmp_path) -> Store:
    """Another store on the same database, as a second server process opens it."""
    if isinstance(store, SqliteStore):
        return SqliteStore(tmp_path)
    assert isinstance(store, MongoStore)
    return MongoStore("mongodb://mongomock", client=store._client)


async def test_two_processes_keep_one_chain(store, keys, new_log, tmp_path):
    other = second_store(store, tmp_path)
    await other.open()
    try:
        a = await new_log(store, seal_records=7)
        b = await new_log(other, seal_records=7)
        await a.append([event(0)])  # b's head is stale from here on
        results = []
        for _ in range(5):
            results += await asyncio.gather(
                *(log.append([event(n), event(n)]) for n in range(6) for log in (a, b))
            )
        await a.stop()
        await b.stop()
    finally:
        await other.close()
    ids = sorted(id_ for r in results for id_ in r)
    assert ids == [record_id(seq) for seq in range(2, 2 + 5 * 12 * 2)]
    report = await verify(store, keys)
    assert (report.ok, report.records, report.unsealed) == (True, 121, 0), report.problem


# ---------------------------------------------------------------- seals
async def seals(store: Store) -> list[dict]:
    return [jsonio.loads(v.body) for v in await store.scan(SEAL_TYPE, limit=10_000)]


async def test_seals_by_count(store, keys, new_log):
    log = await new_log(store, seal_records=10)
    for n in range(25):
        await log.append([event(n)])
    found = await seals(store)
    assert [s["sequence"] for s in found] == [10, 20]
    assert [s["previousSeal"] for s in found] == [0, 10]
    assert found[0]["kid"] == keys.active_kid
    report = await verify(store, keys)
    assert (report.ok, report.seals, report.sealed_through, report.unsealed) == (True, 2, 20, 5)


async def test_a_large_group_seals_once_at_its_end(store, keys, new_log):
    log = await new_log(store, seal_records=10)
    await log.append([event(n) for n in range(35)])
    assert [s["sequence"] for s in await seals(store)] == [35]


async def test_seals_by_timer_only_when_records_were_added(store, keys, new_log):
    log = await new_log(store, seal_seconds=0.05)
    await log.append([event(1), event(2), event(3)])
    for _ in range(100):
        if await seals(store):
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    assert [s["sequence"] for s in await seals(store)] == [3]
    await log.append([event(4)])
    await asyncio.sleep(0.3)
    assert [s["sequence"] for s in await seals(store)] == [3, 4]


async def test_seal_on_stop_and_on_request(store, keys, new_log):
    log = await new_log(store)
    await log.append([event(1)])
    await log.seal()
    await log.seal()  # nothing added since: no new seal
    await log.append([event(2)])
    await log.stop()
    assert [s["sequence"] for s in await seals(store)] == [1, 2]
    report = await verify(store, keys)
    assert (report.ok, report.seals, report.sealed_through, report.unsealed) == (True, 2, 2, 0)


async def test_a_restarted_log_continues_the_chain(store, keys, new_log):
    log = await new_log(store, seal_records=3)
    await log.append([event(n) for n in range(4)])
    await log.stop()
    log = await new_log(store, seal_records=3)
    assert await log.append([event(5)]) == [record_id(5)]
    await log.stop()
    found = await seals(store)
    assert [(s["sequence"], s["previousSeal"]) for s in found] == [(4, 0), (5, 4)]
    assert (await verify(store, keys)).ok


@pytest.mark.parametrize("how", ["row deleted", "tombstoned"])
async def test_a_log_whose_head_is_gone_refuses_to_write(store, keys, new_log, tamper, how):
    log = await new_log(store)
    await log.append([event(1)])
    await log.stop()
    if how == "row deleted":
        tamper.delete(HEAD_TYPE, HEAD_ID)
    else:
        await store.commit([Write(HEAD_TYPE, HEAD_ID, 2, 3, now(), "DELETE", None)])
    log = await new_log(store)
    commits = count_commits(store)
    with pytest.raises(AuditUnavailable, match="cannot be written"):
        await log.append([event(2)], [patient("p")])
    assert len(commits) == 1  # no retries on a chain that cannot continue
    assert await store.read("Patient", "p") is None
