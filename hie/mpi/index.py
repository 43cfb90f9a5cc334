"""The master patient index behind the API: :class:`PatientIndex`.

Every Patient a member creates, updates, patches or deletes passes through
:meth:`PatientIndex.plan_patient` while its write is planned, and the MPI's own writes (golden
records, HieMpiRecord, HieMpiLink, HieMpiReview) commit in the same atomic commit as the
member's write and its audit record.

**Deciding.** A new record is normalised, blocked (one indexed lookup per blocking key,
:data:`~hie.mpi.blocking.BLOCK_CAP` per key, larger blocks skipped) and decided by
:func:`~hie.mpi.link.decide` against the golden records of its candidates: ``link`` joins
the matching golden record; ``review`` gives the record a golden record of its own and opens
a review per candidate person; ``new`` gives it a golden record of its own. A pair a steward
decided "different" is never a candidate again. Records without identifying data or with
garbage in them are flagged by normalisation and decided ``new``: never linked on garbage.

**Updates.** The record is re-normalised, its HieMpiRecord and golden record rebuilt. Its
link is decided again only when that is safe: when it is alone in its golden record (it may
now match someone), or when the MPI linked it and it no longer matches the rest of its
golden record (it then leaves, and is decided like a new record). A record that still
matches stays; a link a steward made (link, unlink, merge, review decision) is never undone
automatically.

**Concurrency.** Writes touching MPI state are planned and committed under :meth:`serial`
(one process at a time). Across processes every write is a compare-and-set on what was read,
and a new HieMpiRecord carries a guard: the commit fails if a record sharing one of its
blocking keys appeared that the decision did not see. Either way the caller plans again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field

import orjson

from hie import jsonio
from hie.access.principal import Principal
from hie.fhir.errors import error
from hie.fhir.search.dates import now, to_fhir_instant
from hie.mpi import steward
from hie.mpi.blocking import BLOCK_CAP, blocking_keys
from hie.mpi.clusters import (
    LinkEvent,
    new_golden_id,
    propose,
    put_link,
    put_record,
    rebuild,
    record_body,
    review_body,
    strip_golden_links,
    with_link,
    withdraw_reviews,
)
from hie.mpi.compare import FIELDS, compare
from hie.mpi.link import LINK as DECIDE_LINK
from hie.mpi.link import REVIEW as DECIDE_REVIEW
from hie.mpi.link import Decision, decide, score_clusters
from hie.mpi.model import MATCH, MATCH_PROBABILITY, NO_MATCH, POSSIBLE_PROBABILITY, Model
from hie.mpi.normalize import ID_SYSTEMS, Record, normalize
from hie.mpi.records import (
    AUTO,
    DIFFERENT,
    LINK,
    LINK_TYPE,
    MODEL_ID,
    MODEL_TYPE,
    RECORD_TYPE,
    RELINK,
    REPLACED_BY,
    REVIEW_STATUSES,
    REVIEW_TYPE,
    UNLINK,
    is_golden,
    link_target,
    record_of,
    refer_members,
    review_id,
)
from hie.mpi.state import ABSENT, NewWrite, Pending, State
from hie.mpi.train import train
from hie.store import ConditionConflict, Store, Version, VersionConflict, Write
from hie.store.query import Cond, IdIn, Match, Not, Query

log = logging.getLogger("hie.mpi")

CERTAIN = "certain"
PROBABLE = "probable"
POSSIBLE = "possible"
#: Seconds a process trusts its copy of the stored model before checking for a newer one.
MODEL_TTL = 30.0
#: Member records rematched per commit, and attempts of a batch that lost a race.
BATCH = 200
ATTEMPTS = 25
#: Longest chain of merges followed from a golden record to the one that survived.
MAX_MERGES = 32

Commit = Callable[[list[Write]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class MatchResult:
    """One person found by :meth:`PatientIndex.match`: the golden record, the match
    probability and grade (``certain``, ``probable``, ``possible``), the weight (log2-odds),
    the member record that scored best and each field's part of the score."""

    golden: Version
    probability: float
    grade: str
    weight: float
    record_id: str
    explanation: list[dict]


