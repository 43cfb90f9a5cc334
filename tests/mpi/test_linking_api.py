"""The master patient index through the FHIR API: every Patient a member writes is linked
to a golden record, in the same commit as the write and its audit record."""

from __future__ import annotations

import orjson
import pytest
from fastapi.testclient import TestClient

from hie.access.principal import STEWARD, Principal
from hie.access.scopes import ACTIONS, Grant
from hie.mpi import RESIDENT_ID_SYSTEM
from hie.mpi.records import (
    DIFFERENT,
    ENTERPRISE_ID_SYSTEM,
    GOLDEN_TAG,
    LINK_TYPE,
    OPEN,
    RECORD_TYPE,
    golden_of_member,
    refer_members,
)
from tests.conftest import FHIR
from tests.mpi.people import person, resident_id

GRANTS = (Grant("system", "*", frozenset(ACTIONS)),)
ZHANG = person("张", "三", "1980-05-06", 11, "13912345678")
LI = person("李", "四", "1975-01-02", 21, "13612345678")


@pytest.fixture
def api(app, mint):
    """One TestClient and a bearer token per member organisation (and a steward's)."""
    with TestClient(app, base_url="http://hie.test") as client:

        def headers(org: str | None) -> dict:
            if org is None:
                token = mint("system/*.cruds", "steward", roles=(STEWARD,))
            else:
                token = mint(
                    "system/*.cruds",
                    f"client-{org}",
                    roles=("member",),
                    organization=f"Organization/{org}",
                )
            return {"Authorization": f"Bearer {token}", "Content-Type": FHIR}

        client.as_ = {org: headers(org) for org in ("a", "b", "c")}
        client.as_["steward"] = headers(None)
        yield client


def post(api, body: dict, org: str = "a") -> dict:
    response = api.post("/fhir/Patient", json=body, headers=api.as_[org])
    assert response.status_code == 201, response.text
    return response.json()


def read(api, ref: str) -> dict:
    response = api.get(f"/fhir/{ref}", headers=api.as_["a"])
    assert response.status_code == 200, response.text
    return response.json()


def golden(api, member: dict) -> dict:
    return read(api, f"Patient/{golden_of_member(member)}")


def engine(api, coroutine):
    """Run an engine coroutine on the app's event loop."""
    return api.portal.call(lambda: coroutine)


def internal(api, type_: str, id_: str) -> dict | None:
    version = engine(api, api.app.state.store.read(type_, id_))
    return None if version is None or version.body is None else orjson.loads(version.body)


def test_two_members_register_the_same_person(api):
    a = post(api, ZHANG, "a")
    b = post(api, {**ZHANG, "name": [{"use": "official", "family": "張", "given": ["三"]}]}, "b")
    assert golden_of_member(a) == golden_of_member(b) is not None
    assert a["link"][0]["type"] == "seealso"
    record = golden(api, a)
    assert GOLDEN_TAG in record["meta"]["tag"] and record["meta"]["source"] == "urn:hie:mpi"
    assert record["identifier"][0]["system"] == ENTERPRISE_ID_SYSTEM
    assert record["identifier"][0]["value"] == record["id"]
    assert {"system": RESIDENT_ID_SYSTEM, "value": ZHANG["identifier"][0]["value"]} in record[
        "identifier"
    ]
    assert sorted(refer_members(record)) == sorted([a["id"], b["id"]])
    assert record["name"][0]["family"] in ("张", "張") and record["birthDate"] == "1980-05-06"
    assert record["gender"] == "male" and record["telecom"] == ZHANG["telecom"]
    # the member's read returns its link too
    assert golden_of_member(read(api, f"Patient/{b['id']}")) == record["id"]
    # and a search by the shared identifier finds both members and the golden record
    found = api.get(
        "/fhir/Patient",
        params={"identifier": f"{RESIDENT_ID_SYSTEM}|{ZHANG['identifier'][0]['value']}"},
        headers=api.as_["a"],
    ).json()
    assert found["total"] == 3


def test_different_people_get_two_golden_records(api):
    a, b = post(api, ZHANG), post(api, LI, "b")
    assert golden_of_member(a) != golden_of_member(b)
    assert refer_members(golden(api, a)) == [a["id"]]


