"""The Store contract: every adapter must pass every test here (see conftest.py)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from hie.store import ConditionConflict, Page, Store, Version, VersionConflict, Write
from hie.store.query import (
    COLUMNS,
    NUMBER_COLUMNS,
    TEXT_COLUMNS,
    AnyOf,
    Chain,
    Cond,
    Has,
    IdIn,
    IndexRow,
    Match,
    Not,
    Query,
    Sort,
    Term,
    WrittenAfter,
)
from tests.store.oracle import check_against_oracle


def ts(n: int) -> str:
    """The n-th second of a fixed minute, in the store's instant format."""
    return f"2026-01-01T00:00:{n:02d}.000000Z"


def body(type_: str, id_: str, version: int, lu: str, **extra: object) -> bytes:
    meta = {"versionId": str(version), "lastUpdated": lu}
    return orjson.dumps({"resourceType": type_, "id": id_, "meta": meta, **extra})


def put(type_: str, id_: str, version: int, lu: str, index: tuple = (), **extra: object) -> Write:
    """Version ``version`` replacing ``version - 1`` (a create when ``version`` is 1)."""
    method = "POST" if version == 1 else "PUT"
    data = body(type_, id_, version, lu, **extra)
    return Write(type_, id_, version - 1, version, lu, method, data, index)


def delete(type_: str, id_: str, version: int, lu: str) -> Write:
    """A tombstone ``version`` replacing ``version - 1``."""
    return Write(type_, id_, version - 1, version, lu, "DELETE", None)


def as_version(w: Write) -> Version:
    return Version(w.type, w.id, w.version, w.last_updated, w.method, w.body)


def keys(page: Page) -> list[tuple[str, str, int]]:
    return [(v.type, v.id, v.version) for v in page.items]


async def ids(store: Store, type_: str, query: Query) -> list[str]:
    page = await store.search(type_, query, count=1000)
    assert page.total == len(page.items)
    return [v.id for v in page.items]


# --- read, vread, compare-and-set ----------------------------------------------------


async def test_read_and_vread_of_unknown_resource(store: Store):
    assert await store.read("Patient", "nope") is None
    assert await store.vread("Patient", "nope", 1) is None


async def test_create_read_vread_update(store: Store):
    v1 = put("Patient", "p1", 1, ts(1), name="Ann")
    await store.commit([v1])
    assert await store.read("Patient", "p1") == as_version(v1)
    assert await store.vread("Patient", "p1", 1) == as_version(v1)
    assert await store.vread("Patient", "p1", 2) is None
    assert await store.read("Observation", "p1") is None

    v2 = put("Patient", "p1", 2, ts(2), name="Bea")
    await store.commit([v2])
    current = await store.read("Patient", "p1")
    assert current == as_version(v2)
    assert current.method == "PUT" and not current.deleted
    assert await store.vread("Patient", "p1", 1) == as_version(v1)
    assert await store.vread("Patient", "p1", 2) == as_version(v2)


async def test_body_bytes_round_trip(store: Store):
    w = put(
        "Observation",
        "o1",
        1,
        ts(1),
        valueQuantity={"value": 5.5, "unit": "mmol/L"},
        component=[{"valueInteger": 2**40}, {"valueBoolean": False}],
        note=[{"text": '张三 é "quoted" \\ \n'}],
        _status={"extension": [{"url": "u", "valueString": "x"}]},
    )
    await store.commit([w])
    assert (await store.read("Observation", "o1")).body == w.body
    assert orjson.loads((await store.vread("Observation", "o1", 1)).body) == orjson.loads(w.body)


async def test_decimal_text_round_trips(store: Store):
    """FHIR decimals keep their written precision (bodies come from hie.jsonio)."""
    data = (
        b'{"resourceType":"Observation","id":"d1","meta":{"versionId":"1"},'
        b'"valueQuantity":{"value":1.00},"component":[{"valueQuantity":'
        b'{"value":-1.000000000000000000E+245}},{"valueQuantity":{"value":0.010}}]}'
    )
    w = Write("Observation", "d1", 0, 1, ts(1), "POST", data)
    await store.commit([w])
    assert (await store.read("Observation", "d1")).body == data
    assert (await store.vread("Observation", "d1", 1)).body == data
    assert (await store.history("Observation", "d1")).items[0].body == data


async def test_create_over_existing_conflicts(store: Store):
    first = put("Patient", "p1", 1, ts(1), name="Ann")
    await store.commit([first])
    with pytest.raises(VersionConflict) as err:
        await store.commit([put("Patient", "p1", 1, ts(2), name="Other")])
    assert (err.value.type, err.value.id, err.value.expected, err.value.actual) == (
        "Patient",
        "p1",
        0,
        1,
    )
    assert await store.read("Patient", "p1") == as_version(first)
    assert (await store.history("Patient", "p1")).total == 1


async def test_stale_update_conflicts(store: Store):
    await store.commit([put("Patient", "p1", 1, ts(1))])
    v2 = put("Patient", "p1", 2, ts(2))
    await store.commit([v2])
    with pytest.raises(VersionConflict) as err:
        await store.commit([put("Patient", "p1", 2, ts(3), name="stale")])
    assert (err.value.expected, err.value.actual) == (1, 2)
    assert await store.read("Patient", "p1") == as_version(v2)
    assert await store.vread("Patient", "p1", 3) is None


async def test_update_of_unknown_resource_conflicts(store: Store):
    with pytest.raises(VersionConflict) as err:
        await store.commit([put("Patient", "ghost", 4, ts(1))])
    assert (err.value.expected, err.value.actual) == (3, 0)
    assert await store.read("Patient", "ghost") is None
    assert await store.events_after(0) == []
    assert await store.last_event() == 0


async def test_multi_write_commit_applies_all(store: Store):
    writes = [
        put("Patient", "p1", 1, ts(1), index=(IndexRow("name", text="ann"),)),
        put("Observation", "o1", 1, ts(1), index=(IndexRow("subject", text="Patient/p1"),)),
        put("Observation", "o2", 1, ts(1)),
    ]
    await store.commit(writes)
    for w in writes:
        assert await store.read(w.type, w.id) == as_version(w)
    assert await ids(
        store, "Observation", (Match("subject", (Cond("text", "eq", "Patient/p1"),)),)
    ) == ["o1"]
    events = await store.events_after(0)
    assert [(e.type, e.id, e.version, e.method) for e in events] == [
        (w.type, w.id, w.version, w.method) for w in writes
    ]
    assert await store.last_event() == events[-1].seq
    assert await store.events_after(events[-1].seq) == []


@pytest.mark.parametrize("conflict_at", [0, 1, 3])
async def test_conflicting_commit_writes_nothing(store: Store, conflict_at: int):
    """A stale write anywhere in a commit leaves no trace of the commit's other writes."""
    base = [
        put("Patient", "p2", 1, ts(1), index=(IndexRow("name", text="old"),)),
        put("Patient", "p4", 1, ts(1)),
    ]
    await store.commit(base)
    ok = [
        put("Patient", "p1", 1, ts(2), index=(IndexRow("name", text="new"),)),
        put("Patient", "p2", 2, ts(2), index=(IndexRow("name", text="new"),)),
        put("Observation", "o1", 1, ts(2)),
    ]
    writes = list(ok)
    writes.insert(conflict_at, put("Patient", "p4", 3, ts(2), name="stale"))
    events_before = await store.events_after(0)

    with pytest.raises(VersionConflict) as err:
        await store.commit(writes)

    assert (err.value.id, err.value.expected, err.value.actual) == ("p4", 2, 1)
    assert await store.read("Patient", "p1") is None
    assert await store.read("Patient", "p2") == as_version(base[0])
    assert await store.read("Patient", "p4") == as_version(base[1])
    assert await store.read("Observation", "o1") is None
    assert await store.vread("Patient", "p2", 2) is None
    assert (await store.history()).total == 2
    assert await store.events_after(0) == events_before
    assert await ids(store, "Patient", (Match("name", (Cond("text", "eq", "new"),)),)) == []
    assert await ids(store, "Patient", (Match("name", (Cond("text", "eq", "old"),)),)) == ["p2"]

    await store.commit(ok)
    for w in ok:
        assert await store.read(w.type, w.id) == as_version(w)
    assert [(e.id, e.version) for e in await store.events_after(0)] == [
        ("p2", 1),
        ("p4", 1),
        ("p1", 1),
        ("p2", 2),
        ("o1", 1),
    ]


# --- tombstones ------------------------------------------------------------------


