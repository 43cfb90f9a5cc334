"""verify(): a clean chain passes; tampering with the stored rows is named by record
and kind."""

from __future__ import annotations

import asyncio
import sqlite3
from decimal import Decimal

import pytest

from hie import jsonio
from hie.access.keys import KeyRing
from hie.audit import verify as verify_module
from hie.audit.chain import (
    CHAIN_URL,
    HEAD_ID,
    HEAD_TYPE,
    SEAL_TYPE,
    record_hash,
    record_id,
    seal_payload,
)
from hie.audit.verify import VerifyReport, verify
from hie.fhir.search.dates import now
from hie.store import Store, Write
from hie.store.sqlite import SqliteStore
from tests.audit.conftest import Tamper, event


def ref(seq: int) -> str:
    return f"AuditEvent/{record_id(seq)}"


async def build(new_log, store: Store, records: int = 25, *, stop: bool = True) -> None:
    """``records`` records, one per commit, sealed every 10 (and at the end on stop)."""
    log = await new_log(store, seal_records=10)
    for n in range(records):
        await log.append([event(n)])
    if stop:
        await log.stop()


def set_previous(body: dict, previous: str) -> None:
    link = next(e for e in body["extension"] if e["url"] == CHAIN_URL)
    link["extension"][0]["valueString"] = previous


def relink(tamper: Tamper, first: int, last: int) -> None:
    """Rewrite the links of records ``first``..``last`` and the head to match the
    stored bodies, as an attacker covering up an edit would."""
    for seq in range(first, last + 1):
        body = tamper.record(seq)
        set_previous(body, record_hash(tamper.record(seq - 1)))
        tamper.put("AuditEvent", record_id(seq), body)
    fix_head(tamper, last)


def fix_head(tamper: Tamper, last: int, **changes) -> None:
    head = tamper.head() | {"sequence": last, "hash": record_hash(tamper.record(last))}
    tamper.put(HEAD_TYPE, HEAD_ID, head | changes)


def edit(tamper: Tamper, seq: int) -> None:
    body = tamper.record(seq)
    body["outcome"] = "8"
    tamper.put("AuditEvent", record_id(seq), body)


def problem(report: VerifyReport) -> tuple:
    return (report.ok, report.kind, report.record)


async def test_an_empty_log_verifies(store, keys):
    report = await verify(store, keys)
    assert report == VerifyReport(True, 0, 0, 0, 0)


async def test_a_clean_chain_verifies_in_pages(store, keys, new_log, monkeypatch):
    monkeypatch.setattr(verify_module, "PAGE", 7)
    await build(new_log, store, 45)
    report = await verify(store, keys)
    assert report == VerifyReport(True, 45, 5, 45, 0)


def test_the_report_as_parameters():
    report = VerifyReport(False, 9, 1, 5, 4, "gone", ref(6), "removed")
    assert report.to_parameters() == {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "result", "valueBoolean": False},
            {"name": "records", "valueInteger": 9},
            {"name": "seals", "valueInteger": 1},
            {"name": "sealedThrough", "valueInteger": 5},
            {"name": "unsealed", "valueInteger": 4},
            {"name": "problem", "valueString": "gone"},
            {"name": "record", "valueReference": {"reference": ref(6)}},
            {"name": "kind", "valueCode": "removed"},
        ],
    }
    clean = VerifyReport(True, 0, 0, 0, 0).to_parameters()["parameter"]
    assert [p["name"] for p in clean] == ["result", "records", "seals", "sealedThrough", "unsealed"]


# ---------------------------------------------------------------- records altered
@pytest.mark.parametrize("seq", [5, 13, 24])
async def test_an_edited_record_is_named(store, keys, new_log, tamper, seq):
    await build(new_log, store)
    edit(tamper, seq)
    report = await verify(store, keys)
    assert problem(report) == (False, "altered", ref(seq))
    assert "was altered" in report.problem


@pytest.mark.parametrize("seq", [10, 25])
async def test_an_edited_sealed_record_is_named(store, keys, new_log, tamper, seq):
    await build(new_log, store)
    edit(tamper, seq)
    report = await verify(store, keys)
    assert problem(report) == (False, "altered", ref(seq))
    assert f"{SEAL_TYPE}/{record_id(seq)}" in report.problem


@pytest.mark.parametrize("seq", [1, 7, 11])
async def test_a_changed_link_is_named(store, keys, new_log, tamper, seq):
    await build(new_log, store)
    body = tamper.record(seq)
    set_previous(body, "f" * 64)
    tamper.put("AuditEvent", record_id(seq), body)
    report = await verify(store, keys)
    assert problem(report) == (False, "altered", ref(seq))
    assert "link" in report.problem


async def test_an_unsealed_last_record_edited_is_a_head_mismatch(store, keys, new_log, tamper):
    await build(new_log, store, stop=False)
    edit(tamper, 25)
    report = await verify(store, keys)
    assert problem(report) == (False, "head-mismatch", ref(25))


