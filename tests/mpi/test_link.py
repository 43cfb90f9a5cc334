"""Blocking, training and the link decision on the synthetic Chinese population."""

from __future__ import annotations

import copy
import importlib.util
from collections import defaultdict
from pathlib import Path

import pytest

from hie.mpi import (
    LINK,
    NEW,
    RESIDENT_ID_SYSTEM,
    REVIEW,
    BlockIndex,
    Model,
    blocking_keys,
    decide,
    gb11643_check_digit,
    normalize,
)
from hie.mpi.train import train

_SCRIPT = Path(__file__).parents[2] / "scripts" / "mpi_population.py"


def _population_module():
    spec = importlib.util.spec_from_file_location("mpi_population", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


population = _population_module().population


@pytest.fixture(scope="module")
def people():
    return population(800, seed=11)


@pytest.fixture(scope="module")
def model(people) -> Model:
    return train([normalize(p) for _, p, _ in people], random_pairs=30_000, seed=1)


def resident_id(first17: str) -> str:
    return first17 + gb11643_check_digit(first17)


def registration(name, id_number, gender="female", phone="13912345678", given=None) -> dict:
    resource = {
        "resourceType": "Patient",
        "name": [{"family": name[0], "given": [given or name[1:]]}],
        "gender": gender,
        "birthDate": "2015-06-01",
        "telecom": [{"system": "phone", "value": phone}],
        "address": [{"text": "上海市徐汇区漕溪北路100号3号楼2单元501室"}],
    }
    if id_number:
        resource["identifier"] = [{"system": RESIDENT_ID_SYSTEM, "value": id_number}]
    return resource


def link_one(model: Model, known: dict[str, dict], incoming: dict):
    """Decide for ``incoming`` against ``known`` patients (each its own cluster)."""
    index = BlockIndex()
    records = {}
    for key, resource in known.items():
        records[key] = normalize(resource)
        index.add(key, blocking_keys(records[key]))
    record = normalize(incoming)
    found, skipped = index.lookup(blocking_keys(record))
    return decide(record, [(k, k, records[k]) for k in found], model, skipped_keys=skipped)


def test_population_is_deterministic_and_consistent(people):
    assert population(50, seed=3) == population(50, seed=3)
    for _, resource, _ in people:
        record = normalize(resource)
        assert "id-birthdate-mismatch" not in record.flags
        assert "id-sex-mismatch" not in record.flags


def test_trained_model_is_sensible(model):
    weights = model.level_weights()
    for field in ("national_id", "family", "given", "birth_date", "phone"):
        assert weights[field]["different"] < 0 < weights[field]["exact"]
    assert weights["given"]["close"] > 0  # homophones are the same name
    assert Model.from_json(model.to_json()).level_weights() == weights


def test_perturbed_copy_links(model):
    original = registration("陈思雨", resident_id("31010420150601002"))
    copy_ = copy.deepcopy(original)
    copy_["name"] = [{"text": "陳思語"}]  # traditional, and 语 for 雨 by a pinyin IME
    copy_["telecom"] = [{"system": "phone", "value": "+86 139-1234-5678"}]
    copy_["address"] = [{"line": ["漕溪北路100号"], "district": "徐汇区", "city": "上海市"}]
    del copy_["identifier"]
    decision = link_one(model, {"a": original}, copy_)
    assert (decision.action, decision.cluster) == (LINK, "a")
    assert decision.candidates[0].probability >= model.match_probability


def test_twins_do_not_link(model):
    sister = registration("陈思雨", resident_id("31010420150601002"))
    brother = registration("陈浩然", resident_id("31010420150601011"), gender="male")
    assert link_one(model, {"sister": sister}, brother).action != LINK
    # with ID numbers: two valid numbers are two people, not even a review
    assert link_one(model, {"sister": sister}, brother).action == NEW
    # without: a twin pattern goes to review at most
    sister_2 = registration("陈思雨", None)
    same_sex = registration("陈思琪", None)
    assert link_one(model, {"sister": sister_2}, same_sex).action != LINK


def test_block_cap_sends_to_review(model):
    index = BlockIndex(cap=2)
    for i in range(3):
        index.add(i, ["tel:13912345678"])
    found, skipped = index.lookup(["tel:13912345678", "ny:x:1980"])
    assert (found, skipped) == ([], ["tel:13912345678"])
    record = normalize(registration("陈思雨", None))
    decision = decide(record, [], model, skipped_keys=skipped)
    assert decision.action == REVIEW and decision.reason.startswith("blocks-over-cap")


def test_garbage_is_a_new_identity(model):
    decision = link_one(model, {"a": registration("陈思雨", None)}, {"name": [{"text": "新生儿"}]})
    assert (decision.action, decision.reason) == (NEW, "no-identifying-data")


def test_population_links_without_false_merges(people, model):
    index = BlockIndex()
    records, cluster_of = {}, {}
    members: dict[object, set[str]] = defaultdict(set)
    linked = 0
    for i, (_, resource, person) in enumerate(people):
        record = normalize(resource)
        keys = blocking_keys(record)
        found, skipped = index.lookup(keys)
        decision = decide(
            record, [(cluster_of[k], k, records[k]) for k in found], model, skipped_keys=skipped
        )
        cluster_of[i] = decision.cluster if decision.action == LINK else i
        assert not members[cluster_of[i]] or person in members[cluster_of[i]], decision
        linked += decision.action == LINK
        members[cluster_of[i]].add(person)
        records[i] = record
        index.add(i, keys)
    registrations = defaultdict(int)
    for _, _, person in people:
        registrations[person] += 1
    repeats = sum(n - 1 for n in registrations.values())
    assert linked >= 0.8 * repeats
