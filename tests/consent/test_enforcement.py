"""No path leaks what a Consent withholds: each test shows a resource visible before the
Consent (or to another caller) and gone after it, on every way of reading data."""

from __future__ import annotations

import pytest

from tests.consent.world import (
    GOLDEN,
    LABELS,
    MRN_A,
    MRN_B,
    NOT_GOLDEN,
    PERSON,
    PERSON_ID,
    RESIDENT_ID_SYSTEM,
    WORLD,
    assert_withheld,
    enterprise_ids,
    next_url,
)

DENY_ALL = {"provision": {"type": "deny"}}
DENY_OBSERVATIONS = {"provision": {"type": "deny", "class": ["Observation"]}}
DENY_PATIENTS = {"provision": {"type": "deny", "class": ["Patient"]}}
#: Under the default policy C sees these Observations (the others carry sensitive labels).
C_SEES = {"oa1", "ob1", "ox", "oq1"}


def ids_of(world, keys) -> set[str]:
    return {world.ids[k] for k in keys}


def entry_keys(world, bundle: dict) -> set[str]:
    return {world.key(e["resource"]) for e in bundle.get("entry", []) if "resource" in e}


def pages(world, who, url, params=None, purpose=None) -> list[dict]:
    """Every page of a search, following next links."""
    out = []
    while url:
        r = world.get(who, url, params=params, purpose=purpose)
        assert r.status_code == 200, r.text
        out.append(r.json())
        url, params = next_url(r.json()), None
    return out


# ---------------------------------------------------------------------- read, vread
def test_read_and_vread(world):
    ob1 = world.get("b", world.url("ob1")).json()
    assert world.put("b", world.url("ob1"), json={**ob1, "status": "amended"}).status_code == 200
    for url in (
        world.url("ob1"),
        world.url("ob1") + "/_history/1",
        world.url("ob1") + "/_history/2",
        world.url("PA"),
    ):
        assert world.get("c", url).status_code == 200, url
    world.consent(DENY_ALL)
    for url in (
        world.url("ob1"),
        world.url("ob1") + "/_history/1",
        world.url("ob1") + "/_history/2",
        world.url("PA"),
        world.url("PB"),
        world.url("cb"),
    ):
        assert_withheld(world.get("c", url), url)
    # The writer still reads its own, and another person's data is untouched.
    assert world.get("b", world.url("ob1") + "/_history/1").status_code == 200
    assert world.get("c", world.url("oq1")).status_code == 200
    assert world.get("a", world.url("Q")).status_code == 200


def test_sensitive_labels_are_withheld_without_any_consent(world):
    for key in ("oa2", "ob2", "ob3"):
        assert world.get(world_writer(key), world.url(key)).status_code == 200
        assert_withheld(world.get("c", world.url(key)), key)
        assert_withheld(world.get("c", world.url(key) + "/_history/1"), key)


def world_writer(key: str) -> str:
    return {"oa2": "a", "ob2": "b", "ob3": "b"}[key]


# ---------------------------------------------------------------------- search, paging
def test_search_total_and_paging_count_only_visible(world):
    def seen(who):
        got, totals = [], set()
        for page in pages(world, who, "/fhir/Observation", {"_total": "accurate", "_count": "1"}):
            assert len(page.get("entry", [])) <= 1
            got += [world.key(e["resource"]) for e in page.get("entry", [])]
            if "total" in page:  # (pages in between may leave it out)
                totals.add(page["total"])
        assert len(got) == len(set(got)), got
        return set(got), totals

    assert seen("c") == (C_SEES, {4})
    assert seen("admin") == ({k for k in WORLD if k.startswith("o")}, {7})
    world.consent({"provision": {"type": "deny", "dataPeriod": ("2019-01-01", "2020-12-31")}})
    assert seen("c") == (C_SEES - {"oa1", "ob1"}, {2})
    first = world.get("c", "/fhir/Observation", params={"_total": "accurate"}).json()
    assert first["total"] == 2 and entry_keys(world, first) == {"ox", "oq1"}
    count_only = world.get("c", "/fhir/Observation", params={"_summary": "count"})
    if count_only.status_code == 200:
        assert count_only.json()["total"] == 2


