"""The master patient index's operations through the HTTP API: ``$match`` (PDQm ITI-119),
``$ihe-pix`` (PIXm ITI-83), manual link/unlink/merge/unmerge by a data steward, the review
queue, their audit records, and bad input on every one of them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from hie.audit.trail import Trail
from hie.mpi.normalize import RESIDENT_ID_SYSTEM, gb11643_check_digit
from hie.mpi.records import ENTERPRISE_ID_SYSTEM, GOLDEN_TAG, golden_of_member, is_golden
from hie.mpi.routes import MATCH_DETAIL, MATCH_GRADE
from hie.store import VersionConflict
from tests.conftest import FHIR

MRN_A = "http://hospital-a.example/mrn"
MRN_B = "http://clinic-b.example/mrn"
MRN_C = "http://clinic-c.example/mrn"
OPERATION = "http://hie.example/fhir/CodeSystem/operation"


def resident_id(birth: str, sequence: str, area: str = "110101") -> str:
    """A valid GB 11643 resident ID number (odd ``sequence``: male)."""
    first17 = area + birth + sequence
    return first17 + gb11643_check_digit(first17)


def person(
    family: str,
    given: str,
    birth: str,
    gender: str,
    *,
    id_number: str | None = None,
    mrn: tuple[str, str] | None = None,
    phone: str | None = None,
    address: str | None = None,
) -> dict:
    """A member's Patient."""
    resource: dict = {
        "resourceType": "Patient",
        "name": [{"use": "official", "family": family, "given": [given]}],
        "gender": gender,
        "birthDate": birth,
        "identifier": [],
    }
    if mrn:
        resource["identifier"].append({"system": mrn[0], "value": mrn[1]})
    if id_number:
        resource["identifier"].append({"system": RESIDENT_ID_SYSTEM, "value": id_number})
    if phone:
        resource["telecom"] = [{"system": "phone", "value": phone}]
    if address:
        resource["address"] = [{"text": address, "city": "北京市", "district": "东城区"}]
    return resource


ZHANG_ID = resident_id("19800101", "123")
ZHANG = person(
    "张",
    "伟",
    "1980-01-01",
    "male",
    id_number=ZHANG_ID,
    phone="13912345678",
    address="北京市东城区东直门南大街5号",
)


@pytest.fixture
def hie(app) -> Iterator[TestClient]:
    with TestClient(app, base_url="http://hie.test") as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": FHIR}


@pytest.fixture
def member_a(mint) -> dict[str, str]:
    return bearer(mint("system/*.cruds", "emr-a", organization="Organization/a", roles=("member",)))


@pytest.fixture
def member_b(mint) -> dict[str, str]:
    return bearer(mint("system/*.cruds", "emr-b", organization="Organization/b", roles=("member",)))


@pytest.fixture
def steward(mint) -> dict[str, str]:
    return bearer(mint("system/Patient.cruds", "mpi-desk", roles=("steward",)))


@pytest.fixture
def auditor(mint) -> dict[str, str]:
    return bearer(mint("system/AuditEvent.rs", "audit-office", roles=("auditor",)))


