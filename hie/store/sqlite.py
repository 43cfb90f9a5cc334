"""SqliteStore: the embedded store (stdlib sqlite3, WAL mode), used when no MongoDB
URI is configured.

Tables: ``resources`` (current version of each resource, body included), ``history``
(every version, ``seq`` gives commit order), ``search_index`` (index rows of current,
non-deleted versions only; ``grp`` numbers a composite row within its resource),
``search_part`` (the components of composite rows, keyed by ``grp`` and ``part``),
``snapshots``/``snapshot_refs`` (paging snapshots), ``live_counts`` (live resources
per type, kept by each commit), ``outbox``, ``counters`` and ``claims`` (one-time keys
until their expiry, see :meth:`SqliteStore.claim`). The append-only
:data:`~hie.store.port.JOURNAL_TYPES` (the audit log) have their resources in
``resources`` but no ``history`` or ``outbox`` rows, and their index rows in
``journal_terms``: one B-tree keyed ``(type, param, text, id, system)``, a third of the
cost of a ``search_index`` row with its eight indexes; their stamped date parameter and
``_lastUpdated`` are conditions on ``resources.last_updated``. The
:data:`~hie.store.port.REGISTER_TYPES` (the audit chain's head) are their ``resources``
row alone.
``PRAGMA user_version`` holds the schema version; :func:`migrate` upgrades older files
in place when the store opens.

Search plan. Each query term has two SQL forms: a *set* (an uncorrelated ``SELECT`` of
matching ids, answered from a ``search_index`` index) and a *check* (an ``EXISTS``
correlated with one resource id, answered through the ``(type, id, param)`` index). A
negated term whose set is small is checked as ``id NOT IN (set)``: the set is built
once per statement instead of probed per resource (the consent filter's shape). An
``IdSet`` (a large id set many queries reuse: a caller's withheld resources) is a
temporary table of each reader connection, filled once (:class:`TempSets`). A
``WrittenAfter`` term reads the type's outbox events after its position through the
``outbox_type`` index: a few recent ids, one set per statement.
The term expected to match least (a capped ``count`` probe of its set, see
:data:`PROBE`) drives: its set is materialised and every other term is checked per
id, so cost follows the smallest set, not the number of resources. ``prefix`` is an
index range (``text >= p AND text < successor(p)``); ``contains``, ``ne`` and ``null``
filter the parameter's rows (a scan of that parameter, not of the table). Chains and
``_has`` nest: their sets feed ``IN`` lists of ``Type/id`` references, their checks
follow the reference from the row at hand.

Order. Small results (driver set under :data:`PROBE` ids) are sorted whole, a sort
key being the ``min``/``max`` of the parameter's row values. Large ones are *walked*
in order instead, checking each resource until the page is full: by
``(type, last_updated DESC, id)`` of live resources for the default order, and by the
expression indexes ``search_asc``/``search_desc`` over a row's sort value for a
parameter sort (the first time a resource's id comes up in that order is at its
minimum, or its maximum descending), then the resources without a value. ``total``
counts the whole driver set (index-only, ids being in the value indexes), so it grows
with the number of matches; an unfiltered total is read from ``live_counts``.

Threading: one writer connection used from a single worker thread serialises commits;
reads use per-thread reader connections from a small thread pool (WAL lets readers run
beside the writer), each search inside one read transaction. Point reads by primary
key take microseconds, so they run directly on the event loop with its own connection
instead of paying a thread hop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import sqlite3
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hie.store.port import (
    JOURNAL_TYPES,
    REGISTER_TYPES,
    ConditionConflict,
    Event,
    Page,
    Store,
    StoreError,
    Version,
    VersionConflict,
    Write,
    keeps_history,
)
from hie.store.query import (
    COLUMNS,
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

SCHEMA_VERSION = 3
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS resources (
        type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL,
        last_updated TEXT NOT NULL, method TEXT NOT NULL, body BLOB,
        PRIMARY KEY (type, id)
    ) WITHOUT ROWID""",
    """CREATE INDEX IF NOT EXISTS resources_live ON resources (type, last_updated DESC, id)
        WHERE body IS NOT NULL""",
    """CREATE TABLE IF NOT EXISTS history (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL,
        last_updated TEXT NOT NULL, method TEXT NOT NULL, body BLOB
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS history_version ON history (type, id, version)",
    "CREATE INDEX IF NOT EXISTS history_lu ON history (last_updated, seq)",
    "CREATE INDEX IF NOT EXISTS history_type_lu ON history (type, last_updated, seq)",
    """CREATE TABLE IF NOT EXISTS search_index (
        type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
        system TEXT, text TEXT, low TEXT, high TEXT, nlow REAL, nhigh REAL, grp INTEGER
    )""",
    "CREATE INDEX IF NOT EXISTS search_text ON search_index (type, param, text, system, id)",
    """CREATE INDEX IF NOT EXISTS search_low ON search_index (type, param, low, id)
        WHERE low IS NOT NULL""",
    """CREATE INDEX IF NOT EXISTS search_high ON search_index (type, param, high, id)
        WHERE high IS NOT NULL""",
    """CREATE INDEX IF NOT EXISTS search_nlow ON search_index (type, param, nlow, id)
        WHERE nlow IS NOT NULL""",
    """CREATE INDEX IF NOT EXISTS search_nhigh ON search_index (type, param, nhigh, id)
        WHERE nhigh IS NOT NULL""",
    "CREATE INDEX IF NOT EXISTS search_owner ON search_index (type, id, param)",
    """CREATE INDEX IF NOT EXISTS search_asc
        ON search_index (type, param, coalesce(low, nlow, text))""",
    """CREATE INDEX IF NOT EXISTS search_desc
        ON search_index (type, param, coalesce(high, nhigh, text))""",
    """CREATE TABLE IF NOT EXISTS search_part (
        type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
        grp INTEGER NOT NULL, part INTEGER NOT NULL,
        system TEXT, text TEXT, low TEXT, high TEXT, nlow REAL, nhigh REAL
    )""",
    "CREATE INDEX IF NOT EXISTS part_text ON search_part (type, param, part, text, system)",
    """CREATE INDEX IF NOT EXISTS part_low ON search_part (type, param, part, low)
        WHERE low IS NOT NULL""",
    """CREATE INDEX IF NOT EXISTS part_nlow ON search_part (type, param, part, nlow)
        WHERE nlow IS NOT NULL""",
    "CREATE INDEX IF NOT EXISTS part_owner ON search_part (type, id, grp, part)",
    """CREATE TABLE IF NOT EXISTS snapshots (
        key TEXT PRIMARY KEY, length INTEGER NOT NULL, expires TEXT NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS snapshots_expires ON snapshots (expires)",
    """CREATE TABLE IF NOT EXISTS snapshot_refs (
        key TEXT NOT NULL, pos INTEGER NOT NULL, ref TEXT NOT NULL, PRIMARY KEY (key, pos)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, method TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS outbox_type ON outbox (type, seq)",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS claims (
        key TEXT PRIMARY KEY, expires TEXT NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS claims_expires ON claims (expires)",
    "CREATE TABLE IF NOT EXISTS live_counts (type TEXT PRIMARY KEY, n INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS journal_terms (
        type TEXT NOT NULL, param TEXT NOT NULL, text TEXT NOT NULL, id TEXT NOT NULL,
        system TEXT NOT NULL, PRIMARY KEY (type, param, text, id, system)
    ) WITHOUT ROWID""",
)
#: Indexes whose definition changed in schema 1 (dropped, then created anew).
_CHANGED_IN_1 = ("resources_lu", "search_text", "search_low", "search_high", "search_owner")

