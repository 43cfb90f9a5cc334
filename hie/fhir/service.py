"""The FHIR interactions, independent of HTTP: each write is *planned* against the
current state (producing a :class:`~hie.store.Write` and the :class:`Result` to
report) and then committed, alone or as part of a transaction Bundle.

Every interaction first asks :func:`hie.access.decision.require`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import jsonpatch
import jsonpointer

from hie import jsonio
from hie.access.consents import ConsentBook
from hie.access.decision import (
    AUDIT_TYPES,
    consent_filter,
    consent_state,
    disclose,
    permits,
    released,
    require,
    require_change,
    require_role,
    require_visible,
    stamp,
)
from hie.access.principal import ADMIN, Principal
from hie.config import Settings
from hie.fhir.errors import FhirError, error
from hie.fhir.search.dates import now, to_fhir_instant
from hie.fhir.search.engine import FINGERPRINT_KEY, Found, SearchEngine
from hie.fhir.search.extract import index_rows, index_version
from hie.fhir.search.params import Include, SearchRequest, parse_search
from hie.fhir.search.registry import COMPARTMENTS, InvalidSearchParameter, Registry
from hie.fhir.types import served_types
from hie.fhir.validation import check_resource, small_int, valid_id
from hie.mpi.records import GOLDEN_TAG, has_enterprise_id, has_golden_tag, is_golden
from hie.mpi.state import Pending
from hie.store import (
    INTERNAL_TYPES,
    ConditionConflict,
    Page,
    Store,
    Version,
    VersionConflict,
    Write,
)
from hie.store.query import AnyOf, Cond, IdIn, Match, Not, Query

if TYPE_CHECKING:
    from hie.mpi.index import PatientIndex

log = logging.getLogger("hie")
_FOREVER = "9999-12-31T00:00:00.000000Z"

#: Attempts of an unguarded write (no If-Match) that lost a race to a concurrent one.
RETRIES = 25


async def backoff(attempt: int) -> None:
    """Wait before retry ``attempt`` (0-based): random, exponentially growing, capped
    at 50 ms, so that writers racing for one resource spread out instead of colliding
    again in lockstep."""
    await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one interaction: HTTP status, the version it produced or found
    (for ETag, Location and the body) and a sentence for ``return=OperationOutcome``.
    ``extra``: further writes that must commit with the interaction's own (the master
    patient index's, for a Patient planned on its own)."""

    status: int
    version: Version | None
    message: str
    extra: tuple[Write, ...] = ()


Plan = tuple[Write | None, Result]
#: Commits a planned write (with its audit record): ``commit(writes, result)``.
Commit = Callable[[list[Write], Result], Awaitable[None]]


def version_of(write: Write) -> Version:
    """The version a write will store."""
    return Version(
        write.type, write.id, write.version, write.last_updated, write.method, write.body
    )


def check_type(type_: str) -> None:
    """404 for a resource type this server does not serve."""
    if type_ not in served_types():
        raise error(404, "not-supported", f"Resource type {type_!r} is not supported")


def check_writable(type_: str) -> None:
    """405 for a type no client may change (the append-only audit log)."""
    if type_ in AUDIT_TYPES:
        raise error(405, "not-supported", f"{type_} records are append-only: written by the server")


def check_id(id_: str) -> None:
    """400 for a syntactically invalid logical id in a URL."""
    if not valid_id(id_):
        raise error(400, "value", f"Invalid resource id {id_!r}")


def new_id() -> str:
    """A server-assigned logical id: random, never sequential."""
    return str(uuid.uuid4())


#: Matches golden records (owned by the master patient index) in a Patient query.
GOLDEN = Match(
    "_tag", (Cond("system", "eq", GOLDEN_TAG["system"]), Cond("text", "eq", GOLDEN_TAG["code"]))
)


def check_not_golden(type_: str, prev: Version | None) -> None:
    """403 for a change to a golden record: only the master patient index changes them."""
    if (
        type_ == "Patient"
        and prev is not None
        and prev.body is not None
        and is_golden(jsonio.loads(prev.body, trusted=True))
    ):
        raise error(
            403,
            "forbidden",
            f"Patient/{prev.id} is a golden record of the master patient index; it "
            "changes only through the MPI operations (link, unlink, merge, unmerge)",
        )