def test_changes_after_a_search_are_decided_on_the_next(world):
    """What a caller may not see is kept between searches and brought up to date by
    what changed: a new sensitive result, a label added to a result and taken off."""

    def seen() -> set[str]:
        r = world.get("c", "/fhir/Observation", params={"_count": "100"})
        assert r.status_code == 200, r.text
        return world.keys(r.json())

    assert seen() == C_SEES
    hiv = LABELS["HIV"]
    world.write(
        "oa3",
        "a",
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "HIV viral load"},
            "subject": {"reference": world.ref("PA")},
            "meta": {"security": [hiv]},
        },
    )
    assert "oa3" not in seen() and world.get("a", world.url("oa3")).status_code == 200
    ob1 = world.get("b", world.url("ob1")).json()
    labelled = {**ob1, "meta": {"security": [hiv]}}
    assert world.put("b", world.url("ob1"), json=labelled).status_code == 200
    assert seen() == C_SEES - {"ob1"}
    plain = {k: v for k, v in ob1.items() if k != "meta"}
    assert world.put("b", world.url("ob1"), json=plain).status_code == 200
    assert seen() == C_SEES
    assert world.delete("a", world.url("oa1")).status_code in (200, 204)
    assert seen() == C_SEES - {"oa1"}


def test_later_pages_of_a_search_begun_before_the_deny(world):
    first = world.get(
        "c", "/fhir/Observation", params={"_sort": "date", "_count": "1", "_total": "accurate"}
    ).json()
    assert entry_keys(world, first) == {"ob1"} and first["total"] == 4
    world.consent(DENY_ALL)
    later = []
    url = next_url(first)
    while url:
        r = world.get("c", url)
        assert r.status_code == 200, r.text
        later += [world.key(e["resource"]) for e in r.json().get("entry", [])]
        url = next_url(r.json())
    assert set(later) <= {"oq1"}, later


def test_include_leaves_withheld_resources_out(build):
    world = build()
    query = {"_id": world.ids["oa1"], "_include": "Observation:subject"}
    before = world.get("c", "/fhir/Observation", params=query).json()
    assert world.keys(before) == {"oa1"} and world.keys(before, "include") == {"PA"}
    world.consent(DENY_PATIENTS)
    after = world.get("c", "/fhir/Observation", params=query).json()
    assert world.keys(after) == {"oa1"}
    assert entry_keys(world, after) == {"oa1"}


def test_revinclude_leaves_withheld_resources_out(build):
    world = build()
    query = {"_id": world.ids["PB"], "_revinclude": "Observation:subject"}
    before = world.get("c", "/fhir/Patient", params=query).json()
    assert world.keys(before) == {"PB"} and world.keys(before, "include") == {"ob1"}
    world.consent(DENY_OBSERVATIONS)
    after = world.get("c", "/fhir/Patient", params=query).json()
    assert entry_keys(world, after) == {"PB"}
    # _include of the Condition's subject from the other side: still visible
    cond = world.get("c", "/fhir/Condition", params={"_include": "Condition:subject"}).json()
    assert entry_keys(world, cond) == {"cb", "PB"}


def test_reverse_chaining_does_not_reveal_withheld_data(world):
    """``_has`` on a withheld Observation (HIV-labelled oa2) must not find its patient."""
    query = {"_has:Observation:subject:code": "http://loinc.org|75622-1", **NOT_GOLDEN}
    assert world.keys(world.get("a", "/fhir/Patient", params=query).json()) == {"PA"}
    r = world.get("c", "/fhir/Patient", params=query)
    assert r.status_code in (200, 403), r.text
    if r.status_code == 200:
        assert world.keys(r.json()) == set()