def register(hie: TestClient, headers: dict, resource: dict) -> str:
    r = hie.post("/fhir/Patient", json=resource, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def read(hie: TestClient, headers: dict, id_: str) -> dict:
    r = hie.get(f"/fhir/Patient/{id_}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def golden_of(hie: TestClient, headers: dict, id_: str) -> str:
    found = golden_of_member(read(hie, headers, id_))
    assert found is not None
    return found


def params(*items: dict) -> dict:
    return {"resourceType": "Parameters", "parameter": list(items)}


def ref(id_: str) -> dict:
    return {"reference": f"Patient/{id_}"}


def out(result: dict, name: str) -> list:
    """The values (or resources) of a Parameters output ``name``."""
    found = []
    for p in result.get("parameter", []):
        if p["name"] == name:
            found.append(next(v for k, v in p.items() if k != "name"))
    return found


def match(hie: TestClient, headers: dict, patient: dict, *extra: dict) -> dict:
    body = params({"name": "resource", "resource": patient}, *extra)
    r = hie.post("/fhir/Patient/$match", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def matches(bundle: dict) -> list[dict]:
    return [e for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def grade(entry: dict) -> str:
    return next(e["valueCode"] for e in entry["search"]["extension"] if e["url"] == MATCH_GRADE)


def detail(entry: dict) -> dict:
    ext = next(e for e in entry["search"]["extension"] if e["url"] == MATCH_DETAIL)
    fields = {
        f["extension"][0]["valueCode"]: f["extension"][1]["valueCode"]
        for f in ext["extension"]
        if f["url"] == "field"
    }
    parts = {e["url"]: e for e in ext["extension"] if e["url"] != "field"}
    return {"record": parts["record"]["valueReference"]["reference"], "fields": fields}


def events(hie: TestClient, auditor: dict, code: str) -> list[dict]:
    r = hie.get(
        "/fhir/AuditEvent",
        params={"subtype": f"{OPERATION}|{code}", "_count": "100"},
        headers=auditor,
    )
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry", [])]


def patients_of(event: dict) -> set[str]:
    return {e["what"]["reference"] for e in event.get("entity", []) if e["role"]["code"] == "1"}


def strip_meta(resource: dict) -> dict:
    return {k: v for k, v in resource.items() if k != "meta"}


# ---------------------------------------------------------------------- $match
def test_match_finds_the_person_with_grade_score_and_explanation(hie, member_a, member_b):
    a = register(
        hie,
        member_a,
        {**ZHANG, "identifier": [*ZHANG["identifier"], {"system": MRN_A, "value": "A-1"}]},
    )
    b = register(hie, member_b, ZHANG)
    golden = golden_of(hie, member_a, a)
    assert golden_of(hie, member_b, b) == golden

    bundle = match(hie, member_a, person("张", "伟", "1980-01-01", "male", id_number=ZHANG_ID))
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    found = matches(bundle)
    assert len(found) == 1 and bundle["total"] == 1
    entry = found[0]
    assert entry["resource"]["id"] == golden and is_golden(entry["resource"])
    assert GOLDEN_TAG in entry["resource"]["meta"]["tag"]
    assert entry["fullUrl"] == f"http://hie.test/fhir/Patient/{golden}"
    assert grade(entry) == "certain"
    assert 0.99 <= entry["search"]["score"] <= 1
    explained = detail(entry)
    assert explained["record"] in (f"Patient/{a}", f"Patient/{b}")
    assert explained["fields"]["national_id"] == "exact"
    assert explained["fields"]["family"] == "exact"


def test_match_orders_people_best_first_and_honours_count(hie, member_a, member_b):
    register(hie, member_a, ZHANG)
    # A namesake born the same day, in another district: a different person, but similar.
    register(
        hie,
        member_b,
        person(
            "张",
            "伟",
            "1980-01-01",
            "male",
            phone="13800001111",
            address="上海市浦东新区世纪大道100号",
        ),
    )
    query = person("张", "伟", "1980-01-01", "male", phone="13912345678")
    found = matches(match(hie, member_a, query))
    assert len(found) >= 1
    scores = [e["search"]["score"] for e in found]
    assert scores == sorted(scores, reverse=True)
    assert all(grade(e) in ("certain", "probable", "possible") for e in found)
    assert all(0 <= s <= 1 for s in scores)
    assert len({e["resource"]["id"] for e in found}) == len(found)  # one entry per person

    limited = match(hie, member_a, query, {"name": "count", "valueInteger": 1})
    assert len(matches(limited)) == 1
    assert matches(limited)[0]["resource"]["id"] == found[0]["resource"]["id"]


def test_match_accepts_a_bare_patient_and_finds_nothing_for_a_stranger(hie, member_a):
    register(hie, member_a, ZHANG)
    r = hie.post(
        "/fhir/Patient/$match",
        json=person("张", "伟", "1980-01-01", "male", id_number=ZHANG_ID),
        headers=member_a,
    )
    assert r.status_code == 200 and len(matches(r.json())) == 1

    stranger = person(
        "欧阳", "娜娜", "2001-05-06", "female", id_number=resident_id("20010506", "222")
    )
    bundle = match(hie, member_a, stranger)
    assert matches(bundle) == [] and bundle["total"] == 0 and "entry" not in bundle

    # Injection attempts in the demographics are data like any other.
    hostile = person(
        "张' OR '1'='1", '{"$ne": null}', "1980-01-01", "male", mrn=(MRN_A, "' OR 1=1 --")
    )
    assert matches(match(hie, member_a, hostile)) == []


def test_match_without_identifying_data_warns(hie, member_a):
    register(hie, member_a, ZHANG)
    bundle = match(hie, member_a, {"resourceType": "Patient", "gender": "male"})
    assert matches(bundle) == []
    outcomes = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert outcomes and outcomes[0]["resource"]["issue"][0]["severity"] == "warning"


def test_only_certain_matches(hie, member_a, member_b, steward):
    a = register(hie, member_a, ZHANG)
    b = register(hie, member_b, ZHANG)
    query = person("张", "伟", "1980-01-01", "male", id_number=ZHANG_ID)
    certain = {"name": "onlyCertainMatches", "valueBoolean": True}
    found = matches(match(hie, member_a, query, certain))
    assert len(found) == 1 and grade(found[0]) == "certain"

    # A weaker query (name, birth date and sex alone) matches, but not with certainty.
    weak = person("张", "伟", "1980-01-01", "male")
    assert [grade(e) for e in matches(match(hie, member_a, weak))] in (["probable"], ["possible"])
    bundle = match(hie, member_a, weak, certain)
    assert matches(bundle) == [] and bundle["total"] == 0

    # Two people (a steward split them) who both match with certainty: none is returned.
    r = hie.post(
        "/fhir/Patient/$mpi-unlink",
        json=params({"name": "patient", "valueReference": ref(b)}),
        headers=steward,
    )
    assert r.status_code == 200, r.text
    assert golden_of(hie, member_a, a) != golden_of(hie, member_b, b)
    assert len(matches(match(hie, member_a, query))) == 2
    bundle = match(hie, member_a, query, certain)
    assert matches(bundle) == []
    note = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert note[0]["resource"]["issue"][0]["code"] == "multiple-matches"


# ---------------------------------------------------------------------- $ihe-pix
@pytest.fixture
def linked(hie, member_a, member_b) -> dict[str, str]:
    """One person registered at two members (linked by the ID number), and a stranger at a
    third domain."""
    a = register(
        hie,
        member_a,
        {**ZHANG, "identifier": [{"system": MRN_A, "value": "A-100"}, *ZHANG["identifier"]]},
    )
    b = register(
        hie,
        member_b,
        {**ZHANG, "identifier": [{"system": MRN_B, "value": "B-200"}, *ZHANG["identifier"]]},
    )
    c = register(
        hie,
        member_b,
        person(
            "李",
            "娜",
            "1990-02-02",
            "female",
            mrn=(MRN_C, "C-1"),
            id_number=resident_id("19900202", "224"),
        ),
    )
    golden = golden_of(hie, member_a, a)
    assert golden_of(hie, member_b, b) == golden
    return {"a": a, "b": b, "c": c, "golden": golden}


def pix(hie: TestClient, headers: dict, *query: tuple[str, str]):
    return hie.get("/fhir/Patient/$ihe-pix", params=list(query), headers=headers)


def identifiers(result: dict) -> set[tuple[str, str]]:
    return {(i["system"], i["value"]) for i in out(result, "targetIdentifier")}


def targets(result: dict) -> set[str]:
    return {r["reference"] for r in out(result, "targetId")}


def test_pix_returns_the_other_identifiers_and_records(hie, member_a, linked):
    r = pix(hie, member_a, ("sourceIdentifier", f"{MRN_A}|A-100"))
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["resourceType"] == "Parameters"
    found = identifiers(result)
    assert (MRN_B, "B-200") in found
    assert (RESIDENT_ID_SYSTEM, ZHANG_ID) in found
    assert (ENTERPRISE_ID_SYSTEM, linked["golden"]) in found
    assert (MRN_A, "A-100") not in found  # never the identifier asked about
    assert targets(result) == {f"Patient/{linked['b']}", f"Patient/{linked['golden']}"}


def test_pix_target_system_filters(hie, member_a, linked):
    result = pix(
        hie, member_a, ("sourceIdentifier", f"{MRN_A}|A-100"), ("targetSystem", MRN_B)
    ).json()
    assert identifiers(result) == {(MRN_B, "B-200")}
    assert targets(result) == {f"Patient/{linked['b']}"}

    result = pix(
        hie,
        member_a,
        ("sourceIdentifier", f"{MRN_B}|B-200"),
        ("targetSystem", ENTERPRISE_ID_SYSTEM),
        ("targetSystem", MRN_A),
    ).json()
    assert identifiers(result) == {(ENTERPRISE_ID_SYSTEM, linked["golden"]), (MRN_A, "A-100")}
    assert targets(result) == {f"Patient/{linked['a']}", f"Patient/{linked['golden']}"}

    # A known domain where this person has no identifier: success, nothing in it.
    result = pix(
        hie, member_a, ("sourceIdentifier", f"{MRN_A}|A-100"), ("targetSystem", MRN_C)
    ).json()
    assert result == {"resourceType": "Parameters"}


def test_pix_by_enterprise_id_logical_id_and_post(hie, member_a, linked):
    by_enterprise = pix(
        hie, member_a, ("sourceIdentifier", f"{ENTERPRISE_ID_SYSTEM}|{linked['golden']}")
    ).json()
    assert targets(by_enterprise) == {f"Patient/{linked['a']}", f"Patient/{linked['b']}"}
    assert (ENTERPRISE_ID_SYSTEM, linked["golden"]) not in identifiers(by_enterprise)

    by_logical_id = pix(
        hie,
        member_a,
        ("sourceIdentifier", f"http://hie.test/fhir|Patient/{linked['b']}"),
        ("targetSystem", MRN_A),
    ).json()
    assert identifiers(by_logical_id) == {(MRN_A, "A-100")}

    body = params(
        {"name": "sourceIdentifier", "valueString": f"{MRN_A}|A-100"},
        {"name": "targetSystem", "valueUri": MRN_B},
    )
    r = hie.post("/fhir/Patient/$ihe-pix", json=body, headers=member_a)
    assert r.status_code == 200, r.text
    assert identifiers(r.json()) == {(MRN_B, "B-200")}


def test_pix_failure_modes_follow_iti_83(hie, member_a, linked):
    unknown_domain = pix(hie, member_a, ("sourceIdentifier", "urn:oid:1.2.3.999|A-100"))
    assert unknown_domain.status_code == 400
    issue = unknown_domain.json()["issue"][0]
    assert issue["code"] == "code-invalid"
    assert issue["diagnostics"] == "sourceIdentifier Assigning Authority not found"

    unknown_value = pix(hie, member_a, ("sourceIdentifier", f"{MRN_A}|NOPE"))
    assert unknown_value.status_code == 404
    assert unknown_value.json()["issue"][0]["code"] == "not-found"
    assert (
        unknown_value.json()["issue"][0]["diagnostics"]
        == "sourceIdentifier Patient Identifier not found"
    )

    unknown_target = pix(
        hie, member_a, ("sourceIdentifier", f"{MRN_A}|A-100"), ("targetSystem", "urn:oid:9.9")
    )
    assert unknown_target.status_code == 403
    assert unknown_target.json()["issue"][0]["diagnostics"] == "targetSystem not found"

    assert (
        pix(hie, member_a, ("sourceIdentifier", "http://hie.test/fhir|Patient/nobody")).status_code
        == 404
    )


@pytest.mark.parametrize(
    "query",
    [
        [],
        [("sourceIdentifier", "A-100")],
        [("sourceIdentifier", f"{MRN_A}|")],
        [("sourceIdentifier", "|A-100")],
        [("sourceIdentifier", f"{MRN_A}|A-100"), ("sourceIdentifier", f"{MRN_B}|B-200")],
        [("sourceIdentifier", f"{MRN_A}|A-100"), ("bogus", "1")],
        [("sourceIdentifier", f"{MRN_A}|" + "x" * 5000)],
        [("sourceIdentifier", f"{MRN_A}|A-100"), ("targetSystem", "")],
    ],
)
def test_pix_bad_queries_are_400(hie, member_a, linked, query):
    r = pix(hie, member_a, *query)
    assert r.status_code == 400, r.text
    assert r.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    "value",
    [
        "' OR '1'='1",
        '{"$ne": null}',
        "A-100' --",
        "A-100%",
        "A-1*",
        "A-100\x00",
        "../../etc/passwd",
    ],
)
def test_pix_injection_in_identifier_values_finds_nothing(hie, member_a, linked, value):
    r = pix(hie, member_a, ("sourceIdentifier", f"{MRN_A}|{value}"))
    assert r.status_code in (400, 404), r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    r = pix(hie, member_a, ("sourceIdentifier", f"{value}|A-100"))
    assert r.status_code == 400


# ---------------------------------------------------------------------- link / unlink
@pytest.fixture
def two_people(hie, member_a, member_b) -> dict[str, str]:
    """Two records that are not linked automatically (no ID numbers, different phones),
    each with a golden record of its own."""
    r1 = register(
        hie,
        member_a,
        person("赵", "敏", "1975-03-04", "female", mrn=(MRN_A, "Z-1"), phone="13700000001"),
    )
    r2 = register(
        hie,
        member_b,
        person("钱", "多", "1968-11-12", "male", mrn=(MRN_B, "Q-2"), phone="13600000002"),
    )
    g1, g2 = golden_of(hie, member_a, r1), golden_of(hie, member_b, r2)
    assert g1 != g2
    return {"r1": r1, "r2": r2, "g1": g1, "g2": g2}


def refer_links(golden: dict) -> set[str]:
    return {
        link["other"]["reference"] for link in golden.get("link", []) if link["type"] == "refer"
    }


def test_link_and_unlink_round_trip(hie, member_a, steward, auditor, two_people):
    r1, r2, g1, g2 = (two_people[k] for k in ("r1", "r2", "g1", "g2"))
    body = params(
        {"name": "patient", "valueReference": ref(r2)},
        {"name": "golden", "valueReference": ref(g1)},
        {"name": "reason", "valueString": "same person confirmed by phone call"},
    )
    r = hie.post("/fhir/Patient/$mpi-link", json=body, headers=steward)
    assert r.status_code == 200, r.text
    result = r.json()
    assert out(result, "outcome")[0]["issue"][0]["severity"] == "information"
    assert golden_of_member(out(result, "patient")[0]) == g1
    assert refer_links(out(result, "golden")[0]) == {f"Patient/{r1}", f"Patient/{r2}"}
    assert golden_of(hie, steward, r2) == g1
    assert refer_links(read(hie, steward, g1)) == {f"Patient/{r1}", f"Patient/{r2}"}

    r = hie.post(
        "/fhir/Patient/$mpi-unlink",
        json=params({"name": "patient", "valueReference": ref(r2)}),
        headers=steward,
    )
    assert r.status_code == 200, r.text
    result = r.json()
    new_golden = golden_of(hie, steward, r2)
    assert new_golden != g1
    assert out(result, "golden")[0]["id"] == new_golden
    assert refer_links(read(hie, steward, g1)) == {f"Patient/{r1}"}
    assert refer_links(read(hie, steward, new_golden)) == {f"Patient/{r2}"}

    for code in ("$mpi-link", "$mpi-unlink"):
        recorded = events(hie, auditor, code)
        assert len(recorded) == 1 and recorded[0]["outcome"] == "0"
        assert {f"Patient/{r2}", f"Patient/{g1}"} <= patients_of(recorded[0])


def test_linking_refuses_wrong_records(hie, steward, two_people):
    r1, r2, g1, g2 = (two_people[k] for k in ("r1", "r2", "g1", "g2"))
    before = read(hie, steward, r2)["meta"]["versionId"]

    def link(patient: str, golden: str):
        body = params(
            {"name": "patient", "valueReference": ref(patient)},
            {"name": "golden", "valueReference": ref(golden)},
        )
        return hie.post("/fhir/Patient/$mpi-link", json=body, headers=steward)

    assert link(g2, g1).status_code == 422  # a golden record to a golden record
    assert link(r2, r1).status_code == 422  # a member record is not a golden record
    assert link(r2, "nobody").status_code == 422
    assert link("nobody", g1).status_code == 422
    body = params(
        {"name": "patient", "valueReference": {"reference": "Observation/1"}},
        {"name": "golden", "valueReference": ref(g1)},
    )
    assert hie.post("/fhir/Patient/$mpi-link", json=body, headers=steward).status_code == 400
    body = params(
        {"name": "patient", "valueReference": {"display": "no reference"}},
        {"name": "golden", "valueReference": ref(g1)},
    )
    assert hie.post("/fhir/Patient/$mpi-link", json=body, headers=steward).status_code == 400
    r = hie.post(
        "/fhir/Patient/$mpi-unlink",
        json=params({"name": "patient", "valueReference": ref(g1)}),
        headers=steward,
    )
    assert r.status_code == 422
    r = hie.post(
        "/fhir/Patient/$mpi-unlink",
        json=params({"name": "patient", "valueReference": ref(r2)}),
        headers=steward,
    )
    assert r.status_code == 409  # alone in its golden record already
    assert read(hie, steward, r2)["meta"]["versionId"] == before  # nothing changed


def test_a_concurrent_change_makes_the_link_plan_again(hie, steward, two_people, monkeypatch):
    r2, g1 = two_people["r2"], two_people["g1"]
    real = Trail.commit
    calls = []

    async def racing(self, writes, events):
        calls.append(len(writes))
        if len(calls) == 1:  # another process committed first
            raise VersionConflict("Patient", r2, 1, 2)
        await real(self, writes, events)

    monkeypatch.setattr(Trail, "commit", racing)
    body = params(
        {"name": "patient", "valueReference": ref(r2)},
        {"name": "golden", "valueReference": ref(g1)},
    )
    r = hie.post("/fhir/Patient/$mpi-link", json=body, headers=steward)
    assert r.status_code == 200, r.text
    assert len(calls) == 2 and golden_of(hie, steward, r2) == g1


def test_a_link_that_keeps_losing_races_is_409_and_changes_nothing(
    hie, steward, two_people, monkeypatch
):
    r2, g1, g2 = two_people["r2"], two_people["g1"], two_people["g2"]

    async def losing(self, writes, events):
        raise VersionConflict("Patient", r2, 1, 2)

    monkeypatch.setattr(Trail, "commit", losing)
    body = params(
        {"name": "patient", "valueReference": ref(r2)},
        {"name": "golden", "valueReference": ref(g1)},
    )
    r = hie.post("/fhir/Patient/$mpi-link", json=body, headers=steward)
    assert r.status_code == 409 and r.json()["issue"][0]["code"] == "conflict"
    monkeypatch.undo()
    assert golden_of(hie, steward, r2) == g2


# ---------------------------------------------------------------------- merge / unmerge
def history_versions(hie: TestClient, headers: dict, id_: str) -> list[str]:
    r = hie.get(f"/fhir/Patient/{id_}/_history", headers=headers)
    assert r.status_code == 200
    return [e["resource"]["meta"]["versionId"] for e in r.json()["entry"] if "resource" in e]


def test_merge_preview_merge_and_unmerge_restore_both(hie, steward, auditor, two_people):
    r1, r2, g1, g2 = (two_people[k] for k in ("r1", "r2", "g1", "g2"))
    before = {g: read(hie, steward, g) for g in (g1, g2)}
    body = params(
        {"name": "source-patient", "valueReference": ref(g2)},
        {"name": "target-patient", "valueReference": ref(g1)},
        {"name": "preview", "valueBoolean": True},
    )
    r = hie.post("/fhir/Patient/$merge", json=body, headers=steward)
    assert r.status_code == 200, r.text
    preview = r.json()
    assert out(preview, "input")[0] == body
    assert out(preview, "result")[0]["id"] == g1
    assert {g: read(hie, steward, g) for g in (g1, g2)} == before  # nothing changed

    body = params(
        {"name": "source-patient", "valueReference": ref(g2)},
        {"name": "target-patient", "valueReference": ref(g1)},
    )
    r = hie.post("/fhir/Patient/$merge", json=body, headers=steward)
    assert r.status_code == 200, r.text
    merged = out(r.json(), "result")[0]
    assert any(
        link["type"] == "replaces" and link["other"]["reference"] == f"Patient/{g2}"
        for link in merged["link"]
    )
    source = read(hie, steward, g2)
    assert source["active"] is False
    assert any(
        link["type"] == "replaced-by" and link["other"]["reference"] == f"Patient/{g1}"
        for link in source["link"]
    )
    assert golden_of(hie, steward, r2) == g1  # the source's member moved
    assert f"Patient/{r2}" in refer_links(read(hie, steward, g1))
    # PIXm follows a golden record merged away to the one that survived.
    result = pix(hie, steward, ("sourceIdentifier", f"{ENTERPRISE_ID_SYSTEM}|{g2}")).json()
    assert targets(result) == {f"Patient/{r1}", f"Patient/{r2}", f"Patient/{g1}"}
    assert (ENTERPRISE_ID_SYSTEM, g1) in identifiers(result)
    again = hie.post("/fhir/Patient/$merge", json=body, headers=steward)
    assert again.status_code == 409  # merged already

    r = hie.post(
        "/fhir/Patient/$unmerge",
        json=params({"name": "source-patient", "valueReference": ref(g2)}),
        headers=steward,
    )
    assert r.status_code == 200, r.text
    restored = {g: read(hie, steward, g) for g in (g1, g2)}
    for g in (g1, g2):
        assert strip_meta(restored[g]) == strip_meta(before[g])
        assert int(restored[g]["meta"]["versionId"]) > int(before[g]["meta"]["versionId"])
    assert out(r.json(), "source")[0]["id"] == g2 and out(r.json(), "target")[0]["id"] == g1
    assert golden_of(hie, steward, r2) == g2
    assert len(history_versions(hie, steward, g2)) >= 3  # history kept: created, merged, restored

    # The preview, the merge and the refused second merge.
    assert sorted(e["outcome"] for e in events(hie, auditor, "$merge")) == ["0", "0", "4"]
    recorded = events(hie, auditor, "$unmerge")
    assert len(recorded) == 1 and {f"Patient/{g1}", f"Patient/{g2}"} <= patients_of(recorded[0])


def test_merge_by_identifier(hie, member_a, steward, two_people):
    g1, g2 = two_people["g1"], two_people["g2"]
    body = params(
        {
            "name": "source-patient-identifier",
            "valueIdentifier": {"system": ENTERPRISE_ID_SYSTEM, "value": g2},
        },
        {"name": "target-patient", "valueReference": ref(g1)},
        {"name": "preview", "valueBoolean": True},
    )
    r = hie.post("/fhir/Patient/$merge", json=body, headers=steward)
    assert r.status_code == 200, r.text
    body["parameter"][0]["valueIdentifier"]["value"] = "no-such-enterprise-id"
    assert hie.post("/fhir/Patient/$merge", json=body, headers=steward).status_code == 422


def test_merge_and_unmerge_duplicate_member_records(hie, member_a, steward):
    first = register(hie, member_a, {**ZHANG, "identifier": [{"system": MRN_A, "value": "A-1"}]})
    duplicate = register(
        hie, member_a, {**ZHANG, "identifier": [{"system": MRN_A, "value": "A-2"}]}
    )
    before = {p: read(hie, steward, p) for p in (first, duplicate)}
    body = params(
        {"name": "source-patient-identifier", "valueIdentifier": {"system": MRN_A, "value": "A-2"}},
        {"name": "target-patient", "valueReference": ref(first)},
    )
    r = hie.post("/fhir/Patient/$merge", json=body, headers=steward)
    assert r.status_code == 200, r.text
    target = out(r.json(), "result")[0]
    assert {"other": ref(duplicate), "type": "replaces"} in target["link"]
    source = read(hie, steward, duplicate)
    assert source["active"] is False
    assert {"other": ref(first), "type": "replaced-by"} in source["link"]
    assert golden_of(hie, steward, duplicate) == golden_of(hie, steward, first)

    body = params({"name": "source-patient", "valueReference": ref(duplicate)})
    r = hie.post("/fhir/Patient/$unmerge", json=body, headers=steward)
    assert r.status_code == 200, r.text
    for p in (first, duplicate):
        after = read(hie, steward, p)
        assert strip_meta(after) == strip_meta(before[p])
        assert int(after["meta"]["versionId"]) > int(before[p]["meta"]["versionId"])


def test_merge_refuses_what_cannot_be_merged(hie, steward, two_people):
    r1, r2, g1, g2 = (two_people[k] for k in ("r1", "r2", "g1", "g2"))

    def merge(*items: dict):
        return hie.post("/fhir/Patient/$merge", json=params(*items), headers=steward)

    src, tgt = "source-patient", "target-patient"
    assert (
        merge(
            {"name": src, "valueReference": ref(g1)}, {"name": tgt, "valueReference": ref(g1)}
        ).status_code
        == 422
    )
    assert (
        merge(
            {"name": src, "valueReference": ref(r2)}, {"name": tgt, "valueReference": ref(g1)}
        ).status_code
        == 422
    )
    assert (
        merge(
            {"name": src, "valueReference": ref("nobody")}, {"name": tgt, "valueReference": ref(g1)}
        ).status_code
        == 422
    )
    assert merge({"name": tgt, "valueReference": ref(g1)}).status_code == 400
    assert (
        merge(
            {"name": src, "valueReference": ref(g2)},
            {"name": tgt, "valueReference": ref(g1)},
            {"name": "result-patient", "resource": {"resourceType": "Patient", "id": g1}},
        ).status_code
        == 422
    )
    assert (
        merge(
            {"name": src, "valueReference": ref(g2)},
            {"name": tgt, "valueReference": ref(g1)},
            {"name": "preview", "valueBoolean": "yes"},
        ).status_code
        == 400
    )
    r = hie.post(
        "/fhir/Patient/$unmerge",
        json=params({"name": src, "valueReference": ref(g2)}),
        headers=steward,
    )
    assert r.status_code == 422  # not merged
    assert read(hie, steward, g2).get("active", True) is True


# ---------------------------------------------------------------------- review queue
def review_items(result: dict) -> list[dict]:
    items = []
    for item in out(result, "review"):
        parts: dict = {}
        for p in item:
            value = next(v for k, v in p.items() if k != "name")
            parts.setdefault(p["name"], []).append(value)
        items.append(parts)
    return items


@pytest.fixture
def uncertain(hie, member_a, member_b) -> dict[str, str]:
    """A registration the index cannot decide on: same name, birth date and sex, nothing to
    corroborate them."""
    r1 = register(
        hie,
        member_a,
        person("王", "芳", "1985-07-08", "female", mrn=(MRN_A, "W-1"), phone="13511112222"),
    )
    r2 = register(hie, member_b, person("王", "芳", "1985-07-08", "female", mrn=(MRN_B, "W-2")))
    return {
        "r1": r1,
        "r2": r2,
        "g1": golden_of(hie, member_a, r1),
        "g2": golden_of(hie, member_b, r2),
    }


def open_reviews(hie: TestClient, headers: dict, **query) -> list[dict]:
    r = hie.get("/fhir/Patient/$mpi-review", params={"status": "open", **query}, headers=headers)
    assert r.status_code == 200, r.text
    return review_items(r.json())


def find_review(items: list[dict], record: str) -> dict | None:
    return next((i for i in items if i["record"][0]["reference"] == f"Patient/{record}"), None)


def test_review_queue_lists_pairs_with_their_comparison(hie, steward, uncertain):
    items = open_reviews(hie, steward)
    item = find_review(items, uncertain["r2"])
    assert item is not None, items
    assert item["candidate"][0]["reference"] == f"Patient/{uncertain['g1']}"
    assert item["status"] == ["open"]
    assert 0 <= item["score"][0] <= 1
    fields = {p[0]["valueCode"]: p[1]["valueCode"] for p in item["field"]}
    assert fields["family"] == "exact" and fields["birth_date"] == "exact"
    r = hie.get("/fhir/Patient/$mpi-review", params={"_count": "1"}, headers=steward)
    total = out(r.json(), "total")[0]
    assert total >= 1 and len(out(r.json(), "review")) == 1


def test_review_decided_different_is_not_proposed_again(hie, member_b, steward, auditor, uncertain):
    item = find_review(open_reviews(hie, steward), uncertain["r2"])
    body = params(
        {"name": "review", "valueString": item["id"][0]},
        {"name": "decision", "valueCode": "different"},
    )
    r = hie.post("/fhir/Patient/$mpi-resolve", json=body, headers=steward)
    assert r.status_code == 200, r.text
    decided = review_items(r.json())[0]
    assert decided["status"] == ["different"] and decided["decidedBy"]
    assert find_review(open_reviews(hie, steward), uncertain["r2"]) is None
    different = review_items(
        hie.get("/fhir/Patient/$mpi-review", params={"status": "different"}, headers=steward).json()
    )
    assert find_review(different, uncertain["r2"]) is not None

    # The member registers the same record again, as it was and then changed: the pair does
    # not come back.
    again = read(hie, member_b, uncertain["r2"])
    url = f"/fhir/Patient/{uncertain['r2']}"
    assert hie.put(url, json=strip_meta(again), headers=member_b).status_code == 200
    assert find_review(open_reviews(hie, steward), uncertain["r2"]) is None
    again["telecom"] = [{"system": "email", "value": "wf@example.com"}]
    assert hie.put(url, json=strip_meta(again), headers=member_b).status_code == 200
    assert find_review(open_reviews(hie, steward), uncertain["r2"]) is None
    assert golden_of(hie, member_b, uncertain["r2"]) != uncertain["g1"]

    recorded = events(hie, auditor, "$mpi-resolve")
    resolved = [
        e for e in recorded if e["action"] == "E" and f"Patient/{uncertain['r2']}" in patients_of(e)
    ]
    assert resolved


def test_review_decided_same_links_the_record(hie, steward, uncertain):
    item = find_review(open_reviews(hie, steward), uncertain["r2"])
    body = params(
        {"name": "review", "valueString": item["id"][0]}, {"name": "decision", "valueCode": "same"}
    )
    r = hie.post("/fhir/Patient/$mpi-resolve", json=body, headers=steward)
    assert r.status_code == 200, r.text
    assert golden_of(hie, steward, uncertain["r2"]) == uncertain["g1"]
    assert find_review(open_reviews(hie, steward), uncertain["r2"]) is None


def test_review_bad_input(hie, steward, member_a, uncertain):
    item = find_review(open_reviews(hie, steward), uncertain["r2"])

    def resolve(*items: dict, headers=steward):
        return hie.post("/fhir/Patient/$mpi-resolve", json=params(*items), headers=headers)

    review = {"name": "review", "valueString": item["id"][0]}
    assert resolve(review, {"name": "decision", "valueCode": "maybe"}).status_code == 400
    assert resolve(review).status_code == 400
    assert (
        resolve(
            {"name": "review", "valueString": "0" * 32}, {"name": "decision", "valueCode": "same"}
        ).status_code
        == 422
    )
    assert (
        resolve(
            {"name": "review", "valueString": "../x"}, {"name": "decision", "valueCode": "same"}
        ).status_code
        == 400
    )
    assert (
        resolve(review, {"name": "decision", "valueCode": "same"}, headers=member_a).status_code
        == 403
    )
    assert (
        hie.get(
            "/fhir/Patient/$mpi-review", params={"status": "bogus"}, headers=steward
        ).status_code
        == 400
    )
    assert (
        hie.get("/fhir/Patient/$mpi-review", params={"_count": "abc"}, headers=steward).status_code
        == 400
    )
    assert hie.get("/fhir/Patient/$mpi-review", headers=member_a).status_code == 403
    assert find_review(open_reviews(hie, steward), uncertain["r2"]) is not None  # unchanged


# ---------------------------------------------------------------------- audit
def test_match_and_pix_are_audited(hie, member_a, auditor, linked):
    match(hie, member_a, person("张", "伟", "1980-01-01", "male", id_number=ZHANG_ID))
    pix(hie, member_a, ("sourceIdentifier", f"{MRN_A}|A-100"))
    pix(hie, member_a, ("sourceIdentifier", "urn:oid:1.2.3.999|A-100"))
    recorded = events(hie, auditor, "$match")
    assert len(recorded) == 1 and recorded[0]["outcome"] == "0"
    assert f"Patient/{linked['golden']}" in patients_of(recorded[0])
    recorded = events(hie, auditor, "$ihe-pix")
    assert sorted(e["outcome"] for e in recorded) == ["0", "4"]
    ok = next(e for e in recorded if e["outcome"] == "0")
    assert {f"Patient/{linked['b']}", f"Patient/{linked['golden']}"} <= patients_of(ok)


# ---------------------------------------------------------------------- bad input
RESOURCE = {"name": "resource", "resource": person("张", "伟", "1980-01-01", "male")}


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"", 400),
        (b"[]", 400),
        (params(), 400),  # no resource
        (params({"name": "onlyCertainMatches", "valueBoolean": True}), 400),
        (params(RESOURCE, {"name": "count", "valueString": "abc"}), 400),
        (params(RESOURCE, {"name": "count", "valueInteger": "abc"}), 400),
        (params(RESOURCE, {"name": "count", "valueInteger": 0}), 400),
        (params(RESOURCE, {"name": "count", "valueInteger": -3}), 400),
        (params(RESOURCE, {"name": "onlyCertainMatches", "valueBoolean": "maybe"}), 400),
        (params(RESOURCE, {"name": "onlyCertainMatches", "valueString": "true"}), 400),
        (
            params(
                RESOURCE,
                {"name": "onlyCertainMatches", "valueBoolean": True},
                {"name": "onlyCertainMatches", "valueBoolean": False},
            ),
            400,
        ),
        (params(RESOURCE, {"name": "bogus", "valueString": "x"}), 400),
        (params(RESOURCE, RESOURCE), 400),
        (
            params(
                {
                    "name": "resource",
                    "resource": {
                        "resourceType": "Observation",
                        "status": "final",
                        "code": {"text": "x"},
                    },
                }
            ),
            400,
        ),
        (params({"name": "resource", "valueString": "Patient/1"}), 400),
        (
            params(
                {
                    "name": "resource",
                    "resource": {"resourceType": "Patient", "birthDate": "1980-13-45"},
                }
            ),
            422,
        ),
        (
            params({"name": "resource", "resource": {"resourceType": "Patient", "name": "张伟"}}),
            422,
        ),
        (
            params(
                {
                    "name": "resource",
                    "resource": {
                        "resourceType": "Patient",
                        "modifierExtension": [{"url": "http://x", "valueBoolean": True}],
                    },
                }
            ),
            422,
        ),
        ({"resourceType": "Observation", "status": "final", "code": {"text": "x"}}, 400),
        ({"resourceType": "Parameters", "parameter": {"name": "resource"}}, 400),
        ({"resourceType": "Parameters", "parameter": [{"valueString": "x"}]}, 400),
    ],
)
def test_match_bad_input(hie, member_a, body, status):
    if isinstance(body, bytes):
        r = hie.post("/fhir/Patient/$match", content=body, headers=member_a)
    else:
        r = hie.post("/fhir/Patient/$match", json=body, headers=member_a)
    assert r.status_code == status, r.text
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "error" and outcome["issue"][0]["diagnostics"]


