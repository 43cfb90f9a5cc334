"""Conditional create, update and delete, and the minimal search they rest on.

Every Patient created here also gets a golden record from the master patient index; the
searches that check what was written count the members' own records (``MEMBERS``).
"""

from __future__ import annotations

from hie.mpi.records import GOLDEN_TAG

SYS = "urn:oid:2.16.156.10011.1"
#: Search parameters leaving golden records out.
MEMBERS = {"_tag:not": f"{GOLDEN_TAG['system']}|{GOLDEN_TAG['code']}"}


def patient(value: str, **extra) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": SYS, "value": value}], **extra}


def ids(bundle: dict) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", [])}


def test_search_on_identifier_id_and_last_updated(client):
    a = client.post("/fhir/Patient", json=patient("A")).json()
    b = client.post("/fhir/Patient", json=patient("B")).json()
    client.post(
        "/fhir/Patient",
        json={"resourceType": "Patient", "identifier": [{"system": "urn:other", "value": "A"}]},
    )
    search = lambda **p: client.get("/fhir/Patient", params={**p, **MEMBERS}).json()  # noqa: E731
    assert ids(search(identifier=f"{SYS}|A")) == {a["id"]}
    assert len(search(identifier="A")["entry"]) == 2  # any system
    assert search(identifier=f"{SYS}|")["total"] == 2
    assert ids(search(identifier=f"{SYS}|A,{SYS}|B")) == {a["id"], b["id"]}
    assert search(identifier="|A")["total"] == 0  # explicitly no system
    assert ids(search(_id=f"{a['id']},{b['id']}")) == {a["id"], b["id"]}
    assert ids(search(_id=a["id"], identifier=f"{SYS}|B")) == set()
    stamp = b["meta"]["lastUpdated"]
    assert b["id"] in ids(search(_lastUpdated=f"ge{stamp}"))
    assert a["id"] not in ids(search(_lastUpdated=f"gt{stamp}"))
    assert search(_lastUpdated="lt2000-01-01")["total"] == 0
    assert search(_lastUpdated="ge2000")["total"] == 3
    assert search(**{"identifier:missing": "true"})["total"] == 0
    assert search(**{"identifier:not": f"{SYS}|A"})["total"] == 2
    summary = search(_summary="count")
    assert summary["total"] == 3 and "entry" not in summary or summary["entry"] == []


