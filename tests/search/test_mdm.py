"""The ``:mdm`` modifier through the HTTP API: a Patient reference widened to every
Patient record of the same person.

Most tests inject a fake person lookup into the search engine, so that what is one
person is set by the test; ``test_members_registering_the_same_person`` goes through
the master patient index itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hie.fhir.errors import FhirError
from hie.fhir.search.mdm import MAX_VALUES
from hie.fhir.search.params import parse_search
from hie.fhir.search.registry import Registry
from hie.fhir.types import served_types

LOINC = "http://loinc.org"


@dataclass
class Person:
    golden: str
    members: list[str]


@pytest.fixture
def data(client, app):
    """p1 and p2 are one person (golden record g); p3 is another, not indexed."""
    ids: dict[str, str] = {}

    def put(name: str, resource: dict) -> None:
        resp = client.post(f"/fhir/{resource['resourceType']}", json=resource)
        assert resp.status_code == 201, resp.text
        ids[name] = resp.json()["id"]

    for name in ("g", "p1", "p2", "p3"):
        put(name, {"resourceType": "Patient", "name": [{"family": f"Test-{name}"}]})

    def obs(name: str, patient: str, code: str = "8867-4") -> None:
        put(
            name,
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": LOINC, "code": code}]},
                "subject": {"reference": f"Patient/{ids[patient]}"},
            },
        )

    obs("o1", "p1")
    obs("o2", "p2")
    obs("o3", "p3")
    obs("og", "g", code="29463-7")
    put(
        "c2",
        {
            "resourceType": "Condition",
            "subject": {"reference": f"Patient/{ids['p2']}"},
            "code": {"text": "hypertension"},
        },
    )
    put(
        "r2",
        {
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": {"text": "panel"},
            "result": [{"reference": f"Observation/{ids['o2']}"}],
        },
    )
    person = Person(ids["g"], [ids["p1"], ids["p2"]])
    calls: list[str] = []

    async def persons(patient_id: str) -> Person | None:
        calls.append(patient_id)
        return person if patient_id in (ids["g"], ids["p1"], ids["p2"]) else None

    app.state.service.engine.persons = persons
    ids["calls"] = calls  # type: ignore[assignment]
    return ids


@pytest.fixture
def find(client, data):
    """``find("Observation", {"subject:mdm": ...})`` -> short names of the matches."""
    by_id = {v: k for k, v in data.items() if isinstance(v, str)}

    def _find(path: str, params: dict | list, mode: str = "match") -> set[str]:
        resp = client.get(f"/fhir/{path}", params=params)
        assert resp.status_code == 200, resp.text
        entries = resp.json().get("entry", [])
        return {by_id.get(e["resource"]["id"], "?") for e in entries if e["search"]["mode"] == mode}

    return _find


def test_a_reference_expands_to_every_record_of_the_person(find, data):
    p1, p3 = data["p1"], data["p3"]
    assert find("Observation", {"subject": f"Patient/{p1}"}) == {"o1"}
    assert find("Observation", {"subject:mdm": f"Patient/{p1}"}) == {"o1", "o2", "og"}
    assert find("Observation", {"patient:mdm": p1}) == {"o1", "o2", "og"}  # a bare id
    assert find("Observation", {"subject:mdm": data["g"]}) == {"o1", "o2", "og"}
    # Not indexed: itself only. Several values: OR of the persons.
    assert find("Observation", {"subject:mdm": f"Patient/{p3}"}) == {"o3"}
    assert find("Observation", {"subject:mdm": f"Patient/{p3},{p1}"}) == {"o1", "o2", "o3", "og"}
    # An absolute URL of this server, a versioned reference.
    url = f"http://hie.test/fhir/Patient/{p1}"
    assert find("Observation", {"subject:mdm": url}) == {"o1", "o2", "og"}
    assert find("Observation", {"subject:mdm": f"Patient/{p1}/_history/1"}) == {"o1", "o2", "og"}
    # Combined with other criteria (AND).
    assert find("Observation", {"subject:mdm": p1, "code": f"{LOINC}|8867-4"}) == {"o1", "o2"}


def test_patient_id_mdm_lists_the_persons_records(find, data):
    assert find("Patient", {"_id:mdm": data["p2"]}) == {"g", "p1", "p2"}
    assert find("Patient", {"_id:mdm": data["p3"]}) == {"p3"}


def test_chains_reverse_chains_and_system_searches(find, data):
    p1 = data["p1"]
    assert find("DiagnosticReport", {"result.subject": f"Patient/{p1}"}) == set()
    assert find("DiagnosticReport", {"result.subject:mdm": f"Patient/{p1}"}) == {"r2"}
    has = {"_has:Observation:subject:_id": data["o2"], "_id:mdm": p1}
    assert find("Patient", has) == {"p2"}
    assert find("Patient", {"_has:Observation:subject:patient:mdm": data["p3"]}) == {"p3"}
    assert find("Patient", {"_has:Observation:subject:patient:mdm": p1}) == {"g", "p1", "p2"}
    system = {"_type": "Observation,Condition", "patient:mdm": p1}
    assert find("", system) == {"o1", "o2", "og", "c2"}


def test_the_person_is_looked_up_once_per_search(client, data):
    data["calls"].clear()
    params = {"_type": "Observation,Condition", "patient:mdm": f"{data['p1']},{data['p1']}"}
    assert client.get("/fhir", params=params).status_code == 200
    assert data["calls"] == [data["p1"]]


def test_paging_total_include_and_revinclude(client, find, data):
    p1 = data["p1"]
    names = {v: k for k, v in data.items() if isinstance(v, str)}
    params = {"subject:mdm": f"Patient/{p1}", "_count": 1, "_total": "accurate"}
    page = client.get("/fhir/Observation", params=params).json()
    assert page["total"] == 3
    shown = [names[e["resource"]["id"]] for e in page["entry"]]
    url = next(x["url"] for x in page["link"] if x["relation"] == "next")
    while url:
        page = client.get(url).json()
        shown += [names[e["resource"]["id"]] for e in page["entry"]]
        url = next((x["url"] for x in page["link"] if x["relation"] == "next"), None)
    assert sorted(shown) == ["o1", "o2", "og"]  # each once, across pages
    included = {"subject:mdm": p1, "_include": "Observation:subject"}
    assert find("Observation", included, "include") == {"g", "p1", "p2"}
    rev = {"_id:mdm": p1, "_revinclude": "Observation:subject"}
    assert find("Patient", rev, "include") == {"o1", "o2", "og"}
    count = client.get("/fhir/Observation", params={"patient:mdm": p1, "_summary": "count"})
    assert count.json()["total"] == 3


def test_a_later_page_extending_the_snapshot_expands_again(tmp_path):
    from fastapi.testclient import TestClient

    from hie.app import create_app
    from hie.config import Settings

    app = create_app(Settings(data_dir=tmp_path, auth=False))
    with TestClient(app, base_url="http://hie.test") as c:
        ids = [
            c.post("/fhir/Patient", json={"resourceType": "Patient"}).json()["id"] for _ in range(2)
        ]
        for i in range(6):
            ref = {"reference": f"Patient/{ids[i % 2]}"}
            obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
            assert c.post("/fhir/Observation", json={**obs, "subject": ref}).status_code == 201

        async def persons(patient_id):
            return Person(ids[0], ids) if patient_id in ids else None

        app.state.service.engine.persons = persons
        page = c.get("/fhir/Observation", params={"subject:mdm": ids[0], "_count": 2}).json()
        seen = [e["resource"]["id"] for e in page["entry"]]
        while nxt := next((x["url"] for x in page["link"] if x["relation"] == "next"), None):
            page = c.get(nxt).json()
            seen += [e["resource"]["id"] for e in page["entry"]]
        assert len(seen) == len(set(seen)) == 6
        assert page["total"] == 6


def test_scopes_still_apply(client, mint, data):
    params = {"subject:mdm": data["p1"]}
    patient_only = {"Authorization": f"Bearer {mint('system/Patient.rs')}"}
    assert client.get("/fhir/Observation", params=params, headers=patient_only).status_code == 403
    no_token = {"Authorization": ""}
    assert client.get("/fhir/Observation", params=params, headers=no_token).status_code == 401


@pytest.mark.parametrize(
    ("path", "params", "says"),
    [
        ("Observation", {"code:mdm": "x"}, "not to the token parameter code"),
        ("Observation", {"specimen:mdm": "x"}, "cannot refer to a Patient"),
        ("Observation", {"_id:mdm": "x"}, "Patient searches only"),
        ("Observation", {"subject:mdm": "Group/1"}, "not a Patient reference"),
        ("Observation", {"subject:mdm": '{"$gt":1}'}, "not a Patient reference"),
        ("Observation", {"subject:mdm": "1' OR '1'='1"}, "not a Patient reference"),
        ("Observation", {"subject:mdm": "Patient/../../etc"}, "not a Patient reference"),
        ("Observation", {"subject:mdm": "http://elsewhere.example/Patient/1"}, "this server"),
        ("Observation", {"subject:mdm": ""}, "empty value"),
        ("Observation", {"subject:mdm": "1,,2"}, "empty value"),
        ("Observation", {"subject:mdm": ",".join(["1"] * (MAX_VALUES + 1))}, "at most"),
        ("Observation", {"subject:mdm.name": "x"}, "cannot be chained"),
        ("Observation", {"subject:mdm:missing": "true"}, "Unsupported modifier"),
    ],
)
def test_bad_mdm_input_is_a_400_naming_the_parameter(client, data, path, params, says):
    resp = client.get(f"/fhir/{path}", params=params)
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["resourceType"] == "OperationOutcome"
    assert says in body["issue"][0]["diagnostics"], body


def test_capability_statement_lists_mdm_on_references(client):
    cap = client.get("/fhir/metadata").json()
    observation = next(r for r in cap["rest"][0]["resource"] if r["type"] == "Observation")
    subject = next(p for p in observation["searchParam"] if p["name"] == "subject")
    assert ":mdm" in subject["documentation"]


def test_mdm_on_every_parameter_parses_or_is_a_400():
    registry = Registry()
    values = ["x", "Patient/x", "Patient/", "a|b", "\\", ",", "张", '{"$gt":1}', "http://h/P/1"]
    expanded = rejected = 0
    for type_ in sorted(served_types()):
        for code, param in registry.params(type_).items():
            for value in values:
                try:
                    parse_search(
                        type_,
                        [(f"{code}:mdm", value)],
                        default_count=10,
                        max_count=10,
                        strict=True,
                        registry=registry,
                        base="http://hie.test/fhir",
                    )
                    expanded += 1
                    assert param.type == "reference" or (code, type_) == ("_id", "Patient")
                except FhirError as exc:
                    assert exc.status == 400, (type_, code, value)
                    rejected += 1
    assert expanded > 100 and rejected > 10_000


def test_members_registering_the_same_person(client, mint):
    """Through the master patient index: two members register one person (same
    resident ID) and each records an Observation on its own Patient."""
    from hie.mpi import RESIDENT_ID_SYSTEM, gb11643_check_digit

    first17 = "11010519800506011"
    resident = {"system": RESIDENT_ID_SYSTEM, "value": first17 + gb11643_check_digit(first17)}

    def member(org: str) -> dict:
        token = mint(
            "system/*.cruds", f"emr-{org}", roles=("member",), organization=f"Organization/{org}"
        )
        return {"Authorization": f"Bearer {token}"}

    ids = {}
    for org, family in (("a", "张"), ("b", "張"), ("c", "李")):
        body = {
            "resourceType": "Patient",
            "name": [{"use": "official", "family": family, "given": ["三"]}],
            "gender": "male",
            "birthDate": "1980-05-06" if org != "c" else "1990-01-01",
        }
        if org != "c":
            body["identifier"] = [resident]
        resp = client.post("/fhir/Patient", json=body, headers=member(org))
        assert resp.status_code == 201, resp.text
        ids[org] = resp.json()["id"]
        obs = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "pulse"},
            "subject": {"reference": f"Patient/{ids[org]}"},
        }
        resp = client.post("/fhir/Observation", json=obs, headers=member(org))
        assert resp.status_code == 201, resp.text
        ids[f"obs-{org}"] = resp.json()["id"]

    def observations(**params) -> set[str]:
        resp = client.get("/fhir/Observation", params=params, headers=member("c"))
        assert resp.status_code == 200, resp.text
        return {e["resource"]["id"] for e in resp.json().get("entry", [])}

    both = {ids["obs-a"], ids["obs-b"]}
    assert observations(**{"subject:mdm": f"Patient/{ids['a']}"}) == both
    assert observations(**{"patient:mdm": ids["b"]}) == both
    assert observations(subject=f"Patient/{ids['a']}") == {ids["obs-a"]}
    assert observations(**{"subject:mdm": f"Patient/{ids['c']}"}) == {ids["obs-c"]}
