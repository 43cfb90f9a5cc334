"""AuditEvent records shaped after IHE BALP (Basic Audit Log Patterns).

One record per interaction: ``type``/``subtype`` say what was done (a RESTful
interaction, an operation, a token request), ``action`` and ``outcome`` how it went,
``agent`` who asked (the client as *Source Role ID*, its member organisation, the end
user when the token names one, this server as *Destination Role ID*), ``source`` is
this server, ``entity`` what was touched (each resource version, the patients, and
the query of a search, and the Consents or default policy that decided what the
caller saw), ``purposeOfEvent`` why. A break-glass purpose also puts its code in
``meta.security``, and a break-glass override of a patient's refusal the code ``BTG``,
so auditors list those events with ``_security``.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass

from hie.access.principal import Principal
from hie.access.purpose import BREAK_GLASS, BREAK_GLASS_LABEL
from hie.access.purpose import SYSTEM as PURPOSE_SYSTEM
from hie.fhir.search.dates import now, to_fhir_instant

DCM = "http://dicom.nema.org/resources/ontology/DCM"
REST = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"}
INTERACTION_SYSTEM = "http://hl7.org/fhir/restful-interaction"
OPERATION_SYSTEM = "http://hie.example/fhir/CodeSystem/operation"
CLIENT_SYSTEM = "http://hie.example/fhir/sid/client-id"
LOGIN = {"system": DCM, "code": "110114"}
LOGIN_SUBTYPE = {"system": DCM, "code": "110122"}
SECURITY_ALERT = {"system": DCM, "code": "110113"}
SECURITY_CHANGED = {"system": DCM, "code": "110137"}
_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_ENTITY_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_PATIENT = (
    {"system": _ENTITY_TYPE, "code": "1"},
    {"system": _ENTITY_ROLE, "code": "1"},
)
_RESOURCE = (
    {"system": _ENTITY_TYPE, "code": "2"},
    {"system": _ENTITY_ROLE, "code": "4"},
)
_QUERY = (
    {"system": _ENTITY_TYPE, "code": "2"},
    {"system": _ENTITY_ROLE, "code": "24"},
)
#: A Consent (or the default policy) that decided what the caller saw.
_POLICY = (
    {"system": _ENTITY_TYPE, "code": "2"},
    {"system": _ENTITY_ROLE, "code": "13", "display": "Security Resource"},
)
#: Consent entities named one by one in a record; more are summed up.
MAX_POLICY_ENTITIES = 20

_SOURCE_ROLE = {"system": DCM, "code": "110153"}
_DESTINATION_ROLE = {"system": DCM, "code": "110152"}
_ORGANIZATION_ROLE = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-RoleClass",
    "code": "PROV",
}
_HUMAN_USER = {
    "system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
    "code": "humanuser",
}
_APPLICATION_SERVER = {
    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
    "code": "4",
}

#: AuditEvent.action of each RESTful interaction (C create, R read, U update,
#: D delete, E execute: searches, operations, bundles).
ACTIONS = {
    "create": "C",
    "read": "R",
    "vread": "R",
    "update": "U",
    "patch": "U",
    "delete": "D",
    "history-instance": "R",
    "history-type": "R",
    "history-system": "R",
    "search": "E",
    "search-type": "E",
    "search-system": "E",
    "transaction": "E",
    "batch": "E",
    "operation": "E",
}


@dataclass(frozen=True, slots=True)
class Where:
    """The request's circumstances: this server's base URL and the caller's address."""

    base: str
    address: str | None


def outcome_code(status: int) -> str:
    """AuditEvent.outcome for an HTTP status: 0 success, 4 minor failure (the
    request was refused or invalid), 8 serious failure (the server failed)."""
    if status < 400:
        return "0"
    return "4" if status < 500 else "8"


def operation_coding(name: str) -> dict:
    """The subtype coding naming an operation (``$verify``) or a non-FHIR endpoint."""
    return {"system": OPERATION_SYSTEM, "code": name}


