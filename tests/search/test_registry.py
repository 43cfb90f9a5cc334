"""The search-parameter registry: R4's definitions per served type, compartments,
extractors, custom definitions and the fingerprint."""

from __future__ import annotations

import pytest

from hie.fhir.search.fhirpath import Node
from hie.fhir.search.registry import (
    INDEXED_ONLY,
    InvalidSearchParameter,
    Registry,
    alliance_definitions,
    default_registry,
)
from hie.fhir.types import served_types

COMMON = {"_id", "_lastUpdated", "_tag", "_profile", "_security", "_source"}


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry(alliance=[])


def custom(**changes) -> dict:
    """A valid custom SearchParameter, with ``changes`` applied (None removes a key)."""
    resource = {
        "resourceType": "SearchParameter",
        "url": "http://alliance.example/fhir/SearchParameter/patient-nickname",
        "name": "nickname",
        "status": "active",
        "description": "A name of use 'nickname'",
        "code": "nickname",
        "base": ["Patient"],
        "type": "string",
        "expression": "Patient.name.where(use = 'nickname').given",
    }
    resource.update(changes)
    return {k: v for k, v in resource.items() if v is not None}


def test_observation_parameters(registry):
    params = registry.params("Observation")
    assert params["code"].type == "token"
    assert params["code"].description == "The code of the observation type"
    assert set(params["subject"].targets) == {
        "Group",
        "Device",
        "Patient",
        "Location",
    }
    assert params["code-value-quantity"].type == "composite"
    assert params["code-value-quantity"].components == (
        ("code", "code"),
        ("value-quantity", "value.as(Quantity)"),
    )
    assert set(params["date"].comparators) == {"eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"}
    assert params["value-quantity"].url == (
        "http://hl7.org/fhir/SearchParameter/Observation-value-quantity"
    )


def test_common_parameters_on_every_served_type(registry):
    for type_ in served_types():
        codes = set(registry.params(type_))
        assert codes >= COMMON - _unindexed(type_), type_
        assert not codes & {"_text", "_content", "_query", "_list", "_has"}
    with pytest.raises(KeyError):
        registry.params("MedicinalProduct")  # not served


def _unindexed(type_: str) -> set[str]:
    return COMMON - INDEXED_ONLY[type_] if type_ in INDEXED_ONLY else set()


def test_audit_events_index_what_auditors_search_by():
    local = Registry()  # with the alliance's definitions (purpose)
    assert set(local.params("AuditEvent")) == {
        *("_id", "_lastUpdated", "_security", "action", "agent", "altid", "date"),
        *("entity", "outcome", "patient", "purpose", "subtype"),
    }
    custom = {
        "resourceType": "SearchParameter",
        "url": "http://x/AuditEvent-address",
        "name": "address",
        "status": "active",
        "code": "address",
        "base": ["AuditEvent"],
        "type": "string",
        "expression": "AuditEvent.agent.network.address",
    }
    local.add(custom)  # an administrator can index another one
    assert "address" in local.params("AuditEvent")


def test_every_composite_component_is_a_parameter_of_its_type(registry):
    composites = 0
    for type_ in served_types():
        params = registry.params(type_)
        for param in params.values():
            for code, _ in param.components:
                assert params[code].type not in ("composite", "special"), (type_, code)
            composites += bool(param.components)
    assert composites == 64


def test_extractor_evaluates_the_branch_of_its_type(registry):
    phone = registry.extractor("Person", "phone")
    person = {"resourceType": "Person", "telecom": [{"system": "phone", "value": "1"}]}
    assert phone(person) == [Node({"system": "phone", "value": "1"}, "ContactPoint")]
    assert registry.extractor("Person", "phone") is phone  # compiled once
    obs = {"resourceType": "Observation", "meta": {"lastUpdated": "2024-01-01T00:00:00Z"}}
    assert registry.extractor("Observation", "_lastUpdated")(obs) == [
        Node("2024-01-01T00:00:00Z", "instant")
    ]


def test_components_of_a_composite(registry):
    obs = {
        "resourceType": "Observation",
        "code": {"text": "bp"},
        "component": [
            {"code": {"text": "sys"}, "valueQuantity": {"value": 120}},
            {"code": {"text": "dia"}, "valueQuantity": {"value": 80}},
        ],
    }
    nodes = registry.extractor("Observation", "component-code-value-quantity")(obs)
    parts = registry.components("Observation", "component-code-value-quantity")
    assert [p.code for p, _ in parts] == ["component-code", "component-value-quantity"]
    assert [p.type for p, _ in parts] == ["token", "quantity"]
    rows = [tuple([n.value for n in fn(node)] for _, fn in parts) for node in nodes]
    assert rows == [([{"text": "sys"}], [{"value": 120}]), ([{"text": "dia"}], [{"value": 80}])]
    with pytest.raises(KeyError):
        registry.components("Observation", "code")


