"""FHIR search through the HTTP API on both stores.

The data set below is small on purpose: every expected result was worked out by hand
from it (the comments say why), never read back from the server. The master patient index
is off here: it would add a golden record to every Patient created, and these tests are
about search semantics (searches over golden records are tested in tests/mpi).
"""

from __future__ import annotations

import pytest

from hie.config import Settings

SYS = "urn:oid:2.16.156.10011.1.mrn"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
MAIDEN = "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName"
MAIDEN_SP = {
    "resourceType": "SearchParameter",
    "url": "http://hie.example/SearchParameter/mothers-maiden",
    "name": "mothers-maiden",
    "status": "active",
    "description": "Mother's maiden name",
    "code": "mothers-maiden",
    "base": ["Patient"],
    "type": "string",
    "expression": f"Patient.extension('{MAIDEN}').value",
}


def qty(value, code):
    return {"value": value, "unit": code, "system": UCUM, "code": code}


def concept(code, display, system=LOINC):
    return {"coding": [{"system": system, "code": code, "display": display}]}


def load(client) -> dict[str, str]:
    """Create the data set; returns logical ids by the short names used in tests."""
    ids: dict[str, str] = {}

    def put(name: str, resource: dict) -> None:
        resp = client.post(f"/fhir/{resource['resourceType']}", json=resource)
        assert resp.status_code == 201, resp.text
        ids[name] = resp.json()["id"]

    put("org1", {"resourceType": "Organization", "name": "Central Hospital"})
    put(
        "org2",
        {
            "resourceType": "Organization",
            "name": "Community Clinic",
            "partOf": {"reference": f"Organization/{ids['org1']}"},
        },
    )
    put("dr1", {"resourceType": "Practitioner", "name": [{"family": "Li", "given": ["Ming"]}]})
    org = lambda n: {"reference": f"Organization/{ids[n]}"}  # noqa: E731
    put(
        "p1",
        {
            "resourceType": "Patient",
            "identifier": [{"system": SYS, "value": "001"}],
            "name": [{"family": "张", "given": ["三"]}],
            "gender": "male",
            "birthDate": "1980-05-01",
            "active": True,
            "managingOrganization": org("org1"),
            "extension": [{"url": MAIDEN, "valueString": "Wu"}],
        },
    )
    put(
        "p2",
        {
            "resourceType": "Patient",
            "identifier": [{"system": SYS, "value": "002"}],
            "name": [{"family": "張", "given": ["四"]}],
            "gender": "female",
            "birthDate": "1980-05-20",
            "managingOrganization": org("org2"),
        },
    )
    put(
        "p3",
        {
            "resourceType": "Patient",
            "identifier": [
                {
                    "system": SYS,
                    "value": "003",
                    "type": {"coding": [{"system": V2_0203, "code": "MR"}]},
                }
            ],
            "name": [{"family": "Müller", "given": ["Zoë"]}],
            "gender": "male",
            "birthDate": "1975-12-31",
            "managingOrganization": org("org1"),
        },
    )
    put(
        "p4",
        {
            "resourceType": "Patient",
            "name": [{"family": "单", "given": ["田芳"]}],
            "gender": "male",
            "birthDate": "1990-01-01",
        },
    )
    put(
        "p5",
        {
            "resourceType": "Patient",
            "name": [{"family": "ＷＡＮＧ", "given": ["Wei"]}],
            "birthDate": "2001-02-03",
        },
    )
    subj = lambda n: {"reference": f"Patient/{ids[n]}"}  # noqa: E731
    glucose = concept("2339-0", "Glucose")
    put(
        "o1",
        {
            "resourceType": "Observation",
            "status": "final",
            "code": glucose,
            "subject": subj("p1"),
            "performer": [{"reference": f"Practitioner/{ids['dr1']}"}],
            "effectiveDateTime": "2024-03-01T10:00:00+08:00",
            "valueQuantity": qty(5.5, "mmol/L"),
        },
    )
    put(
        "o2",
        {
            "resourceType": "Observation",
            "status": "preliminary",
            "code": glucose,
            "subject": subj("p1"),
            "effectiveDateTime": "2024-03-05",
            "valueQuantity": qty(100, "mg/dL"),
        },
    )
    put(
        "o3",
        {
            "resourceType": "Observation",
            "status": "final",
            "code": concept("8480-6", "Systolic blood pressure"),
            "subject": subj("p2"),
            "effectivePeriod": {"start": "2024-01-01", "end": "2024-01-31"},
            "valueQuantity": qty(120, "mm[Hg]"),
        },
    )
    put(
        "o4",
        {
            "resourceType": "Observation",
            "status": "final",
            "code": glucose,
            "subject": subj("p3"),
            "effectiveDateTime": "2023-06-01",
            "valueQuantity": qty(6100, "umol/L"),
        },
    )
    put(
        "o5",
        {
            "resourceType": "Observation",
            "status": "final",
            "code": concept("85354-9", "Blood pressure panel"),
            "subject": subj("p2"),
            "effectiveDateTime": "2024-02-10",
            "component": [
                {"code": concept("8480-6", "Systolic"), "valueQuantity": qty(130, "mm[Hg]")},
                {"code": concept("8462-4", "Diastolic"), "valueQuantity": qty(85, "mm[Hg]")},
            ],
        },
    )
    put(
        "o6",
        {
            "resourceType": "Observation",
            "status": "final",
            "code": glucose,
            "subject": {"identifier": {"system": SYS, "value": "009"}},
        },
    )
    put(
        "ra1",
        {
            "resourceType": "RiskAssessment",
            "status": "final",
            "subject": subj("p1"),
            "prediction": [{"probabilityDecimal": 0.8}],
        },
    )
    put(
        "e1",
        {
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": subj("p1"),
            "period": {"start": "2024-03-01", "end": "2024-03-02"},
        },
    )
    put(
        "vs1",
        {
            "resourceType": "ValueSet",
            "status": "active",
            "url": "http://example.org/fhir/ValueSet/a/b",
        },
    )
    return ids