@dataclass(frozen=True, slots=True)
class Person:
    """The golden record behind a Patient and its member records."""

    golden: str
    members: list[str]


@dataclass
class RematchReport:
    """What :meth:`PatientIndex.rematch` did: member records seen, newly indexed, moved to
    another golden record, reviews opened; whether and how the model was trained."""

    records: int = 0
    indexed: int = 0
    relinked: int = 0
    reviews: int = 0
    trained: bool = False
    model: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Placed:
    golden: str
    previous: str | None
    indexed: bool
    moved: bool
    reviews: int


class PatientIndex:
    """The master patient index on ``store``; ``new_write`` builds Patient writes
    (:meth:`hie.fhir.service.FhirService.new_write`). The thresholds are posterior match
    probabilities (``HIE_MPI_LINK_THRESHOLD``, ``HIE_MPI_REVIEW_THRESHOLD``) and apply to
    whichever model is loaded."""

    def __init__(
        self,
        store: Store,
        new_write: NewWrite,
        *,
        link_threshold: float = MATCH_PROBABILITY,
        review_threshold: float = POSSIBLE_PROBABILITY,
        id_systems: Mapping[str, str] = ID_SYSTEMS,
    ) -> None:
        self.store = store
        self.id_systems = {**ID_SYSTEMS, **id_systems}
        self.new_write = new_write
        self.link_threshold = link_threshold
        self.review_threshold = review_threshold
        self.model = self._thresholded(Model.initial())
        self._model_version = 0
        self._model_checked = float("-inf")
        self._lock = asyncio.Lock()

    def normalize(self, patient: object) -> Record:
        """``patient``'s :class:`Record`, national identifiers read from :attr:`id_systems`."""
        return normalize(patient, id_systems=self.id_systems)

    # ------------------------------------------------------------------ model
    def _thresholded(self, model: Model) -> Model:
        return Model(
            model.m,
            model.u,
            model.prior,
            match_probability=self.link_threshold,
            possible_probability=self.review_threshold,
            info=model.info,
        )

    async def start(self) -> None:
        """Load the stored model (:meth:`Model.initial` until one is trained)."""
        await self._load_model()

    async def _load_model(self) -> None:
        current = await self.store.read(MODEL_TYPE, MODEL_ID)
        version = current.version if current is not None and not current.deleted else 0
        if version != self._model_version:
            model = Model.initial()
            if version:
                try:
                    model = Model.from_json(orjson.dumps(orjson.loads(current.body)["model"]))
                except (KeyError, ValueError) as exc:
                    log.error("stored MPI model unusable, using the initial one: %s", exc)
            self.model = self._thresholded(model)
            self._model_version = version
        self._model_checked = time.monotonic()

    async def _fresh_model(self) -> None:
        """Pick up a model trained by another process (``hie mpi train``)."""
        if time.monotonic() - self._model_checked > MODEL_TTL:
            await self._load_model()

    async def train(self) -> Model:
        """Fit the model by EM (:func:`hie.mpi.train.train`) to every member record and
        store it; ValueError when the records are too few to fit."""
        records: list[Record] = []
        after = None
        while page := await self.store.scan("Patient", after=after, limit=1000):
            after = page[-1].id
            for v in page:
                body = jsonio.loads(v.body, trusted=True)
                if not is_golden(body):
                    records.append(self.normalize(body))
        model = await asyncio.to_thread(train, records, start=self.model)
        current = await self.store.read(MODEL_TYPE, MODEL_ID)
        prev = current.version if current is not None else 0
        body = {
            "model": orjson.loads(model.to_json()),
            "trained": to_fhir_instant(now()),
            "records": len(records),
        }
        method = "PUT" if prev else "POST"
        await self.store.commit(
            [Write(MODEL_TYPE, MODEL_ID, prev, prev + 1, now(), method, orjson.dumps(body))]
        )
        await self._load_model()
        return self.model

    def serial(self) -> asyncio.Lock:
        """The in-process lock held from planning to commit of any write touching MPI state."""
        return self._lock

    def state(self, pending: Pending | None = None) -> State:
        """A view of the store through ``pending`` (a fresh one by default)."""
        return State(self.store, self.new_write, pending)

    # ------------------------------------------------------------------ writes
    async def plan_patient(
        self, principal: Principal, write: Write, pending: Pending
    ) -> tuple[Write, list[Write]]:
        """The member's ``write`` with its MPI link set (and its search index rows, which
        ``write`` may leave out), and the MPI writes it needs (see the module docstring).
        The MPI writes are also planned into ``pending``; a later call on the same
        ``pending`` (a later entry of the same transaction) may replace some: commit
        ``pending.writes()`` once, after the last entry is planned."""
        await self._fresh_model()
        state = self.state(pending)
        mark = len(pending.log)
        if write.body is None:
            pending.members[write.id] = None
            await self.unindex(state, write.id, LinkEvent(UNLINK, "record-deleted", AUTO))
            return write, pending.since(mark)
        resource = await strip_golden_links(state, jsonio.loads(write.body, trusted=True))
        pending.members[write.id] = resource
        body, _ = await self.index(state, resource)
        pending.members[write.id] = body
        prev = Version("Patient", write.id, write.prev_version, "", "PUT", b"")
        member = self.new_write(
            "Patient",
            write.id,
            body,
            prev if write.prev_version else None,
            write.method,
            write.guard,
        )
        return member, pending.since(mark)

    async def index(self, state: State, resource: dict) -> tuple[dict, _Placed]:
        """Index member record ``resource`` (see the module docstring); returns it with its
        MPI link, and where it was placed."""
        pid = resource["id"]
        record = self.normalize(resource)
        keys = blocking_keys(record)
        prev = await state.read(RECORD_TYPE, pid)
        before = prev.body.get("golden") if prev.body else None
        own, members = before, []
        if own:
            golden = await state.read("Patient", own)
            if golden.body is not None and pid in refer_members(golden.body):
                members = [m for m in refer_members(golden.body) if m != pid]
            else:
                own = None
        link = await state.read(LINK_TYPE, pid) if own else ABSENT
        by_steward = link.body is not None and link.body.get("by") != AUTO
        target, reason, score, guard, proposals = own, "", None, (), None
        if not by_steward:
            cluster = await self._records(state, members)
            if not cluster or not self._holds(record, own, cluster):
                decision, found, guard = await self._decide(state, pid, record, keys, own, cluster)
                reason = decision.reason
                if decision.action == DECIDE_LINK:
                    target = decision.cluster
                    score = decision.candidates[0].probability
                elif cluster:
                    target = None  # it no longer belongs with the others: a person of its own
                proposals = [
                    review_body(pid, record, s, found[s.record], self.model)
                    for s in decision.candidates
                    if s.cluster != target
                    and (decision.action == DECIDE_REVIEW or s.classification == MATCH)
                ]
        golden_id = target or new_golden_id()
        body = with_link(resource, golden_id)
        if before and before != golden_id:
            await rebuild(state, before, remove=[pid])
        await rebuild(state, golden_id, add=[pid], bodies={pid: body})
        reason = reason or (prev.body or {}).get("reason", "")
        put_record(state, pid, record_body(pid, golden_id, body, record, keys, reason), prev, guard)
        moved = before != golden_id
        if moved or prev.body is None:
            action = LINK if prev.body is None else RELINK
            await put_link(state, pid, golden_id, before, LinkEvent(action, reason, AUTO, score))
        added = 0
        if proposals is not None:
            if prev.body is not None:
                keep = [review_id(pid, p["candidate"]) for p in proposals]
                await withdraw_reviews(state, record=pid, keep=keep)
            added = await propose(state, proposals)
        return body, _Placed(golden_id, before, prev.body is None, moved, added)

    async def unindex(self, state: State, patient_id: str, event: LinkEvent) -> None:
        """Remove a member record from the index (it was deleted): its golden record is
        rebuilt without it (deleted when it was the last), its open reviews withdrawn."""
        prev = await state.read(RECORD_TYPE, patient_id)
        if prev.body is None:
            return
        golden_id = prev.body.get("golden")
        if golden_id:
            await rebuild(state, golden_id, remove=[patient_id])
        state.put_internal(RECORD_TYPE, patient_id, None, prev)
        await put_link(state, patient_id, None, golden_id, event)
        await withdraw_reviews(state, record=patient_id)

    async def _records(self, state: State, ids: list[str]) -> dict[str, Record]:
        found = await state.read_many(RECORD_TYPE, ids) if ids else {}
        return {i: record_of(cur.body["record"]) for i, cur in found.items()}

    def _holds(self, record: Record, golden_id: str, cluster: dict[str, Record]) -> bool:
        """Whether ``record`` still matches its golden record's other members."""
        scored = score_clusters(record, [(golden_id, i, r) for i, r in cluster.items()], self.model)
        return bool(scored) and scored[0].classification == MATCH

    async def _decide(
        self,
        state: State,
        pid: str,
        record: Record,
        keys: list[str],
        own: str | None,
        cluster: dict[str, Record],
    ) -> tuple[Decision, dict[str, Record], Query]:
        """The decision on ``record``, the candidate records by id, and the guard of its
        HieMpiRecord write. The record's own golden record, if it has other members, is a
        candidate as a whole."""
        found, skipped, seen, read_keys = await self._block(state, keys, exclude=pid)
        found.update((i, (own, r)) for i, r in cluster.items())
        different = await self._different(state, pid, own, found)
        triples = [(g, i, r) for i, (g, r) in found.items() if g not in different]
        decision = decide(record, triples, self.model, skipped_keys=skipped)
        guard: Query = ()
        if read_keys:
            guard = (Match("key", (Cond("text", "in", tuple(read_keys)),)),)
            if seen:
                guard += (Not(IdIn(tuple(seen))),)
        return decision, {i: r for i, (_, r) in found.items()}, guard

    async def _block(
        self, state: State, keys: list[str], exclude: str | None = None
    ) -> tuple[dict[str, tuple[str, Record]], list[str], list[str], list[str]]:
        """Candidates under ``keys``: (golden id, record) by member id; the keys skipped for
        exceeding the block cap; the stored ids read; the keys read.

        One query for all keys first: when it finds no more than the cap, no key holds
        more; only otherwise is each key counted on its own. Records planned in the same
        transaction count towards the cap too."""
        ids: dict[str, None] = {}
        skipped: list[str] = []
        planned = {k: state.pending.keyed(k) for k in keys}
        if keys:
            every = (Match("key", (Cond("text", "in", tuple(keys)),)),)
            found = await state.ids(RECORD_TYPE, every, BLOCK_CAP + 1)
            if len(found) + len(set().union(*planned.values())) <= BLOCK_CAP:
                ids = dict.fromkeys(found)
            else:
                blocks = await asyncio.gather(
                    *(
                        state.ids(
                            RECORD_TYPE, (Match("key", (Cond("text", "eq", k),)),), BLOCK_CAP + 1
                        )
                        for k in keys
                    )
                )
                for key, block in zip(keys, blocks, strict=True):
                    if len(set(block) | planned[key]) > BLOCK_CAP:
                        skipped.append(key)
                    else:
                        ids.update(dict.fromkeys(block))
        read_keys = [k for k in keys if k not in skipped]
        seen = list(ids)
        wanted = set(read_keys)
        for key in read_keys:
            ids.update(dict.fromkeys(planned[key]))
        ids.pop(exclude, None)
        current = await state.read_many(RECORD_TYPE, list(ids)) if ids else {}
        found = {
            i: (cur.body["golden"], record_of(cur.body["record"]))
            for i, cur in current.items()
            if cur.body.get("golden") and wanted.intersection(cur.body.get("keys", ()))
        }
        return found, skipped, seen, read_keys

    async def _different(
        self, state: State, pid: str, own: str | None, found: dict[str, tuple[str, Record]]
    ) -> set[Hashable]:
        """Candidate golden records a steward decided are not this record's person: a
        "different" review of (this record, that golden record), or of (one of its
        members, this record's golden record)."""
        pairs: dict[str, str] = {}
        for member, (golden_id, _) in found.items():
            pairs[review_id(pid, golden_id)] = golden_id
            if own and golden_id != own:
                pairs[review_id(member, own)] = golden_id
        if not pairs:
            return set()
        reviews = await state.read_many(REVIEW_TYPE, list(pairs))
        return {pairs[i] for i, cur in reviews.items() if cur.body.get("status") == DIFFERENT}

    # ------------------------------------------------------------------ queries
    async def match(
        self, resource: dict, *, count: int | None, only_certain: bool
    ) -> list[MatchResult]:
        """The people ``resource`` (a Patient) may be, best first, one result per golden
        record: ``certain`` (automatic-link grade), ``probable`` (review grade, probability
        of at least one half), ``possible`` (review grade). A record with nothing to
        identify a person by matches nobody."""
        await self._fresh_model()
        record = self.normalize(resource)
        if not record.identifying:
            return []
        found, _, _, _ = await self._block(self.state(), blocking_keys(record))
        scored = [
            s
            for s in score_clusters(record, [(g, i, r) for i, (g, r) in found.items()], self.model)
            if s.classification != NO_MATCH and (s.classification == MATCH or not only_certain)
        ]
        if count is not None:
            scored = scored[:count]
        goldens = {
            v.id: v for v in await self.store.read_many("Patient", [s.cluster for s in scored])
        }
        results = []
        for s in scored:
            if s.cluster not in goldens:
                continue
            vector = compare(record, found[s.record][1])
            _, parts = self.model.score(vector)
            labels = vector.labelled()
            if s.classification == MATCH:
                grade = CERTAIN
            else:
                grade = PROBABLE if s.probability >= 0.5 else POSSIBLE
            explanation = [
                {"field": f.name, "level": labels[f.name], "weight": parts[f.name]} for f in FIELDS
            ]
            results.append(
                MatchResult(
                    goldens[s.cluster], s.probability, grade, s.weight, s.record, explanation
                )
            )
        return results

    async def person(self, patient_id: str) -> Person | None:
        """The person behind ``Patient/<patient_id>`` (a member or golden record; a golden
        record merged away leads to the one it was merged into); None if not indexed."""
        state = self.state()
        current = await state.read("Patient", patient_id)
        if current.body is None:
            return None
        if is_golden(current.body):
            golden_id = await self.surviving(state, patient_id)
        else:
            record = await state.read(RECORD_TYPE, patient_id)
            golden_id = record.body.get("golden") if record.body else None
        if golden_id is None:
            return None
        golden = await state.read("Patient", golden_id)
        if golden.body is None:
            return None
        return Person(golden_id, refer_members(golden.body))

    async def surviving(self, state: State, golden_id: str) -> str | None:
        """The golden record ``golden_id`` was merged into (itself if not merged); None
        when it does not exist."""
        for _ in range(MAX_MERGES):
            current = await state.read("Patient", golden_id)
            if current.body is None or not is_golden(current.body):
                return None
            target = link_target(current.body, REPLACED_BY)
            if current.body.get("active", True) or target is None:
                return golden_id
            golden_id = target
        return None

    async def by_identifier(self, system: str, value: str) -> list[str]:
        """Ids of the Patients (member and golden records) carrying identifier
        ``system|value``."""
        query = (Match("identifier", (Cond("system", "eq", system), Cond("text", "eq", value))),)
        return [i for i, _ in await self.store.match_ids("Patient", query, limit=1000)]

    async def reviews(self, status: str, count: int, offset: int) -> tuple[list[dict], int]:
        """A page of reviews with ``status`` (``open``, ``same``, ``different``), newest
        first, each body with its ``id``; and how many there are."""
        if status not in REVIEW_STATUSES:
            raise error(400, "value", f"Review status must be one of {', '.join(REVIEW_STATUSES)}")
        query = (Match("status", (Cond("text", "eq", status),)),)
        page = await self.store.search(REVIEW_TYPE, query, count=count, offset=offset)
        return [{"id": v.id, **orjson.loads(v.body)} for v in page.items], page.total

    # ------------------------------------------------------------------ steward
    async def plan_link(
        self, principal: Principal, record_id: str, golden_id: str, reason: str
    ) -> list[Write]:
        """Link member record ``record_id`` to golden record ``golden_id`` (a steward's link,
        never undone automatically; confirming the current link also makes it one)."""
        return await steward.link(self, principal, record_id, golden_id, reason)

    async def plan_unlink(self, principal: Principal, record_id: str, reason: str) -> list[Write]:
        """Give member record ``record_id`` a golden record of its own, and remember that it
        is not the person of the one it leaves."""
        return await steward.unlink(self, principal, record_id, reason)

    async def plan_merge(self, principal: Principal, source_id: str, target_id: str) -> list[Write]:
        """Merge ``source_id`` into ``target_id``: two golden records (the source's members
        move), or two member records of one organisation (duplicates)."""
        return await steward.merge(self, principal, source_id, target_id)

    async def plan_unmerge(self, principal: Principal, source_id: str) -> list[Write]:
        """Undo the merge of ``source_id``, restoring both records."""
        return await steward.unmerge(self, principal, source_id)

    async def plan_resolve(
        self, principal: Principal, review_id: str, decision: str
    ) -> list[Write]:
        """Decide review ``review_id``: ``same`` links its record to the candidate person
        (merging the two golden records when the MPI had linked the record with others),
        ``different`` is remembered (the pair is never proposed or linked again)."""
        return await steward.resolve(self, principal, review_id, decision)

    # ------------------------------------------------------------------ batch
    async def rematch(
        self, *, retrain: bool, commit: Commit | None = None, batch: int = BATCH
    ) -> RematchReport:
        """Re-index every member record with the current model (first trained anew when
        ``retrain``): records never indexed are indexed, the others decided again by the
        update rules (steward links kept). Commits ``batch`` records at a time through
        ``commit`` (default: the store's, unaudited)."""
        report = RematchReport()
        if retrain:
            model = await self.train()
            report.trained, report.model = True, dict(model.info)
        commit = commit or self.store.commit
        after = None
        while page := await self.store.scan("Patient", after=after, limit=batch):
            after = page[-1].id
            ids = [v.id for v in page if not is_golden(jsonio.loads(v.body, trusted=True))]
            if ids:
                await self._rematch_batch(ids, commit, report)
        return report

    async def _rematch_batch(self, ids: list[str], commit: Commit, report: RematchReport) -> None:
        for attempt in range(ATTEMPTS):
            async with self.serial():
                state = self.state()
                placed = []
                for pid in ids:
                    current = await state.read("Patient", pid)
                    if current.body is None or is_golden(current.body):
                        continue
                    body, where = await self.index(state, current.body)
                    if body != current.body:
                        state.put_patient(pid, body, current)
                    placed.append(where)
                try:
                    writes = state.pending.writes()
                    if writes:
                        await commit(writes)
                except (VersionConflict, ConditionConflict):
                    await asyncio.sleep(0.001 * 2 ** min(attempt, 6))
                    continue
            report.records += len(placed)
            report.indexed += sum(p.indexed for p in placed)
            report.relinked += sum(p.moved and not p.indexed for p in placed)
            report.reviews += sum(p.reviews for p in placed)
            return
        raise RuntimeError("rematch kept losing races to concurrent writes; run it again")
