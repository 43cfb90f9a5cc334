"""Index-value extraction: the search rows stored beside each resource version.

Every row with both ends has ``low <= high`` and ``nlow <= nhigh`` (the search
translator relies on it to bound index ranges on both sides).

For every search parameter of the resource's type (from the registry) the
parameter's FHIRPath expression is evaluated and each value is normalised by the
parameter's type into :class:`~hie.store.query.IndexRow` values (column meanings in
:mod:`hie.store.query`). Computed once at write time so that a search is an index
lookup in either store.

Besides the rows of a parameter ``p`` itself, some modifiers get rows of their own
under a pseudo-parameter name, so that they too are index lookups:

* ``p:text``: the folded display text of a CodeableConcept/Coding/Identifier type;
* ``p:of-type``: an Identifier's type coding and value (``system``, ``code|value``);
* ``p:identifier``: a Reference's ``identifier`` (``system``, ``value``);
* ``p#canonical``: a quantity's value in UCUM canonical units (``text`` = unit).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from decimal import Decimal, InvalidOperation
from itertools import product

from hie.fhir.search import text as textfold
from hie.fhir.search import units
from hie.fhir.search.dates import date_range
from hie.fhir.search.registry import ParamDef, Registry, default_registry
from hie.store.query import IndexRow

UCUM = "http://unitsofmeasure.org"
#: Bumped whenever the normalisation below changes what rows a resource gets, so that
#: servers reindex at startup (with the registry's fingerprint, see index_version()),
#: and when a store's layout of the rows changes (2: the audit log's rows moved to the
#: embedded store's journal table, which the reindex fills).
EXTRACTION_VERSION = 2
#: Stored bounds of an open-ended Period.
MIN_INSTANT = "0001-01-01T00:00:00.000000Z"
MAX_INSTANT = "9999-12-31T23:59:59.999999Z"


def index_rows(
    resource: dict, last_updated: str, registry: Registry | None = None, base: str | None = None
) -> list[IndexRow]:
    """The index rows of ``resource`` (whose version was written at ``last_updated``).
    ``base``: this server's public base URL; absolute references under it are indexed as
    ``Type/id`` like relative ones (others stay absolute: another member's server)."""
    registry = registry or default_registry()
    type_ = resource["resourceType"]
    rows = [IndexRow("_lastUpdated", low=last_updated, high=last_updated)]
    for code, param in registry.params(type_).items():
        if code in ("_id", "_lastUpdated") or param.expression is None:
            continue
        if param.type == "composite":
            rows.extend(_composite_rows(registry, type_, param, resource))
            continue
        nodes = registry.extractor(type_, code)(resource)
        if nodes:
            rows.extend(_dedupe(value_rows(param, code, nodes, base)))
    return rows


def index_version(registry: Registry) -> str:
    """Identifies how index rows are computed: definitions in effect and this code."""
    return f"{registry.fingerprint()}/{EXTRACTION_VERSION}"


def _dedupe(rows: Iterable[IndexRow]) -> list[IndexRow]:
    return list(dict.fromkeys(rows))


def value_rows(
    param: ParamDef, code: str, nodes: Iterable, base: str | None = None
) -> Iterator[IndexRow]:
    """Rows for FHIRPath result ``nodes`` of a parameter named ``code``."""
    if param.type == "string" and code == "phonetic":
        for node in nodes:
            if node.type == "HumanName" and isinstance(node.value, dict):
                for key in textfold.index_phonetic(node.value):
                    yield IndexRow(code, text=key)
            elif isinstance(node.value, str):
                for key in textfold.index_phonetic({"text": node.value}):
                    yield IndexRow(code, text=key)
        return
    if param.type == "reference":
        for node in nodes:
            yield from _reference_rows(code, node.value, base)
        return
    emit = _EMITTERS.get(param.type)
    if emit is None:
        return
    for node in nodes:
        yield from emit(code, node.value, node.type)


# ----------------------------------------------------------------- per type
def _strings(value, type_: str) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        keys = _STRING_PARTS.get(type_)
        if keys is None:  # unknown complex type: every string inside it
            keys = tuple(value)
        for key in keys:
            part = value.get(key)
            for item in part if isinstance(part, list) else [part]:
                if isinstance(item, str):
                    yield item


_STRING_PARTS = {
    "HumanName": ("text", "family", "given", "prefix", "suffix"),
    "Address": ("text", "line", "city", "district", "state", "postalCode", "country"),
}


def _is_cjk(text: str) -> bool:
    return any(
        "\u3400" <= c <= "\u9fff" or "\uf900" <= c <= "\ufaff" or "\U00020000" <= c <= "\U0003ffff"
        for c in text
    )


def _name_forms(name: dict) -> Iterator[str]:
    """Whole-name forms of a HumanName without ``text``: ``张三`` (family then given,
    unspaced, as Chinese is written) or ``Zoë Müller`` and ``Müller Zoë``."""
    family = name.get("family")
    given = [g for g in name.get("given") or () if isinstance(g, str)]
    if name.get("text") or not isinstance(family, str) or not given:
        return
    if _is_cjk(family):
        yield family + "".join(given)
    else:
        yield f"{' '.join(given)} {family}"
        yield f"{family} {' '.join(given)}"


def _string_rows(code: str, value, type_: str) -> Iterator[IndexRow]:
    texts = list(_strings(value, type_))
    if type_ == "HumanName" and isinstance(value, dict):
        texts.extend(_name_forms(value))
    for text in texts:
        folded = textfold.fold(text)
        if folded:
            yield IndexRow(code, system=text, text=folded)


def _codings(value, type_: str) -> Iterator[dict]:
    if type_ == "CodeableConcept" or (isinstance(value, dict) and "coding" in value):
        for coding in value.get("coding") or ():
            if isinstance(coding, dict):
                yield coding
    elif type_ == "Coding":
        yield value


def _token_rows(code: str, value, type_: str) -> Iterator[IndexRow]:
    if isinstance(value, bool):
        yield IndexRow(code, text="true" if value else "false")
    elif isinstance(value, str | int | Decimal):
        yield IndexRow(code, text=str(value))
    elif not isinstance(value, dict):
        return
    elif type_ == "Identifier" or (
        type_ != "ContactPoint" and "value" in value and "coding" not in value
    ):
        if value.get("value") is not None or value.get("system"):
            yield IndexRow(code, system=value.get("system"), text=_str(value.get("value")))
        for coding in (value.get("type") or {}).get("coding") or ():
            if isinstance(coding, dict) and coding.get("code") and value.get("value"):
                yield IndexRow(
                    f"{code}:of-type",
                    system=coding.get("system"),
                    text=f"{coding['code']}|{value['value']}",
                )
        yield from _text_row(code, (value.get("type") or {}).get("text"))
    elif type_ == "ContactPoint":
        if value.get("value"):
            yield IndexRow(code, system=value.get("system"), text=value["value"])
    else:
        for coding in _codings(value, type_):
            if coding.get("code") is not None or coding.get("system"):
                yield IndexRow(code, system=coding.get("system"), text=_str(coding.get("code")))
            yield from _text_row(code, coding.get("display"))
        yield from _text_row(code, value.get("text"))


def _text_row(code: str, text) -> Iterator[IndexRow]:
    if isinstance(text, str) and (folded := textfold.fold(text)):
        yield IndexRow(f"{code}:text", system=text, text=folded)


def _str(value) -> str | None:
    return None if value is None else str(value)


def reference_key(reference: str, base: str | None = None) -> str:
    """The ``Type/id`` form of a literal reference: ``_history`` dropped, an absolute
    URL of this server (``base``) made relative; other absolute URLs kept whole."""
    if base and reference.startswith(base + "/"):
        reference = reference[len(base) + 1 :]
    if "/_history/" in reference:
        reference = reference.split("/_history/", 1)[0]
    if "://" not in reference and not reference.startswith(("#", "urn:")):
        parts = reference.strip("/").split("/")
        if len(parts) >= 2:
            return f"{parts[-2]}/{parts[-1]}"
    return reference


def _reference_rows(code: str, value, base: str | None) -> Iterator[IndexRow]:
    if isinstance(value, str):  # canonical or uri used as a reference
        yield IndexRow(code, text=value.split("|", 1)[0])
        return
    if not isinstance(value, dict):
        return
    ref = value.get("reference")
    if isinstance(ref, str) and ref:
        key = reference_key(ref, base)
        target = key.split("/", 1)[0] if "/" in key and "://" not in key else None
        yield IndexRow(code, system=target or value.get("type"), text=key)
    ident = value.get("identifier")
    if isinstance(ident, dict) and ident.get("value"):
        yield IndexRow(f"{code}:identifier", system=ident.get("system"), text=ident["value"])


def _date_rows(code: str, value, type_: str) -> Iterator[IndexRow]:
    if isinstance(value, str):
        span = _date_span(value)
        if span:
            yield IndexRow(code, low=span[0], high=span[1])
    elif isinstance(value, dict) and type_ == "Timing":
        events = [s for e in value.get("event") or () if (s := _date_span(e))]
        bounds = (value.get("repeat") or {}).get("boundsPeriod")
        if isinstance(bounds, dict):
            yield from _date_rows(code, bounds, "Period")
        if events:
            yield IndexRow(code, low=min(e[0] for e in events), high=max(e[1] for e in events))
    elif isinstance(value, dict) and ("start" in value or "end" in value):
        start = _date_span(value.get("start")) if value.get("start") else None
        end = _date_span(value.get("end")) if value.get("end") else None
        low = start[0] if start else MIN_INSTANT
        high = end[1] if end else MAX_INSTANT
        if start or end:  # an invalid Period ending before it starts: its extent
            yield IndexRow(code, low=min(low, high), high=max(low, high))


def _date_span(value) -> tuple[str, str] | None:
    if not isinstance(value, str):
        return None
    try:
        return date_range(value)
    except (ValueError, OverflowError):
        return None


def _decimal(value) -> Decimal | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None


def _number_rows(code: str, value, type_: str) -> Iterator[IndexRow]:
    number = _decimal(value) if not isinstance(value, dict) else None
    if number is not None and number.is_finite():
        yield IndexRow(code, nlow=float(number), nhigh=float(number))
    elif isinstance(value, dict):
        yield from _quantity_rows(code, value, type_)


def _quantity_rows(code: str, value, type_: str) -> Iterator[IndexRow]:
    if not isinstance(value, dict):
        return
    if type_ == "Range" or "low" in value or "high" in value:
        low = _decimal((value.get("low") or {}).get("value"))
        high = _decimal((value.get("high") or {}).get("value"))
        unit = value.get("low") or value.get("high") or {}
        if low is not None or high is not None:
            ends = (
                float(low) if low is not None else float("-inf"),
                float(high) if high is not None else float("inf"),
            )
            yield IndexRow(
                code,
                system=unit.get("system"),
                text=unit.get("code") or unit.get("unit"),
                nlow=min(ends),
                nhigh=max(ends),
            )
        return
    number = _decimal(value.get("value"))
    if number is None or not number.is_finite():
        return
    system, unit_code, unit = value.get("system"), value.get("code"), value.get("unit")
    if type_ == "Money" or "currency" in value:
        system, unit_code = "urn:iso:std:iso:4217", value.get("currency")
    point = float(number)
    yield IndexRow(code, system=system, text=unit_code or unit, nlow=point, nhigh=point)
    if unit and unit_code and unit != unit_code:
        yield IndexRow(code, text=unit, nlow=point, nhigh=point)
    if system == UCUM and unit_code:
        canonical = units.canonical(number, unit_code)
        if canonical is not None:
            cvalue = float(canonical[0])
            yield IndexRow(f"{code}#canonical", text=canonical[1], nlow=cvalue, nhigh=cvalue)


def _uri_rows(code: str, value, type_: str) -> Iterator[IndexRow]:
    if isinstance(value, str):
        yield IndexRow(code, text=value)


_EMITTERS = {
    "string": _string_rows,
    "token": _token_rows,
    "date": _date_rows,
    "number": _number_rows,
    "quantity": _quantity_rows,
    "uri": _uri_rows,
}


# ----------------------------------------------------------------- composite
def _composite_rows(
    registry: Registry, type_: str, param: ParamDef, resource: dict
) -> Iterator[IndexRow]:
    """One row per combination of component values found on the same value of the
    composite's expression (so ``code$value`` pairs never mix two components)."""
    components = registry.components(type_, param.code)
    seen: set[IndexRow] = set()
    for node in registry.extractor(type_, param.code)(resource):
        per_component = []
        for comp, values_of in components:
            # Only the component's own rows (not :text / #canonical pseudo-rows).
            rows = [r for r in value_rows(comp, comp.code, values_of(node)) if r.param == comp.code]
            if not rows:
                break
            per_component.append(rows)
        else:
            for combo in product(*per_component):
                row = IndexRow(param.code, parts=tuple(combo))
                if row not in seen:
                    seen.add(row)
                    yield row