async def test_delete_leaves_a_tombstone_and_allows_recreate(store: Store):
    v1 = put("Patient", "p1", 1, ts(1), index=(IndexRow("name", text="ann"),))
    await store.commit([v1])
    await store.commit([delete("Patient", "p1", 2, ts(2))])

    gone = await store.read("Patient", "p1")
    assert gone == Version("Patient", "p1", 2, ts(2), "DELETE", None)
    assert gone.deleted
    assert (await store.vread("Patient", "p1", 2)).deleted
    assert await store.vread("Patient", "p1", 1) == as_version(v1)
    assert await ids(store, "Patient", ()) == []
    assert await ids(store, "Patient", (IdIn(("p1",)),)) == []
    assert await ids(store, "Patient", (Match("name", (Cond("text", "eq", "ann"),)),)) == []

    with pytest.raises(VersionConflict) as err:
        await store.commit([put("Patient", "p1", 1, ts(3))])
    assert err.value.actual == 2

    v3 = Write("Patient", "p1", 2, 3, ts(3), "POST", body("Patient", "p1", 3, ts(3)), ())
    await store.commit([v3])
    assert await store.read("Patient", "p1") == as_version(v3)
    assert await ids(store, "Patient", ()) == ["p1"]
    assert await ids(store, "Patient", (Match("name", (Cond("text", "eq", "ann"),)),)) == []
    assert keys(await store.history("Patient", "p1")) == [
        ("Patient", "p1", 3),
        ("Patient", "p1", 2),
        ("Patient", "p1", 1),
    ]


# --- history ---------------------------------------------------------------------

A1, B1, A2, O1, A3, C1 = (
    put("Patient", "a", 1, ts(1), name="a1"),
    put("Patient", "b", 1, ts(2)),
    put("Patient", "a", 2, ts(3), name="a2"),
    put("Observation", "o", 1, ts(3)),
    delete("Patient", "a", 3, ts(5)),
    put("Patient", "c", 1, ts(6)),
)


def k(*writes: Write) -> list[tuple[str, str, int]]:
    return [(w.type, w.id, w.version) for w in writes]


@pytest.fixture
async def history_store(store: Store) -> Store:
    """Commits, in order: a1@1, b1@2, a2@3, o1@3 (same instant, later), a3 (deleted)@5, c1@6."""
    for w in (A1, B1, A2, O1, A3, C1):
        await store.commit([w])
    return store


async def test_history_levels_newest_first(history_store: Store):
    s = history_store
    system = await s.history()
    assert keys(system) == k(C1, A3, O1, A2, B1, A1)
    assert system.total == 6
    assert system.items[1] == as_version(A3) and system.items[1].deleted
    assert system.items[3] == as_version(A2)
    assert keys(await s.history("Patient")) == k(C1, A3, A2, B1, A1)
    assert keys(await s.history("Observation")) == k(O1)
    assert keys(await s.history("Patient", "a")) == k(A3, A2, A1)
    assert (await s.history("Patient", "a")).total == 3
    assert await s.history("Patient", "zzz") == Page([], 0)
    assert await s.history("Encounter") == Page([], 0)


async def test_history_since_is_inclusive(history_store: Store):
    s = history_store
    assert keys(await s.history(since=ts(3))) == k(C1, A3, O1, A2)
    assert keys(await s.history("Patient", since=ts(3))) == k(C1, A3, A2)
    assert keys(await s.history("Patient", "a", since=ts(4))) == k(A3)
    assert (await s.history(since=ts(7))) == Page([], 0)


async def test_history_at_picks_the_version_current_then(history_store: Store):
    s = history_store
    assert keys(await s.history(at=ts(0))) == []
    assert keys(await s.history(at=ts(1))) == k(A1)
    assert keys(await s.history(at=ts(3))) == k(O1, A2, B1)
    assert keys(await s.history(at=ts(4))) == k(O1, A2, B1)
    at5 = await s.history(at=ts(5))
    assert keys(at5) == k(A3, O1, B1)
    assert at5.total == 3 and at5.items[0].deleted
    assert keys(await s.history("Patient", at=ts(4))) == k(A2, B1)
    assert keys(await s.history("Patient", "a", at=ts(2))) == k(A1)
    assert keys(await s.history("Patient", "a", at=ts(9))) == k(A3)
    assert keys(await s.history(at=ts(5), since=ts(3))) == k(A3, O1)
    assert keys(await s.history("Patient", at=ts(4), since=ts(3))) == k(A2)


async def test_history_paging(history_store: Store):
    s = history_store
    assert await s.history(count=2) == Page([as_version(C1), as_version(A3)], 6)
    assert keys(await s.history(count=2, offset=2)) == k(O1, A2)
    assert keys(await s.history(count=10, offset=4)) == k(B1, A1)
    assert await s.history(count=10, offset=6) == Page([], 6)
    assert await s.history(count=0) == Page([], 6)
    assert await s.history("Patient", count=0, since=ts(3)) == Page([], 3)
    assert await s.history(at=ts(5), count=1, offset=1) == Page([as_version(O1)], 3)
    assert await s.history(at=ts(5), count=0) == Page([], 3)


async def test_history_ties_within_one_commit_follow_write_order(store: Store):
    first, second = put("Patient", "x", 1, ts(1)), put("Patient", "y", 1, ts(1))
    await store.commit([first, second])
    assert keys(await store.history()) == k(second, first)


# --- search ----------------------------------------------------------------------

# For each (op, value): the ids matching among r1="a", r2="ab", r3="b", r4 (a row with
# the column absent) and r5 (no row for the parameter).
OP_CASES = [
    ("eq", "ab", {"r2"}),
    ("eq", "a", {"r1"}),
    ("ne", "ab", {"r1", "r3"}),
    ("lt", "ab", {"r1"}),
    ("le", "ab", {"r1", "r2"}),
    ("gt", "ab", {"r3"}),
    ("ge", "ab", {"r2", "r3"}),
    ("gt", "", {"r1", "r2", "r3"}),
    ("prefix", "a", {"r1", "r2"}),
    ("prefix", "ab", {"r2"}),
    ("prefix", "", {"r1", "r2", "r3"}),
    ("contains", "b", {"r2", "r3"}),
    ("contains", "ab", {"r2"}),
    ("contains", "", {"r1", "r2", "r3"}),
    ("in", ("b", "a", "zz"), {"r1", "r3"}),
    ("in", (), set()),
    ("null", None, {"r4"}),
]


def _filler(column: str) -> str | float:
    return 1.0 if column in NUMBER_COLUMNS else "a"


@pytest.mark.parametrize("column", sorted(TEXT_COLUMNS))
@pytest.mark.parametrize(("op", "value", "expected"), OP_CASES)
async def test_search_each_op_on_each_column(store: Store, column, op, value, expected):
    param = f"c_{column}"
    writes = [
        put("Thing", rid, 1, ts(1), index=(IndexRow(param, **{column: v}),))
        for rid, v in (("r1", "a"), ("r2", "ab"), ("r3", "b"), ("r4", None))
    ]
    other = {c: _filler(c) for c in COLUMNS if c != column}
    writes.append(put("Thing", "r5", 1, ts(1), index=(IndexRow("other", **{column: "a"}),)))
    writes.append(put("Thing", "r6", 1, ts(1), index=(IndexRow(param, **other),)))
    await store.commit(writes)
    found = await ids(store, "Thing", (Match(param, (Cond(column, op, value),)),))
    assert set(found) == expected | ({"r6"} if op == "null" else set())


# Number columns compare as numbers (as text "10" < "2" and "9.5" > "10"): the ids
# matching among n1=2, n2=10, n3=9.5, n4=-1, n5 (column absent) and n6 (no row).
NUMBER_CASES = [
    ("eq", 10, {"n2"}),
    ("eq", 9.5, {"n3"}),
    ("ne", 2.0, {"n2", "n3", "n4"}),
    ("lt", 9.5, {"n1", "n4"}),
    ("le", 9.5, {"n1", "n3", "n4"}),
    ("gt", 9, {"n2", "n3"}),
    ("ge", 10.0, {"n2"}),
    ("gt", -100, {"n1", "n2", "n3", "n4"}),
    ("in", (2, 10.0, 7.0), {"n1", "n2"}),
    ("in", (), set()),
    ("null", None, {"n5"}),
]


@pytest.mark.parametrize("column", sorted(NUMBER_COLUMNS))
@pytest.mark.parametrize(("op", "value", "expected"), NUMBER_CASES)
async def test_search_numbers_compare_numerically(store: Store, column, op, value, expected):
    values = (("n1", 2.0), ("n2", 10.0), ("n3", 9.5), ("n4", -1.0), ("n5", None))
    writes = [
        put("Thing", rid, 1, ts(1), index=(IndexRow("n", text="x", **{column: v}),))
        for rid, v in values
    ]
    writes.append(put("Thing", "n6", 1, ts(1), index=(IndexRow("other", **{column: 2.0}),)))
    await store.commit(writes)
    found = await ids(store, "Thing", (Match("n", (Cond(column, op, value),)),))
    assert set(found) == expected


