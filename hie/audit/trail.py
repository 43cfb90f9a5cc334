"""The audit trail of one request: every path that serves a request records through
it, so that each interaction (and each entry of a Bundle) leaves an AuditEvent, and a
change commits together with its record.

Reads and searches record *before* their response is sent: when the record cannot be
written, the caller gets 503 and no data. Writes hand their store writes to
:meth:`Trail.commit`, which commits them in the same atomic store commit as their
audit records.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import orjson

from hie.access.patients import PatientLinks
from hie.access.principal import Principal
from hie.audit.events import Where, audit_event
from hie.audit.log import AuditLog, AuditUnavailable
from hie.fhir.errors import FhirError, error
from hie.store import Store, Version, Write

log = logging.getLogger("hie.audit")


class Trail:
    """Collects and writes the AuditEvents of one request. ``audit`` None: auditing
    is off (local development only); changes are then committed alone."""

    def __init__(
        self, audit: AuditLog | None, store: Store, links: PatientLinks, where: Where
    ) -> None:
        self._audit = audit
        self._store = store
        self._links = links
        self.where = where
        #: The caller, once authenticated (None: unknown, e.g. no or bad token).
        self.principal: Principal | None = None

    def event(self, subtype: str, **details) -> dict:
        """An AuditEvent of this request's caller (see :func:`audit_event`); nothing
        when auditing is off."""
        if self._audit is None:
            return {}
        return audit_event(self.where, self.principal, subtype, **details)

    def touched(self, versions: Iterable[Version]) -> dict:
        """``resources`` and ``patients`` arguments of :meth:`event` for versions
        read, returned or written (nothing when auditing is off)."""
        if self._audit is None:
            return {}
        resources, patients = [], []
        for v in versions:
            resources.append(f"{v.type}/{v.id}/_history/{v.version}")
            if v.body is not None:
                patients.extend(self._links.of(v.type, orjson.loads(v.body)))
        return {"resources": resources, "patients": patients}

    async def record(self, *events: dict) -> None:
        """Write ``events`` durably; 503 if they cannot be written."""
        if self._audit is None:
            return
        try:
            await self._audit.append(events)
        except AuditUnavailable as exc:
            raise _unavailable(exc) from None

    async def commit(self, writes: Sequence[Write], events: Sequence[dict]) -> None:
        """Commit ``writes`` and ``events`` atomically (store conflicts propagate as
        they would from :meth:`Store.commit`); 503 if the audit cannot be written."""
        if self._audit is None:
            await self._store.commit(writes)
            return
        try:
            await self._audit.append(events, writes)
        except AuditUnavailable as exc:
            raise _unavailable(exc) from None

    async def failed(self, subtype: str, exc: FhirError, **details) -> None:
        """Record a refused or failed interaction (its error answers the caller)."""
        detail = "; ".join(i.diagnostics for i in exc.issues)
        await self.record(self.event(subtype, status=exc.status, detail=detail, **details))


def _unavailable(exc: Exception) -> FhirError:
    log.error("audit record not written: %s", exc.__cause__ or exc)
    return error(
        503,
        "transient",
        "The audit log cannot be written, so the request was not carried out; retry later",
    )