def test_an_uncertain_pair_is_reviewed_and_a_different_decision_remembered(api):
    loose = {**ZHANG, "identifier": [], "telecom": []}
    a = post(api, {**ZHANG, "identifier": []})
    b = post(api, loose, "b")
    assert golden_of_member(a) != golden_of_member(b)
    mpi = api.app.state.mpi
    [review], total = engine(api, mpi.reviews(OPEN, 10, 0))
    assert total == 1 and review["record"] == b["id"] and review["candidate"] == golden_of_member(a)
    assert review["fields"]["given"] == "exact" and review["fields"]["national_id"] == "missing"
    assert 0 < review["probability"] < 1 and review["explanation"]

    async def resolve():
        steward = Principal("steward", GRANTS, roles=frozenset({STEWARD}))
        async with mpi.serial():
            await api.app.state.store.commit(
                await mpi.plan_resolve(steward, review["id"], DIFFERENT)
            )

    api.portal.call(resolve)
    again = api.put(
        f"/fhir/Patient/{b['id']}",
        json={**read(api, f"Patient/{b['id']}"), "active": True},
        headers=api.as_["b"],
    )
    assert again.status_code == 200
    assert engine(api, mpi.reviews(OPEN, 10, 0)) == ([], 0)
    assert golden_of_member(again.json()) != golden_of_member(a)


def test_a_transaction_with_two_records_of_one_person(api):
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:1",
                "resource": ZHANG,
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": "urn:uuid:2",
                "resource": {**ZHANG, "telecom": []},
                "request": {"method": "POST", "url": "Patient"},
            },
            {"resource": LI, "request": {"method": "POST", "url": "Patient"}},
        ],
    }
    response = api.post("/fhir", json=bundle, headers=api.as_["a"])
    assert response.status_code == 200, response.text
    one, two, other = (e["resource"] for e in response.json()["entry"])
    assert golden_of_member(one) == golden_of_member(two) != golden_of_member(other)
    assert sorted(refer_members(golden(api, one))) == sorted([one["id"], two["id"]])
    events = engine(api, api.app.state.store.events_after(0, 1000))
    linked = {e.id for e in events if e.type == LINK_TYPE}
    assert linked == {one["id"], two["id"], other["id"]}  # committed with the entries


def test_a_batch_indexes_each_entry(api):
    entry = {"resource": ZHANG, "request": {"method": "POST", "url": "Patient"}}
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [entry, entry]}
    response = api.post("/fhir", json=bundle, headers=api.as_["a"])
    one, two = (e["resource"] for e in response.json()["entry"])
    assert golden_of_member(one) == golden_of_member(two)


def test_member_update_and_patch_reindex(api):
    a = post(api, ZHANG)
    b = post(api, ZHANG, "b")
    address = [{"line": ["建国路88号"], "district": "朝阳区", "city": "北京市"}]
    updated = api.put(
        f"/fhir/Patient/{b['id']}", json={**b, "address": address, "link": []}, headers=api.as_["b"]
    )
    assert updated.status_code == 200
    assert golden_of_member(updated.json()) == golden_of_member(a)  # the link is the MPI's to set
    assert golden(api, a)["address"] == address
    record = internal(api, RECORD_TYPE, b["id"])
    assert any(k.startswith("ad:") for k in record["keys"])
    patch = [
        {"op": "replace", "path": "/identifier/0/value", "value": resident_id("1980-05-06", 13)}
    ]
    headers = {**api.as_["b"], "Content-Type": "application/json-patch+json"}
    patched = api.patch(f"/fhir/Patient/{b['id']}", content=orjson.dumps(patch), headers=headers)
    assert patched.status_code == 200, patched.text
    assert golden_of_member(patched.json()) != golden_of_member(a)  # two ID numbers: two people
    assert refer_members(golden(api, a)) == [a["id"]]


def test_delete_removes_from_the_golden_record(api):
    a = post(api, ZHANG)
    b = post(api, ZHANG, "b")
    golden_id = golden_of_member(a)
    assert api.delete(f"/fhir/Patient/{b['id']}", headers=api.as_["b"]).status_code == 204
    assert refer_members(read(api, f"Patient/{golden_id}")) == [a["id"]]
    assert api.delete(f"/fhir/Patient/{a['id']}", headers=api.as_["a"]).status_code == 204
    assert api.get(f"/fhir/Patient/{golden_id}", headers=api.as_["a"]).status_code == 410