def test_match_refuses_url_parameters_content_types_and_oversized_bodies(hie, member_a, settings):
    body = params(RESOURCE)
    assert (
        hie.post("/fhir/Patient/$match?count=abc", json=body, headers=member_a).status_code == 400
    )
    r = hie.post(
        "/fhir/Patient/$match",
        content=b"resource=x",
        headers={**member_a, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 415
    big = params(
        {
            "name": "resource",
            "resource": {
                "resourceType": "Patient",
                "text": {
                    "status": "generated",
                    "div": "<div>" + "x" * settings.max_body_bytes + "</div>",
                },
            },
        }
    )
    r = hie.post("/fhir/Patient/$match", json=big, headers=member_a)
    assert r.status_code == 413 and r.json()["resourceType"] == "OperationOutcome"
    # A long name is matched (or not), never a crash.
    long_name = person("张" * 10000, "伟", "1980-01-01", "male")
    assert (
        hie.post(
            "/fhir/Patient/$match",
            json=params({"name": "resource", "resource": long_name}),
            headers=member_a,
        ).status_code
        == 200
    )


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("$mpi-link", b"{"),
        ("$mpi-link", params({"name": "patient", "valueReference": {"reference": "Patient/x"}})),
        (
            "$mpi-link",
            params(
                {"name": "patient", "valueString": "Patient/x"},
                {"name": "golden", "valueString": "Patient/y"},
            ),
        ),
        (
            "$mpi-link",
            params(
                {"name": "patient", "valueReference": {"reference": "Patient/x"}},
                {"name": "golden", "valueReference": {"reference": "Patient/y"}},
                {"name": "extra", "valueString": "z"},
            ),
        ),
        ("$mpi-unlink", params()),
        (
            "$mpi-unlink",
            params({"name": "patient", "valueReference": {"reference": "Patient/a b"}}),
        ),
        ("$mpi-unlink", {"resourceType": "Patient"}),
        (
            "$merge",
            params({"name": "source-patient", "valueReference": {"reference": "Patient/x"}}),
        ),
        (
            "$merge",
            params(
                {"name": "source-patient-identifier", "valueIdentifier": {"value": "1"}},
                {"name": "target-patient", "valueReference": {"reference": "Patient/x"}},
            ),
        ),
        (
            "$unmerge",
            params({"name": "source-patient", "valueReference": {"reference": "Group/x"}}),
        ),
        (
            "$unmerge",
            params(
                {"name": "source-patient", "valueReference": {"reference": "Patient/x"}},
                {"name": "source-patient", "valueReference": {"reference": "Patient/y"}},
            ),
        ),
        (
            "$mpi-resolve",
            params(
                {"name": "review", "valueInteger": 3}, {"name": "decision", "valueCode": "same"}
            ),
        ),
    ],
)
def test_steward_operations_bad_input_is_400(hie, steward, path, body):
    if isinstance(body, bytes):
        r = hie.post(f"/fhir/Patient/{path}", content=body, headers=steward)
    else:
        r = hie.post(f"/fhir/Patient/{path}", json=body, headers=steward)
    assert r.status_code == 400, r.text
    assert r.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("path", ["$mpi-link", "$mpi-unlink", "$merge", "$unmerge", "$mpi-resolve"])
