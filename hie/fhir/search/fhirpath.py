"""The FHIRPath of search parameters, compiled into fast Python callables.

A small tokenizer, parser and closure compiler for the FHIRPath subset that
``SearchParameter.expression`` uses (every R4 definition compiles for every served type;
types without an R4B model cannot be compiled for):
paths with choice types, ``|``, ``and``/``or``/``xor``/``implies``, ``=``/``!=``,
``is``/``as`` and their function forms, ``ofType()``, ``where()``, ``select()``,
``exists()``, ``empty()``, ``not()``, ``first()``, ``last()``, ``count()``,
``children()``, ``extension(url)``, ``hasExtension(url)``, ``resolve()`` (type tests
only), indexers, string/number/boolean literals, ``%resource`` and ``$this``.

Types are static: element types come from the R4B models of ``fhir.resources`` once per
path at compile time, so ``Observation.value as Quantity`` reads only ``valueQuantity``
and every result carries its FHIR type code. Deviations from the letter of FHIRPath,
all lenient and none changing a result of the R4 definitions' intent: ``as`` filters a
collection instead of failing on more than one item; the System types (``DateTime``,
``String``...) also match the FHIR primitives they stand for (R4's
``value.as(DateTime)``); ``resolve()`` reads the referenced type from the reference
(``Type/id``, ``#contained``, or ``Reference.type``) without fetching anything.
"""

from __future__ import annotations

import functools
import re
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from hie.fhir.types import model, r4_resource_types

__all__ = ["Compiled", "Node", "UnsupportedExpression", "compile"]


class UnsupportedExpression(ValueError):
    """An expression this compiler cannot (or must not) evaluate; the message says why."""


@dataclass(frozen=True, slots=True)
class Node:
    """One result: the JSON ``value`` and its FHIR type code (``Quantity``, ``code``...).

    ``context`` (not compared) is what a composite's component expression needs to be
    evaluated on the node: its exact type and the resource it was found in."""

    value: Any
    type: str
    context: tuple[str, dict] | None = field(default=None, compare=False, repr=False)


