"""Search parameters: which exist for a type, and parsing a search URL into a store
:data:`~hie.store.query.Query`.

This is the minimal engine the REST core needs (``_id``, ``identifier``,
``_lastUpdated``, used by conditional interactions and type-level search). The full
engine replaces :func:`params_for` with a registry built from the official R4
SearchParameter definitions and adds value kinds; :func:`parse_search` and the
extraction in :mod:`hie.fhir.search.extract` are its seams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from hie.fhir.errors import error
from hie.fhir.search.dates import date_range, fmt
from hie.fhir.types import model
from hie.fhir.validation import small_int
from hie.store.query import AnyOf, Cond, IdIn, Match, Not, Query, Term

DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
#: Parameters that shape the result rather than select resources.
RESULT_PARAMS = frozenset({"_count", "_offset", "_summary", "_elements", "_format", "_pretty"})


@dataclass(frozen=True, slots=True)
class SearchParam:
    """A search parameter as the CapabilityStatement declares it."""

    name: str
    type: str
    documentation: str
    modifiers: tuple[str, ...] = ()


ID = SearchParam("_id", "token", "Logical id of the resource")
LAST_UPDATED = SearchParam("_lastUpdated", "date", "When the resource version last changed")
IDENTIFIER = SearchParam(
    "identifier", "token", "A business identifier of the resource", ("missing", "not")
)


def params_for(type_: str) -> dict[str, SearchParam]:
    """The search parameters supported on ``type_``."""
    out = {"_id": ID, "_lastUpdated": LAST_UPDATED}
    if "identifier" in model(type_).model_fields:
        out["identifier"] = IDENTIFIER
    return out


@dataclass
class SearchRequest:
    """A parsed search: the store query, paging and the parameters actually used."""

    query: Query
    count: int
    offset: int = 0
    used: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def parse_search(
    type_: str,
    items: Sequence[tuple[str, str]],
    *,
    default_count: int,
    max_count: int,
    strict: bool,
) -> SearchRequest:
    """Parse URL query items into a :class:`SearchRequest`.

    Unknown parameters are ignored (and reported in ``ignored``) unless ``strict``,
    as FHIR's ``Prefer: handling`` prescribes; malformed values are always a 400.
    """
    known = params_for(type_)
    terms: list[Term] = []
    req = SearchRequest((), default_count)
    for key, value in items:
        name, _, modifier = key.partition(":")
        if name in RESULT_PARAMS:
            if name == "_count":
                req.count = min(non_negative(key, value), max_count)
            elif name == "_offset":
                req.offset = non_negative(key, value)
            req.used.append((key, value))
            continue
        param = known.get(name)
        if param is None:
            if strict:
                raise error(400, "not-supported", f"Unknown search parameter {name!r} for {type_}")
            req.ignored.append(key)
            continue
        if modifier and modifier not in param.modifiers:
            raise error(400, "not-supported", f"Unsupported modifier {key!r}")
        terms.append(_term(param, modifier, value))
        req.used.append((key, value))
    req.query = tuple(terms)
    return req


def non_negative(key: str, value: str) -> int:
    """A paging parameter's value; 400 unless 1-9 ASCII digits."""
    number = small_int(value)
    if number is None:
        raise error(400, "invalid", f"{key} must be a non-negative integer, got {value!r}")
    return number


def _split(value: str, sep: str, maxsplit: int = -1) -> list[str]:
    """Split on unescaped ``sep`` (FHIR escapes ``,``, ``|``, ``$`` and ``\\`` with
    ``\\``), keeping the escapes in the pieces."""
    parts, start, i = [], 0, 0
    while i < len(value) and maxsplit != 0:
        if value[i] == "\\":
            i += 2
            continue
        if value[i] == sep:
            parts.append(value[start:i])
            start = i + 1
            maxsplit -= 1
        i += 1
    parts.append(value[start:])
    return parts


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)


def _term(param: SearchParam, modifier: str, value: str) -> Term:
    if modifier == "missing":
        if value not in ("true", "false"):
            raise error(400, "invalid", f"{param.name}:missing takes true or false")
        present = Match(param.name, ())
        return Not(present) if value == "true" else present
    if param.name == "_id":
        ids = tuple(_unescape(v) for v in _split(value, ",") if v)
        if not ids:
            raise error(400, "invalid", "_id needs a value")
        return IdIn(ids)
    raw_values = [v for v in _split(value, ",") if v]
    if not raw_values:
        raise error(400, "invalid", f"Search parameter {param.name} needs a value")
    if param.type == "token":
        alternatives = tuple(_token_match(param.name, raw) for raw in raw_values)
    else:
        alternatives = tuple(_date_term(param.name, _unescape(raw)) for raw in raw_values)
    term = alternatives[0] if len(alternatives) == 1 else AnyOf(alternatives)
    return Not(term) if modifier == "not" else term


def _token_match(name: str, raw: str) -> Match:
    pieces = [_unescape(p) or None for p in _split(raw, "|", 1)]
    system, code = pieces if len(pieces) == 2 else (None, pieces[0])
    conds: list[Cond] = []
    if len(pieces) == 2:
        conds.append(Cond("system", "null") if system is None else Cond("system", "eq", system))
    if code is not None:
        conds.append(Cond("text", "eq", code))
    if not conds:
        raise error(400, "invalid", f"Empty token value for {name}")
    return Match(name, tuple(conds))


def _date_term(name: str, raw: str) -> Term:
    prefix = raw[:2] if raw[:2] in DATE_PREFIXES else "eq"
    text = raw[2:] if raw[:2] in DATE_PREFIXES else raw
    try:
        low, high = date_range(text)
    except ValueError:
        raise error(400, "invalid", f"Invalid date {raw!r} for {name}") from None
    contained = Match(name, (Cond("low", "ge", low), Cond("high", "le", high)))
    match prefix:
        case "eq":
            return contained
        case "ne":
            return Not(contained)
        case "gt":
            return Match(name, (Cond("high", "gt", high),))
        case "lt":
            return Match(name, (Cond("low", "lt", low),))
        case "ge":
            return AnyOf((Match(name, (Cond("high", "gt", high),)), contained))
        case "le":
            return AnyOf((Match(name, (Cond("low", "lt", low),)), contained))
        case "sa":
            return Match(name, (Cond("low", "gt", high),))
        case "eb":
            return Match(name, (Cond("high", "lt", low),))
    # ap: overlap with the value widened by 10% of its distance from now (FHIR's advice).
    lo_dt = datetime.strptime(low, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    hi_dt = datetime.strptime(high, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    slack = abs(datetime.now(UTC) - lo_dt) / 10
    return Match(
        name, (Cond("low", "le", fmt(hi_dt + slack)), Cond("high", "ge", fmt(lo_dt - slack)))
    )