@pytest.fixture
def settings(tmp_path) -> Settings:
    """The shared settings (tests/conftest.py) with the master patient index off."""
    return Settings(data_dir=tmp_path, max_body_bytes=2 * 1024 * 1024, mpi=False)


@pytest.fixture
def data(client):
    return load(client)


@pytest.fixture
def find(client, data):
    """``find("Patient", name="张")`` -> the set of short names of the matches."""
    by_id = {v: k for k, v in data.items()}

    def _find(path: str, params=None, **kw):
        resp = client.get(f"/fhir/{path}", params=params or kw)
        assert resp.status_code == 200, resp.text
        return {by_id.get(e["resource"]["id"], "?") for e in resp.json().get("entry", [])}

    return _find


def test_string_default_prefix_case_width_accent_and_script(find):
    assert find("Patient", name="张") == {"p1", "p2"}  # 張 folds to 张
    assert find("Patient", name="張") == {"p1", "p2"}
    assert find("Patient", name="张三") == {"p1"}  # family + given, as Chinese is written
    assert find("Patient", family="muller") == {"p3"}  # ü folds to u
    assert find("Patient", given="ZOE") == {"p3"}
    assert find("Patient", family="wang") == {"p5"}  # full-width ＷＡＮＧ
    assert find("Patient", name="Wa") == {"p5"}
    assert find("Patient", name="ang") == set()  # prefix, not substring


def test_string_exact_and_contains(find):
    assert find("Patient", params={"family:exact": "張"}) == {"p2"}
    assert find("Patient", params={"family:exact": "张"}) == {"p1"}
    assert find("Patient", params={"family:exact": "müller"}) == set()  # case matters
    assert find("Patient", params={"name:contains": "芳"}) == {"p4"}
    assert find("Patient", params={"name:contains": "ULL"}) == {"p3"}


def test_phonetic_pinyin(find):
    assert find("Patient", phonetic="zhang") == {"p1", "p2"}
    assert find("Patient", phonetic="zhangsan") == {"p1"}
    assert find("Patient", phonetic="shan") == {"p4"}  # 单 as a surname reads shan


def test_token_forms(find):
    assert find("Patient", gender="male") == {"p1", "p3", "p4"}
    assert find("Patient", identifier=f"{SYS}|001") == {"p1"}
    assert find("Patient", identifier="002") == {"p2"}
    assert find("Patient", identifier=f"{SYS}|") == {"p1", "p2", "p3"}
    assert find("Patient", identifier="|001") == set()  # explicitly without system
    assert find("Patient", params={"identifier:of-type": f"{V2_0203}|MR|003"}) == {"p3"}
    assert find("Patient", params={"identifier:of-type": f"{V2_0203}|MR|001"}) == set()
    assert find("Observation", code=f"{LOINC}|2339-0") == {"o1", "o2", "o4", "o6"}
    assert find("Observation", params={"code:text": "gluc"}) == {"o1", "o2", "o4", "o6"}
    assert find("Observation", params={"status:not": "final"}) == {"o2"}
    assert find("Patient", active="true") == {"p1"}
    assert find("Patient", params={"gender:missing": "true"}) == {"p5"}
    assert find("Patient", params={"gender:missing": "false"}) == {"p1", "p2", "p3", "p4"}
    assert find("Patient", gender="male,female") == {"p1", "p2", "p3", "p4"}
    assert find("Patient", params=[("gender", "male"), ("birthdate", "1980")]) == {"p1"}


