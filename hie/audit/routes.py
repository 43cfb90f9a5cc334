"""The audit log's operations: ``AuditEvent/$verify`` (check the hash chain and its
seals) and ``Patient/{id}/$access-report``. Both are for clients with the auditor
role, and are audited themselves."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from hie.access.decision import require
from hie.access.principal import Principal
from hie.audit.events import operation_coding
from hie.audit.report import access_report
from hie.audit.trail import Trail
from hie.audit.verify import verify
from hie.fhir.errors import error
from hie.fhir.http import fhir_response
from hie.fhir.routes import base_url, operation

router = APIRouter(prefix="/fhir")
VERIFY = operation_coding("$verify")
ACCESS_REPORT = operation_coding("$access-report")


@router.get("/AuditEvent/$verify")
@router.post("/AuditEvent/$verify")
async def verify_chain(request: Request) -> Response:
    """Verify the whole audit chain; names the first record altered, removed or
    reordered."""

    async def run(principal: Principal, trail: Trail) -> dict:
        require(principal, "r", "AuditEvent")
        for key in request.query_params:
            if key not in ("_format", "_pretty"):
                raise error(400, "not-supported", f"Unknown parameter {key!r} for $verify")
        state = request.app.state
        report = await verify(state.store, state.keys)
        await trail.record(trail.event("operation", status=200, subtype_coding=VERIFY))
        return report.to_parameters()

    fmt, result = await operation(request, VERIFY, run)
    return fhir_response(200, result, fmt)


@router.get("/Patient/{patient_id}/$access-report")
async def report(request: Request, patient_id: str) -> Response:
    """Who accessed this patient's data, when, why and with what outcome."""

    async def run(principal: Principal, trail: Trail) -> dict:
        require(principal, "s", "AuditEvent")
        service = request.app.state.service
        params = list(request.query_params.multi_items())
        result = await access_report(service, principal, patient_id, params, base_url(request))
        await trail.record(
            trail.event(
                "operation",
                status=200,
                subtype_coding=ACCESS_REPORT,
                patients=[f"Patient/{patient_id}"],
            )
        )
        return result

    fmt, result = await operation(request, ACCESS_REPORT, run)
    return fhir_response(200, result, fmt)