@pytest.mark.parametrize(("column", "op"), [("nlow", "prefix"), ("nhigh", "contains")])
async def test_substring_ops_on_number_columns_are_refused(store: Store, column, op):
    await store.commit([put("Thing", "n", 1, ts(1), index=(IndexRow("n", nlow=1.0),))])
    with pytest.raises(ValueError, match="text column"):
        await store.search("Thing", (Match("n", (Cond(column, op, "1"),)),))


async def test_search_number_ranges(store: Store):
    """A value's precision interval [nlow, nhigh] against a searched range."""
    intervals = {"a": (4.95, 5.05), "b": (5.45, 5.55), "c": (99.5, 100.5), "d": (-0.5, 0.5)}
    await store.commit(
        [
            put("Obs", i, 1, ts(1), index=(IndexRow("v", nlow=lo, nhigh=hi),))
            for i, (lo, hi) in intervals.items()
        ]
    )

    async def within(low: float, high: float) -> set[str]:
        conds = (Cond("nlow", "ge", low), Cond("nhigh", "le", high))
        return set(await ids(store, "Obs", (Match("v", conds),)))

    assert await within(4.9, 5.1) == {"a"}
    assert await within(4.9, 6) == {"a", "b"}
    assert await within(-1, 101) == {"a", "b", "c", "d"}
    assert await within(5.0, 101) == {"b", "c"}
    overlapping = (Cond("nlow", "lt", 5.5), Cond("nhigh", "gt", 5.5))
    assert await ids(store, "Obs", (Match("v", overlapping),)) == ["b"]


async def test_search_prefix_is_literal_and_case_sensitive(store: Store):
    values = ["a.c", "abc", "a%c", "a_c", "A.c", "a\\c", "a[c", "a*c", "(a)", "a c", "ab"]
    await store.commit(
        [
            put("Thing", f"t{n}", 1, ts(1), index=(IndexRow("s", text=v),))
            for n, v in enumerate(values)
        ]
    )

    async def prefix(p: str) -> set[str]:
        found = await ids(store, "Thing", (Match("s", (Cond("text", "prefix", p),)),))
        return {values[int(i[1:])] for i in found}

    assert await prefix("a.") == {"a.c"}
    assert await prefix("a%") == {"a%c"}
    assert await prefix("a_") == {"a_c"}
    assert await prefix("a*") == {"a*c"}
    assert await prefix("a\\") == {"a\\c"}
    assert await prefix("a[") == {"a[c"}
    assert await prefix("(") == {"(a)"}
    assert await prefix("a ") == {"a c"}
    assert await prefix("A") == {"A.c"}
    assert await prefix("abc") == {"abc"}
    assert await prefix("abcd") == set()
    assert await prefix("a") == {"a.c", "abc", "a%c", "a_c", "a\\c", "a[c", "a*c", "a c", "ab"}


async def test_search_compares_strings_by_code_point(store: Store):
    values = {"z": "z", "e": "é", "zh": "张", "up": "Z"}
    await store.commit(
        [put("Thing", i, 1, ts(1), index=(IndexRow("s", text=v),)) for i, v in values.items()]
    )

    async def find(op: str, value: str) -> set[str]:
        return set(await ids(store, "Thing", (Match("s", (Cond("text", op, value),)),)))

    assert await find("gt", "z") == {"e", "zh"}
    assert await find("lt", "张") == {"z", "e", "up"}
    assert await find("lt", "a") == {"up"}
    assert await find("eq", "é") == {"e"}


async def test_search_conditions_of_one_match_hold_on_one_row(store: Store):
    await store.commit(
        [
            put("Thing", "one", 1, ts(1), index=(IndexRow("d", low="2020", high="2021"),)),
            put(
                "Thing",
                "split",
                1,
                ts(1),
                index=(
                    IndexRow("d", low="2018", high="2021"),
                    IndexRow("d", low="2020", high="2029"),
                ),
            ),
            put("Thing", "elsewhere", 1, ts(1), index=(IndexRow("x", low="2020", high="2021"),)),
        ]
    )
    ge, le = Cond("low", "ge", "2019"), Cond("high", "le", "2022")
    assert await ids(store, "Thing", (Match("d", (ge, le)),)) == ["one"]
    assert set(await ids(store, "Thing", (Match("d", (ge,)), Match("d", (le,))))) == {
        "one",
        "split",
    }
    assert set(await ids(store, "Thing", (Match("d", ()),))) == {"one", "split"}
    assert await ids(store, "Thing", (Match("d", (ge, Cond("low", "lt", "2020"))),)) == []
    between = (Cond("low", "ge", "2018"), Cond("low", "lt", "2020"))
    assert await ids(store, "Thing", (Match("d", between),)) == ["split"]
    assert set(
        await ids(
            store, "Thing", (Match("d", (Cond("high", "ge", "2021"), Cond("high", "ge", "2022"))),)
        )
    ) == {"split"}
    assert (
        await ids(
            store, "Thing", (Match("d", (Cond("low", "eq", "2020"), Cond("low", "eq", "2018"))),)
        )
        == []
    )
    assert await ids(
        store, "Thing", (Match("d", (Cond("low", "prefix", "20"), Cond("low", "prefix", "2018"))),)
    ) == ["split"]


async def test_search_tokens_and_references(store: Store):
    loinc = "http://loinc.org"
    await store.commit(
        [
            put(
                "Observation",
                "o1",
                1,
                ts(1),
                index=(IndexRow("code", loinc, "1234-5"), IndexRow("subject", text="Patient/p1")),
            ),
            put(
                "Observation",
                "o2",
                1,
                ts(1),
                index=(
                    IndexRow("code", "http://snomed", "1234-5"),
                    IndexRow("subject", text="Patient/p2"),
                ),
            ),
            put("Observation", "o3", 1, ts(1), index=(IndexRow("code", None, "1234-5"),)),
            put("Patient", "o4", 1, ts(1), index=(IndexRow("code", loinc, "1234-5"),)),
        ]
    )

    def code(*conds: Cond) -> Query:
        return (Match("code", conds),)

    eq = Cond("text", "eq", "1234-5")
    assert set(await ids(store, "Observation", code(eq))) == {"o1", "o2", "o3"}
    assert await ids(store, "Observation", code(Cond("system", "eq", loinc), eq)) == ["o1"]
    assert await ids(store, "Observation", code(Cond("system", "null"), eq)) == ["o3"]
    assert (
        await ids(store, "Observation", code(Cond("system", "eq", loinc), Cond("text", "eq", "9")))
        == []
    )
    subject = Match("subject", (Cond("text", "eq", "Patient/p2"),))
    assert await ids(store, "Observation", (subject,)) == ["o2"]
    assert await ids(store, "Patient", code(eq)) == ["o4"]


async def test_search_boolean_terms(store: Store):
    def rows(*pairs: tuple[str, str]) -> tuple[IndexRow, ...]:
        return tuple(IndexRow(p, text=t) for p, t in pairs)

    await store.commit(
        [
            put("Thing", "a", 1, ts(1), index=rows(("x", "1"), ("y", "1"))),
            put("Thing", "b", 1, ts(1), index=rows(("x", "1"), ("y", "2"))),
            put("Thing", "c", 1, ts(1), index=rows(("x", "2"))),
            put("Thing", "d", 1, ts(1)),
        ]
    )

    def m(param: str, value: str) -> Match:
        return Match(param, (Cond("text", "eq", value),))

    async def find(*terms: Term) -> set[str]:
        return set(await ids(store, "Thing", terms))

    assert await find() == {"a", "b", "c", "d"}
    assert await find(m("x", "1")) == {"a", "b"}
    assert await find(m("x", "1"), m("y", "2")) == {"b"}
    assert await find(m("x", "1"), m("x", "2")) == set()
    assert await find(AnyOf((m("x", "2"), m("y", "2")))) == {"b", "c"}
    assert await find(AnyOf((m("x", "2"),)), m("y", "2")) == set()
    assert await find(AnyOf(())) == set()
    assert await find(Not(AnyOf(()))) == {"a", "b", "c", "d"}
    assert await find(Not(m("y", "1"))) == {"b", "c", "d"}
    assert await find(Not(Match("y", ()))) == {"c", "d"}
    assert await find(m("x", "1"), Not(m("y", "1"))) == {"b"}
    assert await find(Not(AnyOf((m("x", "1"), m("x", "2"))))) == {"d"}
    assert await find(Not(Not(m("x", "2")))) == {"c"}
    assert await find(IdIn(("a", "c", "zzz"))) == {"a", "c"}
    assert await find(IdIn(())) == set()
    assert await find(Not(IdIn(("a",)))) == {"b", "c", "d"}
    assert await find(AnyOf((IdIn(("d",)), m("x", "2")))) == {"c", "d"}
    assert await find(IdIn(("a", "b")), Not(m("y", "2"))) == {"a"}


