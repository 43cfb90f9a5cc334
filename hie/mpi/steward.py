"""The data steward's operations: link, unlink, merge, unmerge, and resolving reviews.

Each plans its writes (a fresh :class:`~hie.mpi.state.State`) and returns them; the caller
commits them with its audit record while holding :meth:`PatientIndex.serial`, and plans
again on a :class:`~hie.store.VersionConflict`. Every link change is a new HieMpiLink
version naming the steward's client (``by``), which automatic decisions never undo.

A **merge** of two golden records moves the source's members to the target; the source
becomes inactive with a ``replaced-by`` link, the target gets a ``replaces`` link. A merge of
two member records of one organisation (duplicates) marks them the same way and puts the
source in the target's golden record. The HieMpiMerge record keeps the source's version as
it was, the members moved and the golden record the source left, so that **unmerge**
restores both: the source as it was (members still where the merge put them go back), the
target without the ``replaces`` link and those members. Nothing is deleted: every change is
a new version.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hie.access.principal import Principal
from hie.fhir.errors import error
from hie.fhir.search.dates import now, to_fhir_instant
from hie.mpi.clusters import (
    LinkEvent,
    new_golden_id,
    put_link,
    put_record,
    rebuild,
    review_body,
    with_link,
)
from hie.mpi.link import score_clusters
from hie.mpi.records import (
    DIFFERENT,
    MERGE,
    MERGE_TYPE,
    OPEN,
    RECORD_TYPE,
    REPLACED_BY,
    REPLACES,
    REVIEW_TYPE,
    SAME,
    UNLINK,
    UNMERGE,
    is_golden,
    organization_of,
    patient_ref,
    record_of,
    ref_id,
    refer_members,
    review_id,
)
from hie.mpi.records import LINK as LINK_ACTION
from hie.mpi.state import Current, State
from hie.store import Write

if TYPE_CHECKING:
    from hie.mpi.index import PatientIndex

MERGED = "merged"
UNMERGED = "unmerged"


def _not_found(patient_id: str, what: str = "Patient"):
    return error(404, "not-found", f"{what}/{patient_id} is not known")


async def _member(state: State, patient_id: str) -> tuple[Current, Current]:
    """(the member Patient, its HieMpiRecord); 404/422 unless an indexed member record."""
    patient = await state.read("Patient", patient_id)
    if patient.body is None:
        raise _not_found(patient_id)
    if is_golden(patient.body):
        raise error(
            422, "business-rule", f"Patient/{patient_id} is a golden record, not a member's"
        )
    record = await state.read(RECORD_TYPE, patient_id)
    if record.body is None:
        raise error(
            422, "business-rule", f"Patient/{patient_id} is not indexed yet (run `hie mpi rematch`)"
        )
    return patient, record


async def _golden(state: State, golden_id: str) -> Current:
    """The active golden record ``golden_id``; 404/422 otherwise."""
    golden = await state.read("Patient", golden_id)
    if golden.body is None:
        raise _not_found(golden_id)
    if not is_golden(golden.body):
        raise error(422, "business-rule", f"Patient/{golden_id} is not a golden record")
    if not golden.body.get("active", True):
        raise error(
            422, "business-rule", f"Patient/{golden_id} was merged into another golden record"
        )
    return golden


async def move(
    state: State,
    patient: Current,
    record: Current,
    target: str,
    event: LinkEvent,
    body: dict | None = None,
) -> None:
    """Put member ``patient`` (as ``body`` when its own content changes too) in golden
    record ``target``: both golden records rebuilt, its link, HieMpiRecord and HieMpiLink."""
    pid = record.body["patient"]
    before = record.body.get("golden")
    new = with_link(body if body is not None else patient.body, target)
    if new != patient.body:
        state.put_patient(pid, new, patient)
    if before and before != target:
        await rebuild(state, before, remove=[pid])
    await rebuild(state, target, add=[pid], bodies={pid: new})
    stamp = to_fhir_instant(now())
    put_record(state, pid, {**record.body, "golden": target, "lastUpdated": stamp}, record)
    await put_link(state, pid, target, before, event)


async def decide_review(
    index: PatientIndex,
    state: State,
    principal: Principal,
    record_id: str,
    golden_id: str,
    status: str,
) -> None:
    """Record the steward's decision on the pair (``record_id``, ``golden_id``), creating
    the review (scored against that golden record's members) if there was none."""
    rid = review_id(record_id, golden_id)
    current = await state.read(REVIEW_TYPE, rid)
    body = current.body
    if body is None:
        body = await _scored_review(index, state, record_id, golden_id)
    decided = {
        "status": status,
        "decidedBy": principal.client_id,
        "decided": to_fhir_instant(now()),
    }
    state.put_internal(REVIEW_TYPE, rid, {**body, **decided}, current)


async def _scored_review(index: PatientIndex, state: State, record_id: str, golden_id: str) -> dict:
    record = await state.read(RECORD_TYPE, record_id)
    golden = await state.read("Patient", golden_id)
    members = [m for m in refer_members(golden.body or {}) if m != record_id]
    found = await state.read_many(RECORD_TYPE, members) if members else {}
    others = {i: record_of(cur.body["record"]) for i, cur in found.items()}
    own = record_of(record.body["record"]) if record.body else None
    if own is not None and others:
        triples = [(golden_id, i, r) for i, r in others.items()]
        scored = score_clusters(own, triples, index.model)
        if scored:
            return review_body(record_id, own, scored[0], others[scored[0].record], index.model)
    return {
        "record": record_id,
        "candidate": golden_id,
        "candidateRecord": None,
        "weight": None,
        "probability": None,
        "classification": None,
        "fields": {},
        "explanation": [],
        "reason": "steward",
        "status": OPEN,
        "created": to_fhir_instant(now()),
    }


# ---------------------------------------------------------------------- link / unlink
async def link(
    index: PatientIndex, principal: Principal, record_id: str, golden_id: str, reason: str
) -> list[Write]:
    """See :meth:`PatientIndex.plan_link`."""
    state = index.state()
    patient, record = await _member(state, record_id)
    await _golden(state, golden_id)
    await move(
        state, patient, record, golden_id, LinkEvent(LINK_ACTION, reason, principal.client_id)
    )
    await decide_review(index, state, principal, record_id, golden_id, SAME)
    return state.pending.writes()


async def unlink(
    index: PatientIndex, principal: Principal, record_id: str, reason: str
) -> list[Write]:
    """See :meth:`PatientIndex.plan_unlink`."""
    state = index.state()
    patient, record = await _member(state, record_id)
    before = record.body.get("golden")
    golden = await state.read("Patient", before) if before else None
    if golden is None or golden.body is None or refer_members(golden.body) == [record_id]:
        raise error(409, "business-rule", f"Patient/{record_id} is alone in its golden record")
    await decide_review(index, state, principal, record_id, before, DIFFERENT)
    event = LinkEvent(UNLINK, reason, principal.client_id)
    await move(state, patient, record, new_golden_id(), event)
    return state.pending.writes()


# ---------------------------------------------------------------------- reviews
async def resolve(
    index: PatientIndex, principal: Principal, rid: str, decision: str
) -> list[Write]:
    """See :meth:`PatientIndex.plan_resolve`."""
    if decision not in (SAME, DIFFERENT):
        raise error(400, "value", f"A review is resolved as {SAME!r} or {DIFFERENT!r}")
    state = index.state()
    review = await state.read(REVIEW_TYPE, rid)
    if review.body is None:
        raise _not_found(rid, "review")
    record_id = review.body["record"]
    patient, record = await _member(state, record_id)
    candidate = await index.surviving(state, review.body["candidate"])
    current = record.body.get("golden")
    reason = f"review {rid}"
    if decision == SAME:
        if candidate is None:
            raise error(409, "business-rule", "The proposed golden record no longer exists")
        golden = await state.read("Patient", current) if current else None
        others = [m for m in refer_members((golden.body or {}) if golden else {}) if m != record_id]
        if current and current != candidate and others:
            # The record's golden record holds others the MPI linked to it as the same
            # person: the steward's decision makes the two golden records one person.
            await merge(index, principal, current, candidate, state=state)
        else:
            event = LinkEvent(LINK_ACTION, reason, principal.client_id)
            await move(state, patient, record, candidate, event)
    elif candidate is not None and candidate == current:
        golden = await state.read("Patient", current)
        if refer_members(golden.body or {}) != [record_id]:
            event = LinkEvent(UNLINK, reason, principal.client_id)
            await move(state, patient, record, new_golden_id(), event)
    decided = {
        "status": decision,
        "decidedBy": principal.client_id,
        "decided": to_fhir_instant(now()),
    }
    review = await state.read(REVIEW_TYPE, rid)
    state.put_internal(REVIEW_TYPE, rid, {**review.body, **decided}, review)
    return state.pending.writes()


# ---------------------------------------------------------------------- merge
def _links(body: dict, drop: str | None = None) -> list[dict]:
    """``body``'s links but the ``replaces``/``replaced-by`` ones to ``drop``."""
    return [
        link
        for link in body.get("link") or ()
        if not (link.get("type") in (REPLACES, REPLACED_BY) and ref_id(link) == drop)
    ]


def _merge_link(kind: str, other: str) -> dict:
    return {"other": {"reference": patient_ref(other)}, "type": kind}


async def merge(
    index: PatientIndex,
    principal: Principal,
    source_id: str,
    target_id: str,
    *,
    state: State | None = None,
) -> list[Write]:
    """See :meth:`PatientIndex.plan_merge`; ``state``: plan within it (a review decision
    that merges)."""
    if source_id == target_id:
        raise error(422, "business-rule", "A record cannot be merged into itself")
    state = state or index.state()
    source = await state.read("Patient", source_id)
    target = await state.read("Patient", target_id)
    for pid, current in ((source_id, source), (target_id, target)):
        if current.body is None:
            raise _not_found(pid)
    merged = await state.read(MERGE_TYPE, source_id)
    if (merged.body or {}).get("status") == MERGED or source.body.get("active") is False:
        raise error(409, "business-rule", f"Patient/{source_id} is merged already")
    golden = is_golden(source.body), is_golden(target.body)
    by = principal.client_id
    event = LinkEvent(MERGE, f"Patient/{source_id} merged into Patient/{target_id}", by)
    record = {
        "source": source_id,
        "target": target_id,
        "status": MERGED,
        "by": by,
        "at": to_fhir_instant(now()),
        "sourceBefore": source.body,
        "targetBefore": target.body,
    }
    if golden == (True, True):
        await _golden(state, target_id)
        moved = refer_members(source.body)
        await _merge_golden(state, source, target, source_id, target_id, moved, event)
        record.update(kind="golden", moved=moved)
    elif golden == (False, False):
        if organization_of(source.body) != organization_of(target.body):
            raise error(
                422, "business-rule", "Member records are merged only within one organisation"
            )
        _, source_record = await _member(state, source_id)
        _, target_record = await _member(state, target_id)
        record.update(kind="member", sourceGolden=source_record.body.get("golden"))
        body = {
            **source.body,
            "active": False,
            "link": [*_links(source.body, target_id), _merge_link(REPLACED_BY, target_id)],
        }
        await move(state, source, source_record, target_record.body["golden"], event, body)
        target = await state.read("Patient", target_id)
        links = [*_links(target.body, source_id), _merge_link(REPLACES, source_id)]
        state.put_patient(target_id, {**target.body, "link": links}, target)
    else:
        raise error(
            422,
            "business-rule",
            "Merge two golden records, or two member records of one organisation",
        )
    state.put_internal(MERGE_TYPE, source_id, record, merged)
    return state.pending.writes()


async def _merge_golden(
    state: State,
    source: Current,
    target: Current,
    source_id: str,
    target_id: str,
    moved: list[str],
    event: LinkEvent,
) -> None:
    patients = await state.read_many("Patient", moved)
    records = await state.read_many(RECORD_TYPE, moved)
    present = [pid for pid in moved if pid in patients and pid in records]
    bodies = await _relink(state, present, patients, records, target_id, source_id, event)
    base = {
        **target.body,
        "link": [*_links(target.body, source_id), _merge_link(REPLACES, source_id)],
    }
    await rebuild(state, target_id, add=list(bodies), bodies=bodies, base=base)
    retired = {
        **source.body,
        "active": False,
        "link": [
            *(link for link in _links(source.body, target_id) if link.get("type") != "refer"),
            _merge_link(REPLACED_BY, target_id),
        ],
    }
    state.put_patient(source_id, retired, source)


async def unmerge(index: PatientIndex, principal: Principal, source_id: str) -> list[Write]:
    """See :meth:`PatientIndex.plan_unmerge`."""
    state = index.state()
    merged = await state.read(MERGE_TYPE, source_id)
    if merged.body is None or merged.body.get("status") != MERGED:
        raise error(404, "not-found", f"Patient/{source_id} is not merged")
    target_id = merged.body["target"]
    event = LinkEvent(
        UNMERGE, f"Patient/{source_id} unmerged from Patient/{target_id}", principal.client_id
    )
    source = await state.read("Patient", source_id)
    target = await state.read("Patient", target_id)
    if source.body is None or target.body is None:
        raise error(409, "business-rule", "A record of the merge no longer exists")
    before = merged.body["sourceBefore"]
    if merged.body["kind"] == "golden":
        await _unmerge_golden(state, merged.body, source, target, event)
    else:
        target_links = _links(target.body, source_id)
        state.put_patient(target_id, {**target.body, "link": target_links}, target)
        _, record = await _member(state, source_id)
        back = await index.surviving(state, merged.body.get("sourceGolden") or "")
        target_record = await state.read(RECORD_TYPE, target_id)
        here = record.body.get("golden")
        if here != (target_record.body or {}).get("golden"):
            back = here  # it moved since the merge: it stays where it is
        restored = {**before, "meta": source.body.get("meta", before.get("meta"))}
        await move(state, source, record, back or new_golden_id(), event, restored)
    done = {
        "status": UNMERGED,
        "unmergedBy": principal.client_id,
        "unmerged": to_fhir_instant(now()),
    }
    state.put_internal(MERGE_TYPE, source_id, {**merged.body, **done}, merged)
    return state.pending.writes()


async def _unmerge_golden(
    state: State, merged: dict, source: Current, target: Current, event: LinkEvent
) -> None:
    source_id, target_id = merged["source"], merged["target"]
    records = await state.read_many(RECORD_TYPE, merged["moved"])
    back = [pid for pid, cur in records.items() if cur.body.get("golden") == target_id]
    if not back:
        raise error(
            409, "business-rule", f"None of the merged members is in Patient/{target_id} any more"
        )
    patients = await state.read_many("Patient", back)
    bodies = await _relink(state, back, patients, records, source_id, target_id, event)
    before = merged["sourceBefore"]
    base = {
        **before,
        "link": [link for link in before.get("link") or () if link.get("type") != "refer"],
    }
    await rebuild(state, source_id, add=back, bodies=bodies, base=base)
    target_base = {**target.body, "link": _links(target.body, source_id)}
    await rebuild(state, target_id, remove=back, base=target_base)


async def _relink(
    state: State,
    pids: list[str],
    patients: dict[str, Current],
    records: dict[str, Current],
    golden_id: str,
    previous: str,
    event: LinkEvent,
) -> dict[str, dict]:
    """Point member records ``pids`` at golden record ``golden_id`` (from ``previous``):
    their link, HieMpiRecord and HieMpiLink; returns their new bodies."""
    bodies = {}
    for pid in pids:
        body = with_link(patients[pid].body, golden_id)
        state.put_patient(pid, body, patients[pid])
        bodies[pid] = body
        stamp = to_fhir_instant(now())
        put_record(
            state,
            pid,
            {**records[pid].body, "golden": golden_id, "lastUpdated": stamp},
            records[pid],
        )
        await put_link(state, pid, golden_id, previous, event)
    return bodies
