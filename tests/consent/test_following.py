"""The Consents in force follow the store: a Consent written by another server
process, a person registered at one more member after the Consent was recorded, and
an organisation named before it joins the alliance."""

from __future__ import annotations

from fastapi.testclient import TestClient

from hie.app import create_app
from hie.config import Settings
from tests.consent.world import MRN_C, World, assert_withheld, person_at


def test_a_consent_written_through_another_process_applies_on_the_next_request(tmp_path):
    """Two servers on one embedded store: each follows the other's writes."""
    settings = Settings(data_dir=tmp_path)
    first, second = create_app(settings), create_app(settings)
    with (
        TestClient(first, base_url="http://hie.test") as one,
        TestClient(second, base_url="http://hie.test") as two,
    ):
        world = World(one, first).build()
        other = World(two, second, world.ids, world.types)
        assert other.get("c", other.url("ob1")).status_code == 200
        world.consent({"provision": {"type": "deny", "actor": ["Organization/c"]}})
        assert_withheld(other.get("c", other.url("ob1")))
        assert other.get("a", other.url("ob1")).status_code == 200


def test_a_consent_covers_records_the_person_gets_at_members_later(world):
    """The MPI links a new registration to the person: the Consent follows it."""
    world.consent({"provision": {"type": "deny", "actor": ["Organization/a"]}})
    pc = world.write("PC", "c", person_at(MRN_C, "C-77"))
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "blood pressure"},
        "subject": {"reference": f"Patient/{pc['id']}"},
    }
    world.write("oc", "c", obs)
    assert_withheld(world.get("a", world.url("oc")))
    assert_withheld(world.get("a", world.url("PC")))
    found = world.get("a", "/fhir/Observation", params={"subject": world.ref("PC")}).json()
    assert "oc" not in world.keys(found)
    assert world.get("b", world.url("oc")).status_code == 200


def test_an_organisation_is_named_before_it_joins(world):
    """Organizations are matched by reference: a refusal of one that has not joined
    yet is accepted and applies to it once its systems call."""
    world.consent({"provision": {"type": "deny", "actor": ["Organization/newcomer"]}})
    world.put_fixed({"resourceType": "Organization", "id": "newcomer", "name": "New clinic"})
    token = world.app.state.tokens.mint(
        "emr-new", "system/*.rs", 600, roles=("member",), organization="Organization/newcomer"
    )
    found = world.http.get(world.url("ob1"), headers={"Authorization": f"Bearer {token}"})
    assert_withheld(found)
    assert world.get("c", world.url("ob1")).status_code == 200
