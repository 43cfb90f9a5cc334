"""Bad input gets a precise OperationOutcome, the right status, and changes nothing."""

from __future__ import annotations

import pytest

from hie.mpi.records import GOLDEN_TAG

PATIENT = {"resourceType": "Patient", "name": [{"family": "Zhao"}]}


def total(client, type_="Patient") -> int:
    """How many ``type_`` resources there are (golden records of the master patient
    index, one per Patient written, left out)."""
    golden = f"{GOLDEN_TAG['system']}|{GOLDEN_TAG['code']}"
    params = {"_summary": "count", "_tag:not": golden}
    return client.get(f"/fhir/{type_}", params=params).json()["total"]


def outcome(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"] and body["issue"][0]["severity"] == "error"
    assert body["issue"][0]["diagnostics"]
    return body["issue"][0]


@pytest.mark.parametrize(
    "body, status, expression",
    [
        (b'{"resourceType": "Patient",', 400, None),  # malformed JSON
        (b"", 400, None),
        (b"[1, 2]", 400, None),  # not an object
        (b'"Patient"', 400, None),
        (b'{"name": []}', 400, None),  # no resourceType
        (
            b'{"resourceType": "Observation", "status": "final", "code": {}}',
            400,
            "Observation.resourceType",
        ),  # not the type in the URL
        (b'{"resourceType": "Patient", "birthDate": "03/04/1970"}', 422, "Patient.birthDate"),
        (b'{"resourceType": "Patient", "gender": 1}', 422, "Patient.gender"),
        (b'{"resourceType": "Patient", "name": {"family": "x"}}', 422, "Patient.name"),
        (b'{"resourceType": "Patient", "favouriteColour": "red"}', 422, "Patient.favouriteColour"),
        (b'{"resourceType": "Patient", "name": [{"given": [1]}]}', 422, "Patient.name[0].given[0]"),
        (b'{"resourceType": "Patient", "id": "a b"}', 400, "Patient.id"),
        (b'{"resourceType": "Patient", "id": "' + b"x" * 65 + b'"}', 400, "Patient.id"),
        (
            b'{"resourceType": "Patient", "deceasedBoolean": true, "deceasedDateTime": "2020"}',
            422,
            None,
        ),  # two choices of one value[x]
        (b"[" * 5000 + b"]" * 5000, 400, None),  # nesting bomb
    ],
)
def test_invalid_create_changes_nothing(client, body, status, expression):
    issue = outcome(client.post("/fhir/Patient", content=body), status)
    if expression:
        assert expression in issue["expression"]
    assert total(client) == 0


def test_invalid_update_changes_nothing(client):
    pid = client.post("/fhir/Patient", json=PATIENT).json()["id"]
    url = f"/fhir/Patient/{pid}"
    outcome(client.put(url, json={**PATIENT, "id": pid, "birthDate": "x"}), 422)
    outcome(client.put(url, content=b"{nope"), 400)
    assert client.get(url).json()["meta"]["versionId"] == "1"
    assert client.get(f"{url}/_history").json()["total"] == 1


def test_wrong_content_type(client):
    for ctype in ["text/plain", "application/xml", "application/fhir+xml", ""]:
        r = client.post(
            "/fhir/Patient", content=b'{"resourceType": "Patient"}', headers={"Content-Type": ctype}
        )
        outcome(r, 415)
    ok = client.post(
        "/fhir/Patient", json=PATIENT, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert ok.status_code == 201


def test_oversized_body(client, settings):
    big = {"resourceType": "Patient", "name": [{"text": "x" * settings.max_body_bytes}]}
    outcome(client.post("/fhir/Patient", json=big), 413)

    def chunks():  # no Content-Length: the limit is enforced while streaming
        yield b'{"resourceType": "Patient", "name": [{"text": "'
        for _ in range(settings.max_body_bytes // 65536 + 2):
            yield b"y" * 65536
        yield b'"}]}'

    outcome(client.post("/fhir/Patient", content=chunks()), 413)
    assert total(client) == 0


def test_unknown_type_id_and_routes(client):
    issue = outcome(client.get("/fhir/Foo/1"), 404)
    assert "Foo" in issue["diagnostics"]
    outcome(client.post("/fhir/Foo", content=b'{"resourceType": "Foo"}'), 404)
    outcome(client.get("/fhir/Parameters"), 404)  # no RESTful endpoint in R4
    outcome(client.get("/fhir/Patient/" + "x" * 65), 400)
    outcome(client.get("/fhir/Patient/a/b/c/d"), 404)
    outcome(client.get("/nothing-here"), 404)
    outcome(client.request("PURGE", "/fhir/Patient/1"), 405)
    outcome(client.post("/fhir/Patient/1", json=PATIENT), 405)


def test_bad_conditional_headers(client):
    pid = client.post("/fhir/Patient", json=PATIENT).json()["id"]
    url = f"/fhir/Patient/{pid}"
    outcome(client.put(url, json={**PATIENT, "id": pid}, headers={"If-Match": "banana"}), 400)
    outcome(client.delete(url, headers={"If-Match": 'W/"x"'}), 400)
    assert client.get(url).status_code == 200
    outcome(
        client.post(
            "/fhir/Patient", json=PATIENT, headers={"If-None-Exist": "identifier=a&bogus=1"}
        ),
        400,
    )
    assert total(client) == 1


def test_versionid_games_are_ignored(client):
    pid = client.post("/fhir/Patient", json=PATIENT).json()["id"]
    body = {**PATIENT, "id": pid, "meta": {"versionId": "42"}}
    r = client.put(f"/fhir/Patient/{pid}", json=body)
    assert r.status_code == 200 and r.json()["meta"]["versionId"] == "2"
    assert client.get(f"/fhir/Patient/{pid}/_history/42").status_code == 404


def test_unicode_and_huge_numbers_are_rejected_not_crashing(client):
    pid = client.post("/fhir/Patient", json=PATIENT).json()["id"]
    url = f"/fhir/Patient/{pid}"
    assert client.get(f"{url}/_history/²").status_code == 404
    assert client.get(f"{url}/_history/{'9' * 5000}").status_code == 404
    outcome(client.get("/fhir/Patient", params={"_count": "²"}), 400)
    outcome(client.get("/fhir/Patient", params={"_count": "9" * 5000}), 400)
    outcome(client.get(f"{url}/_history", params={"_offset": "٣"}), 400)
    outcome(
        client.put(url, json={**PATIENT, "id": pid}, headers={"If-Match": 'W/"²"'.encode()}), 400
    )
    assert client.get(url).json()["meta"]["versionId"] == "1"


def test_contained_resource_of_unknown_type(client):
    body = {"resourceType": "Patient", "contained": [{"resourceType": "Foo", "id": "x"}]}
    outcome(client.post("/fhir/Patient", json=body), 422)
    outcome(client.get("/fhir/Foo", params={"identifier": "x"}), 404)
    assert total(client) == 0
