"""Parsing a FHIR search URL into a store :data:`~hie.store.query.Query` and the
result parameters that shape the answer.

Everything the R4 search page defines for parameter values is handled here: ``,``
(OR) and repeated parameters (AND), ``\\`` escapes, prefixes, modifiers, chaining
(``subject:Patient.name=``, any depth), reverse chaining (``_has``, nested),
composite values (``a$b``), ``:missing`` and ``:mdm`` (a Patient reference widened to
every Patient record of the same person, see :mod:`hie.fhir.search.mdm`). Parameter
definitions come from the :class:`~hie.fhir.search.registry.Registry`; the index rows
they are compared with come from :mod:`hie.fhir.search.extract`, whose
pseudo-parameters (``p:text``, ``p:of-type``, ``p:identifier``, ``p#canonical``) the
modifiers use.

Malformed values, unknown modifiers and impossible chains are a 400 naming the
parameter; unknown parameters are ignored and reported (``Prefer: handling=lenient``)
or a 400 (``handling=strict``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from hie.fhir.errors import error
from hie.fhir.search import text as textfold
from hie.fhir.search import units
from hie.fhir.search.dates import date_range, fmt
from hie.fhir.search.extract import UCUM, reference_key
from hie.fhir.search.mdm import MAX_VALUES, MDM, SamePerson
from hie.fhir.search.registry import ParamDef, Registry, default_registry
from hie.fhir.types import served_types
from hie.fhir.validation import small_int, valid_id
from hie.store import JOURNAL_TYPES
from hie.store.query import AnyOf, Chain, Cond, Has, IdIn, Match, Not, Query, Sort, Term

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
#: Parameters that shape the result rather than select resources.
RESULT_PARAMS = frozenset(
    {
        "_count",
        "_offset",
        "_summary",
        "_elements",
        "_format",
        "_pretty",
        "_sort",
        "_total",
        "_include",
        "_revinclude",
    }
)
#: Modifiers supported per parameter type (``missing`` applies to all).
MODIFIERS = {
    "string": ("missing", "exact", "contains"),
    "token": ("missing", "not", "text", "of-type"),
    "reference": ("missing", "identifier", MDM),  # plus :Type; :mdm if it can be a Patient
    "date": ("missing",),
    "number": ("missing",),
    "quantity": ("missing",),
    "uri": ("missing", "below", "above"),
    "composite": ("missing",),
    "special": (),
}
#: Chains deeper than this are refused (each level is a nested store query).
MAX_CHAIN_DEPTH = 4
TOTAL_MODES = ("none", "estimate", "accurate")


@dataclass(frozen=True, slots=True)
class Include:
    """An ``_include``/``_revinclude`` directive: ``source:param[:target]`` or ``*``."""

    source: str
    param: str  # "*" for all reference parameters
    target: str | None
    iterate: bool
    reverse: bool


@dataclass
class SearchRequest:
    """A parsed search: the store query, result parameters and what was applied."""

    query: Query
    count: int
    offset: int = 0
    sort: tuple[Sort, ...] = ()
    #: ``_total`` as asked; None: exact when the search completes in one snapshot.
    total: str | None = None
    includes: list[Include] = field(default_factory=list)
    #: The resource types searched (one, or several at system/compartment level).
    types: list[str] = field(default_factory=list)
    used: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def parse_search(
    type_: str | None,
    items: Sequence[tuple[str, str]],
    *,
    default_count: int,
    max_count: int,
    strict: bool,
    registry: Registry | None = None,
    types: Sequence[str] | None = None,
    base: str | None = None,
) -> SearchRequest:
    """Parse URL query items into a :class:`SearchRequest`.

    ``type_`` is the searched type; for a system-level search it is None and
    ``types`` lists the types searched (only parameters they all share apply).
    """
    parser = _Parser(registry or default_registry(), strict, base)
    req = SearchRequest((), default_count)
    terms: list[Term] = []
    scope = [type_] if type_ else list(types or ())
    req.types = scope
    for key, value in items:
        name, _, modifier = key.partition(":")
        if name in RESULT_PARAMS:
            parser.result_param(req, scope, name, modifier, key, value, max_count)
            req.used.append((key, value))
            continue
        if name == "_type" and type_ is None:
            continue
        if type_ is None:
            term = parser.system_term(scope, key, value)
        else:
            term = parser.term(type_, key, value, depth=0)
        if term is None:
            req.ignored.append(key)
            continue
        terms.append(term)
        req.used.append((key, value))
    req.query = tuple(terms)
    return req


def non_negative(key: str, value: str) -> int:
    """A paging parameter's value; 400 unless 1-9 ASCII digits."""
    number = small_int(value)
    if number is None:
        raise error(400, "invalid", f"{key} must be a non-negative integer, got {value!r}")
    return number


