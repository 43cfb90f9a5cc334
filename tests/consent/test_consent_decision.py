"""``Patient/{id}/$consent-decision``: what a member would see of a patient, per class,
and why."""

from __future__ import annotations

import pytest

from tests.consent.world import (
    CALLERS,
    LABELS,
    LOINC,
    MRN_B,
    RESIDENT_ID_SYSTEM,
    resident_id,
)

CALLERS.setdefault(
    "auditor-cd",
    {
        "client": "audit-cd",
        "roles": ("auditor",),
        "scope": "system/Consent.rs system/Patient.rs system/Observation.rs system/Condition.rs "
        "system/AuditEvent.rs",
    },
)
CALLERS.setdefault(
    "c-no-consent-scope",
    {
        "client": "emr-c-narrow",
        "organization": "Organization/c",
        "scope": "system/Patient.rs system/Observation.rs system/Condition.rs",
    },
)

SUN = {
    "resourceType": "Patient",
    "identifier": [
        {"system": MRN_B, "value": "B-77"},
        {"system": RESIDENT_ID_SYSTEM, "value": resident_id("1960-02-03", 33)},
    ],
    "name": [{"use": "official", "family": "孙", "given": ["七"]}],
    "gender": "male",
    "birthDate": "1960-02-03",
}


@pytest.fixture
def sun(world):
    """Patient S, registered at B only: Observations s1, s3 (plain) and s2 (HIV), a
    Condition sc, all written by B."""
    world.write("S", "b", SUN)
    for key, when, labels in (
        ("s1", "2020-01-01", ()),
        ("s2", "2021-01-01", ("HIV",)),
        ("s3", "2022-01-01", ()),
    ):
        body = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "8867-4"}]},
            "subject": {"reference": world.ref("S")},
            "effectiveDateTime": when,
        }
        if labels:
            body["meta"] = {"security": [LABELS[x] for x in labels]}
        world.write(key, "b", body)
    world.write(
        "sc",
        "b",
        {
            "resourceType": "Condition",
            "subject": {"reference": world.ref("S")},
            "code": {"text": "asthma"},
            "onsetDateTime": "2015-05-05",
        },
    )
    return world


def ask(world, who, patient="S", *, pou=None, **params):
    """GET the operation; ``pou``: the X-Purpose-Of-Use header."""
    url = world.url(patient) + "/$consent-decision"
    return world.get(who, url, params=params or None, purpose=pou)


def decision(result: dict) -> tuple[str, dict[str, dict]]:
    """(overall decision, {type: {decision, visible, withheld, reasons}})."""
    assert result["resourceType"] == "Parameters", result
    overall, classes = None, {}
    for p in result.get("parameter", []):
        if p["name"] == "decision":
            overall = p["valueCode"]
        elif p["name"] == "class":
            parts: dict = {"reason": []}
            for part in p["part"]:
                value = next(v for k, v in part.items() if k.startswith("value"))
                if part["name"] == "reason":
                    parts["reason"].append(value)
                else:
                    parts[part["name"]] = value
            classes[parts["type"]] = parts
    return overall, classes


def ok(response) -> tuple[str, dict[str, dict]]:
    assert response.status_code == 200, response.text
    return decision(response.json())


def counts(classes: dict, type_: str) -> tuple[str, int, int]:
    c = classes[type_]
    return c["decision"], c["visible"], c["withheld"]


def test_partial_under_the_default_policy(sun):
    overall, classes = ok(ask(sun, "c"))
    assert overall == "partial"
    assert {"Observation", "Condition"} <= set(classes)
    assert counts(classes, "Observation") == ("partial", 2, 1)
    assert counts(classes, "Condition") == ("permit", 1, 0)
    assert classes["Observation"]["reason"], "a reason for the withheld Observation"
    # The writer sees everything.
    overall, classes = ok(ask(sun, "b", **{"class": "Observation,Condition"}))
    assert overall == "permit"
    assert counts(classes, "Observation") == ("permit", 3, 0)


def test_permit_when_everything_asked_for_is_visible(sun):
    overall, classes = ok(ask(sun, "c", **{"class": "Condition"}))
    assert overall == "permit"
    assert set(classes) == {"Condition"}
    assert counts(classes, "Condition") == ("permit", 1, 0)


def test_deny_names_the_consent(sun):
    cid = sun.consent({"patient": "S", "provision": {"type": "deny"}})
    overall, classes = ok(ask(sun, "c", **{"class": "Observation,Condition"}))
    assert overall == "deny"
    assert counts(classes, "Observation") == ("deny", 0, 3)
    assert counts(classes, "Condition") == ("deny", 0, 1)
    for type_ in ("Observation", "Condition"):
        assert any(f"Consent/{cid}" in r for r in classes[type_]["reason"]), classes[type_]


