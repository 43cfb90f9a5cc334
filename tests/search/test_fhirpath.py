"""The FHIRPath compiler of search parameter expressions.

Three kinds of check: every R4 SearchParameter expression compiles; hand-written
expectations (types, choice elements, ``resolve() is T``, contained resources,
errors); and agreement with fhirpathpy (a test-only oracle) on the official R4
examples, apart from where fhirpathpy departs from the spec (``Resource.id`` gives
nothing there; it has no ``resolve()``), which the hand-written tests cover.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections import defaultdict
from decimal import Decimal
from importlib import resources
from pathlib import Path

import pytest

from hie.fhir.search.fhirpath import Node, UnsupportedExpression, compile
from hie.fhir.types import served_types

#: R4 types whose definitions cannot compile: no R4B model, or (Evidence,
#: EvidenceVariable) an R4B model of another structure. None is served.
UNMODELLED = {
    "EffectEvidenceSynthesis",
    "Evidence",
    "EvidenceVariable",
    "MedicinalProduct",
    "MedicinalProductAuthorization",
    "MedicinalProductContraindication",
    "MedicinalProductIndication",
    "MedicinalProductPackaged",
    "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "RiskEvidenceSynthesis",
    "SubstanceSpecification",
}


def r4_definitions() -> list[dict]:
    bundle = resources.files("hie.conformance").joinpath("r4/Bundle-searchParams.json")
    return [e["resource"] for e in json.loads(bundle.read_bytes())["entry"]]


def served_bases(definition: dict) -> list[str]:
    out: set[str] = set()
    for base in definition["base"]:
        if base in ("Resource", "DomainResource"):
            skip = {"Bundle", "Binary", "Parameters"} if base == "DomainResource" else set()
            out |= served_types() - skip
        elif base in served_types():
            out.add(base)
    return sorted(out)


def values(nodes: list[Node]) -> list:
    return [n.value for n in nodes]


def types(nodes: list[Node]) -> list[str]:
    return [n.type for n in nodes]


# ---------------------------------------------------------------- the R4 definitions
def test_every_r4_expression_compiles_for_every_served_base_type():
    definitions = r4_definitions()
    assert len(definitions) == 1375
    with_expression = [d for d in definitions if "expression" in d]
    assert {d["code"] for d in definitions if "expression" not in d} == {
        "_text",
        "_content",
        "_query",
    }
    pairs = components = 0
    for d in with_expression:
        for type_ in served_bases(d):
            compiled = compile(d["expression"], type_)
            assert compiled.types, (type_, d["expression"])  # a branch for each base
            pairs += 1
            for comp in d.get("component", ()):
                assert compile(comp["expression"], within=compiled).types, comp
                components += 1
    assert (pairs, components) == (2353, 132)


def test_r4_expressions_compile_whole_but_for_unmodelled_types():
    failures = {}
    compiled = 0
    for d in r4_definitions():
        if "expression" not in d:
            continue
        try:
            compile(d["expression"])
            compiled += 1
        except UnsupportedExpression as exc:
            failures[d["url"]] = str(exc)
    assert (compiled, len(failures)) == (1315, 57)
    for url, reason in failures.items():
        named = [t for t in UNMODELLED if f"for {t}" in reason or f"{t} has no element" in reason]
        assert named, (url, reason)


# ---------------------------------------------------------------- hand-written
OBS = {
    "resourceType": "Observation",
    "id": "o1",
    "meta": {
        "lastUpdated": "2024-01-02T03:04:05Z",
        "tag": [{"system": "http://x", "code": "t"}],
        "profile": ["http://p"],
    },
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "1-8"}]},
    "subject": {"reference": "Patient/p1"},
    "performer": [
        {"reference": "Practitioner/d1"},
        {"reference": "http://other.org/fhir/Patient/p2/_history/3"},
        {"reference": "#c1"},
        {"reference": "urn:uuid:7f1c1b2e-0000-4000-8000-000000000000"},
        {"type": "Patient", "identifier": {"value": "x"}},
    ],
    "contained": [
        {"resourceType": "Patient", "id": "c1", "name": [{"family": "Inside"}]},
    ],
    "effectivePeriod": {"start": "2024-01-01"},
    "issued": "2024-01-02T03:04:05.123Z",
    "valueQuantity": {
        "value": Decimal("5.50"),
        "unit": "mmol/L",
        "system": "http://unitsofmeasure.org",
        "code": "mmol/L",
    },
    "component": [
        {"code": {"text": "a"}, "valueQuantity": {"value": 1}},
        {"code": {"text": "b"}, "valueCodeableConcept": {"text": "c"}},
    ],
}
PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "extension": [
        {
            "url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
            "valueAddress": {"city": "Hangzhou"},
        },
        {
            "url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
            "valueString": "Li",
        },
    ],
    "active": True,
    "name": [{"family": "Zhang", "given": ["San", None]}, {"text": "张三"}],
    "telecom": [{"system": "phone", "value": "1"}, {"system": "email", "value": "a@b"}],
    "gender": "male",
    "birthDate": "1970-05-06",
    "contained": [{"resourceType": "Patient", "id": "x", "name": [{"family": "Contained"}]}],
}


def test_choice_type_by_its_suffix():
    nodes = compile("Observation.value", "Observation")(OBS)
    assert types(nodes) == ["Quantity"]
    assert nodes[0].value["value"] == Decimal("5.50")  # decimals kept as given
    assert types(compile("Observation.effective", "Observation")(OBS)) == ["Period"]
    as_quantity = compile("(Observation.value as Quantity)", "Observation")
    assert values(as_quantity(OBS)) == [OBS["valueQuantity"]]
    assert compile("Observation.value as CodeableConcept", "Observation")(OBS) == []
    as_string = {"resourceType": "Observation", "valueString": "x"}
    assert as_quantity(as_string) == []
    assert types(compile("Observation.value.as(string)", "Observation")(as_string)) == ["string"]


def test_as_filters_a_collection():
    """Strict FHIRPath fails ``as`` on several items (fhirpathpy does, on 115 pairs of
    R4 parameter and example); a search index wants the matching ones."""
    got = compile("(Observation.component.value as Quantity)", "Observation")(OBS)
    assert got == [Node({"value": 1}, "Quantity")]


def test_element_types_from_the_models():
    def typed(expr, resource):
        return types(compile(expr, resource["resourceType"])(resource))

    assert typed("Patient.name", PATIENT) == ["HumanName", "HumanName"]
    assert typed("Patient.birthDate", PATIENT) == ["date"]
    assert typed("Patient.gender", PATIENT) == ["code"]
    assert typed("Patient.active", PATIENT) == ["boolean"]
    assert typed("Patient.telecom", PATIENT) == ["ContactPoint", "ContactPoint"]
    assert typed("Observation.issued", OBS) == ["instant"]
    assert typed("Observation.code", OBS) == ["CodeableConcept"]
    assert typed("Observation.subject", OBS) == ["Reference"]
    assert typed("Observation.component", OBS) == ["BackboneElement", "BackboneElement"]
    assert typed("Resource.id", OBS) == ["id"]
    assert typed("Resource.meta.lastUpdated", OBS) == ["instant"]
    assert typed("Resource.meta.tag", OBS) == ["Coding"]
    assert typed("Resource.meta.profile", OBS) == ["canonical"]


def test_primitive_lists_skip_nulls():
    assert values(compile("Patient.name.given", "Patient")(PATIENT)) == ["San"]


def test_where_resolve_is_keeps_references_to_that_type():
    expr = "Observation.performer.where(resolve() is Patient)"
    got = values(compile(expr, "Observation")(OBS))
    assert got == [
        {"reference": "http://other.org/fhir/Patient/p2/_history/3"},
        {"reference": "#c1"},  # a contained Patient
        {"type": "Patient", "identifier": {"value": "x"}},
    ]
    subject = "(Observation.subject.where(resolve() is Patient))"
    assert values(compile(subject, "Observation")(OBS)) == [{"reference": "Patient/p1"}]
    group = dict(OBS, subject={"reference": "Group/g1"})
    assert compile(subject, "Observation")(group) == []


def test_deceased():
    expr = compile("Patient.deceased.exists() and Patient.deceased != false", "Patient")
    assert expr({"resourceType": "Patient"}) == [Node(False, "boolean")]
    assert expr({"resourceType": "Patient", "deceasedBoolean": False}) == [Node(False, "boolean")]
    assert expr({"resourceType": "Patient", "deceasedBoolean": True}) == [Node(True, "boolean")]
    dead = {"resourceType": "Patient", "deceasedDateTime": "2020-01-01"}
    assert expr(dead) == [Node(True, "boolean")]


def test_where_with_a_literal():
    got = compile("Patient.telecom.where(system='email')", "Patient")(PATIENT)
    assert values(got) == [{"system": "email", "value": "a@b"}]


def test_extensions():
    url = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"
    ext = compile(f"Patient.extension('{url}')", "Patient")(PATIENT)
    assert types(ext) == ["Extension"] and ext[0].value["valueAddress"]
    value = compile(f"Patient.extension('{url}').value", "Patient")(PATIENT)
    assert value == [Node({"city": "Hangzhou"}, "Address")]
    has = compile(f"Patient.where(hasExtension('{url}')).id", "Patient")
    assert values(has(PATIENT)) == ["p1"]
    item_subject = (
        "QuestionnaireResponse.item.where(hasExtension('http://hl7.org/fhir/"
        "StructureDefinition/questionnaireresponse-isSubject')).answer.value.ofType(Reference)"
    )
    qr = {
        "resourceType": "QuestionnaireResponse",
        "status": "completed",
        "item": [
            {
                "linkId": "1",
                "extension": [
                    {
                        "url": "http://hl7.org/fhir/StructureDefinition/"
                        "questionnaireresponse-isSubject",
                        "valueBoolean": True,
                    }
                ],
                "answer": [{"valueReference": {"reference": "Patient/p1"}}, {"valueString": "x"}],
            },
            {"linkId": "2", "answer": [{"valueReference": {"reference": "Patient/p2"}}]},
        ],
    }
    got = compile(item_subject, "QuestionnaireResponse")(qr)
    assert got == [Node({"reference": "Patient/p1"}, "Reference")]


def test_contained_resources_are_not_the_resource():
    assert values(compile("Patient.name.family", "Patient")(PATIENT)) == ["Zhang"]
    assert values(compile("Resource.id", "Patient")(PATIENT)) == ["p1"]
    assert values(compile("Patient.name.family")(PATIENT)) == ["Zhang"]


def test_multi_type_expressions_keep_the_branch_of_the_type():
    expr = "Patient.name | Person.name | Practitioner.name"
    person = {"resourceType": "Person", "name": [{"family": "P"}]}
    assert values(compile(expr, "Person")(person)) == [{"family": "P"}]
    assert compile(expr, "Observation").types == frozenset()
    assert compile(expr)(person) == [Node({"family": "P"}, "HumanName")]
    assert compile(expr, "Patient")(person) == []  # compiled for another type


def test_union_removes_duplicates():
    got = compile("Patient.gender | Patient.gender | Patient.birthDate", "Patient")(PATIENT)
    assert values(got) == ["male", "1970-05-06"]


def test_system_types_match_fhir_primitives():
    """R4's code-value-date component is ``value.as(DateTime) | value.as(Period)``."""
    comp = compile("Observation", "Observation")
    part = compile("value.as(DateTime) | value.as(Period)", within=comp)
    obs = {"resourceType": "Observation", "valueDateTime": "2024-05"}
    assert [part.on(n) for n in comp(obs)] == [[Node("2024-05", "dateTime")]]


