"""SqliteStore: the embedded store (stdlib sqlite3, WAL mode), used when no MongoDB
URI is configured.

Tables: ``resources`` (current version of each resource, body included), ``history``
(every version, ``seq`` gives commit order), ``search_index`` (index rows of current,
non-deleted versions only), ``outbox`` and ``counters``.

Threading: one writer connection used from a single worker thread serialises commits;
reads use per-thread reader connections from a small thread pool (WAL lets readers run
beside the writer). Point reads by primary key take microseconds, so they run
directly on the event loop with its own connection instead of paying a thread hop.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hie.store.port import (
    ConditionConflict,
    Event,
    Page,
    Store,
    Version,
    VersionConflict,
    Write,
)
from hie.store.query import COLUMNS, AnyOf, IdIn, Match, Not, Query, Term

SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL,
    last_updated TEXT NOT NULL, method TEXT NOT NULL, body BLOB,
    PRIMARY KEY (type, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS resources_lu ON resources (type, last_updated DESC, id);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL,
    last_updated TEXT NOT NULL, method TEXT NOT NULL, body BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS history_version ON history (type, id, version);
CREATE INDEX IF NOT EXISTS history_lu ON history (last_updated, seq);
CREATE INDEX IF NOT EXISTS history_type_lu ON history (type, last_updated, seq);
CREATE TABLE IF NOT EXISTS search_index (
    type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
    system TEXT, text TEXT, low TEXT, high TEXT
);
CREATE INDEX IF NOT EXISTS search_text ON search_index (type, param, text, system);
CREATE INDEX IF NOT EXISTS search_low ON search_index (type, param, low);
CREATE INDEX IF NOT EXISTS search_high ON search_index (type, param, high);
CREATE INDEX IF NOT EXISTS search_owner ON search_index (type, id);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, method TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

_SQL_OPS = {"eq": "=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_VERSION_COLS = "type, id, version, last_updated, method, body"


def _version(row: tuple) -> Version:
    return Version(row[0], row[1], row[2], row[3], row[4], row[5])


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=OFF")
    return conn


class _SqlBuilder:
    """Translates a store :data:`Query` into an SQL WHERE clause with parameters."""

    def __init__(self) -> None:
        self.params: list = []

    def term(self, term: Term) -> str:
        if isinstance(term, Match):
            parts = ["s.type = r.type", "s.id = r.id", "s.param = ?"]
            self.params.append(term.param)
            for cond in term.conds:
                if cond.column not in COLUMNS:
                    raise ValueError(f"unknown index column {cond.column!r}")
                col = f"s.{cond.column}"
                if cond.op == "null":
                    parts.append(f"{col} IS NULL")
                elif cond.op == "prefix":
                    # substr comparison: exact, case-sensitive and index-friendly enough.
                    parts.append(f"substr({col}, 1, ?) = ?")
                    self.params += [len(cond.value), cond.value]
                else:
                    parts.append(f"{col} {_SQL_OPS[cond.op]} ?")
                    self.params.append(cond.value)
            return f"EXISTS (SELECT 1 FROM search_index s WHERE {' AND '.join(parts)})"
        if isinstance(term, IdIn):
            if not term.ids:
                return "0"
            self.params += list(term.ids)
            return f"r.id IN ({', '.join('?' * len(term.ids))})"
        if isinstance(term, AnyOf):
            if not term.terms:
                return "0"
            return "(" + " OR ".join(self.term(t) for t in term.terms) + ")"
        if isinstance(term, Not):
            return f"NOT ({self.term(term.term)})"
        raise TypeError(f"not a query term: {term!r}")


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

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._readers = ThreadPoolExecutor(4, thread_name_prefix="sqlite-reader")
        self._local = threading.local()

        def setup() -> sqlite3.Connection:
            conn = _connect(self.path, self.synchronous)
            conn.executescript(SCHEMA)
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
        conn = _connect(self.path, self.synchronous)
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
        def call():
            return fn(self._reader_conn(), *args)

        return await asyncio.get_running_loop().run_in_executor(self._readers, call)

    async def read(self, type_: str, id_: str) -> Version | None:
        row = self._loop_conn.execute(
            f"SELECT {_VERSION_COLS} FROM resources WHERE type = ? AND id = ?", (type_, id_)
        ).fetchone()
        return _version(row) if row else None

    async def vread(self, type_: str, id_: str, version: int) -> Version | None:
        row = self._loop_conn.execute(
            f"SELECT {_VERSION_COLS} FROM history WHERE type = ? AND id = ? AND version = ?",
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
            for w in writes:
                row = conn.execute(
                    "SELECT version FROM resources WHERE type = ? AND id = ?", (w.type, w.id)
                ).fetchone()
                actual = row[0] if row else 0
                if actual != w.prev_version:
                    raise VersionConflict(w.type, w.id, w.prev_version, actual)
            for w in writes:
                if w.guard:
                    self._check_guard(conn, w, [x.id for x in writes if x.type == w.type])
            for w in writes:
                conn.execute(
                    "INSERT OR REPLACE INTO resources VALUES (?, ?, ?, ?, ?, ?)",
                    (w.type, w.id, w.version, w.last_updated, w.method, w.body),
                )
                conn.execute(
                    "INSERT INTO history (type, id, version, last_updated, method, body)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (w.type, w.id, w.version, w.last_updated, w.method, w.body),
                )
                if w.prev_version:
                    conn.execute(
                        "DELETE FROM search_index WHERE type = ? AND id = ?", (w.type, w.id)
                    )
                if w.body is not None and w.index:
                    conn.executemany(
                        "INSERT INTO search_index VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [(w.type, w.id, r.param, r.system, r.text, r.low, r.high) for r in w.index],
                    )
                conn.execute(
                    "INSERT INTO outbox (type, id, version, method) VALUES (?, ?, ?, ?)",
                    (w.type, w.id, w.version, w.method),
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _check_guard(conn: sqlite3.Connection, w: Write, written: list[str]) -> None:
        builder = _SqlBuilder()
        terms = " AND ".join(builder.term(t) for t in w.guard)
        found = conn.execute(
            "SELECT 1 FROM resources r WHERE r.type = ? AND r.body IS NOT NULL"
            f" AND r.id NOT IN ({', '.join('?' * len(written))}) AND {terms} LIMIT 1",
            [w.type, *written, *builder.params],
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
    ) -> Page:
        where, params = [], []
        if type_ is not None:
            where.append("h.type = ?")
            params.append(type_)
        if id_ is not None:
            where.append("h.id = ?")
            params.append(id_)
        if since is not None:
            where.append("h.last_updated >= ?")
            params.append(since)
        if at is not None:
            # The version current at `at`: the newest one not after it.
            where.append(
                "h.seq = (SELECT max(h2.seq) FROM history h2 WHERE h2.type = h.type"
                " AND h2.id = h.id AND h2.last_updated <= ?)"
            )
            params.append(at)
        clause = f"WHERE {' AND '.join(where)}" if where else ""

        def run(conn: sqlite3.Connection) -> Page:
            total = conn.execute(f"SELECT count(*) FROM history h {clause}", params).fetchone()[0]
            rows = []
            if count > 0:
                rows = conn.execute(
                    f"SELECT {_VERSION_COLS} FROM history h {clause}"
                    " ORDER BY h.last_updated DESC, h.seq DESC LIMIT ? OFFSET ?",
                    [*params, count, offset],
                ).fetchall()
            return Page([_version(r) for r in rows], total)

        return await self._run_read(run)

    async def search(self, type_: str, query: Query, *, count: int = 50, offset: int = 0) -> Page:
        builder = _SqlBuilder()
        where = ["r.type = ?", "r.body IS NOT NULL"]
        params: list = [type_]
        for term in query:
            where.append(builder.term(term))
        params += builder.params
        clause = " AND ".join(where)

        def run(conn: sqlite3.Connection) -> Page:
            total = conn.execute(
                f"SELECT count(*) FROM resources r WHERE {clause}", params
            ).fetchone()[0]
            rows = []
            if count > 0 and total > offset:
                rows = conn.execute(
                    f"SELECT {_VERSION_COLS} FROM resources r WHERE {clause}"
                    " ORDER BY r.last_updated DESC, r.id LIMIT ? OFFSET ?",
                    [*params, count, offset],
                ).fetchall()
            return Page([_version(r) for r in rows], total)

        return await self._run_read(run)

    async def events_after(self, seq: int, limit: int = 100) -> list[Event]:
        def run(conn: sqlite3.Connection) -> list[Event]:
            rows = conn.execute(
                "SELECT seq, type, id, version, method FROM outbox WHERE seq > ?"
                " ORDER BY seq LIMIT ?",
                (seq, limit),
            ).fetchall()
            return [Event(*r) for r in rows]

        return await self._run_read(run)

    async def next_value(self, counter: str) -> int:
        def run() -> int:
            return self._write_conn.execute(
                "INSERT INTO counters VALUES (?, 1) ON CONFLICT (name)"
                " DO UPDATE SET value = value + 1 RETURNING value",
                (counter,),
            ).fetchone()[0]

        return await self._run_write(run)
