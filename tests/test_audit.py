"""The audit log through the API: a BALP-shaped AuditEvent for every interaction
(failures, refusals and Bundle entries included), auditor search with paging,
``$verify`` catching records edited or removed in the store, the access report, and
no access when the audit record cannot be written."""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import Iterator

import orjson
import pytest
from fastapi.testclient import TestClient

from tests.conftest import FHIR

PATIENT = {"resourceType": "Patient", "name": [{"family": "王", "given": ["芳"]}]}


@pytest.fixture
def hie(app, mint) -> Iterator[TestClient]:
    """One TestClient; tokens per request through ``headers=``."""
    with TestClient(app, base_url="http://hie.test") as c:
        yield c


@pytest.fixture
def as_member(mint) -> dict[str, str]:
    token = mint("system/*.cruds", "emr-a", organization="Organization/a", roles=("member",))
    return {"Authorization": f"Bearer {token}", "Content-Type": FHIR}


@pytest.fixture
def as_auditor(mint) -> dict[str, str]:
    token = mint("system/AuditEvent.rs system/Patient.rs", "audit-office", roles=("auditor",))
    return {"Authorization": f"Bearer {token}"}


def events(hie, as_auditor, **params) -> list[dict]:
    """All AuditEvents matching ``params``, oldest first, following next links."""
    out: list[dict] = []
    url, query = "/fhir/AuditEvent", {"_count": "100", "_sort": "_id"} | params
    while url:
        page = hie.get(url, params=query, headers=as_auditor).json()
        out += [e["resource"] for e in page.get("entry", [])]
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        url, query = (nxt[0].replace("http://hie.test", ""), None) if nxt else (None, None)
    return out


def subtype(event: dict) -> str:
    return event["subtype"][0]["code"]


def entity_refs(event: dict, role: str) -> list[str]:
    return [e["what"]["reference"] for e in event.get("entity", []) if e["role"]["code"] == role]


def test_every_interaction_is_recorded_in_balp_shape(hie, as_member, as_auditor):
    pid = hie.post("/fhir/Patient", json=PATIENT, headers=as_member).json()["id"]
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "glucose"},
        "subject": {"reference": f"Patient/{pid}"},
    }
    oid = hie.post("/fhir/Observation", json=obs, headers=as_member).json()["id"]
    hie.get(f"/fhir/Observation/{oid}", headers=as_member)
    hie.get(f"/fhir/Observation/{oid}/_history/1", headers=as_member)
    hie.get("/fhir/Observation", params={"subject": f"Patient/{pid}"}, headers=as_member)
    hie.put(f"/fhir/Observation/{oid}", json={**obs, "id": oid}, headers=as_member)
    hie.patch(
        f"/fhir/Observation/{oid}",
        json=[{"op": "replace", "path": "/status", "value": "amended"}],
        headers={**as_member, "Content-Type": "application/json-patch+json"},
    )
    hie.get(f"/fhir/Observation/{oid}/_history", headers=as_member)
    hie.delete(f"/fhir/Observation/{oid}", headers=as_member)
    recorded = [e for e in events(hie, as_auditor, altid="emr-a")]
    assert [(subtype(e), e["action"], e["outcome"]) for e in recorded] == [
        ("create", "C", "0"),
        ("create", "C", "0"),
        ("read", "R", "0"),
        ("vread", "R", "0"),
        ("search-type", "E", "0"),
        ("update", "U", "0"),
        ("patch", "U", "0"),
        ("history-instance", "R", "0"),
        ("delete", "D", "0"),
    ]
    read = recorded[2]
    assert read["type"]["code"] == "rest"
    assert entity_refs(read, "4") == [f"Observation/{oid}/_history/1"]
    assert entity_refs(read, "1") == [f"Patient/{pid}"]
    client, org, server = read["agent"]
    assert client["type"]["coding"][0]["code"] == "110153"
    assert client["who"]["identifier"]["value"] == "emr-a" and client["requestor"] is True
    assert client["network"]["type"] == "2" and client["network"]["address"]
    assert client["purposeOfUse"][0]["coding"][0]["code"] == "TREAT"
    assert org["who"] == {"reference": "Organization/a"}
    assert server["type"]["coding"][0]["code"] == "110152"
    assert read["source"]["site"] == "http://hie.test/fhir"
    assert server["network"] == {"address": "http://hie.test/fhir", "type": "5"}
    assert read["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
    search = recorded[4]
    query = [e for e in search["entity"] if e["role"]["code"] == "24"][0]
    assert base64.b64decode(query["query"]).decode() == f"Observation?subject=Patient%2F{pid}"
    assert entity_refs(search, "1") == [f"Patient/{pid}"]
    assert entity_refs(recorded[5], "4") == [f"Observation/{oid}/_history/2"]


def test_failures_and_refusals_are_recorded(hie, as_member, as_auditor, mint):
    hie.get("/fhir/Patient/nope", headers=as_member)
    hie.get("/fhir/Patient")  # no token
    narrow = mint("system/Patient.rs", "emr-narrow", organization="Organization/a")
    hie.post("/fhir/Observation", json={}, headers={"Authorization": f"Bearer {narrow}"})
    hie.post("/fhir/Patient", content=b"{not json", headers=as_member)
    hie.get("/fhir/Patient", headers={**as_member, "X-Purpose-Of-Use": "NOPE"})
    failed = events(hie, as_auditor, outcome="4")
    summary = [(subtype(e), e["agent"][0].get("altId"), e["outcomeDesc"][:40]) for e in failed]
    assert [s[:2] for s in summary] == [
        ("read", "emr-a"),
        ("search-type", None),
        ("create", "emr-narrow"),
        ("create", "emr-a"),
        ("search-type", "emr-a"),
    ]
    assert entity_refs(failed[0], "4") == ["Patient/nope"]
    assert failed[1]["agent"][0]["who"]["display"] == "unauthenticated caller"
    assert "bearer token" in failed[1]["outcomeDesc"]
    assert (
        "create on Observation denied" in failed[2]["outcomeDesc"].lower()
        or "Create" in (failed[2]["outcomeDesc"])
    )


def test_bundle_entries_are_recorded_one_by_one(hie, as_member, as_auditor):
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": PATIENT, "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": "Patient/missing"}},
        ],
    }
    assert hie.post("/fhir", json=batch, headers=as_member).status_code == 200
    transaction = {**batch, "type": "transaction", "entry": batch["entry"][:1] * 2}
    assert hie.post("/fhir", json=transaction, headers=as_member).status_code == 200
    recorded = events(hie, as_auditor, altid="emr-a")
    assert [(subtype(e), e["outcome"]) for e in recorded] == [
        ("create", "0"),
        ("read", "4"),
        ("batch", "0"),
        ("create", "0"),
        ("create", "0"),
        ("transaction", "0"),
    ]
    failed_tx = {**transaction, "entry": [{"request": {"method": "DELETE", "url": "Nope/1"}}]}
    assert hie.post("/fhir", json=failed_tx, headers=as_member).status_code == 404
    assert subtype(events(hie, as_auditor, outcome="4")[-1]) == "transaction"


