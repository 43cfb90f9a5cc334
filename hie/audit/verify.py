"""Verification of the audit chain: walks every record and seal once, in sequence
order, in pages (memory does not grow with the log), and names the first problem.

The walk covers the chain up to the head read when it starts, so it runs beside a
live server: records and seals committed meanwhile are left for the next run (one
that the newest head does not account for is reported as inserted).

A record altered in place breaks its successor's link. Which side changed is told by
what follows: if the successor is confirmed (by its seal, or by the next record still
linking to it) the earlier record was altered, otherwise the successor's link; with
nothing after it the earlier record is named with that doubt. A chain rewritten
consistently after an alteration keeps every link but not the signed hash of the next
seal, which bounds the altered records to those after the last seal that still
matches. Records removed after the last seal, with the head rewritten to match, cannot
be detected: ``unsealed`` says how many records no seal covers.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from hie import jsonio
from hie.access.keys import KeyRing
from hie.audit.chain import (
    GENESIS,
    HEAD_ID,
    HEAD_TYPE,
    SEAL_TYPE,
    Head,
    previous_hash,
    record_hash,
    record_id,
    record_seq,
    seal_payload,
)
from hie.store import Store, Version

PAGE = 1000


@dataclass(slots=True)
class VerifyReport:
    """The outcome of :func:`verify`. ``sealed_through`` is the sequence of the last
    valid seal, ``unsealed`` the number of records after it; ``record`` and ``kind``
    name the first problem found (``altered``, ``removed``, ``reordered``,
    ``inserted``, ``seal-invalid`` or ``head-mismatch``)."""

    ok: bool
    records: int
    seals: int
    sealed_through: int
    unsealed: int
    problem: str | None = None
    record: str | None = None
    kind: str | None = None

    def to_parameters(self) -> dict:
        """The report as a FHIR ``Parameters`` resource (``AuditEvent/$verify``)."""
        params: list[dict[str, Any]] = [
            {"name": "result", "valueBoolean": self.ok},
            {"name": "records", "valueInteger": self.records},
            {"name": "seals", "valueInteger": self.seals},
            {"name": "sealedThrough", "valueInteger": self.sealed_through},
            {"name": "unsealed", "valueInteger": self.unsealed},
        ]
        if self.problem is not None:
            params.append({"name": "problem", "valueString": self.problem})
        if self.record is not None:
            params.append({"name": "record", "valueReference": {"reference": self.record}})
        if self.kind is not None:
            params.append({"name": "kind", "valueCode": self.kind})
        return {"resourceType": "Parameters", "parameter": params}


@dataclass(frozen=True, slots=True)
class _Finding:
    kind: str
    problem: str
    record: str | None = None


def _ref(seq: int) -> str:
    return f"AuditEvent/{record_id(seq)}"


def _seal_ref(seq: int) -> str:
    return f"{SEAL_TYPE}/{record_id(seq)}"


def _removed(seq: int, why: str) -> _Finding:
    return _Finding("removed", f"{_ref(seq)} is missing: {why}", _ref(seq))


def _altered(seq: int, why: str) -> _Finding:
    return _Finding("altered", f"{_ref(seq)} was altered: {why}", _ref(seq))


def _parse(body: bytes | None) -> dict | None:
    """A stored body as a dict, or None when it is not a JSON object."""
    try:
        value = jsonio.loads(body or b"", trusted=True)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def _scan(store: Store, type_: str) -> AsyncIterator[Version]:
    after = None
    while page := await store.scan(type_, after=after, limit=PAGE):
        for version in page:
            yield version
        after = page[-1].id


class _Seals:
    """The seals in id order with one seal of look-ahead."""

    def __init__(self, store: Store):
        self._stream = _scan(store, SEAL_TYPE)
        self._next: Version | None = None
        self._done = False

    async def through(self, seq: int | None) -> AsyncIterator[Version]:
        """The seals not yet taken up to sequence ``seq`` (None: all); a seal whose id
        is no record id comes out first."""
        while True:
            if self._next is None and not self._done:
                self._next = await anext(self._stream, None)
                self._done = self._next is None
            if self._next is None:
                return
            at = record_seq(self._next.id)
            if seq is not None and at is not None and at > seq:
                return
            seal, self._next = self._next, None
            yield seal


class _Walk:
    """The state of one verification walk over records and seals in sequence order.

    Only the first problem is reported. A broken link or a mismatching seal at the
    last record walked (``pending``) is settled by what comes next: the seal at that
    record, the next record's link or, at the end, the head."""

    def __init__(self, keys: KeyRing):
        self.keys = keys
        self.records = self.seals = 0
        self.seq, self.hash = 0, GENESIS
        self.last_seal = 0  # sequence of the last seal seen
        self.good_seal = 0  # sequence of the last seal that verified and matched
        self.covered = 0  # records seen up to good_seal
        self.finding: _Finding | None = None
        #: "link": record ``seq`` does not link to ``seq - 1``; "seal": the seal at
        #: ``seq`` does not match although every link does.
        self.pending: str | None = None

    def note(self, finding: _Finding) -> None:
        """Keep ``finding`` if it is the first problem."""
        if self.finding is None and self.pending is None:
            self.finding = finding

    def report(self) -> VerifyReport:
        """The report of the walk (after :meth:`finish`)."""
        f = self.finding
        return VerifyReport(
            ok=f is None,
            records=self.records,
            seals=self.seals,
            sealed_through=self.good_seal,
            unsealed=self.records - self.covered,
            problem=f and f.problem,
            record=f and f.record,
            kind=f and f.kind,
        )

    # ---------------------------------------------------------------- records
    def foreign(self, version: Version) -> None:
        """A stored AuditEvent whose id is not a record id."""
        self.records += 1
        ref = f"AuditEvent/{version.id}"
        self.note(_Finding("inserted", f"{ref} is not a record of the chain", ref))

    def past_head(self, version: Version) -> None:
        """A record past the end of the chain that the head records."""
        self.records += 1
        ref = f"AuditEvent/{version.id}"
        self.note(_Finding("inserted", f"{ref} is past the end of the chain", ref))

    def record(self, seq: int, version: Version) -> None:
        """Check record ``seq`` against the chain so far, then extend the chain."""
        self.records += 1
        body = _parse(version.body)
        follows = seq == self.seq + 1
        linked = follows and body is not None and previous_hash(body) == self.hash
        if self.pending is not None:
            self._settle(linked if follows else None)
        if not follows:
            self.note(_removed(self.seq + 1, f"the record after it is {_ref(seq)}"))
        elif body is None:
            self.note(_altered(seq, "its body is not a JSON object"))
        elif body.get("id") != version.id:
            why = f"it holds the body of AuditEvent/{body.get('id')}: records were moved"
            self.note(_Finding("reordered", f"{_ref(seq)} is out of place: {why}", _ref(seq)))
        elif not linked and self.finding is None and self.pending is None:
            if self.good_seal == seq - 1:  # the record before is confirmed by its seal
                self.note(_altered(seq, "its link to the previous record was changed"))
            else:
                self.pending = "link"
        self.seq = seq
        self.hash = record_hash(body) if body is not None else _raw_hash(version.body)

    def _settle(self, confirmed: bool | None) -> None:
        """Settle the pending problem at record ``seq``; ``confirmed``: whether what
        follows (the seal at ``seq``, the next record's link, the head) agrees with
        record ``seq`` as stored (None: nothing follows that tells)."""
        pending, seq, self.pending = self.pending, self.seq, None
        if pending == "link":
            self.note(self._link_finding(seq, confirmed))
        elif confirmed is False:
            self.note(_altered(seq, f"the hash sealed by {_seal_ref(seq)} no longer matches"))
        else:
            first = self.good_seal + 1
            why = (
                f"the chain was rewritten: the hash sealed by {_seal_ref(seq)} does not match"
                f" although every link does; one or more of {_ref(first)} to {_ref(seq)} were"
                " altered"
            )
            self.note(_altered(first, why))

    @staticmethod
    def _link_finding(seq: int, confirmed: bool | None) -> _Finding:
        """Record ``seq`` does not link to record ``seq - 1``: the earlier record was
        altered if record ``seq`` is confirmed, else record ``seq``'s link."""
        if confirmed:
            return _altered(seq - 1, f"it no longer matches the link of {_ref(seq)}")
        if confirmed is False:
            why = (
                f"its link to the previous record was changed (or {_ref(seq - 1)} and it"
                " were both altered)"
            )
            return _altered(seq, why)
        why = (
            f"it no longer matches the link of {_ref(seq)} (or that link was changed: no"
            " later seal or record tells which)"
        )
        return _altered(seq - 1, why)

    # ---------------------------------------------------------------- seals
    def seal(self, version: Version) -> None:
        """Check one seal: id, signature, link to the seal before, sealed hash."""
        self.seals += 1
        seq = record_seq(version.id)
        body = _parse(version.body)
        if seq is None or body is None or body.get("sequence") != seq:
            self.note(_Finding("seal-invalid", f"{SEAL_TYPE}/{version.id} is malformed"))
            return
        kid, signature = str(body.get("kid")), str(body.get("signature"))
        if not self.keys.verify(kid, seal_payload(body), signature):
            why = f"{_seal_ref(seq)} has no valid signature"
            self.note(_Finding("seal-invalid", why, _ref(seq)))
            return
        if body.get("previousSeal") != self.last_seal:
            self._seal_gap(seq, body.get("previousSeal"))
        self.last_seal = seq
        if seq != self.seq:  # the sealed record is gone
            if self.pending is not None:
                self._settle(None)
            self.note(_removed(self.seq + 1, f"{_seal_ref(seq)} seals records through {seq}"))
            return
        matches = body.get("hash") == self.hash
        if self.pending is not None:
            self._settle(matches)
        if matches:
            self.good_seal, self.covered = seq, self.records
        elif self.finding is None:
            self.pending = "seal"

    def _seal_gap(self, seq: int, previous: Any) -> None:
        if isinstance(previous, int) and previous > self.last_seal:
            why = f"{_seal_ref(previous)}, the seal before {_seal_ref(seq)}, was removed"
        else:
            why = f"{_seal_ref(seq)} does not follow {_seal_ref(self.last_seal)}"
        self.note(_Finding("seal-invalid", why))

    # ---------------------------------------------------------------- end
    def finish(self, head: Head | None, unusable: str | None, seals_covered: bool) -> None:
        """Settle what is pending and compare the end of the chain with the head read
        before the walk (``unusable`` says why there is none); ``seals_covered``: the
        newest head records the last seal seen."""
        if self.pending == "link":
            self._settle(None)
        elif self.pending == "seal":
            self._settle(None if head is None else head.hash == self.hash)
        if head is None:
            if self.records or unusable == "malformed":
                self.note(_Finding("head-mismatch", f"the chain head is {unusable}"))
            return
        if head.sequence > self.seq:
            self.note(_removed(self.seq + 1, f"the head says the chain ends at {head.sequence}"))
        elif head.hash != self.hash:
            why = f"the head's hash does not match {_ref(self.seq)}: it or the head was altered"
            self.note(_Finding("head-mismatch", why, _ref(self.seq)))
        if head.sealed > self.last_seal:
            why = f"{_seal_ref(head.sealed)}, the last seal, was removed"
            self.note(_Finding("seal-invalid", why))
        elif not seals_covered:
            why = f"{_seal_ref(self.last_seal)} is past the last seal the head records"
            self.note(_Finding("seal-invalid", why))


