"""Member access control through the API: provenance stamping, members changing only
their own writes, purpose of use and break-glass, the audit log's restrictions."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from hie.access.decision import MEMBER_TAG_SYSTEM
from tests.conftest import FHIR

OBS = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"text": "glucose"},
    "subject": {"reference": "Patient/p1"},
}


@pytest.fixture
def members(app, mint) -> Iterator[dict[str, TestClient]]:
    """Clients of two member hospitals, a regional platform and an auditor."""
    tokens = {
        "a": mint("system/*.cruds", "emr-a", organization="Organization/a", roles=("member",)),
        "b": mint("system/*.cruds", "emr-b", organization="Organization/b", roles=("member",)),
        "b-reader": mint(
            "system/*.rs", "emr-b-reader", organization="Organization/b", roles=("member",)
        ),
        "er": mint(
            "system/*.rs",
            "er-b",
            organization="Organization/b",
            roles=("member",),
            break_glass=True,
        ),
        "auditor": mint("system/AuditEvent.rs", "audit-office", roles=("auditor",)),
        "admin": mint("system/*.cruds", "ops", roles=("admin",)),
    }
    with TestClient(app, base_url="http://hie.test") as c:
        yield {name: _bound(c, token) for name, token in tokens.items()}


class _bound:
    """A TestClient with one token (all share the app's single TestClient)."""

    def __init__(self, client: TestClient, token: str):
        self.client = client
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR}

    def __getattr__(self, method):
        def call(url, headers=None, **kw):
            return self.client.request(
                method.upper(), url, headers={**self.headers, **(headers or {})}, **kw
            )

        return call


def _tags(resource: dict) -> list[dict]:
    return resource["meta"].get("tag", [])


def test_writes_are_stamped_with_the_member_and_client(members):
    sent = {
        **OBS,
        "meta": {
            "source": "forged",
            "tag": [
                {"system": MEMBER_TAG_SYSTEM, "code": "b"},
                {"system": "urn:x", "code": "keep"},
            ],
        },
    }
    created = members["a"].post("/fhir/Observation", json=sent)
    assert created.status_code == 201
    body = created.json()
    assert body["meta"]["source"] == "urn:hie:client:emr-a"
    assert {"system": MEMBER_TAG_SYSTEM, "code": "a"} in _tags(body)
    assert {"system": MEMBER_TAG_SYSTEM, "code": "b"} not in _tags(body)
    assert {"system": "urn:x", "code": "keep"} in _tags(body)
    found = members["b"].get("/fhir/Observation", params={"_tag": f"{MEMBER_TAG_SYSTEM}|a"})
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [body["id"]]
    assert (
        members["b"]
        .get("/fhir/Observation", params={"_source": "urn:hie:client:emr-a"})
        .json()["total"]
        == 1
    )


def test_members_change_only_what_they_wrote(members):
    body = members["a"].post("/fhir/Observation", json=OBS).json()
    oid = body["id"]
    changed = {**body, "status": "amended"}
    for response in (
        members["b"].put(f"/fhir/Observation/{oid}", json=changed),
        members["b"].patch(
            f"/fhir/Observation/{oid}",
            json=[{"op": "replace", "path": "/status", "value": "amended"}],
            headers={"Content-Type": "application/json-patch+json"},
        ),
        members["b"].delete(f"/fhir/Observation/{oid}"),
        members["b"].delete("/fhir/Observation", params={"_id": oid}),
    ):
        assert response.status_code == 403, response.text
        assert response.json()["resourceType"] == "OperationOutcome"
        assert "another member" in response.json()["issue"][0]["diagnostics"]
    current = members["a"].get(f"/fhir/Observation/{oid}").json()
    assert current["meta"]["versionId"] == "1" and current["status"] == "final"
    # In a transaction, the other member's entry fails the whole Bundle.
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": OBS, "request": {"method": "POST", "url": "Observation"}},
            {"request": {"method": "DELETE", "url": f"Observation/{oid}"}},
        ],
    }
    assert members["b"].post("/fhir", json=bundle).status_code == 403
    assert members["a"].get(f"/fhir/Observation/{oid}").status_code == 200
    # The writer and an administrator may change it.
    assert members["a"].put(f"/fhir/Observation/{oid}", json=changed).status_code == 200
    assert members["admin"].delete(f"/fhir/Observation/{oid}").status_code == 204


def test_update_keeps_the_original_writer_out_of_reach_of_others(members):
    oid = members["a"].post("/fhir/Observation", json=OBS).json()["id"]
    # b cannot take the resource over by re-tagging it in a PUT either
    body = members["a"].get(f"/fhir/Observation/{oid}").json()
    body["meta"]["tag"] = [{"system": MEMBER_TAG_SYSTEM, "code": "b"}]
    assert members["b"].put(f"/fhir/Observation/{oid}", json=body).status_code == 403
    # b creating with its own id is b's resource
    mine = {**OBS, "id": "b-obs-1"}
    assert members["b"].put("/fhir/Observation/b-obs-1", json=mine).status_code == 201
    assert members["a"].delete("/fhir/Observation/b-obs-1").status_code == 403


