"""Consent writes the engine cannot honour are refused (422 OperationOutcome) and nothing is
stored; what it can honour, however contradictory, is accepted."""

from __future__ import annotations

import json

import pytest

from tests.consent.world import ACTCODE, LOINC, assert_withheld, consent_resource, nested

BAD = {
    "period end before start": {
        "provision": {"type": "deny", "period": ("2024-02-01", "2024-01-01")}
    },
    "dataPeriod end before start": {
        "provision": {"type": "deny", "dataPeriod": ("2024-02-01", "2024-01-01")}
    },
    "nested period end before start": {
        "provision": {
            "type": "deny",
            "provision": [
                {"type": "permit", "period": ("2024-02-01T10:00:00Z", "2024-02-01T09:00:00Z")}
            ],
        }
    },
    "20-deep nesting": {"provision": nested(20)},
    "unknown actor": {"provision": {"type": "deny", "actor": ["CareTeam/nope"]}},
    "unknown practitioner role": {
        "provision": {"type": "deny", "actor": ["PractitionerRole/nope"]}
    },
    "actor of an unsupported type": {"provision": {"type": "deny", "actor": ["Device/x"]}},
    "actor a Patient": {"provision": {"type": "deny", "actor": ["PA"]}},
    "unknown label system": {
        "provision": {"type": "permit", "label": [{"system": "urn:x", "code": "HIV"}]}
    },
    "unknown label code": {
        "provision": {"type": "permit", "label": [{"system": ACTCODE, "code": "NOPE"}]}
    },
    "unknown purpose": {"provision": {"type": "permit", "purpose": ["SPYING"]}},
    "purpose of another system": {
        "provision": {"type": "permit", "purpose": [{"system": "urn:x", "code": "TREAT"}]}
    },
    "unknown class": {"provision": {"type": "deny", "class": ["Nope"]}},
    "class of another system": {
        "provision": {"type": "deny", "class": [{"system": "urn:x", "code": "Observation"}]}
    },
    "unknown action": {"provision": {"type": "deny", "action": ["fly"]}},
    "unknown data meaning": {
        "provision": {
            "type": "deny",
            "raw": {
                "data": [{"meaning": "whatever", "reference": {"reference": "Organization/b"}}]
            },
        }
    },
    "authoredby not an Organization": {
        "provision": {"type": "deny", "data": [("authoredby", "PA")]}
    },
    "provision.code": {
        "provision": {
            "type": "deny",
            "raw": {"code": [{"coding": [{"system": LOINC, "code": "8867-4"}]}]},
        }
    },
    "nested provision.code": {
        "provision": {
            "type": "deny",
            "provision": [{"type": "permit", "raw": {"code": [{"text": "labs"}]}}],
        }
    },
    "nested provision without type": {
        "provision": {"type": "deny", "provision": [{"actor": ["Organization/c"]}]}
    },
    "unknown provision type": {"policy": "OPTIN", "provision": {"type": "maybe"}},
    "no patient": {"patient": None, "provision": {"type": "deny"}},
    "neither root type nor policyRule": {
        "policy": None,
        "provision": {"actor": ["Organization/c"]},
    },
    "no provision and no policyRule": {"policy": None},
}


def stored_consents(world) -> int:
    r = world.get("admin", "/fhir/Consent", params={"_total": "accurate"})
    assert r.status_code == 200, r.text
    return r.json()["total"]


def refused(response, status=422) -> dict:
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"] and body["issue"][0]["severity"] in ("error", "fatal")
    return body


@pytest.mark.parametrize("name", list(BAD))
def test_bad_consent_is_refused_and_not_stored(world, name):
    world.put_fixed({"resourceType": "Device", "id": "x"})
    body = consent_resource(world, BAD[name])
    refused(world.post("b", "/fhir/Consent", json=body))
    assert stored_consents(world) == 0
    # and it does not decide anything either
    assert world.get("c", world.url("ob1")).status_code == 200