async def test_search_sees_only_current_rows_of_live_resources(store: Store):
    def tag(value: str) -> tuple[IndexRow, ...]:
        return (IndexRow("tag", text=value),)

    await store.commit(
        [
            put("Thing", "u", 1, ts(1), index=tag("old")),
            put("Thing", "d", 1, ts(1), index=tag("old")),
        ]
    )
    await store.commit([put("Thing", "u", 2, ts(2), index=tag("new"))])
    await store.commit([delete("Thing", "d", 2, ts(2))])

    def q(value: str) -> Query:
        return (Match("tag", (Cond("text", "eq", value),)),)

    assert await ids(store, "Thing", q("old")) == []
    assert await ids(store, "Thing", q("new")) == ["u"]
    assert await ids(store, "Thing", (Not(Match("tag", (Cond("text", "eq", "new"),))),)) == []
    page = await store.search("Thing", q("new"))
    assert page.items == [await store.read("Thing", "u")]
    assert page.items[0].version == 2

    await store.commit(
        [Write("Thing", "d", 2, 3, ts(3), "POST", body("Thing", "d", 3, ts(3)), tag("new"))]
    )
    assert await ids(store, "Thing", q("new")) == ["d", "u"]
    assert await ids(store, "Thing", q("old")) == []


async def test_search_order_and_paging(store: Store):
    lus = {"e3": 5, "e1": 3, "e2": 3, "e5": 1, "e4": 3}
    await store.commit([put("Thing", i, 1, ts(n)) for i, n in lus.items()])
    await store.commit([put("Other", "e0", 1, ts(9))])
    expected = ["e3", "e1", "e2", "e4", "e5"]
    full = await store.search("Thing", ())
    assert [v.id for v in full.items] == expected and full.total == 5
    assert full.items[0] == await store.read("Thing", "e3")
    assert [v.id for v in (await store.search("Thing", (), count=2)).items] == ["e3", "e1"]
    page = await store.search("Thing", (), count=2, offset=2)
    assert [v.id for v in page.items] == ["e2", "e4"] and page.total == 5
    assert [v.id for v in (await store.search("Thing", (), count=2, offset=4)).items] == ["e5"]
    assert await store.search("Thing", (), count=2, offset=5) == Page([], 5)
    assert await store.search("Thing", (), count=0) == Page([], 5)
    assert await store.search("Thing", (IdIn(("e1", "e5")),), count=0) == Page([], 2)
    assert await store.search("Nothing", ()) == Page([], 0)


# --- composites ------------------------------------------------------------------


def bp(code: str, value: float | None = None, unit: str | None = None) -> IndexRow:
    """A ``code-value-quantity`` composite row: a LOINC code and a quantity."""
    quantity = IndexRow("value", text=unit, nlow=value, nhigh=value)
    return IndexRow("cvq", parts=(IndexRow("code", "loinc", code), quantity))


SYS, DIA = "8480-6", "8462-4"


async def test_search_composite_components_hold_on_one_value(store: Store):
    lone = IndexRow(
        "cvq", text="x", parts=(IndexRow("code", "loinc", SYS), IndexRow("value", nlow=150))
    )
    await store.commit(
        [
            put("Obs", "o1", 1, ts(1), index=(bp(SYS, 120, "mm[Hg]"), bp(DIA, 80, "mm[Hg]"))),
            put("Obs", "o2", 1, ts(1), index=(lone,)),
            put("Obs", "o3", 1, ts(1), index=(bp(DIA, 130), IndexRow("code", "loinc", SYS))),
            put(
                "Obs",
                "o4",
                1,
                ts(1),
                index=(IndexRow("cvq", parts=(IndexRow("code", "loinc", SYS),)),),
            ),
            put("Obs", "o5", 1, ts(1), index=(bp(SYS, None, "mm[Hg]"),)),
        ]
    )

    def code(value: str, *more: Cond) -> Query:
        return (Match("cvq", (Cond("text", "eq", value, part=0), *more)),)

    above_100 = Cond("nlow", "gt", 100, part=1)
    assert set(await ids(store, "Obs", code(SYS, above_100))) == {"o1", "o2"}
    # o1's diastolic is 80: its systolic 120 must not satisfy "diastolic > 100".
    assert await ids(store, "Obs", code(DIA, above_100)) == ["o3"]
    assert await ids(store, "Obs", code(SYS, Cond("nlow", "null", part=1))) == ["o5"]
    assert await ids(store, "Obs", code(SYS, Cond("text", "null", part=2))) == []
    unit = Cond("text", "eq", "mm[Hg]", part=1)
    loinc = Cond("system", "eq", "loinc", part=0)
    in_sys = Cond("text", "in", (SYS, "other"), part=0)
    both = (Match("cvq", (loinc, in_sys, unit)),)
    assert set(await ids(store, "Obs", both)) == {"o1", "o5"}
    assert set(await ids(store, "Obs", (Match("cvq", ()),))) == {"o1", "o2", "o3", "o4", "o5"}
    # The composite row's own columns and its components together.
    assert await ids(store, "Obs", code(SYS, Cond("text", "eq", "x"))) == ["o2"]
    assert await ids(store, "Obs", code(DIA, Cond("text", "eq", "x"))) == []
    # Components are not rows of any parameter.
    assert await ids(store, "Obs", (Match("code", (Cond("text", "eq", SYS),)),)) == ["o3"]
    assert await ids(store, "Obs", (Match("cvq", (Cond("text", "eq", SYS),)),)) == []
    assert set(await ids(store, "Obs", (Not(Match("cvq", (above_100,))),))) == {"o4", "o5"}

    await store.commit([put("Obs", "o2", 2, ts(2), index=(IndexRow("cvq", text="x"),))])
    await store.commit([delete("Obs", "o1", 2, ts(2))])
    assert await ids(store, "Obs", code(SYS, above_100)) == []
    assert await ids(store, "Obs", code(DIA, above_100)) == ["o3"]


# --- chains and _has -------------------------------------------------------------


def ref(param: str, target: str) -> IndexRow:
    return IndexRow(param, target.split("/")[0], target)


def named(name: str) -> IndexRow:
    return IndexRow("name", text=name)


@pytest.fixture
async def linked(store: Store) -> Store:
    """Observation -subject-> Patient -gp-> Practitioner -org-> Organization.

    org1 "acme", org2 "beta", org3 "acme"; pr1->org1, pr2->org2, pr3->org3;
    p1 "ann"->pr1, p2 "bob"->pr2, p3->pr3, p4->Practitioner/gone, p5->an absolute URL;
    o1->p1 (code a), o2->p2, o3->p3, o4->p4, o5->Group/p1, o6->p1 and p2 (code b).
    """
    writes = [
        put("Organization", "org1", 1, ts(1), index=(named("acme"),)),
        put("Organization", "org2", 1, ts(1), index=(named("beta"),)),
        put("Organization", "org3", 1, ts(1), index=(named("acme"),)),
        put("Practitioner", "pr1", 1, ts(1), index=(ref("org", "Organization/org1"),)),
        put("Practitioner", "pr2", 1, ts(1), index=(ref("org", "Organization/org2"),)),
        put("Practitioner", "pr3", 1, ts(1), index=(ref("org", "Organization/org3"),)),
        put("Patient", "p1", 1, ts(1), index=(named("ann"), ref("gp", "Practitioner/pr1"))),
        put("Patient", "p2", 1, ts(1), index=(named("bob"), ref("gp", "Practitioner/pr2"))),
        put("Patient", "p3", 1, ts(1), index=(ref("gp", "Practitioner/pr3"),)),
        put("Patient", "p4", 1, ts(1), index=(ref("gp", "Practitioner/gone"),)),
        put("Patient", "p5", 1, ts(1), index=(IndexRow("gp", text="http://x/Practitioner/pr1"),)),
        put("Observation", "o1", 1, ts(1), index=(ref("subject", "Patient/p1"), named("a"))),
        put("Observation", "o2", 1, ts(1), index=(ref("subject", "Patient/p2"),)),
        put("Observation", "o3", 1, ts(1), index=(ref("subject", "Patient/p3"),)),
        put("Observation", "o4", 1, ts(1), index=(ref("subject", "Patient/p4"),)),
        put("Observation", "o5", 1, ts(1), index=(ref("subject", "Group/p1"),)),
        put(
            "Observation",
            "o6",
            1,
            ts(1),
            index=(ref("subject", "Patient/p1"), ref("subject", "Patient/p2"), named("b")),
        ),
    ]
    await store.commit(writes)
    return store


