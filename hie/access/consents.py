"""The Consents in force and what they let one caller see.

:class:`ConsentBook` keeps every active patient-privacy Consent as a
:class:`~hie.access.consent.Policy`, filed under the *person* its patient belongs to
(all member records the master patient index links, and the golden record), with the
actors the Consents name resolved. It follows the store's outbox, so a Consent
written, revised or revoked by any process, a CareTeam, PractitionerRole or Group changed, or
an MPI link moved applies from the next request on.

Each request gets a :class:`ConsentView`: the decision for its caller, used by
:mod:`hie.access.decision` (the one access decision point) for single resources
(read, vread, history, includes, ``$everything``, MPI results) and, as a store query
term, for searches, so that searches are filtered in the store, not per resource.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import orjson

from hie.access import consent as rules
from hie.access.consent import (
    Accessor,
    ActorFacts,
    Facts,
    Formula,
    Policy,
    TypeShape,
    Verdict,
    default_verdict,
    person_verdict,
    to_term,
    visible_formula,
)
from hie.access.decision import MEMBER_TAG_SYSTEM, writer_in
from hie.access.patients import PatientLinks
from hie.access.principal import ADMIN, Principal
from hie.access.purpose import BREAK_GLASS, BREAK_GLASS_LABEL
from hie.fhir.errors import FhirError, error
from hie.fhir.search.dates import now
from hie.fhir.search.extract import reference_key, value_rows
from hie.fhir.search.mdm import SamePerson
from hie.fhir.search.registry import Registry, care_date
from hie.mpi.records import LINK_TYPE
from hie.store import INTERNAL_TYPES, Store, Version
from hie.store.query import AnyOf, IdIn, IdSet, Match, Not, Term, WrittenAfter

log = logging.getLogger("hie.access")

#: Outbox types whose changes can change a decision.
WATCHED = frozenset({"Consent", "HieMpiLink", "CareTeam", "PractitionerRole", "Group"})
#: What decided when a member reads what its own organisation wrote.
OWN = "records written by the caller's organisation"
#: Search filters a ledger keeps before it starts over.
MAX_FILTERS = 10_000
#: Types decided by their own rules: audit records are for auditors.
EXEMPT_TYPES = frozenset({"AuditEvent"})
#: Types whose changes never touch a withheld set (no search of them is filtered).
UNFILTERED = WATCHED | EXEMPT_TYPES | frozenset(INTERNAL_TYPES)
#: Most resources of a type one caller's withheld set holds; with more, the store
#: decides each resource by the consent formula instead.
MAX_WITHHELD = 100_000
#: Changes counted per type to tell when a withheld set is worth computing afresh;
#: when older changes are forgotten, a set is computed afresh.
MAX_TOUCHED = 100_000
#: Withheld sets up to this size are written into each query; larger ones are kept by
#: the store between queries (an IdSet).
INLINE_IDS = 100
#: Most resources of a type changed since a withheld set was computed that the store
#: decides by the formula beside the set; from half of it the set is computed afresh
#: in the background, and past it the formula decides every resource until then.
MAX_CHANGED = 2000

Person = Callable[[str], Awaitable[object]]


@dataclass(frozen=True)
class Ledger:
    """One consistent state of the book (replaced, never changed, on updates)."""

    #: Consent/id -> its policy and the person (Patient refs) it applies to.
    policies: dict[str, tuple[Policy, frozenset[str]]] = field(default_factory=dict)
    #: Patient/id -> the policies of the person it belongs to.
    by_patient: dict[str, tuple[Policy, ...]] = field(default_factory=dict)
    actors: dict[str, ActorFacts] = field(default_factory=dict)
    related: dict[str, frozenset[str]] = field(default_factory=dict)
    #: Sorted instants at which a provision's period starts or ends.
    boundaries: tuple[str, ...] = ()
    #: The outbox position this state reflects (paging snapshots remember it).
    seq: int = 0

    @cached_property
    def by_user(self) -> bool:
        """Whether some Consent's actor names end users or their roles; if none does,
        decisions do not depend on the caller's user and role."""
        return any(a.users or a.roles for a in self.actors.values())

    @cached_property
    def filters(self) -> dict:
        """Per (accessor, type) search filters, valid until the next period boundary."""
        return {}