@pytest.mark.parametrize("name", ["20-deep nesting", "unknown actor", "provision.code"])
def test_bad_consent_in_an_update_or_a_transaction(world, name):
    cid = world.consent({"provision": {"type": "deny", "class": ["Condition"]}})
    good = world.get("b", f"/fhir/Consent/{cid}").json()
    bad = {**consent_resource(world, BAD[name]), "id": cid}
    refused(world.put("b", f"/fhir/Consent/{cid}", json=bad))
    assert world.get("b", f"/fhir/Consent/{cid}").json() == good
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": consent_resource(world, BAD[name]),
                "request": {"method": "POST", "url": "Consent"},
            }
        ],
    }
    r = world.post("b", "/fhir", json=bundle)
    assert r.status_code in (400, 422), r.text
    assert stored_consents(world) == 1


def test_malformed_json_wrong_types_and_oversized_bodies(world):
    r = world.post("b", "/fhir/Consent", content=b'{"resourceType": "Consent", "status": ')
    refused(r, 400)
    wrong = consent_resource(world, {"provision": {"type": "deny"}})
    for field, value in (
        ("provision", "x"),
        ("patient", "Patient/x"),
        ("status", 7),
        ("provision", {"type": "deny", "provision": "x"}),
        ("provision", {"type": "deny", "actor": {"reference": "Organization/c"}}),
    ):
        refused(world.post("b", "/fhir/Consent", json={**wrong, field: value}))
    big = {
        **wrong,
        "provision": {
            "type": "deny",
            "actor": [{"role": {"text": "x" * 1000}, "reference": {"reference": "Organization/c"}}]
            * 3000,
        },
    }
    assert len(json.dumps(big)) > 2 * 1024 * 1024
    refused(world.post("b", "/fhir/Consent", json=big), 413)
    assert stored_consents(world) == 0
    assert world.get("c", world.url("ob1")).status_code == 200


def test_ten_levels_of_nesting_are_accepted(world):
    body = consent_resource(world, {"provision": nested(10)})
    r = world.post("b", "/fhir/Consent", json=body)
    assert r.status_code == 201, r.text
    assert stored_consents(world) == 1


def test_what_the_contract_allows_is_accepted(world):
    # root type without a policyRule; a policyRule without a provision; inactive and
    # other-scope Consents; every supported actor type
    for spec in (
        {"policy": None, "provision": {"type": "deny", "class": ["Condition"]}},
        {"policy": "OPTOUT"},
        {"status": "inactive", "provision": {"type": "deny"}},
        {"scope": "research", "provision": {"type": "deny"}},
        {
            "provision": {
                "type": "permit",
                "actor": [
                    "Organization/c",
                    "CareTeam/ct-c",
                    "PractitionerRole/pr-c",
                    "Practitioner/dr-c",
                ],
            }
        },
        {
            "provision": {
                "type": "deny",
                "data": [("related", "ob1"), ("authoredby", "Organization/a")],
                "action": ["access", "use", "disclose"],
                "purpose": ["HRESCH", "HPAYMT"],
                "label": ["HIV", "R"],
                "class": ["Observation", "Condition"],
                "period": ("2020-01-01", "2020-01-01"),
                "dataPeriod": ("2020-01-01T00:00:00Z", None),
            }
        },
    ):
        r = world.post("b", "/fhir/Consent", json=consent_resource(world, spec))
        assert r.status_code == 201, (spec, r.text)


def test_contradictory_provisions_are_accepted_and_deny_wins(world):
    spec = {
        "provision": {
            "type": "permit",
            "provision": [
                {"type": "permit", "class": ["Observation"]},
                {"type": "deny", "class": ["Observation"]},
                {"type": "permit", "actor": ["Organization/c"], "class": ["Observation"]},
            ],
        }
    }
    r = world.post("b", "/fhir/Consent", json=consent_resource(world, spec))
    assert r.status_code == 201, r.text
    assert_withheld(world.get("c", world.url("ob1")))
    assert world.get("c", world.url("cb")).status_code == 200
