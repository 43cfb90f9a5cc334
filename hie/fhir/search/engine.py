"""Running a parsed search: matches, paging snapshots, includes and reindexing.

Paging: the first request of a search asks the store for the ordered ids of all
matches (up to ``search_max_results``, an index-only query) and, when they do not
fit on one page, saves them as a *snapshot* under a random key. Later pages are
read from the snapshot (``?_getpages=KEY&_getpagesoffset=N``), so concurrent writes
cannot shift results between pages: no duplicates, no gaps. A page shows each
resource's current version; one deleted since the search began is left out.
Snapshots expire after ``search_snapshot_ttl`` seconds (then 410 Gone).

Includes: ``_include`` follows the reference rows of the page's resources (and of
included ones, with ``:iterate``), ``_revinclude`` searches for resources referring
to them; both read through the store's indexes.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hie import jsonio
from hie.fhir.errors import error
from hie.fhir.search.dates import fmt
from hie.fhir.search.extract import index_rows, value_rows
from hie.fhir.search.params import Include, SearchRequest
from hie.fhir.search.registry import Registry
from hie.fhir.types import served_types
from hie.store import Store, Version
from hie.store.query import Cond, Match, Query

#: Rounds of ``:iterate`` includes at most (cycles stop earlier: nothing new).
MAX_ITERATE = 4
#: Snapshot key holding the registry fingerprint the index was built with.
FINGERPRINT_KEY = "_registry-fingerprint"


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


class SearchEngine:
    """Search execution over a store with one registry of parameters."""

    def __init__(self, store: Store, registry: Registry, *, max_results: int, ttl: int):
        self.store = store
        self.registry = registry
        self.max_results = max_results
        self.ttl = ttl

    async def search(self, queries: dict[str, Query], req: SearchRequest) -> Found:
        """Run ``req`` over one query per resource type (one type for a type-level
        search; several for system-level and compartment ``*`` searches)."""
        limit = self.max_results
        hits: list[tuple[str, str, str]] = []  # (last_updated, type, id)
        for type_, query in queries.items():
            got = await self.store.match_ids(type_, query, sort=req.sort, limit=limit + 1)
            hits.extend((lu, type_, id_) for id_, lu in got)
        if len(queries) > 1:
            hits = _merge(hits, req.sort)
        complete = len(hits) <= limit
        hits = hits[:limit]
        total: int | None = len(hits) if complete else None
        if total is None and req.total == "accurate":
            total = 0
            for type_, query in queries.items():
                total += (await self.store.search(type_, query, count=0)).total
        refs = [f"{t}/{i}" for _, t, i in hits]
        if req.count == 0:
            return Found([], [], total, 0, 0, None, len(refs))
        key = None
        if len(refs) > req.offset + req.count:
            key = uuid.uuid4().hex
            expires = fmt(datetime.now(UTC) + timedelta(seconds=self.ttl))
            await self.store.save_snapshot(key, refs, expires)
        page = refs[req.offset : req.offset + req.count]
        matches = await self.read_refs(page)
        return Found(matches, [], total, req.offset, req.count, key, len(refs))

    async def page(self, key: str, offset: int, count: int) -> Found:
        """A later page of a snapshot; 410 when it expired or never existed."""
        got = await self.store.load_snapshot(key, offset, count)
        if got is None:
            raise error(410, "not-found", "This search has expired; run it again")
        refs, length = got
        matches = await self.read_refs(refs)
        return Found(matches, [], length, offset, count, key, length)

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
                for row in value_rows(param, code, nodes):
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
                for v in batch:
                    rows = index_rows(
                        jsonio.loads(v.body, trusted=True), v.last_updated, self.registry
                    )
                    if await self.store.set_index(v.type, v.id, v.version, rows):
                        done += 1
                after = batch[-1].id
        return done


def _served(ref: str) -> bool:
    return ref.split("/", 1)[0] in served_types()


def _merge(hits: list[tuple[str, str, str]], sort) -> list[tuple[str, str, str]]:
    """Merge per-type hits of a multi-type search (sorted by last update, newest
    first, or by ``_id``/``_lastUpdated`` as asked)."""
    if not sort:
        return sorted(hits, key=lambda h: (_neg(h[0]), h[1], h[2]))
    key = sort[0]
    if key.param == "_id":
        return sorted(hits, key=lambda h: h[2], reverse=key.descending)
    return sorted(hits, key=lambda h: (h[0], h[1], h[2]), reverse=key.descending)


def _neg(instant: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in instant)