@dataclass(frozen=True)
class Filter:
    """The store filter of one caller and type: ``term`` (None: nothing withheld),
    built from ``visible`` (the permit formula as a term) and ``suspect`` (what it can
    withhold at all; None: anything), valid until ``until``; ``deciding``: the
    audit's reason."""

    until: str
    term: Term | None
    visible: Term | None
    suspect: Term | None
    deciding: dict[str, str]


@dataclass(frozen=True)
class Withheld:
    """The ids of one type that one caller may not see (None: more than
    :data:`MAX_WITHHELD`), as of outbox position ``seq``, valid until ``until``."""

    until: str
    seq: int
    ids: frozenset[str] | None
    #: the store term of ``ids`` (None: empty): a few inline, many as an IdSet
    term: Term | None = None


class ConsentBook:
    """The active patient-privacy Consents by person, following the store's outbox.

    Besides the Consents it counts the changes of other types (outbox events), so that
    a set of resources a caller may not see (:class:`Withheld`) is computed afresh once
    many resources were written since (the store decides those by the formula)."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        links: PatientLinks,
        person: Person,
        *,
        default: str = rules.OPT_OUT,
        enabled: bool = True,
        base: str | None = None,
    ):
        self._store = store
        self._registry = registry
        self._links = links
        self._person = person
        self._base = base
        self.default = default
        self.enabled = enabled
        self._ledger = Ledger()
        self._seq: int | None = None
        #: type -> outbox seqs of its changes, oldest first
        self._touched: dict[str, list[int]] = {}
        #: type -> the seq up to which changes of that type were forgotten
        self._forgot: dict[str, int] = {}
        self._touched_seq = 0
        #: withheld sets being computed, by key
        self.computing: dict[tuple, asyncio.Task] = {}
        self._lock = asyncio.Lock()
        self._shapes: dict[str, TypeShape] = {}

    # ------------------------------------------------------------ keeping current
    @property
    def store(self) -> Store:
        """The store the book follows."""
        return self._store

    @property
    def seq(self) -> int:
        """The outbox position the book has read up to."""
        return self._seq or 0

    async def current(self) -> Ledger:
        """The ledger with every change the outbox shows applied."""
        if self._seq is not None and not await self._changed():
            return self._ledger
        async with self._lock:
            if self._seq is None:
                await self._load()
            else:
                await self._follow()
        return self._ledger

    async def _changed(self) -> bool:
        events = await self._store.events_after(self._seq, 1000)
        if any(e.type in WATCHED for e in events):
            return True
        if events:
            self._touch(events)
            self._seq = max(self._seq, events[-1].seq)
            if len(events) == 1000:
                return await self._changed()
        return False

    def _touch(self, events: Sequence) -> None:
        """Count the changes ``events`` made, per type (see :meth:`changes_since`)."""
        for event in events:
            if event.seq <= self._touched_seq or event.type in UNFILTERED:
                continue
            self._touched_seq = event.seq
            changes = self._touched.setdefault(event.type, [])
            changes.append(event.seq)
            if len(changes) > MAX_TOUCHED:
                half = len(changes) // 2
                self._forgot[event.type] = changes[half - 1]
                del changes[:half]

    def changes_since(self, type_: str, seq: int) -> int | None:
        """How many changes of ``type_`` resources came after outbox position ``seq``
        (up to :attr:`seq`); None when some of them were forgotten."""
        if self._forgot.get(type_, -1) > seq:
            return None
        changes = self._touched.get(type_, ())
        return len(changes) - bisect.bisect_right(changes, seq)

    async def _load(self) -> None:
        """Read every Consent (at startup, or once the outbox lost track)."""
        seq = await self._store.last_event()
        policies = {}
        after = None
        while batch := await self._store.scan("Consent", after=after, limit=500):
            for version in batch:
                found = await self._policy(version)
                if found is not None:
                    policies[found[0].consent] = found
            after = batch[-1].id
        self._ledger = await self._ledger_of(policies, seq)
        self._seq = seq

    async def _follow(self) -> None:
        """Apply the outbox events since the last look: re-read a changed Consent,
        re-resolve the people a moved MPI link touches and the actors that changed."""
        ledger = self._ledger
        policies = dict(ledger.policies)
        actors, dirty = dict(ledger.actors), False
        while events := await self._store.events_after(self._seq, 1000):
            self._touch(events)
            for event in events:
                if event.type == "Consent":
                    dirty = True
                    policies.pop(f"Consent/{event.id}", None)
                    current = await self._store.read("Consent", event.id)
                    found = await self._policy(current) if current else None
                    if found is not None:
                        policies[found[0].consent] = found
                elif event.type == LINK_TYPE:
                    for consent in await self._moved(ledger, event.id):
                        if consent in policies:
                            policy = policies[consent][0]
                            policies[consent] = (policy, await self.person(policy.patient))
                            dirty = True
                elif event.type in WATCHED and actors.pop(f"{event.type}/{event.id}", None):
                    dirty = True
            self._seq = events[-1].seq
        if dirty:
            self._ledger = await self._ledger_of(policies, self._seq, actors, ledger.related)

    async def _moved(self, ledger: Ledger, member_id: str) -> set[str]:
        """The Consents filed under a person an MPI link change of ``member_id`` may
        have changed: the member's, its golden record's and its previous one's."""
        link = await self._store.read(LINK_TYPE, member_id)
        body = orjson.loads(link.body) if link is not None and link.body else {}
        refs = {f"Patient/{member_id}"}
        refs.update(f"Patient/{body[k]}" for k in ("golden", "previous") if body.get(k))
        return {p.consent for ref in refs for p in ledger.by_patient.get(ref, ())}

    async def _policy(self, version: Version) -> tuple[Policy, frozenset[str]] | None:
        if version.body is None:
            return None
        try:
            policy = rules.parse_policy(orjson.loads(version.body), f"Consent/{version.id}")
        except FhirError:  # stored before a rule tightened: read most restrictively
            policy = _unreadable(version)
        if policy is None:
            return None
        return policy, await self.person(policy.patient)

    async def person(self, patient: str) -> frozenset[str]:
        """The Patient references of the person behind ``patient`` (Patient/id)."""
        person = await self._person(patient.split("/", 1)[1])
        if person is None:
            return frozenset({patient})
        refs = {f"Patient/{person.golden}", patient}
        refs.update(f"Patient/{m}" for m in person.members)
        return frozenset(refs)

    async def _ledger_of(
        self,
        policies: dict[str, tuple[Policy, frozenset[str]]],
        seq: int,
        actors: dict[str, ActorFacts] | None = None,
        related: dict[str, frozenset[str]] | None = None,
    ) -> Ledger:
        """A ledger of ``policies``, resolving the actors and related resources not
        already known (``actors``, ``related``: what an earlier ledger resolved)."""
        by_patient: dict[str, list[Policy]] = {}
        actors = dict(actors or {})
        related = dict(related or {})
        bounds: set[str] = set()
        for policy, people in policies.values():
            for ref in people:
                by_patient.setdefault(ref, []).append(policy)
            for ref in policy.actor_refs() - actors.keys():
                found = await self.actor(ref)
                if found is not None:
                    actors[ref] = found
            for ref in policy.related_refs() - related.keys():
                related[ref] = await self._references_of(ref)
            for p in policy.provisions():
                if p.period is not None:
                    bounds.update(p.period)
        return Ledger(
            dict(policies),
            {k: tuple(v) for k, v in by_patient.items()},
            actors,
            related,
            tuple(sorted(bounds)),
            seq,
        )

    async def actor(self, ref: str) -> ActorFacts | None:
        """Who the actor ``ref`` stands for; None when a PractitionerRole, CareTeam or
        Group it names does not exist."""
        kind, id_ = ref.split("/", 1)
        if kind == "Organization":
            return ActorFacts(orgs=frozenset({ref}))
        if kind == "Practitioner":
            return ActorFacts(users=frozenset({ref}))
        found = await self._store.read(kind, id_)
        if found is None or found.body is None:
            return None
        body = orjson.loads(found.body)
        if kind == "PractitionerRole":
            org = _ref(body.get("organization"))
            users = {ref} | ({p} if (p := _ref(body.get("practitioner"))) else set())
            codes = {
                c["code"]
                for concept in body.get("code") or ()
                for c in concept.get("coding") or ()
                if isinstance(c.get("code"), str)
            }
            return ActorFacts(users=frozenset(users), roles=frozenset((c, org) for c in codes))
        if kind == "Group":
            members = [_ref(m.get("entity")) for m in body.get("member") or ()]
        else:
            members = [_ref(p.get("member")) for p in body.get("participant") or ()]
            members += [_ref(p.get("onBehalfOf")) for p in body.get("participant") or ()]
            members += [_ref(o) for o in body.get("managingOrganization") or ()]
        orgs = {m for m in members if m and m.startswith("Organization/")}
        users = {m for m in members if m and m.startswith(("Practitioner", "PractitionerRole"))}
        return ActorFacts(orgs=frozenset(orgs), users=frozenset(users))

    async def _references_of(self, ref: str) -> frozenset[str]:
        kind, id_ = ref.split("/", 1)
        found = await self._store.read(kind, id_) if kind and id_ else None
        if found is None or found.body is None:
            return frozenset()
        return frozenset(_references(orjson.loads(found.body), self._base))

    async def idle(self) -> None:
        """Wait until no withheld set is being computed (at shutdown, and for tests)."""
        while self.computing:
            await asyncio.gather(*self.computing.values(), return_exceptions=True)

    # ------------------------------------------------------------ writes
    async def validate(self, resource: dict) -> None:
        """Raise 422 if a Consent about to be stored is not a sound policy: bad
        provisions (see :func:`~hie.access.consent.parse_policy`) or a
        PractitionerRole, CareTeam or Group actor that does not exist (whose members
        are therefore unknown). Organizations and Practitioners are matched by
        reference, so a Consent may name one that has not joined yet."""
        policy = rules.parse_policy({**resource, "status": "active"}, "Consent/new")
        if policy is None:
            return
        for ref in sorted(policy.actor_refs()):
            if await self.actor(ref) is None:
                raise error(
                    422,
                    "business-rule",
                    f"The Consent names an actor that does not exist: {ref}",
                    "Consent.provision",
                )

    # ------------------------------------------------------------ per request
    async def view(self, principal: Principal) -> ConsentView | None:
        """The consent decisions of one request of ``principal``; None when consent
        is off or the caller is an administrator (not subject to it)."""
        if not self.enabled or principal.has(ADMIN):
            return None
        ledger = await self.current()
        accessor = Accessor(
            principal.organization,
            principal.purpose,
            now(),
            principal.user,
            principal.user_role,
            self.default,
        )
        glass = principal.purpose in BREAK_GLASS and principal.break_glass
        return ConsentView(self, ledger, accessor, glass)

    async def view_for(self, accessor: Accessor) -> ConsentView:
        """The decisions for an accessor other than the caller (``$consent-decision``)."""
        return ConsentView(self, await self.current(), accessor, False)

    def shape(self, type_: str) -> TypeShape:
        """What the store filter of ``type_`` needs to know about it."""
        found = self._shapes.get(type_)
        if found is None:
            params = self._registry.params(type_)
            found = self._shapes[type_] = TypeShape(
                type_,
                self._links.params(type_),
                tuple(sorted(c for c, p in params.items() if p.type == "reference")),
                care_date(self._registry, type_),
            )
        return found

    def facts(self, version: Version) -> Facts:
        """What a decision reads of a stored version."""
        body = orjson.loads(version.body)
        meta = body.get("meta") or {}
        labels = frozenset(
            (s.get("system"), s.get("code"))
            for s in meta.get("security") or ()
            if isinstance(s, dict)
        )
        shape = self.shape(version.type)
        dates: tuple[str, ...] = ()
        if shape.care_date is not None:
            param = self._registry.params(version.type)[shape.care_date]
            nodes = self._registry.extractor(version.type, shape.care_date)(body)
            dates = tuple(r.low for r in value_rows(param, shape.care_date, nodes) if r.low)
        return Facts(
            version.type,
            f"{version.type}/{version.id}",
            writer_in(body),
            labels,
            dates or (version.last_updated,),
            tuple(self._links.of(version.type, body)),
            lambda: self._reference_values(version.type, body),
        )

    def _reference_values(self, type_: str, body: dict) -> frozenset[str]:
        """The values of ``type_``'s reference parameters (what the store filter
        compares with) in ``body``."""
        params = self._registry.params(type_)
        return frozenset(
            r.text
            for code in self.shape(type_).reference_params
            for r in value_rows(
                params[code], code, self._registry.extractor(type_, code)(body), self._base
            )
            if r.text
        )