def test_dates_prefixes_precision_periods_and_zones(find):
    assert find("Patient", birthdate="1980") == {"p1", "p2"}
    assert find("Patient", birthdate="1980-05") == {"p1", "p2"}
    assert find("Patient", birthdate="ge1980-05-10") == {"p2", "p4", "p5"}
    assert find("Patient", birthdate="lt1980") == {"p3"}
    assert find("Patient", birthdate="sa1980-05-01") == {"p2", "p4", "p5"}
    assert find("Patient", birthdate="eb1980-05-20") == {"p1", "p3"}
    assert find("Patient", birthdate="ne1980") == {"p3", "p4", "p5"}
    assert find("Patient", birthdate="le1980-05-01") == {"p1", "p3"}
    # o3's period is January 2024: contained in the month, not in one day of it.
    assert "o3" in find("Observation", date="2024-01")
    assert "o3" not in find("Observation", date="2024-01-15")
    assert "o3" in find("Observation", date="ge2024-01-15")
    assert "o3" in find("Observation", date="lt2024-01-15")
    assert find("Observation", date="lt2024-01-01") == {"o4"}
    # o1 is 2024-03-01T10:00+08:00 = 02:00Z.
    assert "o1" in find("Observation", date="2024-03-01T02:00:00Z")
    assert "o1" in find("Observation", date="2024-03-01T10:00:00+08:00")
    assert "o1" not in find("Observation", date="2024-03-01T10:00:00Z")
    assert find("Observation", date="2024-02-29") == set()


def test_number(find):
    assert find("RiskAssessment", probability="0.8") == {"ra1"}
    assert find("RiskAssessment", probability="0.80") == {"ra1"}
    assert find("RiskAssessment", probability="0.81") == set()
    assert find("RiskAssessment", probability="gt0.5") == {"ra1"}
    assert find("RiskAssessment", probability="lt0.5") == set()
    assert find("RiskAssessment", probability="ap0.75") == {"ra1"}  # within 10%


def test_quantity_with_units_and_ucum_canonical(find):
    vq = "value-quantity"
    assert find("Observation", params={vq: f"5.5|{UCUM}|mmol/L"}) == {"o1"}
    assert find("Observation", params={vq: f"5500|{UCUM}|umol/L"}) == {"o1"}  # same amount
    assert find("Observation", params={vq: f"gt5.8|{UCUM}|mmol/L"}) == {"o4"}  # 6100 umol/L
    assert find("Observation", params={vq: f"ge1|{UCUM}|g/L"}) == {"o2"}  # 100 mg/dL = 1 g/L
    assert find("Observation", params={vq: "120||mm[Hg]"}) == {"o3"}
    assert find("Observation", params={vq: "lt7"}) == {"o1"}
    assert find("Observation", params={vq: "5.5"}) == {"o1"}


def test_reference_forms(find, data, client):
    p1 = data["p1"]
    assert find("Observation", subject=f"Patient/{p1}") == {"o1", "o2"}
    assert find("Observation", subject=p1) == {"o1", "o2"}
    assert find("Observation", params={"subject:Patient": p1}) == {"o1", "o2"}
    assert find("Observation", patient=f"http://hie.test/fhir/Patient/{p1}") == {"o1", "o2"}
    assert find("Observation", params={"subject:identifier": f"{SYS}|009"}) == {"o6"}
    assert find("Observation", params={"subject:missing": "true"}) == {"o6"}
    assert find("Observation", subject="Patient/unknown") == set()


def test_absolute_references_to_this_server_when_its_base_is_configured(tmp_path):
    from fastapi.testclient import TestClient

    from hie.app import create_app
    from hie.config import Settings

    base = "https://hie.example.cn/fhir"
    app = create_app(Settings(data_dir=tmp_path, base_url=base))
    with TestClient(app, base_url="http://hie.test") as c:
        c.headers["Authorization"] = f"Bearer {app.state.tokens.mint('t', 'system/*.cruds', 60)}"
        local = {"reference": f"{base}/Patient/p1"}
        other = {"reference": "https://other-member.example/fhir/Patient/p1"}
        for subject in (local, other):
            obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
            assert c.post("/fhir/Observation", json={**obs, "subject": subject}).status_code == 201
        got = c.get("/fhir/Observation", params={"subject": "Patient/p1"}).json()
        assert [e["resource"]["subject"] for e in got["entry"]] == [local]
        got = c.get("/fhir/Observation", params={"subject": other["reference"]}).json()
        assert [e["resource"]["subject"] for e in got["entry"]] == [other]