def test_components_evaluate_on_each_parent_value():
    parent = compile("Observation | Observation.component", "Observation")
    code = compile("code", within=parent)
    value = compile("value.as(Quantity)", within=parent)
    rows = [(values(code.on(n)), values(value.on(n))) for n in parent(OBS)]
    assert rows == [
        ([OBS["code"]], [OBS["valueQuantity"]]),
        ([{"text": "a"}], [{"value": 1}]),
        ([{"text": "b"}], []),
    ]
    seq = {
        "resourceType": "MolecularSequence",
        "coordinateSystem": 0,
        "referenceSeq": {"chromosome": {"text": "1"}, "windowStart": 1},
        "variant": [{"start": 5, "end": 6}],
    }
    variant = compile("MolecularSequence.variant", "MolecularSequence")
    chromosome = compile("%resource.referenceSeq.chromosome", within=variant)
    start = compile("start", within=variant)
    (node,) = variant(seq)
    assert chromosome.on(node) == [Node({"text": "1"}, "CodeableConcept")]
    assert start.on(node) == [Node(5, "integer")]


def test_bundle_entry_resource_is_typed_at_run_time():
    bundle = {
        "resourceType": "Bundle",
        "type": "document",
        "entry": [{"resource": {"resourceType": "Composition", "id": "c"}}],
    }
    first = compile("Bundle.entry[0].resource", "Bundle")
    assert first.types == {"*"}
    assert types(first(bundle)) == ["Composition"]
    assert values(compile("Bundle.entry.resource.id", "Bundle")(bundle)) == ["c"]
    assert values(compile("Bundle.entry.resource.ofType(Patient)", "Bundle")(bundle)) == []


