"""A randomized check of store search against a reference evaluator in Python.

``row_matches`` (hie.store.query) is the oracle for one index row; this module adds
the reference semantics of the terms over it (chains and ``_has`` across two types),
of sort keys, and a generator of random data and queries.
"""

from __future__ import annotations

import functools
import random

import orjson

from hie.store import Store, Write
from hie.store.query import (
    NUMBER_COLUMNS,
    TEXT_COLUMNS,
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
    row_matches,
)

TYPES = ("Thing", "Other")
TEXTS = ["", "a", "ab", "abc", "b", "ba", "a.b", "a%", "Z", "é", "张"]
NUMBERS = [-1.5, 0.0, 0.5, 2.0, 10.0, 100.0]
PARAMS = ["p", "q", "r"]
COMPOSITE = "c"
REF = "ref"

#: {type: {id: (last_updated, rows)}} of live resources; under :data:`WRITTEN`,
#: optionally, {(type, id): outbox sequence number of its last write}.
World = dict[str, dict]
WRITTEN = "_written"


def evaluate(world: World, type_: str, id_: str, term: Term) -> bool:
    """Whether live resource ``type_/id_`` matches ``term`` (reference semantics)."""
    rows = world[type_][id_][1]
    if isinstance(term, Match):
        return any(r.param == term.param and row_matches(r, term.conds) for r in rows)
    if isinstance(term, IdIn | IdSet):
        return id_ in term.ids
    if isinstance(term, WrittenAfter):
        return world.get(WRITTEN, {}).get((type_, id_), 0) > term.seq
    if isinstance(term, AnyOf):
        return any(evaluate(world, type_, id_, t) for t in term.terms)
    if isinstance(term, Not):
        return not evaluate(world, type_, id_, term.term)
    if isinstance(term, Chain):
        return any(
            r.param == term.param and r.text == f"{term.target}/{target}"
            for target in world[term.target]
            if matches(world, term.target, target, term.query)
            for r in rows
        )
    return any(
        r.param == term.param and r.text == f"{type_}/{id_}"
        for other in world[term.type]
        if matches(world, term.type, other, term.query)
        for r in world[term.type][other][1]
    )


def matches(world: World, type_: str, id_: str, query: Query) -> bool:
    """Whether live resource ``type_/id_`` matches every term of ``query``."""
    return all(evaluate(world, type_, id_, t) for t in query)


def sort_value(rows: tuple[IndexRow, ...], key: Sort) -> str | float | None:
    """The sort key of ``rows`` for parameter ``key.param`` (None: no value)."""
    columns = ("high", "nhigh", "text") if key.descending else ("low", "nlow", "text")
    values = [
        next(v for c in columns if (v := getattr(r, c)) is not None)
        for r in rows
        if r.param == key.param and any(getattr(r, c) is not None for c in columns)
    ]
    if not values:
        return None
    return (max if key.descending else min)(values, key=_typed)


def _typed(value: str | float) -> tuple[bool, str | float]:
    """Numbers before strings, as both SQLite and BSON order mixed values."""
    return isinstance(value, str), value


def ordered(world: World, type_: str, hits: list[str], sort: tuple[Sort, ...]) -> list[str]:
    """``hits`` in search order: the sort keys (missing values last), then
    last_updated descending, then id."""
    docs = world[type_]

    def value(id_: str, key: Sort) -> str | float | None:
        if key.param == "_id":
            return id_
        if key.param == "_lastUpdated":
            return docs[id_][0]
        return sort_value(docs[id_][1], key)

    def compare(a: str, b: str) -> int:
        for key in sort:
            va, vb = value(a, key), value(b, key)
            if va is None or vb is None:
                if (va is None) != (vb is None):
                    return 1 if va is None else -1
                continue
            ka, kb = _typed(va), _typed(vb)
            if ka != kb:
                return (1 if ka > kb else -1) * (-1 if key.descending else 1)
        if docs[a][0] != docs[b][0]:
            return -1 if docs[a][0] > docs[b][0] else 1
        return -1 if a < b else (1 if a > b else 0)

    return sorted(hits, key=functools.cmp_to_key(compare))


def _value(rnd: random.Random, column: str) -> str | float:
    return rnd.choice(NUMBERS if column in NUMBER_COLUMNS else TEXTS)


def _columns(rnd: random.Random) -> dict[str, str | float]:
    return {c: _value(rnd, c) for c in (*TEXT_COLUMNS, *NUMBER_COLUMNS) if rnd.random() < 0.4}


def random_rows(rnd: random.Random, ids: dict[str, list[str]]) -> tuple[IndexRow, ...]:
    """Plain rows, composite rows of parameter ``c`` and references (``ref``) to
    resources of both types (some unknown)."""
    rows = [IndexRow(rnd.choice(PARAMS), **_columns(rnd)) for _ in range(rnd.randint(0, 4))]
    for _ in range(rnd.randint(0, 2)):
        parts = tuple(IndexRow(f"part{k}", **_columns(rnd)) for k in range(rnd.randint(1, 3)))
        rows.append(
            IndexRow(COMPOSITE, **(_columns(rnd) if rnd.random() < 0.2 else {}), parts=parts)
        )
    for _ in range(rnd.randint(0, 2)):
        type_ = rnd.choice(TYPES)
        rows.append(IndexRow(REF, type_, f"{type_}/{rnd.choice([*ids[type_], 'gone'])}"))
    return tuple(rows)


