"""The Fellegi-Sunter model: per-field weights from m and u probabilities, fitted by EM.

For each field and agreement level, ``m`` is the probability of that level for a pair of
records of the same person, ``u`` for a pair of different people. A pair's weight is the
prior log-odds plus, for each field, ``log2(m / u)`` of its level (a missing level adds 0),
so it is the log2-odds that the pair is a match, and each field's part of it can be shown.

A pair is classified by its posterior match probability against two thresholds, and by
rules for the evidence Fellegi-Sunter over-counts because it is not independent
(:meth:`Model.evaluate`):

- ``match`` (automatic link) at a probability of at least :data:`MATCH_PROBABILITY`,
  unless the pair has a conflict: the comparison's own (:mod:`hie.mpi.compare`),
  ``contact-only`` (the person's own fields do not favour a match: only a household's phone
  and address do) or ``uncorroborated`` (no ID number to compare, and the contact fields do
  not favour a match: name, birth date and sex alone are shared by namesakes born the same
  day, more often than independence predicts since given names follow the fashion of a
  birth year).
  Such a pair is only ``possible``, and an ID conflict is ``no-match``;
- ``possible`` (review by a person) from :data:`POSSIBLE_PROBABILITY`;
- ``no-match`` below.

:func:`fit` estimates parameters by expectation-maximisation, without labels;
:func:`hie.mpi.train.train` is the procedure that uses it on a set of records. The result
is stored as JSON (:meth:`Model.to_json`) and loaded without refitting.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Collection, Iterable, Sequence

from hie.mpi.compare import FIELD_NAMES, FIELDS, ID_CONFLICT, ComparisonVector

MATCH = "match"
POSSIBLE = "possible"
NO_MATCH = "no-match"
CONTACT_ONLY = "contact-only"
UNCORROBORATED = "uncorroborated"

MATCH_PROBABILITY = 0.999
"""Default auto-link threshold on the posterior match probability: at most one wrong link
in 1,000 if the model is calibrated, the precision the index must reach."""
POSSIBLE_PROBABILITY = 0.05
"""Default review threshold: a pair at least 1 in 20 likely to be a match goes to a person
(a missed link leaves a duplicate identity: split histories, repeated tests)."""
FLOOR = 1e-6
"""Least m or u probability of a level, so that every weight is finite."""
FORMAT = "hie-mpi-fellegi-sunter/1"
PERSON_FIELDS = frozenset({"national_id", "family", "given", "birth_date", "sex"})
"""Fields that tell people apart within a household; the others are contact data."""
_PERSON = tuple(f.name in PERSON_FIELDS for f in FIELDS)
_ID = FIELD_NAMES.index("national_id")

# Starting values (m, u) per field, levels 1.. in FIELDS order: EM's starting point, and the
# model of an index that has not been fitted yet. Rounded from a fit to the synthetic Chinese
# population (scripts/mpi_population.py), made less extreme.
_START = {
    "national_id": ((0.001, 0.1, 0.899), (0.99998, 0.00001, 0.00001)),
    "family": ((0.01, 0.005, 0.06, 0.925), (0.95, 0.002, 0.008, 0.04)),
    "given": ((0.02, 0.005, 0.15, 0.825), (0.995, 0.001, 0.002, 0.002)),
    "birth_date": ((0.005, 0.005, 0.02, 0.97), (0.99, 0.008, 0.0019, 0.0001)),
    "sex": ((0.01, 0.99), (0.5, 0.5)),
    "phone": ((0.3, 0.05, 0.65), (0.99996, 0.00002, 0.00002)),
    "street": ((0.2, 0.05, 0.3, 0.45), (0.99, 0.0095, 0.0004, 0.0001)),
    "locality": ((0.1, 0.02, 0.88), (0.88, 0.01, 0.11)),
    "postcode": ((0.08, 0.01, 0.91), (0.82, 0.08, 0.1)),
}
START_PRIOR = 1e-5
"""Prior of the starting model: two records of an index of 100,000, where a person has two
registrations on average, are the same person with probability 1 in 100,000."""


def _normalised(counts: Sequence[float]) -> list[float]:
    total = sum(counts)
    if total <= 0:
        raise ValueError("no observations")
    floored = [max(c / total, FLOOR) for c in counts]
    total = sum(floored)
    return [p / total for p in floored]


class Model:
    """Fellegi-Sunter parameters: per field, ``m`` and ``u`` of each level from 1 (level 0,
    missing, weighs nothing); the prior, the probability that two records drawn at random
    are the same person; the two thresholds, as posterior probabilities.
    """

    def __init__(
        self,
        m: dict[str, Sequence[float]],
        u: dict[str, Sequence[float]],
        prior: float,
        *,
        match_probability: float = MATCH_PROBABILITY,
        possible_probability: float = POSSIBLE_PROBABILITY,
        info: dict | None = None,
    ) -> None:
        for field in FIELDS:
            n = len(field.levels) - 1
            if len(m[field.name]) != n or len(u[field.name]) != n:
                raise ValueError(f"{field.name}: expected {n} levels")
        if not (0 < prior < 1 and 0 < possible_probability <= match_probability < 1):
            raise ValueError("prior and thresholds must be probabilities, possible <= match")
        self.m = {f.name: [float(p) for p in m[f.name]] for f in FIELDS}
        self.u = {f.name: [float(p) for p in u[f.name]] for f in FIELDS}
        self.prior = prior
        self.match_probability = match_probability
        self.possible_probability = possible_probability
        self.info = info or {}
        self._weights = [
            (0.0, *(math.log2(m / u) for m, u in zip(self.m[f.name], self.u[f.name], strict=True)))
            for f in FIELDS
        ]
        self.prior_weight = math.log2(prior / (1 - prior))
        self.match_weight = _logit2(match_probability)
        self.possible_weight = _logit2(possible_probability)

    @classmethod
    def initial(cls) -> Model:
        """Plausible parameters before any fit: EM's starting point, and a cold start."""
        m = {field: levels[0] for field, levels in _START.items()}
        return cls(m, {field: levels[1] for field, levels in _START.items()}, START_PRIOR)

    def weight(self, vector: ComparisonVector) -> float:
        """The pair's total weight: log2-odds of a match."""
        total = self.prior_weight
        for weights, level in zip(self._weights, vector.levels, strict=True):
            total += weights[level]
        return total

    def score(self, vector: ComparisonVector) -> tuple[float, dict[str, float]]:
        """(total weight, each field's weight and the prior's): the explanation of a score."""
        parts = {"prior": self.prior_weight}
        parts.update(
            (f.name, w[level])
            for f, w, level in zip(FIELDS, self._weights, vector.levels, strict=True)
        )
        return sum(parts.values()), parts

    def level_weights(self) -> dict[str, dict[str, float]]:
        """The weight of every field level, by name: what a person reviewing a pair is shown."""
        return {
            f.name: dict(zip(f.levels[1:], w[1:], strict=True))
            for f, w in zip(FIELDS, self._weights, strict=True)
        }

    @staticmethod
    def probability(weight: float) -> float:
        """The match probability of a total weight."""
        return 1 / (1 + 2 ** -max(min(weight, 1000.0), -1000.0))

    def evaluate(self, vector: ComparisonVector) -> tuple[float, str, str]:
        """(weight, classification, conflict) of a compared pair.

        Besides the comparison's own conflict: ``contact-only`` when the person fields (ID
        number, names, birth date, sex) do not favour a match on their own, since phone and
        address are shared by a household (twins, spouses, parent and child) and can confirm
        a person but not outvote the person's own data; ``uncorroborated`` when no ID number
        was compared and the contact fields do not favour a match (see the module docstring).
        """
        person = contact = 0.0
        for weights, level, is_person in zip(self._weights, vector.levels, _PERSON, strict=True):
            if is_person:
                person += weights[level]
            else:
                contact += weights[level]
        conflict = vector.conflict
        if not conflict and person <= 0:
            conflict = CONTACT_ONLY
        elif not conflict and contact <= 0 and not vector.levels[_ID]:
            conflict = UNCORROBORATED
        weight = self.prior_weight + person + contact
        return weight, self.classify(weight, conflict), conflict

    def classify(self, weight: float, conflict: str = "") -> str:
        """``match``, ``possible`` or ``no-match`` by the thresholds; an ID conflict is no
        match, any other conflict (:mod:`hie.mpi.compare`) makes a match only possible."""
        if conflict == ID_CONFLICT:
            return NO_MATCH
        if weight >= self.match_weight:
            return POSSIBLE if conflict else MATCH
        return POSSIBLE if weight >= self.possible_weight else NO_MATCH

    def to_json(self) -> str:
        """The parameters as JSON (m and u by field and level name)."""
        return json.dumps(
            {
                "format": FORMAT,
                "prior": self.prior,
                "thresholds": {MATCH: self.match_probability, POSSIBLE: self.possible_probability},
                "fields": {
                    f.name: {
                        level: {"m": m, "u": u}
                        for level, m, u in zip(
                            f.levels[1:], self.m[f.name], self.u[f.name], strict=True
                        )
                    }
                    for f in FIELDS
                },
                "info": self.info,
            },
            ensure_ascii=False,
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Model:
        """A model from :meth:`to_json` output. Raises ValueError when it does not fit FIELDS."""
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} model")
        fields = data["fields"]
        m, u = {}, {}
        for f in FIELDS:
            levels = fields.get(f.name, {})
            if list(levels) != list(f.levels[1:]):
                raise ValueError(f"{f.name}: levels {list(levels)} != {list(f.levels[1:])}")
            m[f.name] = [levels[level]["m"] for level in f.levels[1:]]
            u[f.name] = [levels[level]["u"] for level in f.levels[1:]]
        thresholds = data["thresholds"]
        return cls(
            m,
            u,
            data["prior"],
            match_probability=thresholds[MATCH],
            possible_probability=thresholds[POSSIBLE],
            info=data.get("info", {}),
        )


