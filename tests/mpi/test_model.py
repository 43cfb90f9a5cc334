"""The Fellegi-Sunter model: EM recovers known parameters, scores explain themselves, JSON."""

from __future__ import annotations

import math
import random

import pytest

from hie.mpi import FIELDS, MATCH, NO_MATCH, POSSIBLE, ComparisonVector, Model, fit
from hie.mpi.compare import ID_CONFLICT, TWIN
from hie.mpi.model import CONTACT_ONLY, UNCORROBORATED

# True parameters of a simulation: m favours the top levels, u the "different" level.
TRUE_M = {f.name: [0.05 / (len(f.levels) - 2)] * (len(f.levels) - 2) + [0.95] for f in FIELDS}
TRUE_U = {f.name: [0.9] + [0.1 / (len(f.levels) - 2)] * (len(f.levels) - 2) for f in FIELDS}
TRUE_PRIOR = 0.3


def simulate(n: int, seed: int = 7) -> list[ComparisonVector]:
    """Vectors drawn from the true model, with 10 % of the fields missing."""
    rng = random.Random(seed)
    vectors = []
    for _ in range(n):
        table = TRUE_M if rng.random() < TRUE_PRIOR else TRUE_U
        levels = tuple(
            0 if rng.random() < 0.1 else rng.choices(range(1, len(f.levels)), table[f.name])[0]
            for f in FIELDS
        )
        vectors.append(ComparisonVector(levels))
    return vectors


def test_em_recovers_known_parameters():
    fitted = fit(simulate(20_000))
    assert fitted.prior == pytest.approx(TRUE_PRIOR, abs=0.02)
    for f in FIELDS:
        assert fitted.m[f.name] == pytest.approx(TRUE_M[f.name], abs=0.03), f.name
        assert fitted.u[f.name] == pytest.approx(TRUE_U[f.name], abs=0.03), f.name


def test_em_with_fixed_u_and_fixed_m():
    start = Model(Model.initial().m, TRUE_U, 0.5)
    fitted = fit(simulate(20_000), start=start, fixed_u=True, fixed_m={"sex"})
    assert fitted.u == start.u and fitted.m["sex"] == start.m["sex"]
    assert fitted.m["family"] == pytest.approx(TRUE_M["family"], abs=0.03)
    assert fitted.prior == pytest.approx(TRUE_PRIOR, abs=0.02)


def test_em_takes_id_conflicts_as_non_matches():
    top = tuple(len(f.levels) - 1 for f in FIELDS)
    vectors = simulate(5_000) + [ComparisonVector(top, ID_CONFLICT)] * 500
    assert fit(vectors).info["pairs"] == 5_500


def test_score_explains_weight():
    model = Model(TRUE_M, TRUE_U, 0.001)
    vector = ComparisonVector(tuple(len(f.levels) - 1 for f in FIELDS[:-1]) + (0,))
    total, parts = model.score(vector)
    assert total == pytest.approx(sum(parts.values())) == pytest.approx(model.weight(vector))
    assert parts["postcode"] == 0.0  # missing weighs nothing
    assert parts["family"] == pytest.approx(math.log2(0.95 / (0.1 / 3)))
    assert set(parts) == {"prior", *(f.name for f in FIELDS)}
    assert model.level_weights()["family"]["different"] < 0


def test_classify_by_thresholds_and_conflicts():
    model = Model(TRUE_M, TRUE_U, 0.001, match_probability=0.99, possible_probability=0.1)
    assert model.classify(10) == MATCH and model.classify(0) == POSSIBLE
    assert model.classify(-5) == NO_MATCH
    assert model.classify(10, TWIN) == POSSIBLE
    assert model.classify(10, ID_CONFLICT) == NO_MATCH
    assert model.probability(model.match_weight) == pytest.approx(0.99)


def test_contact_only_and_uncorroborated_pairs_are_not_linked():
    model = Model(TRUE_M, TRUE_U, 0.01, match_probability=0.9)
    names = {"family": 1, "given": 1, "birth_date": 4, "sex": 2}
    contact = {"phone": 3, "street": 4, "locality": 3, "postcode": 3}
    household = ComparisonVector(tuple({**names, **contact}.get(f.name, 0) for f in FIELDS))
    weight, classification, conflict = model.evaluate(household)
    assert weight > model.match_weight and (classification, conflict) == (POSSIBLE, CONTACT_ONLY)
    person = {"family": 4, "given": 4, "birth_date": 4, "sex": 2}
    namesake = ComparisonVector(tuple(person.get(f.name, 0) for f in FIELDS))
    assert model.evaluate(namesake)[1:] == (POSSIBLE, UNCORROBORATED)
    with_phone = ComparisonVector(tuple({**person, "phone": 3}.get(f.name, 0) for f in FIELDS))
    assert model.evaluate(with_phone)[1:] == (MATCH, "")


def test_json_round_trip():
    model = fit(simulate(2_000))
    loaded = Model.from_json(model.to_json())
    assert loaded.m == model.m and loaded.u == model.u and loaded.prior == model.prior
    assert loaded.match_probability == model.match_probability
    vector = simulate(1, seed=3)[0]
    assert loaded.score(vector) == model.score(vector)
    assert loaded.info == model.info


def test_json_rejects_other_shapes():
    with pytest.raises(ValueError):
        Model.from_json('{"format": "something else"}')
    text = Model.initial().to_json().replace('"similar"', '"alike"')
    with pytest.raises(ValueError):
        Model.from_json(text)
    with pytest.raises(ValueError):
        Model(TRUE_M, TRUE_U, 0.5, match_probability=0.5, possible_probability=0.9)