def test_auditor_search_parameters_and_paging(hie, as_member, as_auditor):
    pid = hie.post("/fhir/Patient", json=PATIENT, headers=as_member).json()["id"]
    for _ in range(7):
        hie.get(f"/fhir/Patient/{pid}", headers=as_member)
    hie.get(f"/fhir/Patient/{pid}", headers={**as_member, "X-Purpose-Of-Use": "HPAYMT"})

    def total(**params) -> int:
        r = hie.get("/fhir/AuditEvent", params=params, headers=as_auditor)
        assert r.status_code == 200, r.text
        return r.json()["total"]

    assert total(patient=f"Patient/{pid}") == 9
    # ... and now 10: the auditor's search showed records about the patient, which is
    # itself an access to the patient's data.
    assert total(entity=f"Patient/{pid}") == 10
    assert total(agent="Organization/a") == 9
    assert total(altid="emr-a", subtype="read") == 8
    assert total(action="C") == 1
    assert total(purpose="HPAYMT") == 1
    assert total(outcome="0", date="ge2000-01-01") >= 9
    assert total(date="lt2000-01-01") == 0
    assert len(events(hie, as_auditor, patient=pid, altid="emr-a", _count="2")) == 9
    first = hie.get(
        "/fhir/AuditEvent", params={"patient": pid, "_count": 4}, headers=as_auditor
    ).json()
    nxt = [link["url"] for link in first["link"] if link["relation"] == "next"][0]
    second = hie.get(nxt.replace("http://hie.test", ""), headers=as_auditor).json()
    ids = [e["resource"]["id"] for e in first["entry"] + second["entry"]]
    assert len(ids) == len(set(ids)) == 8


