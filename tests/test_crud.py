"""Create, read, vread, update, patch, delete and versioning through the HTTP API."""

from __future__ import annotations

import re

from hie.mpi.records import is_golden
from tests.conftest import FHIR

PATIENT = {
    "resourceType": "Patient",
    "identifier": [{"system": "urn:oid:2.16.156.1", "value": "MRN-1"}],
    "name": [{"family": "王", "given": ["小明"]}],
    "gender": "male",
    "birthDate": "1970-03-04",
}
JSON_PATCH = "application/json-patch+json"


def create(client, resource=PATIENT):
    r = client.post(f"/fhir/{resource['resourceType']}", json=resource)
    assert r.status_code == 201, r.text
    return r.json()


def test_create_sets_id_meta_and_headers(client):
    r = client.post("/fhir/Patient", json={**PATIENT, "id": "client-chosen"})
    assert r.status_code == 201
    body = r.json()
    # The server assigns a random id and ignores the one in the body.
    assert body["id"] != "client-chosen"
    assert re.fullmatch(r"[0-9a-f-]{36}", body["id"])
    assert body["meta"]["versionId"] == "1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["meta"]["lastUpdated"])
    assert r.headers["location"] == f"http://hie.test/fhir/Patient/{body['id']}/_history/1"
    assert r.headers["etag"] == 'W/"1"'
    assert r.headers["last-modified"].endswith(" GMT")
    assert r.headers["content-type"].startswith(FHIR)
    assert body["name"] == PATIENT["name"]


def test_create_keeps_client_meta_but_not_version(client):
    meta = {
        "versionId": "99",
        "lastUpdated": "2001-01-01T00:00:00Z",
        "profile": ["http://example.org/p"],
        "tag": [{"code": "t"}],
    }
    body = create(client, {**PATIENT, "meta": meta})
    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"] != meta["lastUpdated"]
    assert body["meta"]["profile"] == meta["profile"]
    assert body["meta"]["tag"] == meta["tag"]


def test_concurrent_ids_are_distinct(client):
    ids = {create(client)["id"] for _ in range(20)}
    assert len(ids) == 20


def test_read_and_vread(client):
    body = create(client)
    r = client.get(f"/fhir/Patient/{body['id']}")
    assert r.status_code == 200
    assert r.json() == body
    assert r.headers["etag"] == 'W/"1"'
    v = client.get(f"/fhir/Patient/{body['id']}/_history/1")
    assert v.status_code == 200 and v.json() == body
    assert client.get(f"/fhir/Patient/{body['id']}/_history/2").status_code == 404
    assert client.get(f"/fhir/Patient/{body['id']}/_history/x").status_code == 404
    missing = client.get("/fhir/Patient/does-not-exist")
    assert missing.status_code == 404
    assert missing.json()["resourceType"] == "OperationOutcome"


def test_read_conditional_304(client):
    body = create(client)
    url = f"/fhir/Patient/{body['id']}"
    assert client.get(url, headers={"If-None-Match": 'W/"1"'}).status_code == 304
    assert client.get(url, headers={"If-None-Match": 'W/"2"'}).status_code == 200
    last_modified = client.get(url).headers["last-modified"]
    assert client.get(url, headers={"If-Modified-Since": last_modified}).status_code == 304
    old = "Mon, 01 Jan 2001 00:00:00 GMT"
    assert client.get(url, headers={"If-Modified-Since": old}).status_code == 200