def test_uri_below_above(find):
    assert find("ValueSet", url="http://example.org/fhir/ValueSet/a/b") == {"vs1"}
    assert find("ValueSet", url="http://example.org/fhir") == set()
    assert find("ValueSet", params={"url:below": "http://example.org/fhir"}) == {"vs1"}
    assert find("ValueSet", params={"url:above": "http://example.org/fhir/ValueSet/a/b/c"}) == {
        "vs1"
    }
    assert find("ValueSet", params={"url:above": "http://example.org/fhir/ValueSet/a"}) == set()


def test_composite(find):
    assert find("Observation", params={"code-value-quantity": f"{LOINC}|2339-0$gt5.8"}) == {
        "o2",  # 100 (mg/dL) > 5.8 when no unit is given
        "o4",
    }
    cvq = "code-value-quantity"
    assert find("Observation", params={cvq: f"{LOINC}|2339-0$5.5|{UCUM}|mmol/L"}) == {"o1"}
    comp = "component-code-value-quantity"
    assert find("Observation", params={comp: f"{LOINC}|8480-6$gt125"}) == {"o5"}
    # Diastolic is 85: the code and the value must come from the same component.
    assert find("Observation", params={comp: f"{LOINC}|8462-4$gt125"}) == set()


def test_chains(find):
    assert find("Observation", params={"subject:Patient.name": "张"}) == {"o1", "o2", "o3", "o5"}
    assert find("Observation", params={"subject.gender": "female"}) == {"o3", "o5"}
    three = "subject:Patient.organization.name"
    assert find("Observation", params={three: "Central"}) == {"o1", "o2", "o4"}
    four = "subject:Patient.organization.partof.name"
    assert find("Observation", params={four: "Central"}) == {"o3", "o5"}


def test_reverse_chains(find):
    assert find("Patient", params={"_has:Observation:patient:code": f"{LOINC}|8480-6"}) == {"p2"}
    assert find("Patient", params={"_has:Observation:subject:status": "preliminary"}) == {"p1"}
    nested = "_has:Patient:organization:_has:Observation:patient:code"
    assert find("Organization", params={nested: "8480-6"}) == {"org2"}


def test_sort(client, data):
    by_id = {v: k for k, v in data.items()}

    def order(sort: str) -> list[str]:
        bundle = client.get("/fhir/Patient", params={"_sort": sort}).json()
        return [by_id[e["resource"]["id"]] for e in bundle["entry"]]

    assert order("birthdate") == ["p3", "p1", "p2", "p4", "p5"]
    assert order("-birthdate") == ["p5", "p4", "p2", "p1", "p3"]
    # female first, then males youngest first; p5 has no gender: last.
    assert order("gender,-birthdate") == ["p2", "p4", "p1", "p3", "p5"]
    assert order("_id") == sorted(order("_id"), key=lambda n: data[n])


def test_include_revinclude_iterate(client, data):
    def entries(params) -> dict[str, str]:
        bundle = client.get(params[0], params=params[1]).json()
        names = {v: k for k, v in data.items()}
        return {names[e["resource"]["id"]]: e["search"]["mode"] for e in bundle["entry"]}

    o3 = data["o3"]
    assert entries(("/fhir/Observation", {"_id": o3, "_include": "Observation:subject"})) == {
        "o3": "match",
        "p2": "include",
    }
    assert entries(("/fhir/Observation", {"_id": o3, "_include": "Observation:subject:Group"})) == {
        "o3": "match"
    }
    got = entries(
        (
            "/fhir/Observation",
            [
                ("_id", o3),
                ("_include", "Observation:subject"),
                ("_include:iterate", "Patient:organization"),
                ("_include:iterate", "Organization:partof"),
            ],
        )
    )
    assert got == {"o3": "match", "p2": "include", "org2": "include", "org1": "include"}
    got = entries(("/fhir/Patient", {"_id": data["p1"], "_revinclude": "Observation:subject"}))
    assert got == {"p1": "match", "o1": "include", "o2": "include"}
    got = entries(("/fhir/Observation", {"_id": data["o1"], "_include": "*"}))
    assert got == {"o1": "match", "p1": "include", "dr1": "include"}
    # Everything referring to p1: its observations, risk assessment and encounter.
    got = entries(("/fhir/Patient", {"_id": data["p1"], "_revinclude": "*"}))
    assert got == {
        "p1": "match",
        "o1": "include",
        "o2": "include",
        "ra1": "include",
        "e1": "include",
    }


