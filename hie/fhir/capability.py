"""The CapabilityStatement, generated from what the server actually implements:
the served types, the interactions the router handles, each type's search
parameters and the formats negotiated in :mod:`hie.fhir.http`."""

from __future__ import annotations

import functools
from importlib import resources

import orjson

from hie import __version__
from hie.access.decision import AUDIT_TYPES
from hie.fhir.search.dates import now, to_fhir_instant
from hie.fhir.search.mdm import MDM
from hie.fhir.search.params import MODIFIERS, may_be_patient
from hie.fhir.search.registry import ParamDef, Registry
from hie.fhir.types import served_types

TYPE_INTERACTIONS = (
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
)
#: What clients may do with the append-only audit log (auditors only).
AUDIT_INTERACTIONS = ("read", "vread", "history-instance", "history-type", "search-type")
SYSTEM_INTERACTIONS = ("transaction", "batch", "history-system", "search-system")
#: Search result parameters every type supports.
RESULT_PARAMS_DOC = (
    "Result parameters: _count, _sort (any non-composite parameter, '-' for descending), "
    "_total (none|estimate|accurate), _include and _revinclude (with :iterate and *), "
    "_summary, _elements. Reverse chaining: _has:Type:reference:parameter. Chaining: "
    "reference.parameter and reference:Type.parameter, up to 4 levels."
)


@functools.cache
def shipped_operations() -> tuple[dict, ...]:
    """The OperationDefinitions of this server's operations (``conformance/``); the
    CapabilityStatement names them by canonical URL."""
    folder = resources.files("hie.conformance")
    return tuple(
        orjson.loads(path.read_bytes())
        for path in sorted(folder.iterdir(), key=str)
        if path.name.startswith("OperationDefinition-") and path.name.endswith(".json")
    )


def _search_param(param: ParamDef) -> dict:
    modifiers = MODIFIERS.get(param.type, ())
    if param.type == "reference" and not may_be_patient(param):
        modifiers = tuple(m for m in modifiers if m != MDM)
    doc = param.description or param.code
    if modifiers:
        doc = f"{doc} Modifiers: {', '.join(':' + m for m in modifiers)}"
        if param.type == "reference":
            doc += ", :[type]"
    out = {"name": param.code, "type": param.type, "documentation": doc}
    if param.url:
        out["definition"] = param.url
    return out


#: Per-type entries by registry fingerprint (they take ~100 ms to build).
_ENTRIES: dict[str, list[dict]] = {}


def _resource_entries(registry: Registry) -> list[dict]:
    fingerprint = registry.fingerprint()
    found = _ENTRIES.get(fingerprint)
    if found is None:
        if len(_ENTRIES) > 8:
            _ENTRIES.clear()
        found = _ENTRIES[fingerprint] = _build_entries(registry)
    return found


def _operations(type_: str | None) -> list[dict]:
    """The shipped operations at system level (``type_`` None) or on ``type_``."""
    return [
        {"name": op["code"], "definition": op["url"], "documentation": op["description"]}
        for op in shipped_operations()
        if (op.get("system") if type_ is None else type_ in op.get("resource", ()))
    ]


def _build_entries(registry: Registry) -> list[dict]:
    entries = []
    served = served_types()
    for type_ in sorted(served):
        params = {c: p for c, p in registry.params(type_).items() if p.type != "special"}
        references = [c for c, p in params.items() if p.type == "reference"]
        revincludes = sorted(
            f"{other}:{c}"
            for other in served
            for c, p in registry.params(other).items()
            if p.type == "reference" and (not p.targets or type_ in p.targets)
        )
        audit = type_ in AUDIT_TYPES
        entry = {
            "type": type_,
            "profile": f"http://hl7.org/fhir/StructureDefinition/{type_}",
            "interaction": [
                {"code": code} for code in (AUDIT_INTERACTIONS if audit else TYPE_INTERACTIONS)
            ],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": not audit,
            "conditionalCreate": not audit,
            "conditionalRead": "full-support",
            "conditionalUpdate": not audit,
            "conditionalDelete": "not-supported" if audit else "single",
            "referencePolicy": ["literal", "logical"],
            "searchInclude": ["*", *(f"{type_}:{c}" for c in sorted(references))],
            "searchRevInclude": ["*", *revincludes],
            "searchParam": [_search_param(p) for _, p in sorted(params.items())],
        }
        if audit:
            entry["documentation"] = (
                "Append-only, written by the server for every interaction; readable by "
                "clients with the auditor role."
            )
        if operations := _operations(type_):
            entry["operation"] = operations
        entries.append(entry)
    return entries


def capability_statement(base: str, auth: bool, registry: Registry) -> dict:
    """The server's CapabilityStatement for clients reaching it at ``base``."""
    rest: dict = {
        "mode": "server",
        "documentation": RESULT_PARAMS_DOC,
        "resource": _resource_entries(registry),
        "interaction": [{"code": code} for code in SYSTEM_INTERACTIONS],
        "searchParam": [
            _search_param(p)
            for c, p in sorted(registry.params("Patient").items())
            if c.startswith("_")
        ],
        "operation": _operations(None),
    }
    if auth:
        root = base.removesuffix("/fhir")
        rest["security"] = {
            "extension": [
                {
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{"url": "token", "valueUri": f"{root}/auth/token"}],
                }
            ],
            "cors": False,
            "service": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                            "code": "SMART-on-FHIR",
                        }
                    ]
                }
            ],
            "description": "Every request except this CapabilityStatement and the SMART "
            "configuration needs an 'Authorization: Bearer' token from the token endpoint "
            "(SMART Backend Services: client_credentials with a private_key_jwt assertion) "
            "whose SMART scopes (system/Type.cruds, or v1 .read/.write) permit the "
            "interaction. Members change only what they wrote. Purpose of use: the "
            "X-Purpose-Of-Use header (v3 PurposeOfUse code), default TREAT.",
        }
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": to_fhir_instant(now())[:10],
        "publisher": "HIE",
        "kind": "instance",
        "software": {"name": "HIE", "version": __version__},
        "implementation": {"description": "HIE FHIR R4 server", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [rest],
    }