def split(value: str, sep: str, maxsplit: int = -1) -> list[str]:
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


def unescape(text: str) -> str:
    """Remove FHIR search escapes (``\\,`` ``\\|`` ``\\$`` ``\\\\``)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)


def bad(key: str, message: str):
    """A 400 OperationOutcome about search parameter ``key``."""
    return error(400, "invalid", f"Search parameter {key!r}: {message}")


class _Parser:
    def __init__(self, registry: Registry, strict: bool, base: str | None):
        self.registry = registry
        self.strict = strict
        self.base = base

    # ------------------------------------------------------------- criteria
    def term(self, type_: str, key: str, value: str, depth: int) -> Term | None:
        """The term for ``key=value`` on ``type_``; None if ignored (lenient)."""
        if key.startswith("_has:"):
            return self.has(type_, key, value, depth)
        head, dot, rest = key.partition(".")
        name, _, modifier = head.partition(":")
        param = self.registry.params(type_).get(name)
        if param is None or param.type == "special":
            return self.unknown(type_, key, name)
        if dot:
            return self.chain(type_, key, param, modifier, rest, value, depth)
        return self.simple(type_, key, param, modifier, value)

    def unknown(self, type_: str, key: str, name: str) -> None:
        if self.strict or name == "_has":
            raise error(400, "not-supported", f"Unknown search parameter {name!r} for {type_}")
        return None

    def simple(self, type_: str, key: str, param: ParamDef, modifier: str, value: str) -> Term:
        if modifier == MDM:
            return self.mdm(type_, key, param, value)
        if modifier == "missing":
            if value not in ("true", "false"):
                raise bad(key, "the :missing modifier takes true or false")
            present = Match(param.code, ())
            if param.code == "_id":
                return IdIn(()) if value == "true" else Not(IdIn(()))
            return Not(present) if value == "true" else present
        if modifier and not self.modifier_ok(type_, param, modifier):
            raise error(400, "not-supported", f"Unsupported modifier in {key!r}")
        values = split(value, ",")
        if not value or any(v == "" for v in values):
            raise bad(key, "empty value")
        if param.code == "_id":
            ids = tuple(unescape(v) for v in values)
            if any(not valid_id(i) for i in ids):
                raise bad(key, "not a valid resource id")
            return Not(IdIn(ids)) if modifier == "not" else IdIn(ids)
        if modifier == "not":  # token: none of the codes
            return Not(_any(tuple(self.value_term(type_, key, param, "", v) for v in values)))
        return _any(tuple(self.value_term(type_, key, param, modifier, v) for v in values))

    def mdm(self, type_: str, key: str, param: ParamDef, value: str) -> SamePerson:
        """``:mdm``: the Patients named, widened by the engine to each one's person."""
        if param.code == "_id":
            if type_ != "Patient":
                raise bad(key, "_id:mdm applies to Patient searches only")
        elif param.type != "reference":
            raise bad(
                key,
                ":mdm applies to references to a Patient (and to Patient's _id), "
                f"not to the {param.type} parameter {param.code}",
            )
        elif not may_be_patient(param):
            raise bad(
                key, f"{type_}.{param.code} cannot refer to a Patient, so :mdm does not apply"
            )
        values = split(value, ",")
        if not value or any(v == "" for v in values):
            raise bad(key, "empty value")
        if len(values) > MAX_VALUES:
            raise bad(key, f":mdm takes at most {MAX_VALUES} Patients")
        ids: dict[str, None] = {}
        literal: dict[str, None] = {}
        for raw in values:
            reference = unescape(raw)
            if "://" in reference:
                url = reference.split("|", 1)[0]
                local = reference_key(url, self.base)
                if local == url:
                    raise bad(key, f"{reference!r} is not a Patient on this server")
                literal[url] = None
                reference = local
            elif "/" in reference:
                reference = reference_key(reference)
            else:
                reference = f"Patient/{reference}"
            kind, _, id_ = reference.partition("/")
            if kind != "Patient" or not valid_id(id_):
                raise bad(key, f"{unescape(raw)!r} is not a Patient reference or id")
            ids[id_] = None
        if param.code == "_id":
            return SamePerson(None, tuple(ids))
        return SamePerson(param.code, tuple(ids), tuple(literal))

    def modifier_ok(self, type_: str, param: ParamDef, modifier: str) -> bool:
        if modifier in MODIFIERS.get(param.type, ()):
            return True
        return param.type == "reference" and modifier in self.targets(param)

    def targets(self, param: ParamDef) -> tuple[str, ...]:
        served = served_types()
        return tuple(t for t in param.targets if t in served) if param.targets else ()

    def value_term(self, type_: str, key: str, param: ParamDef, modifier: str, raw: str) -> Term:
        kind = param.type
        if kind == "composite":
            return self.composite(type_, key, param, raw)
        conds = self.conds(type_, key, param, modifier, raw)
        if not isinstance(conds, tuple):  # already a complete term (ne, ge, le, quantity)
            return conds
        return Match(_row_param(param.code, kind, modifier, raw), conds)

    def conds(self, type_, key, param: ParamDef, modifier: str, raw: str, part=None):
        kind = param.type
        if kind == "string":
            return _string_conds(param.code, modifier, unescape(raw), part)
        if kind == "token":
            return _token_conds(key, modifier, raw, part)
        if kind == "reference":
            return self.reference_conds(key, param, modifier, raw, part)
        if kind == "date":
            return _date_term(param.code, key, unescape(raw), part)
        if kind == "number":
            return _number_term(param.code, key, unescape(raw), part)
        if kind == "quantity":
            return _quantity_term(param.code, key, raw, part)
        if kind == "uri":
            return _uri_conds(modifier, unescape(raw), part)
        raise error(400, "not-supported", f"Search parameter {key!r} ({kind}) is not supported")

    def reference_conds(self, key, param: ParamDef, modifier: str, raw: str, part):
        if modifier == "identifier":
            return _token_conds(key, "", raw, part)
        value = unescape(raw)
        if modifier:  # :Type
            if "/" in value:
                raise bad(key, f"with :{modifier} give only the id")
            return (Cond("text", "eq", f"{modifier}/{value}", part),)
        if "://" in value:
            # A URL of this server matches both the relative and the absolute form
            # stored (absolute ones stay absolute unless HIE_BASE_URL names this base).
            url = value.split("|", 1)[0]
            local = reference_key(url, self.base)
            return (Cond("text", "in", tuple(sorted({url, local})), part),)
        if "/" in value:
            return (Cond("text", "eq", reference_key(value), part),)
        targets = self.targets(param)
        if not valid_id(value):
            raise bad(key, f"{value!r} is not a resource id or reference")
        if not targets:
            return (Cond("text", "eq", value, part),)
        return (Cond("text", "in", tuple(f"{t}/{value}" for t in targets), part),)

    def composite(self, type_: str, key: str, param: ParamDef, raw: str) -> Term:
        components = [comp for comp, _ in self.registry.components(type_, param.code)]
        pieces = split(raw, "$")
        if len(pieces) != len(components):
            raise bad(key, f"a composite value needs {len(components)} parts separated by $")
        conds: list[Cond] = []
        alternatives: list[tuple[Cond, ...]] = [()]
        for k, (comp, piece) in enumerate(zip(components, pieces, strict=True)):
            if not piece:
                raise bad(key, f"component {k + 1} is empty")
            got = self.conds(type_, key, comp, "", piece, part=k)
            if isinstance(got, Not):
                raise bad(key, "ne is not supported inside a composite value")
            if isinstance(got, tuple):
                conds.extend(got)
            else:  # a prefix that expands to alternatives (ge/le) on one component
                alternatives = [a + m.conds for a in alternatives for m in _alternatives(got)]
        terms = tuple(Match(param.code, tuple(conds) + a) for a in alternatives)
        return _any(terms)

    # ------------------------------------------------------------- chains
    def chain(self, type_, key, param: ParamDef, modifier, rest, value, depth) -> Term:
        if param.type != "reference":
            raise bad(key, f"{param.code} is not a reference parameter and cannot be chained")
        if depth + 1 > MAX_CHAIN_DEPTH:
            raise bad(key, f"chains are limited to {MAX_CHAIN_DEPTH} levels")
        targets = self.targets(param)
        if modifier == MDM:
            raise bad(key, "a parameter with :mdm cannot be chained; put :mdm on the last one")
        if modifier:
            if modifier not in targets:
                raise bad(key, f"{modifier} is not a target type of {param.code}")
            targets = (modifier,)
        next_name = rest.split(".", 1)[0].split(":", 1)[0]
        hops = []
        for target in targets:
            if next_name in self.registry.params(target) or rest.startswith("_has:"):
                inner = self.term(target, rest, value, depth + 1)
                if inner is not None:
                    hops.append(Chain(param.code, target, (inner,)))
        if not hops:
            if self.strict or not targets:
                raise bad(key, f"no target type of {param.code} has a parameter {next_name!r}")
            return None
        return _any(tuple(hops))

    def has(self, type_: str, key: str, value: str, depth: int) -> Term:
        pieces = key.split(":", 3)
        if len(pieces) < 4 or not all(pieces[1:4]):
            raise bad(key, "use _has:Type:reference-parameter:search-parameter")
        _, source, ref_name, rest = pieces
        if source not in served_types():
            raise bad(key, f"unknown resource type {source!r}")
        if depth + 1 > MAX_CHAIN_DEPTH:
            raise bad(key, f"_has is limited to {MAX_CHAIN_DEPTH} levels")
        ref = self.registry.params(source).get(ref_name)
        if ref is None or ref.type != "reference":
            raise bad(key, f"{ref_name!r} is not a reference parameter of {source}")
        targets = self.targets(ref)
        if targets and type_ not in targets:
            raise bad(key, f"{source}.{ref_name} cannot refer to {type_}")
        inner = self.term(source, rest, value, depth + 1)
        if inner is None:
            raise bad(key, f"unknown parameter {rest!r} on {source}")
        return Has(source, ref_name, (inner,))

    # ------------------------------------------------------------- system level
    def system_term(self, types: list[str], key: str, value: str) -> Term | None:
        name = key.partition(":")[0].partition(".")[0]
        if not types or any(name not in self.registry.params(t) for t in types):
            if self.strict:
                raise error(
                    400, "not-supported", f"Search parameter {name!r} is not common to {types}"
                )
            return None
        # The parameter means the same on every type searched (checked above); the
        # term is built on the first and applied per type by the engine.
        return self.term(types[0], key, value, depth=0)

    # ------------------------------------------------------------- result params
    def result_param(self, req, scope, name, modifier, key, value, max_count):
        includes = name in ("_include", "_revinclude")
        if modifier and not (includes and modifier in ("iterate", "recurse")):
            raise error(400, "not-supported", f"Unsupported modifier in {key!r}")
        if name == "_count":
            req.count = min(non_negative(key, value), max_count)
        elif name == "_offset":
            req.offset = non_negative(key, value)
        elif name == "_sort":
            req.sort = self.sort(scope, value)
        elif name == "_total":
            if value not in TOTAL_MODES:
                raise bad(key, f"use one of {', '.join(TOTAL_MODES)}")
            req.total = value
        elif name in ("_include", "_revinclude"):
            req.includes.append(self.include(name, modifier, value))

    def sort(self, scope: list[str], value: str) -> tuple[Sort, ...]:
        keys = []
        for item in value.split(","):
            descending = item.startswith("-")
            name = item[1:] if descending else item
            if not name:
                raise bad("_sort", "empty sort key")
            for t in scope:
                param = self.registry.params(t).get(name)
                if param is None:
                    raise bad("_sort", f"unknown parameter {name!r} for {t}")
                if param.type in ("composite", "special"):
                    raise bad("_sort", f"cannot sort by {param.type} parameter {name!r}")
                allowed = ("_id", "_lastUpdated", JOURNAL_TYPES.get(t))
                if t in JOURNAL_TYPES and name not in allowed:
                    by = ", ".join(allowed)
                    raise bad("_sort", f"{t} can be sorted by {by} only, not {name!r}")
            keys.append(Sort(name, descending))
        return tuple(keys)

    def include(self, name: str, modifier: str, value: str) -> Include:
        reverse = name == "_revinclude"
        iterate = modifier in ("iterate", "recurse")
        if value == "*":
            return Include("*", "*", None, iterate, reverse)
        pieces = value.split(":")
        if len(pieces) not in (2, 3) or not all(pieces):
            raise bad(name, "use Type:parameter[:targetType] or *")
        source, pname = pieces[0], pieces[1]
        target = pieces[2] if len(pieces) == 3 else None
        if source not in served_types():
            raise bad(name, f"unknown resource type {source!r}")
        if pname != "*":
            param = self.registry.params(source).get(pname)
            if param is None or param.type != "reference":
                raise bad(name, f"{pname!r} is not a reference parameter of {source}")
            if target and target not in self.targets(param):
                raise bad(name, f"{target} is not a target of {source}.{pname}")
        elif target:
            raise bad(name, "a target type needs a named parameter")
        return Include(source, pname, target, iterate, reverse)