def name(value: str) -> Match:
    return Match("name", (Cond("text", "eq", value),))


async def found(store: Store, type_: str, *terms: Term) -> set[str]:
    return set(await ids(store, type_, terms))


async def test_chain(linked: Store):
    s = linked
    ann, bob = (
        Chain("subject", "Patient", (name("ann"),)),
        Chain("subject", "Patient", (name("bob"),)),
    )
    assert await found(s, "Observation", ann) == {"o1", "o6"}
    assert await found(s, "Observation", AnyOf((ann, bob))) == {"o1", "o2", "o6"}
    assert await found(s, "Observation", ann, bob) == {"o6"}
    assert await found(s, "Observation", ann, name("b")) == {"o6"}
    assert await found(s, "Observation", Not(ann)) == {"o2", "o3", "o4", "o5"}
    assert await found(s, "Observation", Chain("subject", "Patient", ())) == {
        "o1",
        "o2",
        "o3",
        "o4",
        "o6",
    }
    assert await found(s, "Observation", Not(Chain("subject", "Patient", ()))) == {"o5"}
    assert await found(s, "Observation", Chain("subject", "Group", ())) == set()
    assert await found(s, "Observation", Chain("other", "Patient", ())) == set()
    assert await found(s, "Patient", Chain("gp", "Practitioner", ())) == {"p1", "p2", "p3"}
    ids_ = Chain("subject", "Patient", (IdIn(("p2", "p4")),))
    assert await found(s, "Observation", ids_) == {"o2", "o4", "o6"}


async def test_chain_three_deep_and_to_deleted_targets(linked: Store):
    s = linked
    acme = Chain("gp", "Practitioner", (Chain("org", "Organization", (name("acme"),)),))
    deep = Chain("subject", "Patient", (acme,))
    assert await found(s, "Observation", deep) == {"o1", "o3", "o6"}
    assert await found(s, "Observation", Not(deep)) == {"o2", "o4", "o5"}

    await s.commit([delete("Organization", "org3", 2, ts(2))])
    assert await found(s, "Observation", deep) == {"o1", "o6"}
    await s.commit([delete("Patient", "p2", 2, ts(2))])
    assert await found(s, "Observation", Not(Chain("subject", "Patient", ()))) == {"o2", "o5"}
    assert await found(s, "Observation", Chain("subject", "Patient", ())) == {
        "o1",
        "o3",
        "o4",
        "o6",
    }
    assert await found(s, "Observation", Chain("subject", "Patient", (name("bob"),))) == set()
    # A target written again matches again.
    await s.commit([put("Patient", "p2", 3, ts(3), index=(named("bob"),))])
    assert await found(s, "Observation", Chain("subject", "Patient", (name("bob"),))) == {
        "o2",
        "o6",
    }


async def test_has(linked: Store):
    s = linked
    code_a = Has("Observation", "subject", (name("a"),))
    assert await found(s, "Patient", code_a) == {"p1"}
    referred = Has("Observation", "subject", ())
    assert await found(s, "Patient", referred) == {"p1", "p2", "p3", "p4"}
    assert await found(s, "Patient", Not(referred)) == {"p5"}
    assert await found(s, "Patient", referred, name("bob")) == {"p2"}
    assert await found(s, "Patient", AnyOf((code_a, IdIn(("p5",))))) == {"p1", "p5"}
    assert await found(s, "Group", referred) == set()
    assert await found(s, "Organization", Has("Practitioner", "org", ())) == {
        "org1",
        "org2",
        "org3",
    }

    # _has inside _has, and a chain inside a _has.
    code_b = Has("Patient", "gp", (Has("Observation", "subject", (name("b"),)),))
    assert await found(s, "Practitioner", code_b) == {"pr1", "pr2"}
    deep = Has("Practitioner", "org", (Has("Patient", "gp", (code_a,)),))
    assert await found(s, "Organization", deep) == {"org1"}
    by_chain = Has("Practitioner", "org", (Chain("org", "Organization", (name("beta"),)),))
    assert await found(s, "Organization", by_chain) == {"org2"}

    await s.commit([delete("Observation", "o6", 2, ts(2))])
    assert await found(s, "Practitioner", code_b) == set()
    await s.commit([delete("Organization", "org3", 2, ts(2))])
    assert await found(s, "Organization", Has("Practitioner", "org", ())) == {"org1", "org2"}


async def test_guard_with_a_chain(linked: Store):
    guard = (Chain("subject", "Patient", (name("bob"),)), name("b"))
    w = put("Observation", "new", 1, ts(2))
    guarded = Write(w.type, w.id, 0, 1, w.last_updated, w.method, w.body, w.index, guard)
    with pytest.raises(ConditionConflict):
        await linked.commit([guarded])
    await linked.commit([delete("Observation", "o6", 2, ts(2)), guarded])
    assert await linked.read("Observation", "new") is not None


# --- sorting ---------------------------------------------------------------------


def period(low: str, high: str) -> IndexRow:
    return IndexRow("date", low=low, high=high)


@pytest.fixture
async def sortable(store: Store) -> Store:
    """s1: dates 2020-01..2020-12 and 2018-01..2018-06, name b, n 10, code "x";
    s2: date 2019-01..2019-12, name a, n 9.5; s3: no date, name a, n 100;
    s4: date 2021-01..2021-06, no name, code "w"; s5: date 2019-01..2019-12, name b.
    Last updated: s1 at 1, s2 at 2, s3 at 3, s4 at 4, s5 at 5."""
    rows = {
        "s1": (
            period("2020-01", "2020-12"),
            period("2018-01", "2018-06"),
            named("b"),
            IndexRow("n", nlow=10.0, nhigh=10.0),
            IndexRow("code", "sys", "x"),
        ),
        "s2": (period("2019-01", "2019-12"), named("a"), IndexRow("n", nlow=9.5, nhigh=9.5)),
        "s3": (named("a"), IndexRow("n", nlow=100.0, nhigh=100.0)),
        "s4": (period("2021-01", "2021-06"), IndexRow("code", "sys", "w")),
        "s5": (period("2019-01", "2019-12"), named("b")),
    }
    await store.commit(
        [put("Thing", i, 1, ts(n), index=r) for n, (i, r) in enumerate(rows.items(), 1)]
    )
    return store


async def sorted_ids(store: Store, *sort: Sort, query: Query = (), **page: int) -> list[str]:
    return [v.id for v in (await store.search("Thing", query, sort=sort, **page)).items]


async def test_sort_by_a_parameter(sortable: Store):
    s = sortable
    # Ascending by the earliest low: s1 (2018), s2 = s5 (2019, s5 newer), s4; s3 has none.
    assert await sorted_ids(s, Sort("date")) == ["s1", "s5", "s2", "s4", "s3"]
    # Descending by the latest high: s4 (2021-06), s1 (2020-12), s5 = s2, then s3.
    assert await sorted_ids(s, Sort("date", True)) == ["s4", "s1", "s5", "s2", "s3"]
    # Numbers as numbers: 9.5 < 10 < 100.
    assert await sorted_ids(s, Sort("n")) == ["s2", "s1", "s3", "s5", "s4"]
    assert await sorted_ids(s, Sort("n", True)) == ["s3", "s1", "s2", "s5", "s4"]
    assert await sorted_ids(s, Sort("code")) == ["s4", "s1", "s5", "s3", "s2"]
    assert await sorted_ids(s, Sort("nothing")) == ["s5", "s4", "s3", "s2", "s1"]


async def test_sort_by_several_keys(sortable: Store):
    s = sortable
    # name a: s2 (date 2019-12), s3 (no date); name b: s1 (2020-12), s5 (2019-12); no name: s4.
    assert await sorted_ids(s, Sort("name"), Sort("date", True)) == ["s2", "s3", "s1", "s5", "s4"]
    assert await sorted_ids(s, Sort("name", True), Sort("n")) == ["s1", "s5", "s2", "s3", "s4"]
    assert await sorted_ids(s, Sort("date"), Sort("_id", True)) == ["s1", "s5", "s2", "s4", "s3"]
    assert await sorted_ids(s, Sort("name"), Sort("_lastUpdated")) == ["s2", "s3", "s1", "s5", "s4"]


async def test_sort_by_id_and_last_updated(sortable: Store):
    s = sortable
    await s.commit([put("Thing", "s0", 1, ts(3))])
    assert await sorted_ids(s, Sort("_id")) == ["s0", "s1", "s2", "s3", "s4", "s5"]
    assert await sorted_ids(s, Sort("_id", True)) == ["s5", "s4", "s3", "s2", "s1", "s0"]
    assert await sorted_ids(s, Sort("_lastUpdated")) == ["s1", "s2", "s0", "s3", "s4", "s5"]
    assert await sorted_ids(s, Sort("_lastUpdated", True)) == ["s5", "s4", "s0", "s3", "s2", "s1"]
    assert await sorted_ids(s, Sort("_lastUpdated", True), Sort("_id", True)) == [
        "s5",
        "s4",
        "s3",
        "s0",
        "s2",
        "s1",
    ]