def test_chaining_does_not_reveal_withheld_data(world):
    """A chain through a withheld Patient must not tell its name."""
    query = {"subject:Patient.family": "王"}
    assert world.keys(world.get("c", "/fhir/Observation", params=query).json()) == {"oa1", "ob1"}
    world.consent(DENY_PATIENTS)
    r = world.get("c", "/fhir/Observation", params=query)
    assert r.status_code in (200, 403), r.text
    if r.status_code == 200:
        assert world.keys(r.json()) == set()


def test_post_search(world):
    form = {"subject": world.ref("PB"), "_total": "accurate"}

    def found():
        r = world.post(
            "c",
            "/fhir/Observation/_search",
            data=form,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 200, r.text
        return entry_keys(world, r.json()), r.json().get("total")

    assert found() == ({"ob1"}, 1)
    world.consent(DENY_ALL)
    assert found() == (set(), 0)


def test_compartment_search(world):
    url = world.url("PB")
    before = entry_keys(world, world.get("c", url + "/Observation").json())
    assert {"ob1", "ox"} <= before and not before & {"ob2", "ob3", "oa2"}
    everything = entry_keys(world, world.get("c", url + "/*").json())
    assert {"ob1", "ox", "cb"} <= everything
    world.consent(DENY_ALL)
    assert entry_keys(world, world.get("c", url + "/Observation").json()) == set()
    r = world.get("c", url + "/*")
    if r.status_code == 200:
        assert entry_keys(world, r.json()) & PERSON == set()
    else:
        assert r.status_code == 403


# ---------------------------------------------------------------------- history
def test_history_instance_type_and_system(world):
    ob1 = world.get("b", world.url("ob1")).json()
    assert world.put("b", world.url("ob1"), json={**ob1, "status": "amended"}).status_code == 200

    def instance():
        r = world.get("c", world.url("ob1") + "/_history")
        if r.status_code == 403:
            return []
        assert r.status_code == 200, r.text
        return [
            e["resource"]["meta"]["versionId"] for e in r.json().get("entry", []) if "resource" in e
        ]

    def history(url):
        return {
            k for page in pages(world, "c", url, {"_count": "100"}) for k in entry_keys(world, page)
        }

    assert sorted(instance()) == ["1", "2"]
    assert {"ob1", "oa1", "ox", "oq1"} <= history("/fhir/Observation/_history")
    assert {"ob1", "PB", "PA", "cb", "Q"} <= history("/fhir/_history")
    assert "ob2" not in history("/fhir/Observation/_history")  # labelled PSY
    world.consent(DENY_ALL)
    assert instance() == []
    assert history("/fhir/Observation/_history") & PERSON == set()
    assert "oq1" in history("/fhir/Observation/_history")
    system = history("/fhir/_history")
    assert system & PERSON == set() and {"Q", "oq1"} <= system
    assert not system & {"G", "consent1"}  # the golden record and the Consent concern her too


# ---------------------------------------------------------------------- operations
def test_everything(world):
    def everything(patient):
        r = world.get("c", world.url(patient) + "/$everything", params={"_count": "100"})
        assert r.status_code == 200, r.text
        return world.keys(r.json())

    assert {"ob1", "oa1", "ox", "cb", "PB"} <= everything("PB")
    assert {"ox", "oq1", "Q"} <= everything("Q")
    world.consent(DENY_OBSERVATIONS)
    assert everything("PB") & set(WORLD) == {"PA", "PB", "cb", "ea"}
    assert everything("Q") & set(WORLD) == {"Q", "oq1"}  # ox concerns the person too


def _match(world, who):
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "resource",
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": RESIDENT_ID_SYSTEM, "value": PERSON_ID}],
                    "name": [{"family": "王", "given": ["芳"]}],
                    "gender": "female",
                    "birthDate": "1949-12-31",
                },
            }
        ],
    }
    r = world.post(who, "/fhir/Patient/$match", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_match_leaves_out_golden_records_the_caller_may_not_see(world):
    before = _match(world, "c")
    assert world.ids["G"] in {e["resource"]["id"] for e in before.get("entry", [])}
    world.consent(DENY_ALL)
    after = _match(world, "c")
    ids = {e["resource"]["id"] for e in after.get("entry", []) if "resource" in e}
    assert ids & ids_of(world, ("G", "PA", "PB")) == set(), after
    assert after.get("total", 0) == len(
        [e for e in after.get("entry", []) if e.get("search", {}).get("mode") == "match"]
    )


def _pix(world, who, identifier):
    r = world.get(who, "/fhir/Patient/$ihe-pix", params={"sourceIdentifier": identifier})
    return r


def _pix_out(result: dict) -> tuple[set, set]:
    ids, refs = set(), set()
    for p in result.get("parameter", []):
        if p["name"] == "targetIdentifier":
            ids.add((p["valueIdentifier"].get("system"), p["valueIdentifier"].get("value")))
        elif p["name"] == "targetId":
            refs.add(p["valueReference"]["reference"])
    return ids, refs


def test_pix_leaves_out_other_members_identifiers(world):
    r = _pix(world, "a", f"{MRN_A}|A-1")
    assert r.status_code == 200, r.text
    identifiers, refs = _pix_out(r.json())
    assert (MRN_B, "B-1") in identifiers and world.ref("PB") in refs
    assert enterprise_ids(identifiers)  # the golden record's enterprise id
    world.consent(DENY_ALL)
    r = _pix(world, "a", f"{MRN_A}|A-1")
    assert r.status_code == 200, r.text
    identifiers, refs = _pix_out(r.json())
    assert (MRN_B, "B-1") not in identifiers, identifiers
    assert refs & {world.ref("PB"), world.ref("G")} == set(), refs
    assert not enterprise_ids(identifiers), identifiers
    # C asking with B's identifier learns nothing of A's record either.
    r = _pix(world, "c", f"{MRN_B}|B-1")
    if r.status_code == 200:
        identifiers, refs = _pix_out(r.json())
        assert (MRN_A, "A-1") not in identifiers and world.ref("PA") not in refs
    else:
        assert r.status_code in (403, 404), r.text


def test_batch_get_entries(world):
    def batch():
        body = {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {"request": {"method": "GET", "url": world.ref("ob1")}},
                {"request": {"method": "GET", "url": f"Observation?subject={world.ref('PB')}"}},
                {"request": {"method": "GET", "url": world.ref("ob1") + "/_history/1"}},
                {"request": {"method": "GET", "url": world.ref("oq1")}},
            ],
        }
        r = world.post("c", "/fhir", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["type"] == "batch-response"
        return r.json()["entry"]

    read, search, vread, other = batch()
    assert (
        read["response"]["status"].startswith("200") and read["resource"]["id"] == world.ids["ob1"]
    )
    assert entry_keys(world, search["resource"]) == {"ob1"}
    assert vread["response"]["status"].startswith("200")
    world.consent(DENY_ALL)
    read, search, vread, other = batch()
    for e in (read, vread):
        assert e["response"]["status"].startswith("403"), e
        assert "resource" not in e
        assert "consent" in str(e["response"].get("outcome", "")).lower()
    assert entry_keys(world, search["resource"]) == set()
    assert other["response"]["status"].startswith("200")


def test_transaction_read_entries(world):
    """GET entries of a transaction are reads like any other."""
    world.consent(DENY_ALL)
    body = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "GET", "url": world.ref("ob1")}}],
    }
    r = world.post("c", "/fhir", json=body)
    if r.status_code == 200:
        entry = r.json()["entry"][0]
        assert "resource" not in entry and not entry["response"]["status"].startswith("200")
    else:
        assert r.status_code == 403, r.text
        assert world.ids["ob1"] not in r.text