def test_functions_and_logic():
    def ev(expr):
        return values(compile(expr, "Patient")(PATIENT))

    assert ev("Patient.name.first().family") == ["Zhang"]
    assert ev("Patient.name.last().text") == ["张三"]
    assert ev("Patient.name.count()") == [2]
    assert ev("Patient.name.where(family.exists()).empty()") == [False]
    assert ev("Patient.active.not()") == [False]
    assert ev("Patient.active and {}") == []
    assert ev("Patient.active or {}") == [True]
    assert ev("Patient.active xor true") == [False]
    assert ev("false implies {}") == [True]
    assert ev("Patient.gender is code") == [True]
    assert ev("Patient.gender.is(string)") == [True]  # code specialises string
    assert ev("Patient.name.select(given)") == ["San"]
    assert ev("Patient.telecom.where($this.system = 'phone').value") == ["1"]
    assert ev("Patient.birthDate = '1970-05-06'") == [True]
    assert ev("Patient.active = 1") == [False]  # a boolean equals only a boolean


def test_children():
    got = compile("Patient.name.children()", "Patient")(PATIENT)
    assert sorted(values(got)) == ["San", "Zhang", "张三"]


@pytest.mark.parametrize(
    ("expr", "reason"),
    [
        ("Patient.nmae", "Patient has no element 'nmae'"),
        ("Patient.name.substring(1)", "function substring() is not supported"),
        ("Patient.birthDate > @2000", "unexpected '@'"),
        ("Patient.name.where(", "unexpected end of expression"),
        ("Patient.name as Wibble", "unknown type 'Wibble'"),
        ("Observation.subject.resolve().name", "needs the store"),
        ("Observation.subject.resolve()", "may only be type-tested"),
        ("Patient.birthDate < '2000'", "operator '<' is not supported"),
        ("Patient.birthDate.extension('x')", "extensions of primitive values"),
        ("%patient.name", "unknown variable %patient"),
    ],
)
def test_unsupported_expressions_say_why(expr, reason):
    type_ = "Observation" if expr.startswith("Observation") else "Patient"
    with pytest.raises(UnsupportedExpression) as info:
        compile(expr, type_)
    assert reason in str(info.value) and expr in str(info.value)