async def test_sort_with_filters_and_paging(sortable: Store):
    s = sortable
    asc = Sort("date")
    assert await sorted_ids(s, asc, count=2) == ["s1", "s5"]
    assert await sorted_ids(s, asc, count=2, offset=2) == ["s2", "s4"]
    assert await sorted_ids(s, asc, count=2, offset=3) == ["s4", "s3"]
    assert await sorted_ids(s, asc, count=2, offset=4) == ["s3"]
    page = await s.search("Thing", (), sort=(asc,), count=2, offset=5)
    assert page == Page([], 5)
    assert (await s.search("Thing", (), sort=(asc,), count=0)) == Page([], 5)
    named_b = name("b")
    assert await sorted_ids(s, Sort("date", True), query=(named_b,)) == ["s1", "s5"]
    assert await sorted_ids(s, asc, query=(Not(named_b),)) == ["s2", "s4", "s3"]
    page = await s.search("Thing", (Not(named_b),), sort=(asc,), count=1, offset=2)
    assert [v.id for v in page.items] == ["s3"] and page.total == 3
    assert page.items[0] == await s.read("Thing", "s3")


async def test_sort_follows_updates_and_deletes(sortable: Store):
    s = sortable
    await s.commit([put("Thing", "s3", 2, ts(6), index=(period("2017-01", "2017-02"),))])
    await s.commit([delete("Thing", "s1", 2, ts(6))])
    assert await sorted_ids(s, Sort("date")) == ["s3", "s5", "s2", "s4"]
    assert await sorted_ids(s, Sort("date", True)) == ["s4", "s5", "s2", "s3"]


async def test_match_ids(sortable: Store):
    s = sortable
    assert await s.match_ids("Thing", (), limit=2) == [("s5", ts(5)), ("s4", ts(4))]
    assert await s.match_ids("Thing", (), sort=(Sort("date"),), limit=3) == [
        ("s1", ts(1)),
        ("s5", ts(5)),
        ("s2", ts(2)),
    ]
    assert await s.match_ids("Thing", (Not(name("b")),), sort=(Sort("date"),), limit=10) == [
        ("s2", ts(2)),
        ("s4", ts(4)),
        ("s3", ts(3)),
    ]
    assert await s.match_ids("Thing", (name("a"),), sort=(Sort("n", True),), limit=10) == [
        ("s3", ts(3)),
        ("s2", ts(2)),
    ]
    assert await s.match_ids("Thing", (name("zzz"),), limit=10) == []
    assert await s.match_ids("Thing", (), limit=0) == []
    await s.commit([delete("Thing", "s5", 2, ts(7))])
    assert await s.match_ids("Thing", (), limit=1) == [("s4", ts(4))]


async def test_any_ids(sortable: Store):
    s = sortable
    every = {"s1", "s2", "s3", "s4", "s5"}
    assert sorted(await s.any_ids("Thing", (), limit=10)) == sorted(every)
    some = await s.any_ids("Thing", (), limit=3)
    assert len(set(some)) == 3 and set(some) <= every
    assert sorted(await s.any_ids("Thing", (name("a"),), limit=10)) == ["s2", "s3"]
    assert sorted(await s.any_ids("Thing", (Not(name("b")),), limit=10)) == ["s2", "s3", "s4"]
    assert await s.any_ids("Thing", (name("a"), name("b")), limit=10) == []
    twice = (AnyOf((name("b"), IdIn(("s1", "s4")))),)  # s1 is found through both: once
    assert sorted(await s.any_ids("Thing", twice, limit=10)) == ["s1", "s4", "s5"]
    assert await s.any_ids("Thing", (name("zzz"),), limit=10) == []
    assert await s.any_ids("Thing", (), limit=0) == []
    await s.commit([delete("Thing", "s2", 2, ts(7))])
    assert await s.any_ids("Thing", (name("a"),), limit=10) == ["s3"]


# --- read_many, scan, set_index ----------------------------------------------------


async def test_read_many(store: Store):
    writes = [put("Patient", i, 1, ts(1), name=i) for i in ("a", "b", "c", "d")]
    await store.commit([*writes, put("Group", "e", 1, ts(1))])
    await store.commit([delete("Patient", "c", 2, ts(2))])
    a, b, _, d = (as_version(w) for w in writes)
    assert await store.read_many("Patient", ["d", "zz", "a", "c", "e", "b"]) == [d, a, b]
    assert await store.read_many("Patient", []) == []
    assert await store.read_many("Group", ["a", "e"]) == [await store.read("Group", "e")]
    many = [f"m{n:04d}" for n in range(1200)]
    await store.commit([put("Thing", i, 1, ts(1)) for i in many])
    assert [v.id for v in await store.read_many("Thing", many[::-1])] == many[::-1]


async def test_scan(store: Store):
    await store.commit([put("Patient", f"p{n}", 1, ts(1)) for n in (5, 1, 4, 2, 3, 6)])
    await store.commit([put("Group", "p0", 1, ts(1)), delete("Patient", "p4", 2, ts(2))])

    async def scan(after: str | None, limit: int) -> list[str]:
        return [v.id for v in await store.scan("Patient", after=after, limit=limit)]

    assert await scan(None, 2) == ["p1", "p2"]
    assert await scan("p2", 2) == ["p3", "p5"]
    assert await scan("p5", 2) == ["p6"]
    assert await scan("p6", 2) == []
    assert await scan("p35", 10) == ["p5", "p6"]
    assert await scan(None, 0) == []
    assert (await store.scan("Patient", limit=1))[0] == await store.read("Patient", "p1")


async def test_set_index(store: Store):
    await store.commit([put("Thing", "t", 1, ts(1), index=(named("old"),))])
    await store.commit([put("Thing", "t", 2, ts(2), index=(named("old"),))])
    await store.commit([put("Thing", "u", 1, ts(3), index=(named("old"),))])
    events = await store.events_after(0)
    current = await store.read("Thing", "t")

    assert await store.set_index("Thing", [("t", 1, (named("stale"),))]) == 0
    assert await found(store, "Thing", name("stale")) == set()
    rows = (named("new"), IndexRow("n", nlow=1.0), bp(SYS, 5))
    assert await store.set_index("Thing", [("t", 2, rows)]) == 1
    assert await found(store, "Thing", name("old")) == {"u"}
    assert await found(store, "Thing", name("new")) == {"t"}
    cvq = Match("cvq", (Cond("text", "eq", SYS, part=0), Cond("nlow", "eq", 5, part=1)))
    assert await found(store, "Thing", cvq) == {"t"}
    assert await sorted_ids(store, Sort("n")) == ["t", "u"]
    assert await store.read("Thing", "t") == current
    assert (await store.history("Thing", "t")).total == 2
    assert await store.events_after(0) == events

    assert await store.set_index("Thing", [("t", 2, ())]) == 1
    assert await found(store, "Thing", Match("name", ())) == {"u"}
    assert await store.set_index("Thing", [("nope", 1, rows)]) == 0
    await store.commit([delete("Thing", "u", 2, ts(4))])
    assert await store.set_index("Thing", [("u", 2, rows)]) == 0
    assert await found(store, "Thing", name("new")) == set()
    # several in one call: only those still at the version given are replaced
    await store.commit([put("Thing", "v", 1, ts(5)), put("Thing", "w", 1, ts(5))])
    both = [("v", 1, (named("b"),)), ("w", 2, (named("b"),)), ("t", 2, (named("b"),))]
    assert await store.set_index("Thing", both) == 2
    assert await found(store, "Thing", name("b")) == {"t", "v"}
    assert await store.set_index("Thing", []) == 0


def record(id_: str, lu: str, *rows: IndexRow) -> Write:
    """An audit record (a journal type's resource) stamped ``lu`` in ``date``."""
    stamp = IndexRow("date", low=lu, high=lu)
    last = IndexRow("_lastUpdated", low=lu, high=lu)
    return put("AuditEvent", id_, 1, lu, (last, stamp, *rows), recorded=lu)


def token(param: str, code: str, system: str | None = None) -> IndexRow:
    return IndexRow(param, system=system, text=code)