def test_steward_operations_need_a_steward(hie, mint, member_a, two_people, path):
    body = params({"name": "patient", "valueReference": ref(two_people["r2"])})
    assert (
        hie.post(f"/fhir/Patient/{path}", json=body, headers={"Content-Type": FHIR}).status_code
        == 401
    )
    bad = {"Authorization": "Bearer not-a-token", "Content-Type": FHIR}
    assert hie.post(f"/fhir/Patient/{path}", json=body, headers=bad).status_code == 401
    r = hie.post(f"/fhir/Patient/{path}", json=body, headers=member_a)
    assert r.status_code == 403 and "steward" in r.json()["issue"][0]["diagnostics"]
    read_only = bearer(mint("system/Patient.rs", "desk-2", roles=("steward",)))
    assert hie.post(f"/fhir/Patient/{path}", json=body, headers=read_only).status_code == 403
    admin = bearer(mint())
    assert (
        hie.post(f"/fhir/Patient/{path}", json=params(), headers=admin).status_code == 400
    )  # let in


def test_match_and_pix_need_patient_search_scope(hie, mint, linked):
    no_patient = bearer(
        mint("system/Observation.rs", "lab", organization="Organization/a", roles=("member",))
    )
    assert (
        hie.post("/fhir/Patient/$match", json=params(RESOURCE), headers=no_patient).status_code
        == 403
    )
    assert pix(hie, no_patient, ("sourceIdentifier", f"{MRN_A}|A-100")).status_code == 403
    assert hie.post("/fhir/Patient/$match", json=params(RESOURCE)).status_code == 401
    assert (
        hie.get("/fhir/Patient/$ihe-pix", params={"sourceIdentifier": f"{MRN_A}|A-100"}).status_code
        == 401
    )


def test_operations_are_in_the_capability_statement(hie):
    statement = hie.get("/fhir/metadata").json()
    patient = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Patient")
    names = {op["name"] for op in patient["operation"]}
    assert {
        "match", "ihe-pix", "mpi-link", "mpi-unlink", "merge", "unmerge", "mpi-review",
        "mpi-resolve",
    } <= names  # fmt: skip
