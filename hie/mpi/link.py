"""Deciding what to do with an incoming record: link it, review it, or make a new identity.

Candidates are the records that blocking found, each with the cluster (enterprise identity,
golden record) it belongs to. Every candidate is scored; a cluster scores as its best
member (by classification, then weight), and a comparison conflict with *any* of its found
members (a different valid ID number, the twin pattern, a placeholder name) keeps it from an
automatic link. The record is linked to the best cluster only, never to several: identities
are not merged transitively. When several clusters match, the record joins the best and the
decision says ``several-matches``: those identities are probably one person, which a person
confirms before they are merged.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from hie.mpi.compare import ID_CONFLICT, compare
from hie.mpi.model import MATCH, NO_MATCH, POSSIBLE, Model
from hie.mpi.normalize import Record

LINK = "link"
REVIEW = "review"
NEW = "new"
MEMBER_ID_CONFLICT = "member-id-conflict"
_CLASSES = (NO_MATCH, POSSIBLE, MATCH)
_RANK = {c: i for i, c in enumerate(_CLASSES)}


@dataclass(frozen=True, slots=True)
class Scored:
    """A candidate cluster scored through its best member record."""

    cluster: Hashable
    record: Hashable
    weight: float
    probability: float
    classification: str
    conflict: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """``link`` to ``cluster``, ``review`` the ``candidates``, or ``new`` identity; and why.

    ``candidates`` are the clusters classified match or possible, best first.
    """

    action: str
    cluster: Hashable | None
    candidates: tuple[Scored, ...]
    reason: str


def score_clusters(
    record: Record, candidates: Iterable[tuple[Hashable, Hashable, Record]], model: Model
) -> list[Scored]:
    """Each candidate cluster scored by its best member, best first.

    ``candidates`` are (cluster id, record id, record) triples. A member's comparison
    conflict (:mod:`hie.mpi.compare`) caps its whole cluster at possible; a member with an
    ID conflict is no evidence for its cluster, and a cluster of such members only is left
    out.
    """
    best: dict[Hashable, tuple[int, float, Hashable, str]] = {}
    conflicts: dict[Hashable, str] = {}
    for cluster, record_id, other in candidates:
        vector = compare(record, other)
        if vector.conflict:
            conflicts.setdefault(cluster, vector.conflict)
            if vector.conflict == ID_CONFLICT:
                continue
        weight, classification, conflict = model.evaluate(vector)
        ranked = (_RANK[classification], weight, record_id, conflict)
        if cluster not in best or ranked[:2] > best[cluster][:2]:
            best[cluster] = ranked
    scored = []
    for cluster, (rank, weight, record_id, conflict) in best.items():
        classification = _CLASSES[rank]
        member_conflict = conflicts.get(cluster, "")
        if member_conflict and not conflict:
            conflict = MEMBER_ID_CONFLICT if member_conflict == ID_CONFLICT else member_conflict
            classification = POSSIBLE if classification == MATCH else classification
        scored.append(
            Scored(cluster, record_id, weight, model.probability(weight), classification, conflict)
        )
    return sorted(scored, key=lambda s: (-_RANK[s.classification], -s.weight))


def decide(
    record: Record,
    candidates: Iterable[tuple[Hashable, Hashable, Record]],
    model: Model,
    *,
    skipped_keys: Iterable[str] = (),
) -> Decision:
    """What to do with ``record`` given its blocked candidates (see the module docstring).

    ``skipped_keys`` are blocking keys that were not read for exceeding the block cap: a
    record with no candidate that had some is sent to review, not made a new identity.
    """
    if not record.identifying:
        return Decision(NEW, None, (), "no-identifying-data")
    scored = [s for s in score_clusters(record, candidates, model) if s.classification != NO_MATCH]
    matches = [s for s in scored if s.classification == MATCH]
    if matches:
        reason = MATCH if len(matches) == 1 else "several-matches"
        return Decision(LINK, matches[0].cluster, tuple(scored), reason)
    if scored:
        return Decision(REVIEW, None, tuple(scored), scored[0].conflict or POSSIBLE)
    skipped = list(skipped_keys)
    if skipped:
        return Decision(REVIEW, None, (), "blocks-over-cap:" + ",".join(skipped))
    return Decision(NEW, None, (), "no-candidate")