async def test_journal_records_are_written_once_and_keep_no_history_or_events(store: Store):
    """A journal type's resource (``AuditEvent``) is created once and never changed;
    read, vread and the type's history come from the resource itself, no outbox event
    is written, and a system history leaves it out."""
    first = await store.last_event()
    a = record("0001", ts(1), token("action", "R"))
    await store.commit([a, put("Patient", "p", 1, ts(1))])
    assert await store.read("AuditEvent", "0001") == as_version(a)
    assert await store.vread("AuditEvent", "0001", 1) == as_version(a)
    assert await store.vread("AuditEvent", "0001", 2) is None
    assert [(e.type, e.id) for e in await store.events_after(first)] == [("Patient", "p")]
    with pytest.raises(VersionConflict):
        await store.commit([record("0001", ts(2))])
    with pytest.raises(ValueError):
        await store.commit([put("AuditEvent", "0001", 2, ts(2))])
    assert await store.read("AuditEvent", "0001") == as_version(a)
    await store.commit([record("0002", ts(2)), record("0003", ts(2))])
    assert keys(await store.history("AuditEvent")) == [
        ("AuditEvent", "0003", 1),
        ("AuditEvent", "0002", 1),
        ("AuditEvent", "0001", 1),
    ]
    assert keys(await store.history("AuditEvent", "0002")) == [("AuditEvent", "0002", 1)]
    assert keys(await store.history("AuditEvent", since=ts(2), count=1)) == [
        ("AuditEvent", "0003", 1)
    ]
    assert (await store.history("AuditEvent", since=ts(2), count=0)).total == 2
    assert keys(await store.history("AuditEvent", at=ts(1))) == [("AuditEvent", "0001", 1)]
    assert keys(await store.history()) == [("Patient", "p", 1)]


async def test_register_types_keep_their_current_version_alone(store: Store):
    """A register type (the audit chain's head) is compare-and-set like any resource,
    but keeps no history versions and writes no outbox events."""
    first = await store.last_event()
    await store.commit([put("HieAuditHead", "head", 1, ts(1)), put("Patient", "p", 1, ts(1))])
    second = put("HieAuditHead", "head", 2, ts(2))
    await store.commit([second])
    with pytest.raises(VersionConflict):
        await store.commit([put("HieAuditHead", "head", 2, ts(3))])
    assert await store.read("HieAuditHead", "head") == as_version(second)
    assert await store.vread("HieAuditHead", "head", 2) == as_version(second)
    assert await store.vread("HieAuditHead", "head", 1) is None
    assert keys(await store.history("HieAuditHead")) == []
    assert [(e.type, e.id) for e in await store.events_after(first)] == [("Patient", "p")]
    await store.commit([delete("HieAuditHead", "head", 3, ts(3))])
    assert (await store.read("HieAuditHead", "head")).deleted


async def test_journal_search_by_terms_and_by_the_stamped_date(store: Store):
    """A journal type is searched by its text rows, and by its stamped parameter and
    ``_lastUpdated`` (both its commit instant), sorted by these or by id."""
    sys = "http://hl7.org/fhir/restful-interaction"
    await store.commit(
        [
            record("0001", ts(1), token("subtype", "read", sys), token("entity", "Patient/1")),
            record("0002", ts(2), token("subtype", "search", sys), token("entity", "Patient/1")),
            record("0003", ts(3), token("subtype", "read", sys), token("entity", "Patient/2")),
            record("0004", ts(4), token("action", "E")),
        ]
    )
    read = Match("subtype", (Cond("text", "eq", "read"), Cond("system", "eq", sys)))
    assert await found(store, "AuditEvent", read) == {"0001", "0003"}
    assert await found(store, "AuditEvent", Match("action", (Cond("system", "null", None),))) == {
        "0004"
    }
    patient1 = Match("entity", (Cond("text", "eq", "Patient/1"),))
    assert await found(store, "AuditEvent", read, patient1) == {"0001"}
    assert await found(store, "AuditEvent", Not(patient1)) == {"0003", "0004"}
    since2 = Match("date", (Cond("high", "ge", ts(2)),))
    assert await found(store, "AuditEvent", since2, Not(read)) == {"0002", "0004"}
    before = Match("_lastUpdated", (Cond("low", "lt", ts(3)),))
    assert await found(store, "AuditEvent", before) == {"0001", "0002"}
    assert await found(store, "AuditEvent", AnyOf((patient1, before))) == {"0001", "0002"}
    newest = await store.search("AuditEvent", (), sort=(Sort("date", True),), count=2)
    assert [v.id for v in newest.items] == ["0004", "0003"] and newest.total == 4
    oldest = await store.match_ids("AuditEvent", (read,), sort=(Sort("date"),), limit=5)
    assert [i for i, _ in oldest] == ["0001", "0003"]
    has = Has("AuditEvent", "entity", (read,))
    await store.commit([put("Patient", "1", 1, ts(5)), put("Patient", "2", 1, ts(5))])
    assert await found(store, "Patient", has) == {"1", "2"}
    assert await found(store, "Patient", Has("AuditEvent", "entity", (Not(read),))) == {"1"}
    await store.commit([put("Patient", "2", 2, ts(6), index=(named("ann"),))])
    to_ann = Chain("entity", "Patient", (name("ann"),))
    assert await found(store, "AuditEvent", to_ann) == {"0003"}
    assert await found(store, "AuditEvent", read, to_ann) == {"0003"}
    assert await found(store, "AuditEvent", Match("action", ())) == {"0004"}
    assert await found(store, "AuditEvent", Not(Match("subtype", ()))) == {"0004"}
    assert await store.set_index("AuditEvent", [("0004", 1, (token("action", "R"),))]) == 1
    assert await found(store, "AuditEvent", Match("action", (Cond("text", "eq", "R"),))) == {"0004"}


async def test_written_after_an_outbox_position(store: Store):
    """WrittenAfter(seq): resources of the query's type with a version written after
    outbox position ``seq``, read in the same query (what the consent engine decides
    afresh beside a withheld set computed at ``seq``)."""
    await store.commit([put("Thing", i, 1, ts(1), index=(named(i),)) for i in "abc"])
    await store.commit([put("Other", "b", 1, ts(1))])
    mark = await store.last_event()
    assert await found(store, "Thing", WrittenAfter(mark)) == set()
    assert await found(store, "Thing", Not(WrittenAfter(mark))) == {"a", "b", "c"}
    await store.commit([put("Thing", "b", 2, ts(2), index=(named("b"),))])
    await store.commit([put("Thing", "d", 1, ts(3), index=(named("d"),))])
    await store.commit([delete("Thing", "c", 2, ts(4)), put("Other", "a", 1, ts(4))])
    assert await found(store, "Thing", WrittenAfter(mark)) == {"b", "d"}  # c: deleted
    assert await found(store, "Thing", Not(WrittenAfter(mark))) == {"a"}
    assert await found(store, "Thing", WrittenAfter(0)) == {"a", "b", "d"}
    assert await found(store, "Other", WrittenAfter(mark)) == {"a"}
    # as consent uses it: "not written since, or else matches" beside other terms
    either = AnyOf((Not(WrittenAfter(mark)), name("d")))
    assert await found(store, "Thing", either) == {"a", "d"}
    assert await found(store, "Thing", either, name("b")) == set()
    assert (await store.search("Thing", (either,), count=0)).total == 2
    latest = await store.last_event()
    nothing_since = AnyOf((Not(WrittenAfter(latest)), name("zz")))
    assert await found(store, "Thing", nothing_since) == {"a", "b", "d"}
    assert await found(store, "Thing", nothing_since, name("b")) == {"b"}
    matched = await store.match_ids("Thing", (AnyOf((WrittenAfter(mark), name("a"))),), limit=10)
    assert {i for i, _ in matched} == {"a", "b", "d"}


# --- snapshots ---------------------------------------------------------------------

FUTURE, PAST = "2999-01-01T00:00:00.000000Z", "2001-01-01T00:00:00Z"


async def test_snapshots(store: Store):
    refs = [f"Patient/p{n}" for n in range(7)]
    await store.save_snapshot("k1", refs, FUTURE)
    assert await store.load_snapshot("k1", 0, 3) == (refs[:3], 7)
    assert await store.load_snapshot("k1", 3, 3) == (refs[3:6], 7)
    assert await store.load_snapshot("k1", 6, 3) == (refs[6:], 7)
    assert await store.load_snapshot("k1", 9, 3) == ([], 7)
    assert await store.load_snapshot("k1", 0, 0) == ([], 7)
    assert await store.load_snapshot("nope", 0, 3) is None

    await store.save_snapshot("k1", ["Group/g"], "2999-01-01T01:00:00+01:00")
    assert await store.load_snapshot("k1", 0, 3) == (["Group/g"], 1)
    await store.save_snapshot("empty", [], FUTURE)
    assert await store.load_snapshot("empty", 0, 10) == ([], 0)