def test_include_leaves_out_types_the_token_cannot_read(client, data, mint):
    bundle = client.get(
        "/fhir/Observation",
        params={"_id": data["o3"], "_include": "Observation:subject"},
        headers={"Authorization": f"Bearer {mint('system/Observation.rs')}"},
    ).json()
    assert [e["resource"]["resourceType"] for e in bundle["entry"]] == ["Observation"]


def test_paging_is_stable_while_others_write(client, data):
    first = client.get("/fhir/Patient", params={"_sort": "birthdate", "_count": 2}).json()
    names = {v: k for k, v in data.items()}
    seen = [names[e["resource"]["id"]] for e in first["entry"]]
    assert seen == ["p3", "p1"]
    assert "total" not in first  # not counted until the search has been paged through
    # Meanwhile: a patient born first is created, p1 is updated, p4 deleted.
    client.post("/fhir/Patient", json={"resourceType": "Patient", "birthDate": "1900-01-01"})
    p1 = client.get(f"/fhir/Patient/{data['p1']}").json()
    client.put(f"/fhir/Patient/{data['p1']}", json={**p1, "birthDate": "2020-01-01"})
    client.delete(f"/fhir/Patient/{data['p4']}")
    url = next(link["url"] for link in first["link"] if link["relation"] == "next")
    pages = []
    while url:
        page = client.get(url).json()
        pages.append([names.get(e["resource"]["id"], "new") for e in page["entry"]])
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    # Page 2 searched again and appended what had not been shown, in the current order
    # (new, p2, p5): p3 and p1 are not repeated, p2 and p5 are not skipped, the
    # deleted p4 is gone; the newcomer, created before page 2 was asked for, is in.
    assert pages == [["new", "p2"], ["p5"]]
    assert page["total"] == 5
    previous = next(x["url"] for x in page["link"] if x["relation"] == "previous")
    again = [names.get(e["resource"]["id"], "new") for e in client.get(previous).json()["entry"]]
    assert again == ["new", "p2"]


def test_paging_links_and_expired_snapshot(client, data):
    first = client.get("/fhir/Patient", params={"_count": 2}).json()
    relations = {link["relation"] for link in first["link"]}
    assert relations == {"self", "first", "next"}
    second = client.get(next(x["url"] for x in first["link"] if x["relation"] == "next")).json()
    assert {link["relation"] for link in second["link"]} >= {"previous", "next"}
    gone = client.get("/fhir", params={"_getpages": "0" * 32, "_getpagesoffset": "2"})
    assert gone.status_code == 410
    assert gone.json()["resourceType"] == "OperationOutcome"


def test_total_summary_and_elements(client, data):
    assert "total" not in client.get("/fhir/Patient", params={"_total": "none"}).json()
    assert client.get("/fhir/Patient", params={"_total": "accurate"}).json()["total"] == 5
    count = client.get("/fhir/Patient", params={"_summary": "count"}).json()
    assert count["total"] == 5 and not count.get("entry")
    bundle = client.get("/fhir/Patient", params={"_id": data["p1"], "_elements": "gender"}).json()
    resource = bundle["entry"][0]["resource"]
    assert resource["gender"] == "male" and "name" not in resource


def test_post_search_system_and_compartment(client, data):
    names = {v: k for k, v in data.items()}
    got = client.post(
        "/fhir/Patient/_search",
        content="gender=female",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ).json()
    assert {names[e["resource"]["id"]] for e in got["entry"]} == {"p2"}
    system = client.get(
        "/fhir", params={"_type": "Patient,Organization", "_id": f"{data['p1']},{data['org1']}"}
    ).json()
    assert {names[e["resource"]["id"]] for e in system["entry"]} == {"p1", "org1"}
    compartment = client.get(f"/fhir/Patient/{data['p1']}/Observation").json()
    assert {names[e["resource"]["id"]] for e in compartment["entry"]} == {"o1", "o2"}
    everything = client.get(f"/fhir/Patient/{data['p1']}/*").json()
    assert {names[e["resource"]["id"]] for e in everything["entry"]} == {
        "p1",
        "o1",
        "o2",
        "ra1",
        "e1",
    }
    assert client.get(f"/fhir/Observation/{data['o1']}/Patient").status_code == 404
    assert client.get(f"/fhir/Patient/{data['p1']}/Organization").status_code == 400
    assert client.get("/fhir/Patient/bad id/Observation").status_code == 400
    narrowed = client.get(f"/fhir/Patient/{data['p1']}/Observation", params={"status": "final"})
    assert {names[e["resource"]["id"]] for e in narrowed.json()["entry"]} == {"o1"}


