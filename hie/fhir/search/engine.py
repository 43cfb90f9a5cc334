"""Running a parsed search: matches, paging snapshots, includes and reindexing.

Paging: the first request of a search asks the store for the ordered ids of the
matches up to the end of its page, plus one to tell whether there are more (an
index-only query whose cost follows the page, not the result), and then saves them
as a *snapshot* under a random key. Later pages are read from the
snapshot (``?_getpages=KEY&_getpagesoffset=N``), so concurrent writes cannot shift
results between pages. A page past the snapshot's end runs the search again and
appends the matches not yet in it: no resource is shown twice, and none that still
matches is skipped (up to ``search_max_results`` per search). A page shows each
resource's current version; one deleted since the search began is left out.
Snapshots expire after ``search_snapshot_ttl`` seconds (then 410 Gone).

MDM expansion: ``:mdm`` parameters reach the engine as placeholders
(:class:`~hie.fhir.search.mdm.SamePerson`), replaced before each store query with
every Patient record of the person, which :attr:`SearchEngine.persons` (the master
patient index) names.

Snapshots belong to the operation that made them (``kind``: a search, or
``$everything``): a paging key is only served by the operation that issued it.

Includes: ``_include`` follows the reference rows of the page's resources (and of
included ones, with ``:iterate``), ``_revinclude`` searches for resources referring
to them; both read through the store's indexes.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson

from hie import jsonio
from hie.fhir.errors import error
from hie.fhir.search.dates import fmt
from hie.fhir.search.extract import index_rows, value_rows
from hie.fhir.search.mdm import Persons, expand
from hie.fhir.search.params import Include, SearchRequest
from hie.fhir.search.registry import Registry
from hie.fhir.types import served_types
from hie.store import Store, Version
from hie.store.query import Cond, IndexRow, Match, Query, Sort

#: Rounds of ``:iterate`` includes at most (cycles stop earlier: nothing new).
MAX_ITERATE = 4
#: Snapshot key holding the registry fingerprint the index was built with.
FINGERPRINT_KEY = "_registry-fingerprint"
#: The ``kind`` of a snapshot made by a FHIR search.
SEARCH = "search"


@dataclass
class Found:
    """One page of a search: matches, included resources and paging state."""

    matches: list[Version]
    included: list[Version]
    total: int | None
    offset: int
    count: int
    snapshot: str | None  # key of the paging snapshot, when there are more pages
    length: int  # how many matches the snapshot (or this page) holds
    #: The snapshot cannot grow: it holds every match, or ``max_results`` of them.
    complete: bool = True
    #: What the search that made the snapshot saved with it (later pages only).
    state: dict = field(default_factory=dict)

    @property
    def more(self) -> bool:
        """Whether a next page may exist."""
        return self.offset + self.count < self.length or not self.complete


class SearchEngine:
    """Search execution over a store with one registry of parameters."""

    def __init__(
        self, store: Store, registry: Registry, *, base: str | None, max_results: int, ttl: int
    ):
        self.store = store
        self.registry = registry
        self.base = base
        self.max_results = max_results
        self.ttl = ttl
        #: The person behind a Patient id, for ``:mdm`` (None: each Patient is its own).
        self.persons: Persons | None = None

    def stored_rows(self, version: Version) -> list[IndexRow]:
        """The index rows of a stored (live) version."""
        resource = jsonio.loads(version.body, trusted=True)
        return index_rows(resource, version.last_updated, self.registry, self.base)

    async def expand(self, query: Query, cache: dict | None = None) -> Query:
        """``query`` with its ``:mdm`` placeholders replaced by the person's Patients."""
        return await expand(query, self.persons, cache)

    async def _expand_all(self, queries: dict[str, Query]) -> dict[str, Query]:
        """The per-type ``queries`` expanded."""
        cache: dict = {}  # one lookup per Patient across the types searched
        return {t: await self.expand(q, cache) for t, q in queries.items()}

    async def search(self, queries: dict[str, Query], req: SearchRequest, state: dict) -> Found:
        """Run ``req`` over one query per resource type (one type for a type-level
        search; several for system-level and compartment ``*`` searches). ``state`` is
        what :meth:`page` needs to rebuild ``queries`` when it extends the snapshot
        (with its ``kind``, :data:`SEARCH` unless given)."""
        queries = await self._expand_all(queries)
        if req.count == 0:  # _summary=count or _count=0: only the total
            total = None if req.total == "none" else await self._count(queries)
            return Found([], [], total, 0, 0, None, 0)
        want = req.offset + req.count
        fetch = min(want, self.max_results)
        hits = await self._hits(queries, req.sort, fetch + 1)
        complete = len(hits) <= fetch
        refs = hits[:fetch]
        total: int | None = len(refs) if complete else None
        if total is None and req.total in ("accurate", "estimate"):
            total = await self._count(queries)
        key = None
        if len(refs) > want or not complete:
            key = uuid.uuid4().hex
            state = {"kind": SEARCH, **state, "sort": [[k.param, k.descending] for k in req.sort]}
            await self._save(key, refs, {**state, "complete": complete})
        matches = await self.read_refs(refs[req.offset : want])
        grows = not complete and len(refs) < self.max_results
        return Found(matches, [], total, req.offset, req.count, key, len(refs), not grows)

    async def page(
        self,
        key: str,
        offset: int,
        count: int,
        rebuild: Callable[[dict], Awaitable[dict[str, Query]]],
        authorize: Callable[[list[str]], None],
        kind: str = SEARCH,
        accept: Callable[[dict], None] | None = None,
    ) -> Found:
        """A later page of a snapshot; 410 when it expired or never existed, 400 when
        another operation (``kind``) made it. ``accept`` may refuse the snapshot's
        state (by raising) before any work.

        A snapshot first holds the matches of the first page; a page beyond them runs
        the search again for at least twice as many and appends the matches not shown
        yet (so none is shown twice, and none that still matches is skipped), until
        the search is complete or holds ``max_results``."""
        head = await self.store.load_snapshot(key, 0, 1)
        if head is None or not head[0]:
            raise error(410, "not-found", "This search has expired; run it again")
        state, length = orjson.loads(head[0][0]), head[1] - 1
        made_by = state.get("kind", SEARCH)
        if made_by != kind:
            raise error(
                400,
                "invalid",
                f"This paging key was issued by another operation ({made_by}); "
                "use the links it returned",
            )
        if accept is not None:
            accept(state)
        authorize(state["types"])  # before any work: the caller may search these types
        if offset + count > length and not state["complete"]:
            refs = (await self.store.load_snapshot(key, 1, length) or ([], 0))[0]
            sort = tuple(Sort(p, d) for p, d in state["sort"])
            fetch = min(max(offset + count, 2 * length), self.max_results)
            hits = await self._hits(await self._expand_all(await rebuild(state)), sort, fetch + 1)
            state["complete"] = len(hits) <= fetch
            shown = set(refs)
            refs = (refs + [r for r in hits if r not in shown])[: self.max_results]
            await self._save(key, refs, state)
            length, page = len(refs), refs[offset : offset + count]
        else:
            page = (await self.store.load_snapshot(key, 1 + offset, count) or ([], 0))[0]
        total = length if state["complete"] else None
        matches = await self.read_refs(page)
        grows = not state["complete"] and length < self.max_results
        return Found(matches, [], total, offset, count, key, length, not grows, state)

    async def _count(self, queries: dict[str, Query]) -> int:
        return sum([(await self.store.search(t, q, count=0)).total for t, q in queries.items()])

    async def _hits(self, queries: dict[str, Query], sort, limit: int) -> list[str]:
        """``Type/id`` of the first ``limit`` matches of the per-type ``queries``."""
        hits: list[tuple[str, str, str]] = []  # (last_updated, type, id)
        for type_, query in queries.items():
            got = await self.store.match_ids(type_, query, sort=sort, limit=limit)
            hits.extend((lu, type_, id_) for id_, lu in got)
        if len(queries) > 1:
            hits = _merge(hits, sort)
        return [f"{t}/{i}" for _, t, i in hits[:limit]]

    async def _save(self, key: str, refs: list[str], state: dict) -> None:
        """One snapshot write: the state that rebuilds the query first, then the refs."""
        expires = fmt(datetime.now(UTC) + timedelta(seconds=self.ttl))
        await self.store.save_snapshot(key, [orjson.dumps(state).decode(), *refs], expires)

    async def read_refs(self, refs: Sequence[str]) -> list[Version]:
        """Current versions of ``Type/id`` references, in the order given."""
        by_type: dict[str, list[str]] = defaultdict(list)
        for ref in refs:
            type_, _, id_ = ref.partition("/")
            by_type[type_].append(id_)
        found: dict[str, Version] = {}
        for type_, ids in by_type.items():
            for v in await self.store.read_many(type_, ids):
                found[f"{v.type}/{v.id}"] = v
        return [found[r] for r in refs if r in found]

    # ------------------------------------------------------------- includes
    async def includes(
        self,
        matches: list[Version],
        directives: Sequence[Include],
        readable: Callable[[str], bool],
    ) -> list[Version]:
        """Resources brought in by ``_include``/``_revinclude`` for ``matches``,
        without duplicates or the matches themselves; types for which ``readable``
        is false are left out."""
        if not directives or not matches:
            return []
        seen = {(v.type, v.id) for v in matches}
        out: list[Version] = []
        frontier = matches
        for round_ in range(MAX_ITERATE + 1):
            active = [d for d in directives if round_ == 0 or d.iterate]
            if not active or not frontier:
                break
            new: list[Version] = []
            for d in active:
                got = await (
                    self._reverse(frontier, d) if d.reverse else self._forward(frontier, d)
                )
                for v in got:
                    if (v.type, v.id) not in seen and readable(v.type):
                        seen.add((v.type, v.id))
                        new.append(v)
            out.extend(new)
            frontier = new
        return out

    async def _forward(self, frontier: list[Version], d: Include) -> list[Version]:
        refs: list[str] = []
        for v in frontier:
            if d.source != "*" and v.type != d.source:
                continue
            resource = jsonio.loads(v.body, trusted=True)
            for code in self._reference_params(v.type, d.param):
                param = self.registry.params(v.type)[code]
                nodes = self.registry.extractor(v.type, code)(resource)
                for row in value_rows(param, code, nodes, self.base):
                    if row.param != code or not row.text or "://" in row.text:
                        continue
                    target = row.text.split("/", 1)[0]
                    if "/" in row.text and (d.target is None or target == d.target):
                        refs.append(row.text)
        return await self.read_refs(list(dict.fromkeys(r for r in refs if _served(r))))

    async def _reverse(self, frontier: list[Version], d: Include) -> list[Version]:
        refs = tuple(sorted({f"{v.type}/{v.id}" for v in frontier}))
        kinds = {v.type for v in frontier}
        sources = [d.source] if d.source != "*" else sorted(served_types())
        found: list[str] = []
        for source in sources:
            for code in self._reference_params(source, d.param):
                targets = self.registry.params(source)[code].targets
                if targets and not kinds.intersection(targets):
                    continue
                query = (Match(code, (Cond("text", "in", refs),)),)
                ids = await self.store.match_ids(source, query, limit=self.max_results)
                found.extend(f"{source}/{i}" for i, _ in ids)
        return await self.read_refs(list(dict.fromkeys(found)))

    def _reference_params(self, type_: str, name: str) -> Iterable[str]:
        params = self.registry.params(type_)
        if name != "*":
            return [name] if name in params else []
        return [c for c, p in params.items() if p.type == "reference"]

    # ------------------------------------------------------------- reindex
    async def reindex(self, types: Iterable[str]) -> int:
        """Recompute the index rows of every current resource of ``types``; returns
        how many resources were reindexed."""
        done = 0
        for type_ in types:
            after = None
            while batch := await self.store.scan(type_, after=after, limit=500):
                entries = [(v.id, v.version, self.stored_rows(v)) for v in batch]
                done += await self.store.set_index(type_, entries)
                after = batch[-1].id
        return done


def _served(ref: str) -> bool:
    return ref.split("/", 1)[0] in served_types()


def _merge(hits: list[tuple[str, str, str]], sort) -> list[tuple[str, str, str]]:
    """Merge the ``(last_updated, type, id)`` hits of a multi-type search: newest first
    (ties by type and id), or by ``_id``/``_lastUpdated`` as asked."""
    key = sort[0] if sort else None
    if key is not None and key.param == "_id":
        return sorted(hits, key=lambda h: h[2], reverse=key.descending)
    ordered = sorted(hits, key=lambda h: (h[1], h[2]))
    descending = key.descending if key is not None else True
    return sorted(ordered, key=lambda h: h[0], reverse=descending)  # stable: ties keep order