def may_be_patient(param: ParamDef) -> bool:
    """Whether a reference parameter can point at a Patient (no targets: any type)."""
    return not param.targets or bool({"Patient", "Resource"} & set(param.targets))


def _any(terms: tuple[Term, ...]) -> Term:
    return terms[0] if len(terms) == 1 else AnyOf(terms)


def _alternatives(term: Term) -> tuple[Match, ...]:
    return term.terms if isinstance(term, AnyOf) else (term,)


def _row_param(code: str, kind: str, modifier: str, raw: str) -> str:
    """The index-row parameter a simple value is compared with."""
    if kind == "token" and modifier in ("text", "of-type"):
        return f"{code}:{modifier}"
    if kind == "reference" and modifier == "identifier":
        return f"{code}:identifier"
    return code


# ----------------------------------------------------------------- value kinds
def _string_conds(code: str, modifier: str, value: str, part) -> tuple[Cond, ...]:
    if code == "phonetic":
        try:
            return (Cond("text", "prefix", textfold.query_phonetic(value), part),)
        except ValueError as exc:
            raise bad(code, str(exc)) from None
    if modifier == "exact":
        return (Cond("system", "eq", value, part),)
    folded = textfold.fold(value)
    if not folded:
        raise bad(code, "the value is empty once spaces are removed")
    return (Cond("text", "contains" if modifier == "contains" else "prefix", folded, part),)


