"""UCUM canonical form for quantity search, and the implicit range of a search number.

:func:`canonical` turns a value in any UCUM unit into base units (UCUM's: m, s, g, rad, K,
C, cd; plus mol and each arbitrary unit, see below) so that commensurable quantities
compare directly: 5.5 mmol/L and 5500 umol/L are both ``5.5 mol.m-3``; 1 g/L and 100 mg/dL
both ``1000 g.m-3``. Units are read from the UCUM table (``terminology/ucum-essence.xml``)
with the full case-sensitive UCUM grammar: prefixes, exponents, ``.`` and ``/``,
parentheses, integer factors, ``10*3``, annotations ``{...}`` (which mean 1).

Deliberate departures from UCUM, for clinical safety:

- mol is a base unit. UCUM defines it as 6.02214076 x 10^23 (a pure number), which would
  make 5 mmol/L commensurable with a cell count in 10*9/L. So mol, eq, osm, kat and U
  (umol/min) are amounts of substance, never counts.
- Molar and mass concentrations (glucose in mmol/L vs mg/dL) are not commensurable in
  UCUM, and are not here: converting them needs the analyte's molar mass, which the
  recognition module supplies per analyte.
- Arbitrary units ([iU] = [IU], [arb'U], [CFU], ...) are commensurable only with
  themselves: each is its own base unit.

Special (non-ratio) units have no canonical form, except Cel and [degF] used alone, whose
offsets are applied (37 Cel -> 310.15 K).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, DecimalException, localcontext
from functools import cache, lru_cache
from importlib import resources

# 34 significant digits: a MongoDB Decimal128 holds the canonical value exactly.
_CONTEXT = Context(prec=34)
_NS = {"u": "http://unitsofmeasure.org/ucum-essence"}
_MAX_CODE = 200
_TEMPERATURES = {  # kelvin = (value + offset) * numerator / denominator
    "Cel": (Decimal("273.15"), 1, 1),
    "[degF]": (Decimal("459.67"), 5, 9),
}
_EXPONENT = re.compile(r"(.*?)([+-]?[0-9]+)?")
_ANNOTATION = re.compile(r"\{[!-z|~]*\}")  # any printable ASCII but braces
_DECIMAL = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")


class _Invalid(Exception):
    """The code is not a (linear) UCUM unit."""


class _Unit:
    """A linear unit: ``factor`` times the product of base units to their powers."""

    __slots__ = ("factor", "dims")

    def __init__(self, factor: Decimal, dims: dict[str, int]):
        self.factor = factor
        self.dims = dims

    def times(self, other: _Unit) -> _Unit:
        dims = dict(self.dims)
        for base, exp in other.dims.items():
            dims[base] = dims.get(base, 0) + exp
        return _Unit(self.factor * other.factor, {b: e for b, e in dims.items() if e})

    def per(self, other: _Unit) -> _Unit:
        return self.times(other.power(-1))

    def power(self, exp: int) -> _Unit:
        return _Unit(self.factor**exp, {b: e * exp for b, e in self.dims.items() if exp})


_ONE = _Unit(Decimal(1), {})


class _Table:
    """The UCUM table: prefixes, and every atom in base units (None if special)."""

    def __init__(self) -> None:
        path = resources.files("hie.terminology_data").joinpath("ucum-essence.xml")
        root = ET.fromstring(path.read_bytes())
        self.prefixes = {
            p.get("Code"): Decimal(p.find("u:value", _NS).get("value"))
            for p in root.findall("u:prefix", _NS)
        }
        bases = [b.get("Code") for b in root.findall("u:base-unit", _NS)]
        self.metric = set(bases)  # base units are all metric
        self.atoms: dict[str, _Unit | None] = {b: _Unit(Decimal(1), {b: 1}) for b in bases}
        self.atoms["mol"] = _Unit(Decimal(1), {"mol": 1})
        self.definitions: dict[str, tuple[Decimal, str]] = {}
        for unit in root.findall("u:unit", _NS):
            code = unit.get("Code")
            value = unit.find("u:value", _NS)
            if unit.get("isMetric") == "yes":
                self.metric.add(code)
            if code in self.atoms:
                continue
            if unit.get("isSpecial") == "yes":
                self.atoms[code] = None
            elif unit.get("isArbitrary") == "yes" and value.get("Unit") == "1":
                self.atoms[code] = _Unit(Decimal(1), {code: 1})
            else:
                self.definitions[code] = (Decimal(value.get("value")), value.get("Unit"))
        with localcontext(_CONTEXT):  # all now, so that the table is read-only once built
            for code in self.definitions:
                self.atom(code)

    def atom(self, code: str) -> _Unit | None:
        """The atom ``code`` in base units, None if special or ill-defined."""
        if code not in self.atoms:
            value, expression = self.definitions[code]
            self.atoms[code] = None  # until resolved: a definition cycle is ill-defined
            try:
                unit = _Parser(self, expression).unit()
            except _Invalid:
                return None
            self.atoms[code] = _Unit(value * unit.factor, unit.dims)
        return self.atoms[code]

    def prefixed(self, symbol: str) -> _Unit:
        """An atom, possibly with a prefix (``mg``, ``mm[Hg]``, ``10*``)."""
        candidates = [("", symbol)]
        candidates += [(symbol[:n], symbol[n:]) for n in (2, 1) if symbol[:n] in self.prefixes]
        for prefix, atom in candidates:
            known = atom in self.atoms or atom in self.definitions
            if known and (not prefix or atom in self.metric):
                unit = self.atom(atom)
                if unit is None:
                    raise _Invalid(symbol)
                return unit if not prefix else _Unit(self.prefixes[prefix] * unit.factor, unit.dims)
        raise _Invalid(symbol)


class _Parser:
    """Recursive descent over the UCUM grammar (case-sensitive form)."""

    def __init__(self, table: _Table, code: str):
        self.table = table
        self.code = code
        self.pos = 0

    def unit(self) -> _Unit:
        result = self.term()
        if self.pos != len(self.code):
            raise _Invalid(self.code)
        return result

    def term(self) -> _Unit:
        """Left to right, ``.`` and ``/`` alike; a leading ``/`` inverts what follows it."""
        result = _ONE if self.code.startswith("/", self.pos) else self.component()
        while self.pos < len(self.code) and self.code[self.pos] in "./":
            operator = self.code[self.pos]
            self.pos += 1
            component = self.component()
            result = result.times(component) if operator == "." else result.per(component)
        return result

    def component(self) -> _Unit:
        """A unit, integer factor or parenthesised term, then an optional annotation.

        The grammar annotates only units, but UCUM's own examples annotate factors and
        parentheses too (``/100{cells}``, ``g/(8.h){shift}``).
        """
        result = self.parenthesised() if self.code.startswith("(", self.pos) else self.simple()
        if self.code.startswith("{", self.pos):
            annotation = _ANNOTATION.match(self.code, self.pos)
            if not annotation:
                raise _Invalid(self.code)
            self.pos = annotation.end()
        return result

    def parenthesised(self) -> _Unit:
        self.pos += 1
        result = self.term()
        if not self.code.startswith(")", self.pos):
            raise _Invalid(self.code)
        self.pos += 1
        return result

    def simple(self) -> _Unit:
        """A prefixed atom with its exponent (``mm2``, ``10*3``), an integer, or nothing (1)."""
        code, start = self.code, self.pos
        end = start
        while end < len(code) and code[end] not in "./(){}":
            if code[end] == "[":
                end = code.find("]", end)
                if end < 0:
                    raise _Invalid(code)
            end += 1
        self.pos = end
        symbol = code[start:end]
        if not symbol and code.startswith("{", end):
            return _ONE
        if symbol.isdigit():
            return _Unit(Decimal(symbol), {})
        atom, exponent = _EXPONENT.fullmatch(symbol).groups()
        if not atom:
            raise _Invalid(code)
        unit = self.table.prefixed(atom)
        return unit.power(int(exponent)) if exponent else unit


@cache
def _table() -> _Table:
    return _Table()


@lru_cache(maxsize=4096)
def _parse(code: str) -> tuple[Decimal, str] | None:
    """(factor to base units, canonical unit string) of a linear UCUM code, or None."""
    if not code or len(code) > _MAX_CODE or not code.isascii() or not code.isprintable():
        return None
    try:
        with localcontext(_CONTEXT):
            unit = _Parser(_table(), code).unit()
    except (_Invalid, DecimalException):
        return None
    if not unit.factor.is_finite() or unit.factor <= 0:  # "/0", "0.mg"
        return None
    dims = sorted(unit.dims.items())
    return unit.factor, ".".join(f"{b}{e if e != 1 else ''}" for b, e in dims) or "1"


def canonical(value: Decimal, code: str) -> tuple[Decimal, str] | None:
    """``value`` in ``code`` (a UCUM code) as (value in base units, canonical unit).

    The canonical unit string is the same for all commensurable units (``mol.m-3``,
    ``g.m-3``, ``m-3`` for 10*9/L, ``1`` for %); the value has up to 34 significant digits.
    None for an unknown, malformed (or over 200 characters) or special unit other than Cel
    and [degF] alone, and for a non-finite value; never raises. To compare a search value,
    convert both ends of its :func:`precision_range`.
    """
    if not isinstance(value, Decimal) or not value.is_finite() or not isinstance(code, str):
        return None
    try:
        with localcontext(_CONTEXT):
            if code in _TEMPERATURES:
                offset, numerator, denominator = _TEMPERATURES[code]
                return ((value + offset) * numerator / denominator).normalize(), "K"
            parsed = _parse(code)
            if parsed is None:
                return None
            return (value * parsed[0]).normalize(), parsed[1]
    except DecimalException:
        return None


def precision_range(value: str | Decimal) -> tuple[Decimal, Decimal]:
    """The half-open interval [low, high) a search number stands for, by its precision.

    Half a unit of the last significant digit either side, per FHIR number search:
    ``100`` -> [99.5, 100.5), ``100.00`` -> [99.995, 100.005), ``0.1`` -> [0.05, 0.15),
    ``1e2`` -> [50, 150) (one significant figure, as HAPI reads it too: the R4 page's
    "[95 ... 105)" for 1e2 contradicts its own "1 significant figure"; ``1.0e2`` gives it).
    Raises ValueError for anything but a finite decimal.
    """
    if isinstance(value, str):
        if not _DECIMAL.fullmatch(value):
            raise ValueError(f"not a decimal: {value!r}")
        value = Decimal(value)
    if not isinstance(value, Decimal) or not value.is_finite():
        raise ValueError(f"not a finite decimal: {value!r}")
    _, digits, exponent = value.as_tuple()
    half = Decimal((0, (5,), exponent - 1))
    exact = Context(prec=len(digits) + 2, Emax=MAX_EMAX, Emin=MIN_EMIN)
    return exact.subtract(value, half), exact.add(value, half)