def test_unknown_parameters_lenient_and_strict(client, data):
    lenient = client.get("/fhir/Patient", params={"gender": "female", "shoe-size": "42"})
    assert lenient.status_code == 200
    self_url = next(x["url"] for x in lenient.json()["link"] if x["relation"] == "self")
    assert "shoe-size" not in self_url and "gender=female" in self_url
    strict = client.get(
        "/fhir/Patient", params={"shoe-size": "42"}, headers={"Prefer": "handling=strict"}
    )
    assert strict.status_code == 400
    assert "shoe-size" in strict.json()["issue"][0]["diagnostics"]


@pytest.mark.parametrize(
    "params",
    [
        {"birthdate": "not-a-date"},
        {"birthdate": "xx1980"},
        {"birthdate": "1980-13-01"},
        {"_count": "-1"},
        {"_sort": "shoe-size"},
        {"_total": "maybe"},
        {"gender:exact": "male"},
        {"gender.name": "x"},
        {"_include": "Patient:name"},
        {"_include": "Nope:subject"},
        {"_has:Observation": "x"},
        {"_has:Observation:status:code": "x"},
        {"identifier:of-type": "only-two|parts"},
        {"name:missing": "maybe"},
        {"_id": "bad id with spaces"},
    ],
)
def test_bad_search_input_is_a_400_naming_the_parameter(client, data, params):
    resp = client.get("/fhir/Patient", params=params)
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    "path,params",
    [
        ("Observation", {"value-quantity": "abc"}),
        ("Observation", {"code-value-quantity": "only-one-part"}),
        ("Observation", {"date": "ap"}),
        ("RiskAssessment", {"probability": "1e999999"}),
    ],
)
def test_bad_values_on_other_types(client, data, path, params):
    assert client.get(f"/fhir/{path}", params=params).status_code == 400


@pytest.mark.parametrize(
    "value",
    ['{"$gt": ""}', "$where", "'; DROP TABLE resources; --", ".*", "%", "_", "\\", "a\x00b"],
)
def test_injection_attempts_match_nothing(client, data, value):
    for params in ({"name": value}, {"identifier": value}, {"family:exact": value}):
        resp = client.get("/fhir/Patient", params=params)
        assert resp.status_code in (200, 400), resp.text
        if resp.status_code == 200:
            assert resp.json().get("entry", []) == []
    assert client.get("/fhir/Patient").json()["total"] == 5  # nothing was dropped


def test_custom_search_parameter_after_reindex(client, data):
    strict = {"Prefer": "handling=strict"}
    assert (
        client.get("/fhir/Patient", params={"mothers-maiden": "wu"}, headers=strict).status_code
        == 400
    )
    assert client.post("/fhir/SearchParameter", json=MAIDEN_SP).status_code == 201
    done = client.post("/fhir/$reindex")
    assert done.status_code == 200, done.text
    got = client.get("/fhir/Patient", params={"mothers-maiden": "wu"}, headers=strict).json()
    assert [e["resource"]["id"] for e in got["entry"]] == [data["p1"]]


def test_capability_statement_lists_what_search_supports(client):
    cs = client.get("/fhir/metadata").json()
    patient = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Patient")
    names = {p["name"]: p for p in patient["searchParam"]}
    assert {"name", "phonetic", "birthdate", "identifier", "_lastUpdated", "_tag"} <= set(names)
    assert ":exact" in names["name"]["documentation"]
    assert "Patient:organization" in patient["searchInclude"]
    assert "Observation:subject" in patient["searchRevInclude"]
    assert {"code": "search-system"} in cs["rest"][0]["interaction"]


def test_common_meta_parameters(client):
    meta = {
        "tag": [{"system": "urn:hie:member", "code": "clinic-7"}],
        "profile": ["http://hie.example/StructureDefinition/cn-patient"],
        "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV"}],
        "source": "urn:hie:clinic-7#emr",
    }
    tagged = client.post("/fhir/Patient", json={"resourceType": "Patient", "meta": meta}).json()
    client.post("/fhir/Patient", json={"resourceType": "Patient"})

    def found(**params) -> list[str]:
        return [
            e["resource"]["id"] for e in client.get("/fhir/Patient", params=params).json()["entry"]
        ]

    assert found(_tag="urn:hie:member|clinic-7") == [tagged["id"]]
    assert found(_profile="http://hie.example/StructureDefinition/cn-patient") == [tagged["id"]]
    assert found(_security="HIV") == [tagged["id"]]
    # meta.source names the writing client: the server replaces what a client sends
    assert found(_source="urn:hie:clinic-7#emr") == []
    assert len(found(_source="urn:hie:client:test-client")) == 2
    newest_first = found(_sort="-_lastUpdated")
    assert newest_first[1] == tagged["id"] and len(newest_first) == 2
    assert found(_sort="_lastUpdated")[0] == tagged["id"]


