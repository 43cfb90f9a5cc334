"""``Patient/{id}/$access-report``: who accessed a patient's data, when, why and with
what outcome, read from the audit log (for auditors, and for a patient's request under
the Personal Information Protection Law)."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from hie.access.principal import Principal
from hie.access.purpose import BREAK_GLASS
from hie.fhir.errors import error
from hie.fhir.service import FhirService, check_id
from hie.store import Version

#: Parameters the report takes.
REPORT_PARAMS = frozenset({"date", "_count", "_offset", "_format", "_pretty"})
DEFAULT_COUNT = 100


async def access_report(
    service: FhirService,
    principal: Principal,
    patient_id: str,
    params: Sequence[tuple[str, str]],
    base: str,
) -> dict:
    """A ``Parameters`` resource listing the audited accesses to ``Patient/<id>``'s
    data, newest first: ``total``, then one ``access`` part per AuditEvent (``date``
    filters by time, ``_count``/``_offset`` page)."""
    check_id(patient_id)
    for key, _ in params:
        if key not in REPORT_PARAMS:
            raise error(400, "not-supported", f"Unknown parameter {key!r} for $access-report")
    if await service.store.read("Patient", patient_id) is None:
        raise error(404, "not-found", f"Patient/{patient_id} is not known")
    items = [("patient", f"Patient/{patient_id}"), ("_sort", "-date"), ("_total", "accurate")]
    items += [(k, v) for k, v in params if k in ("date", "_offset")]
    count = [v for k, v in params if k == "_count"]
    items.append(("_count", count[-1] if count else str(DEFAULT_COUNT)))
    req = service.parse("AuditEvent", items, strict=True)
    found = await service.search(principal, "AuditEvent", req, base=base)
    parts = [{"name": "patient", "valueReference": {"reference": f"Patient/{patient_id}"}}]
    parts.append({"name": "total", "valueInteger": found.total or 0})
    parts += [_access(v) for v in found.matches]
    return {"resourceType": "Parameters", "parameter": parts}


def _access(version: Version) -> dict:
    """One ``access`` part summarising an AuditEvent."""
    event = orjson.loads(version.body)
    part = [
        {"name": "when", "valueInstant": event["recorded"]},
        {"name": "event", "valueReference": {"reference": f"AuditEvent/{version.id}"}},
        {"name": "action", "valueCode": event["action"]},
        {"name": "interaction", "valueCode": event["subtype"][0]["code"]},
        {"name": "outcome", "valueCode": event["outcome"]},
    ]
    for agent in event.get("agent", []):
        role = agent["type"]["coding"][0]["code"]
        who = agent.get("who", {})
        if role == "110153" and "altId" in agent:
            part.append({"name": "client", "valueString": agent["altId"]})
        elif role == "PROV" and "reference" in who:
            part.append({"name": "organization", "valueReference": who})
        elif role == "humanuser":
            part.append({"name": "user", "valueString": agent.get("name", "")})
    for purpose in event.get("purposeOfEvent", []):
        coding = purpose["coding"][0]
        part.append({"name": "purpose", "valueCoding": coding})
        part.append({"name": "breakGlass", "valueBoolean": coding["code"] in BREAK_GLASS})
    for entity in event.get("entity", []):
        what = entity.get("what", {}).get("reference")
        if what and entity["role"]["code"] == "4":
            part.append({"name": "resource", "valueReference": {"reference": what}})
    return {"name": "access", "part": part}