def test_verify_names_the_first_altered_or_removed_record(hie, as_member, as_auditor, app):
    for _ in range(5):
        hie.post("/fhir/Patient", json=PATIENT, headers=as_member)
    ok = hie.get("/fhir/AuditEvent/$verify", headers=as_auditor)
    assert ok.status_code == 200
    result = {p["name"]: p for p in ok.json()["parameter"]}
    assert result["result"]["valueBoolean"] is True
    assert result["records"]["valueInteger"] >= 5
    assert hie.get("/fhir/AuditEvent/$verify", headers=as_member).status_code == 403
    victim = events(hie, as_auditor, action="C")[2]["id"]
    _tamper(app, victim, lambda e: {**e, "outcome": "4"})
    bad = {
        p["name"]: p
        for p in hie.post("/fhir/AuditEvent/$verify", headers=as_auditor).json()["parameter"]
    }
    assert bad["result"]["valueBoolean"] is False
    assert bad["record"]["valueReference"]["reference"] == f"AuditEvent/{victim}"
    assert bad["kind"]["valueCode"] == "altered"


def _tamper(app, event_id: str, change) -> None:
    """Rewrite a stored AuditEvent directly in the store, bypassing the API."""
    store = app.state.store
    db = getattr(store, "_db", None)
    if db is not None:  # MongoStore
        collection = db["AuditEvent"]._sync  # the mongomock collection behind the adapter
        doc = collection.find_one({"_id": event_id})
        collection.update_one({"_id": event_id}, {"$set": {"r": change(doc["r"])}})
        return
    conn = sqlite3.connect(store.path)
    body = conn.execute(
        "SELECT body FROM resources WHERE type='AuditEvent' AND id=?", (event_id,)
    ).fetchone()[0]
    conn.execute(
        "UPDATE resources SET body=? WHERE type='AuditEvent' AND id=?",
        (orjson.dumps(change(orjson.loads(body))), event_id),
    )
    conn.commit()
    conn.close()


def test_access_report_lists_who_saw_the_patient(hie, as_member, as_auditor, mint):
    pid = hie.post("/fhir/Patient", json=PATIENT, headers=as_member).json()["id"]
    other = mint("system/*.rs", "emr-b", organization="Organization/b", roles=("member",))
    hie.get(
        f"/fhir/Patient/{pid}",
        headers={"Authorization": f"Bearer {other}", "X-Purpose-Of-Use": "COC"},
    )
    r = hie.get(f"/fhir/Patient/{pid}/$access-report", headers=as_auditor)
    assert r.status_code == 200, r.text
    params = r.json()["parameter"]
    assert params[0]["valueReference"]["reference"] == f"Patient/{pid}"
    assert params[1] == {"name": "total", "valueInteger": 2}
    latest = {p["name"]: p for p in params[2]["part"]}
    assert latest["client"]["valueString"] == "emr-b"
    assert latest["organization"]["valueReference"]["reference"] == "Organization/b"
    assert latest["purpose"]["valueCoding"]["code"] == "COC"
    assert latest["interaction"]["valueCode"] == "read"
    assert latest["breakGlass"]["valueBoolean"] is False
    page = hie.get(
        f"/fhir/Patient/{pid}/$access-report", params={"_count": 1}, headers=as_auditor
    ).json()["parameter"]
    assert len([p for p in page if p["name"] == "access"]) == 1
    assert hie.get(f"/fhir/Patient/{pid}/$access-report", headers=as_member).status_code == 403
    assert hie.get("/fhir/Patient/nope/$access-report", headers=as_auditor).status_code == 404
    bad = hie.get(f"/fhir/Patient/{pid}/$access-report?bogus=1", headers=as_auditor)
    assert bad.status_code == 400


def test_no_access_without_an_audit_record(hie, as_member, as_auditor, app, monkeypatch):
    pid = hie.post("/fhir/Patient", json=PATIENT, headers=as_member).json()["id"]
    store = app.state.store
    real_commit = store.commit

    async def failing(writes):
        if any(w.type == "AuditEvent" for w in writes):
            raise OSError("disk full")
        return await real_commit(writes)

    monkeypatch.setattr(store, "commit", failing)
    read = hie.get(f"/fhir/Patient/{pid}", headers=as_member)
    assert read.status_code == 503
    assert read.json()["resourceType"] == "OperationOutcome"
    assert "王" not in read.text
    created = hie.post("/fhir/Patient", json={**PATIENT, "gender": "female"}, headers=as_member)
    assert created.status_code == 503
    monkeypatch.setattr(store, "commit", real_commit)
    found = hie.get("/fhir/Patient", params={"gender": "female"}, headers=as_member).json()
    assert found["total"] == 0
    verified = hie.get("/fhir/AuditEvent/$verify", headers=as_auditor).json()
    assert verified["parameter"][0]["valueBoolean"] is True


