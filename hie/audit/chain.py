"""The hash chain of the audit log: record ids, canonical hashing and the link
extension that ties each AuditEvent to the one before it.

Record ``n`` (``n`` = 1, 2, ...) is stored as ``AuditEvent/<record_id(n)>`` and carries
the hash of record ``n - 1`` (:data:`GENESIS` for the first) in its chain extension.
A record's hash covers its whole stored body, chain extension and ``meta`` included,
so changing, removing or reordering a record breaks the link of the next one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from hie import jsonio
from hie.jsonio import _default
from hie.store import Version

CHAIN_URL = "http://hie.example/fhir/StructureDefinition/audit-chain"
#: The "previous hash" of the first record.
GENESIS = "0" * 64
#: Hidden store types: the chain head (one record, id ``head``) and the signed seals.
HEAD_TYPE = "HieAuditHead"
HEAD_ID = "head"
SEAL_TYPE = "HieAuditSeal"
_PREVIOUS = "previous"
_ID_DIGITS = 20


def record_id(seq: int) -> str:
    """The id of record ``seq``: zero-padded, so lexical order is sequence order."""
    return f"{seq:0{_ID_DIGITS}d}"


def record_seq(id_: str) -> int | None:
    """The sequence number of a record id, or None if ``id_`` is not one."""
    if len(id_) != _ID_DIGITS or not id_.isascii() or not id_.isdigit():
        return None
    return int(id_)


def canonical(value: Any) -> bytes:
    """Canonical JSON: keys sorted at every level, no whitespace, decimals as written."""
    return orjson.dumps(value, default=_default, option=orjson.OPT_SORT_KEYS)


def record_hash(resource: dict) -> str:
    """SHA-256 (hex) of the canonical JSON of a stored record."""
    return hashlib.sha256(canonical(resource)).hexdigest()


def chained(event: dict, previous: str) -> dict:
    """A copy of ``event`` with the chain extension (link to ``previous``) appended."""
    link = {"url": CHAIN_URL, "extension": [{"url": _PREVIOUS, "valueString": previous}]}
    return {**event, "extension": [*event.get("extension", ()), link]}


def previous_hash(resource: dict) -> str | None:
    """The hash a record links to, or None when its chain extension is missing."""
    for ext in resource.get("extension", ()):
        if isinstance(ext, dict) and ext.get("url") == CHAIN_URL:
            for inner in ext.get("extension", ()):
                if isinstance(inner, dict) and inner.get("url") == _PREVIOUS:
                    return inner.get("valueString")
    return None


def seal_payload(seal: dict) -> bytes:
    """The bytes a seal's signature covers: its sequence, hash, instant and the
    sequence of the seal before it."""
    return canonical({k: seal.get(k) for k in ("sequence", "hash", "sealed", "previousSeal")})


@dataclass(frozen=True, slots=True)
class Head:
    """The chain head: the last record's sequence and hash, the last seal's sequence,
    and the store version of the head record (0 before the first commit)."""

    version: int = 0
    sequence: int = 0
    hash: str = GENESIS
    sealed: int = 0

    @classmethod
    def of(cls, stored: Version | None) -> Head:
        """The head as stored (the empty head when there is none); raises on a
        malformed body."""
        if stored is None:
            return cls()
        if stored.body is None:
            return cls(stored.version)
        body = jsonio.loads(stored.body, trusted=True)
        return cls(stored.version, int(body["sequence"]), str(body["hash"]), int(body["sealed"]))

    def body(self) -> bytes:
        """The stored JSON of this head."""
        return jsonio.dumps({"sequence": self.sequence, "hash": self.hash, "sealed": self.sealed})