def test_reindex_requires_write_scope_and_names_unservable_parameters(client, mint):
    reader = {"Authorization": f"Bearer {mint('system/*.rs')}"}
    assert client.post("/fhir/$reindex", headers=reader).status_code == 403
    bad = {
        "resourceType": "SearchParameter",
        "url": "http://hie.example/SearchParameter/bad",
        "name": "bad",
        "status": "active",
        "description": "a date parameter on a name",
        "code": "bad",
        "base": ["Patient"],
        "type": "date",
        "expression": "Patient.name",
    }
    assert client.post("/fhir/SearchParameter", json=bad).status_code == 201
    out = client.post("/fhir/Patient/$reindex").json()
    skipped = [p["valueString"] for p in out["parameter"] if p["name"] == "skipped"]
    assert len(skipped) == 1 and "SearchParameter/" in skipped[0]
    assert client.post("/fhir/Nope/$reindex").status_code == 404
    assert client.post("/fhir/$reindex", params={"x": "1"}).status_code == 400


def test_system_search_orders_across_types(client, data):
    names = {v: k for k, v in data.items()}

    def order(**params) -> list[str]:
        bundle = client.get("/fhir", params={"_type": "Patient,Organization", **params}).json()
        return [names[e["resource"]["id"]] for e in bundle["entry"]]

    created = ["org1", "org2", "p1", "p2", "p3", "p4", "p5"]  # load() order
    assert order(_sort="_lastUpdated") == created
    assert order() == created[::-1]  # default: newest first
    assert (
        client.get("/fhir", params={"_type": "Patient,Organization", "_sort": "name"}).status_code
        == 400
    )
    assert client.get("/fhir", params={"_type": "Nope"}).status_code == 404


def test_paging_past_the_first_page_extends_without_repeats_or_gaps(client, data):
    names = {v: k for k, v in data.items()}
    first = client.get("/fhir/Patient", params={"_sort": "birthdate", "_count": 1}).json()
    assert "total" not in first  # not known until the search is complete
    shown = [names[e["resource"]["id"]] for e in first["entry"]]
    # Meanwhile a patient sorting first is created and p2 is updated.
    new = client.post("/fhir/Patient", json={"resourceType": "Patient", "birthDate": "1900"})
    names[new.json()["id"]] = "new"
    p2 = client.get(f"/fhir/Patient/{data['p2']}").json()
    client.put(f"/fhir/Patient/{data['p2']}", json={**p2, "active": True})
    url = next(link["url"] for link in first["link"] if link["relation"] == "next")
    last = first
    while url:
        last = client.get(url).json()
        shown += [names[e["resource"]["id"]] for e in last["entry"]]
        url = next((x["url"] for x in last["link"] if x["relation"] == "next"), None)
    # Worked out: page 1 keeps [p3]; page 2 searches again for 2 (+1): new, p3, p1 ->
    # appends new, p1; page 4 searches for 6 (+1), gets all 6 -> appends p2, p4, p5.
    assert shown == ["p3", "new", "p1", "p2", "p4", "p5"]  # nothing twice, none skipped
    assert last["total"] == len(shown)


def test_paging_stops_at_the_configured_maximum(tmp_path):
    from fastapi.testclient import TestClient

    from hie.app import create_app
    from hie.config import Settings

    app = create_app(Settings(data_dir=tmp_path, auth=False, search_max_results=3, mpi=False))
    with TestClient(app, base_url="http://hie.test") as c:
        for year in range(1990, 1995):
            c.post("/fhir/Patient", json={"resourceType": "Patient", "birthDate": str(year)})
        page = c.get("/fhir/Patient", params={"_sort": "birthdate", "_count": 2}).json()
        years = [e["resource"]["birthDate"] for e in page["entry"]]
        nxt = next(x["url"] for x in page["link"] if x["relation"] == "next")
        page = c.get(nxt).json()
        years += [e["resource"]["birthDate"] for e in page["entry"]]
        assert years == ["1990", "1991", "1992"]
        assert not any(x["relation"] == "next" for x in page["link"])
        total = c.get("/fhir/Patient", params={"_total": "accurate", "_count": 1}).json()
        assert total["total"] == 5  # an exact count is still available