def test_partial_from_a_class_deny(sun):
    cid = sun.consent({"patient": "S", "provision": {"type": "deny", "class": ["Observation"]}})
    overall, classes = ok(ask(sun, "c", **{"class": "Observation,Condition"}))
    assert overall == "partial"
    assert counts(classes, "Observation") == ("deny", 0, 3)
    assert counts(classes, "Condition") == ("permit", 1, 0)
    assert any(f"Consent/{cid}" in r for r in classes["Observation"]["reason"])


def test_actor_for_admin_and_auditor_only(sun):
    sun.consent({"patient": "S", "provision": {"type": "deny", "actor": ["Organization/c"]}})
    params = {"class": "Observation", "actor": "Organization/c"}
    for who in ("admin", "auditor-cd"):
        overall, classes = ok(ask(sun, who, **params))
        assert overall == "deny" and counts(classes, "Observation") == ("deny", 0, 3), who
        overall, _ = ok(ask(sun, who, **{**params, "actor": "Organization/a"}))
        assert overall == "partial", who  # the HIV one under the default
        overall, _ = ok(ask(sun, who, **{**params, "actor": "Organization/b"}))
        assert overall == "permit", who
    # A member asks for itself only.
    overall, _ = ok(ask(sun, "c", **params))
    assert overall == "deny"
    r = ask(sun, "c", **{**params, "actor": "Organization/a"})
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"


def test_purpose(sun):
    overall, _ = ok(ask(sun, "c", pou="HRESCH", **{"class": "Observation"}))
    assert overall == "deny"  # research is not a treatment purpose
    overall, _ = ok(ask(sun, "c", **{"class": "Observation", "purpose": "HRESCH"}))
    assert overall == "deny"
    overall, _ = ok(ask(sun, "c", **{"class": "Observation", "purpose": "TREAT"}))
    assert overall == "partial"
    r = ask(sun, "c", **{"class": "Observation", "purpose": "SPYING"})
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    "params",
    [
        {"nonsense": "1"},
        {"class": "Nope"},
        {"class": "Observation,Nope"},
        {"actor": "not a reference"},
        {"purpose": "urn:x|TREAT"},
    ],
)
def test_bad_parameters(sun, params):
    r = ask(sun, "admin", **params)
    assert r.status_code == 400, r.text
    assert r.json()["resourceType"] == "OperationOutcome"


def test_unknown_patient_no_token_and_scopes(sun):
    r = sun.get("c", "/fhir/Patient/nobody-here/$consent-decision")
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"
    r = sun.get(None, sun.url("S") + "/$consent-decision")
    assert r.status_code == 401
    r = ask(sun, "c-no-consent-scope")
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"


def test_post_with_parameters(sun):
    cid = sun.consent({"patient": "S", "provision": {"type": "deny", "class": ["Observation"]}})
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "class", "valueString": "Observation,Condition"},
            {"name": "purpose", "valueCode": "TREAT"},
        ],
    }
    r = sun.post("c", sun.url("S") + "/$consent-decision", json=body)
    overall, classes = ok(r)
    assert overall == "partial"
    assert counts(classes, "Observation") == ("deny", 0, 3)
    assert any(f"Consent/{cid}" in x for x in classes["Observation"]["reason"])
    # the same as GET
    assert (overall, classes) == ok(ask(sun, "c", **{"class": "Observation,Condition"}))
    admin = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "class", "valueString": "Observation"},
            {"name": "actor", "valueReference": {"reference": "Organization/b"}},
        ],
    }
    overall, _ = ok(sun.post("admin", sun.url("S") + "/$consent-decision", json=admin))
    assert overall == "permit"


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"resourceType": "Patient"}',
        b'{"resourceType": "Parameters", "parameter": "x"}',
        b'{"resourceType": "Parameters", "parameter": [{"name": "nonsense", "valueString": "1"}]}',
    ],
)
def test_malformed_post_body(sun, content):
    r = sun.post("c", sun.url("S") + "/$consent-decision", content=content)
    assert r.status_code == 400, r.text
    assert r.json()["resourceType"] == "OperationOutcome"


def test_the_person_s_consent_counts_from_any_record(world):
    """With the MPI, a Consent recorded on PB decides for PA's data too."""
    world.consent({"provision": {"type": "deny"}})
    overall, classes = ok(ask(world, "c", patient="PA", **{"class": "Encounter"}))
    assert overall == "deny" and counts(classes, "Encounter") == ("deny", 0, 1)