@dataclass
class ConsentView:
    """The consent decisions of one request: what its caller may see, why, and
    whether break-glass released anything. Reasons accumulate for the audit record."""

    book: ConsentBook
    ledger: Ledger
    accessor: Accessor
    break_glass: bool
    #: Reasons of the decisions taken since the last :meth:`drain` (for the audit),
    #: each with what decided (``Consent/<id>`` or a policy's name).
    reasons: dict[str, str] = field(default_factory=dict)
    #: True once break-glass released something that was withheld (the Bundle's label).
    overridden: bool = False
    #: Break-glass released something since the last :meth:`drain` (the audit's flag).
    _overrode: bool = False

    def verdict(self, version: Version) -> Verdict:
        """Whether the caller may see ``version`` and why."""
        if version.body is None or version.type in EXEMPT_TYPES:
            return Verdict("permit", "not patient data")
        facts = self.book.facts(version)
        org = self.accessor.organization
        if org is not None and facts.writer == org:
            return Verdict("permit", "permit: written by the caller's organisation", OWN)
        if not facts.patients:
            return Verdict("permit", "not patient data")
        ledger = self.ledger
        verdict = None
        for patient in facts.patients:
            policies = ledger.by_patient.get(patient)
            if policies:
                found = person_verdict(
                    policies, self.accessor, facts, ledger.actors, ledger.related
                )
            else:
                found = default_verdict(self.accessor, facts)
            if found.result != "permit":
                return found
            verdict = verdict if verdict is not None and _by_consent(verdict) else found
        return verdict

    def admit(self, version: Version) -> Version | None:
        """``version`` as the caller may see it: itself, labelled BTG when only
        break-glass releases it, or None when withheld. Records the reason."""
        verdict = self.verdict(version)
        if verdict.by is not None:
            self.reasons[verdict.reason] = verdict.by
        if verdict.result == "permit":
            return version
        if not self.break_glass:
            return None
        self.overridden = self._overrode = True
        self.reasons[f"break-glass override of: {verdict.reason}"] = verdict.by
        return _labelled(version)

    async def terms(self, type_: str, query: Sequence[Term] = ()) -> tuple[Term, ...]:
        """Store query terms leaving out what the caller may not see of the ``type_``
        resources ``query`` finds; none when nothing is left out (break-glass, audit
        records). The Consents of the patients ``query`` names are recorded.

        With the caller's :class:`Withheld` set at hand, a resource is visible when it
        is not in the set, unless it was written after the outbox position the set was
        computed at (:class:`~hie.store.query.WrittenAfter`, which the store answers
        from its outbox in the same read as the query): those the store decides by the
        permit formula. The set costs one lookup per resource, the formula many.
        Without the set (being computed, or too large), the formula decides every
        resource: restricted to the patients ``query`` names, if it names some."""
        if self.break_glass or type_ in EXEMPT_TYPES:
            return ()
        named = self._named(type_, query)
        if named is not None:
            self.note_patients(named)
        whole = self._filter(type_, None)
        self._note(whole.deciding)
        if whole.term is None:
            return ()
        formula = whole.term if named is None else self._filter(type_, named).term
        if formula is None:
            return ()
        kept = self._withheld(type_, whole)
        if kept is None:
            return (formula,)
        key = ("terms", *self._key(type_), named)
        cached = self.ledger.filters.get(key)
        if cached is not None and cached[0] is kept and cached[1] is formula:
            return cached[2]  # the same term objects: their compiled SQL is reused
        changed = WrittenAfter(kept.seq)
        terms: tuple[Term, ...] = (AnyOf((Not(changed), formula)),)
        if kept.term is not None:
            terms += (AnyOf((Not(kept.term), changed)),)
        self._keep(key, (kept, formula, terms))
        return terms

    def _withheld(self, type_: str, whole: Filter) -> Withheld | None:
        """The caller's withheld set of ``type_``; none while it is computed (in the
        background), when it is too large to be worth it, or when too much changed
        since it was computed."""
        key = ("withheld", *self._key(type_))
        kept = self.ledger.filters.get(key)
        if kept is None or kept.until < self.accessor.now:
            self._compute(key, type_, whole)
            return None
        if kept.ids is None:
            return None
        changes = self.book.changes_since(type_, kept.seq)
        if changes is None or changes > MAX_CHANGED:
            self._compute(key, type_, whole)
            return None
        if changes > MAX_CHANGED // 2:  # compute afresh before the changes pile up
            self._compute(key, type_, whole)
        return kept

    def _compute(self, key: tuple, type_: str, whole: Filter) -> None:
        """Compute the caller's withheld set of ``type_`` in the background (once)."""
        book = self.book
        if key in book.computing:
            return
        seq = book.seq

        async def compute() -> None:
            try:
                ids = await self._decide(type_, whole)
                term = None
                if ids:
                    term = IdSet(ids) if len(ids) > INLINE_IDS else IdIn(tuple(sorted(ids)))
                self._keep(key, Withheld(whole.until, seq, ids, term))
            except Exception:
                log.exception("computing a withheld set of %s failed", type_)
            finally:
                book.computing.pop(key, None)

        book.computing[key] = asyncio.create_task(compute())

    async def _decide(self, type_: str, whole: Filter) -> frozenset[str] | None:
        """The ids of the ``type_`` resources the caller may not see, by the store's
        filter; None when more than :data:`MAX_WITHHELD`."""
        query: tuple[Term, ...] = (Not(whole.visible),)
        if whole.suspect is not None:
            query = (whole.suspect, *query)
        found = await self.book.store.any_ids(type_, query, limit=MAX_WITHHELD + 1)
        return frozenset(found) if len(found) <= MAX_WITHHELD else None

    def _key(self, type_: str) -> tuple:
        """What the caller's filters and withheld sets of ``type_`` are kept under: the
        same for every user of a member unless some Consent names users or roles."""
        acc = self.accessor
        user, role = (acc.user, acc.user_role) if self.ledger.by_user else (None, None)
        return (acc.organization, acc.purpose, user, role, acc.default, type_)

    def _filter(self, type_: str, named: frozenset[str] | None) -> Filter:
        """The consent formula of ``type_`` for the caller as a store filter (about
        the ``named`` patients only, when given)."""
        ledger, acc = self.ledger, self.accessor
        key = self._key(type_)
        cached = ledger.filters.get((*key, named))
        if cached is not None and cached.until >= acc.now:
            return cached
        groups, consents = self._groups(key, type_)
        consented = frozenset(p for refs in groups.values() for p in refs)
        shape = self.book.shape(type_)
        name = rules.default_name(acc)
        # Which Consent left out which resource is not known without deciding each
        # one: the record names the filter, the default and how many Consents shaped it.
        deciding = {
            f"search filtered in the store by the {name} and {len(consents)} Consents "
            "that differ from it for this caller": name
        }
        if named is None:
            formula = visible_formula(acc, groups, consented)
            suspects = rules.suspects(acc, consented)
        else:  # only the named patients' Consents; other patients with Consents: withheld
            mine = {f: refs & named for f, refs in groups.items() if refs & named}
            formula = visible_formula(acc, mine, consented, consented - named, named)
            suspects = rules.TRUE  # a few patients' resources: no prefilter
        term = visible = suspect = None
        if formula != rules.TRUE and suspects != rules.FALSE:
            term = visible = to_term(formula, shape, MEMBER_TAG_SYSTEM)
        if term is not None and suspects != rules.TRUE:
            # Only suspects can be withheld: "not a suspect" settles most resources
            # with one lookup in a small set, before the full decision.
            suspect = to_term(suspects, shape, MEMBER_TAG_SYSTEM)
            term = AnyOf((Not(suspect), term))
        found = Filter(_next_boundary(ledger.boundaries, acc.now), term, visible, suspect, deciding)
        self._keep((*key, named), found)
        return found

    def _groups(self, key: tuple, type_: str) -> tuple[dict[Formula, frozenset[str]], set[str]]:
        """The patients whose Consents give ``type_`` resources another permit formula
        than the default's for this caller, by formula, and those Consents."""
        ledger, acc = self.ledger, self.accessor
        cached = ledger.filters.get(key)
        if cached is not None and cached[0] >= acc.now:
            return cached[1]
        groups: dict[Formula, set[str]] = {}
        consents: set[str] = set()
        default = rules.default_formula(acc)
        per_person: dict[tuple[str, ...], Formula] = {}
        for patient, policies in ledger.by_patient.items():
            person = tuple(p.consent for p in policies)
            formula = per_person.get(person)
            if formula is None:
                formula = per_person[person] = rules.permit_formula(
                    policies, acc, type_, ledger.actors, ledger.related
                )
            if formula != default:
                groups.setdefault(formula, set()).add(patient)
                consents.update(p.consent for p in policies)
        found = ({f: frozenset(r) for f, r in groups.items()}, consents)
        self._keep(key, (_next_boundary(ledger.boundaries, acc.now), found))
        return found

    def _keep(self, key: tuple, value: tuple) -> None:
        filters = self.ledger.filters
        if len(filters) >= MAX_FILTERS:  # per caller, purpose, user, type (and patients)
            filters.clear()
        filters[key] = value

    def _note(self, reasons: dict[str, str]) -> None:
        self.reasons.update(reasons)

    def note_patients(self, refs: Iterable[str]) -> None:
        """Record the Consents of patients a search or operation names (the audit
        record of a search then says which Consents applied to them)."""
        for ref in refs:
            for policy in self.ledger.by_patient.get(ref, ()):
                self.reasons[f"{policy.consent} applies to {ref}"] = policy.consent

    def _named(self, type_: str, query: Sequence[Term]) -> frozenset[str] | None:
        """The patients (Patient/id) ``query`` restricts ``type_`` resources to: each
        of its terms that names patients (ids of a Patient search, references of the
        type's patient parameters, alternatives of those) narrows them; None when
        no term does."""
        params = set(self.book.shape(type_).patient_params)
        named = None
        for term in query:
            found = _patients_of(type_, term, params)
            if found is not None:
                named = found if named is None else named & found
        if named is None:
            return None
        people = set(named)  # with the person's other records (as :mdm widens to)
        for ref in named:
            for policy in self.ledger.by_patient.get(ref, ()):
                people |= self.ledger.policies[policy.consent][1]
        return frozenset(people)

    def drain(self) -> tuple[dict[str, str], bool]:
        """The reasons recorded since the last call, and whether break-glass released
        anything meanwhile (for one audit record)."""
        out, overrode = self.reasons, self._overrode
        self.reasons, self._overrode = {}, False
        return out, overrode