# ---------------------------------------------------------------- FHIR types
#: FHIR primitive type for each fhir_core annotation marker.
_PRIMITIVE_MARKERS = {
    "Base64Binary": "base64Binary",
    "Canonical": "canonical",
    "Code": "code",
    "Date": "date",
    "DateTime": "dateTime",
    "Decimal": "decimal",
    "Id": "id",
    "Instant": "instant",
    "Integer": "integer",
    "Integer64": "integer64",
    "Markdown": "markdown",
    "Oid": "oid",
    "PositiveInt": "positiveInt",
    "String": "string",
    "Time": "time",
    "UnsignedInt": "unsignedInt",
    "Uri": "uri",
    "Url": "url",
    "Uuid": "uuid",
    "Xhtml": "xhtml",
}
PRIMITIVES = frozenset(_PRIMITIVE_MARKERS.values()) | {"boolean"}
#: The R4 specialisations among primitives (``code`` is a ``string``...).
_PRIMITIVE_BASE = {
    "code": "string",
    "id": "string",
    "markdown": "string",
    "canonical": "uri",
    "url": "uri",
    "oid": "uri",
    "uuid": "uri",
    "positiveInt": "integer",
    "unsignedInt": "integer",
}
#: FHIRPath System types and the FHIR primitives they stand for.
_SYSTEM_TYPES = {
    "Boolean": frozenset({"boolean"}),
    "String": frozenset(
        {"string", "code", "id", "markdown", "uri", "url", "canonical", "oid", "uuid", "xhtml"}
    ),
    "Integer": frozenset({"integer", "positiveInt", "unsignedInt"}),
    "Decimal": frozenset({"decimal"}),
    "Date": frozenset({"date"}),
    "DateTime": frozenset({"dateTime", "instant"}),
    "Time": frozenset({"time"}),
}
#: A type known only at run time: of a resource in ``Bundle.entry.resource``, and of
#: what a path reads from it.
ANY = "*"
#: What ``resolve()`` yields: a referenced resource of a type known at run time, whose
#: content is not at hand (only type tests may follow).
REF = "*ref"
_REFERENCE = re.compile(
    r"(?:^|/)([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)


@functools.cache
def _resource_types() -> frozenset[str]:
    return frozenset(r4_resource_types())


@functools.cache
def _class(key: str):
    """The R4B model class of a type key (a FHIR type or a backbone class name)."""
    try:
        return model(key)
    except (KeyError, ValueError, ImportError, AttributeError) as exc:
        raise UnsupportedExpression(f"no R4B model for {key}") from exc


def _proper(cls) -> bool:
    """True for a named FHIR type's class (``Quantity``), false for a backbone element's
    (``ObservationComponent``) and for fhir_core's own base classes."""
    module = cls.__module__
    return (
        module.startswith("fhir.resources.")
        and cls.__name__.lower() == module.rsplit(".", 1)[1]
        and not cls.__name__.startswith("FHIR")
    )


def _leaf_type(annotation) -> str:
    """The type key of a model field annotation (unwrapping Optional and List)."""
    if typing.get_origin(annotation) is typing.Annotated:
        for marker in reversed(annotation.__metadata__):
            code = _PRIMITIVE_MARKERS.get(type(marker).__name__)
            if code:
                return code
        if typing.get_args(annotation)[0] is uuid.UUID:
            return "uuid"
        raise TypeError(f"unknown primitive annotation {annotation!r}")
    if annotation is bool:
        return "boolean"
    klass = getattr(annotation, "_model_klass", None)
    if klass:
        return klass.rsplit(".", 1)[1]
    for arg in typing.get_args(annotation):
        if arg is not type(None):
            return _leaf_type(arg)
    raise TypeError(f"unknown annotation {annotation!r}")


@functools.cache
def _elements(key: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """Element name -> ((JSON key, type key), ...) of a complex type; a choice element
    (``value[x]``) lists each of its variants."""
    out: dict[str, list[tuple[str, str]]] = {}
    for name, info in _class(key).model_fields.items():
        extra = info.json_schema_extra
        if not isinstance(extra, dict) or not extra.get("element_property"):
            continue
        alias = info.alias or name
        element = extra.get("one_of_many") or alias
        out.setdefault(element, []).append((alias, _leaf_type(info.annotation)))
    return {name: tuple(spec) for name, spec in out.items()}


@functools.cache
def _supertypes(key: str) -> frozenset[str]:
    """``key`` and every FHIR type it specialises (``Age``: ``Quantity``, ``Element``)."""
    if key in PRIMITIVES:
        chain = {key}
        while key in _PRIMITIVE_BASE:
            key = _PRIMITIVE_BASE[key]
            chain.add(key)
        return frozenset(chain)
    try:
        cls = _class(key)
    except UnsupportedExpression:
        if key in _resource_types():  # an R4 type without an R4B model
            return frozenset({key, "Resource", "DomainResource"})
        return frozenset({key})
    return frozenset({key} | {c.__name__ for c in cls.__mro__ if _proper(c)})


@functools.cache
def _fhir_code(key: str) -> str:
    """The FHIR type code reported for a type key."""
    if key in PRIMITIVES or key in _resource_types() or _proper(_class(key)):
        return key
    return "BackboneElement" if "BackboneElement" in _supertypes(key) else "Element"


def _known_type(name: str) -> bool:
    if name in PRIMITIVES or name in _resource_types():
        return True
    try:
        return _proper(_class(name))
    except UnsupportedExpression:
        return False


@functools.cache
def _type_test(spec: str) -> Callable[[str], bool]:
    """A predicate on type keys for a type specifier (``Quantity``, ``FHIR.uri``,
    ``System.DateTime``, ``DateTime``)."""
    namespace, _, name = spec.rpartition(".")
    if namespace not in ("", "FHIR", "System"):
        raise UnsupportedExpression(f"unknown type namespace in {spec!r}")
    if namespace != "System" and _known_type(name):
        return lambda key: name in _supertypes(key)
    if namespace != "FHIR" and name in _SYSTEM_TYPES:
        family = _SYSTEM_TYPES[name]
        return lambda key: key in family
    raise UnsupportedExpression(f"unknown type {spec!r}")


def _matching(types: frozenset[str], spec: str) -> tuple[frozenset[str], frozenset[str]]:
    """For static ``types`` and a type specifier: (the keys that pass at run time, the
    static types of what passes)."""
    test = _type_test(spec)
    passing = {t for t in types if t not in (ANY, REF) and test(t)}
    out = set(passing)
    dynamic = [s for s in (ANY, REF) if s in types]
    if dynamic:
        resources = {t for t in _resource_types() if test(t)}
        passing |= resources
        for sentinel in dynamic:
            if sentinel == ANY and len(resources) == 1:
                out |= resources
            elif resources:
                out.add(sentinel)
    return frozenset(passing), frozenset(out)


def _reference_type(value, root: dict) -> str | None:
    """The resource type a Reference (or canonical) points to, without fetching it."""
    if type(value) is dict:
        ref = value.get("reference")
        declared = value.get("type")
    else:
        ref, declared = value, None
    if isinstance(ref, str):
        if ref.startswith("#"):
            for res in root.get("contained") or ():
                if type(res) is dict and res.get("id") == ref[1:]:
                    return res.get("resourceType")
            return None
        m = _REFERENCE.search(ref.partition("|")[0])
        if m and m.group(1) in _resource_types():
            return m.group(1)
    return declared if declared in _resource_types() else None


# ---------------------------------------------------------------- values
def _equal(a, b) -> bool:
    """FHIRPath ``=`` on two JSON values (a boolean equals only a boolean)."""
    if (type(a) is bool) is not (type(b) is bool):
        return False
    return a == b


def _truth(items: list) -> bool | None:
    """A collection as a boolean: empty is unknown (None); a single boolean is itself;
    any other single item is true; several items are not a boolean (None)."""
    if len(items) != 1:
        return None
    value = items[0][0]
    return value if type(value) is bool else True


def _dedupe(items: list) -> list:
    out: list = []
    for item in items:
        if not any(_equal(item[0], seen[0]) for seen in out):
            out.append(item)
    return out


# ---------------------------------------------------------------- parser
_TOKEN = re.compile(
    r"""(?P<ws>\s+|//[^\n]*|/\*.*?\*/)
      | (?P<str>'(?:[^'\\]|\\.)*')
      | (?P<num>\d+(?:\.\d+)?)
      | (?P<id>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<qid>`(?:[^`\\]|\\.)*`)
      | (?P<var>%(?:[A-Za-z_][A-Za-z0-9_]*|`(?:[^`\\]|\\.)*`|'(?:[^'\\]|\\.)*'))
      | (?P<dollar>\$[a-z]+)
      | (?P<op><=|>=|!=|!~|[-+*/&|=~<>().,\[\]{}])""",
    re.VERBOSE | re.DOTALL,
)
_ESCAPES = {"'": "'", '"': '"', "`": "`", "\\": "\\", "/": "/", "f": "\f", "n": "\n"}
_ESCAPES |= {"r": "\r", "t": "\t"}
_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|.)")
#: Binary operators and their precedence (higher binds tighter).
_BINARY = {
    "implies": 1,
    "or": 2,
    "xor": 2,
    "and": 3,
    "in": 4,
    "contains": 4,
    "=": 5,
    "~": 5,
    "!=": 5,
    "!~": 5,
    "<": 6,
    ">": 6,
    "<=": 6,
    ">=": 6,
    "|": 7,
    "is": 8,
    "as": 8,
    "+": 9,
    "-": 9,
    "&": 9,
    "*": 10,
    "/": 10,
    "div": 10,
    "mod": 10,
}
_CONSTANTS = {
    "ucum": "http://unitsofmeasure.org",
    "sct": "http://snomed.info/sct",
    "loinc": "http://loinc.org",
}


def _unescape(text: str) -> str:
    def one(m: re.Match) -> str:
        esc = m.group(1)
        if len(esc) == 5:
            return chr(int(esc[1:], 16))
        if esc not in _ESCAPES:
            raise UnsupportedExpression(f"unknown escape \\{esc}")
        return _ESCAPES[esc]

    return _ESCAPE.sub(one, text[1:-1])


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise UnsupportedExpression(f"unexpected {text[pos]!r} at offset {pos}")
        pos = m.end()
        kind = m.lastgroup
        if kind == "ws":
            continue
        if kind == "qid":
            tokens.append(("id", _unescape(m.group())))
        elif kind == "id":
            tokens.append(("kw", m.group()))  # an identifier or a keyword operator
        else:
            tokens.append((kind, m.group()))
    return tokens


class _Parser:
    """Precedence-climbing parser producing tuples:
    ``("lit", value, type)``, ``("id", name)``, ``("var", name)``, ``("this",)``,
    ``("empty",)``, ``("member", base, name)``, ``("call", base|None, name, args)``,
    ``("index", base, expr)``, ``("bin", op, left, right)``, ``("type", op, expr, spec)``.
    """

    def __init__(self, text: str):
        self.tokens = _tokenize(text)
        self.pos = 0

    def parse(self):
        node = self.expr(1)
        if self.pos != len(self.tokens):
            raise UnsupportedExpression(f"unexpected {self.tokens[self.pos][1]!r}")
        return node

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise UnsupportedExpression("unexpected end of expression")
        self.pos += 1
        return tok

    def accept(self, text: str) -> bool:
        tok = self.peek()
        if tok is not None and tok[0] == "op" and tok[1] == text:
            self.pos += 1
            return True
        return False

    def expect(self, text: str) -> None:
        if not self.accept(text):
            tok = self.peek()
            found = repr(tok[1]) if tok else "end of expression"
            raise UnsupportedExpression(f"expected {text!r}, found {found}")

    def ident(self) -> str:
        kind, text = self.take()
        if kind not in ("kw", "id"):
            raise UnsupportedExpression(f"expected an identifier, found {text!r}")
        return text

    def expr(self, min_prec: int):
        left = self.postfix()
        while (tok := self.peek()) is not None and tok[0] in ("op", "kw"):
            prec = _BINARY.get(tok[1])
            if prec is None or prec < min_prec:
                break
            self.pos += 1
            if tok[1] in ("is", "as"):
                left = ("type", tok[1], left, self.type_spec())
            else:
                left = ("bin", tok[1], left, self.expr(prec + 1))
        return left

    def type_spec(self) -> str:
        parts = [self.ident()]
        while self.accept("."):
            parts.append(self.ident())
        return ".".join(parts)

    def postfix(self):
        node = self.term()
        while True:
            if self.accept("."):
                name = self.ident()
                if self.accept("("):
                    node = ("call", node, name, self.args())
                else:
                    node = ("member", node, name)
            elif self.accept("["):
                node = ("index", node, self.expr(1))
                self.expect("]")
            else:
                return node

    def args(self) -> list:
        if self.accept(")"):
            return []
        out = [self.expr(1)]
        while self.accept(","):
            out.append(self.expr(1))
        self.expect(")")
        return out

    def term(self):
        kind, text = self.take()
        if kind == "str":
            return ("lit", _unescape(text), "string")
        if kind == "num":
            return (
                ("lit", Decimal(text), "decimal") if "." in text else ("lit", int(text), "integer")
            )
        if kind == "op" and text == "-" and self.peek() and self.peek()[0] == "num":
            _, value, type_ = self.term()
            return ("lit", -value, type_)
        if kind == "op" and text == "(":
            node = self.expr(1)
            self.expect(")")
            return node
        if kind == "op" and text == "{":
            self.expect("}")
            return ("empty",)
        if kind == "var":
            return ("var", text[1:].strip("`'"))
        if kind == "dollar":
            if text != "$this":
                raise UnsupportedExpression(f"{text} is not supported")
            return ("this",)
        if kind == "kw" and text in ("true", "false"):
            return ("lit", text == "true", "boolean")
        if kind in ("kw", "id"):
            if self.accept("("):
                return ("call", None, text, self.args())
            return ("id", text)
        raise UnsupportedExpression(f"unexpected {text!r}")


# ---------------------------------------------------------------- compiler
#: A compiled sub-expression: (input items, root resource) -> output items, where an
#: item is a (JSON value, type key) tuple.
Fn = Callable[[list, dict], list]


def _empty(items: list, root: dict) -> list:
    return []


def _identity(items: list, root: dict) -> list:
    return items


_NOTHING = frozenset()
_BOOLEAN = frozenset({"boolean"})
_INTEGER = frozenset({"integer"})


def _type_arg(node) -> str:
    """A type specifier given as a function argument (``ofType(Quantity)``)."""
    if node[0] in ("id", "member") and (node[0] == "id" or node[1][0] == "id"):
        return node[1] if node[0] == "id" else f"{node[1][1]}.{node[2]}"
    raise UnsupportedExpression("expected a type name as argument")


def _string_arg(node) -> str:
    if node[0] != "lit" or node[2] != "string":
        raise UnsupportedExpression("expected a string literal as argument")
    return node[1]


class _Compiler:
    """Compiles a parse tree for static focus types into closures (see :data:`Fn`)."""

    def __init__(self, root_types: frozenset[str]):
        self.root_types = root_types

    def compile(self, node, types: frozenset[str]) -> tuple[Fn, frozenset[str]]:
        """(closure, static result types) of ``node`` evaluated on items of ``types``."""
        kind = node[0]
        if kind == "lit":
            item = [(node[1], node[2])]
            return (lambda items, root: item), frozenset({node[2]})
        if kind == "empty":
            return _empty, _NOTHING
        if kind == "this":
            return _identity, types
        if kind == "var":
            return self.variable(node[1])
        if kind == "id":
            return self.identifier(_identity, types, node[1])
        if kind == "member":
            base, btypes = self.compile(node[1], types)
            return self.member(base, btypes, node[2])
        if kind == "index":
            return self.index(node, types)
        if kind == "call" and node[2] in ("as", "ofType", "is"):
            if len(node[3]) != 1:
                raise UnsupportedExpression(f"{node[2]}() takes one type argument")
            op = "is" if node[2] == "is" else "as"
            return self.type_op(op, node[1], _type_arg(node[3][0]), types)
        if kind == "call":
            if node[1] is None:
                base, btypes = _identity, types
            else:
                base, btypes = self.compile(node[1], types)
            return self.call(base, btypes, node[2], node[3])
        if kind == "type":
            return self.type_op(node[1], node[2], node[3], types)
        return self.binary(node[1], node[2], node[3], types)

    def variable(self, name: str) -> tuple[Fn, frozenset[str]]:
        if name in ("resource", "rootResource", "context"):
            return (lambda items, root: [(root, root.get("resourceType"))]), self.root_types
        if name in _CONSTANTS:
            item = [(_CONSTANTS[name], "uri")]
            return (lambda items, root: item), frozenset({"uri"})
        raise UnsupportedExpression(f"unknown variable %{name}")

    def identifier(self, base: Fn, btypes: frozenset[str], name: str):
        """A name at the start of a path: a type filter (``Patient``) or an element."""
        if name[0].isupper() and _known_type(name):
            return self.type_filter(base, btypes, name)
        return self.member(base, btypes, name)

    def type_filter(self, base: Fn, btypes: frozenset[str], spec: str):
        passing, out = _matching(btypes, spec)
        if not out:
            return _empty, _NOTHING
        if btypes <= passing:  # statically true; each later step checks its input types
            return base, out

        def run(items, root):
            return [item for item in base(items, root) if item[1] in passing]

        return run, out

    def member(self, base: Fn, btypes: frozenset[str], name: str, only=None):
        """Child element ``name`` of each item; ``only`` keeps the choice variants of
        the type keys it accepts (``value as Quantity`` reads ``valueQuantity`` only)."""
        if not btypes:
            return _empty, _NOTHING
        if REF in btypes:
            raise UnsupportedExpression(
                f"cannot read {name!r} of a resolve()d resource: that needs the store"
            )
        table: dict[str, tuple[tuple[str, str, bool], ...]] = {}
        out: set[str] = set()
        known = False
        for t in btypes - {ANY}:
            if t in PRIMITIVES:
                continue
            spec = _elements(t).get(name)
            if spec is None:
                continue
            known = True
            entries = _entries(spec, only)
            if entries:
                table[t] = entries
                out.update(ANY if res else child for _, child, res in entries)
        dynamic = ANY in btypes
        if not known and not dynamic:
            where = ", ".join(sorted(_fhir_code(t) for t in btypes))
            raise UnsupportedExpression(f"{where} has no element {name!r}")
        if dynamic:
            out.add(ANY)  # unknown until run time
        if not table and not dynamic:
            return _empty, _NOTHING
        if not dynamic and len(table) == 1:
            ((t, entries),) = table.items()
            if len(entries) == 1 and not entries[0][2]:
                return _step(base, t, entries[0][0], entries[0][1]), frozenset(out)

        def run(items, root):
            found = []
            for value, t in base(items, root):
                entries = table.get(t)
                if entries is None:
                    if not dynamic or type(value) is not dict:
                        continue
                    entries = table[t] = _runtime_entries(t, name, only)
                for key, child, res in entries:
                    x = value.get(key)
                    if x is None:
                        continue
                    if type(x) is list:
                        for e in x:
                            if e is not None:
                                found.append((e, e.get("resourceType") if res else child))
                    else:
                        found.append((x, x.get("resourceType") if res else child))
            return found

        return run, frozenset(out)

    def index(self, node, types):
        base, btypes = self.compile(node[1], types)
        idx = node[2]
        if idx[0] != "lit" or idx[2] != "integer":
            raise UnsupportedExpression("only integer literals may index a collection")
        i = idx[1]
        return (lambda items, root: base(items, root)[i : i + 1]), btypes

    def operand(self, operand, types) -> tuple[Fn, frozenset[str]]:
        """An ``as``/``is``/``ofType`` operand: an expression, or the focus if None."""
        return (_identity, types) if operand is None else self.compile(operand, types)

    def type_op(self, op: str, operand, spec: str, types):
        """``x is T`` / ``x.is(T)`` (true or false for one item), or ``x as T`` /
        ``x.as(T)`` / ``x.ofType(T)`` (the items of ``x`` of type T)."""
        if op != "is":
            return self.as_type(operand, spec, types)
        base, btypes = self.operand(operand, types)
        passing, _ = _matching(btypes, spec)

        def run(items, root):
            got = base(items, root)
            return [(got[0][1] in passing, "boolean")] if len(got) == 1 else []

        return run, _BOOLEAN

    def as_type(self, operand, spec: str, types):
        test = _type_test(spec)
        if operand is not None and (
            operand[0] == "member" or (operand[0] == "id" and not operand[1][0].isupper())
        ):
            # fused with the path step: read only the matching choice variants
            base, btypes = (
                self.compile(operand[1], types) if operand[0] == "member" else (_identity, types)
            )
            fn, ftypes = self.member(base, btypes, operand[-1], only=test)
        else:
            fn, ftypes = self.operand(operand, types)
        passing, out = _matching(ftypes, spec)
        if not out:
            return _empty, _NOTHING
        if ftypes <= passing:
            return fn, out

        def run(items, root):
            return [item for item in fn(items, root) if item[1] in passing]

        return run, out

    def binary(self, op: str, left, right, types):
        lfn, ltypes = self.compile(left, types)
        rfn, rtypes = self.compile(right, types)
        if op == "|":
            if not ltypes:
                return rfn, rtypes
            if not rtypes:
                return lfn, ltypes

            def union(items, root):
                a = lfn(items, root)
                b = rfn(items, root)
                return _dedupe(a + b) if a and b else a or b

            return union, ltypes | rtypes
        if op in ("=", "!="):
            negate = op == "!="
            if not ltypes or not rtypes:
                return _empty, _NOTHING
            if right[0] == "lit":  # the common ``where(system = 'phone')``
                literal = right[1]

                def equals_literal(items, root):
                    a = lfn(items, root)
                    if not a:
                        return []
                    same = len(a) == 1 and _equal(a[0][0], literal)
                    return [(same is not negate, "boolean")]

                return equals_literal, _BOOLEAN

            def equals(items, root):
                a = lfn(items, root)
                b = rfn(items, root)
                if not a or not b:
                    return []
                same = len(a) == len(b) and all(
                    _equal(x[0], y[0]) for x, y in zip(a, b, strict=True)
                )
                return [(same is not negate, "boolean")]

            return equals, _BOOLEAN
        logic = _LOGIC.get(op)
        if logic is None:
            raise UnsupportedExpression(f"operator {op!r} is not supported")

        def run(items, root):
            result = logic(_truth(lfn(items, root)), lambda: _truth(rfn(items, root)))
            return [] if result is None else [(result, "boolean")]

        return run, _BOOLEAN

    def call(self, base: Fn, btypes: frozenset[str], name: str, args: list):
        arity = _ARITY.get(name)
        if arity is None:
            raise UnsupportedExpression(f"function {name}() is not supported")
        if len(args) not in arity:
            counts = " or ".join(map(str, arity))
            raise UnsupportedExpression(f"{name}() takes {counts} arguments, not {len(args)}")
        if name in ("where", "select", "exists") and args:
            crit, ctypes = self.compile(args[0], btypes)
            if name == "select":
                return _select(base, crit), ctypes
            filtered = _where(base, crit)
            if name == "where":
                return filtered, btypes
            return _exists(filtered), _BOOLEAN
        if name == "exists":
            return _exists(base), _BOOLEAN
        if name == "empty":
            return (lambda items, root: [(not base(items, root), "boolean")]), _BOOLEAN
        if name == "not":

            def negate(items, root):
                value = _truth(base(items, root))
                return [] if value is None else [(not value, "boolean")]

            return negate, _BOOLEAN
        if name == "first":
            return (lambda items, root: base(items, root)[:1]), btypes
        if name == "last":
            return (lambda items, root: base(items, root)[-1:]), btypes
        if name == "count":
            return (lambda items, root: [(len(base(items, root)), "integer")]), _INTEGER
        if name == "resolve":
            return _resolve(base), (frozenset({REF}) if btypes else _NOTHING)
        if name in ("extension", "hasExtension"):
            return self.extension(base, btypes, _string_arg(args[0]), name == "hasExtension")
        return self.children(base, btypes)

    def extension(self, base: Fn, btypes: frozenset[str], url: str, has: bool):
        if btypes & PRIMITIVES:
            raise UnsupportedExpression("extensions of primitive values are not supported")
        fn, types = self.member(base, btypes, "extension")

        def run(items, root):
            return [item for item in fn(items, root) if item[0].get("url") == url]

        if has:
            return _exists(run), _BOOLEAN
        return run, types

    def children(self, base: Fn, btypes: frozenset[str]):
        if ANY in btypes or REF in btypes:
            raise UnsupportedExpression("children() of a resource of unknown type")
        parts = [
            self.member(base, frozenset({t}), element)
            for t in btypes - PRIMITIVES
            for element in _elements(t)
        ]
        fns = [fn for fn, _ in parts]

        def run(items, root):
            return [item for fn in fns for item in fn(items, root)]

        return run, frozenset().union(*(types for _, types in parts))


def _entries(spec, only) -> tuple[tuple[str, str, bool], ...]:
    """(JSON key, type key, is a resource) of each variant of an element that ``only``
    accepts (a contained resource's type is checked at run time)."""
    return tuple(
        (key, child, child == "Resource")
        for key, child in spec
        if only is None or child == "Resource" or only(child)
    )


def _runtime_entries(t: str, name: str, only) -> tuple[tuple[str, str, bool], ...]:
    """Member entries for a type met only at run time (a resource in ``Bundle.entry``)."""
    try:
        return _entries(_elements(t).get(name, ()), only)
    except UnsupportedExpression:
        return ()


def _step(base: Fn, t: str, key: str, child: str) -> Fn:
    """A path step reading one JSON key of items of one type (the common case)."""

    def run(items, root):
        found = []
        for value, vt in base(items, root):
            if vt == t and (x := value.get(key)) is not None:
                if type(x) is list:
                    found.extend([(e, child) for e in x if e is not None])
                else:
                    found.append((x, child))
        return found

    return run


def _where(base: Fn, crit: Fn) -> Fn:
    return lambda items, root: [i for i in base(items, root) if _truth(crit([i], root)) is True]


def _select(base: Fn, crit: Fn) -> Fn:
    return lambda items, root: [o for i in base(items, root) for o in crit([i], root)]


def _exists(base: Fn) -> Fn:
    return lambda items, root: [(bool(base(items, root)), "boolean")]


def _resolve(base: Fn) -> Fn:
    def run(items, root):
        out = []
        for value, _ in base(items, root):
            target = _reference_type(value, root)
            if target is not None:
                out.append((value, target))
        return out

    return run


def _and(a, b):
    if a is False:
        return False
    b = b()
    if b is False:
        return False
    return True if a is True and b is True else None


def _or(a, b):
    if a is True:
        return True
    b = b()
    if b is True:
        return True
    return False if a is False and b is False else None


def _xor(a, b):
    b = b()
    return None if a is None or b is None else a is not b


def _implies(a, b):
    if a is False:
        return True
    b = b()
    if a is True:
        return b
    return True if b is True else None


_LOGIC = {"and": _and, "or": _or, "xor": _xor, "implies": _implies}
_ARITY = {
    "where": (1,),
    "select": (1,),
    "exists": (0, 1),
    "empty": (0,),
    "not": (0,),
    "first": (0,),
    "last": (0,),
    "count": (0,),
    "resolve": (0,),
    "extension": (1,),
    "hasExtension": (1,),
    "children": (0,),
}


# ---------------------------------------------------------------- public
class Compiled:
    """A compiled expression: call it on a resource for its result :class:`Node` s."""

    __slots__ = ("expression", "type_", "types", "_fn", "_keys", "_root_types", "_codes")

    def __init__(self, expression, type_, fn, keys, root_types):
        self.expression: str = expression
        #: The resource type it was compiled for (None: any).
        self.type_: str | None = type_
        #: The FHIR type codes its results may have (``*``: known only at run time).
        self.types: frozenset[str] = frozenset(k if k == ANY else _fhir_code(k) for k in keys)
        self._fn = fn
        self._codes = {k: _fhir_code(k) for k in keys if k not in (ANY, REF)}
        self._keys = keys
        self._root_types = root_types

    def __repr__(self) -> str:
        return f"<Compiled {self.expression!r} for {self.type_ or 'any type'}>"

    def __call__(self, resource: dict) -> list[Node]:
        """The results of the expression on ``resource`` (a top-level resource)."""
        codes = self._codes
        return [
            Node(v, codes.get(t) or _fhir_code(t), (t, resource))
            for v, t in self._fn([(resource, resource.get("resourceType"))], resource)
        ]

    def on(self, node: Node) -> list[Node]:
        """The results of a component expression (compiled ``within`` its composite's
        expression) on one result ``node`` of that expression."""
        key, root = node.context
        codes = self._codes
        return [
            Node(v, codes.get(t) or _fhir_code(t), (t, root))
            for v, t in self._fn([(node.value, key)], root)
        ]


def compile(expression: str, type_: str | None = None, *, within: Compiled | None = None):
    """Compile a SearchParameter FHIRPath ``expression`` into a :class:`Compiled`.

    ``type_`` is the resource type the result will be called on: union branches rooted
    at other types are dropped and every path is typed statically. ``within`` compiles
    a composite's component expression relative to each result of the parent
    expression (evaluate it with :meth:`Compiled.on`). Raises
    :class:`UnsupportedExpression` with the reason when it cannot compile.
    """
    if within is not None:
        focus, root_types = within._keys, within._root_types
        type_ = within.type_
    else:
        root_types = frozenset({type_}) if type_ else frozenset({ANY})
        focus = root_types
    try:
        tree = _Parser(expression).parse()
        fn, keys = _Compiler(root_types).compile(tree, focus)
    except UnsupportedExpression as exc:
        raise UnsupportedExpression(f"{expression!r}: {exc}") from None
    if REF in keys:
        raise UnsupportedExpression(
            f"{expression!r}: resolve() may only be type-tested (resolve() is T)"
        )
    return Compiled(expression, type_, fn, keys, root_types)