#: Probe cap: a term whose set reaches this many rows counts as broad; a query whose
#: smallest set is broad is walked in result order instead of being sorted whole.
PROBE = 5000
#: A negated term whose set has fewer rows is checked with ``NOT IN`` that set.
FEW = 1000
#: Prepared statements each connection keeps (sqlite3's default is 128).
STATEMENTS = 1024
#: Stands for the checked resource's id in a kept compiled fragment.
_ID = "\x00id\x00"
#: How long, and for how many terms, plan choices are remembered (see Choices).
CHOICE_SECONDS = 60.0
MAX_CHOICES = 20_000

_SQL_OPS = {"eq": "=", "ne": "<>", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
#: Ops an index on (type, param, column) narrows down.
_SEEK_OPS = frozenset({"eq", "in", "prefix", "lt", "le", "gt", "ge"})
#: Longer IN lists are passed as one JSON array parameter (SQLite limits parameters).
_INLINE_VALUES = 100
_SEEK_COLUMNS = frozenset({"text", "low", "high", "nlow", "nhigh"})
_PART_SEEK_COLUMNS = frozenset({"text", "low", "nlow"})
_ASC = "coalesce({0}.low, {0}.nlow, {0}.text)"
_DESC = "coalesce({0}.high, {0}.nhigh, {0}.text)"
_VERSION_COLS = "type, id, version, last_updated, method, body"
#: The ids of a type's outbox events after a sequence number (WrittenAfter).
_WRITTEN_AFTER = "SELECT id FROM outbox WHERE type = ? AND seq > ?"
#: Page cache per connection: the writer's holds the index pages that commits touch.
WRITER_CACHE_MB = 64
READER_CACHE_MB = 16
_CHUNK = 500
#: A term given twice by one resource is one row.
_INSERT_TERMS = "INSERT OR IGNORE INTO journal_terms VALUES (?, ?, ?, ?, ?)"

Frag = tuple[str, list]


def _version(row: tuple) -> Version:
    return Version(row[0], row[1], row[2], row[3], row[4], row[5])


def _connect(path: Path, synchronous: str, cache_mb: int) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path,
        isolation_level=None,
        check_same_thread=False,
        timeout=30,
        # prepared statements kept per connection: a compartment search ($everything)
        # runs two per resource type, and compiled consent filters are long to prepare
        cached_statements=STATEMENTS,
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA cache_size=-{cache_mb * 1024}")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=OFF")
    return conn


def _now() -> str:
    return _instant(dt.datetime.now(dt.UTC))


def _instant(value: str | dt.datetime) -> str:
    """An instant in the store's canonical form (``...T03:04:05.123456Z``)."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def successor(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (code-point
    order, as SQLite's BINARY collation compares UTF-8), or None if there is none."""
    while prefix:
        following = ord(prefix[-1]) + 1
        if following == 0xD800:  # surrogates never occur in stored text
            following = 0xE000
        if following <= 0x10FFFF:
            return prefix[:-1] + chr(following)
        prefix = prefix[:-1]
    return None


