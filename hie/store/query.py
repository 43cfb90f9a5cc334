"""The store-level query language: index rows and predicates over them.

The FHIR search layer (``hie.fhir.search``) extracts :class:`IndexRow` values from
each resource at write time and translates search URLs into a :data:`Query`. A store
evaluates a query over index rows only. The language is deliberately small so that
both adapters translate it directly (SQL ``EXISTS`` subqueries, MongoDB
``$elemMatch``):

* :class:`Match`: some index row of ``param`` satisfies every condition;
* :class:`IdIn`: the logical id is one of ``ids``;
* :class:`AnyOf`: at least one term holds (FHIR's comma, OR);
* :class:`Not`: the term does not hold (FHIR's ``:not`` and ``ne``);
* a :data:`Query` is a tuple of terms that must all hold (FHIR's ``&``, AND).

Column meanings by parameter kind: tokens use ``system`` and ``text`` (the code);
strings, uris and references use ``text`` (normalised; ``Type/id`` for references);
dates use ``low``/``high``, ISO-8601 UTC instants with microseconds, which compare
correctly as strings.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

Column = Literal["system", "text", "low", "high"]
Op = Literal["eq", "lt", "le", "gt", "ge", "prefix", "null"]
COLUMNS: tuple[Column, ...] = ("system", "text", "low", "high")


@dataclass(frozen=True, slots=True)
class IndexRow:
    """One extracted search value of a resource."""

    param: str
    system: str | None = None
    text: str | None = None
    low: str | None = None
    high: str | None = None


@dataclass(frozen=True, slots=True)
class Cond:
    """A comparison on one column of an index row.

    ``op="null"`` tests that the column is absent (``value`` is ignored);
    ``op="prefix"`` tests that the column starts with ``value``.
    """

    column: Column
    op: Op
    value: str | None = None


@dataclass(frozen=True, slots=True)
class Match:
    """Some index row for ``param`` satisfies all ``conds``."""

    param: str
    conds: tuple[Cond, ...]


@dataclass(frozen=True, slots=True)
class IdIn:
    """The resource's logical id is one of ``ids``."""

    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    """At least one of ``terms`` holds."""

    terms: tuple[Term, ...]


@dataclass(frozen=True, slots=True)
class Not:
    """``term`` does not hold."""

    term: Term


Term = Match | IdIn | AnyOf | Not
Query = tuple[Term, ...]


_COMPARE = {
    "eq": operator.eq,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "prefix": str.startswith,
}


def row_matches(row: IndexRow, conds: tuple[Cond, ...]) -> bool:
    """Evaluate ``conds`` on one row in Python (reference semantics for adapters)."""
    for cond in conds:
        have = getattr(row, cond.column)
        if cond.op == "null":
            if have is not None:
                return False
        elif have is None or not _COMPARE[cond.op](have, cond.value):
            return False
    return True