def test_update_versions_and_if_match(client):
    body = create(client)
    url = f"/fhir/Patient/{body['id']}"
    changed = {**body, "gender": "female"}
    r = client.put(url, json=changed)
    assert r.status_code == 200
    assert r.json()["meta"]["versionId"] == "2" and r.headers["etag"] == 'W/"2"'
    stale = client.put(url, json=changed, headers={"If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert stale.json()["resourceType"] == "OperationOutcome"
    ok = client.put(url, json=changed, headers={"If-Match": 'W/"2"'})
    assert ok.status_code == 200 and ok.json()["meta"]["versionId"] == "3"
    assert client.get(f"{url}/_history/1").json()["gender"] == "male"
    assert client.get(url).json()["gender"] == "female"


def test_update_creates_with_client_id(client):
    r = client.put("/fhir/Patient/pat-1", json={**PATIENT, "id": "pat-1"})
    assert r.status_code == 201
    assert r.headers["location"].endswith("/fhir/Patient/pat-1/_history/1")
    assert client.get("/fhir/Patient/pat-1").status_code == 200


def test_update_id_rules(client):
    no_id = client.put("/fhir/Patient/pat-2", json=PATIENT)
    assert no_id.status_code == 400
    assert no_id.json()["issue"][0]["expression"] == ["Patient.id"]
    other = client.put("/fhir/Patient/pat-2", json={**PATIENT, "id": "pat-3"})
    assert other.status_code == 400
    assert "does not match" in other.json()["issue"][0]["diagnostics"]
    bad = client.put("/fhir/Patient/bad_id!", json={**PATIENT, "id": "bad_id!"})
    assert bad.status_code == 400
    assert client.get("/fhir/Patient/pat-2").status_code == 404


def test_delete_gone_and_recreate(client):
    body = create(client)
    url = f"/fhir/Patient/{body['id']}"
    r = client.delete(url)
    assert r.status_code == 204
    assert r.headers["etag"] == 'W/"2"'
    gone = client.get(url)
    assert gone.status_code == 410
    assert gone.json()["issue"][0]["code"] == "deleted"
    assert client.get(f"{url}/_history/2").status_code == 410
    assert client.get(f"{url}/_history/1").status_code == 200
    # Deleting again is idempotent and makes no new version.
    assert client.delete(url).status_code == 204
    recreated = client.put(url, json=body)
    assert recreated.status_code == 201
    assert recreated.json()["meta"]["versionId"] == "3"
    assert client.get(url).status_code == 200


def test_delete_if_match(client):
    body = create(client)
    url = f"/fhir/Patient/{body['id']}"
    assert client.delete(url, headers={"If-Match": 'W/"5"'}).status_code == 412
    assert client.get(url).status_code == 200
    assert client.delete(url, headers={"If-Match": 'W/"1"'}).status_code == 204


def test_patch(client):
    body = create(client)
    url = f"/fhir/Patient/{body['id']}"
    ops = [
        {"op": "replace", "path": "/gender", "value": "female"},
        {"op": "add", "path": "/name/0/given/-", "value": "二"},
    ]
    r = client.patch(url, content=_json(ops), headers={"Content-Type": JSON_PATCH})
    assert r.status_code == 200, r.text
    assert r.json()["gender"] == "female"
    assert r.json()["name"][0]["given"] == ["小明", "二"]
    assert r.json()["meta"]["versionId"] == "2"
    # If-Match on patch
    stale = client.patch(
        url, content=_json(ops), headers={"Content-Type": JSON_PATCH, "If-Match": 'W/"1"'}
    )
    assert stale.status_code == 412
    # A failing test op, an invalid result, a change of id: 422; nothing stored.
    failing = [{"op": "test", "path": "/gender", "value": "male"}]
    assert (
        client.patch(url, content=_json(failing), headers={"Content-Type": JSON_PATCH}).status_code
        == 422
    )
    invalid = [{"op": "replace", "path": "/birthDate", "value": "not-a-date"}]
    r = client.patch(url, content=_json(invalid), headers={"Content-Type": JSON_PATCH})
    assert r.status_code == 422
    assert r.json()["issue"][0]["expression"] == ["Patient.birthDate"]
    new_id = [{"op": "replace", "path": "/id", "value": "other"}]
    assert (
        client.patch(url, content=_json(new_id), headers={"Content-Type": JSON_PATCH}).status_code
        == 422
    )
    assert client.get(url).json()["meta"]["versionId"] == "2"
    # Wrong content type and malformed patch documents.
    assert client.patch(url, json=ops).status_code == 415
    assert (
        client.patch(url, content=b'{"op": "x"}', headers={"Content-Type": JSON_PATCH}).status_code
        == 400
    )
    assert client.patch(
        url,
        content=_json([{"op": "frobnicate", "path": "/x"}]),
        headers={"Content-Type": JSON_PATCH},
    ).status_code in (400, 422)
    assert (
        client.patch(
            "/fhir/Patient/unknown", content=_json(ops), headers={"Content-Type": JSON_PATCH}
        ).status_code
        == 404
    )


def test_history_levels(client):
    a = create(client)
    b = create(
        client, {"resourceType": "Observation", "status": "final", "code": {"text": "glucose"}}
    )
    client.put(f"/fhir/Patient/{a['id']}", json={**a, "gender": "other"})
    client.delete(f"/fhir/Observation/{b['id']}")

    inst = client.get(f"/fhir/Patient/{a['id']}/_history").json()
    assert inst["type"] == "history" and inst["total"] == 2
    assert [e["resource"]["meta"]["versionId"] for e in inst["entry"]] == ["2", "1"]
    assert inst["entry"][0]["request"] == {"method": "PUT", "url": f"Patient/{a['id']}"}
    assert inst["entry"][1]["request"] == {"method": "POST", "url": "Patient"}
    assert inst["entry"][0]["response"]["etag"] == 'W/"2"'

    typ = client.get("/fhir/Observation/_history").json()
    assert typ["total"] == 2
    deleted = typ["entry"][0]
    assert "resource" not in deleted and deleted["request"]["method"] == "DELETE"

    system = client.get("/fhir/_history").json()
    # the Patient's golden record (master patient index): created, then rebuilt on update
    golden = [e for e in system["entry"] if is_golden(e.get("resource", {}))]
    assert [e["request"]["method"] for e in golden] == ["PUT", "POST"]
    assert system["total"] == 4 + len(golden)
    methods = [e["request"]["method"] for e in system["entry"] if e not in golden]
    assert methods == ["DELETE", "PUT", "POST", "POST"]


def test_history_paging_since_at(client):
    body = create(client)
    url = f"/fhir/Patient/{body['id']}"
    stamps = [body["meta"]["lastUpdated"]]
    for gender in ["female", "other", "unknown", "male"]:
        stamps.append(
            client.put(url, json={**body, "gender": gender}).json()["meta"]["lastUpdated"]
        )
    page = client.get(f"{url}/_history", params={"_count": 2}).json()
    assert page["total"] == 5 and len(page["entry"]) == 2
    links = {link["relation"]: link["url"] for link in page["link"]}
    assert "next" in links and "previous" not in links
    nxt = client.get(links["next"].replace("http://hie.test", "")).json()
    assert [e["resource"]["meta"]["versionId"] for e in nxt["entry"]] == ["3", "2"]
    last = client.get(f"{url}/_history", params={"_count": 2, "_offset": 4}).json()
    assert len(last["entry"]) == 1
    assert "next" not in {link["relation"] for link in last["link"]}

    since = client.get(f"{url}/_history", params={"_since": stamps[3]}).json()
    assert [e["resource"]["meta"]["versionId"] for e in since["entry"]] == ["5", "4"]
    at = client.get(f"{url}/_history", params={"_at": stamps[2]}).json()
    assert [e["resource"]["meta"]["versionId"] for e in at["entry"]] == ["3"]

    assert client.get(f"{url}/_history", params={"_since": "yesterday"}).status_code == 400
    assert client.get(f"{url}/_history", params={"_count": "-1"}).status_code == 400
    assert client.get(f"{url}/_history", params={"_sort": "x"}).status_code == 400
    assert client.get("/fhir/Patient/nope/_history").status_code == 404


def _json(value) -> bytes:
    import orjson

    return orjson.dumps(value)


def test_decimals_keep_their_precision(client):
    # FHIR decimals carry precision: 1.00 is not 1.0; exponents stay as written.
    raw = (
        b'{"resourceType": "Observation", "status": "final", "code": {"text": "x"},'
        b' "valueQuantity": {"value": 1.00}, "component": ['
        b'{"code": {"text": "a"}, "valueQuantity": {"value": 1.000000000000000000E-245}},'
        b'{"code": {"text": "b"}, "valueQuantity": {"value": 66.899999999999991}},'
        b'{"code": {"text": "c"}, "valueQuantity": {"value": 0.010}}]}'
    )
    created = client.post("/fhir/Observation", content=raw)
    assert created.status_code == 201
    for text in [
        b'"value":1.00}',
        b"1.000000000000000000E-245",
        b"66.899999999999991",
        b'"value":0.010}',
    ]:
        assert text in created.content
        url = f"/fhir/Observation/{created.json()['id']}"
        assert text in client.get(url).content
        assert text in client.get(url, params={"_summary": "data"}).content
        assert text in client.get("/fhir/Observation").content
    pretty = client.get(url, params={"_pretty": "true"}).content
    assert b'"value": 1.00\n' in pretty
    patched = client.patch(
        url,
        content=b'[{"op": "replace", "path": "/status", "value": "amended"}]',
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert b"66.899999999999991" in patched.content and b'"value":1.00}' in patched.content
    assert (
        client.post("/fhir/Observation", content=raw.replace(b"1.00}", b"NaN}")).status_code == 400
    )