async def test_an_edit_without_a_seal_after_it_is_named_with_its_doubt(
    store, keys, new_log, tamper
):
    await build(new_log, store, stop=False)
    edit(tamper, 24)
    body = tamper.record(25)
    set_previous(body, "f" * 64)  # and the last record's link: two explanations
    tamper.put("AuditEvent", record_id(25), body)
    report = await verify(store, keys)
    assert problem(report) == (False, "altered", ref(24))
    assert "or that link was changed" in report.problem


async def test_a_rewritten_chain_is_caught_by_the_next_seal(store, keys, new_log, tamper):
    await build(new_log, store)
    edit(tamper, 15)
    relink(tamper, 16, 25)
    report = await verify(store, keys)
    assert problem(report) == (False, "altered", ref(11))
    assert f"{SEAL_TYPE}/{record_id(20)}" in report.problem
    assert f"{ref(11)} to {ref(20)}" in report.problem
    assert (report.sealed_through, report.unsealed) == (10, 15)


async def test_a_rewrite_after_the_last_seal_is_not_covered(store, keys, new_log, tamper):
    await build(new_log, store, stop=False)
    edit(tamper, 23)
    relink(tamper, 24, 25)
    report = await verify(store, keys)
    assert (report.ok, report.sealed_through, report.unsealed) == (True, 20, 5)


async def test_a_body_that_is_not_json_is_altered(keys, new_log, tmp_path):
    store = SqliteStore(tmp_path)  # a document store holds JSON only
    await store.open()
    try:
        await build(new_log, store)
        with sqlite3.connect(store.path) as conn:
            conn.execute("UPDATE resources SET body = x'00ff' WHERE id = ?", (record_id(4),))
        assert problem(await verify(store, keys)) == (False, "altered", ref(4))
    finally:
        await store.close()


# ---------------------------------------------------------------- removed, moved, added
@pytest.mark.parametrize("seq", [1, 5, 10])
async def test_a_deleted_row_is_removed(store, keys, new_log, tamper, seq):
    await build(new_log, store)
    tamper.delete("AuditEvent", record_id(seq))
    report = await verify(store, keys)
    assert problem(report) == (False, "removed", ref(seq))
    assert report.records == 24


async def test_the_store_refuses_to_delete_or_change_a_record(store, keys, new_log):
    """The store keeps the audit log as a journal: a record is never replaced, not
    even by a tombstone, so the chain stays whole."""
    await build(new_log, store)
    before = await store.read("AuditEvent", record_id(8))
    tombstone = Write("AuditEvent", record_id(8), 1, 2, now(), "DELETE", None)
    change = Write("AuditEvent", record_id(8), 1, 2, now(), "PUT", b"{}")
    for write in (tombstone, change):
        with pytest.raises(ValueError):
            await store.commit([write])
    assert await store.read("AuditEvent", record_id(8)) == before
    assert (await verify(store, keys)).ok


async def test_swapped_records_are_reordered(store, keys, new_log, tamper):
    await build(new_log, store)
    third, seventh = tamper.record(3), tamper.record(7)
    tamper.put("AuditEvent", record_id(3), seventh)
    tamper.put("AuditEvent", record_id(7), third)
    report = await verify(store, keys)
    assert problem(report) == (False, "reordered", ref(3))


async def test_last_records_removed_under_a_seal(store, keys, new_log, tamper):
    await build(new_log, store)  # sealed through 25 on stop
    for seq in (24, 25):
        tamper.delete("AuditEvent", record_id(seq))
    fix_head(tamper, 23)
    report = await verify(store, keys)
    assert problem(report) == (False, "removed", ref(24))
    assert f"{SEAL_TYPE}/{record_id(25)}" in report.problem


async def test_last_records_removed_after_the_last_seal(store, keys, new_log, tamper):
    await build(new_log, store, stop=False)  # sealed through 20
    for seq in (24, 25):
        tamper.delete("AuditEvent", record_id(seq))
    assert problem(await verify(store, keys)) == (False, "removed", ref(24))
    fix_head(tamper, 23)
    report = await verify(store, keys)
    assert report == VerifyReport(True, 23, 2, 20, 3)


async def test_a_record_past_the_head_is_inserted(store, keys, new_log, tamper):
    await build(new_log, store)
    extra = event(99) | {"id": record_id(26)}
    extra["extension"] = [
        {
            "url": CHAIN_URL,
            "extension": [{"url": "previous", "valueString": record_hash(tamper.record(25))}],
        }
    ]
    tamper.insert("AuditEvent", record_id(26), extra)
    assert problem(await verify(store, keys)) == (False, "inserted", ref(26))


async def test_a_record_with_a_foreign_id_is_inserted(store, keys, new_log, tamper):
    await build(new_log, store, 3)
    tamper.insert("AuditEvent", "x1", event(1) | {"id": "x1"})
    assert problem(await verify(store, keys)) == (False, "inserted", "AuditEvent/x1")