def test_purpose_of_use_header(members):
    ok = members["a"].get("/fhir/Observation", headers={"X-Purpose-Of-Use": "HPAYMT"})
    assert ok.status_code == 200
    bad = members["a"].get("/fhir/Observation", headers={"X-Purpose-Of-Use": "SPYING"})
    assert bad.status_code == 400
    assert bad.json()["resourceType"] == "OperationOutcome"
    wrong_system = members["a"].get(
        "/fhir/Observation", headers={"X-Purpose-Of-Use": "urn:x|TREAT"}
    )
    assert wrong_system.status_code == 400


def test_break_glass_only_for_clients_allowed(members):
    members["a"].post("/fhir/Observation", json=OBS)
    for purpose in ("ETREAT", "BTG"):
        denied = members["b-reader"].get("/fhir/Observation", headers={"X-Purpose-Of-Use": purpose})
        assert denied.status_code == 403
        assert "break-glass" in denied.json()["issue"][0]["diagnostics"]
    allowed = members["er"].get("/fhir/Observation", headers={"X-Purpose-Of-Use": "BTG"})
    assert allowed.status_code == 200 and allowed.json()["total"] == 1
    events = (
        members["auditor"].get("/fhir/AuditEvent", params={"purpose": "BTG", "outcome": "0"}).json()
    )
    assert events["total"] == 1
    event = events["entry"][0]["resource"]
    assert event["meta"]["security"][0]["code"] == "BTG"
    assert event["agent"][0]["altId"] == "er-b"
    refused = (
        members["auditor"]
        .get("/fhir/AuditEvent", params={"purpose": "ETREAT", "outcome": "4"})
        .json()
    )
    assert refused["total"] == 1


def test_audit_records_are_for_auditors_and_append_only(members):
    members["a"].post("/fhir/Observation", json=OBS)
    events = members["auditor"].get("/fhir/AuditEvent").json()
    assert events["total"] >= 1
    eid = events["entry"][0]["resource"]["id"]
    # Wildcard scopes do not reach the audit log without the auditor role.
    for who in ("a", "admin"):
        for url in ("/fhir/AuditEvent", f"/fhir/AuditEvent/{eid}", "/fhir/AuditEvent/_history"):
            r = members[who].get(url)
            assert r.status_code == 403, (who, url)
            assert r.json()["resourceType"] == "OperationOutcome"
    # Nobody changes it, auditors included.
    event = members["auditor"].get(f"/fhir/AuditEvent/{eid}").json()
    for who in ("auditor", "admin"):
        assert members[who].put(f"/fhir/AuditEvent/{eid}", json=event).status_code == 405
        assert members[who].delete(f"/fhir/AuditEvent/{eid}").status_code == 405
        assert members[who].post("/fhir/AuditEvent", json=event).status_code == 405
        patch = members[who].patch(
            f"/fhir/AuditEvent/{eid}",
            json=[{"op": "replace", "path": "/action", "value": "R"}],
            headers={"Content-Type": "application/json-patch+json"},
        )
        assert patch.status_code == 405
    assert members["auditor"].get(f"/fhir/AuditEvent/{eid}").json() == event


def test_audit_records_stay_out_of_other_callers_results(members):
    pid = members["a"].post("/fhir/Patient", json={"resourceType": "Patient"}).json()["id"]
    members["a"].post("/fhir/Observation", json={**OBS, "subject": {"reference": f"Patient/{pid}"}})
    members["a"].get(f"/fhir/Patient/{pid}")
    # system search and history, compartment "*", and _revinclude leave audit records out
    system = members["admin"].get("/fhir", params={"_lastUpdated": "gt2000"}).json()
    assert {e["resource"]["resourceType"] for e in system["entry"]} == {"Patient", "Observation"}
    history = members["admin"].get("/fhir/_history").json()
    assert {e["resource"]["resourceType"] for e in history["entry"]} == {"Patient", "Observation"}
    assert history["total"] == 3  # the Patient, its golden record (the MPI's), the Observation
    everything = members["a"].get(f"/fhir/Patient/{pid}/*").json()
    assert {e["resource"]["resourceType"] for e in everything["entry"]} == {
        "Patient",
        "Observation",
    }
    rev = (
        members["a"]
        .get("/fhir/Patient", params={"_id": pid, "_revinclude": "AuditEvent:patient"})
        .json()
    )
    assert [e["resource"]["resourceType"] for e in rev["entry"]] == ["Patient"]
    # An auditor searching the log by patient finds the accesses.
    by_patient = members["auditor"].get("/fhir/AuditEvent", params={"patient": pid}).json()
    assert by_patient["total"] >= 3


def test_reindex_needs_the_admin_role(members):
    denied = members["a"].post("/fhir/$reindex")
    assert denied.status_code == 403
    assert members["admin"].post("/fhir/Patient/$reindex").status_code == 200