def check_member_patient(type_: str, resource: dict, where: str = "") -> None:
    """422 for a Patient a client sends as a golden record: with the golden-record tag or
    an enterprise identifier, which only the master patient index assigns."""
    if type_ != "Patient":
        return
    if has_golden_tag(resource):
        raise error(
            422,
            "business-rule",
            "The golden-record tag is set only by the master patient index",
            f"{where or type_}.meta.tag",
        )
    if has_enterprise_id(resource):
        raise error(
            422,
            "business-rule",
            "Enterprise identifiers are assigned only by the master patient index",
            f"{where or type_}.identifier",
        )


class FhirService:
    """The REST interactions over a :class:`~hie.store.Store`."""

    def __init__(self, store: Store, settings: Settings, registry: Registry):
        self.store = store
        self.settings = settings
        self.registry = registry
        self.engine = SearchEngine(
            store,
            registry,
            base=settings.base_url,
            max_results=settings.search_max_results,
            ttl=settings.search_snapshot_ttl,
        )
        #: The master patient index every Patient write passes through (None: off).
        self.mpi: PatientIndex | None = None
        #: The Consents in force, which also check every Consent written (None: off).
        self.consents: ConsentBook | None = None

    # ---------------------------------------------------------------- reads
    async def read(self, principal: Principal, type_: str, id_: str) -> Version:
        """The current version; 404 if unknown, 410 if deleted."""
        check_type(type_)
        require(principal, "r", type_)
        check_id(id_)
        current = await self.store.read(type_, id_)
        if current is None:
            raise error(404, "not-found", f"{type_}/{id_} is not known")
        if current.deleted:
            raise _gone(current)
        return require_visible(principal, current)

    async def vread(self, principal: Principal, type_: str, id_: str, vid: str) -> Version:
        """A specific version; 404 if unknown, 410 if that version is a deletion."""
        check_type(type_)
        require(principal, "r", type_)
        check_id(id_)
        number = small_int(vid)
        if number is None:
            raise error(404, "not-found", f"{type_}/{id_} has no version {vid!r}")
        found = await self.store.vread(type_, id_, number)
        if found is None:
            raise error(404, "not-found", f"{type_}/{id_} has no version {vid}")
        if found.deleted:
            raise _gone(found)
        return require_visible(principal, found)

    def parse(
        self,
        type_: str | None,
        items: Sequence[tuple[str, str]],
        *,
        strict: bool,
        base: str | None = None,
        compartment: tuple[str, str] | None = None,
    ) -> SearchRequest:
        """Parse search parameters with this server's paging limits. ``type_`` None
        is a system-level search over ``_type`` (default: every served type)."""
        if type_ is not None and not (type_ == "*" and compartment):
            check_type(type_)
        types = self._search_types(type_, items, compartment)
        return parse_search(
            type_ if type_ != "*" else None,
            items,
            default_count=self.settings.default_count,
            max_count=self.settings.max_count,
            strict=strict,
            registry=self.registry,
            types=types,
            base=base,
        )

    def _search_types(
        self,
        type_: str | None,
        items: Sequence[tuple[str, str]],
        compartment: tuple[str, str] | None,
    ) -> list[str]:
        """The types a search covers: the one named, the ``_type`` list of a system
        search, or a compartment's members for ``Patient/1/*``."""
        if compartment is not None:
            members = self._compartment(compartment)
            if type_ != "*":
                if type_ not in members:
                    raise error(
                        400, "invalid", f"{type_} is not in the {compartment[0]} compartment"
                    )
                return [type_]
            return sorted(set(members) - AUDIT_TYPES)
        if type_ is not None:
            return [type_]
        listed = [v for k, v in items if k == "_type"]
        if not listed:  # audit records only when named: they are for auditors
            return sorted(served_types() - AUDIT_TYPES)
        names = [t for value in listed for t in value.split(",")]
        for name in names:
            check_type(name)
        return list(dict.fromkeys(names))

    def _compartment(self, compartment: tuple[str, str]) -> dict[str, tuple[str, ...]]:
        kind, id_ = compartment
        if kind not in COMPARTMENTS:
            raise error(404, "not-supported", f"There is no {kind} compartment")
        members = self.registry.compartment(kind)
        check_id(id_)
        return members

    async def search(
        self,
        principal: Principal,
        type_: str | None,
        req: SearchRequest,
        compartment: tuple[str, str] | None = None,
        base: str | None = None,
    ) -> Found:
        """The first page of a search (type, system or compartment level)."""
        types = req.types
        for t in types:
            require(principal, "s", t)
        if len(types) > 1 and any(k.param not in ("_id", "_lastUpdated") for k in req.sort):
            raise error(
                400, "invalid", "Searches over several types sort only by _id or _lastUpdated"
            )
        state = {
            "type": type_,
            "used": req.used,
            "types": types,
            "compartment": compartment,
            "base": base,
            "consent": consent_state(principal),
        }
        queries = await self._queries(principal, req, compartment)
        found = await self.engine.search(queries, req, state)
        found.matches = released(principal, found.matches)
        if req.total == "none":
            found.total = None
        return found

    async def _queries(
        self, principal: Principal, req: SearchRequest, compartment: tuple[str, str] | None
    ) -> dict[str, Query]:
        """One store query per type searched (compartment membership added, and what
        the patients' consent withholds from the caller left out)."""
        queries: dict[str, Query] = {}
        for t in req.types:
            query = req.query
            if compartment is not None:
                ref = f"{compartment[0]}/{compartment[1]}"
                links = tuple(
                    Match(p, (Cond("text", "eq", ref),))
                    for p in self._compartment(compartment)[t]
                    if p in self.registry.params(t)
                )
                if compartment[0] == t:
                    links += (IdIn((compartment[1],)),)
                if not links:
                    continue
                query = (AnyOf(links) if len(links) > 1 else links[0],) + query
            queries[t] = await consent_filter(principal, t, query)
        return queries

    async def _rebuild(self, principal: Principal, state: dict) -> dict[str, Query]:
        """The queries of a search from the state its snapshot keeps."""
        compartment = tuple(state["compartment"]) if state["compartment"] else None
        req = parse_search(
            state["type"] if state["type"] != "*" else None,
            [tuple(item) for item in state["used"]],
            default_count=1,
            max_count=1,
            strict=False,
            registry=self.registry,
            types=state["types"],
            base=state["base"],
        )
        return await self._queries(principal, req, compartment)

    async def search_page(
        self,
        principal: Principal,
        key: str,
        offset: int,
        count: int,
        items: Sequence[tuple[str, str]],
    ) -> tuple[Found, list[Include]]:
        """A later page of a search, with the includes its links carry."""

        def authorize(types: list[str]) -> None:
            for t in types:
                require(principal, "s", t)

        found = await self.engine.page(
            key, offset, count, lambda state: self._rebuild(principal, state), authorize
        )
        found.matches = released(principal, found.matches, found.state)
        carried = [(k, v) for k, v in items if k.startswith(("_include", "_revinclude"))]
        req = parse_search(
            None,
            carried,
            default_count=count,
            max_count=count,
            strict=True,
            registry=self.registry,
            types=[],
        )
        if ("_total", "none") in items:
            found.total = None
        return found, req.includes

    async def include(
        self, principal: Principal, matches: list[Version], includes: Sequence[Include]
    ) -> list[Version]:
        """``_include``/``_revinclude`` results; types the caller may not read are
        left out, as SMART scopes require."""
        found = await self.engine.includes(matches, includes, lambda t: permits(principal, "r", t))
        return disclose(principal, "r", found)

    async def reindex(self, principal: Principal, type_: str | None) -> tuple[int, list[str]]:
        """Load custom SearchParameters and rebuild the index of ``type_`` (or of every
        type); returns how many resources were reindexed and the SearchParameters
        skipped, with the reason."""
        require_role(principal, ADMIN, "$reindex")
        require(principal, "u", type_ or "*")
        skipped = await self.load_custom_parameters()
        types = [type_] if type_ else sorted(served_types())
        done = await self.engine.reindex(types)
        if type_ is None:
            fingerprint = index_version(self.registry)
            await self.store.save_snapshot(FINGERPRINT_KEY, [fingerprint], _FOREVER)
        return done, skipped

    async def refresh_index(self) -> int:
        """Reindex everything when the index was built with other parameter
        definitions (an upgrade, or a data directory from an older version). Runs in
        the background at startup; returns how many resources it reindexed."""
        fingerprint = index_version(self.registry)
        stored = await self.store.load_snapshot(FINGERPRINT_KEY, 0, 1)
        if stored is not None and stored[0] == [fingerprint]:
            return 0
        if stored is not None or await self._has_data():
            log.warning("search definitions changed: reindexing all resources")
        done = await self.engine.reindex(sorted(served_types()))
        await self.store.save_snapshot(FINGERPRINT_KEY, [fingerprint], _FOREVER)
        if done:
            log.warning("reindexed %d resources", done)
        return done

    async def _has_data(self) -> bool:
        return bool((await self.store.history(count=1)).items)

    async def load_custom_parameters(self) -> list[str]:
        """Register the active SearchParameter resources stored on this server;
        returns why each one that cannot be served was skipped."""
        skipped = []
        after = None
        while batch := await self.store.scan("SearchParameter", after=after, limit=500):
            for v in batch:
                resource = jsonio.loads(v.body, trusted=True)
                if resource.get("status") != "active":
                    continue
                try:
                    self.registry.add(resource)
                except InvalidSearchParameter as exc:
                    skipped.append(f"SearchParameter/{v.id}: {exc}")
            after = batch[-1].id
        for reason in skipped:
            log.warning("search parameter not served: %s", reason)
        return skipped

    async def match(
        self,
        principal: Principal,
        type_: str,
        items: Sequence[tuple[str, str]],
        exclude: Collection[str] = (),
        *,
        members_only: bool = False,
    ) -> tuple[Query, list[Version]]:
        """The query of a conditional interaction's criteria and the resources it
        matches (at most two are fetched: callers only distinguish none, one and many).
        Criteria are parsed strictly: an unknown parameter must not silently match
        everything. ``exclude``: ids that do not count (deleted earlier in the same
        transaction). ``members_only``: golden records (which carry their members'
        identifiers) do not match, as for the condition of a conditional write."""
        check_type(type_)
        require(principal, "s", type_)
        req = self.parse(type_, items, strict=True)
        if not req.query:
            raise error(400, "invalid", f"The condition on {type_} has no search criteria")
        query = await consent_filter(principal, type_, await self.engine.expand(req.query))
        query += (Not(IdIn(tuple(exclude))),) if exclude else ()
        if members_only and type_ == "Patient":
            query += (Not(GOLDEN),)
        page = await self.store.search(type_, query, count=2)
        return query, page.items

    async def history(
        self,
        principal: Principal,
        type_: str | None,
        id_: str | None,
        *,
        since: str | None,
        at: str | None,
        count: int,
        offset: int,
    ) -> Page:
        """History at system (no type), type or instance level, newest first."""
        if type_ is None:
            require(principal, "r", "*")
        else:
            check_type(type_)
            require(principal, "r", type_)
        if id_ is not None:
            check_id(id_)
            if await self.store.read(type_, id_) is None:
                raise error(404, "not-found", f"{type_}/{id_} is not known")
        hidden = INTERNAL_TYPES
        if type_ is None and not permits(principal, "r", next(iter(AUDIT_TYPES))):
            hidden = (*INTERNAL_TYPES, *AUDIT_TYPES)
        page = await self.store.history(
            type_, id_, since=since, at=at, count=count, offset=offset, exclude=hidden
        )
        return Page(disclose(principal, "r", page.items), page.total)

    # ---------------------------------------------------------------- plans
    def new_write(
        self,
        type_: str,
        id_: str,
        resource: dict | None,
        prev: Version | None,
        method: str,
        guard: Query = (),
        *,
        indexed: bool = True,
        instant: str | None = None,
    ) -> Write:
        """The write storing ``resource`` (None: a tombstone) as the next version, at
        ``instant`` (default: now); ``indexed=False`` leaves its search index rows out
        (for a write that is built again before it is stored)."""
        version = (prev.version if prev else 0) + 1
        instant = instant or now()
        body = None
        index = ()
        if resource is not None:
            meta = dict(resource.get("meta") or {})
            meta["versionId"] = str(version)
            meta["lastUpdated"] = to_fhir_instant(instant)
            stored = {"resourceType": type_, "id": id_, "meta": meta}
            stored.update((k, v) for k, v in resource.items() if k not in stored)
            body = jsonio.dumps(stored)
            if indexed:
                index = index_rows(stored, instant, self.registry, self.settings.base_url)
        prev_version = prev.version if prev else 0
        return Write(type_, id_, prev_version, version, instant, method, body, index, guard)

    async def plan_create(
        self,
        principal: Principal,
        type_: str,
        resource: object,
        if_none_exist: Sequence[tuple[str, str]] | None = None,
        *,
        id_: str | None = None,
        where: str = "",
        exclude: Collection[str] = (),
        pending: Pending | None = None,
    ) -> Plan:
        """Create (POST); ``if_none_exist`` makes it conditional, and the write then
        carries the criteria as its guard. ``id_`` is the id already reserved for it
        (transactions resolve ``urn:uuid:`` references first). ``pending``: the MPI
        writes of the transaction this create is part of (see :meth:`_indexed`)."""
        check_type(type_)
        check_writable(type_)
        require(principal, "c", type_)
        check_resource(resource, type_, where)
        check_member_patient(type_, resource, where)
        resource = stamp(resource, principal)
        guard: Query = ()
        if if_none_exist is not None:
            guard, found = await self.match(
                principal, type_, if_none_exist, exclude, members_only=True
            )
            if len(found) > 1:
                raise error(412, "duplicate", f"If-None-Exist matched several {type_} resources")
            if found:
                return None, Result(200, found[0], f"{type_}/{found[0].id} already exists")
        write = self.new_write(
            type_, id_ or new_id(), resource, None, "POST", guard, indexed=self._final(type_)
        )
        return await self._indexed(
            principal, write, Result(201, None, f"Created {type_}/{write.id}"), pending
        )

    async def plan_update(
        self,
        principal: Principal,
        type_: str,
        id_: str,
        resource: object,
        if_match: int | None = None,
        *,
        where: str = "",
        pending: Pending | None = None,
    ) -> Plan:
        """Update (PUT), creating the resource when it does not exist (or was deleted)."""
        check_type(type_)
        check_writable(type_)
        require(principal, "u", type_)
        check_id(id_)
        check_resource(resource, type_, where)
        body_id = resource.get("id")
        if body_id is None:
            raise error(
                400, "required", "The resource has no id; update needs one", f"{where or type_}.id"
            )
        if body_id != id_:
            raise error(
                400,
                "invariant",
                f"The resource id {body_id!r} does not match the id {id_!r} in the URL",
                f"{where or type_}.id",
            )
        prev = await self.store.read(type_, id_)
        _check_if_match(prev, if_match, type_, id_)
        creating = prev is None or prev.deleted
        if creating:
            require(principal, "c", type_)
        else:
            require_change(principal, prev)
        check_not_golden(type_, prev)
        check_member_patient(type_, resource, where)
        resource = stamp(resource, principal)
        write = self.new_write(type_, id_, resource, prev, "PUT", indexed=self._final(type_))
        if creating:
            result = Result(201, None, f"Created {type_}/{id_}")
        else:
            result = Result(200, None, f"Updated {type_}/{id_}")
        return await self._indexed(principal, write, result, pending)

    async def plan_patch(
        self,
        principal: Principal,
        type_: str,
        id_: str,
        patch: object,
        if_match: int | None = None,
        *,
        pending: Pending | None = None,
    ) -> Plan:
        """Apply a JSON Patch (RFC 6902) to the current version."""
        check_type(type_)
        check_writable(type_)
        require(principal, "u", type_)
        check_id(id_)
        if not isinstance(patch, list) or not all(isinstance(op, dict) for op in patch):
            raise error(400, "invalid", "A JSON Patch document is a JSON array of operations")
        prev = await self.store.read(type_, id_)
        if prev is None:
            raise error(404, "not-found", f"{type_}/{id_} is not known")
        _check_if_match(prev, if_match, type_, id_)
        if prev.deleted:
            raise _gone(prev)
        require_change(principal, prev)
        check_not_golden(type_, prev)
        current = jsonio.loads(prev.body, trusted=True)
        try:
            patched = jsonpatch.JsonPatch(patch).apply(current)
        except jsonpatch.JsonPatchTestFailed as exc:
            raise error(422, "processing", f"JSON Patch test failed: {exc}") from None
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            raise error(422, "processing", f"JSON Patch cannot be applied: {exc}") from None
        except (TypeError, KeyError, ValueError) as exc:
            raise error(400, "invalid", f"Malformed JSON Patch: {exc}") from None
        if not isinstance(patched, dict) or patched.get("id") != id_:
            raise error(422, "processing", "A patch must not change the resource id", f"{type_}.id")
        try:
            check_resource(patched, type_)
        except FhirError as exc:  # the patch produced an invalid resource: 422, not 400
            raise FhirError(422, exc.issues) from None
        check_member_patient(type_, patched)
        patched = stamp(patched, principal)
        write = self.new_write(type_, id_, patched, prev, "PATCH", indexed=self._final(type_))
        return await self._indexed(
            principal, write, Result(200, None, f"Patched {type_}/{id_}"), pending
        )

    async def plan_delete(
        self,
        principal: Principal,
        type_: str,
        id_: str,
        if_match: int | None = None,
        *,
        pending: Pending | None = None,
    ) -> Plan:
        """Delete: a tombstone version. Deleting what is absent or already deleted
        succeeds without a new version, as the spec allows."""
        check_type(type_)
        check_writable(type_)
        require(principal, "d", type_)
        check_id(id_)
        prev = await self.store.read(type_, id_)
        _check_if_match(prev, if_match, type_, id_)
        if prev is None or prev.deleted:
            return None, Result(204, prev, f"{type_}/{id_} does not exist; nothing to delete")
        require_change(principal, prev)
        check_not_golden(type_, prev)
        write = self.new_write(type_, id_, None, prev, "DELETE")
        return await self._indexed(
            principal, write, Result(204, None, f"Deleted {type_}/{id_}"), pending
        )

    def _final(self, type_: str) -> bool:
        """Whether a planned write of ``type_`` is stored as built: a Patient's is built
        again by the master patient index (with its link), and indexed then."""
        return self.mpi is None or type_ != "Patient"

    async def _indexed(
        self, principal: Principal, write: Write, result: Result, pending: Pending | None
    ) -> Plan:
        """The plan of ``write`` with ``result`` (its version set): a Patient's passes
        through the master patient index, which sets its MPI link and adds its own writes,
        as the result's ``extra`` when the write is planned alone, else into the
        transaction's ``pending`` (the caller commits them)."""
        if self.consents is not None and write.type == "Consent" and write.body is not None:
            await self.consents.validate(jsonio.loads(write.body, trusted=True))
        if self.mpi is not None and write.type == "Patient":
            alone = pending is None
            pending = Pending() if alone else pending
            write, extra = await self.mpi.plan_patient(principal, write, pending)
            result = replace(result, extra=tuple(extra) if alone else ())
        return write, replace(result, version=version_of(write))

    async def plan_conditional(
        self,
        principal: Principal,
        type_: str,
        items: Sequence[tuple[str, str]],
        on_match: Callable[[str], Awaitable[Plan]],
        on_none: Callable[[], Awaitable[Plan]],
        exclude: Collection[str] = (),
    ) -> Plan:
        """Resolve a conditional update/patch/delete: none, one match, or 412. A write
        planned for no match (a conditional update creating) carries the criteria as
        its guard."""
        query, found = await self.match(principal, type_, items, exclude, members_only=True)
        if len(found) > 1:
            raise error(412, "multiple-matches", f"The condition matched several {type_} resources")
        if found:
            return await on_match(found[0].id)
        write, result = await on_none()
        return (None if write is None else replace(write, guard=query)), result

    # ---------------------------------------------------------------- commit
    async def run(
        self,
        plan: Callable[[], Awaitable[Plan]],
        guarded: bool,
        commit: Commit,
        *,
        serial: bool = False,
    ) -> Result:
        """Plan and commit one write (and the writes its result adds) through
        ``commit``. A lost race retries (re-reading the state) unless the client guarded
        the write with If-Match and the race was on that resource, which then gets 412.
        ``serial``: the write may touch master patient index state, so planning and
        commit hold its lock."""
        lock = self.mpi.serial() if serial and self.mpi is not None else contextlib.nullcontext()
        for attempt in range(RETRIES):
            if attempt:
                await backoff(attempt)
            async with lock:
                write, result = await plan()
                if write is None:
                    return result
                try:
                    await commit([write, *result.extra], result)
                    return result
                except VersionConflict as exc:
                    if guarded and (exc.type, exc.id) == (write.type, write.id):
                        raise error(412, "conflict", f"Version conflict: {exc}") from None
                except ConditionConflict:
                    pass  # a concurrent write won: re-planning sees it
        raise error(409, "conflict", "The resource is being modified concurrently; retry")


def _check_if_match(prev: Version | None, if_match: int | None, type_: str, id_: str) -> None:
    if if_match is None:
        return
    if prev is None:
        raise error(412, "conflict", f"If-Match given but {type_}/{id_} does not exist")
    if prev.version != if_match:
        raise error(
            412,
            "conflict",
            f"If-Match version {if_match} is not the current version {prev.version}",
        )


def _gone(version: Version):
    exc = error(410, "deleted", f"{version.type}/{version.id} was deleted")
    exc.headers["ETag"] = f'W/"{version.version}"'
    return exc