def migrate(conn: sqlite3.Connection) -> None:
    """Create the schema, or bring a database of an older schema up to date."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"database schema {version} is newer than this HIE's {SCHEMA_VERSION}")
        columns = {row[1] for row in conn.execute("PRAGMA table_info(search_index)")}
        schema_0 = bool(columns) and "nlow" not in columns  # no numbers, composites, sorting
        if schema_0:
            for column in ("nlow REAL", "nhigh REAL", "grp INTEGER"):
                conn.execute(f"ALTER TABLE search_index ADD COLUMN {column}")
            for name in _CHANGED_IN_1:
                conn.execute(f"DROP INDEX IF EXISTS {name}")
        for statement in SCHEMA:
            conn.execute(statement)
        if schema_0:
            conn.execute(
                "INSERT INTO live_counts SELECT type, count(*) FROM resources"
                " WHERE body IS NOT NULL GROUP BY type"
            )
        if columns and version < 2:
            _journal_from_1(conn)
        if columns and version < 3:  # schema 3: register types keep their current row alone
            for type_ in REGISTER_TYPES:
                _drop_all_but_current(conn, type_)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _journal_from_1(conn: sqlite3.Connection) -> None:
    """Schema 1 -> 2: journal types lose their history and outbox rows, and their
    ``search_index`` rows move to ``journal_terms`` (``unindexed`` goes: the search
    layer's extraction version changed with schema 2, so the server reindexes every
    resource, these included, when it next starts)."""
    conn.execute("DROP TABLE IF EXISTS unindexed")
    for type_, stamped in JOURNAL_TYPES.items():
        conn.execute(
            "INSERT OR IGNORE INTO journal_terms SELECT type, param, text, id,"
            " coalesce(system, '') FROM search_index WHERE type = ? AND text IS NOT NULL"
            " AND param NOT IN ('_lastUpdated', ?)",
            (type_, stamped),
        )
        _drop_all_but_current(conn, type_)


def _drop_all_but_current(conn: sqlite3.Connection, type_: str) -> None:
    """Delete ``type_``'s index rows, history versions and outbox events (a migration to
    a type that keeps none: its ``resources`` rows stay)."""
    for table in ("search_index", "search_part", "history", "outbox"):
        conn.execute(f"DELETE FROM {table} WHERE type = ?", (type_,))


def _journal_rows(type_: str, id_: str, rows: Sequence[IndexRow]) -> list[tuple]:
    """The ``journal_terms`` rows of a journal type's resource (see the module
    docstring); raises ValueError for a row with no text value to keep."""
    stamped = ("_lastUpdated", JOURNAL_TYPES[type_])
    terms = []
    for r in rows:
        if r.param in stamped:
            continue
        if r.text is None or r.parts or r.nlow is not None:
            raise ValueError(f"{type_} index row {r.param!r} has no text value to keep")
        terms.append((type_, r.param, r.text, id_, r.system or ""))
    return terms


def _journal_sort(type_: str, sort: Sequence[Sort]) -> list[Sort]:
    """A journal type's sort keys over its resources' columns (its stamped parameter is
    ``_lastUpdated``); ValueError for a key its table cannot sort by."""
    keys = []
    for key in sort:
        if key.param == JOURNAL_TYPES[type_]:
            key = Sort("_lastUpdated", key.descending)
        if key.param not in ("_id", "_lastUpdated"):
            raise ValueError(f"{type_} cannot be sorted by {key.param!r}")
        keys.append(key)
    return keys


def _conj(frags: Iterable[Frag]) -> Frag:
    texts, params = [], []
    for text, p in frags:
        texts.append(text)
        params += p
    return (" AND ".join(texts) or "1"), params


def _is_resource_key(key: Sort) -> bool:
    return key.param in ("_id", "_lastUpdated")


class Choices:
    """Plan choices kept across queries for :data:`CHOICE_SECONDS`: whether a negated
    term's set is small, and the SQL of compound terms (by identity: the consent
    filter of a caller is one object reused by each of its searches), so that a query
    built again is neither probed nor compiled again. A stale choice costs time, never
    correctness."""

    def __init__(self) -> None:
        self._found: OrderedDict[tuple, tuple[object, float]] = OrderedDict()
        self._fragments = itertools.count()
        self._lock = threading.Lock()  # reader threads share it

    def get(self, key: tuple) -> object | None:
        with self._lock:
            found = self._found.get(key)
            if found is None or found[1] < time.monotonic():
                return None
            self._found.move_to_end(key)
            return found[0]

    def fragment(self) -> str:
        """An alias prefix of its own for a compiled fragment kept here."""
        return f"c{next(self._fragments)}_"

    def put(self, key: tuple, value: object) -> None:
        with self._lock:
            while len(self._found) >= MAX_CHOICES:  # the least recently used go first
                self._found.popitem(last=False)
            self._found[key] = (value, time.monotonic() + CHOICE_SECONDS)


class TempSets:
    """:class:`IdSet` terms kept in a temporary table (``idsets``: set number, id) of
    each connection that runs a query naming them, filled once per connection and set
    and emptied once the set is gone: a probe of a kept B-tree instead of a set built
    per statement. Rows come and go, the table stays, so prepared statements stay."""

    def __init__(self) -> None:
        self._numbers: weakref.WeakKeyDictionary[IdSet, int] = weakref.WeakKeyDictionary()
        self._count = itertools.count()
        #: connection -> {set number: the set it holds}
        self._held: dict[sqlite3.Connection, dict[int, weakref.ref]] = {}
        self._lock = threading.Lock()

    def number(self, conn: sqlite3.Connection, term: IdSet) -> int:
        """The set number of ``term``'s rows in ``conn``'s table (filled now if need be)."""
        with self._lock:
            number = self._numbers.get(term)
            if number is None:
                number = self._numbers[term] = next(self._count)
            held = self._held.get(conn)
            if held is None:
                held = self._held[conn] = {}
        if number not in held:
            conn.execute("PRAGMA query_only=OFF")  # a reader's guard; temp tables only
            try:
                if not held:
                    conn.execute(
                        "CREATE TEMP TABLE IF NOT EXISTS idsets (n INTEGER, id TEXT,"
                        " PRIMARY KEY (n, id)) WITHOUT ROWID"
                    )
                for old in [n for n, ref in held.items() if ref() is None]:
                    conn.execute("DELETE FROM temp.idsets WHERE n = ?", (old,))
                    del held[old]
                conn.executemany(
                    "INSERT INTO temp.idsets VALUES (?, ?)", ((number, i) for i in term.ids)
                )
            finally:
                conn.execute("PRAGMA query_only=ON")
            held[number] = weakref.ref(term)
        return number


class _Compiler:
    """Translates store queries into SQL for one read; probes set sizes through
    ``conn`` to pick each query's driving term (see the module docstring)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        choices: Choices | None = None,
        temp: TempSets | None = None,
    ):
        self.conn = conn
        self._aliases = 0
        self._sets: dict[tuple[str, Term], tuple[str, list, bool]] = {}
        self._choices = choices if choices is not None else Choices()
        self._temp = temp if temp is not None else TempSets()
        #: the IdSets the SQL compiled so far names (kept with cached fragments)
        self._named: list[IdSet] = []
        #: Estimated ids of the last query planned (up to PROBE + 1: a scan).
        self._driving = PROBE + 1
        self._prefix = ""

    def _alias(self, prefix: str) -> str:
        self._aliases += 1
        return f"{self._prefix}{prefix}{self._aliases}"

    # --- planning ------------------------------------------------------------------

    def prune(self, type_: str, query: Query) -> Query:
        """``query`` without the terms that hold for every resource in this read: an
        alternative "not M" with no resource matching M (such as "not changed lately,
        or else decided by the consent formula" when nothing changed lately)."""
        return tuple(t for t in query if not self._vacuous(type_, t))

    def _vacuous(self, type_: str, term: Term) -> bool:
        if not isinstance(term, AnyOf):
            return False
        for alt in term.terms:
            if isinstance(alt, Not) and (
                isinstance(alt.term, WrittenAfter)
                or (isinstance(alt.term, Match) and self._seekable(alt.term))
            ):
                sql, params, _ = self._set(type_, alt.term)
                if self.conn.execute(f"SELECT 1 FROM ({sql}) LIMIT 1", params).fetchone() is None:
                    return True
        return False

    def plan(self, type_: str, query: Query) -> tuple[int | None, int]:
        """The index of the driving term (None: scan the type) and its estimated size."""
        best, best_key = None, (PROBE + 1, 2)
        for n, term in enumerate(query):
            key = self._estimate(type_, term)
            if key is not None and key < best_key:
                best, best_key = n, key
        self._driving = best_key[0]
        return best, best_key[0]

    @staticmethod
    def settable(term: Term) -> bool:
        """Whether ``term`` has a set form (a SELECT of the ids it matches)."""
        if isinstance(term, AnyOf):
            return all(_Compiler.settable(t) for t in term.terms)
        return not isinstance(term, Not)

    def _estimate(self, type_: str, term: Term) -> tuple[int, int] | None:
        """(size up to PROBE, 0 if probed else 1) of a term's set; None: no set form."""
        if not self.settable(term):
            return None
        if isinstance(term, IdIn):
            return len(set(term.ids)), 0
        if isinstance(term, AnyOf):
            keys = [self._estimate(type_, t) for t in term.terms]
            return min(PROBE, sum(k[0] for k in keys)), max((k[1] for k in keys), default=0)
        if isinstance(term, Match) and not self._seekable(term):
            return PROBE, 1
        sql, params, _ = self._set(type_, term)
        found = self.conn.execute(f"SELECT count(*) FROM ({sql} LIMIT {PROBE})", params)
        return found.fetchone()[0], 0

    def _few(self, type_: str, term: Term) -> bool:
        """True if ``term`` (index lookups: a Match or an AnyOf of them) matches fewer
        rows than :data:`FEW` or four per resource the query drives through, so that
        ``NOT IN`` its set is cheaper than checking ``term`` resource by resource."""
        key = (type_, term, self._driving >= PROBE)
        few = self._choices.get(key)
        if few is None:
            parts = _flat(term)
            few = all(
                isinstance(t, IdIn) or (isinstance(t, Match) and self._seekable(t)) for t in parts
            )
            if few and any(c.op == "nin" for t in parts for c in getattr(t, "conds", ())):
                few = False  # "all but these": large
            if few:  # a set up to 4 rows per resource to check is cheaper than probing
                limit = max(FEW, 4 * self._driving)
                sql, params, _ = self._set(type_, term)
                found = self.conn.execute(f"SELECT count(*) FROM ({sql} LIMIT {limit})", params)
                few = found.fetchone()[0] < limit
            self._choices.put(key, few)
        return few

    @staticmethod
    def _seekable(term: Match) -> bool:
        """True if an index narrows the term's rows below all rows of its parameter."""
        return not term.conds or any(
            c.op in _SEEK_OPS
            and c.column in (_SEEK_COLUMNS if c.part is None else _PART_SEEK_COLUMNS)
            for c in term.conds
        )

    # --- sets and checks -------------------------------------------------------------

    def ids(self, type_: str, query: Query, driver: int | None) -> tuple[str, list, bool]:
        """A SELECT of the ids (column ``id``) of live ``type_`` resources matching
        ``query``, driven by term ``driver``; the flag: ids come out distinct."""
        if driver is None:
            sql = "SELECT id FROM resources NOT INDEXED WHERE type = ? AND body IS NOT NULL"
            params, live, distinct, rest = [type_], True, True, query
        else:
            sql, params, live = self._set(type_, query[driver])
            distinct = isinstance(query[driver], IdIn)
            rest = query[:driver] + query[driver + 1 :]
        d = self._alias("d")
        checks = [self.check(type_, f"{d}.id", t) for t in rest]
        if not live:
            checks.append(self._live(type_, f"{d}.id"))
        where, wparams = _conj(checks)
        return f"SELECT {d}.id AS id FROM ({sql}) {d} WHERE {where}", params + wparams, distinct

    def _set(self, type_: str, term: Term) -> tuple[str, list, bool]:
        """Uncorrelated SELECT of ids (possibly repeated) matching ``term``; the flag:
        every id is a live resource."""
        key = (type_, term)
        if key not in self._sets:
            self._sets[key] = self._build_set(type_, term)
        return self._sets[key]

    def _build_set(self, type_: str, term: Term) -> tuple[str, list, bool]:
        if isinstance(term, Match):
            tables, where, params, id_col = self._match(type_, term, correlated=False)
            return f"SELECT {id_col} AS id FROM {tables} WHERE {where}", params, True
        if isinstance(term, IdIn):
            marks, values = _values(term.ids)
            sql = (
                f"SELECT id FROM resources WHERE type = ? AND body IS NOT NULL AND id IN ({marks})"
            )
            return sql, [type_, *values], True
        if isinstance(term, IdSet):
            sql = "SELECT r.id FROM temp.idsets s JOIN resources r ON r.type = ? AND r.id = s.id"
            return f"{sql} WHERE s.n = ? AND r.body IS NOT NULL", [type_, self._idset(term)], True
        if isinstance(term, WrittenAfter):  # the type's events after seq (outbox_type)
            return _WRITTEN_AFTER, [type_, term.seq], False
        if isinstance(term, AnyOf):
            if not term.terms:
                return "SELECT NULL AS id WHERE 0", [], True
            sets = [self._set(type_, t) for t in term.terms]
            union = " UNION ALL ".join(s[0] for s in sets)
            return union, [p for s in sets for p in s[1]], all(s[2] for s in sets)
        if isinstance(term, Chain):
            s, x = self._alias("s"), self._alias("x")
            inner, params, _ = self.ids(
                term.target, term.query, self.plan(term.target, term.query)[0]
            )
            sql = (
                f"SELECT {s}.id AS id FROM {_rows(type_)} {s} WHERE {s}.type = ? AND {s}.param = ?"
                f" AND {s}.text IN (SELECT ? || {x}.id FROM ({inner}) {x})"
            )
            return sql, [type_, term.param, f"{term.target}/", *params], True
        if isinstance(term, Has):
            s = self._alias("s")
            prefix = f"{type_}/"
            hint, inner, iparams = "", "", []
            if term.query:  # follow the inner ids through the owner index
                plan = self.plan(term.type, term.query)[0]
                sql, iparams, _ = self.ids(term.type, term.query, plan)
                hint, inner = _owner(term.type), f" AND {s}.id IN ({sql})"
            table = _rows(term.type)
            sql = (
                f"SELECT substr({s}.text, {len(prefix) + 1}) AS id FROM {table} {s}{hint}"
                f" WHERE {s}.type = ? AND {s}.param = ? AND {s}.text >= ? AND {s}.text < ?{inner}"
            )
            return sql, [term.type, term.param, prefix, successor(prefix), *iparams], False
        raise TypeError(f"no set form for query term {term!r}")

    def check(self, type_: str, id_expr: str, term: Term) -> Frag:
        """A condition true when resource ``type_``/``id_expr`` matches ``term``;
        compound terms are compiled once and kept (see :class:`Choices`)."""
        if self._prefix or not isinstance(term, AnyOf | Not):
            return self._check(type_, id_expr, term)
        key = (type_, id(term), self._driving >= PROBE)
        kept = self._choices.get(key)
        if kept is None or kept[0] is not term:
            self._prefix = self._choices.fragment()
            mark = len(self._named)
            try:
                kept = (term, *self._check(type_, _ID, term), tuple(self._named[mark:]))
            finally:
                self._prefix = ""
            self._choices.put(key, kept)
        else:
            for idset in kept[3]:  # this connection may not hold them yet
                self._idset(idset)
        return kept[1].replace(_ID, id_expr), kept[2]

    def _idset(self, term: IdSet) -> int:
        self._named.append(term)
        return self._temp.number(self.conn, term)

    def _check(self, type_: str, id_expr: str, term: Term) -> Frag:
        if isinstance(term, Match):
            if any(c.op == "in" and len(c.value) > _INLINE_VALUES for c in term.conds):
                sql, params, _ = self._set(type_, term)  # built once, not probed per id
                return f"{id_expr} IN ({sql})", params
            tables, where, params, id_col = self._match(type_, term, correlated=True)
            return f"EXISTS (SELECT 1 FROM {tables} WHERE {where} AND {id_col} = {id_expr})", params
        if isinstance(term, IdIn):
            marks, values = _values(term.ids)
            return f"{id_expr} IN ({marks})", values
        if isinstance(term, IdSet):  # a probe of the set's rows, not the set built
            sql = f"EXISTS (SELECT 1 FROM temp.idsets WHERE n = ? AND id = {id_expr})"
            return sql, [self._idset(term)]
        if isinstance(term, WrittenAfter):  # a few recent events: one set per statement
            return f"{id_expr} IN ({_WRITTEN_AFTER})", [type_, term.seq]
        if isinstance(term, AnyOf):
            if not term.terms:
                return "0", []
            checks = [self.check(type_, id_expr, t) for t in term.terms]
            return "(" + " OR ".join(c[0] for c in checks) + ")", [p for c in checks for p in c[1]]
        if isinstance(term, Not):
            if self._few(type_, term.term):  # one small set beats a probe per resource
                sql, params, _ = self._set(type_, term.term)
                return f"{id_expr} NOT IN ({sql})", params
            sql, params = self.check(type_, id_expr, term.term)
            return f"NOT ({sql})", params
        if isinstance(term, Chain):
            s = self._alias("s")
            prefix = f"{term.target}/"
            target = f"substr({s}.text, {len(prefix) + 1})"
            inner, iparams = _conj(
                [self._live(term.target, target)]
                + [self.check(term.target, target, t) for t in term.query]
            )
            sql = (
                f"EXISTS (SELECT 1 FROM {_rows(type_)} {s}{_owner(type_)}"
                f" WHERE {s}.type = ? AND {s}.id = {id_expr}"
                f" AND {s}.param = ? AND {s}.text >= ? AND {s}.text < ? AND {inner})"
            )
            return sql, [type_, term.param, prefix, successor(prefix), *iparams]
        if isinstance(term, Has):
            s = self._alias("s")
            inner, iparams = _conj(self.check(term.type, f"{s}.id", t) for t in term.query)
            sql = (
                f"EXISTS (SELECT 1 FROM {_rows(term.type)} {s} WHERE {s}.type = ?"
                f" AND {s}.param = ? AND {s}.text = ? || {id_expr} AND {inner})"
            )
            return sql, [term.type, term.param, f"{type_}/", *iparams]
        raise TypeError(f"not a query term: {term!r}")

    def _live(self, type_: str, id_expr: str) -> Frag:
        t = self._alias("t")
        return (
            f"EXISTS (SELECT 1 FROM resources {t} WHERE {t}.type = ? AND {t}.id = {id_expr}"
            f" AND {t}.body IS NOT NULL)",
            [type_],
        )

    def _match(self, type_: str, term: Match, *, correlated: bool) -> tuple[str, str, list, str]:
        """FROM list, WHERE conjunction, parameters and id column of the rows (and
        composite components) that satisfy ``term``. The first table drives by its
        values unless ``correlated`` (the caller constrains the id); the others are
        joined through their owner index."""
        if type_ in JOURNAL_TYPES:
            return self._journal_match(type_, term)
        by_part: dict[int | None, list[Cond]] = {}
        for cond in term.conds:
            by_part.setdefault(cond.part, []).append(cond)
        if not by_part:
            by_part[None] = []
        aliases: dict[int | None, str] = {}
        tables, where, params = [], [], []
        for part in sorted(by_part, key=lambda k: -1 if k is None else k):
            a = self._alias("s" if part is None else "p")
            owner = " INDEXED BY " + ("search_owner" if part is None else "part_owner")
            owner = owner if correlated or aliases else ""
            if part is None:
                tables.append(f"search_index {a}{owner}")
                where.append(f"{a}.type = ? AND {a}.param = ?")
                params += [type_, term.param]
            else:
                tables.append(f"search_part {a}{owner}")
                where.append(f"{a}.type = ? AND {a}.param = ? AND {a}.part = ?")
                params += [type_, term.param, part]
            if aliases:
                first = next(iter(aliases.values()))
                where.append(f"{a}.id = {first}.id AND {a}.grp = {first}.grp")
            aliases[part] = a
            for cond in by_part[part]:
                sql, p = self._cond(f"{a}.{cond.column}", cond)
                where.append(sql)
                params += p
        return ", ".join(tables), " AND ".join(where), params, f"{next(iter(aliases.values()))}.id"

    def _journal_match(self, type_: str, term: Match) -> tuple[str, str, list, str]:
        """:meth:`_match` for a journal type: its terms, or its resources' last_updated
        for the stamped parameter and ``_lastUpdated`` (whose rows have low = high =
        last_updated). No composites; a missing system is stored as ''."""
        a = self._alias("j")
        if term.param in ("_lastUpdated", JOURNAL_TYPES[type_]):
            where, params = [f"{a}.type = ? AND {a}.body IS NOT NULL"], [type_]
            for cond in term.conds:
                if cond.column not in ("low", "high") or cond.part is not None:
                    raise ValueError(f"{type_}.{term.param} has no {cond.column!r} values")
                sql, p = self._cond(f"{a}.last_updated", cond)
                where.append(sql)
                params += p
            return f"resources {a}", " AND ".join(where), params, f"{a}.id"
        where, params = [f"{a}.type = ? AND {a}.param = ?"], [type_, term.param]
        for cond in term.conds:
            if cond.column not in ("text", "system") or cond.part is not None:
                raise ValueError(f"{type_}.{term.param} has no {cond.column!r} values")
            if cond.column == "system" and cond.op == "null":
                sql, p = f"{a}.system = ''", []
            else:
                sql, p = self._cond(f"{a}.{cond.column}", cond)
            where.append(sql)
            params += p
        return f"journal_terms {a}", " AND ".join(where), params, f"{a}.id"

    @staticmethod
    def _cond(col: str, cond: Cond) -> Frag:
        if cond.column not in COLUMNS:
            raise ValueError(f"unknown index column {cond.column!r}")
        number = cond.column in NUMBER_COLUMNS
        op, value = cond.op, cond.value
        if op == "null":
            return f"{col} IS NULL", []
        if op in ("prefix", "contains"):
            if number:
                raise ValueError(f"{op} needs a text column, not {cond.column!r}")
            if op == "contains":
                return f"instr({col}, ?) > 0", [value]
            upper = successor(value)
            if upper is None:
                return f"{col} >= ?", [value]
            return f"{col} >= ? AND {col} < ?", [value, upper]
        if op in ("in", "nin"):
            values = [float(v) for v in value] if number else list(value)
            negate = "NOT " if op == "nin" else ""
            if not values:
                return ("0" if op == "in" else f"{col} IS NOT NULL"), []
            marks, params = _values(values)
            return f"{col} {negate}IN ({marks})", params
        if op not in _SQL_OPS:
            raise ValueError(f"unknown operator {op!r}")
        return f"{col} {_SQL_OPS[op]} ?", [float(value) if number else value]

    # --- results ---------------------------------------------------------------------

    def count(self, type_: str, query: Query, driver: int | None) -> int:
        """The number of live ``type_`` resources matching ``query``."""
        if not query:
            found = self.conn.execute("SELECT n FROM live_counts WHERE type = ?", (type_,))
            return (found.fetchone() or (0,))[0]
        sql, params, distinct = self.ids(type_, query, driver)
        counted = "count(*)" if distinct else "count(DISTINCT id)"
        return self.conn.execute(f"SELECT {counted} FROM ({sql})", params).fetchone()[0]

    def page(
        self,
        type_: str,
        query: Query,
        plan: tuple[int | None, int],
        sort: Sequence[Sort],
        limit: int,
        offset: int,
    ) -> list[tuple[str, str]]:
        """``(id, last_updated)`` of matches ``offset`` to ``offset + limit`` in order."""
        if type_ in JOURNAL_TYPES:
            sort = _journal_sort(type_, sort)
        driver, size = plan
        if driver is not None and size < PROBE:
            sql, params, _ = self.ids(type_, query, driver)
            order, oparams = self._order(type_, "r", sort)
            return self.conn.execute(
                f"SELECT r.id, r.last_updated FROM resources r WHERE r.type = ?"
                f" AND r.id IN ({sql}) ORDER BY {order} LIMIT ? OFFSET ?",
                [type_, *params, *oparams, limit, offset],
            ).fetchall()
        if not sort or _is_resource_key(sort[0]):
            return self._walk_resources(type_, query, sort, "1", [], limit, offset)
        return self._walk_values(type_, query, sort, limit, offset)

    def _walk_resources(
        self,
        type_: str,
        query: Query,
        sort: Sequence[Sort],
        extra: str,
        extra_params: list,
        limit: int,
        offset: int,
    ) -> list[tuple[str, str]]:
        checks, params = _conj(self.check(type_, "r.id", t) for t in query)
        order, oparams = self._order(type_, "r", sort)
        return self.conn.execute(
            f"SELECT r.id, r.last_updated FROM resources r WHERE r.type = ?"
            f" AND r.body IS NOT NULL AND {extra} AND {checks} ORDER BY {order} LIMIT ? OFFSET ?",
            [type_, *extra_params, *params, *oparams, limit, offset],
        ).fetchall()

    def _walk_values(
        self, type_: str, query: Query, sort: Sequence[Sort], limit: int, offset: int
    ) -> list[tuple[str, str]]:
        """Walk the first key's sort index; a resource first shows up at its minimum
        (maximum when descending). Then the resources without a value."""
        first, rest = sort[0], sort[1:]
        value = (_DESC if first.descending else _ASC).format("s")
        direction = " DESC" if first.descending else ""
        checks, params = _conj(self.check(type_, "s.id", t) for t in query)
        order, oparams = self._order(type_, "r", rest)
        index = "search_desc" if first.descending else "search_asc"
        cursor = self.conn.execute(
            f"SELECT s.id, r.last_updated FROM search_index s INDEXED BY {index}"
            f" JOIN resources r ON r.type = s.type AND r.id = s.id"
            f" WHERE s.type = ? AND s.param = ? AND {value} IS NOT NULL AND {checks}"
            f" ORDER BY {value}{direction}, {order}",
            [type_, first.param, *params, *oparams],
        )
        seen: set[str] = set()
        rows: list[tuple[str, str]] = []
        for id_, lu in cursor:
            if id_ not in seen:
                seen.add(id_)
                if len(seen) > offset:
                    rows.append((id_, lu))
                    if len(rows) == limit:
                        break
        cursor.close()
        if len(rows) == limit:
            return rows
        without = (
            f"NOT EXISTS (SELECT 1 FROM search_index s INDEXED BY search_owner"
            f" WHERE s.type = r.type AND s.id = r.id"
            f" AND s.param = ? AND {value} IS NOT NULL)"
        )
        return rows + self._walk_resources(
            type_,
            query,
            rest,
            without,
            [first.param],
            limit - len(rows),
            max(0, offset - len(seen)),
        )

    def _order(self, type_: str, r: str, sort: Sequence[Sort]) -> Frag:
        """ORDER BY terms over resource alias ``r``: the sort keys (missing values
        last), then last_updated descending and id."""
        terms, params = [], []
        for key in sort:
            direction = " DESC" if key.descending else ""
            if key.param == "_id":
                return ", ".join([*terms, f"{r}.id{direction}"]), params
            if key.param == "_lastUpdated":
                terms.append(f"{r}.last_updated{direction}")
                continue
            k = self._alias("k")
            agg, value = ("max", _DESC) if key.descending else ("min", _ASC)
            terms.append(
                f"(SELECT {agg}({value.format(k)}) FROM search_index {k} INDEXED BY search_owner"
                f" WHERE {k}.type = ?"
                f" AND {k}.id = {r}.id AND {k}.param = ?){direction} NULLS LAST"
            )
            params += [type_, key.param]
        if not any(key.param == "_lastUpdated" for key in sort):
            terms.append(f"{r}.last_updated DESC")
        return ", ".join([*terms, f"{r}.id"]), params


