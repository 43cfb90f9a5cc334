"""Who belongs to which golden record: the edits every MPI change is made of.

Each function plans its writes into a :class:`~hie.mpi.state.State`. A golden record's
membership is its ``refer`` links; it is rebuilt by survivorship (:mod:`hie.mpi.golden`)
whenever a member joins, leaves or changes, and deleted (a tombstone) when its last member
leaves. A member's HieMpiRecord says which golden record it belongs to, and its HieMpiLink
gets a new version (an outbox event) whenever that changes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hie.fhir.search.dates import now, to_fhir_instant
from hie.mpi.compare import FIELDS, compare
from hie.mpi.golden import golden_body, same_content
from hie.mpi.link import Scored
from hie.mpi.model import Model
from hie.mpi.normalize import Record
from hie.mpi.records import (
    LINK_TYPE,
    OPEN,
    RECORD_TYPE,
    REVIEW_TYPE,
    is_golden,
    is_mpi_link,
    mpi_link,
    organization_of,
    record_json,
    ref_id,
    refer_members,
    review_id,
)
from hie.mpi.state import Current, State
from hie.store.query import Cond, Match, Query

#: Most open reviews withdrawn at once when their record or candidate goes away.
REVIEW_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """Why a member's link changes: the HieMpiLink ``action``, ``reason``, ``by`` (client
    id, or ``mpi``) and the match ``score`` (probability) when a score decided it."""

    action: str
    reason: str
    by: str
    score: float | None = None


def new_golden_id() -> str:
    """A fresh golden record id (random, like every server-assigned id)."""
    return str(uuid.uuid4())


def with_link(member: dict, golden_id: str) -> dict:
    """``member`` carrying the MPI's ``seealso`` link to ``golden_id`` (first), its other
    links kept but any earlier MPI link."""
    links = [link for link in member.get("link") or () if not is_mpi_link(link)]
    return {**member, "link": [mpi_link(golden_id), *links]}


async def strip_golden_links(state: State, member: dict) -> dict:
    """``member`` without links a client set to golden records (only the MPI links a
    member record to its golden record)."""
    links = member.get("link")
    if not isinstance(links, list) or not links:
        return member
    targets = [t for link in links if not is_mpi_link(link) and (t := ref_id(link))]
    found = await state.read_many("Patient", targets) if targets else {}
    golden = {t for t, cur in found.items() if cur.body is not None and is_golden(cur.body)}
    kept = [link for link in links if is_mpi_link(link) or ref_id(link) not in golden]
    return member if len(kept) == len(links) else {**member, "link": kept}


async def rebuild(
    state: State,
    golden_id: str,
    *,
    add: Iterable[str] = (),
    remove: Iterable[str] = (),
    bodies: Mapping[str, dict] | None = None,
    base: dict | None = None,
) -> list[str]:
    """Rebuild golden record ``golden_id`` with members ``add``-ed and ``remove``-d
    (``bodies``: member bodies as they will be stored, when not yet in the state; ``base``:
    the golden body to keep links and ``active`` from, default the current one). Returns
    its members; with none left it is deleted, with the open reviews proposing it."""
    current = await state.read("Patient", golden_id)
    previous = base if base is not None else current.body
    gone = set(remove)
    members = [m for m in refer_members(previous or {}) if m not in gone]
    members += [m for m in add if m not in members]
    bodies = dict(bodies or {})
    missing = [m for m in members if m not in bodies]
    if missing:
        found = await state.read_many("Patient", missing)
        bodies.update((i, cur.body) for i, cur in found.items())
    members = [m for m in members if m in bodies]
    if not members:
        if current.body is not None:
            state.put_patient(golden_id, None, current)
            await withdraw_reviews(state, candidate=golden_id)
        return []
    body = golden_body(golden_id, [bodies[m] for m in members], previous)
    if not same_content(body, current.body):
        state.put_patient(golden_id, body, current)
    return members


def record_body(
    patient_id: str, golden_id: str, member: dict, record: Record, keys: list[str], reason: str
) -> dict:
    """The HieMpiRecord body of a member record."""
    return {
        "patient": patient_id,
        "golden": golden_id,
        "organization": organization_of(member),
        "record": record_json(record),
        "keys": keys,
        "flags": list(record.flags),
        "reason": reason,
        "lastUpdated": to_fhir_instant(now()),
    }


def put_record(state: State, patient_id: str, body: dict, current: Current, guard: Query = ()):
    """Plan the HieMpiRecord ``body`` unless only its ``lastUpdated`` would change."""
    if current.body is not None and not guard:
        old = {k: v for k, v in current.body.items() if k != "lastUpdated"}
        if old == {k: v for k, v in body.items() if k != "lastUpdated"}:
            return
    state.put_internal(RECORD_TYPE, patient_id, body, current, guard)


async def put_link(
    state: State, patient_id: str, golden_id: str | None, previous: str | None, event: LinkEvent
) -> None:
    """Plan the next version of the member's HieMpiLink (an outbox event)."""
    current = await state.read(LINK_TYPE, patient_id)
    body = {
        "patient": patient_id,
        "golden": golden_id,
        "previous": previous,
        "action": event.action,
        "reason": event.reason,
        "by": event.by,
        "score": event.score,
        "at": to_fhir_instant(now()),
    }
    state.put_internal(LINK_TYPE, patient_id, body, current)