def random_cond(rnd: random.Random, part: int | None = None) -> Cond:
    column = rnd.choice((*TEXT_COLUMNS, *NUMBER_COLUMNS))
    ops = ["eq", "ne", "lt", "le", "gt", "ge", "null", "in"]
    if column in TEXT_COLUMNS:
        ops += ["prefix", "contains"]
    op = rnd.choice(ops)
    if op == "null":
        return Cond(column, op, part=part)
    if op == "in":
        values = tuple(_value(rnd, column) for _ in range(rnd.randint(0, 3)))
        return Cond(column, op, values, part=part)
    return Cond(column, op, _value(rnd, column), part=part)


def random_term(rnd: random.Random, ids: dict[str, list[str]], type_: str, depth: int = 0) -> Term:
    kinds = ["match"] * 5 + ["composite"]
    if depth < 3:
        kinds += ["idin", "anyof", "not", "chain", "has"]
    kind = rnd.choice(kinds)
    if kind == "idin":
        chosen = rnd.sample([*ids[type_], "nope"], rnd.randint(0, 4))
        # a large reused set (its own form in the store) one time in three
        return IdSet(frozenset(chosen)) if rnd.random() < 1 / 3 else IdIn(tuple(chosen))
    if kind == "anyof":
        terms = tuple(random_term(rnd, ids, type_, depth + 1) for _ in range(rnd.randint(0, 3)))
        return AnyOf(terms)
    if kind == "not":
        return Not(random_term(rnd, ids, type_, depth + 1))
    if kind in ("chain", "has"):
        other = rnd.choice(TYPES)
        inner = tuple(random_term(rnd, ids, other, depth + 2) for _ in range(rnd.randint(0, 2)))
        return Chain(REF, other, inner) if kind == "chain" else Has(other, REF, inner)
    if kind == "composite":
        conds = [random_cond(rnd, rnd.randint(0, 2)) for _ in range(rnd.randint(1, 3))]
        if rnd.random() < 0.2:
            conds.append(random_cond(rnd))
        return Match(COMPOSITE, tuple(conds))
    return Match(rnd.choice(PARAMS), tuple(random_cond(rnd) for _ in range(rnd.randint(0, 3))))


def random_sort(rnd: random.Random) -> tuple[Sort, ...]:
    names = [*PARAMS, COMPOSITE, "_id", "_lastUpdated"]
    return tuple(Sort(rnd.choice(names), rnd.random() < 0.5) for _ in range(rnd.randint(0, 2)))


def _write(type_: str, id_: str, version: int, lu: str, rows: tuple | None) -> Write:
    """A version (a tombstone when ``rows`` is None) replacing the one before."""
    if rows is None:
        return Write(type_, id_, version - 1, version, lu, "DELETE", None)
    data = orjson.dumps({"resourceType": type_, "id": id_, "meta": {"versionId": str(version)}})
    return Write(type_, id_, version - 1, version, lu, "PUT", data, rows)


async def load_world(store: Store, rnd: random.Random) -> tuple[World, dict[str, list[str]]]:
    """Three rounds of random creates, updates and deletes of both types; the world
    and the ids queries may use."""
    ids = {type_: [f"{type_[0].lower()}{n:02d}" for n in range(30)] for type_ in TYPES}
    versions: dict[tuple[str, str], int] = {}
    world: World = {type_: {} for type_ in TYPES}
    for round_ in range(3):
        writes = []
        for type_ in TYPES:
            for id_ in ids[type_]:
                if round_ and rnd.random() < 0.5:
                    continue
                version = versions.get((type_, id_), 0) + 1
                versions[type_, id_] = version
                lu = f"2026-01-01T00:00:{round_ * 10 + rnd.randint(0, 3):02d}.000000Z"
                if id_ in world[type_] and rnd.random() < 0.3:
                    writes.append(_write(type_, id_, version, lu, None))
                    del world[type_][id_]
                    continue
                rows = random_rows(rnd, ids)
                writes.append(_write(type_, id_, version, lu, rows))
                world[type_][id_] = (lu, rows)
        await store.commit(writes)
    return world, ids


async def check_against_oracle(store: Store, seed: int, queries: int = 200) -> None:
    """Random data and queries (with random sorts); every result must be the
    oracle's, for search (all, and a page), match_ids and (as a set) any_ids."""
    rnd = random.Random(seed)
    world, ids = await load_world(store, rnd)
    assert all(8 < len(world[t]) < 30 for t in TYPES)
    for _ in range(queries):
        type_ = rnd.choice(TYPES)
        query = tuple(random_term(rnd, ids, type_) for _ in range(rnd.randint(0, 3)))
        sort = random_sort(rnd)
        hits = [i for i in world[type_] if matches(world, type_, i, query)]
        expected = ordered(world, type_, hits, sort)
        page = await store.search(type_, query, sort=sort, count=100)
        assert [v.id for v in page.items] == expected, (type_, query, sort)
        assert page.total == len(expected)
        offset = rnd.randint(0, 5)
        page = await store.search(type_, query, sort=sort, count=3, offset=offset)
        assert [v.id for v in page.items] == expected[offset : offset + 3], (query, sort)
        limit = rnd.randint(1, 6)
        found = await store.match_ids(type_, query, sort=sort, limit=limit)
        assert found == [(i, world[type_][i][0]) for i in expected[:limit]], (query, sort)
        some = await store.any_ids(type_, query, limit=limit)
        assert len(some) == len(set(some)) == min(limit, len(hits)), query
        assert set(some) <= set(hits), query