# ---------------------------------------------------------------- official examples
#: The examples package, cached as tests/test_r4_examples.py caches it.
TARBALL = Path(__file__).parent.parent / ".cache" / "hl7.fhir.r4.examples-4.0.1.tgz"
SHA1 = "537ea7db3f3c7b3575fe2eaa7808bad21261cca3"


def _fetch_examples() -> Path:
    """The cached package, fetched with ``npm pack`` when absent (skipped when
    HIE_SKIP_R4_EXAMPLES=1, as the examples round trip is)."""
    if os.environ.get("HIE_SKIP_R4_EXAMPLES") == "1":
        pytest.skip("HIE_SKIP_R4_EXAMPLES=1")
    if TARBALL.is_file() and hashlib.sha1(TARBALL.read_bytes()).hexdigest() == SHA1:
        return TARBALL
    npm = shutil.which("npm")
    assert npm, "npm is needed to fetch hl7.fhir.r4.examples (or set HIE_SKIP_R4_EXAMPLES=1)"
    TARBALL.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=TARBALL.parent) as tmp:
        subprocess.run(
            [npm, "pack", "hl7.fhir.r4.examples@4.0.1"], cwd=tmp, check=True, timeout=900
        )
        os.replace(Path(tmp) / TARBALL.name, TARBALL)
    assert hashlib.sha1(TARBALL.read_bytes()).hexdigest() == SHA1
    return TARBALL


