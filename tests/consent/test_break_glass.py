"""Break-glass: a client registered for it, asserting an emergency purpose, gets what a
Consent (or the default policy) withholds; what it got only that way is labelled BTG,
and so is the audit record. And the audit reason of consent decisions."""

from __future__ import annotations

import pytest

from tests.consent.world import (
    ACTREASON,
    BTG,
    assert_withheld,
    consent_entities,
    security,
)

DENY_ALL = {"provision": {"type": "deny"}}


def events_of(world, client: str, subtype: str) -> list[dict]:
    return [e for e in world.events(altid=client) if e["subtype"][0]["code"] == subtype]


@pytest.mark.parametrize("purpose", ["ETREAT", "BTG"])
def test_break_glass_read_of_a_denied_resource(world, purpose):
    world.consent(DENY_ALL)
    assert_withheld(world.get("er-a", world.url("ob1")))
    r = world.get("er-a", world.url("ob1"), purpose=purpose)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == world.ids["ob1"]
    assert BTG in security(r.json())
    # vread too, and a sensitively labelled one keeps its labels beside BTG
    v = world.get("er-a", world.url("ob3") + "/_history/1", purpose=purpose)
    assert v.status_code == 200, v.text
    labels = security(v.json())
    assert BTG in labels and {"system": ACTREASON, "code": "BTG"} in labels
    assert {
        "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
        "code": "R",
    } in labels
    # The label is on the answer only, never stored.
    stored = world.get("admin", world.url("ob1")).json()
    assert BTG not in security(stored)
    assert world.get("admin", world.url("ob1")).json()["meta"]["versionId"] == "1"


def test_break_glass_releases_what_the_default_policy_withholds(world):
    assert_withheld(world.get("er-a", world.url("ob2")))
    r = world.get("er-a", world.url("ob2"), purpose="ETREAT")
    assert r.status_code == 200 and BTG in security(r.json())


def test_emergency_treatment_matches_a_treat_permit_without_override(build):
    """ETREAT matches a provision naming TREAT: what that permit releases is not
    released by the override, so it carries no BTG; a sensitive one still needs it."""
    world = build("opt-in", ({"provision": {"type": "permit", "purpose": ["TREAT"]}},))
    assert_withheld(world.get("er-a", world.url("ob1"), purpose="HRESCH"))
    r = world.get("er-a", world.url("ob1"), purpose="ETREAT")
    assert r.status_code == 200 and BTG not in security(r.json())
    r = world.get("er-a", world.url("ob2"), purpose="ETREAT")
    assert r.status_code == 200 and BTG in security(r.json())


def test_break_glass_search(world):
    world.consent(DENY_ALL)
    query = {"subject": world.ref("PB"), "_total": "accurate"}
    plain = world.get("er-a", "/fhir/Observation", params=query).json()
    assert plain.get("entry", []) == [] and plain["total"] == 0
    r = world.get("er-a", "/fhir/Observation", params=query, purpose="ETREAT")
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert world.keys(bundle) == {"ob1", "ob2", "ob3"}
    assert bundle["total"] == 3
    assert BTG in security(bundle)
    for e in bundle["entry"]:
        assert BTG in security(e["resource"]), e["resource"]["id"]


def test_break_glass_does_not_label_what_was_not_withheld(world):
    world.consent(DENY_ALL)
    for key in ("oq1", "Q", "oa1", "oa2"):  # C's about Q (default: visible); A's own
        r = world.get("er-a", world.url(key), purpose="ETREAT")
        assert r.status_code == 200, r.text
        assert BTG not in security(r.json()), key
    r = world.get("er-a", "/fhir/Observation", params={"subject": world.ref("Q")}, purpose="ETREAT")
    bundle = r.json()
    assert world.keys(bundle) == {"oq1", "ox"}
    by_key = {world.key(e["resource"]): e["resource"] for e in bundle["entry"]}
    assert BTG not in security(by_key["oq1"])
    assert BTG in security(by_key["ox"])  # concerns the person who denied
    assert BTG in security(bundle)


def test_the_audit_record_of_a_break_glass_read_is_labelled(world):
    world.consent(DENY_ALL)
    assert world.get("er-a", world.url("ob1"), purpose="ETREAT").status_code == 200
    read = [e for e in events_of(world, "er-a", "read") if e["outcome"] == "0"]
    assert len(read) == 1
    assert BTG in security(read[0])
    found = world.events(_security=f"{ACTREASON}|BTG")
    assert read[0]["id"] in {e["id"] for e in found}
    assert all(BTG in security(e) for e in found)


def test_break_glass_needs_the_right(world):
    world.consent(DENY_ALL)
    for who in ("c-reader", "c"):
        r = world.get(who, world.url("ob1"), purpose="ETREAT")
        assert r.status_code == 403, r.text
        assert "break-glass" in r.json()["issue"][0]["diagnostics"]
        r = world.get(who, "/fhir/Observation", purpose="BTG")
        assert r.status_code == 403


# ---------------------------------------------------------------------- audit reason
def test_the_audit_of_a_denied_read_names_the_consent(world):
    cid = world.consent(DENY_ALL)
    assert_withheld(world.get("c", world.url("ob1")))
    denied = [e for e in events_of(world, "emr-c", "read") if e["outcome"] != "0"]
    assert len(denied) == 1, denied
    entities = consent_entities(denied[0])
    assert f"Consent/{cid}" in {(e.get("what") or {}).get("reference") for e in entities}
    named = next(e for e in entities if (e.get("what") or {}).get("reference") == f"Consent/{cid}")
    assert "deny" in named.get("description", "").lower()
    assert f"Consent/{cid}" in named.get("description", "")


def test_the_audit_of_a_search_names_the_consent(world):
    cid = world.consent({"provision": {"type": "deny", "class": ["Observation"]}})
    r = world.get("c", "/fhir/Observation", params={"subject": world.ref("PB")})
    assert r.status_code == 200 and world.keys(r.json()) == set()
    searches = events_of(world, "emr-c", "search-type")
    assert searches, "a search-type AuditEvent"
    refs = {(e.get("what") or {}).get("reference") for e in consent_entities(searches[-1])}
    assert f"Consent/{cid}" in refs


@pytest.mark.parametrize("default", ["opt-out", "opt-in"])
def test_the_audit_of_a_default_decision_names_the_policy(build, default):
    world = build(default)
    status = world.get("c", world.url("ob1")).status_code
    assert status == (200 if default == "opt-out" else 403)
    read = events_of(world, "emr-c", "read")
    assert len(read) == 1
    displays = {(e.get("what") or {}).get("display") for e in consent_entities(read[0])}
    assert f"alliance default policy ({default})" in displays, read[0].get("entity")