def test_golden_records_refuse_rest_writes(api, mint):
    a = post(api, ZHANG)
    record = golden(api, a)
    admin = {"Authorization": f"Bearer {mint()}", "Content-Type": FHIR}
    url = f"/fhir/Patient/{record['id']}"
    for headers in (api.as_["a"], admin):
        assert api.put(url, json=record, headers=headers).status_code == 403
        patch_headers = {**headers, "Content-Type": "application/json-patch+json"}
        patch = orjson.dumps([{"op": "replace", "path": "/active", "value": False}])
        assert api.patch(url, content=patch, headers=patch_headers).status_code == 403
        assert api.delete(url, headers=headers).status_code == 403
    forged = {**ZHANG, "meta": {"tag": [GOLDEN_TAG]}}
    response = api.post("/fhir/Patient", json=forged, headers=admin)
    assert response.status_code == 422
    assert response.json()["resourceType"] == "OperationOutcome"
    enterprise = {**ZHANG, "identifier": [{"system": ENTERPRISE_ID_SYSTEM, "value": "x"}]}
    assert api.post("/fhir/Patient", json=enterprise, headers=admin).status_code == 422
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": record, "request": {"method": "PUT", "url": url[6:]}}],
    }
    assert api.post("/fhir", json=bundle, headers=admin).status_code == 403
    assert read(api, url[6:])["meta"]["versionId"] == record["meta"]["versionId"]


def test_conditional_create_on_an_identifier_stays_idempotent(api):
    mrn = {"system": "urn:hospital-a:mrn", "value": "123"}
    body = {**ZHANG, "identifier": [*ZHANG["identifier"], mrn]}
    headers = {**api.as_["a"], "If-None-Exist": "identifier=urn:hospital-a:mrn|123"}
    first = api.post("/fhir/Patient", json=body, headers=headers)
    second = api.post("/fhir/Patient", json=body, headers=headers)
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json()["id"] == first.json()["id"]  # the golden record carries it too
    put = api.put(
        "/fhir/Patient?identifier=urn:hospital-a:mrn|123", json=body, headers=api.as_["a"]
    )
    assert put.status_code == 200 and put.json()["id"] == first.json()["id"]


def test_if_match_still_guards_the_member_write(api):
    a = post(api, ZHANG)
    headers = {**api.as_["a"], "If-Match": 'W/"1"'}
    assert api.put(f"/fhir/Patient/{a['id']}", json=a, headers=headers).status_code == 200
    assert api.put(f"/fhir/Patient/{a['id']}", json=a, headers=headers).status_code == 412


@pytest.mark.parametrize(
    "garbage",
    [
        {"gender": "female"},
        {"name": [{"family": "李" * 10_000}], "birthDate": "1980-05-06"},
        {"name": [{"family": "李", "given": ["四"]}], "birthDate": "0001-01-01"},
        {
            "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": "1101051980O5O6ABCD"}],
            "gender": "male",
        },
    ],
    ids=["no-identifying-data", "10000-char-name", "absurd-birth-date", "id-with-letters"],
)
def test_bad_input_is_accepted_flagged_and_never_linked(api, garbage):
    body = {"resourceType": "Patient", **garbage}
    a, b = post(api, body), post(api, body, "b")
    assert golden_of_member(a) != golden_of_member(b)
    record = internal(api, RECORD_TYPE, a["id"])
    assert record["flags"] and record["keys"] == []
    assert engine(api, api.app.state.mpi.reviews(OPEN, 10, 0)) == ([], 0)


def test_link_changes_are_outbox_events(api):
    a = post(api, ZHANG)
    post(api, ZHANG, "b")
    api.delete(f"/fhir/Patient/{a['id']}", headers=api.as_["a"])
    events = engine(api, api.app.state.store.events_after(0, 1000))
    links = [e for e in events if e.type == LINK_TYPE]
    assert len(links) == 3
    assert [e.version for e in links if e.id == a["id"]] == [1, 2]
    link = internal(api, LINK_TYPE, a["id"])
    assert link["action"] == "unlink" and link["golden"] is None


def test_the_audit_record_names_the_golden_record(api, mint):
    a = post(api, ZHANG)
    auditor = {"Authorization": f"Bearer {mint('system/AuditEvent.rs', roles=('auditor',))}"}
    events = api.get("/fhir/AuditEvent", params={"subtype": "create"}, headers=auditor).json()
    whats = [
        e["what"]["reference"]
        for entry in events["entry"]
        for e in entry["resource"].get("entity", [])
        if "what" in e
    ]
    assert any(w.startswith(f"Patient/{golden_of_member(a)}/_history/1") for w in whats)
    assert not any(w.startswith("HieMpi") for w in whats)