@pytest.fixture(scope="module")
def served_examples() -> dict[str, list[tuple[str, dict]]]:
    """The R4 examples of served types, by type: (file name, resource)."""
    out: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    with tarfile.open(_fetch_examples(), "r:gz") as tar:
        for member in tar:
            folder, _, name = member.name.partition("/")
            if folder != "package" or "/" in name or not name.endswith(".json"):
                continue
            resource = json.loads(tar.extractfile(member).read())
            if isinstance(resource, dict) and resource.get("resourceType") in served_types():
                out[resource["resourceType"]].append((name, resource))
    return out


@pytest.fixture(scope="module")
def params_by_type() -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for d in r4_definitions():
        if "expression" in d:
            for type_ in served_bases(d):
                out[type_].append(d)
    return out


def test_every_parameter_evaluates_on_every_official_example(served_examples, params_by_type):
    """No expression fails at run time, and every value has a type it was compiled for."""
    evaluated = 0
    for type_, found in served_examples.items():
        for d in params_by_type[type_]:
            compiled = compile(d["expression"], type_)
            for _, resource in found:
                for node in compiled(resource):
                    assert node.type in compiled.types or "*" in compiled.types
                evaluated += 1
    assert evaluated > 100_000


def _normal(value):
    """JSON for comparing with fhirpathpy, which turns decimals into strings."""
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float | Decimal):
        return str(Decimal(str(value)).normalize())
    if isinstance(value, str):
        try:
            return str(Decimal(value).normalize())
        except ArithmeticError:
            return value
    return str(value)


def _same_as_fhirpathpy(found, params) -> int:
    fhirpathpy = pytest.importorskip("fhirpathpy")
    from fhirpathpy.models import models

    compared = 0
    for type_, name, resource in found:
        for d in params[type_]:
            expr = d["expression"]
            if "resolve()" in expr or expr.startswith("Resource."):
                continue  # fhirpathpy has no resolve() and no Resource root type
            mine = compile(expr, type_)(resource)
            try:
                theirs = fhirpathpy.evaluate(resource, expr, {}, models["r4"])
            except ValueError:  # ``as`` on several items: an error in strict FHIRPath
                continue
            as_set = {json.dumps(_normal(n.value), sort_keys=True) for n in mine}
            # fhirpathpy passes on the nulls that pad primitive lists: they are no values
            expected = {json.dumps(_normal(v), sort_keys=True) for v in theirs if v is not None}
            assert as_set == expected, (name, d["code"], expr)
            compared += 1
    return compared


def test_same_values_as_fhirpathpy_on_the_resources_above():
    params = defaultdict(list)
    for d in r4_definitions():
        if "expression" in d:
            for type_ in served_bases(d):
                params[type_].append(d)
    found = [("Observation", "OBS", OBS), ("Patient", "PATIENT", PATIENT)]
    assert _same_as_fhirpathpy(found, params) > 50


def test_same_values_as_fhirpathpy_on_a_handful_of_examples(served_examples, params_by_type):
    wanted = {
        "Observation-example.json",
        "Observation-blood-pressure.json",
        "Observation-bmd.json",
        "Patient-example.json",
        "Condition-example.json",
        "MedicationRequest-medrx0311.json",
        "Encounter-example.json",
        "ValueSet-example-expansion.json",
    }
    found = [
        (type_, name, resource)
        for type_, items in served_examples.items()
        for name, resource in items
        if name in wanted
    ]
    assert len(found) == len(wanted)
    assert _same_as_fhirpathpy(found, params_by_type) > 200


@pytest.mark.slow
def test_same_values_as_fhirpathpy_on_examples_of_every_type(served_examples, params_by_type):
    """Up to five examples of every served type (about 5,000 evaluations)."""
    found = [
        (type_, name, resource)
        for type_, items in sorted(served_examples.items())
        for name, resource in items[:5]
    ]
    assert _same_as_fhirpathpy(found, params_by_type) > 4000