def _replace_index(
    conn: sqlite3.Connection, type_: str, id_: str, rows: Sequence[IndexRow], old: bool
) -> None:
    """Write the search_index and search_part rows of a resource (``old``: drop the
    rows it had first); ``journal_terms`` rows for a journal type."""
    if type_ in JOURNAL_TYPES:
        if old:
            conn.execute("DELETE FROM journal_terms WHERE type = ? AND id = ?", (type_, id_))
        conn.executemany(_INSERT_TERMS, _journal_rows(type_, id_, rows))
        return
    if old:
        conn.execute("DELETE FROM search_index WHERE type = ? AND id = ?", (type_, id_))
        conn.execute("DELETE FROM search_part WHERE type = ? AND id = ?", (type_, id_))
    index, parts = [], []
    for n, r in enumerate(rows):
        grp = n if r.parts else None
        index.append((type_, id_, r.param, r.system, r.text, r.low, r.high, r.nlow, r.nhigh, grp))
        parts += [
            (type_, id_, r.param, n, k, p.system, p.text, p.low, p.high, p.nlow, p.nhigh)
            for k, p in enumerate(r.parts)
        ]
    if index:
        conn.executemany("INSERT INTO search_index VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", index)
    if parts:
        conn.executemany("INSERT INTO search_part VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", parts)