def test_compartments(registry):
    patient = registry.compartment("Patient")
    assert patient["Observation"] == ("subject", "performer")
    assert patient["Patient"] == ("link",)
    assert registry.compartment("Encounter")["Encounter"] == ("{def}",)
    for comp in ("Patient", "Encounter", "RelatedPerson", "Practitioner", "Device"):
        members = registry.compartment(comp)
        assert members
        for type_, codes in members.items():
            assert type_ in served_types()
            for code in codes:
                assert code == "{def}" or code in registry.params(type_), (comp, type_, code)


def test_fingerprint_is_stable_and_follows_definitions():
    one, two = Registry(alliance=[]), Registry(alliance=[])
    assert one.fingerprint() == two.fingerprint()
    assert len(one.fingerprint()) == 64
    two.add(custom())
    assert one.fingerprint() != two.fingerprint()


def test_add_a_custom_parameter():
    registry = Registry(alliance=[])
    param = registry.add(custom())
    assert registry.params("Patient")["nickname"] is param
    assert param.base == ("Patient",) and param.type == "string"
    patient = {"resourceType": "Patient", "name": [{"use": "nickname", "given": ["Xiao"]}]}
    assert registry.extractor("Patient", "nickname")(patient) == [Node("Xiao", "string")]
    # the same url again replaces it
    registry.add(custom(code="alias", expression="Patient.name.text"))
    assert "nickname" not in registry.params("Patient")
    assert registry.extractor("Patient", "alias")({"resourceType": "Patient"}) == []


def test_add_a_custom_composite_and_one_on_every_type():
    registry = Registry(alliance=[])
    composite = custom(
        url="http://alliance.example/fhir/SearchParameter/patient-name-use",
        code="name-use",
        type="composite",
        expression="Patient.name",
        component=[
            {
                "definition": "http://hl7.org/fhir/SearchParameter/individual-family",
                "expression": "family",
            },
            {
                "definition": "http://hl7.org/fhir/SearchParameter/individual-gender",
                "expression": "use",
            },
        ],
    )
    assert registry.add(composite).components == (("family", "family"), ("gender", "use"))
    everywhere = custom(
        url="http://alliance.example/fhir/SearchParameter/member",
        code="member-tag",
        base=["Resource"],
        type="token",
        expression="Resource.meta.tag.where(system = 'http://alliance.example/member')",
    )
    registry.add(everywhere)
    assert all("member-tag" in registry.params(t) for t in served_types())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"resourceType": "Patient"}, "not a SearchParameter"),
        ({"url": None}, "url is required"),
        ({"code": "_nick"}, "codes starting with '_' are reserved"),
        ({"code": "nick name"}, "must be a letter then"),
        ({"type": "text"}, "type 'text' is not one of"),
        ({"type": "special"}, "special parameters need code"),
        ({"expression": None}, "expression is required"),
        ({"base": []}, "base is required"),
        ({"base": "Patient"}, "base must be a list of strings"),
        ({"base": ["MedicinalProduct"]}, "MedicinalProduct not served"),
        ({"expression": "Patient.nickname"}, "Patient has no element 'nickname'"),
        ({"expression": "Patient.name.substring(2)"}, "substring() is not supported"),
        ({"expression": "Observation.code"}, "yields nothing for Patient"),
        ({"type": "date"}, "a date parameter needs values of type"),
        ({"code": "name"}, "code 'name' is already defined for Patient by http://hl7.org"),
        ({"type": "reference", "target": ["Wibble"]}, "unknown target type(s) Wibble"),
        ({"comparator": ["gt", "after"]}, "unknown comparator(s) after"),
        ({"multipleOr": "yes"}, "multipleOr must be a boolean"),
        ({"type": "composite"}, "needs at least two components"),
        (
            {
                "type": "composite",
                "component": [
                    {"definition": "http://x/unknown", "expression": "family"},
                    {"definition": "http://x/unknown2", "expression": "given"},
                ],
            },
            "component definition http://x/unknown is not known",
        ),
    ],
)
def test_bad_custom_parameters_are_rejected_with_the_reason(changes, message):
    registry = Registry(alliance=[])
    before = registry.fingerprint()
    with pytest.raises(InvalidSearchParameter) as info:
        registry.add(custom(**changes))
    assert message in str(info.value)
    assert registry.fingerprint() == before  # nothing half-added


def test_alliance_definitions_are_loaded_and_checked():
    shipped = {d["url"]: d for d in alliance_definitions()}
    assert list(shipped) == ["http://hie.example/fhir/SearchParameter/AuditEvent-purpose"]
    assert "purpose" in Registry().params("AuditEvent")
    registry = Registry(alliance=[custom()])
    assert "nickname" in registry.params("Patient")
    with pytest.raises(InvalidSearchParameter, match="alliance SearchParameter http://a/b: "):
        Registry(alliance=[custom(url="http://a/b", expression="Patient.nope")])


def test_default_registry_is_shared():
    assert default_registry() is default_registry()
    assert default_registry().params("Patient")["name"].type == "string"