def test_cli_audit_verify_names_a_removed_record(tmp_path):
    from typer.testing import CliRunner

    from hie.app import create_app
    from hie.cli import app as cli
    from hie.config import Settings

    app = create_app(Settings(data_dir=tmp_path))
    with TestClient(app, base_url="http://hie.test") as c:
        headers = {"Authorization": f"Bearer {app.state.tokens.mint('ops', 'system/*.cruds', 60)}"}
        for _ in range(3):
            c.post("/fhir/Patient", json=PATIENT, headers={**headers, "Content-Type": FHIR})
    runner = CliRunner()
    ok = runner.invoke(cli, ["audit", "verify", "--data-dir", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert "3 records" in ok.output and "intact" in ok.output
    conn = sqlite3.connect(tmp_path / "hie.sqlite3")
    conn.execute("DELETE FROM resources WHERE type='AuditEvent' AND id='00000000000000000002'")
    conn.commit()
    conn.close()
    bad = runner.invoke(cli, ["audit", "verify", "--data-dir", str(tmp_path)])
    assert bad.exit_code == 1
    assert "AuditEvent/00000000000000000002" in bad.output and "removed" in bad.output


def test_audit_can_be_off_only_with_authentication_off(tmp_path):
    from hie.app import create_app
    from hie.config import Settings

    with pytest.raises(ValueError, match="HIE_AUDIT=off"):
        create_app(Settings(data_dir=tmp_path, audit=False))
    app = create_app(Settings(data_dir=tmp_path, auth=False, audit=False))
    with TestClient(app, base_url="http://hie.test") as c:
        created = c.post("/fhir/Patient", json=PATIENT, headers={"Content-Type": FHIR})
        assert created.status_code == 201
        assert c.get(f"/fhir/Patient/{created.json()['id']}").status_code == 200
        assert c.get("/fhir/AuditEvent").json()["total"] == 0


def test_records_are_searchable_at_once_and_kept_out_of_system_history(app, mint):
    """A request's AuditEvent is indexed in the commit that stores it, so an auditor's
    search right after finds it; it is ``recorded`` at its commit instant, which date
    searches and ``_sort=date`` follow; the journal keeps it out of system history."""
    member = {"Authorization": f"Bearer {mint('system/*.cruds', 'emr-a', roles=('member',))}"}
    auditor = {"Authorization": f"Bearer {mint('system/*.rs', 'aud', roles=('auditor',))}"}
    with TestClient(app, base_url="http://hie.test") as hie:
        pid = hie.post("/fhir/Patient", json=PATIENT, headers=member).json()["id"]
        for _ in range(6):
            assert hie.get(f"/fhir/Patient/{pid}", headers=member).status_code == 200
        found = hie.get(
            "/fhir/AuditEvent",
            params={"entity": f"Patient/{pid}", "_sort": "-date"},
            headers=auditor,
        ).json()
        assert found["total"] == 7
        events = [e["resource"] for e in found["entry"]]
        assert [e["subtype"][0]["code"] for e in events] == ["read"] * 6 + ["create"]
        for event in events:
            assert event["recorded"][:23] == event["meta"]["lastUpdated"][:23]
        oldest = events[-1]["recorded"]
        later = hie.get(
            "/fhir/AuditEvent",
            params={"entity": f"Patient/{pid}", "date": f"gt{oldest}"},
            headers=auditor,
        ).json()
        after = {e["resource"]["id"] for e in later["entry"]}
        assert after >= {e["id"] for e in events[:-1]} and events[-1]["id"] not in after
        ordered = hie.get(
            "/fhir/AuditEvent",
            params={"entity": f"Patient/{pid}", "_sort": "date"},
            headers=auditor,
        ).json()
        oldest_first = [e["resource"]["id"] for e in ordered["entry"]]
        assert oldest_first[:7] == [e["id"] for e in events[::-1]]
        page = hie.get(
            "/fhir/Patient",
            params={"_id": pid, "_revinclude": "AuditEvent:entity"},
            headers=auditor,
        ).json()
        audits = [e for e in page["entry"] if e["resource"]["resourceType"] == "AuditEvent"]
        assert len(audits) >= 9  # create, 6 reads, the auditor's three searches
        one = events[0]["id"]
        history = hie.get(f"/fhir/AuditEvent/{one}/_history", headers=auditor).json()
        assert [e["resource"]["id"] for e in history["entry"]] == [one]
        assert hie.get(f"/fhir/AuditEvent/{one}/_history/1", headers=auditor).status_code == 200
        system = hie.get("/fhir/_history", params={"_count": 500}, headers=auditor).json()
        kinds = {e["resource"]["resourceType"] for e in system["entry"]}
        assert "Patient" in kinds and "AuditEvent" not in kinds
        bad = hie.get("/fhir/AuditEvent", params={"_sort": "action"}, headers=auditor)
        assert bad.status_code == 400
        assert "_sort" in bad.json()["issue"][0]["diagnostics"]