def _token_conds(key: str, modifier: str, raw: str, part) -> tuple[Cond, ...]:
    if modifier == "text":
        folded = textfold.fold(unescape(raw))
        return (Cond("text", "prefix", folded, part),)
    if modifier == "of-type":
        pieces = split(raw, "|")
        if len(pieces) != 3 or not all(pieces):
            raise bad(key, ":of-type takes system|code|value")
        system, code, value = (unescape(p) for p in pieces)
        return (Cond("system", "eq", system, part), Cond("text", "eq", f"{code}|{value}", part))
    pieces = [unescape(p) or None for p in split(raw, "|", 1)]
    system, code = pieces if len(pieces) == 2 else (None, pieces[0])
    conds: list[Cond] = []
    if len(pieces) == 2:
        conds.append(
            Cond("system", "null", None, part)
            if system is None
            else Cond("system", "eq", system, part)
        )
    if code is not None:
        conds.append(Cond("text", "eq", code, part))
    if not conds:
        raise bad(key, "empty token")
    return tuple(conds)


def _uri_conds(modifier: str, value: str, part) -> tuple[Cond, ...]:
    if modifier == "below":
        return (Cond("text", "prefix", value, part),)
    if modifier == "above":
        ancestors = {value}
        cut = value
        while "/" in cut.rstrip("/").split("://", 1)[-1]:
            cut = cut.rstrip("/").rsplit("/", 1)[0]
            ancestors.add(cut)
        return (Cond("text", "in", tuple(sorted(ancestors)), part),)
    return (Cond("text", "eq", value, part),)


