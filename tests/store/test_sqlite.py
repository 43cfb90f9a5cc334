"""SqliteStore specifics beyond the contract: schema migration, query plans driven by
the search indexes, the walk plans for broad results, snapshot clean-up."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator

import pytest

from hie.store import StoreError
from hie.store import sqlite as sqlite_store
from hie.store.query import Chain, Cond, Has, IndexRow, Match, Not, Query, Sort
from hie.store.sqlite import SqliteStore, _Compiler, successor
from tests.store.oracle import check_against_oracle
from tests.store.test_contract import bp, delete, ids, named, put, ts

# The schema as released before numbers, composites and sorting (user_version 0).
SCHEMA_0 = """
CREATE TABLE resources (
    type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL,
    last_updated TEXT NOT NULL, method TEXT NOT NULL, body BLOB,
    PRIMARY KEY (type, id)
) WITHOUT ROWID;
CREATE INDEX resources_lu ON resources (type, last_updated DESC, id);
CREATE TABLE history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL,
    last_updated TEXT NOT NULL, method TEXT NOT NULL, body BLOB
);
CREATE UNIQUE INDEX history_version ON history (type, id, version);
CREATE INDEX history_lu ON history (last_updated, seq);
CREATE INDEX history_type_lu ON history (type, last_updated, seq);
CREATE TABLE search_index (
    type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
    system TEXT, text TEXT, low TEXT, high TEXT
);
CREATE INDEX search_text ON search_index (type, param, text, system);
CREATE INDEX search_low ON search_index (type, param, low);
CREATE INDEX search_high ON search_index (type, param, high);
CREATE INDEX search_owner ON search_index (type, id);
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, method TEXT NOT NULL
);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@pytest.fixture
async def store(tmp_path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(tmp_path)
    await opened.open()
    yield opened
    await opened.close()


def write_schema_0(path) -> None:
    """A database of schema 0 holding Patients a (live) and b (deleted), Observation o."""
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_0)
    a, o = put("Patient", "a", 1, ts(1)), put("Observation", "o", 1, ts(2))
    rows = [
        ("Patient", "a", 1, ts(1), "POST", a.body),
        ("Patient", "b", 2, ts(3), "DELETE", None),
        ("Observation", "o", 1, ts(2), "POST", o.body),
    ]
    conn.executemany("INSERT INTO resources VALUES (?, ?, ?, ?, ?, ?)", rows)
    conn.executemany(
        "INSERT INTO history (type, id, version, last_updated, method, body)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        rows,
    )
    conn.executemany(
        "INSERT INTO search_index VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            ("Patient", "a", "name", None, "ann", None, None),
            ("Patient", "a", "birthdate", None, None, "1990-01-01", "1990-01-02"),
            ("Observation", "o", "subject", "Patient", "Patient/a", None, None),
            ("Observation", "o", "code", "loinc", "1-8", None, None),
        ],
    )
    conn.commit()
    conn.close()


def schema(path) -> tuple[int, set[str], dict[str, list[str]]]:
    """user_version, search_index columns and the search indexes' columns."""
    conn = sqlite3.connect(path)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    columns = {row[1] for row in conn.execute("PRAGMA table_info(search_index)")}
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")]
    indexes = {n: [r[2] for r in conn.execute(f"PRAGMA index_info({n})")] for n in names}
    conn.close()
    return version, columns, indexes


