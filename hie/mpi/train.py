"""Fitting the model to a population of records, without labels.

The procedure (the one Splink uses, for the same reasons):

1. ``u``, how often each field level occurs between different people, from comparisons of
   random record pairs: almost all of them are different people.
2. ``m``, how often each level occurs between records of the same person, by EM over the
   candidate pairs of each kind of blocking key separately, ``u`` fixed. The fields a key
   is made of agree by construction in the pairs it finds (:data:`KEY_FIELDS`): they are
   left out of that fit, as if missing. A field's ``m`` is the mean of its estimates.
   Fitting all candidate pairs at once instead lets EM take households (same address,
   same phone, different people) for matches.
3. The prior, the probability that two records drawn at random are the same person: EM
   with ``m`` and ``u`` fixed gives the share of matches among all candidate pairs, scaled
   to all pairs of records. Classifying by the posterior under this prior does not depend
   on which pairs blocking happens to propose.

The integration runs this offline, on the stored records or a large sample of them, and
stores the result as JSON (:meth:`~hie.mpi.model.Model.to_json`); matching only loads it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from itertools import combinations

from hie.mpi.blocking import BLOCK_CAP, KEY_FIELDS, blocking_keys
from hie.mpi.compare import FIELD_NAMES, FIELDS, ComparisonVector, compare
from hie.mpi.model import FLOOR, Model, fit, u_from_random
from hie.mpi.normalize import Record

RANDOM_PAIRS = 200_000
CANDIDATE_PRIOR = 0.1
"""EM's starting share of matches among candidate pairs (blocking keeps it far from 0)."""
MIN_PAIRS = 50
"""Fewest candidate pairs a kind of key must find for EM to estimate ``m`` from them."""


def candidate_pairs(records: Sequence[Record], cap: int = BLOCK_CAP) -> dict[str, set[tuple]]:
    """Pairs of indexes into ``records`` that share a blocking key, by kind of key.

    Blocks over ``cap`` are left out, as a query would skip them.
    """
    blocks: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        for key in blocking_keys(record):
            blocks[key].append(i)
    pairs: dict[str, set[tuple]] = defaultdict(set)
    for key, members in blocks.items():
        if 1 < len(members) <= cap:
            pairs[key.split(":", 1)[0]].update(combinations(members, 2))
    return pairs


def train(
    records: Sequence[Record],
    *,
    random_pairs: int = RANDOM_PAIRS,
    seed: int = 0,
    start: Model | None = None,
) -> Model:
    """A model fitted to ``records`` by the procedure above; thresholds from ``start``."""
    start = start or Model.initial()
    n = len(records)
    if n < 2:
        raise ValueError("at least two records are needed")
    rng = random.Random(seed)
    randoms = (
        compare(records[i], records[j])
        for i, j in (rng.sample(range(n), 2) for _ in range(random_pairs))
    )
    base = Model(
        start.m,
        u_from_random(randoms, start),
        CANDIDATE_PRIOR,
        match_probability=start.match_probability,
        possible_probability=start.possible_probability,
    )
    vectors: dict[tuple, ComparisonVector] = {}
    estimates: dict[str, list[list[float]]] = defaultdict(list)
    sessions = {}
    for kind, pairs in sorted(candidate_pairs(records).items()):
        sessions[kind] = len(pairs)
        if len(pairs) < MIN_PAIRS:
            continue
        blocked = [f in KEY_FIELDS[kind] for f in FIELD_NAMES]
        session = []
        for pair in pairs:
            if pair not in vectors:
                vectors[pair] = compare(records[pair[0]], records[pair[1]])
            vector = vectors[pair]
            levels = tuple(
                0 if b else level for b, level in zip(blocked, vector.levels, strict=True)
            )
            session.append(ComparisonVector(levels, vector.conflict))
        fitted = fit(session, start=base, fixed_u=True)
        for i, field in enumerate(FIELD_NAMES):
            if any(v.levels[i] for v in session):
                estimates[field].append(fitted.m[field])
    if not vectors:
        raise ValueError(f"blocking found too few candidate pairs to fit: {sessions}")
    m = {
        f.name: [sum(ps) / len(ps) for ps in zip(*estimates[f.name], strict=True)]
        if estimates[f.name]
        else start.m[f.name]
        for f in FIELDS
    }
    shares = fit(
        vectors.values(),
        start=Model(m, base.u, CANDIDATE_PRIOR),
        fixed_u=True,
        fixed_m=FIELD_NAMES,
    )
    total_pairs = n * (n - 1) // 2
    return Model(
        m,
        base.u,
        min(max(shares.prior * len(vectors) / total_pairs, FLOOR * FLOOR), 1 - FLOOR),
        match_probability=start.match_probability,
        possible_probability=start.possible_probability,
        info={
            "records": n,
            "random_pairs": random_pairs,
            "candidate_pairs": len(vectors),
            "candidate_pairs_by_key": sessions,
            "matches_among_candidates": shares.prior,
        },
    )
