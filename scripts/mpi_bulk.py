"""Bulk loading of the master patient index for benchmarks: the state that members'
Patient registrations build through the API, written straight into the embedded store.

Registering a million people through the API takes hours here (each registration is a
matched, audited commit). :class:`BulkLoader` builds the same state without HTTP:

* every registration is decided as :meth:`hie.mpi.PatientIndex.index` decides a new
  member record: :func:`~hie.mpi.normalize`, :func:`~hie.mpi.blocking_keys`, the
  candidates under those keys with the block cap applied, :func:`~hie.mpi.decide` with the
  server's model, reviews proposed for the same candidates. The candidates come from an
  in-memory :class:`~hie.mpi.BlockIndex` instead of the store's key index (the same
  records, as the store would return them);
* the writes are built by the MPI's own functions (member record stamped with its member
  organisation as a write through the API is, its link, ``HieMpiRecord``, ``HieMpiLink``,
  reviews, golden records by survivorship) through :class:`~hie.mpi.state.State`, so they
  carry the same bodies and search index rows, and are committed in large batches with
  ``synchronous=OFF``, building the next batch while the last one commits, with the
  indexes the load does not read dropped and built again at its end.

What differs from the API: no AuditEvents are written; a golden record is written once per
load with all the members it gained (the API writes a version per member joining, so its
history is longer); ids come from a seeded generator.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import orjson
from bench_common import mark_index_current  # the scripts' shared helpers

from hie.access.decision import stamp
from hie.access.principal import Principal
from hie.config import Settings
from hie.fhir.search.registry import Registry
from hie.fhir.service import FhirService
from hie.mpi import LINK, BlockIndex, Record, blocking_keys, decide
from hie.mpi.clusters import (
    LinkEvent,
    propose,
    put_link,
    put_record,
    rebuild,
    record_body,
    review_body,
    with_link,
)
from hie.mpi.golden import golden_body
from hie.mpi.index import PatientIndex
from hie.mpi.link import REVIEW
from hie.mpi.model import MATCH
from hie.mpi.records import AUTO, RECORD_TYPE, record_of
from hie.mpi.records import LINK as LINKED
from hie.mpi.state import ABSENT, State
from hie.store.sqlite import SqliteStore, migrate

log = logging.getLogger("hie.bench")

#: Registrations (or golden records) per commit.
BATCH = 2000


class BulkLoader:
    """Loads registrations into the store at ``data_dir``; ``organizations`` maps each
    member name to its ``Organization/<id>`` and ``clients`` to the client id whose writes
    it stands in for (``meta.source``)."""

    def __init__(
        self,
        data_dir: Path,
        organizations: Mapping[str, str],
        clients: Mapping[str, str],
        seed: int,
    ) -> None:
        self.data_dir = data_dir
        self.principals = {
            m: Principal(clients[m], (), organization=org) for m, org in organizations.items()
        }
        self.rng = random.Random(seed)
        self.blocks = BlockIndex()
        self.records: dict[str, Record] = {}
        #: golden record id of every member record loaded or found in the store
        self.golden_of: dict[str, str] = {}
        #: stored body of each member record of the current load, until its golden record
        #: is built (the golden phase then reads no member back from the store)
        self.bodies: dict[str, bytes] = {}

    def _id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    async def load(self, registrations: Iterable[tuple[str, dict]]) -> tuple[list[str], dict]:
        """Register each (member, Patient) in order; returns the member record ids, in
        the same order, and load statistics."""
        store = SqliteStore(self.data_dir, synchronous="OFF")
        await store.open()
        # A big page cache for this loading connection only (the server opens its own).
        await store._run_write(lambda: store._write_conn.execute("PRAGMA cache_size=-2097152"))
        await store._run_write(_drop_indexes, store._write_conn)
        service = FhirService(store, Settings(data_dir=self.data_dir), Registry())
        index = PatientIndex(store, service.new_write)
        start = time.perf_counter()
        try:
            await index.start()
            await self._catch_up(store)
            committer = _Committer(store)
            ids: list[str] = []
            touched: dict[str, list[str]] = {}
            new_goldens: set[str] = set()  # golden records this load creates
            state = index.state()
            stats = {"links": 0, "reviews": 0, "new": 0}
            for member, patient in registrations:
                ids.append(
                    await self._register(index, state, member, patient, touched, new_goldens, stats)
                )
                if len(state.pending.planned) >= BATCH * 3:
                    await committer.put(state.pending.writes())
                    state = index.state()
                    if len(ids) % 50_000 < BATCH:
                        rate = len(ids) / (time.perf_counter() - start)
                        log.warning("  registered %s (%.0f/s)", f"{len(ids):,}", rate)
            await committer.put(state.pending.writes())
            await committer.drain()  # golden records already stored are read back
            registered = time.perf_counter() - start
            goldens = list(touched.items())
            for i in range(0, len(goldens), BATCH):
                state = index.state()
                for golden_id, members in goldens[i : i + BATCH]:
                    bodies = [orjson.loads(self.bodies.pop(m)) for m in members]
                    if golden_id in new_goldens:  # nothing stored to read: build it alone
                        state.put_patient(golden_id, golden_body(golden_id, bodies), ABSENT)
                    else:
                        await rebuild(
                            state,
                            golden_id,
                            add=members,
                            bodies=dict(zip(members, bodies, strict=True)),
                        )
                await committer.put(state.pending.writes())
            await committer.drain()
            rebuilt = time.perf_counter()
            await store._run_write(migrate, store._write_conn)  # creates the dropped indexes
            rebuilt = time.perf_counter() - rebuilt
            await mark_index_current(service)
            await store._run_write(
                lambda: store._write_conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            )
        finally:
            await store.close()
        seconds = time.perf_counter() - start
        stats.update(
            registrations=len(ids),
            golden_records=len(touched),
            seconds=round(seconds, 1),
            register_seconds=round(registered, 1),
            per_second=round(len(ids) / seconds, 1),
            writes=committer.writes,
            indexes_rebuilt=len(UNUSED_WHILE_LOADING),
            index_seconds=round(rebuilt, 1),
        )
        return ids, stats

    async def _catch_up(self, store: SqliteStore) -> None:
        """Add the member records already stored (an earlier load, or registrations
        through the API since) to the in-memory block index."""
        after = None
        while page := await store.scan(RECORD_TYPE, after=after, limit=5000):
            after = page[-1].id
            for version in page:
                if version.id in self.records or version.body is None:
                    continue
                body = orjson.loads(version.body)
                if not body.get("golden"):
                    continue
                self.records[version.id] = record_of(body["record"])
                self.golden_of[version.id] = body["golden"]
                self.blocks.add(version.id, body.get("keys", ()))

    async def _register(
        self,
        index: PatientIndex,
        state: State,
        member: str,
        patient: dict,
        touched: dict[str, list[str]],
        new_goldens: set[str],
        stats: dict,
    ) -> str:
        """Decide and plan one new member record, as :meth:`PatientIndex.index` does."""
        pid = self._id()
        resource = stamp({**patient, "id": pid}, self.principals[member])
        record = index.normalize(resource)
        keys = blocking_keys(record)
        found, skipped = self.blocks.lookup(keys)
        triples = [(self.golden_of[k], k, self.records[k]) for k in found]
        decision = decide(record, triples, index.model, skipped_keys=skipped)
        target, score = None, None
        if decision.action == LINK:
            target, score = decision.cluster, decision.candidates[0].probability
        proposals = [
            review_body(pid, record, s, self.records[s.record], index.model)
            for s in decision.candidates
            if s.cluster != target and (decision.action == REVIEW or s.classification == MATCH)
        ]
        golden_id = target or self._id()
        if target is None:
            new_goldens.add(golden_id)
        stats["links" if target else "new"] += 1
        body = with_link(resource, golden_id)
        write = index.new_write("Patient", pid, body, None, "POST")
        state.pending.put(write)
        self.bodies[pid] = write.body
        put_record(
            state, pid, record_body(pid, golden_id, body, record, keys, decision.reason), ABSENT
        )
        await put_link(state, pid, golden_id, None, LinkEvent(LINKED, decision.reason, AUTO, score))
        stats["reviews"] += await propose(state, proposals)
        self.records[pid] = record
        self.golden_of[pid] = golden_id
        self.blocks.add(pid, keys)
        touched.setdefault(golden_id, []).append(pid)
        return pid


#: Indexes the load does without (it reads resources by id only): each would take every
#: new row at a random place. ``search_owner`` and ``part_owner`` stay, as a version
#: replacing another deletes the old one's rows by owner. Built again at the end, each
#: in one sorted pass.
UNUSED_WHILE_LOADING = (
    "resources_live",
    "history_version",
    "history_lu",
    "history_type_lu",
    "search_text",
    "search_low",
    "search_high",
    "search_nlow",
    "search_nhigh",
    "search_asc",
    "search_desc",
    "part_text",
    "part_low",
    "part_nlow",
)


def _drop_indexes(conn) -> None:
    """Drop the indexes of :data:`UNUSED_WHILE_LOADING` (a load that fails leaves them
    to the next opening of the store, which creates what is missing)."""
    for name in UNUSED_WHILE_LOADING:
        conn.execute(f"DROP INDEX IF EXISTS {name}")


class _Committer:
    """Commits one batch while the caller builds the next."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.task: asyncio.Task | None = None
        self.writes = 0

    async def put(self, writes: list) -> None:
        await self.drain()
        if writes:
            self.writes += len(writes)
            self.task = asyncio.ensure_future(self.store.commit(writes))

    async def drain(self) -> None:
        if self.task is not None:
            task, self.task = self.task, None
            await task