async def test_opens_and_migrates_a_schema_0_database(tmp_path):
    write_schema_0(tmp_path / "hie.sqlite3")
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        version, columns, indexes = schema(store.path)
        assert version == sqlite_store.SCHEMA_VERSION == 3
        assert {"nlow", "nhigh", "grp"} <= columns
        assert "resources_lu" not in indexes and "resources_live" in indexes
        assert indexes["search_owner"] == ["type", "id", "param"]
        assert indexes["search_text"] == ["type", "param", "text", "system", "id"]

        assert await ids(store, "Patient", ()) == ["a"]
        assert await ids(store, "Patient", (Match("name", (Cond("text", "prefix", "an"),)),)) == [
            "a"
        ]
        ann = Chain("subject", "Patient", (Match("name", (Cond("text", "eq", "ann"),)),))
        assert await ids(store, "Observation", (ann,)) == ["o"]
        assert await ids(store, "Patient", (Has("Observation", "subject", ()),)) == ["a"]
        await store.commit(
            [put("Patient", "c", 1, ts(4), index=(IndexRow("birthdate", low="1980"),))]
        )
        page = await store.search("Patient", (), sort=(Sort("birthdate"),))
        assert [v.id for v in page.items] == ["c", "a"] and page.total == 2
        await store.commit(
            [put("Observation", "n", 1, ts(5), index=(bp("x", 2.5), IndexRow("v", nlow=10.0)))]
        )
        cvq = Match("cvq", (Cond("nlow", "gt", 2, part=1),))
        assert await ids(store, "Observation", (cvq,)) == ["n"]
        assert await ids(store, "Observation", (Match("v", (Cond("nlow", "gt", 9.5),)),)) == ["n"]
        await store.commit([delete("Patient", "a", 2, ts(6))])
        assert (await store.search("Patient", (), count=0)).total == 1
    finally:
        await store.close()

    reopened = SqliteStore(tmp_path)
    await reopened.open()
    try:
        assert schema(reopened.path)[0] == 3
        assert await ids(reopened, "Patient", ()) == ["c"]
        assert await ids(
            reopened, "Observation", (Match("code", (Cond("text", "eq", "1-8"),)),)
        ) == ["o"]
    finally:
        await reopened.close()


