"""``Patient/[id]/$everything`` through the HTTP API: the person's whole record across
the members that keep it, widened by the master patient index."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from hie.audit.events import OPERATION_SYSTEM
from hie.mpi import RESIDENT_ID_SYSTEM, gb11643_check_digit
from hie.mpi.records import golden_of_member
from tests.conftest import FHIR

LOINC = "http://loinc.org"


def resident_id(birth: str, seq: int) -> str:
    first17 = f"110105{birth.replace('-', '')}{seq:03d}"
    return first17 + gb11643_check_digit(first17)


def patient(family: str, given: str, birth: str, seq: int) -> dict:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": resident_id(birth, seq)}],
        "name": [{"use": "official", "family": family, "given": [given]}],
        "gender": "male" if seq % 2 else "female",
        "birthDate": birth,
    }


ZHANG = patient("张", "三", "1980-05-06", 11)
LI = patient("李", "四", "1975-01-02", 22)


@pytest.fixture
def api(app, mint):
    """One TestClient; ``api.as_[name]`` holds the headers of each caller."""
    with TestClient(app, base_url="http://hie.test") as client:

        def member(org: str) -> dict:
            token = mint(
                "system/*.cruds",
                f"emr-{org}",
                roles=("member",),
                organization=f"Organization/{org}",
            )
            return {"Authorization": f"Bearer {token}", "Content-Type": FHIR}

        def scoped(scope: str, roles=("member",)) -> dict:
            token = mint(scope, "reader", roles=roles, organization="Organization/r")
            return {"Authorization": f"Bearer {token}"}

        client.as_ = {org: member(org) for org in ("a", "b", "c")}
        client.as_["no-observations"] = scoped(
            "system/Patient.rs system/Condition.rs system/Practitioner.rs"
        )
        client.as_["no-patient"] = scoped("system/Observation.rs")
        client.as_["auditor"] = scoped("system/AuditEvent.rs", roles=("auditor",))
        yield client


@pytest.fixture
def data(api) -> dict[str, str]:
    """Members a and b register the same person (A, B: one golden record G), c another
    (C). Each member posts data on its own record."""
    ids: dict[str, str] = {}

    def put(name: str, org: str, resource: dict) -> dict:
        resp = api.post(f"/fhir/{resource['resourceType']}", json=resource, headers=api.as_[org])
        assert resp.status_code == 201, resp.text
        ids[name] = resp.json()["id"]
        return resp.json()

    a = put("A", "a", ZHANG)
    b = put("B", "b", {**ZHANG, "name": [{"use": "official", "family": "張", "given": ["三"]}]})
    c = put("C", "c", LI)
    assert golden_of_member(a) == golden_of_member(b) is not None
    ids["G"], ids["GC"] = golden_of_member(a), golden_of_member(c)
    put("dr", "a", {"resourceType": "Practitioner", "name": [{"family": "王"}]})

    def obs(name: str, org: str, subject: str, when: str, **extra) -> dict:
        body = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "8867-4"}]},
            "subject": {"reference": f"Patient/{ids[subject]}"},
            "effectiveDateTime": when,
            **extra,
        }
        return put(name, org, body)

    performer = {"performer": [{"reference": f"Practitioner/{ids['dr']}"}]}
    obs("oa1", "a", "A", "2020-01-10", **performer)
    obs("ob1", "b", "B", "2021-03-03")
    obs("oc1", "c", "C", "2021-03-03")
    put(
        "cb",
        "b",
        {
            "resourceType": "Condition",
            "subject": {"reference": f"Patient/{ids['B']}"},
            "code": {"text": "hypertension"},
            "onsetDateTime": "2019-07-01",
        },
    )
    ids["oa2-updated"] = obs("oa2", "a", "A", "2023-06-01")["meta"]["lastUpdated"]
    return ids


def everything(api, data, patient: str, params=None, who: str = "a", **kw):
    """GET $everything; returns (status, bundle or OperationOutcome)."""
    resp = api.get(
        f"/fhir/Patient/{data[patient]}/$everything", params=params or kw, headers=api.as_[who]
    )
    return resp.status_code, resp.json()


def names(data, bundle: dict, mode: str = "match") -> set[str]:
    by_id = {v: k for k, v in data.items()}
    entries = bundle.get("entry", [])
    return {by_id.get(e["resource"]["id"], "?") for e in entries if e["search"]["mode"] == mode}


PERSON = {"A", "B", "G", "oa1", "oa2", "ob1", "cb"}


def test_the_whole_person_across_members(api, data):
    status, bundle = everything(api, data, "A")
    assert status == 200, bundle
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert names(data, bundle) == PERSON  # never C's data
    assert names(data, bundle, "include") == {"dr"}  # referenced, outside the compartment
    assert bundle["total"] == len(PERSON)
    assert bundle["link"][0]["relation"] == "self"
    # The same from any record of the person, golden record included.
    assert names(data, everything(api, data, "B")[1]) == PERSON
    assert names(data, everything(api, data, "G")[1]) == PERSON
    # Another person's record.
    assert names(data, everything(api, data, "C")[1]) == {"C", "GC", "oc1"}


def test_mdm_false_keeps_to_the_record_asked_for(api, data):
    status, bundle = everything(api, data, "A", _mdm="false")
    assert status == 200
    # G links to A ("refer"), so it is in A's compartment; B's data is not.
    assert names(data, bundle) == {"A", "G", "oa1", "oa2"}
    assert names(data, everything(api, data, "B", _mdm="false")[1]) == {"B", "G", "ob1", "cb"}


def test_type_start_end_and_since(api, data):
    assert names(data, everything(api, data, "A", _type="Observation")[1]) == {"oa1", "oa2", "ob1"}
    typed = everything(api, data, "A", params=[("_type", "Condition"), ("_type", "Practitioner")])
    assert names(data, typed[1]) == {"cb"}
    with_dr = everything(api, data, "A", _type="Observation,Practitioner")[1]
    assert names(data, with_dr, "include") == {"dr"}
    # Care dates; resources without one (the Patients) are always there.
    since_2021 = everything(api, data, "A", start="2021-01-01")[1]
    assert names(data, since_2021) == {"A", "B", "G", "oa2", "ob1"}
    until_2020 = everything(api, data, "A", end="2020-12-31")[1]
    assert names(data, until_2020) == {"A", "B", "G", "oa1", "cb"}
    in_2021 = everything(api, data, "A", start="2021", end="2021")[1]
    assert names(data, in_2021) == {"A", "B", "G", "ob1"}
    # Record time: only what changed at or after oa2 was written.
    assert names(data, everything(api, data, "A", _since=data["oa2-updated"])[1]) == {"oa2"}


def test_paging_through_next_links(api, data):
    status, page = everything(api, data, "A", _count="2")
    assert status == 200
    seen = [e["resource"]["id"] for e in page["entry"] if e["search"]["mode"] == "match"]
    assert len(seen) == 2 and "total" not in page  # not known until complete
    pages = 1
    while nxt := next((x["url"] for x in page["link"] if x["relation"] == "next"), None):
        resp = api.get(nxt, headers=api.as_["a"])
        assert resp.status_code == 200, resp.text
        page = resp.json()
        pages += 1
        matches = [e["resource"]["id"] for e in page["entry"] if e["search"]["mode"] == "match"]
        assert len(matches) <= 2
        seen += matches
    assert pages == 4 and len(seen) == len(set(seen)) == len(PERSON) == page["total"]
    assert {k for k, v in data.items() if v in seen} == PERSON
    # The paging key serves this operation for this Patient only.
    key_url = next(x["url"] for x in page["link"] if x["relation"] == "first")
    query = key_url.split("?", 1)[1]
    as_search = api.get(f"/fhir?{query}", headers=api.as_["a"])
    assert as_search.status_code == 400
    other = api.get(f"/fhir/Patient/{data['C']}/$everything?{query}", headers=api.as_["a"])
    assert other.status_code == 400


def test_types_the_token_cannot_read_are_left_out(api, data):
    status, bundle = everything(api, data, "A", who="no-observations")
    assert status == 200
    assert names(data, bundle) == {"A", "B", "G", "cb"}  # no Observation at all
    asked = everything(api, data, "A", who="no-observations", _type="Observation,Condition")[1]
    assert names(data, asked) == {"cb"}
    note = next(e for e in asked["entry"] if e["search"]["mode"] == "outcome")["resource"]
    assert "Observation" in note["issue"][0]["diagnostics"]
    status, refused = everything(api, data, "A", who="no-patient")
    assert status == 403 and refused["resourceType"] == "OperationOutcome"
    no_token = api.get(f"/fhir/Patient/{data['A']}/$everything")
    assert no_token.status_code == 401


def test_post_with_parameters(api, data):
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "_type", "valueCode": "Observation"},
            {"name": "start", "valueDate": "2021-01-01"},
            {"name": "_mdm", "valueBoolean": True},
            {"name": "_count", "valueInteger": 10},
        ],
    }
    url = f"/fhir/Patient/{data['A']}/$everything"
    resp = api.post(url, json=body, headers=api.as_["a"])
    assert resp.status_code == 200, resp.text
    assert names(data, resp.json()) == {"oa2", "ob1"}
    bad = {"resourceType": "Parameters", "parameter": [{"name": "_count", "valueString": "x"}]}
    assert api.post(url, json=bad, headers=api.as_["a"]).status_code == 400
    assert api.post(url, json={"resourceType": "Patient"}, headers=api.as_["a"]).status_code == 400


def test_the_operation_is_audited(api, data):
    assert everything(api, data, "A", _type="Observation")[0] == 200
    params = {
        "subtype": f"{OPERATION_SYSTEM}|$everything",
        "patient": f"Patient/{data['A']}",
    }
    found = api.get("/fhir/AuditEvent", params=params, headers=api.as_["auditor"]).json()
    assert found["total"] == 1
    event = found["entry"][0]["resource"]
    shown = {
        e["what"]["reference"].split("/_history")[0]
        for e in event["entity"]
        if "reference" in e.get("what", {})
    }
    assert f"Observation/{data['ob1']}" in shown and f"Patient/{data['B']}" in shown


@pytest.mark.parametrize(
    ("params", "status", "says"),
    [
        ({"start": "yesterday"}, 400, "start must be a FHIR date"),
        ({"end": "2020-13-45"}, 400, "end must be a FHIR date"),
        ({"_since": "now"}, 400, "_since must be"),
        ({"start": "2022", "end": "2021"}, 400, "start is after end"),
        ({"_count": "-1"}, 400, "_count must be a non-negative integer"),
        ({"_count": "ten"}, 400, "_count must be a non-negative integer"),
        ({"_mdm": "maybe"}, 400, "_mdm must be true or false"),
        ({"_type": "Nope"}, 400, "unknown resource type"),
        ({"_type": "AuditEvent"}, 400, "$access-report"),
        ({"_type": "Observation,"}, 400, "unknown resource type"),
        ({"subject": "x"}, 400, "Unknown parameter"),
        ([("_count", "1"), ("_count", "2")], 400, "only once"),
        ({"_getpages": "nope"}, 410, "expired"),
    ],
)
def test_bad_input_is_an_operation_outcome(api, data, params, status, says):
    code, body = everything(api, data, "A", params=params)
    assert code == status, body
    assert body["resourceType"] == "OperationOutcome"
    assert says in body["issue"][0]["diagnostics"], body


def test_unknown_deleted_and_malformed_patients(api, data):
    assert everything(api, {"x": "no-such-patient"}, "x")[0] == 404
    assert api.get("/fhir/Patient/a_b/$everything", headers=api.as_["a"]).status_code == 400
    api.delete(f"/fhir/Patient/{data['C']}", headers=api.as_["c"])
    assert everything(api, data, "C")[0] == 410


def test_count_zero_gives_only_the_total(api, data):
    status, bundle = everything(api, data, "A", _count="0")
    assert status == 200 and bundle["total"] == len(PERSON) and not bundle.get("entry")


def test_capability_statement_names_the_operation(api):
    cap = api.get("/fhir/metadata").json()
    patient = next(r for r in cap["rest"][0]["resource"] if r["type"] == "Patient")
    operation = next(o for o in patient["operation"] if o["name"] == "everything")
    assert operation["definition"].endswith("/hie-patient-everything")
