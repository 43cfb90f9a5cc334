"""The search parameters in effect, with the extractors that compute their values.

Built from the official R4 definitions shipped in ``conformance/r4/`` (see its
``SOURCE.md``), then the alliance's SearchParameter resources in ``conformance/*.json``
(a SearchParameter or a Bundle of them per file), then custom ones added at run time
with :meth:`Registry.add`. Definitions for resource types the server does not serve
are skipped, and so are the special parameters the search engine handles itself
(``_text``, ``_content``, ``_query``, ``_list``, ``_has``). Expressions are compiled
lazily, per resource type, on the first call of :meth:`Registry.extractor`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType

import orjson

from hie.fhir.search.fhirpath import ANY, Compiled, Node, UnsupportedExpression, compile
from hie.fhir.types import r4_resource_types, served_types

PARAM_TYPES = frozenset(
    {"number", "date", "string", "token", "reference", "composite", "quantity", "uri", "special"}
)
COMPARATORS = frozenset({"eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"})
#: Parameters the search engine implements itself, never from a definition.
ENGINE_PARAMS = frozenset({"_text", "_content", "_query", "_list", "_has"})
#: The compartments R4 defines, by compartment type.
COMPARTMENTS = ("Patient", "Encounter", "RelatedPerson", "Practitioner", "Device")
#: What a custom parameter's expression must be able to yield, by parameter type.
VALUE_TYPES = {
    "number": {"decimal", "integer", "positiveInt", "unsignedInt", "Range", "Quantity"},
    "date": {"date", "dateTime", "instant", "Period", "Timing"},
    "string": {"string", "markdown", "code", "id", "uri", "url", "canonical"}
    | {"HumanName", "Address"},
    "token": {"code", "Coding", "CodeableConcept", "Identifier", "ContactPoint", "boolean"}
    | {"id", "string", "uri", "url", "canonical", "oid", "uuid"},
    "reference": {"Reference", "canonical", "uri", "url"},
    "quantity": {"Quantity", "Age", "Duration", "Distance", "Count", "Money", "Range"}
    | {"SampledData"},
    "uri": {"uri", "url", "canonical", "oid", "uuid"},
}
_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_NOT_DOMAIN = frozenset({"Bundle", "Binary", "Parameters"})
_R4 = "r4/Bundle-searchParams.json"
#: Types whose official parameters are indexed only in part: the audit log writes an
#: AuditEvent for every request, and each indexed value is written with it, so it
#: indexes what auditors search by (the alliance's ``purpose`` and custom parameters
#: added at run time come on top). Other official AuditEvent parameters are unknown
#: to this server: not in the CapabilityStatement, ignored or refused like any other.
INDEXED_ONLY = {
    "AuditEvent": frozenset(
        {
            "_id",
            "_lastUpdated",
            "_security",
            "action",
            "agent",
            "altid",
            "date",
            "entity",
            "outcome",
            "patient",
            "subtype",
        }
    )
}
_SHARED_LINE = re.compile(r"^\* \[(\w+)\]\([^)]*\): (.*)$", re.MULTILINE)


class InvalidSearchParameter(ValueError):
    """A SearchParameter resource the registry cannot serve; the message says why."""


@dataclass(frozen=True, slots=True)
class ParamDef:
    """One search parameter definition (a SearchParameter resource, digested)."""

    code: str
    type: str
    url: str
    description: str
    base: tuple[str, ...]
    expression: str
    #: Resource types a reference parameter may point to.
    targets: tuple[str, ...] = ()
    #: Of a composite: (component parameter code, expression relative to each value).
    components: tuple[tuple[str, str], ...] = ()
    modifiers: tuple[str, ...] = ()
    comparators: tuple[str, ...] = ()
    multiple_or: bool | None = None
    multiple_and: bool | None = None


def _read(name: str):
    return orjson.loads(resources.files("hie.conformance").joinpath(name).read_bytes())


def _search_parameters(data) -> list[dict]:
    """The SearchParameter resources in a resource or a Bundle."""
    if not isinstance(data, dict):
        return []
    if data.get("resourceType") == "SearchParameter":
        return [data]
    if data.get("resourceType") == "Bundle":
        entries = (e.get("resource") for e in data.get("entry") or () if isinstance(e, dict))
        return [
            r for r in entries if isinstance(r, dict) and r.get("resourceType") == "SearchParameter"
        ]
    return []


def _strings(resource: dict, key: str) -> tuple[str, ...]:
    value = resource.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidSearchParameter(f"SearchParameter.{key} must be a list of strings")
    return tuple(value)


def _flag(resource: dict, key: str) -> bool | None:
    value = resource.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidSearchParameter(f"SearchParameter.{key} must be a boolean")
    return value


class Registry:
    """The search parameters of every served resource type, and their extractors."""

    def __init__(self, *, alliance: Iterable[dict] | None = None):
        """Load R4's definitions, then ``alliance`` (by default
        :func:`alliance_definitions`)."""
        self._served = served_types()
        self._by_url: dict[str, ParamDef] = {}
        self._by_type: dict[str, dict[str, ParamDef]] = {t: {} for t in self._served}
        self._compiled: dict[tuple[str, str], Compiled] = {}
        self._component_fns: dict[tuple[str, str], tuple] = {}
        self._fingerprint: str | None = None
        r4 = _search_parameters(_read(_R4))
        #: (code, type) of every definition by url, for the components that name them.
        self._known = {r["url"]: (r["code"], r["type"]) for r in r4}
        for resource in r4:
            if resource["code"] not in ENGINE_PARAMS:
                self._register(self._digest(resource, official=True), official=True)
        self._compartments = {code: self._load_compartment(code) for code in COMPARTMENTS}
        for resource in alliance_definitions() if alliance is None else alliance:
            try:
                self.add(resource)
            except InvalidSearchParameter as exc:
                raise InvalidSearchParameter(
                    f"alliance SearchParameter {resource.get('url')}: {exc}"
                ) from None

    # ------------------------------------------------------------ reading
    def params(self, type_: str) -> Mapping[str, ParamDef]:
        """The search parameters of a served resource type, by code (KeyError if the
        type is not served)."""
        return MappingProxyType(self._by_type[type_])

    def extractor(self, type_: str, code: str) -> Compiled:
        """The compiled expression of parameter ``code`` for resources of ``type_``:
        only the part of a multi-type expression that applies to ``type_`` is
        evaluated. Call it on a resource for its values (:class:`Node` s)."""
        key = (type_, code)
        found = self._compiled.get(key)
        if found is None:
            param = self._by_type[type_][code]
            found = self._compiled[key] = compile(param.expression, type_)
        return found

    def components(
        self, type_: str, code: str
    ) -> tuple[tuple[ParamDef, Callable[[Node], list[Node]]], ...]:
        """For a composite parameter, each component's definition and the function
        giving its values on one result (a :class:`Node`) of the composite's
        extractor, in the order of :attr:`ParamDef.components`."""
        found = self._component_fns.get((type_, code))
        if found is None:
            param = self._by_type[type_][code]
            if param.type != "composite":
                raise KeyError(f"{code} on {type_} is a {param.type} parameter, not a composite")
            parent = self.extractor(type_, code)
            found = self._component_fns[(type_, code)] = tuple(
                (self._by_type[type_][part], compile(expr, within=parent).on)
                for part, expr in param.components
            )
        return found

    def compartment(self, comp_type: str) -> dict[str, tuple[str, ...]]:
        """Compartment ``comp_type`` (``Patient``...): for each served resource type
        that can be in it, the parameters linking it to the compartment's resource.
        ``{def}`` means the compartment's resource itself (an Encounter is in its own
        Encounter compartment)."""
        return dict(self._compartments[comp_type])

    def fingerprint(self) -> str:
        """A stable hash of the definitions in effect: when it changes, stored index
        values may be stale and the resources need reindexing."""
        if self._fingerprint is None:
            payload = {
                t: {
                    code: [p.url, p.type, p.expression, p.components, p.targets]
                    for code, p in sorted(params.items())
                }
                for t, params in sorted(self._by_type.items())
            }
            self._fingerprint = hashlib.sha256(orjson.dumps(payload)).hexdigest()
        return self._fingerprint

    # ------------------------------------------------------------ changing
    def add(self, resource: dict) -> ParamDef:
        """Validate a custom SearchParameter resource and put it in effect (replacing
        the one with the same url). Raises :class:`InvalidSearchParameter` saying why
        it cannot be served."""
        if not isinstance(resource, dict) or resource.get("resourceType") != "SearchParameter":
            raise InvalidSearchParameter("not a SearchParameter resource")
        param = self._digest(resource, official=False)
        for type_ in self._types(param.base):
            existing = self._by_type[type_].get(param.code)
            if existing is not None and existing.url != param.url:
                raise InvalidSearchParameter(
                    f"code {param.code!r} is already defined for {type_} by {existing.url}"
                )
        compiled = {t: self._check_expression(param, t) for t in self._types(param.base)}
        self._unregister(param.url)
        self._register(param)
        for type_, found in compiled.items():
            self._compiled[(type_, param.code)] = found
        return param

    # ------------------------------------------------------------ internals
    def _types(self, base: Iterable[str]) -> set[str]:
        """The served types a definition's base list covers."""
        out: set[str] = set()
        for name in base:
            if name == "Resource":
                out |= self._served
            elif name == "DomainResource":
                out |= self._served - _NOT_DOMAIN
            elif name in self._served:
                out.add(name)
        return out

    def _register(self, param: ParamDef, official: bool = False) -> None:
        self._by_url[param.url] = param
        self._known[param.url] = (param.code, param.type)
        shared = _per_type_descriptions(param.description)
        for type_ in self._types(param.base):
            if official and param.code not in INDEXED_ONLY.get(type_, (param.code,)):
                continue
            text = shared.get(type_)
            self._by_type[type_][param.code] = (
                dataclasses.replace(param, description=text) if text else param
            )
        self._fingerprint = None

    def _unregister(self, url: str) -> None:
        old = self._by_url.pop(url, None)
        if old is not None:
            for type_ in self._types(old.base):
                self._by_type[type_].pop(old.code, None)
                self._compiled.pop((type_, old.code), None)
                self._component_fns.pop((type_, old.code), None)

    def _digest(self, resource: dict, *, official: bool) -> ParamDef:
        """A :class:`ParamDef` from a SearchParameter resource; unless ``official``,
        checked for what this server needs to serve it."""
        url, code, type_ = resource.get("url"), resource.get("code"), resource.get("type")
        expression = resource.get("expression")
        base = _strings(resource, "base")
        if not official:
            if not isinstance(url, str) or not url:
                raise InvalidSearchParameter("SearchParameter.url is required")
            if not isinstance(code, str) or not _CODE.fullmatch(code):
                raise InvalidSearchParameter(
                    f"code {code!r} must be a letter then at most 63 letters, digits, "
                    "'-' or '_' (codes starting with '_' are reserved to FHIR)"
                )
            if type_ not in PARAM_TYPES:
                raise InvalidSearchParameter(
                    f"type {type_!r} is not one of {', '.join(sorted(PARAM_TYPES))}"
                )
            if type_ == "special":
                raise InvalidSearchParameter("special parameters need code, not a definition")
            if not isinstance(expression, str) or not expression.strip():
                raise InvalidSearchParameter("SearchParameter.expression is required")
            if not base:
                raise InvalidSearchParameter("SearchParameter.base is required")
            unserved = [b for b in base if not self._types([b])]
            if unserved:
                raise InvalidSearchParameter(
                    f"base type(s) {', '.join(unserved)} not served by this server"
                )
        targets = _strings(resource, "target")
        unknown = set(targets) - set(r4_resource_types()) - {"Resource"}
        if unknown and not official:
            raise InvalidSearchParameter(f"unknown target type(s) {', '.join(sorted(unknown))}")
        comparators = _strings(resource, "comparator")
        if not official and set(comparators) - COMPARATORS:
            bad = ", ".join(sorted(set(comparators) - COMPARATORS))
            raise InvalidSearchParameter(f"unknown comparator(s) {bad}")
        return ParamDef(
            code=code,
            type=type_,
            url=url,
            description=resource.get("description") or "",
            base=base,
            expression=expression,
            targets=targets,
            components=self._parts(resource) if type_ == "composite" else (),
            modifiers=_strings(resource, "modifier"),
            comparators=comparators,
            multiple_or=_flag(resource, "multipleOr"),
            multiple_and=_flag(resource, "multipleAnd"),
        )

    def _parts(self, resource: dict) -> tuple[tuple[str, str], ...]:
        """(code, expression) of each component, the code from the definition it names."""
        components = resource.get("component")
        if not isinstance(components, list) or len(components) < 2:
            raise InvalidSearchParameter("a composite parameter needs at least two components")
        out = []
        for comp in components:
            definition = comp.get("definition") if isinstance(comp, dict) else None
            expression = comp.get("expression") if isinstance(comp, dict) else None
            if not isinstance(definition, str) or not isinstance(expression, str):
                raise InvalidSearchParameter("each component needs a definition and an expression")
            known = self._known.get(definition.partition("|")[0])
            if known is None:
                raise InvalidSearchParameter(f"component definition {definition} is not known")
            if known[1] == "composite":
                raise InvalidSearchParameter(f"component {definition} is itself a composite")
            out.append((known[0], expression))
        return tuple(out)

    def _check_expression(self, param: ParamDef, type_: str) -> Compiled:
        """Compile a custom parameter's expression (and components) for ``type_``."""
        try:
            compiled = compile(param.expression, type_)
            parts = [compile(expr, within=compiled) for _, expr in param.components]
        except UnsupportedExpression as exc:
            raise InvalidSearchParameter(f"expression for {type_}: {exc}") from None
        if not compiled.types:
            raise InvalidSearchParameter(
                f"expression {param.expression!r} yields nothing for {type_}"
            )
        allowed = VALUE_TYPES.get(param.type)
        if allowed is not None and ANY not in compiled.types and not compiled.types & allowed:
            raise InvalidSearchParameter(
                f"a {param.type} parameter needs values of type {', '.join(sorted(allowed))}; "
                f"{param.expression!r} yields {', '.join(sorted(compiled.types))} for {type_}"
            )
        for (code, expr), part in zip(param.components, parts, strict=True):
            if code not in self._by_type[type_]:
                raise InvalidSearchParameter(f"component {code} is not a parameter of {type_}")
            if not part.types:
                raise InvalidSearchParameter(f"component {code} ({expr!r}) yields nothing")
        return compiled

    def _load_compartment(self, code: str) -> dict[str, tuple[str, ...]]:
        name = code[0].lower() + code[1:]
        data = _read(f"r4/CompartmentDefinition-{name}.json")
        return {
            entry["code"]: tuple(entry["param"])
            for entry in data.get("resource", ())
            if entry.get("param") and entry["code"] in self._served
        }