@pytest.mark.parametrize(
    "path",
    [
        "/fhir/Patient?name=x",
        "/fhir?_type=Patient",
        "/fhir/Patient/1/Observation",
        "/fhir/Patient/1/*",
    ],
)
def test_search_needs_a_token_with_search_scope(anon, mint, path):
    assert anon.get(path).status_code == 401
    wrong = {"Authorization": f"Bearer {mint('system/Organization.rs')}"}
    resp = anon.get(path, headers=wrong)
    assert resp.status_code == 403 and resp.json()["resourceType"] == "OperationOutcome"
    assert anon.get(path, headers={"Authorization": "Bearer not-a-jwt"}).status_code == 401


def test_post_search_bad_bodies(client):
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert (
        client.post("/fhir/Patient/_search", content=b"\xff\xfe", headers=form).status_code == 400
    )
    assert client.post("/fhir/Patient/_search", content="a=1&&=", headers=form).status_code == 400
    as_json = client.post("/fhir/Patient/_search", json={"name": "x"})
    assert as_json.status_code == 415
    huge = "name=" + "x" * (3 * 1024 * 1024)
    assert client.post("/fhir/Patient/_search", content=huge, headers=form).status_code == 413
    bad = client.post("/fhir/Patient/_search", content="birthdate=notadate", headers=form)
    assert bad.status_code == 400 and "birthdate" in bad.json()["issue"][0]["diagnostics"]


def test_cli_reindex_makes_a_stored_search_parameter_searchable(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from hie.app import create_app
    from hie.cli import app as cli
    from hie.config import Settings

    monkeypatch.delenv("HIE_MONGODB_URI", raising=False)
    settings = Settings(data_dir=tmp_path, auth=False, mpi=False)
    patient = {"resourceType": "Patient", "extension": [{"url": MAIDEN, "valueString": "Wu"}]}
    with TestClient(create_app(settings)) as c:
        pid = c.post("/fhir/Patient", json=patient).json()["id"]
        c.post("/fhir/SearchParameter", json=MAIDEN_SP)
    result = CliRunner().invoke(cli, ["reindex", "Patient", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "reindexed 1 resources" in result.output
    with TestClient(create_app(settings)) as c:  # loads stored SearchParameters at start
        got = c.get(
            "/fhir/Patient", params={"mothers-maiden": "wu"}, headers={"Prefer": "handling=strict"}
        ).json()
        assert [e["resource"]["id"] for e in got["entry"]] == [pid]


def test_count_only_searches_always_give_the_exact_total(client, data):
    assert client.get("/fhir/Patient", params={"_summary": "count"}).json()["total"] == 5
    assert client.get("/fhir/Patient", params={"_count": "0"}).json()["total"] == 5
    estimate = client.get("/fhir/Patient", params={"_total": "estimate", "_count": 1}).json()
    assert estimate["total"] == 5
    none = client.get("/fhir/Patient", params={"_count": "0", "_total": "none"}).json()
    assert "total" not in none


def test_conditional_interactions_use_the_full_engine(client, data):
    body = {"resourceType": "Patient", "gender": "male", "birthDate": "1980-05-01"}
    # Two matches (p1, p2 by their traditional/simplified family name): 412.
    many = client.put("/fhir/Patient", params={"family": "張"}, json=body)
    assert many.status_code == 412
    # One match (p1): conditional update replaces it.
    one = {"phonetic": "zhang", "birthdate": "1980-05-01"}
    put = client.put("/fhir/Patient", params=one, json=body)
    assert put.status_code == 200 and put.json()["id"] == data["p1"]
    # A chained condition on conditional create finds o3's subject p2: nothing created.
    created = client.post(
        "/fhir/Patient",
        json=body,
        headers={"If-None-Exist": "_has:Observation:subject:code=http://loinc.org|8480-6"},
    )
    assert created.status_code == 200 and created.json()["id"] == data["p2"]


def test_later_pages_check_the_callers_scopes_first(client, data, mint):
    first = client.get("/fhir/Patient", params={"_count": 1}).json()
    nxt = next(x["url"] for x in first["link"] if x["relation"] == "next")
    other = {"Authorization": f"Bearer {mint('system/Observation.rs')}"}
    denied = client.get(nxt, headers=other)
    assert denied.status_code == 403 and denied.json()["resourceType"] == "OperationOutcome"
    assert client.get(nxt).status_code == 200