def _prefix(raw: str) -> tuple[str, str]:
    if raw[:2] in PREFIXES and len(raw) > 2 and not raw[2:3].isalpha():
        return raw[:2], raw[2:]
    return "eq", raw


def _date_term(code: str, key: str, raw: str, part) -> Term | tuple[Cond, ...]:
    prefix, text = _prefix(raw)
    try:
        low, high = date_range(text)
    except (ValueError, OverflowError):
        raise bad(key, f"{raw!r} is not a FHIR date, dateTime or instant") from None

    def m(*conds: Cond) -> Match:
        return Match(code, conds)

    # low <= high in every row (extract.py), so "low <= high bound" is implied; stated,
    # it bounds the low index on both sides instead of walking half of it.
    contained = (
        Cond("low", "ge", low, part),
        Cond("low", "le", high, part),
        Cond("high", "le", high, part),
    )
    match prefix:
        case "eq":
            return contained
        case "ne":
            return Not(m(*contained))
        case "gt":
            return (Cond("high", "gt", high, part),)
        case "lt":
            return (Cond("low", "lt", low, part),)
        case "ge":
            return AnyOf((m(Cond("high", "gt", high, part)), m(*contained)))
        case "le":
            return AnyOf((m(Cond("low", "lt", low, part)), m(*contained)))
        case "sa":
            return (Cond("low", "gt", high, part),)
        case "eb":
            return (Cond("high", "lt", low, part),)
    # ap: overlap with the value widened by 10% of its distance from now (FHIR's advice).
    lo_dt = datetime.strptime(low, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    hi_dt = datetime.strptime(high, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    slack = abs(datetime.now(UTC) - lo_dt) / 10
    try:
        return (
            Cond("low", "le", fmt(hi_dt + slack), part),
            Cond("high", "ge", fmt(lo_dt - slack), part),
        )
    except OverflowError:
        raise bad(key, f"{raw!r} is out of range for ap") from None


def _number(key: str, text: str) -> Decimal:
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise bad(key, f"{text!r} is not a number") from None
    if not number.is_finite() or len(text) > 40 or abs(number.adjusted()) > 300:
        raise bad(key, f"{text!r} is not a number")
    return number


def _range_conds(
    prefix: str, v: float, low: float, high: float, part: int | None = None
) -> tuple[bool, tuple[Cond, ...]]:
    """``(negated, conditions)`` comparing nlow/nhigh with search value ``v`` under
    ``prefix``; ``eq``/``ne`` use [low, high), the interval the value's precision
    implies (FHIR: ``100`` means [99.5, 100.5))."""
    match prefix:
        case "eq" | "ne":  # nlow <= nhigh in every row: the middle bound is implied
            conds = (
                Cond("nlow", "ge", low, part),
                Cond("nlow", "lt", high, part),
                Cond("nhigh", "lt", high, part),
            )
            return prefix == "ne", conds
        case "gt" | "sa":
            return False, (Cond("nhigh" if prefix == "gt" else "nlow", "gt", v, part),)
        case "lt" | "eb":
            return False, (Cond("nlow" if prefix == "lt" else "nhigh", "lt", v, part),)
        case "ge":
            return False, (Cond("nhigh", "ge", v, part),)
        case "le":
            return False, (Cond("nlow", "le", v, part),)
    slack = abs(v) / 10  # ap: within 10% of the value
    return False, (Cond("nlow", "le", v + slack, part), Cond("nhigh", "ge", v - slack, part))


def _numeric_term(row_param, unit_conds, prefix, number, text, part):
    low, high = units.precision_range(text)
    negated, conds = _range_conds(prefix, float(number), float(low), float(high), part)
    if part is not None:
        if negated:
            raise error(400, "not-supported", "ne inside a composite value is not supported")
        return tuple(unit_conds) + conds
    term = Match(row_param, tuple(unit_conds) + conds)
    return Not(term) if negated else term


def _number_term(code: str, key: str, raw: str, part):
    prefix, text = _prefix(raw)
    return _numeric_term(code, (), prefix, _number(key, text), text, part)


def _quantity_term(code: str, key: str, raw: str, part):
    pieces = split(raw, "|")
    if len(pieces) not in (1, 3):
        raise bad(key, "a quantity is [prefix]number or [prefix]number|system|code")
    prefix, text = _prefix(unescape(pieces[0]))
    number = _number(key, text)
    system = unescape(pieces[1]) if len(pieces) == 3 and pieces[1] else None
    unit = unescape(pieces[2]) if len(pieces) == 3 and pieces[2] else None
    if system == UCUM and unit and part is None:
        canonical = units.canonical(number, unit)
        if canonical is not None:  # compare in canonical units with every stored unit
            low, high = (units.canonical(b, unit)[0] for b in units.precision_range(text))
            negated, conds = _range_conds(prefix, float(canonical[0]), float(low), float(high))
            term = Match(f"{code}#canonical", (Cond("text", "eq", canonical[1]), *conds))
            return Not(term) if negated else term
    unit_conds: list[Cond] = []
    if system:
        unit_conds.append(Cond("system", "eq", system, part))
    if unit:
        unit_conds.append(Cond("text", "eq", unit, part))
    return _numeric_term(code, unit_conds, prefix, number, text, part)
