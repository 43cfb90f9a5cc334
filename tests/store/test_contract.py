"""The Store contract: every adapter must pass every test here (see conftest.py)."""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest

from hie.store import ConditionConflict, Page, Store, Version, VersionConflict, Write
from hie.store.query import (
    COLUMNS,
    AnyOf,
    Cond,
    IdIn,
    IndexRow,
    Match,
    Not,
    Query,
    Term,
    row_matches,
)


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
    ("lt", "ab", {"r1"}),
    ("le", "ab", {"r1", "r2"}),
    ("gt", "ab", {"r3"}),
    ("ge", "ab", {"r2", "r3"}),
    ("gt", "", {"r1", "r2", "r3"}),
    ("prefix", "a", {"r1", "r2"}),
    ("prefix", "ab", {"r2"}),
    ("prefix", "", {"r1", "r2", "r3"}),
    ("null", None, {"r4"}),
]


@pytest.mark.parametrize("column", COLUMNS)
@pytest.mark.parametrize(("op", "value", "expected"), OP_CASES)
async def test_search_each_op_on_each_column(store: Store, column, op, value, expected):
    param = f"c_{column}"
    writes = [
        put("Thing", rid, 1, ts(1), index=(IndexRow(param, **{column: v}),))
        for rid, v in (("r1", "a"), ("r2", "ab"), ("r3", "b"), ("r4", None))
    ]
    other = {c: "a" for c in COLUMNS if c != column}
    writes.append(put("Thing", "r5", 1, ts(1), index=(IndexRow("other", **{column: "a"}),)))
    writes.append(put("Thing", "r6", 1, ts(1), index=(IndexRow(param, **other),)))
    await store.commit(writes)
    found = await ids(store, "Thing", (Match(param, (Cond(column, op, value),)),))
    assert set(found) == expected | ({"r6"} if op == "null" else set())


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


def _evaluate(term: Term, id_: str, rows: tuple[IndexRow, ...]) -> bool:
    if isinstance(term, Match):
        return any(r.param == term.param and row_matches(r, term.conds) for r in rows)
    if isinstance(term, IdIn):
        return id_ in term.ids
    if isinstance(term, AnyOf):
        return any(_evaluate(t, id_, rows) for t in term.terms)
    return not _evaluate(term.term, id_, rows)


VALUES = ["", "a", "ab", "abc", "b", "ba", "a.b", "a%", "Z", "é", "张"]
PARAMS = ["p", "q", "r"]


def _random_row(rnd: random.Random) -> IndexRow:
    cols = {c: rnd.choice(VALUES) for c in COLUMNS if rnd.random() < 0.6}
    return IndexRow(rnd.choice(PARAMS), **cols)


def _random_term(rnd: random.Random, ids_: list[str], depth: int = 0) -> Term:
    kind = rnd.choice(["match"] * 4 + (["idin", "anyof", "not"] if depth < 3 else []))
    if kind == "idin":
        return IdIn(tuple(rnd.sample(ids_ + ["nope"], rnd.randint(0, 4))))
    if kind == "anyof":
        return AnyOf(tuple(_random_term(rnd, ids_, depth + 1) for _ in range(rnd.randint(0, 3))))
    if kind == "not":
        return Not(_random_term(rnd, ids_, depth + 1))
    conds = []
    for _ in range(rnd.randint(0, 3)):
        op = rnd.choice(["eq", "lt", "le", "gt", "ge", "prefix", "null"])
        value = None if op == "null" else rnd.choice(VALUES)
        conds.append(Cond(rnd.choice(COLUMNS), op, value))
    return Match(rnd.choice(PARAMS), tuple(conds))


async def test_search_agrees_with_reference_evaluator(store: Store):
    """Random data and queries; ``row_matches`` is the oracle."""
    rnd = random.Random(20260101)
    ids_ = [f"t{n:02d}" for n in range(40)]
    live: dict[str, tuple[int, str, tuple[IndexRow, ...] | None]] = {}
    for round_ in range(3):
        writes = []
        for id_ in ids_:
            if round_ and rnd.random() < 0.5:
                continue
            version = live[id_][0] + 1 if id_ in live else 1
            lu = ts(round_ * 10 + rnd.randint(0, 3))
            if id_ in live and live[id_][2] is not None and rnd.random() < 0.3:
                writes.append(delete("Thing", id_, version, lu))
                live[id_] = (version, lu, None)
                continue
            rows = tuple(_random_row(rnd) for _ in range(rnd.randint(0, 4)))
            writes.append(
                Write(
                    "Thing",
                    id_,
                    version - 1,
                    version,
                    lu,
                    "PUT",
                    body("Thing", id_, version, lu),
                    rows,
                )
            )
            live[id_] = (version, lu, rows)
        await store.commit(writes)
    current = {i: (lu, rows) for i, (_, lu, rows) in live.items() if rows is not None}
    assert 10 < len(current) < 40

    for _ in range(300):
        query = tuple(_random_term(rnd, ids_) for _ in range(rnd.randint(0, 3)))
        hits = [i for i, (_, rows) in current.items() if all(_evaluate(t, i, rows) for t in query)]
        expected = sorted(sorted(hits), key=lambda i: current[i][0], reverse=True)
        assert await ids(store, "Thing", query) == expected, query
        offset = rnd.randint(0, 5)
        page = await store.search("Thing", query, count=3, offset=offset)
        assert [v.id for v in page.items] == expected[offset : offset + 3], query
        assert page.total == len(expected)


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
