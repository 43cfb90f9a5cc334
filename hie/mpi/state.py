"""MPI state as one plan sees it: the store, overlaid with what the plan has written so far.

A plan (one Patient write, one transaction Bundle, one steward operation, one batch of a
rematch) reads through a :class:`State` and writes into its :class:`Pending`; nothing is
stored until the caller commits ``pending.writes()``. Every write is a compare-and-set on
the version the plan read, so a plan made on state that changed meanwhile fails to commit
(:class:`~hie.store.VersionConflict`) and is made again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import orjson

from hie import jsonio
from hie.fhir.search.dates import now
from hie.mpi.records import INDEXERS, INTERNAL, RECORD_TYPE
from hie.store import Store, Version, Write
from hie.store.query import Query

NewWrite = Callable[..., Write]


@dataclass(frozen=True, slots=True)
class Current:
    """A resource as a plan sees it: the version its next write replaces and its body
    (None: deleted or never written, then ``version`` is 0 or the tombstone's)."""

    version: int
    body: dict | None


ABSENT = Current(0, None)


@dataclass
class Pending:
    """Writes planned and not committed yet, one per resource, and the member Patient
    bodies the caller itself writes (a transaction's entries), by id. Planned internal
    records are kept parsed, and HieMpiRecords indexed by blocking key, so that a large
    transaction's entries find each other without rereading what was planned."""

    planned: dict[tuple[str, str], Write] = field(default_factory=dict)
    members: dict[str, dict | None] = field(default_factory=dict)
    bodies: dict[tuple[str, str], dict | None] = field(default_factory=dict)
    by_type: dict[str, dict[str, None]] = field(default_factory=dict)
    by_key: dict[str, set[str]] = field(default_factory=dict)
    #: Every resource planned, in order (repeats included): what a step planned is the
    #: tail of this log from where it started (:meth:`since`).
    log: list[tuple[str, str]] = field(default_factory=list)

    def put(self, write: Write, body: dict | None = None) -> None:
        """Plan ``write`` (``body``: its content, parsed, for an internal record); it
        replaces an earlier write of the same resource, keeping the version that one
        replaces (one commit writes a resource once)."""
        key = (write.type, write.id)
        earlier = self.planned.get(key)
        self._unindex(key)
        self.log.append(key)
        if earlier is not None:
            if earlier.prev_version == 0 and write.body is None:
                del self.planned[key]  # created and deleted within the plan: nothing
                self.by_type[write.type].pop(write.id, None)
                return
            method = "POST" if earlier.prev_version == 0 else write.method
            write = replace(
                write,
                prev_version=earlier.prev_version,
                version=earlier.version,
                method=method,
                guard=write.guard or earlier.guard,
            )
            write = _renumbered(write)
        self.planned[key] = write
        self.by_type.setdefault(write.type, {})[write.id] = None
        if write.type in INTERNAL:
            self.bodies[key] = body
            for k in (body or {}).get("keys", ()) if write.type == RECORD_TYPE else ():
                self.by_key.setdefault(k, set()).add(write.id)

    def _unindex(self, key: tuple[str, str]) -> None:
        body = self.bodies.pop(key, None)
        if key[0] == RECORD_TYPE and body:
            for k in body.get("keys", ()):
                self.by_key.get(k, set()).discard(key[1])

    def writes(self) -> list[Write]:
        """The planned writes, in the order first planned."""
        return list(self.planned.values())

    def since(self, mark: int) -> list[Write]:
        """The writes planned (or replaced) since ``len(log)`` was ``mark``."""
        keys = dict.fromkeys(self.log[mark:])
        return [self.planned[k] for k in keys if k in self.planned]

    def of_type(self, type_: str) -> Iterable[Write]:
        """The planned writes of ``type_``."""
        return (self.planned[(type_, i)] for i in self.by_type.get(type_, ()))

    def keyed(self, key: str) -> set[str]:
        """Ids of the planned HieMpiRecords under blocking ``key``."""
        return self.by_key.get(key, set())


def _renumbered(write: Write) -> Write:
    """A Patient write whose body's ``meta.versionId`` follows its (merged) version."""
    if write.body is None or write.type != "Patient":
        return write
    body = jsonio.loads(write.body, trusted=True)
    if body.get("meta", {}).get("versionId") == str(write.version):
        return write
    body["meta"] = {**body["meta"], "versionId": str(write.version)}
    return replace(write, body=jsonio.dumps(body))


class State:
    """Reads through ``pending`` to ``store``; writes into ``pending``."""

    def __init__(self, store: Store, new_write: NewWrite, pending: Pending | None = None):
        self.store = store
        self.new_write = new_write
        self.pending = pending if pending is not None else Pending()

    def _overlay(self, type_: str, id_: str) -> Current | None:
        write = self.pending.planned.get((type_, id_))
        if write is not None:
            if type_ in INTERNAL:
                return Current(write.prev_version, self.pending.bodies.get((type_, id_)))
            return Current(write.prev_version, parse(type_, write.body))
        if type_ == "Patient" and id_ in self.pending.members:
            return Current(0, self.pending.members[id_])
        return None

    async def read(self, type_: str, id_: str) -> Current:
        """The resource as planned, else as stored."""
        planned = self._overlay(type_, id_)
        if planned is not None:
            return planned
        return _current(await self.store.read(type_, id_))

    async def read_many(self, type_: str, ids: Sequence[str]) -> dict[str, Current]:
        """The live (not deleted) resources among ``ids``, as planned, else as stored."""
        found: dict[str, Current] = {}
        missing = []
        for id_ in dict.fromkeys(ids):
            planned = self._overlay(type_, id_)
            if planned is None:
                missing.append(id_)
            elif planned.body is not None:
                found[id_] = planned
        if missing:
            for v in await self.store.read_many(type_, missing):
                found[v.id] = _current(v)
        return {i: found[i] for i in ids if i in found}

    async def ids(self, type_: str, query: Query, limit: int) -> list[str]:
        """Ids of up to ``limit`` stored resources matching ``query``, in no particular
        order (planned changes not applied)."""
        return await self.store.any_ids(type_, query, limit=limit)

    def put_patient(self, id_: str, body: dict | None, current: Current) -> Write:
        """Plan a Patient version (``None``: a deletion) replacing ``current``."""
        prev = _stub("Patient", id_, current.version)
        method = "DELETE" if body is None else "PUT" if current.version else "POST"
        write = self.new_write("Patient", id_, body, prev, method)
        self.pending.put(write)
        return write

    def put_internal(
        self, type_: str, id_: str, body: dict | None, current: Current, guard: Query = ()
    ) -> Write:
        """Plan a version of an internal record (``None``: a deletion) replacing ``current``;
        ``guard``: the commit fails if a record outside it matches (see :class:`Write`)."""
        method = "DELETE" if body is None else "PUT" if current.version else "POST"
        rows = INDEXERS[type_](body) if body is not None and type_ in INDEXERS else ()
        data = None if body is None else orjson.dumps(body)
        write = Write(
            type_,
            id_,
            current.version,
            current.version + 1,
            now(),
            method,
            data,
            tuple(rows),
            guard,
        )
        self.pending.put(write, body)
        return write


def parse(type_: str, data: bytes | None) -> dict | None:
    """A stored body: FHIR JSON keeps its decimals, internal records are plain JSON."""
    if data is None:
        return None
    return orjson.loads(data) if type_ in INTERNAL else jsonio.loads(data, trusted=True)


def _current(version: Version | None) -> Current:
    if version is None:
        return ABSENT
    return Current(version.version, parse(version.type, version.body))


def _stub(type_: str, id_: str, version: int) -> Version | None:
    """A stand-in for the version a new write replaces (only its number is used)."""
    return Version(type_, id_, version, "", "PUT", b"") if version else None
