"""Search index rows built behind the request path, for types written in volume and
searched rarely (the audit log's AuditEvents: one per request, read by auditors).

A write of such a type is stored with :attr:`~hie.store.Write.later` set: no index
rows, and listed by :meth:`~hie.store.Store.unindexed`. :class:`LaterIndex` gives
those resources their rows in batches, in the background every
:data:`INTERVAL` seconds, and before any search of their type (:meth:`catch_up`), so a
search sees every resource committed before it began, as if indexed at write time.

In batches, the rows of many records share the index pages a commit rewrites: indexing
20 records costs one commit instead of 20 small ones on the request path. Batches are
kept small so that a batch's commit holds up the requests' commits (one writer) for a
few milliseconds only.
Rows left unindexed by a crash are indexed by the next catch-up, by any process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from hie.store import Store, Version
from hie.store.query import IndexRow

log = logging.getLogger("hie.search")

#: Resources indexed per commit.
BATCH = 20
#: Seconds between background catch-ups.
INTERVAL = 1.0
#: Resources indexed between two turns of the event loop.
_YIELD_EVERY = 5

Rows = Callable[[Version], Sequence[IndexRow]]


class LaterIndex:
    """Indexes the resources of the types declared with :meth:`add` stored without
    index rows, using ``rows`` (a stored version's index rows) on ``store``."""

    def __init__(self, store: Store, rows: Rows):
        self.store = store
        #: Seconds between the background catch-ups of :meth:`run`.
        self.interval = INTERVAL
        self._rows = rows
        #: one lock per declared type: one indexer at a time
        self._locks: dict[str, asyncio.Lock] = {}

    def add(self, type_: str) -> None:
        """Declare that ``type_`` may be written with ``later`` (by any process)."""
        self._locks.setdefault(type_, asyncio.Lock())

    async def catch_up(self, type_: str) -> int:
        """Index every resource of ``type_`` still without rows; returns how many were
        indexed. Cheap when nothing is pending (one indexed probe); a no-op for the
        types not declared with :meth:`add`."""
        lock = self._locks.get(type_)
        if lock is None:
            return 0
        done = 0
        async with lock:  # one indexer per type; a waiting caller then finds little
            while batch := await self.store.unindexed(type_, BATCH):
                entries = []
                for n, version in enumerate(batch, 1):
                    entries.append((version.id, version.version, self._rows(version)))
                    if n % _YIELD_EVERY == 0:
                        await asyncio.sleep(0)
                done += await self.store.set_index(type_, entries)
                if len(batch) < BATCH:
                    break
        return done

    async def run(self) -> None:
        """Catch up on every declared type every :attr:`interval` seconds, until
        cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            for type_ in sorted(self._locks):
                try:
                    await self.catch_up(type_)
                except Exception:  # the next round or a search retries
                    log.exception("indexing %s records failed", type_)