# ---------------------------------------------------------------------- revocation
def test_revocation_takes_effect_on_the_next_request(world):
    cid = world.consent(DENY_ALL)
    assert_withheld(world.get("c", world.url("ob1")))
    consent = world.get("b", f"/fhir/Consent/{cid}").json()
    r = world.put("b", f"/fhir/Consent/{cid}", json={**consent, "status": "inactive"})
    assert r.status_code == 200, r.text
    assert world.get("c", world.url("ob1")).status_code == 200
    assert "ob1" in world.search_keys("c")
    consent = r.json()
    r = world.put("b", f"/fhir/Consent/{cid}", json={**consent, "status": "active"})
    assert r.status_code == 200, r.text
    assert_withheld(world.get("c", world.url("ob1")))
    assert "ob1" not in world.search_keys("c")
    assert world.delete("b", f"/fhir/Consent/{cid}").status_code in (200, 204)
    assert world.get("c", world.url("ob1")).status_code == 200
    assert "ob1" in world.search_keys("c")


def test_a_new_consent_takes_effect_on_the_next_request(world):
    assert world.get("c", world.url("cb")).status_code == 200
    world.consent({"provision": {"type": "deny", "class": ["Condition"]}})
    assert_withheld(world.get("c", world.url("cb")))


# ---------------------------------------------------------------------- who is subject
def test_a_member_always_sees_its_own_writes(world):
    world.consent(DENY_ALL)
    assert world.read_keys("a") == {"PA", "oa1", "oa2", "ea", "Q", "oq1"}
    # A keeps writing about the patient and reads what it wrote.
    new = world.write(
        "oa3",
        "a",
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "weight"},
            "subject": {"reference": world.ref("PA")},
            "meta": {
                "security": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV"}
                ]
            },
        },
    )
    assert world.get("a", f"/fhir/Observation/{new['id']}").status_code == 200
    found = world.get("a", "/fhir/Observation", params={"subject": world.ref("PA")}).json()
    assert entry_keys(world, found) == {"oa1", "oa2", "oa3"}
    assert_withheld(world.get("c", f"/fhir/Observation/{new['id']}"))
    assert_withheld(world.get("b", f"/fhir/Observation/{new['id']}"))