def test_a_member_cannot_point_its_record_at_another_golden_record(api):
    a = post(api, ZHANG)
    other = golden_of_member(post(api, LI, "b"))
    own = {"other": {"reference": "Patient/somewhere-else"}, "type": "seealso"}
    forged = [{"other": {"reference": f"Patient/{other}"}, "type": "seealso"}, own]
    response = api.put(f"/fhir/Patient/{a['id']}", json={**a, "link": forged}, headers=api.as_["a"])
    assert response.status_code == 200
    links = response.json()["link"]
    assert golden_of_member(response.json()) == golden_of_member(a)
    assert f"Patient/{other}" not in str(links) and own in links  # its own links are kept
    assert refer_members(read(api, f"Patient/{other}")) != [a["id"]]


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_extra_national_identifier_systems_link_like_resident_ids(store_kind, tmp_path):
    """``HIE_MPI_ID_SYSTEMS`` adds identifier systems matched as a national person ID: the
    same (opaque) number at two members links even with a misspelt name."""
    from hie.app import create_app
    from hie.config import Settings
    from tests.conftest import make_store

    settings = Settings.from_env(
        {"HIE_DATA_DIR": str(tmp_path), "HIE_MPI_ID_SYSTEMS": "urn:oid:1.2.3.4=opaque"}
    )
    assert settings.mpi_id_systems == {"urn:oid:1.2.3.4": "opaque"}
    app = create_app(settings, make_store(store_kind, tmp_path))

    def mint(org):
        return app.state.tokens.mint(
            f"c-{org}", "system/*.cruds", 600, roles=("member",), organization=f"Organization/{org}"
        )

    def patient(given: str) -> dict:
        return {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:oid:1.2.3.4", "value": "SSN-0042-77"}],
            "name": [{"family": "Miller", "given": [given]}],
            "birthDate": "1960-03-04",
        }

    with TestClient(app) as client:
        ids = []
        for org, given in (("a", "Joanna"), ("b", "Johanna")):
            headers = {"Authorization": f"Bearer {mint(org)}", "Content-Type": FHIR}
            response = client.post("/fhir/Patient", json=patient(given), headers=headers)
            assert response.status_code == 201, response.text
            ids.append(golden_of_member(response.json()))
    assert ids[0] == ids[1]


@pytest.mark.parametrize("value", ["urn:x=fuzzy", "=opaque"])
def test_bad_identifier_system_settings_are_refused(value):
    from hie.config import Settings

    with pytest.raises(ValueError, match="HIE_MPI_ID_SYSTEMS"):
        Settings.from_env({"HIE_MPI_ID_SYSTEMS": value})


def test_settings_defaults_are_the_models():
    """The settings keep the matching core's defaults as literals (reading settings must
    not import the MPI); they stay the same values."""
    from hie.config import ID_CHECKS, Settings
    from hie.mpi.model import MATCH_PROBABILITY, POSSIBLE_PROBABILITY
    from hie.mpi.normalize import GB11643, OPAQUE

    settings = Settings()
    assert (settings.mpi_link_threshold, settings.mpi_review_threshold) == (
        MATCH_PROBABILITY,
        POSSIBLE_PROBABILITY,
    )
    assert set(ID_CHECKS) == {OPAQUE, GB11643}


def test_same_on_a_record_linked_with_others_merges_the_two_golden_records(api):
    """A record that matches two people with certainty joins the better one and the other
    goes to review ("several-matches"): a steward's "same" then makes the two golden
    records one person (a merge), instead of pulling the record away from the records it
    was linked with."""
    with_id = post(api, {**ZHANG, "telecom": []}, "a")  # ID, name, birth date
    with_phone = post(api, {**ZHANG, "identifier": []}, "b")  # name, birth date, phone
    first, second = golden_of_member(with_id), golden_of_member(with_phone)
    assert first != second  # name and birth date alone do not link
    both = post(api, ZHANG, "c")  # ID and phone: certain with each
    mpi = api.app.state.mpi
    reviews, _ = engine(api, mpi.reviews(OPEN, 50, 0))
    [review] = [r for r in reviews if r["record"] == both["id"]]
    joined = golden_of_member(both)
    assert {joined, review["candidate"]} == {first, second}

    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "review", "valueString": review["id"]},
            {"name": "decision", "valueCode": "same"},
        ],
    }
    r = api.post("/fhir/Patient/$mpi-resolve", json=body, headers=api.as_["steward"])
    assert r.status_code == 200, r.text
    survivor = read(api, f"Patient/{review['candidate']}")
    assert sorted(refer_members(survivor)) == sorted([with_id["id"], with_phone["id"], both["id"]])
    retired = read(api, f"Patient/{joined}")
    assert retired["active"] is False
    assert {"other": {"reference": f"Patient/{review['candidate']}"}, "type": "replaced-by"} in [
        {k: v for k, v in link.items() if k in ("other", "type")} for link in retired["link"]
    ]