def alliance_definitions() -> list[dict]:
    """The alliance's SearchParameter resources: each ``conformance/*.json`` file holds
    one, or a Bundle of them (files of other resources are ignored)."""
    out: list[dict] = []
    for path in sorted(resources.files("hie.conformance").iterdir(), key=lambda p: p.name):
        if path.name.endswith(".json") and path.is_file():
            out.extend(_search_parameters(orjson.loads(path.read_bytes())))
    return out


def _per_type_descriptions(description: str) -> dict[str, str]:
    """R4 describes a parameter shared by several types as a list of
    ``* [Type](type.html): text`` lines; the text for each type."""
    if not description.startswith("Multiple Resources"):
        return {}
    return {m[1]: m[2].strip() for m in _SHARED_LINE.finditer(description)}


@functools.cache
def default_registry() -> Registry:
    """The process-wide registry (R4 and the alliance's definitions)."""
    return Registry()


#: The care date of each compartment type (``$everything``'s ``start``/``end`` and a
#: Consent's ``dataPeriod`` compare with it) where it is not the type's ``date``
#: parameter; None: the type has no care date.
CARE_DATES: dict[str, str | None] = {
    "Account": "period",
    "Basic": "created",
    "ChargeItem": "occurrence",
    "Claim": "created",
    "ClaimResponse": "created",
    "Communication": "sent",
    "CommunicationRequest": "occurrence",
    "Condition": "onset-date",
    "CoverageEligibilityRequest": "created",
    "CoverageEligibilityResponse": "created",
    "DetectedIssue": "identified",
    "DeviceRequest": "event-date",
    "DocumentManifest": "created",
    "DocumentReference": "period",
    "ExplanationOfBenefit": "created",
    "Goal": "start-date",
    "ImagingStudy": "started",
    "Media": "created",
    "MedicationAdministration": "effective-time",
    "MedicationDispense": "whenhandedover",
    "MedicationRequest": "authoredon",
    "MedicationStatement": "effective",
    "NutritionOrder": "datetime",
    "Provenance": "recorded",
    "QuestionnaireResponse": "authored",
    "RequestGroup": "authored",
    "ServiceRequest": "occurrence",
    "Specimen": "collected",
    "VisionPrescription": "datewritten",
}


def care_date(registry: Registry, type_: str) -> str | None:
    """The care date parameter of ``type_``, if it has one."""
    code = CARE_DATES.get(type_, "date")
    param = registry.params(type_).get(code) if code else None
    return code if param is not None and param.type == "date" else None