def test_search_paging_and_unknown_parameters(client):
    for i in range(5):
        client.post("/fhir/Patient", json=patient(f"P{i}"))
    page = client.get("/fhir/Patient", params={"_count": 2, "_total": "accurate", **MEMBERS}).json()
    assert page["type"] == "searchset" and page["total"] == 5 and len(page["entry"]) == 2
    assert page["entry"][0]["search"] == {"mode": "match"}
    links = {link["relation"]: link["url"] for link in page["link"]}
    nxt = client.get(links["next"].replace("http://hie.test", "")).json()
    assert not ids(page) & ids(nxt) and len(nxt["entry"]) == 2
    # Unknown parameters are ignored (and left out of the self link)...
    lenient = client.get("/fhir/Patient", params={"nonsense": "1", **MEMBERS}).json()
    assert lenient["total"] == 5
    assert "nonsense" not in lenient["link"][0]["url"]
    # ...unless the client asks for strict handling.
    strict = client.get(
        "/fhir/Patient", params={"nonsense": "1"}, headers={"Prefer": "handling=strict"}
    )
    assert strict.status_code == 400
    form = client.post(
        "/fhir/Patient/_search",
        content=f"identifier={SYS}|P1&_tag:not={MEMBERS['_tag:not']}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form.status_code == 200 and form.json()["total"] == 1


def test_search_rejects_malformed_values(client):
    for params in (
        {"_lastUpdated": "ge2024-13-01"},
        {"_lastUpdated": "xx"},
        {"_count": "many"},
        {"identifier:exact": "x"},
        {"identifier": ""},
    ):
        r = client.get("/fhir/Patient", params=params)
        assert r.status_code == 400, params
        assert r.json()["resourceType"] == "OperationOutcome"


def test_search_injection_is_inert(client):
    client.post("/fhir/Patient", json=patient("A"))
    for value in ["' OR 1=1 --", "A') OR ('1'='1", '{"$ne": null}', "A%", ".*", "A\\"]:
        r = client.get("/fhir/Patient", params={"identifier": value})
        assert r.status_code == 200 and r.json()["total"] == 0, value
        r = client.get("/fhir/Patient", params={"_id": value})  # not an id: 400
        assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome", value
    assert client.get("/fhir/Patient", params=MEMBERS).json()["total"] == 1


def test_conditional_create(client):
    first = client.post(
        "/fhir/Patient", json=patient("C1"), headers={"If-None-Exist": f"identifier={SYS}|C1"}
    )
    assert first.status_code == 201
    again = client.post(
        "/fhir/Patient",
        json=patient("C1", gender="male"),
        headers={"If-None-Exist": f"identifier={SYS}|C1"},
    )
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert "gender" not in again.json()  # nothing was written
    client.post("/fhir/Patient", json=patient("C2"))
    client.post("/fhir/Patient", json=patient("C2"))
    many = client.post(
        "/fhir/Patient", json=patient("C2"), headers={"If-None-Exist": f"identifier={SYS}|C2"}
    )
    assert many.status_code == 412
    unknown = client.post(
        "/fhir/Patient", json=patient("C3"), headers={"If-None-Exist": "nonsense=1"}
    )
    assert unknown.status_code == 400
    found = client.get("/fhir/Patient", params={"identifier": f"{SYS}|", **MEMBERS}).json()
    assert found["total"] == 3


def test_conditional_update(client):
    created = client.put("/fhir/Patient", params={"identifier": f"{SYS}|U1"}, json=patient("U1"))
    assert created.status_code == 201
    pid = created.json()["id"]
    updated = client.put(
        "/fhir/Patient", params={"identifier": f"{SYS}|U1"}, json=patient("U1", gender="female")
    )
    assert updated.status_code == 200
    assert updated.json()["id"] == pid and updated.json()["meta"]["versionId"] == "2"
    wrong_id = client.put(
        "/fhir/Patient",
        params={"identifier": f"{SYS}|U1"},
        json={**patient("U1"), "id": "someone-else"},
    )
    assert wrong_id.status_code == 400
    with_id = client.put(
        "/fhir/Patient",
        params={"identifier": f"{SYS}|U2"},
        json={**patient("U2"), "id": "chosen-id"},
    )
    assert with_id.status_code == 201 and with_id.json()["id"] == "chosen-id"
    client.post("/fhir/Patient", json=patient("U3"))
    client.post("/fhir/Patient", json=patient("U3"))
    many = client.put("/fhir/Patient", params={"identifier": f"{SYS}|U3"}, json=patient("U3"))
    assert many.status_code == 412
    no_criteria = client.put("/fhir/Patient", json=patient("U4"))
    assert no_criteria.status_code == 400


def test_conditional_delete(client):
    pid = client.post("/fhir/Patient", json=patient("D1")).json()["id"]
    r = client.delete("/fhir/Patient", params={"identifier": f"{SYS}|D1"})
    assert r.status_code == 204
    assert client.get(f"/fhir/Patient/{pid}").status_code == 410
    none = client.delete("/fhir/Patient", params={"identifier": f"{SYS}|D1"})
    assert none.status_code == 204
    client.post("/fhir/Patient", json=patient("D2"))
    client.post("/fhir/Patient", json=patient("D2"))
    many = client.delete("/fhir/Patient", params={"identifier": f"{SYS}|D2"})
    assert many.status_code == 412
    found = client.get("/fhir/Patient", params={"identifier": f"{SYS}|D2", **MEMBERS}).json()
    assert found["total"] == 2
    assert client.delete("/fhir/Patient").status_code == 400
    assert client.delete("/fhir/Patient", params={"bogus": "1"}).status_code == 400


def test_conditional_patch(client):
    client.post("/fhir/Patient", json=patient("P1"))
    ops = b'[{"op": "add", "path": "/gender", "value": "male"}]'
    hdr = {"Content-Type": "application/json-patch+json"}
    r = client.patch("/fhir/Patient", params={"identifier": f"{SYS}|P1"}, content=ops, headers=hdr)
    assert r.status_code == 200 and r.json()["gender"] == "male"
    missing = client.patch(
        "/fhir/Patient", params={"identifier": f"{SYS}|none"}, content=ops, headers=hdr
    )
    assert missing.status_code == 404