class _Latest:
    """The newest chain head, re-read when a record or seal past the one known turns
    up: it was either appended while the walk ran (the head read after it covers it,
    as a commit writes records, seals and head together) or slipped in."""

    def __init__(self, store: Store, head: Head):
        self._store = store
        self._head = head

    async def has_record(self, seq: int) -> bool:
        """True if the newest head's chain includes record ``seq``."""
        if seq > self._head.sequence:
            await self._reload()
        return seq <= self._head.sequence

    async def has_seal(self, seq: int) -> bool:
        """True if the newest head's last seal is at ``seq`` or later."""
        if seq > self._head.sealed:
            await self._reload()
        return seq <= self._head.sealed

    async def _reload(self) -> None:
        head, _ = await _read_head(self._store)
        if head is not None:
            self._head = head


async def _read_head(store: Store) -> tuple[Head | None, str | None]:
    """The chain head, or None and why it cannot be used."""
    stored = await store.read(HEAD_TYPE, HEAD_ID)
    if stored is None or stored.body is None:
        return None, "missing" if stored is None else "deleted"
    try:
        return Head.of(stored), None
    except (ValueError, KeyError, TypeError):
        return None, "malformed"


def _raw_hash(body: bytes | None) -> str:
    return hashlib.sha256(body or b"").hexdigest()


async def verify(store: Store, keys: KeyRing) -> VerifyReport:
    """Verify the audit chain in ``store`` up to its head at the start (records
    appended meanwhile are left for the next run); seal signatures with ``keys``."""
    walk = _Walk(keys)
    head, unusable = await _read_head(store)
    end = None if head is None else head.sequence  # None: walk every record
    sealed = None if head is None else max(head.sequence, head.sealed)
    latest = _Latest(store, head or Head())
    seals = _Seals(store)
    async for version in _scan(store, "AuditEvent"):
        seq = record_seq(version.id)
        if seq is None:
            walk.foreign(version)
        elif end is not None and seq > end:
            if not await latest.has_record(seq):
                walk.past_head(version)
        else:
            async for seal in seals.through(seq - 1):
                walk.seal(seal)
            walk.record(seq, version)
            async for seal in seals.through(seq):
                walk.seal(seal)
    async for seal in seals.through(sealed):
        walk.seal(seal)
    async for seal in seals.through(None):
        if not await latest.has_seal(record_seq(seal.id) or 0):
            walk.seal(seal)
    walk.finish(head, unusable, await latest.has_seal(walk.last_seal))
    return walk.report()