# ---------------------------------------------------------------- head and seals
async def test_an_altered_head_is_a_head_mismatch(store, keys, new_log, tamper):
    await build(new_log, store)
    tamper.put(HEAD_TYPE, HEAD_ID, tamper.head() | {"hash": "0" * 64})
    assert problem(await verify(store, keys)) == (False, "head-mismatch", ref(25))


async def test_a_deleted_head_is_a_head_mismatch(store, keys, new_log, tamper):
    await build(new_log, store)
    tamper.delete(HEAD_TYPE, HEAD_ID)
    report = await verify(store, keys)
    assert (report.ok, report.kind, report.problem) == (
        False,
        "head-mismatch",
        "the chain head is missing",
    )


async def test_an_altered_seal_is_invalid(store, keys, new_log, tamper):
    await build(new_log, store)
    seal = tamper.get(SEAL_TYPE, record_id(20))
    tamper.put(SEAL_TYPE, record_id(20), seal | {"hash": "1" * 64})
    report = await verify(store, keys)
    assert problem(report) == (False, "seal-invalid", ref(20))
    assert report.sealed_through == 25  # the seal at 25 still covers every record


async def test_forged_seals_over_a_rewritten_chain_are_invalid(
    store, keys, new_log, tamper, tmp_path
):
    await build(new_log, store)
    edit(tamper, 15)
    relink(tamper, 16, 25)
    forger = KeyRing(tmp_path / "forger")
    for seq in (20, 25):
        seal = tamper.get(SEAL_TYPE, record_id(seq))
        seal["hash"] = record_hash(tamper.record(seq))
        seal["kid"], seal["signature"] = forger.sign(seal_payload(seal))
        tamper.put(SEAL_TYPE, record_id(seq), seal)
    report = await verify(store, keys)
    assert problem(report) == (False, "seal-invalid", ref(20))


async def test_a_removed_seal_is_reported(store, keys, new_log, tamper):
    await build(new_log, store)
    tamper.delete(SEAL_TYPE, record_id(10))
    report = await verify(store, keys)
    assert (report.ok, report.kind) == (False, "seal-invalid")
    assert f"{SEAL_TYPE}/{record_id(10)}" in report.problem and "removed" in report.problem


async def test_a_removed_last_seal_is_reported(store, keys, new_log, tamper):
    await build(new_log, store)
    tamper.delete(SEAL_TYPE, record_id(25))
    report = await verify(store, keys)
    assert (report.ok, report.kind) == (False, "seal-invalid")
    assert f"{SEAL_TYPE}/{record_id(25)}" in report.problem


async def test_a_seal_body_moved_to_another_id_is_invalid(store, keys, new_log, tamper):
    await build(new_log, store)
    tamper.put(SEAL_TYPE, record_id(20), tamper.get(SEAL_TYPE, record_id(10)))
    report = await verify(store, keys)
    assert (report.ok, report.kind) == (False, "seal-invalid")
    assert "malformed" in report.problem


def test_the_sealed_bytes_are_canonical():
    seal = {"previousSeal": 0, "sealed": "t", "hash": "h", "sequence": 1, "kid": "k"}
    assert seal_payload(seal) == b'{"hash":"h","previousSeal":0,"sealed":"t","sequence":1}'
    assert jsonio.loads(seal_payload(seal)) == {k: seal[k] for k in seal if k != "kid"}


async def test_verify_while_the_log_grows(store, keys, new_log, monkeypatch):
    monkeypatch.setattr(verify_module, "PAGE", 5)
    log = await new_log(store, seal_records=7, seal_seconds=0.005)
    await log.append([event(n) for n in range(20)])
    reports = []

    async def grow():
        for n in range(80):
            await log.append([event(n)])

    async def check():
        while len(reports) < 6:
            reports.append(await verify(store, keys))
            await asyncio.sleep(0.01)

    await asyncio.gather(grow(), check())
    assert [r.problem for r in reports if not r.ok] == []
    assert len({r.records for r in reports}) > 1  # each saw the chain at another length


async def test_records_and_seals_added_during_the_walk_are_left_for_later(store, keys, new_log):
    log = await new_log(store, seal_records=10)
    await log.append([event(n) for n in range(5)])
    scan = store.scan

    async def busy_scan(type_, *, after=None, limit=500):
        if type_ == "AuditEvent" and after is None:  # the head is read: the log moves on
            await log.seal()  # a seal at the head's own sequence
            await log.append([event(n) for n in range(12)])  # records and a seal after it
        return await scan(type_, after=after, limit=limit)

    store.scan = busy_scan
    report = await verify(store, keys)
    assert report == VerifyReport(True, 5, 1, 5, 0)
    store.scan = scan
    assert await verify(store, keys) == VerifyReport(True, 17, 2, 17, 0)


async def test_decimals_hash_as_written(store, keys, new_log):
    log = await new_log(store)
    exact = {"url": "http://example.org/d", "valueDecimal": Decimal("1.50")}
    [id_] = await log.append([event(1) | {"extension": [exact]}])
    assert b'"valueDecimal":1.50' in (await store.read("AuditEvent", id_)).body
    assert (await verify(store, keys)).ok