async def test_expired_snapshots_are_gone(store: Store):
    await store.save_snapshot("old", ["Patient/a"], PAST)
    assert await store.load_snapshot("old", 0, 10) is None
    await store.save_snapshot("new", ["Patient/b"], FUTURE)
    assert await store.load_snapshot("old", 0, 10) is None
    assert await store.load_snapshot("new", 0, 10) == (["Patient/b"], 1)


# --- claims ----------------------------------------------------------------------


async def test_claims(store: Store):
    assert await store.claim("client-a:jti-1", FUTURE) is True
    assert await store.claim("client-a:jti-1", FUTURE) is False
    assert await store.claim("client-a:jti-1", "2999-01-02T00:00:00+01:00") is False
    assert await store.claim("client-b:jti-1", FUTURE) is True


async def test_expired_claims_may_be_claimed_again(store: Store):
    assert await store.claim("old", PAST) is True
    assert await store.claim("old", PAST) is True
    assert await store.claim("old", FUTURE) is True
    assert await store.claim("old", FUTURE) is False


async def test_concurrent_claims_one_wins(store: Store):
    results = await asyncio.gather(*(store.claim("contested", FUTURE) for _ in range(20)))
    assert results.count(True) == 1
    await store.claim("lapsed", PAST)
    results = await asyncio.gather(*(store.claim("lapsed", FUTURE) for _ in range(20)))
    assert results.count(True) == 1


async def test_claims_survive_close_and_reopen(make_store):
    first = make_store()
    await first.open()
    assert await first.claim("k", FUTURE) is True
    await first.close()
    again = make_store()
    await again.open()
    try:
        assert await again.claim("k", FUTURE) is False
    finally:
        await again.close()


# --- the reference evaluator -------------------------------------------------------


@pytest.mark.parametrize("seed", [20260101, 7])
async def test_search_agrees_with_reference_evaluator(store: Store, seed: int):
    """Random data (numbers, composites, references) and queries (chains, _has,
    sorts); ``row_matches`` and tests/store/oracle.py are the oracle."""
    await check_against_oracle(store, seed)


# --- outbox and counters ---------------------------------------------------------


async def test_events_after(store: Store):
    await store.commit([put("Patient", "a", 1, ts(1))])
    await store.commit([put("Patient", "b", 1, ts(2)), put("Observation", "o", 1, ts(2))])
    with pytest.raises(VersionConflict):
        await store.commit([put("Patient", "c", 1, ts(3)), put("Patient", "a", 1, ts(3))])
    await store.commit([delete("Patient", "a", 2, ts(4))])

    events = await store.events_after(0)
    assert [(e.type, e.id, e.version, e.method) for e in events] == [
        ("Patient", "a", 1, "POST"),
        ("Patient", "b", 1, "POST"),
        ("Observation", "o", 1, "POST"),
        ("Patient", "a", 2, "DELETE"),
    ]
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs)) and seqs[0] > 0
    assert await store.events_after(seqs[1]) == events[2:]
    assert await store.events_after(seqs[1], limit=1) == events[2:3]
    assert await store.events_after(0, limit=2) == events[:2]
    assert await store.events_after(seqs[-1]) == []
    assert await store.events_after(0, limit=0) == []


async def test_counters(store: Store):
    assert [await store.next_value("a") for _ in range(3)] == [1, 2, 3]
    assert await store.next_value("b") == 1
    await store.commit([put("Patient", "a", 1, ts(1))])
    assert await store.next_value("outbox") == 1
    assert await store.next_value("0") == 1
    assert await store.next_value("a") == 4


async def test_counters_under_concurrency(store: Store):
    values = await asyncio.gather(*(store.next_value("c") for _ in range(50)))
    assert sorted(values) == list(range(1, 51))


# --- concurrency -----------------------------------------------------------------


async def test_concurrent_updates_one_wins(store: Store):
    await store.commit([put("Patient", "p", 1, ts(1))])
    contenders = [put("Patient", "p", 2, ts(2), name=f"n{n}") for n in range(20)]
    results = await asyncio.gather(*(store.commit([w]) for w in contenders), return_exceptions=True)
    winners = [w for w, r in zip(contenders, results, strict=True) if r is None]
    assert len(winners) == 1
    assert all(isinstance(r, VersionConflict) for r in results if r is not None)
    assert await store.read("Patient", "p") == as_version(winners[0])
    assert (await store.history("Patient", "p")).total == 2
    assert len(await store.events_after(0)) == 2


async def test_concurrent_creates_one_wins(store: Store):
    contenders = [put("Patient", "new", 1, ts(1), name=f"n{n}") for n in range(20)]
    results = await asyncio.gather(*(store.commit([w]) for w in contenders), return_exceptions=True)
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, VersionConflict) for r in results if r is not None)
    assert (await store.history()).total == 1


async def test_concurrent_independent_commits_all_apply(store: Store):
    writes = [
        [put("Patient", f"p{n}", 1, ts(1)), put("Observation", f"o{n}", 1, ts(1))]
        for n in range(20)
    ]
    await asyncio.gather(*(store.commit(w) for w in writes))
    assert (await store.search("Patient", (), count=0)).total == 20
    events = await store.events_after(0)
    assert len(events) == 40 and len({e.seq for e in events}) == 40


# --- lifecycle -------------------------------------------------------------------


async def test_data_survives_close_and_reopen(make_store):
    v1 = put("Patient", "p", 1, ts(1), index=(IndexRow("name", text="ann"),))
    v2 = put("Patient", "p", 2, ts(2), index=(IndexRow("name", text="bea"),))
    store = make_store()
    await store.open()
    await store.commit([v1])
    await store.commit([v2, put("Patient", "q", 1, ts(2))])
    await store.commit([delete("Patient", "q", 2, ts(3))])
    assert await store.next_value("c") == 1
    events = await store.events_after(0)
    await store.close()
    await store.open()
    assert await store.read("Patient", "p") == as_version(v2)
    await store.close()

    store = make_store()
    await store.open()
    try:
        assert await store.read("Patient", "p") == as_version(v2)
        assert await store.vread("Patient", "p", 1) == as_version(v1)
        assert (await store.read("Patient", "q")).deleted
        assert keys(await store.history()) == [
            ("Patient", "q", 2),
            ("Patient", "q", 1),
            ("Patient", "p", 2),
            ("Patient", "p", 1),
        ]
        assert await ids(store, "Patient", (Match("name", (Cond("text", "eq", "bea"),)),)) == ["p"]
        assert await store.events_after(0) == events
        assert await store.next_value("c") == 2
        with pytest.raises(VersionConflict):
            await store.commit([put("Patient", "p", 2, ts(4))])
        await store.commit([put("Patient", "p", 3, ts(4))])
        assert [e.id for e in await store.events_after(events[-1].seq)] == ["p"]
    finally:
        await store.close()


# ---------------------------------------------------------------- guards
MRN = (Match("identifier", (Cond("system", "eq", "mrn"), Cond("text", "eq", "7"))),)


def mrn_patient(id_: str, version: int, lu: str, guard: tuple = ()) -> Write:
    w = put("Patient", id_, version, lu, index=(IndexRow("identifier", "mrn", "7"),))
    return Write(
        w.type, w.id, w.prev_version, w.version, w.last_updated, w.method, w.body, w.index, guard
    )


async def test_guard_blocks_a_second_conditional_create(store: Store):
    await store.commit([mrn_patient("p1", 1, ts(1), MRN)])
    with pytest.raises(ConditionConflict):
        await store.commit([mrn_patient("p2", 1, ts(2), MRN), put("Patient", "other", 1, ts(2))])
    assert await store.read("Patient", "p2") is None
    assert await store.read("Patient", "other") is None  # the whole commit was refused
    assert (await store.search("Patient", MRN)).total == 1


async def test_guard_ignores_deleted_and_own_writes(store: Store):
    await store.commit([mrn_patient("p1", 1, ts(1))])
    # Deleting the match in the same commit frees the condition.
    await store.commit([delete("Patient", "p1", 2, ts(2)), mrn_patient("p2", 1, ts(2), MRN)])
    # A deleted resource does not match any more either.
    await store.commit([delete("Patient", "p2", 2, ts(3))])
    await store.commit([mrn_patient("p3", 1, ts(4), MRN)])
    assert [v.id for v in (await store.search("Patient", MRN)).items] == ["p3"]


async def test_concurrent_guarded_creates_one_wins(store: Store):
    async def attempt(n: int) -> bool:
        try:
            await store.commit([mrn_patient(f"c{n}", 1, ts(1), MRN)])
            return True
        except ConditionConflict:
            return False

    results = await asyncio.gather(*(attempt(n) for n in range(20)))
    assert sum(results) == 1
    assert (await store.search("Patient", MRN)).total == 1
