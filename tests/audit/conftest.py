"""Audit log fixtures: a store of each kind, a key ring, a log factory and direct
access to the stored rows for tampering."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Callable

import pytest

from hie import jsonio
from hie.access.keys import KeyRing
from hie.audit.chain import HEAD_ID, HEAD_TYPE, record_id
from hie.audit.log import AuditLog
from hie.fhir.search.dates import now, to_fhir_instant
from hie.store import Store, Write
from tests.conftest import make_store


def make_write(type_: str, id_: str, resource: dict, instant: str | None = None) -> Write:
    """A new resource's write at ``instant``, as the FHIR layer builds it (without index
    rows)."""
    instant = instant or now()
    meta = {"versionId": "1", "lastUpdated": to_fhir_instant(instant)}
    body = {"resourceType": type_, "id": id_, "meta": meta} | resource
    return Write(type_, id_, 0, 1, instant, "POST", jsonio.dumps(body))


def event(n: int) -> dict:
    """An AuditEvent as the request layer hands it over."""
    return {
        "resourceType": "AuditEvent",
        "recorded": "2026-01-01T00:00:00Z",
        "outcome": "0",
        "entity": [{"what": {"reference": f"Patient/p{n}"}}],
    }


@pytest.fixture(params=["sqlite", "mongomock"])
def kind(request) -> str:
    return request.param


@pytest.fixture
async def store(kind, tmp_path) -> AsyncIterator[Store]:
    opened = make_store(kind, tmp_path)
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
def keys(tmp_path) -> KeyRing:
    return KeyRing(tmp_path / "keys")


@pytest.fixture
async def new_log(keys) -> AsyncIterator[Callable[..., AuditLog]]:
    """``await new_log(store, seal_records=..., seal_seconds=...)``: a started log,
    stopped at teardown unless the test stopped it."""
    logs: list[AuditLog] = []

    async def start(store: Store, **options) -> AuditLog:
        options.setdefault("seal_seconds", 3600)
        log = AuditLog(store, keys, make_write, **options)
        await log.start()
        logs.append(log)
        return log

    yield start
    for log in logs:
        await log.stop()


class Tamper:
    """Edits the stored rows behind the store's back, as an attacker with database
    access would."""

    def __init__(self, store: Store):
        self.store = store

    def get(self, type_: str, id_: str) -> dict:
        if hasattr(self.store, "path"):
            with sqlite3.connect(self.store.path) as conn:
                (body,) = conn.execute(
                    "SELECT body FROM resources WHERE type = ? AND id = ?", (type_, id_)
                ).fetchone()
            return json.loads(body)
        return self._collection(type_).find_one({"_id": id_})["r"]

    def put(self, type_: str, id_: str, body: dict) -> None:
        if hasattr(self.store, "path"):
            with sqlite3.connect(self.store.path) as conn:
                conn.execute(
                    "UPDATE resources SET body = ? WHERE type = ? AND id = ?",
                    (jsonio.dumps(body), type_, id_),
                )
        else:
            self._collection(type_).update_one({"_id": id_}, {"$set": {"r": body}})

    def delete(self, type_: str, id_: str) -> None:
        if hasattr(self.store, "path"):
            with sqlite3.connect(self.store.path) as conn:
                conn.execute("DELETE FROM resources WHERE type = ? AND id = ?", (type_, id_))
        else:
            self._collection(type_).delete_one({"_id": id_})

    def insert(self, type_: str, id_: str, body: dict) -> None:
        if hasattr(self.store, "path"):
            with sqlite3.connect(self.store.path) as conn:
                conn.execute(
                    "INSERT INTO resources VALUES (?, ?, 1, ?, 'POST', ?)",
                    (type_, id_, now(), jsonio.dumps(body)),
                )
        else:
            doc = {"_id": id_, "v": 1, "lu": now(), "m": "POST", "r": body, "idx": [], "sk": {}}
            self._collection(type_).insert_one(doc)

    def record(self, seq: int) -> dict:
        return self.get("AuditEvent", record_id(seq))

    def head(self) -> dict:
        return self.get(HEAD_TYPE, HEAD_ID)

    def _collection(self, type_: str):
        return self.store._client.sync["hie"][type_]


@pytest.fixture
def tamper(store) -> Tamper:
    return Tamper(store)