class SqliteStore(Store):
    """Embedded store in ``data_dir/hie.sqlite3``.

    ``synchronous`` is SQLite's PRAGMA: ``FULL`` (default) makes every commit durable
    against power loss; ``NORMAL`` survives process crashes but may lose the last
    commits on power loss.
    """

    def __init__(self, data_dir: Path, *, synchronous: str = "FULL"):
        self.path = Path(data_dir) / "hie.sqlite3"
        self.synchronous = synchronous.upper()
        if self.synchronous not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"invalid synchronous mode {synchronous!r}")
        self._writer: ThreadPoolExecutor | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._write_conn: sqlite3.Connection | None = None
        self._loop_conn: sqlite3.Connection | None = None
        self._all_conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._choices = Choices()
        self._temp = TempSets()

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._readers = ThreadPoolExecutor(4, thread_name_prefix="sqlite-reader")
        self._local = threading.local()

        def setup() -> sqlite3.Connection:
            conn = _connect(self.path, self.synchronous, WRITER_CACHE_MB)
            migrate(conn)
            return conn

        self._write_conn = await self._run_write(setup)
        self._loop_conn = self._new_conn()

    async def close(self) -> None:
        for pool in (self._writer, self._readers):
            if pool is not None:
                pool.shutdown(wait=True)
        self._writer = self._readers = None
        with self._conns_lock:
            for conn in self._all_conns:
                conn.close()
            self._all_conns.clear()
        if self._write_conn is not None:
            self._write_conn.close()
        self._write_conn = self._loop_conn = None

    def _new_conn(self) -> sqlite3.Connection:
        conn = _connect(self.path, self.synchronous, READER_CACHE_MB)
        conn.execute("PRAGMA query_only=ON")
        with self._conns_lock:
            self._all_conns.append(conn)
        return conn

    def _reader_conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._new_conn()
        return conn

    async def _run_write(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    async def _run_read(self, fn, *args):
        """Run ``fn(conn, *args)`` on a reader thread inside one read transaction."""

        def call():
            conn = self._reader_conn()
            conn.execute("BEGIN")
            try:
                return fn(conn, *args)
            finally:
                conn.execute("COMMIT")

        return await asyncio.get_running_loop().run_in_executor(self._readers, call)

    async def read(self, type_: str, id_: str) -> Version | None:
        row = self._loop_conn.execute(
            f"SELECT {_VERSION_COLS} FROM resources WHERE type = ? AND id = ?", (type_, id_)
        ).fetchone()
        return _version(row) if row else None

    async def vread(self, type_: str, id_: str, version: int) -> Version | None:
        table = "history" if keeps_history(type_) else "resources"
        row = self._loop_conn.execute(
            f"SELECT {_VERSION_COLS} FROM {table} WHERE type = ? AND id = ? AND version = ?",
            (type_, id_, version),
        ).fetchone()
        return _version(row) if row else None

    async def commit(self, writes: Sequence[Write]) -> None:
        if writes:
            await self._run_write(self._commit_sync, list(writes))

    def _commit_sync(self, writes: list[Write]) -> None:
        conn = self._write_conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            live: dict[str, int] = {}
            for w in writes:
                if w.type in JOURNAL_TYPES:  # a create; its insert checks it is new
                    if w.prev_version or w.body is None:
                        raise ValueError(f"{w.type}/{w.id}: journal resources are never changed")
                    live[w.type] = live.get(w.type, 0) + 1
                    continue
                row = conn.execute(
                    "SELECT version, body IS NOT NULL FROM resources WHERE type = ? AND id = ?",
                    (w.type, w.id),
                ).fetchone()
                actual, was_live = row or (0, 0)
                if actual != w.prev_version:
                    raise VersionConflict(w.type, w.id, w.prev_version, actual)
                live[w.type] = live.get(w.type, 0) + (w.body is not None) - was_live
            for w in writes:
                if w.guard:
                    self._check_guard(conn, w, [x.id for x in writes if x.type == w.type])
            journal = [w for w in writes if w.type in JOURNAL_TYPES]
            if journal:
                self._append_journal(conn, journal)
            for w in writes:
                if w.type in JOURNAL_TYPES:
                    continue
                version = (w.type, w.id, w.version, w.last_updated, w.method, w.body)
                rows = w.index if w.body is not None else ()
                conn.execute("INSERT OR REPLACE INTO resources VALUES (?, ?, ?, ?, ?, ?)", version)
                if w.type in REGISTER_TYPES:
                    continue
                _replace_index(conn, w.type, w.id, rows, bool(w.prev_version))
                conn.execute(
                    "INSERT INTO history (type, id, version, last_updated, method, body)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (w.type, w.id, w.version, w.last_updated, w.method, w.body),
                )
                conn.execute(
                    "INSERT INTO outbox (type, id, version, method) VALUES (?, ?, ?, ?)",
                    (w.type, w.id, w.version, w.method),
                )
            conn.executemany(
                "INSERT INTO live_counts VALUES (?, ?) ON CONFLICT (type) DO UPDATE SET n = n + ?",
                [(type_, n, n) for type_, n in live.items() if n],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _append_journal(conn: sqlite3.Connection, writes: list[Write]) -> None:
        """Insert journal writes (creates) and their terms, each in one statement; a
        write whose resource exists raises VersionConflict."""
        try:
            conn.executemany(
                "INSERT INTO resources VALUES (?, ?, ?, ?, ?, ?)",
                [(w.type, w.id, w.version, w.last_updated, w.method, w.body) for w in writes],
            )
        except sqlite3.IntegrityError:
            for w in writes:
                found = conn.execute(
                    "SELECT version FROM resources WHERE type = ? AND id = ?", (w.type, w.id)
                ).fetchone()
                if found:
                    raise VersionConflict(w.type, w.id, 0, found[0]) from None
            raise
        terms = [t for w in writes for t in _journal_rows(w.type, w.id, w.index)]
        terms.sort()  # key order: each leaf page is visited once
        conn.executemany(_INSERT_TERMS, terms)

    @staticmethod
    def _check_guard(conn: sqlite3.Connection, w: Write, written: list[str]) -> None:
        compiler = _Compiler(conn)
        sql, params, _ = compiler.ids(w.type, w.guard, compiler.plan(w.type, w.guard)[0])
        found = conn.execute(
            f"SELECT 1 FROM ({sql}) g WHERE g.id NOT IN ({', '.join('?' * len(written))}) LIMIT 1",
            [*params, *written],
        ).fetchone()
        if found:
            raise ConditionConflict(w.type, w.id)

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
        # A journal type's one version per resource is its current one (commit order:
        # id order).
        journal = type_ in JOURNAL_TYPES
        table, newest = ("resources", "h.id") if journal else ("history", "h.seq")
        where, params = [], []
        if type_ is not None:
            where.append("h.type = ?")
            params.append(type_)
        elif exclude:
            where.append(f"h.type NOT IN ({', '.join('?' * len(exclude))})")
            params.extend(exclude)
        if id_ is not None:
            where.append("h.id = ?")
            params.append(id_)
        if since is not None:
            where.append("h.last_updated >= ?")
            params.append(since)
        if at is not None and journal:
            where.append("h.last_updated <= ?")
            params.append(at)
        elif at is not None:
            # The version current at `at`: the newest one not after it.
            where.append(
                "h.seq = (SELECT max(h2.seq) FROM history h2 WHERE h2.type = h.type"
                " AND h2.id = h.id AND h2.last_updated <= ?)"
            )
            params.append(at)
        clause = f"WHERE {' AND '.join(where)}" if where else ""

        def run(conn: sqlite3.Connection) -> Page:
            total = conn.execute(f"SELECT count(*) FROM {table} h {clause}", params).fetchone()[0]
            rows = []
            if count > 0:
                rows = conn.execute(
                    f"SELECT {_VERSION_COLS} FROM {table} h {clause}"
                    f" ORDER BY h.last_updated DESC, {newest} DESC LIMIT ? OFFSET ?",
                    [*params, count, offset],
                ).fetchall()
            return Page([_version(r) for r in rows], total)

        return await self._run_read(run)

    async def search(
        self,
        type_: str,
        query: Query,
        *,
        sort: Sequence[Sort] = (),
        count: int = 50,
        offset: int = 0,
    ) -> Page:
        def run(conn: sqlite3.Connection) -> Page:
            compiler = _Compiler(conn, self._choices, self._temp)
            pruned = compiler.prune(type_, query)  # this read's snapshot: exact
            plan = compiler.plan(type_, pruned)
            total = compiler.count(type_, pruned, plan[0])
            if count <= 0 or total <= offset:
                return Page([], total)
            found = compiler.page(type_, pruned, plan, sort, count, offset)
            return Page(_read_many(conn, type_, [id_ for id_, _ in found]), total)

        return await self._run_read(run)

    async def match_ids(
        self, type_: str, query: Query, *, sort: Sequence[Sort] = (), limit: int
    ) -> list[tuple[str, str]]:
        def run(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            if limit <= 0:
                return []
            compiler = _Compiler(conn, self._choices, self._temp)
            pruned = compiler.prune(type_, query)  # this read's snapshot: exact
            return compiler.page(type_, pruned, compiler.plan(type_, pruned), sort, limit, 0)

        return await self._run_read(run)

    async def any_ids(self, type_: str, query: Query, *, limit: int) -> list[str]:
        def run(conn: sqlite3.Connection) -> list[str]:
            if limit <= 0:
                return []
            compiler = _Compiler(conn, self._choices, self._temp)
            pruned = compiler.prune(type_, query)
            if len(pruned) == 1:  # its own driver: no need to estimate sizes
                driver = 0 if compiler.settable(pruned[0]) else None
            else:
                driver, _ = compiler.plan(type_, pruned)
            sql, params, distinct = compiler.ids(type_, pruned, driver)
            if distinct:
                return [r[0] for r in conn.execute(f"{sql} LIMIT ?", [*params, limit])]
            # Repeated ids are dropped here: SELECT DISTINCT would make SQLite walk an
            # index in id order (every row of the type) instead of the driving term's.
            found: dict[str, None] = {}
            for (id_,) in conn.execute(sql, params):
                found[id_] = None
                if len(found) == limit:
                    break
            return list(found)

        return await self._run_read(run)

    async def read_many(self, type_: str, ids: Sequence[str]) -> list[Version]:
        return await self._run_read(_read_many, type_, list(ids))

    async def scan(
        self, type_: str, *, after: str | None = None, limit: int = 500
    ) -> list[Version]:
        def run(conn: sqlite3.Connection) -> list[Version]:
            rows = conn.execute(
                f"SELECT {_VERSION_COLS} FROM resources WHERE type = ? AND id > ?"
                " AND body IS NOT NULL ORDER BY id LIMIT ?",
                (type_, after or "", max(limit, 0)),
            ).fetchall()
            return [_version(r) for r in rows]

        return await self._run_read(run)

    async def set_index(
        self, type_: str, entries: Sequence[tuple[str, int, Sequence[IndexRow]]]
    ) -> int:
        """Replace the index rows of each live resource still at its given version, in
        one commit; returns how many were replaced. The commit does not wait for the
        disk (``synchronous=NORMAL``): index rows can be computed again, and a crash
        loses the commit whole, which the next durable commit of this file (WAL frames
        are written in order) or a new indexing restores."""

        def run() -> int:
            conn = self._write_conn
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                done = 0
                for id_, version, rows in entries:
                    found = conn.execute(
                        "SELECT 1 FROM resources WHERE type = ? AND id = ? AND version = ?"
                        " AND body IS NOT NULL",
                        (type_, id_, version),
                    ).fetchone()
                    if found:
                        _replace_index(conn, type_, id_, rows, True)
                        done += 1
                conn.execute("COMMIT")
                return done
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            finally:
                conn.execute(f"PRAGMA synchronous={self.synchronous}")

        return await self._run_write(run) if entries else 0

    async def save_snapshot(self, key: str, refs: Sequence[str], expires: str) -> None:
        """Store ``refs`` under ``key``, replacing an older snapshot of that key; drops
        expired snapshots on the way."""

        def run() -> None:
            conn = self._write_conn
            # A snapshot is a cache: its commit need not wait for fsync. NORMAL in WAL
            # mode may lose it on power loss but never corrupts; the configured mode
            # is restored right after, so resource commits stay as durable as before.
            if self.synchronous in ("FULL", "EXTRA"):
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                gone = [
                    k
                    for (k,) in conn.execute(
                        "SELECT key FROM snapshots WHERE expires <= ? OR key = ?", (_now(), key)
                    )
                ]
                conn.executemany("DELETE FROM snapshots WHERE key = ?", [(k,) for k in gone])
                conn.executemany("DELETE FROM snapshot_refs WHERE key = ?", [(k,) for k in gone])
                conn.execute(
                    "INSERT INTO snapshots VALUES (?, ?, ?)", (key, len(refs), _instant(expires))
                )
                conn.executemany(
                    "INSERT INTO snapshot_refs VALUES (?, ?, ?)",
                    [(key, pos, ref) for pos, ref in enumerate(refs)],
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            finally:
                conn.execute(f"PRAGMA synchronous={self.synchronous}")

        await self._run_write(run)

    async def load_snapshot(
        self, key: str, offset: int, count: int
    ) -> tuple[list[str], int] | None:
        def run(conn: sqlite3.Connection) -> tuple[list[str], int] | None:
            found = conn.execute(
                "SELECT length FROM snapshots WHERE key = ? AND expires > ?", (key, _now())
            ).fetchone()
            if found is None:
                return None
            refs = conn.execute(
                "SELECT ref FROM snapshot_refs WHERE key = ? AND pos >= ? ORDER BY pos LIMIT ?",
                (key, max(offset, 0), max(count, 0)),
            ).fetchall()
            return [r for (r,) in refs], found[0]

        return await self._run_read(run)

    async def claim(self, key: str, expires: str) -> bool:
        """Insert ``key`` unless an unexpired claim holds it; expired claims are purged
        in the same transaction."""

        def run() -> bool:
            conn = self._write_conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM claims WHERE expires <= ?", (_now(),))
                added = conn.execute(
                    "INSERT INTO claims VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                    (key, _instant(expires)),
                ).rowcount
                conn.execute("COMMIT")
                return added == 1
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        return await self._run_write(run)

    async def events_after(self, seq: int, limit: int = 100) -> list[Event]:
        # A primary-key range, usually of a few rows: on the event loop, like reads.
        rows = self._loop_conn.execute(
            "SELECT seq, type, id, version, method FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        ).fetchall()
        return [Event(*r) for r in rows]

    async def last_event(self) -> int:
        row = self._loop_conn.execute("SELECT max(seq) FROM outbox").fetchone()
        return row[0] or 0

    async def next_value(self, counter: str) -> int:
        def run() -> int:
            return self._write_conn.execute(
                "INSERT INTO counters VALUES (?, 1) ON CONFLICT (name)"
                " DO UPDATE SET value = value + 1 RETURNING value",
                (counter,),
            ).fetchone()[0]

        return await self._run_write(run)


def _rows(type_: str) -> str:
    """The table holding ``type_``'s index rows."""
    return "journal_terms" if type_ in JOURNAL_TYPES else "search_index"


def _owner(type_: str) -> str:
    """The hint to look ``type_``'s index rows up by owner (the journal's key does)."""
    return "" if type_ in JOURNAL_TYPES else " INDEXED BY search_owner"


def _read_many(conn: sqlite3.Connection, type_: str, ids: list[str]) -> list[Version]:
    """Live versions of ``ids`` in the given order, unknown and deleted ones left out."""
    found: dict[str, Version] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        rows = conn.execute(
            f"SELECT {_VERSION_COLS} FROM resources WHERE type = ? AND body IS NOT NULL"
            f" AND id IN ({', '.join('?' * len(chunk))})",
            [type_, *chunk],
        )
        found.update((row[1], _version(row)) for row in rows)
    return [found[id_] for id_ in ids if id_ in found]


def _values(values: Sequence) -> tuple[str, list]:
    """The right-hand side of ``IN (...)`` for ``values`` and its parameters: inline
    marks for a few, one JSON parameter made a set once per statement for many."""
    if len(values) > _INLINE_VALUES:
        return "SELECT value FROM json_each(?)", [json.dumps(list(values))]
    return ", ".join("?" * len(values)), list(values)


def _flat(term: Term) -> list[Term]:
    """The alternatives of ``term``, nested AnyOfs opened."""
    if isinstance(term, AnyOf):
        return [t for sub in term.terms for t in _flat(sub)]
    return [term]
