"""The CapabilityStatement, generated from what the server actually implements:
the served types, the interactions the router handles, each type's search
parameters and the formats negotiated in :mod:`hie.fhir.http`."""

from __future__ import annotations

from hie import __version__
from hie.fhir.search.dates import now, to_fhir_instant
from hie.fhir.search.params import params_for
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
SYSTEM_INTERACTIONS = ("transaction", "batch", "history-system")


def capability_statement(base: str, auth: bool) -> dict:
    """The server's CapabilityStatement for clients reaching it at ``base``."""
    resources = []
    for type_ in sorted(served_types()):
        resources.append(
            {
                "type": type_,
                "profile": f"http://hl7.org/fhir/StructureDefinition/{type_}",
                "interaction": [{"code": code} for code in TYPE_INTERACTIONS],
                "versioning": "versioned-update",
                "readHistory": True,
                "updateCreate": True,
                "conditionalCreate": True,
                "conditionalRead": "full-support",
                "conditionalUpdate": True,
                "conditionalDelete": "single",
                "referencePolicy": ["literal", "logical"],
                "searchParam": [
                    {"name": p.name, "type": p.type, "documentation": p.documentation}
                    for p in params_for(type_).values()
                ],
            }
        )
    rest: dict = {
        "mode": "server",
        "resource": resources,
        "interaction": [{"code": code} for code in SYSTEM_INTERACTIONS],
    }
    if auth:
        rest["security"] = {
            "cors": False,
            "description": "Every request except this CapabilityStatement needs an "
            "'Authorization: Bearer' token whose SMART scopes (system/Type.cruds, or "
            "v1 .read/.write) permit the interaction.",
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