async def test_migrates_schema_1_audit_records_to_the_journal(tmp_path):
    """Schema 1 kept AuditEvents like any type (history, outbox, ``search_index``, and
    an ``unindexed`` list); schema 2 keeps their text rows in ``journal_terms`` only."""
    store = SqliteStore(tmp_path)
    await store.open()
    await store.close()
    a = put("AuditEvent", "0001", 1, ts(1))
    rows = [
        ("AuditEvent", "0001", "action", None, "R", None, None, None, None, None),
        ("AuditEvent", "0001", "entity", "Patient", "Patient/1", None, None, None, None, None),
        ("AuditEvent", "0001", "date", None, None, ts(1), ts(1), None, None, None),
        ("Patient", "1", "name", None, "ann", None, None, None, None, None),
    ]
    conn = sqlite3.connect(tmp_path / "hie.sqlite3")
    conn.executescript(
        "DROP TABLE journal_terms; CREATE TABLE unindexed (type TEXT NOT NULL,"
        " id TEXT NOT NULL, PRIMARY KEY (type, id)) WITHOUT ROWID; PRAGMA user_version = 1;"
    )
    for table in ("resources", "history"):
        cols = "type, id, version, last_updated, method, body"
        conn.execute(
            f"INSERT INTO {table} ({cols}) VALUES (?, ?, ?, ?, ?, ?)",
            ("AuditEvent", "0001", 1, ts(1), "POST", a.body),
        )
    conn.execute(
        "INSERT INTO outbox (type, id, version, method) VALUES ('AuditEvent', '0001', 1, 'POST')"
    )
    conn.executemany("INSERT INTO search_index VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()

    await store.open()
    try:
        conn = sqlite3.connect(tmp_path / "hie.sqlite3")
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        assert conn.execute("SELECT * FROM journal_terms ORDER BY param").fetchall() == [
            ("AuditEvent", "action", "R", "0001", ""),
            ("AuditEvent", "entity", "Patient/1", "0001", "Patient"),
        ]
        for table in ("history", "outbox", "search_index"):
            found = conn.execute(f"SELECT count(*) FROM {table} WHERE type = 'AuditEvent'")
            assert found.fetchone()[0] == 0, table
        assert conn.execute("SELECT count(*) FROM search_index").fetchone()[0] == 1
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "unindexed" not in names
        conn.close()
        entity = Match("entity", (Cond("text", "eq", "Patient/1"),))
        assert await ids(store, "AuditEvent", (entity,)) == ["0001"]
        assert (await store.vread("AuditEvent", "0001", 1)).body == a.body
    finally:
        await store.close()


async def test_migrates_schema_2_audit_head_versions_away(tmp_path):
    """Schema 2 kept every version of the audit chain's head (one per group commit) in
    ``history`` and ``outbox``; schema 3 keeps only its current row."""
    store = SqliteStore(tmp_path)
    await store.open()
    await store.commit([put("HieAuditHead", "head", 1, ts(1)), put("Patient", "p", 1, ts(1))])
    await store.close()
    conn = sqlite3.connect(tmp_path / "hie.sqlite3")
    for version in (1, 2):
        conn.execute(
            "INSERT INTO history (type, id, version, last_updated, method, body)"
            " VALUES ('HieAuditHead', 'head', ?, ?, 'PUT', '{}')",
            (version, ts(version)),
        )
        conn.execute(
            "INSERT INTO outbox (type, id, version, method) VALUES ('HieAuditHead', 'head', ?,"
            " 'PUT')",
            (version,),
        )
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()

    await store.open()
    try:
        assert schema(store.path)[0] == 3
        conn = sqlite3.connect(store.path)
        for table in ("history", "outbox"):
            left = conn.execute(f"SELECT DISTINCT type FROM {table}").fetchall()
            assert left == [("Patient",)], table
        conn.close()
        assert (await store.read("HieAuditHead", "head")).version == 1
        await store.commit([put("Patient", "q", 1, ts(3))])  # numbered after the removed
        assert [(e.seq, e.id) for e in await store.events_after(3)] == [(4, "q")]
    finally:
        await store.close()


async def test_a_newer_schema_is_refused(tmp_path):
    conn = sqlite3.connect(tmp_path / "hie.sqlite3")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        await SqliteStore(tmp_path).open()


@pytest.mark.parametrize("seed", [20260101, 7])
async def test_walk_plans_agree_with_reference_evaluator(store, monkeypatch, seed):
    """With every set counted as broad, pages are walked in order and every term is
    evaluated in its correlated form."""
    monkeypatch.setattr(sqlite_store, "PROBE", 0)
    await check_against_oracle(store, seed)


@pytest.fixture
async def planned(store: SqliteStore) -> sqlite3.Connection:
    """A connection to a store with Patients and Observations, for EXPLAIN."""
    writes = []
    for n in range(30):
        writes.append(put("Patient", f"p{n}", 1, ts(1), index=(named(f"n{n}"),)))
        rows = (
            IndexRow("subject", "Patient", f"Patient/p{n}"),
            IndexRow("code", "loinc", f"c{n % 3}"),
            IndexRow("date", low=f"2020-01-{n + 1:02d}", high=f"2020-01-{n + 1:02d}z"),
            IndexRow("v", nlow=n - 0.5, nhigh=n + 0.5),
            bp(f"c{n % 3}", n),
        )
        writes.append(put("Observation", f"o{n}", 1, ts(n % 60), index=rows))
    await store.commit(writes)
    conn = sqlite3.connect(store.path, isolation_level=None)
    yield conn
    conn.close()


def plans(conn: sqlite3.Connection, type_: str, query: Query, sort=()) -> list[str]:
    """EXPLAIN QUERY PLAN lines of every statement one search and its page run."""
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    compiler = _Compiler(conn)
    plan = compiler.plan(type_, query)
    compiler.count(type_, query, plan[0])
    compiler.page(type_, query, plan, sort, 20, 0)
    conn.set_trace_callback(None)
    return [row[3] for s in statements for row in conn.execute(f"EXPLAIN QUERY PLAN {s}")]


def code(value: str) -> Match:
    return Match("code", (Cond("system", "eq", "loinc"), Cond("text", "eq", value)))


QUERIES = {
    "token": ("Observation", (code("c1"),)),
    "prefix": ("Patient", (Match("name", (Cond("text", "prefix", "n1"),)),)),
    "date": (
        "Observation",
        (Match("date", (Cond("low", "ge", "2020-01-03"), Cond("low", "le", "2020-01-05"))),),
    ),
    "number": ("Observation", (Match("v", (Cond("nlow", "ge", 3.0), Cond("nlow", "lt", 5))),)),
    "composite": ("Observation", (Match("cvq", (Cond("text", "eq", "c1", part=0),)),)),
    "chain": ("Observation", (Chain("subject", "Patient", (Match("name", ()),)),)),
    "has": ("Patient", (Has("Observation", "subject", (code("c2"),)),)),
    "and": ("Observation", (code("c1"), Not(code("c2")), Match("v", ()))),
}


@pytest.mark.parametrize("name", QUERIES)
@pytest.mark.parametrize("probe", [sqlite_store.PROBE, 0])
async def test_searches_never_scan_a_table(planned, monkeypatch, name, probe):
    """Every statement a search runs seeks an index: no full scan of resources or
    search rows (``SCAN x`` without an index), with the sorted and the walk plans."""
    monkeypatch.setattr(sqlite_store, "PROBE", probe)
    type_, query = QUERIES[name]
    for sort in ((), (Sort("date", True),), (Sort("_id"),)):
        lines = plans(planned, type_, query, sort)
        scans = [line for line in lines if line.startswith("SCAN") and "INDEX" not in line]
        assert all(line.startswith(("SCAN (subquery", "SCAN CONSTANT")) for line in scans), lines


async def test_plans_use_the_value_indexes(planned):
    prefix = plans(planned, *QUERIES["prefix"])
    assert (
        "SEARCH s1 USING COVERING INDEX search_text (type=? AND param=? AND text>? AND text<?)"
        in prefix
    )
    date = plans(planned, *QUERIES["date"])
    assert any("INDEX search_low (type=? AND param=? AND low>? AND low<?)" in line for line in date)
    number = plans(planned, *QUERIES["number"])
    assert any(
        "INDEX search_nlow (type=? AND param=? AND nlow>? AND nlow<?)" in line for line in number
    )
    composite = plans(planned, *QUERIES["composite"])
    assert any(
        "INDEX part_text (type=? AND param=? AND part=? AND text=?)" in line for line in composite
    )
    has = plans(planned, *QUERIES["has"])
    assert any("INDEX search_owner (type=? AND id=? AND param=?)" in line for line in has)


async def test_broad_results_are_walked_in_order(planned, monkeypatch):
    monkeypatch.setattr(sqlite_store, "PROBE", 0)
    lines = plans(planned, "Observation", (code("c1"),), (Sort("date", True),))
    assert any(line.startswith("SEARCH s USING INDEX search_desc") for line in lines), lines
    lines = plans(planned, "Observation", (code("c1"),))
    assert any("USING INDEX resources_live" in line for line in lines), lines


def test_successor():
    assert successor("ab") == "ac"
    assert successor("a\U0010ffff") == "b"
    assert successor("\U0010ffff\U0010ffff") is None
    assert successor("a\ud7ff") == "a\ue000"
    assert successor("") is None
    for prefix in ("ab", "a\U0010ffff", "a\ud7ff"):
        upper = successor(prefix)
        assert (
            prefix + "\U0010ffff" * 3 < upper and upper.encode() > (prefix + "\U0010ffff").encode()
        )


async def test_expired_snapshots_are_deleted(store):
    await store.save_snapshot("old", ["Patient/a", "Patient/b"], "2001-01-01T00:00:00Z")
    await store.save_snapshot("new", ["Patient/c"], "2999-01-01T00:00:00Z")
    conn = sqlite3.connect(store.path)
    assert conn.execute("SELECT key FROM snapshots").fetchall() == [("new",)]
    assert conn.execute("SELECT key, pos, ref FROM snapshot_refs").fetchall() == [
        ("new", 0, "Patient/c")
    ]
    conn.close()


async def test_sorting_a_small_result_reads_sort_keys_by_owner(planned):
    """Sorting a few matches reads each one's sort key through the owner index; a
    correlated seek on (type, param) alone walks every row of the parameter (it
    made a sorted search of 8 matches take 1.9 s at 100k resources)."""
    subject = (Match("subject", (Cond("text", "eq", "Patient/p3"),)),)
    for sort in ((Sort("date", True),), (Sort("date"),)):
        lines = plans(planned, "Observation", subject, sort)
        assert any("search_owner (type=? AND id=? AND param=?)" in line for line in lines), lines
        assert not any(line.endswith("(type=? AND param=?)") for line in lines), lines