def _logit2(p: float) -> float:
    return math.log2(p / (1 - p))


def u_from_random(vectors: Iterable[ComparisonVector], start: Model) -> dict[str, list[float]]:
    """``u`` of each field level from comparisons of random record pairs (add-one smoothed);
    a field never observed keeps ``start``'s."""
    counts = [[0] * (len(f.levels) - 1) for f in FIELDS]
    for vector in vectors:
        for field_counts, level in zip(counts, vector.levels, strict=True):
            if level:
                field_counts[level - 1] += 1
    return {
        f.name: _normalised([c + 1 for c in field_counts]) if any(field_counts) else start.u[f.name]
        for f, field_counts in zip(FIELDS, counts, strict=True)
    }


def fit(
    vectors: Iterable[ComparisonVector],
    *,
    start: Model | None = None,
    fixed_u: bool = False,
    fixed_m: Collection[str] = (),
    max_iterations: int = 500,
    tolerance: float = 1e-7,
) -> Model:
    """Estimate a model by EM (unsupervised) from the comparison vectors of record pairs.

    Starts from ``start`` (default :meth:`Model.initial`) and keeps its thresholds, its
    ``u`` if ``fixed_u`` and its ``m`` of the fields in ``fixed_m``. Pairs with an ID
    conflict are known non-matches. The fitted prior is the share of matches among the
    pairs given; ``info`` says how many pairs and iterations.
    """
    start = start or Model.initial()
    patterns = Counter((v.levels, v.conflict == ID_CONFLICT) for v in vectors)
    total = sum(patterns.values())
    if not total:
        raise ValueError("no comparison vectors to fit")
    m, u, prior = dict(start.m), dict(start.u), start.prior
    items = list(patterns.items())
    iterations, change = 0, 1.0
    while iterations < max_iterations and change >= tolerance:
        iterations += 1
        m_counts = [[0.0] * (len(f.levels) - 1) for f in FIELDS]
        u_counts = [[0.0] * (len(f.levels) - 1) for f in FIELDS]
        m_tables = [m[f.name] for f in FIELDS]
        u_tables = [u[f.name] for f in FIELDS]
        matches = 0.0
        for (levels, different_people), count in items:
            pm, pu = (0.0 if different_people else prior), 1 - prior
            for mt, ut, level in zip(m_tables, u_tables, levels, strict=True):
                if level:
                    pm *= mt[level - 1]
                    pu *= ut[level - 1]
            g = pm / (pm + pu)
            matches += g * count
            for mc, uc, level in zip(m_counts, u_counts, levels, strict=True):
                if level:
                    mc[level - 1] += g * count
                    uc[level - 1] += (1 - g) * count
        new_m = {
            f.name: m[f.name] if f.name in fixed_m or sum(c) <= 0 else _normalised(c)
            for f, c in zip(FIELDS, m_counts, strict=True)
        }
        new_u = {
            f.name: u[f.name] if fixed_u or sum(c) <= 0 else _normalised(c)
            for f, c in zip(FIELDS, u_counts, strict=True)
        }
        new_prior = min(max(matches / total, FLOOR), 1 - FLOOR)
        change = max(
            abs(new_prior - prior),
            *(abs(a - b) for f in FIELDS for a, b in zip(new_m[f.name], m[f.name], strict=True)),
            *(abs(a - b) for f in FIELDS for a, b in zip(new_u[f.name], u[f.name], strict=True)),
        )
        m, u, prior = new_m, new_u, new_prior
    return Model(
        m,
        u,
        prior,
        match_probability=start.match_probability,
        possible_probability=start.possible_probability,
        info={"pairs": total, "patterns": len(items), "iterations": iterations},
    )