def test_admin_is_not_filtered(world):
    world.consent(DENY_ALL)
    assert world.read_keys("admin") == set(WORLD)
    assert world.search_keys("admin") == set(WORLD)
    total = world.get("admin", "/fhir/Observation", params={"_total": "accurate"}).json()["total"]
    assert total == 7
    assert_withheld(world.get("c", world.url("ob2")))


def test_resources_about_no_patient_are_not_subject(world):
    world.consent(DENY_ALL)
    for url in ("/fhir/Organization/a", "/fhir/Practitioner/dr-c", "/fhir/PractitionerRole/pr-c"):
        assert world.get("c", url).status_code == 200, url


def test_audit_events_stay_visible_to_auditors(world):
    before = world.events(patient=world.ids["PB"])
    assert before
    world.consent(DENY_ALL)
    assert_withheld(world.get("c", world.url("ob1")))
    after = world.events(patient=world.ids["PB"])
    assert {e["id"] for e in before} < {e["id"] for e in after}
    one = after[0]
    r = world.get("auditor", f"/fhir/AuditEvent/{one['id']}")
    assert r.status_code == 200 and r.json()["id"] == one["id"]


def test_consent_off_filters_nothing(build):
    world = build(consent=False, consents=(DENY_ALL,))
    assert world.search_keys("c") == set(WORLD)
    assert world.read_keys("c") == set(WORLD)


@pytest.mark.parametrize("default", ["opt-out", "opt-in"])
def test_golden_records_follow_the_person(build, default):
    """Under a deny, the person's golden record is not found by another member."""
    world = build(default)
    gold = {"_tag": GOLDEN, "_count": "100"}
    before = {
        e["resource"]["id"]
        for e in world.get("c", "/fhir/Patient", params=gold).json().get("entry", [])
    }
    if default == "opt-out":
        assert world.ids["G"] in before
    world.consent(DENY_ALL)
    after = {
        e["resource"]["id"]
        for e in world.get("c", "/fhir/Patient", params=gold).json().get("entry", [])
    }
    assert world.ids["G"] not in after
    assert_withheld(world.get("c", world.url("G")))
    if default == "opt-out":
        assert world.get("c", world.url("GQ")).status_code == 200
    else:
        assert_withheld(world.get("c", world.url("GQ")))
