"""Content negotiation, Prefer, _pretty, _summary, _elements, and the CapabilityStatement."""

from __future__ import annotations

import pytest

from hie.fhir.types import served_types

OBS = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}], "text": "Glucose"},
    "valueQuantity": {"value": 5.4, "unit": "mmol/L"},
    "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">G</div>'},
    "note": [{"text": "fasting"}],
}


@pytest.fixture
def obs(client):
    return client.post("/fhir/Observation", json=OBS).json()


def test_accept_and_format(client, obs):
    url = f"/fhir/Observation/{obs['id']}"
    assert client.get(url).headers["content-type"] == "application/fhir+json; charset=utf-8"
    r = client.get(url, headers={"Accept": "application/json"})
    assert r.headers["content-type"].startswith("application/json")
    r = client.get(url, headers={"Accept": "text/html;q=0.9, */*;q=0.1"})
    assert r.status_code == 200
    for accept in ["application/fhir+xml", "text/turtle", "application/fhir+json;q=0"]:
        r = client.get(url, headers={"Accept": accept})
        assert r.status_code == 406, accept
        assert r.json()["resourceType"] == "OperationOutcome"
    assert client.get(url, params={"_format": "json"}).status_code == 200
    assert client.get(url, params={"_format": "application/fhir+json"}).status_code == 200
    assert client.get(url, params={"_format": "xml"}).status_code == 406
    # _format wins over Accept.
    assert (
        client.get(
            url, params={"_format": "json"}, headers={"Accept": "application/xml"}
        ).status_code
        == 200
    )


def test_pretty(client, obs):
    url = f"/fhir/Observation/{obs['id']}"
    compact = client.get(url).text
    pretty = client.get(url, params={"_pretty": "true"}).text
    assert "\n" not in compact and "\n  " in pretty
    bundle = client.get("/fhir/Observation", params={"_pretty": "true"}).text
    assert '\n        "resourceType": "Observation"' in bundle  # entries indented too


def test_prefer_return(client):
    minimal = client.post("/fhir/Observation", json=OBS, headers={"Prefer": "return=minimal"})
    assert minimal.status_code == 201 and minimal.content == b""
    assert minimal.headers["location"] and minimal.headers["etag"] == 'W/"1"'
    oo = client.post("/fhir/Observation", json=OBS, headers={"Prefer": "return=OperationOutcome"})
    assert oo.status_code == 201 and oo.json()["resourceType"] == "OperationOutcome"
    assert oo.json()["issue"][0]["severity"] == "information"
    rep = client.post("/fhir/Observation", json=OBS, headers={"Prefer": "return=representation"})
    assert rep.json()["resourceType"] == "Observation"
    # An unknown preference is ignored (RFC 7240); an unknown value is an error.
    assert (
        client.post(
            "/fhir/Observation", json=OBS, headers={"Prefer": "respond-async, foo=bar"}
        ).status_code
        == 201
    )
    before = client.get("/fhir/Observation", params={"_summary": "count"}).json()["total"]
    bad = client.post("/fhir/Observation", json=OBS, headers={"Prefer": "return=everything"})
    assert bad.status_code == 400
    assert "return" in bad.json()["issue"][0]["diagnostics"]
    assert client.get("/fhir/Observation", params={"_summary": "count"}).json()["total"] == before


def _subsetted(resource: dict) -> bool:
    return any(t.get("code") == "SUBSETTED" for t in resource["meta"].get("tag", []))


def test_summary_and_elements(client, obs):
    url = f"/fhir/Observation/{obs['id']}"
    full = client.get(url).json()
    assert not _subsetted(full) and "note" in full
    summary = client.get(url, params={"_summary": "true"}).json()
    assert _subsetted(summary)
    assert "note" not in summary and "text" not in summary
    assert summary["code"] == OBS["code"] and summary["status"] == "final"
    text = client.get(url, params={"_summary": "text"}).json()
    assert set(text) == {"resourceType", "id", "meta", "text", "status"}
    data = client.get(url, params={"_summary": "data"}).json()
    assert "text" not in data and "note" in data
    assert client.get(url, params={"_summary": "false"}).json() == full
    assert client.get(url, params={"_summary": "maybe"}).status_code == 400
    elements = client.get(url, params={"_elements": "note,valueQuantity"}).json()
    assert set(elements) == {"resourceType", "id", "meta", "note", "valueQuantity", "status"}
    assert _subsetted(elements)
    search = client.get("/fhir/Observation", params={"_elements": "status"}).json()
    assert set(search["entry"][0]["resource"]) == {"resourceType", "id", "meta", "status"}


def test_capability_statement_is_truthful(anon):
    r = anon.get("/fhir/metadata")  # public, no token needed
    assert r.status_code == 200
    cs = r.json()
    assert cs["resourceType"] == "CapabilityStatement" and cs["fhirVersion"] == "4.0.1"
    assert cs["kind"] == "instance" and cs["format"] == ["application/fhir+json", "json"]
    rest = cs["rest"][0]
    types = {res["type"] for res in rest["resource"]}
    assert types == served_types()
    assert "Parameters" not in types and "Evidence" not in types
    patient = next(res for res in rest["resource"] if res["type"] == "Patient")
    assert {i["code"] for i in patient["interaction"]} == {
        "read",
        "vread",
        "update",
        "patch",
        "delete",
        "history-instance",
        "history-type",
        "create",
        "search-type",
    }
    declared = {p["name"] for p in patient["searchParam"]}
    assert {"_id", "_lastUpdated", "identifier", "name", "phonetic", "birthdate"} <= declared
    assert {i["code"] for i in rest["interaction"]} == {
        "transaction",
        "batch",
        "history-system",
        "search-system",
    }
    assert "security" in rest


def test_capability_statement_claims_only_what_works(client):
    """Every declared search parameter of a few types is accepted in strict mode."""
    rest = client.get("/fhir/metadata").json()["rest"][0]
    strict = {"Prefer": "handling=strict"}
    for type_ in ("Patient", "Observation", "Encounter"):
        resource = next(res for res in rest["resource"] if res["type"] == type_)
        for param in resource["searchParam"]:
            name = param["name"]
            r = client.get(f"/fhir/{type_}", params={f"{name}:missing": "true"}, headers=strict)
            assert r.status_code == 200, (type_, name, r.text)
        for include in resource["searchInclude"]:
            r = client.get(f"/fhir/{type_}", params={"_include": include}, headers=strict)
            assert r.status_code == 200, (type_, include, r.text)
