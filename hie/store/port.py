"""The Store port: the one interface the FHIR layer uses to persist resources.

Two adapters implement it (``SqliteStore`` and ``MongoStore``) and pass one shared
contract suite (``tests/store/test_contract.py``). Nothing above ``hie.store`` knows
which adapter it runs on.

Model
-----
* Every write is a :class:`Write` carrying the *complete* new version: the caller
  (the FHIR service layer) has already set ``meta.versionId``/``meta.lastUpdated``
  in ``body`` and computed the search index entries.
* Every write is a compare-and-set on the current version: ``prev_version`` is the
  version the caller read (0 when the resource does not exist at all). If the stored
  version differs, :meth:`Store.commit` raises :class:`VersionConflict` and writes
  nothing. A tombstone (deleted resource) is a version like any other.
* :meth:`Store.commit` is atomic over all its writes: all are applied or none.
* Search runs over extracted index rows only (never over resource JSON), with the
  tiny query language of :mod:`hie.store.query`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

from hie.store.query import IndexRow, Query, Sort

Method = Literal["POST", "PUT", "PATCH", "DELETE"]

#: Types holding the server's own records, not FHIR resources: registered clients, the
#: audit chain's head and seals, and the master patient index's state (see
#: :mod:`hie.mpi.records`). They are stored like resources (versions, compare-and-set,
#: searchable through their own index rows) but never served, searched through the FHIR
#: API or listed in a system history.
INTERNAL_TYPES = (
    "HieClient",
    "HieAuditHead",
    "HieAuditSeal",
    "HieMpiRecord",
    "HieMpiLink",
    "HieMpiReview",
    "HieMpiMerge",
    "HieMpiModel",
)
#: The internal types whose index rows are searched (the MPI's lookups by blocking key,
#: golden record, review status); the others need no search indexes.
SEARCHED_INTERNAL_TYPES = ("HieMpiRecord", "HieMpiLink", "HieMpiReview", "HieMpiMerge")
#: Append-only types, written in volume (the audit log: one record per request), each
#: with the search parameter its records are stamped with at commit (the instant of
#: ``last_updated``, to the microsecond). A resource of such a type is written once, as a
#: create, and never changed: its one version is its current one, so the store keeps no
#: history copy and no outbox event of it, and it is left out of a system-level history.
#: Its index rows hold only text values (tokens, references, strings); the stamped
#: parameter and ``_lastUpdated`` are answered from ``last_updated``. The embedded store
#: keeps those rows in one lean table, which cannot sort by parameter values.
JOURNAL_TYPES = {"AuditEvent": "date"}
#: Internal types kept as their current version alone: no history, no outbox event and
#: no search index rows. The audit chain's head is one: every group commit of the audit
#: log rewrites it. A :meth:`Store.vread` of such a type finds only the current version.
REGISTER_TYPES = frozenset({"HieAuditHead"})


def keeps_history(type_: str) -> bool:
    """Whether the store keeps past versions (and outbox events) of ``type_``: not for
    :data:`JOURNAL_TYPES` (one version each) nor :data:`REGISTER_TYPES`."""
    return type_ not in JOURNAL_TYPES and type_ not in REGISTER_TYPES


@dataclass(frozen=True, slots=True)
class Version:
    """One stored version of a resource, current or historical.

    ``body`` is the serialized FHIR JSON (with ``meta``) exactly as it is served;
    it is ``None`` for a tombstone. ``last_updated`` is an ISO-8601 UTC instant with
    microseconds (``2026-01-02T03:04:05.123456Z``), which sorts lexically.
    """

    type: str
    id: str
    version: int
    last_updated: str
    method: Method
    body: bytes | None

    @property
    def deleted(self) -> bool:
        """True when this version is a deletion tombstone."""
        return self.body is None


@dataclass(frozen=True, slots=True)
class Write:
    """A new version to store, guarded by the version it replaces."""

    type: str
    id: str
    prev_version: int
    version: int
    last_updated: str
    method: Method
    body: bytes | None
    index: Sequence[IndexRow] = field(default_factory=tuple)
    #: A conditional create's criteria: the commit fails with ConditionConflict if a
    #: current resource of this type, other than those this commit writes, matches.
    guard: Query = ()


@dataclass(frozen=True, slots=True)
class Event:
    """An outbox event recorded atomically with the writes that caused it."""

    seq: int
    type: str
    id: str
    version: int
    method: Method


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a search or history result; ``total`` counts all matches."""

    items: list[Version]
    total: int


class StoreError(Exception):
    """Base class of store failures the FHIR layer maps to an OperationOutcome."""


class VersionConflict(StoreError):
    """A write's ``prev_version`` did not match the stored version."""

    def __init__(self, type_: str, id_: str, expected: int, actual: int):
        super().__init__(f"{type_}/{id_}: expected version {expected}, store has {actual}")
        self.type = type_
        self.id = id_
        self.expected = expected
        self.actual = actual


class ConditionConflict(StoreError):
    """A write's ``guard`` matched a resource (a concurrent conditional create won)."""

    def __init__(self, type_: str, id_: str):
        super().__init__(f"{type_}/{id_}: another {type_} now matches the condition")
        self.type = type_
        self.id = id_