def audit_event(
    where: Where,
    principal: Principal | None,
    subtype: str,
    *,
    status: int,
    detail: str | None = None,
    resources: Iterable[str] = (),
    patients: Iterable[str] = (),
    query: str | None = None,
    kind: dict = REST,
    subtype_coding: dict | None = None,
    action: str | None = None,
) -> dict:
    """An AuditEvent for one interaction. ``subtype``: a restful-interaction code
    (``subtype_coding`` replaces it for operations and logins); ``resources``:
    references (``Type/id/_history/v``) of what was touched; ``patients``:
    ``Patient/<id>`` the data concerns; ``query``: the query string of a search."""
    coding = subtype_coding or {"system": INTERACTION_SYSTEM, "code": subtype}
    event: dict = {
        "resourceType": "AuditEvent",
        "type": kind,
        "subtype": [coding],
        "action": action or ACTIONS.get(subtype, "E"),
        "recorded": to_fhir_instant(now()),
        "outcome": outcome_code(status),
    }
    if detail:
        event["outcomeDesc"] = detail[:2000]
    reasons, overrode = (
        principal.consent.drain() if principal and principal.consent else ({}, False)
    )
    if principal is not None:
        event["purposeOfEvent"] = [_purpose(principal.purpose)]
        security = []
        if principal.purpose in BREAK_GLASS:
            security.append(_purpose(principal.purpose)["coding"][0])
        if overrode and principal.purpose != "BTG":
            security.append(BREAK_GLASS_LABEL)
        if security:
            event["meta"] = {"security": security}
    event["agent"] = _agents(where, principal)
    event["source"] = {
        "site": where.base,
        "observer": {"display": "HIE FHIR server"},
        "type": [_APPLICATION_SERVER],
    }
    entities = [_entity(ref, _RESOURCE) for ref in resources]
    entities += [_entity(ref, _PATIENT) for ref in dict.fromkeys(patients)]
    if query is not None:
        entities.append(
            {
                "type": _QUERY[0],
                "role": _QUERY[1],
                "description": query[:2000],
                "query": base64.b64encode(query.encode()).decode(),
            }
        )
    entities += _policies(reasons)
    if entities:
        event["entity"] = entities
    return event


def _policies(reasons: dict[str, str]) -> list[dict]:
    """Entities naming what decided, per reason: the Consent, or the policy by name."""
    out = []
    for reason, by in list(reasons.items())[:MAX_POLICY_ENTITIES]:
        what = {"reference": by} if by.startswith("Consent/") else {"display": by}
        out.append({"what": what, "type": _POLICY[0], "role": _POLICY[1], "description": reason})
    if len(reasons) > MAX_POLICY_ENTITIES:
        more = len(reasons) - MAX_POLICY_ENTITIES
        out.append(
            {
                "what": {"display": "further Consents"},
                "type": _POLICY[0],
                "role": _POLICY[1],
                "description": f"{more} further Consent decisions not listed",
            }
        )
    return out


def _purpose(code: str) -> dict:
    return {"coding": [{"system": PURPOSE_SYSTEM, "code": code}]}


def _entity(reference: str, roles: tuple[dict, dict]) -> dict:
    return {"what": {"reference": reference}, "type": roles[0], "role": roles[1]}


def _agents(where: Where, principal: Principal | None) -> list[dict]:
    client: dict = {"type": {"coding": [_SOURCE_ROLE]}}
    if principal is None:
        client["who"] = {"display": "unauthenticated caller"}
        client["requestor"] = True
    else:
        client["who"] = {"identifier": {"system": CLIENT_SYSTEM, "value": principal.client_id}}
        client["altId"] = principal.client_id
        client["requestor"] = principal.user is None
        if principal.token_id:
            client["policy"] = [principal.token_id]
        client["purposeOfUse"] = [_purpose(principal.purpose)]
    if where.address:
        client["network"] = {"address": where.address, "type": "2"}
    agents = [client]
    if principal is not None and principal.organization:
        agents.append(
            {
                "type": {"coding": [_ORGANIZATION_ROLE]},
                "who": {"reference": principal.organization},
                "requestor": False,
            }
        )
    if principal is not None and principal.user:
        user: dict = {
            "type": {"coding": [_HUMAN_USER]},
            "who": {"identifier": {"value": principal.user}, "display": principal.user},
            "name": principal.user,
            "requestor": True,
            "purposeOfUse": [_purpose(principal.purpose)],
        }
        if principal.user_role:
            user["role"] = [{"text": principal.user_role}]
        agents.append(user)
    agents.append(
        {
            "type": {"coding": [_DESTINATION_ROLE]},
            "who": {"identifier": {"value": where.base}},
            "requestor": False,
            "network": {"address": where.base, "type": "5"},
        }
    )
    return agents