def _next_boundary(boundaries: Sequence[str], instant: str) -> str:
    """The first period boundary after ``instant`` (the far future if none)."""
    n = bisect.bisect_right(boundaries, instant)
    return boundaries[n] if n < len(boundaries) else "9999-12-31T23:59:59.999999Z"


def _labelled(version: Version) -> Version:
    body = orjson.loads(version.body)
    meta = body.setdefault("meta", {})
    meta["security"] = [*(meta.get("security") or []), BREAK_GLASS_LABEL]
    return replace(version, body=orjson.dumps(body))


def _ref(value: object) -> str | None:
    ref = value.get("reference") if isinstance(value, dict) else None
    return ref if isinstance(ref, str) else None


def _references(value: object, base: str | None) -> Iterable[str]:
    """Every ``reference`` inside a resource, as ``Type/id``."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                yield reference_key(item, base)
            else:
                yield from _references(item, base)
    elif isinstance(value, list):
        for item in value:
            yield from _references(item, base)


def _unreadable(version: Version) -> Policy | None:
    """A stored Consent that no longer parses (written before a rule tightened): if it
    names a patient it denies everything for that patient, the most restrictive
    reading; otherwise it is ignored."""
    body = orjson.loads(version.body)
    if body.get("status") != "active" or not rules.is_privacy(body):
        return None
    ref = _ref(body.get("patient"))
    if ref is None or not ref.startswith("Patient/"):
        return None
    return Policy(f"Consent/{version.id}", ref, rules.Provision("1", "deny"))


def _by_consent(verdict: Verdict) -> bool:
    return verdict.by is not None and verdict.by.startswith("Consent/")


def _patients_of(type_: str, term: Term, params: set[str]) -> frozenset[str] | None:
    """The patients a query term restricts to, or None if it restricts to none."""
    if isinstance(term, IdIn) and type_ == "Patient":
        return frozenset(f"Patient/{i}" for i in term.ids)
    if isinstance(term, SamePerson) and (term.param in params or term.param is None):
        return frozenset(f"Patient/{i}" for i in term.ids)
    if isinstance(term, AnyOf) and term.terms:
        parts = [_patients_of(type_, t, params) for t in term.terms]
        return None if None in parts else frozenset().union(*parts)
    if isinstance(term, Match) and term.param in params:
        for cond in term.conds:
            if cond.column == "text" and cond.op == "eq" and isinstance(cond.value, str):
                return frozenset({cond.value})
            if cond.column == "text" and cond.op == "in":
                return frozenset(v for v in cond.value if isinstance(v, str))
    return None