class TransactionsUnavailable(StoreError):
    """The backing database cannot run atomic multi-document transactions."""


class Store(ABC):
    """Async persistence for FHIR resources (see module docstring for the model)."""

    @abstractmethod
    async def open(self) -> None:
        """Connect, create tables/collections/indexes if missing."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; the store may be opened again afterwards."""

    @abstractmethod
    async def read(self, type_: str, id_: str) -> Version | None:
        """The current version (possibly a tombstone), or None if never written."""

    @abstractmethod
    async def vread(self, type_: str, id_: str, version: int) -> Version | None:
        """A specific version, or None."""

    @abstractmethod
    async def commit(self, writes: Sequence[Write]) -> None:
        """Apply all writes atomically, each as compare-and-set on its
        ``prev_version``; on any mismatch raise :class:`VersionConflict` and apply
        nothing. A write with a ``guard`` is applied only if no current resource of its
        type outside this commit matches the guard, else :class:`ConditionConflict`
        (checked atomically with the writes, so concurrent conditional creates cannot
        both succeed). Each write also appends one outbox :class:`Event` and a history
        version, except those of :data:`REGISTER_TYPES` and :data:`JOURNAL_TYPES` (which
        may only be created: a write with ``prev_version`` other than 0 raises
        ValueError). Writes to the same resource within one commit
        are not allowed (the caller merges them)."""

    @abstractmethod
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
        """Versions newest first, at system (no type), type, or instance level.
        ``exclude``: types left out of a system-level history (which never lists
        :data:`JOURNAL_TYPES`).

        ``since``: only versions with ``last_updated >= since``. ``at``: for each
        resource only the version that was current at that instant (the newest
        version with ``last_updated <= at``); with both, ``since`` filters what ``at``
        picked. Ties on ``last_updated`` are broken by commit order, newest first (within
        one commit, a later write is newer). ``count=0`` returns only the total.
        """

    @abstractmethod
    async def search(
        self,
        type_: str,
        query: Query,
        *,
        sort: Sequence[Sort] = (),
        count: int = 50,
        offset: int = 0,
    ) -> Page:
        """Current, non-deleted resources of ``type_`` matching ``query``.

        Ordered by ``sort`` (see :mod:`hie.store.query` for sort-key semantics), ties
        and the unsorted case by ``last_updated`` descending, then id ascending.
        ``count=0`` returns only the total. The embedded store sorts
        :data:`JOURNAL_TYPES` by ``_id``, ``_lastUpdated`` and the stamped parameter
        only (ValueError for another key).
        """

    @abstractmethod
    async def match_ids(
        self, type_: str, query: Query, *, sort: Sequence[Sort] = (), limit: int
    ) -> list[tuple[str, str]]:
        """``(id, last_updated)`` of the first ``limit`` matches, in :meth:`search` order.

        Cheap: answered from the indexes without loading resource bodies."""

    @abstractmethod
    async def any_ids(self, type_: str, query: Query, *, limit: int) -> list[str]:
        """Ids of up to ``limit`` matches, each once, in no particular order: whichever
        the indexes give first, without ordering all matches (for existence checks and
        counting up to a cap, where :meth:`match_ids` would sort every match)."""

    @abstractmethod
    async def read_many(self, type_: str, ids: Sequence[str]) -> list[Version]:
        """The current, non-deleted versions of ``ids`` in the order given; ids that are
        unknown or deleted are left out."""

    @abstractmethod
    async def scan(
        self, type_: str, *, after: str | None = None, limit: int = 500
    ) -> list[Version]:
        """Current, non-deleted resources of ``type_`` by ascending id, starting after
        id ``after`` (for reindexing in batches)."""

    @abstractmethod
    async def set_index(
        self, type_: str, entries: Sequence[tuple[str, int, Sequence[IndexRow]]]
    ) -> int:
        """For each ``(id, version, rows)``, replace the index rows of ``type_/id`` if its
        current version is still ``version`` (no new version is written), all in one
        commit; returns how many were replaced."""

    @abstractmethod
    async def save_snapshot(self, key: str, refs: Sequence[str], expires: str) -> None:
        """Store an ordered list of ``Type/id`` references (one search's matches, for
        paging) under ``key`` until the instant ``expires``."""

    @abstractmethod
    async def load_snapshot(
        self, key: str, offset: int, count: int
    ) -> tuple[list[str], int] | None:
        """``count`` references of snapshot ``key`` from ``offset`` and the snapshot's
        length, or None when the key is unknown or expired."""

    @abstractmethod
    async def claim(self, key: str, expires: str) -> bool:
        """Atomically record ``key`` until the instant ``expires``: True the first time,
        False while an unexpired claim of ``key`` exists (an expired one may be claimed
        again). For one-time values such as the ``jti`` of a client assertion."""

    @abstractmethod
    async def events_after(self, seq: int, limit: int = 100) -> list[Event]:
        """Outbox events with a sequence number greater than ``seq``, oldest first."""

    @abstractmethod
    async def last_event(self) -> int:
        """The sequence number of the newest outbox event (0 when there is none)."""

    @abstractmethod
    async def next_value(self, counter: str) -> int:
        """Atomically increment and return a named counter (first value is 1)."""
