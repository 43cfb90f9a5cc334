"""The store-level query language: index rows and predicates over them.

The FHIR search layer (``hie.fhir.search``) extracts :class:`IndexRow` values from
each resource at write time and translates search URLs into a :data:`Query`. A store
evaluates a query over index rows only, never over resource JSON. The language is
small so that both adapters translate it directly (SQL subqueries, MongoDB
``$elemMatch``):

* :class:`Match`: some index row of ``param`` satisfies every condition;
* :class:`IdIn`: the logical id is one of ``ids``;
* :class:`AnyOf`: at least one term holds (FHIR's comma, OR);
* :class:`Not`: the term does not hold (FHIR's ``:not``, ``ne`` and ``:missing``);
* :class:`Chain`: a reference row of ``param`` points at a current resource of type
  ``target`` that matches a nested query (FHIR's chaining ``subject.name=``);
* :class:`Has`: some current resource of another type that matches a nested query
  refers to this resource through one of its reference rows (FHIR's ``_has``);
* :class:`WrittenAfter`: the resource was written after a position of the outbox
  (the consent engine decides such resources afresh beside a kept set);
* a :data:`Query` is a tuple of terms that must all hold (FHIR's ``&``, AND).

Column meanings by parameter kind:

* token: ``system`` and ``text`` (the code or identifier value; ``text`` holds the
  display text in rows of the ``{param}:text`` pseudo-parameter);
* string: ``text``, normalised (case, width, accents and Chinese script folded);
* uri: ``text`` as is;
* reference: ``text`` as ``Type/id`` (or the absolute URL for references to other
  servers, or ``#id`` for contained ones); ``system`` holds the reference's target
  type when known;
* date: ``low``/``high``, ISO-8601 UTC instants with microseconds, which compare
  correctly as strings (``None`` for an open end of a Period is stored as the
  extreme instants ``0001-...``/``9999-...``);
* number and quantity: ``nlow``/``nhigh``, the interval implied by the value's
  precision, as floats; a quantity's ``system``/``text`` are its unit system and code
  (and a second row carries the UCUM canonical value and unit);
* composite: ``parts`` holds one row per component, in the parameter's component
  order; a :class:`Cond` addresses component ``k`` with ``part=k``.

Sort keys: for :class:`Sort` the stores order ascending by the smallest of a
parameter's values and descending by the largest, where a row's value is the first
non-null of (``low``, ``nlow``, ``text``) for ascending and of (``high``, ``nhigh``,
``text``) for descending. Resources without a value sort last in both directions.
``_id`` and ``_lastUpdated`` sort by the resource's id and last-updated instant.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

Column = Literal["system", "text", "low", "high", "nlow", "nhigh"]
Op = Literal["eq", "ne", "lt", "le", "gt", "ge", "prefix", "contains", "null", "in", "nin"]
COLUMNS: tuple[Column, ...] = ("system", "text", "low", "high", "nlow", "nhigh")
#: Value columns that hold text (compared as strings) and numbers (compared as floats).
TEXT_COLUMNS = frozenset({"system", "text", "low", "high"})
NUMBER_COLUMNS = frozenset({"nlow", "nhigh"})


@dataclass(frozen=True, slots=True)
class IndexRow:
    """One extracted search value of a resource."""

    param: str
    system: str | None = None
    text: str | None = None
    low: str | None = None
    high: str | None = None
    nlow: float | None = None
    nhigh: float | None = None
    #: Components of a composite parameter's value, in component order.
    parts: tuple[IndexRow, ...] = ()


@dataclass(frozen=True, slots=True)
class Cond:
    """A comparison on one column of an index row (or of its component ``part``).

    ``op="null"`` tests that the column is absent (``value`` is ignored);
    ``op="prefix"``/``"contains"`` test substring positions on text columns (exact
    case: the extractor already folded case); ``op="in"`` tests membership in the
    tuple ``value`` and ``"nin"`` a present value outside it; ``"ne"`` is true for a
    present value that differs.
    """

    column: Column
    op: Op
    value: str | float | tuple | None = None
    part: int | None = None


@dataclass(frozen=True, slots=True)
class Match:
    """Some index row for ``param`` satisfies all ``conds``."""

    param: str
    conds: tuple[Cond, ...]


@dataclass(frozen=True, slots=True)
class IdIn:
    """The resource's logical id is one of ``ids``."""

    ids: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class IdSet:
    """The resource's logical id is in ``ids``: a large set that many queries reuse.
    Compared by identity, so that a store may keep it between queries (the embedded
    store as a temporary table of each connection): build a new one when it changes."""

    ids: frozenset[str]


@dataclass(frozen=True, slots=True)
class WrittenAfter:
    """The resource has a version written after outbox position ``seq`` (an outbox
    event with a greater sequence number), in the same read as the rest of the query."""

    seq: int


@dataclass(frozen=True, slots=True)
class AnyOf:
    """At least one of ``terms`` holds."""

    terms: tuple[Term, ...]


@dataclass(frozen=True, slots=True)
class Not:
    """``term`` does not hold."""

    term: Term


@dataclass(frozen=True, slots=True)
class Chain:
    """Some ``param`` row's ``text`` is ``f"{target}/{id}"`` for a current, non-deleted
    resource ``target/id`` that matches ``query``."""

    param: str
    target: str
    query: Query


@dataclass(frozen=True, slots=True)
class Has:
    """Some current, non-deleted resource of ``type`` that matches ``query`` has a
    ``param`` row whose ``text`` is ``f"{T}/{id}"`` of the resource being tested."""

    type: str
    param: str
    query: Query


@dataclass(frozen=True, slots=True)
class Sort:
    """One sort key: a parameter name (or ``_id``/``_lastUpdated``) and direction."""

    param: str
    descending: bool = False


Term = Match | IdIn | IdSet | WrittenAfter | AnyOf | Not | Chain | Has
Query = tuple[Term, ...]


_COMPARE = {
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "prefix": str.startswith,
    "contains": operator.contains,
    "in": lambda have, values: have in values,
    "nin": lambda have, values: have not in values,
}


def row_matches(row: IndexRow, conds: tuple[Cond, ...]) -> bool:
    """Evaluate ``conds`` on one row in Python (reference semantics for adapters)."""
    for cond in conds:
        target = row if cond.part is None else _part(row, cond.part)
        if target is None:
            return False
        have = getattr(target, cond.column)
        if cond.op == "null":
            if have is not None:
                return False
        elif have is None or not _COMPARE[cond.op](have, cond.value):
            return False
    return True


def _part(row: IndexRow, k: int) -> IndexRow | None:
    return row.parts[k] if k < len(row.parts) else None