def review_body(
    record_id: str, record: Record, scored: Scored, candidate: Record, model: Model
) -> dict:
    """An open review of (member ``record_id``, golden ``scored.cluster``), explained
    field by field through the candidate's best member ``candidate``."""
    vector = compare(record, candidate)
    _, parts = model.score(vector)
    labels = vector.labelled()
    return {
        "record": record_id,
        "candidate": str(scored.cluster),
        "candidateRecord": str(scored.record),
        "weight": scored.weight,
        "probability": scored.probability,
        "classification": scored.classification,
        "fields": labels,
        "explanation": [
            {"field": f.name, "level": labels[f.name], "weight": parts[f.name]} for f in FIELDS
        ],
        "prior": parts["prior"],
        "reason": scored.conflict or scored.classification,
        "status": OPEN,
        "decidedBy": None,
        "decided": None,
        "created": to_fhir_instant(now()),
    }


async def propose(state: State, bodies: list[dict]) -> int:
    """Plan open reviews (a pair already decided is left alone); returns how many are new."""
    ids = [review_id(b["record"], b["candidate"]) for b in bodies]
    found = await state.read_many(REVIEW_TYPE, ids)
    added = 0
    for rid, body in zip(ids, bodies, strict=True):
        current = found.get(rid)
        if current is None:
            current = await state.read(REVIEW_TYPE, rid)  # a withdrawn review: its tombstone
            added += 1
        elif current.body.get("status") != OPEN:
            continue
        else:
            body = {**body, "created": current.body.get("created", body["created"])}
            keep = ("created",)
            if {k: v for k, v in current.body.items() if k not in keep} == {
                k: v for k, v in body.items() if k not in keep
            }:
                continue
        state.put_internal(REVIEW_TYPE, rid, body, current)
    return added


async def withdraw_reviews(
    state: State, *, record: str | None = None, candidate: str | None = None, keep=()
) -> None:
    """Delete the open reviews of ``record`` (or proposing ``candidate``) but ``keep``."""
    param, value = ("record", record) if record is not None else ("candidate", candidate)
    query = (
        Match("status", (Cond("text", "eq", OPEN),)),
        Match(param, (Cond("text", "eq", value),)),
    )
    ids = set(await state.ids(REVIEW_TYPE, query, REVIEW_LIMIT))
    for write in state.pending.of_type(REVIEW_TYPE):
        ids.add(write.id)
    ids -= set(keep)
    if not ids:
        return
    found = await state.read_many(REVIEW_TYPE, sorted(ids))
    for rid, current in found.items():
        if current.body.get("status") == OPEN and current.body.get(param) == value:
            state.put_internal(REVIEW_TYPE, rid, None, current)
