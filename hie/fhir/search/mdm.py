"""MDM expansion: searching a person's data across all of their Patient records.

The master patient index links the Patient records members keep of one person to a
golden record (:mod:`hie.mpi`). ``Observation?subject:mdm=Patient/1`` (as HAPI FHIR's
MDM expansion) means ``subject`` is any Patient of the person behind ``Patient/1``:
the golden record and every member record. The parser cannot ask the index (parsing
is synchronous), so it leaves a :class:`SamePerson` placeholder in the query, and the
search engine replaces it with :func:`expand` before the store sees the query, every
time the query runs (a later page of a search sees the links as they are then). A
Patient the index does not know expands to itself.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from hie.store.query import AnyOf, Chain, Cond, Has, IdIn, Match, Not, Query

#: The modifier (``subject:mdm=``; ``_id:mdm=`` on Patient).
MDM = "mdm"
#: Patients one ``:mdm`` parameter may name (each costs an index lookup).
MAX_VALUES = 100


class Person(Protocol):
    """The person behind a Patient id, as the MPI knows it."""

    golden: str
    members: Collection[str]


#: ``async persons(patient_id) -> Person | None`` (None: the id is not indexed).
Persons = Callable[[str], Awaitable[Person | None]]


@dataclass(frozen=True, slots=True)
class SamePerson:
    """Placeholder term: reference parameter ``param`` points at a Patient of the
    person behind one of ``ids`` (``param`` None: the resource is such a Patient).
    ``literal`` holds reference forms also matched as given (an absolute URL)."""

    param: str | None
    ids: tuple[str, ...]
    literal: tuple[str, ...] = ()


def has_placeholder(query: Query) -> bool:
    """Whether ``query`` (at any depth) needs :func:`expand`."""
    return any(_has_kept(term) for term in query)


#: Compound terms already walked, by identity (with the term, so that its id is not
#: reused): a caller's consent filter is one large term added to each of its searches.
_WALKED: OrderedDict[int, tuple[object, bool]] = OrderedDict()
_WALKED_MAX = 4096


def _has_kept(term) -> bool:
    """:func:`_has` of a query's term, kept for compound terms."""
    if not isinstance(term, AnyOf | Not):
        return _has(term)
    found = _WALKED.get(id(term))
    if found is not None and found[0] is term:
        return found[1]
    result = _has(term)
    _WALKED[id(term)] = (term, result)
    if len(_WALKED) > _WALKED_MAX:
        _WALKED.popitem(last=False)
    return result


def _has(term) -> bool:
    if isinstance(term, SamePerson):
        return True
    if isinstance(term, AnyOf):
        return any(_has(t) for t in term.terms)
    if isinstance(term, Not):
        return _has(term.term)
    if isinstance(term, Chain | Has):
        return has_placeholder(term.query)
    return False


async def expand(
    query: Query, persons: Persons | None, cache: dict[str, tuple[str, ...]] | None = None
) -> Query:
    """``query`` with every :class:`SamePerson` replaced by the store term matching all
    the person's Patients. ``cache`` (id -> Patient ids) spares repeated lookups across
    the queries of one search."""
    if not has_placeholder(query):
        return query
    cache = {} if cache is None else cache

    async def records(id_: str) -> tuple[str, ...]:
        found = cache.get(id_)
        if found is None:
            person = await persons(id_) if persons is not None else None
            ids = {id_} if person is None else {id_, person.golden, *person.members}
            found = cache[id_] = tuple(sorted(ids))
        return found

    async def term(t, top: bool = False):
        # without a SamePerson term, kept as it is: the same object (stores cache by identity)
        if not (_has_kept(t) if top else _has(t)):
            return t
        if isinstance(t, SamePerson):
            ids: dict[str, None] = {}
            for id_ in t.ids:
                ids.update(dict.fromkeys(await records(id_)))
            if t.param is None:
                return IdIn(tuple(ids))
            refs = tuple(f"Patient/{i}" for i in ids) + t.literal
            return Match(t.param, (Cond("text", "in", refs),))
        if isinstance(t, AnyOf):
            return AnyOf(tuple([await term(x) for x in t.terms]))
        if isinstance(t, Not):
            return Not(await term(t.term))
        if isinstance(t, Chain):
            return Chain(t.param, t.target, await expand(t.query, persons, cache))
        if isinstance(t, Has):
            return Has(t.type, t.param, await expand(t.query, persons, cache))
        return t

    return tuple([await term(t, top=True) for t in query])
