"""What the master patient index stores: golden records, member links and internal records.

Golden records are Patients owned by the MPI (``meta.tag`` :data:`GOLDEN_TAG`, ``meta.source``
:data:`MPI_SOURCE`, an :data:`ENTERPRISE_ID_SYSTEM` identifier). A member record (a Patient a
member wrote) carries one ``seealso`` link to its golden record, marked with the extension
:data:`MPI_LINK_EXTENSION` so that it is told apart from ``seealso`` links a member sets
between its own records. The engine's own state lives in internal types (never served):

- :data:`RECORD_TYPE` ``/<member id>``: the member's normalised record, blocking keys and
  golden record; index rows ``key`` (one per blocking key) and ``golden``;
- :data:`LINK_TYPE` ``/<member id>``: the member's current link, a new version per change
  (an outbox event); index row ``golden``;
- :data:`REVIEW_TYPE` ``/<pair id>``: a proposed (member, golden record) pair and the
  steward's decision; index rows ``status``, ``record`` and ``candidate``;
- :data:`MERGE_TYPE` ``/<source id>``: what a merge changed, for unmerge; index row ``target``;
- :data:`MODEL_TYPE` ``/current``: the trained model (:meth:`~hie.mpi.model.Model.to_json`).
"""

from __future__ import annotations

import dataclasses
import hashlib

from hie.access.decision import MEMBER_TAG_SYSTEM
from hie.mpi.normalize import Record
from hie.store.query import IndexRow

MPI_SYSTEM = "http://hie.example/fhir/CodeSystem/mpi"
GOLDEN_TAG = {"system": MPI_SYSTEM, "code": "golden-record"}
ENTERPRISE_ID_SYSTEM = "http://hie.example/fhir/sid/enterprise-id"
MPI_SOURCE = "urn:hie:mpi"

RECORD_TYPE = "HieMpiRecord"
LINK_TYPE = "HieMpiLink"
REVIEW_TYPE = "HieMpiReview"
MERGE_TYPE = "HieMpiMerge"
MODEL_TYPE = "HieMpiModel"
MODEL_ID = "current"
INTERNAL = (RECORD_TYPE, LINK_TYPE, REVIEW_TYPE, MERGE_TYPE, MODEL_TYPE)

#: ``by`` of the links the MPI made itself (any other value names the steward's client).
AUTO = "mpi"
#: HieMpiLink actions.
LINK = "link"
UNLINK = "unlink"
MERGE = "merge"
UNMERGE = "unmerge"
RELINK = "relink"

SEEALSO = "seealso"
REFER = "refer"
REPLACED_BY = "replaced-by"
REPLACES = "replaces"

OPEN = "open"
SAME = "same"
DIFFERENT = "different"
REVIEW_STATUSES = (OPEN, SAME, DIFFERENT)


def _tags(resource: dict) -> list:
    meta = resource.get("meta")
    tags = meta.get("tag") if isinstance(meta, dict) else None
    return tags if isinstance(tags, list) else []


def has_golden_tag(resource: dict) -> bool:
    """Whether ``resource`` carries :data:`GOLDEN_TAG` in ``meta.tag``."""
    return any(
        isinstance(t, dict)
        and t.get("system") == GOLDEN_TAG["system"]
        and t.get("code") == GOLDEN_TAG["code"]
        for t in _tags(resource)
    )


def is_golden(resource: dict) -> bool:
    """Whether ``resource`` is a golden record (a Patient tagged :data:`GOLDEN_TAG`)."""
    return (
        isinstance(resource, dict)
        and resource.get("resourceType") == "Patient"
        and has_golden_tag(resource)
    )


def has_enterprise_id(resource: dict) -> bool:
    """Whether ``resource`` carries an identifier of :data:`ENTERPRISE_ID_SYSTEM`."""
    identifiers = resource.get("identifier")
    return isinstance(identifiers, list) and any(
        isinstance(i, dict) and i.get("system") == ENTERPRISE_ID_SYSTEM for i in identifiers
    )


def patient_ref(patient_id: str) -> str:
    """``Patient/<id>``."""
    return "Patient/" + patient_id


def ref_id(link: object) -> str | None:
    """The Patient id a ``Patient.link`` entry points to, or None."""
    if not isinstance(link, dict):
        return None
    other = link.get("other")
    ref = other.get("reference") if isinstance(other, dict) else None
    if isinstance(ref, str) and ref.startswith("Patient/") and "/" not in ref[8:]:
        return ref[8:] or None
    return None


def golden_of_member(resource: dict) -> str | None:
    """The id of the golden record a member Patient links to (its ``seealso`` link set by
    the MPI), or None when it is not indexed or is itself golden."""
    if not isinstance(resource, dict) or is_golden(resource):
        return None
    links = resource.get("link")
    for link in links if isinstance(links, list) else ():
        if isinstance(link, dict) and link.get("type") == SEEALSO:
            target = ref_id(link)
            if target and is_mpi_link(link):
                return target
    return None


def is_mpi_link(link: object) -> bool:
    """Whether a ``Patient.link`` is the one the MPI sets (marked by its extension)."""
    if not isinstance(link, dict):
        return False
    extensions = link.get("extension")
    return isinstance(extensions, list) and any(
        isinstance(e, dict) and e.get("url") == MPI_LINK_EXTENSION for e in extensions
    )


MPI_LINK_EXTENSION = "http://hie.example/fhir/StructureDefinition/mpi-link"
"""Marks the ``seealso`` link the MPI set on a member record (so a member's own ``seealso``
links to other records are told apart from it)."""


def review_id(record_id: str, golden_id: str) -> str:
    """The stable id of the review of pair (member record, golden record)."""
    return hashlib.sha256(f"{record_id}\x00{golden_id}".encode()).hexdigest()[:32]


def mpi_link(golden_id: str) -> dict:
    """The ``seealso`` link the MPI puts on a member record."""
    return {
        "extension": [{"url": MPI_LINK_EXTENSION, "valueCode": "golden-record"}],
        "other": {"reference": patient_ref(golden_id)},
        "type": SEEALSO,
    }


def refer_members(golden: dict) -> list[str]:
    """The member ids of a golden record (its ``refer`` links), in order."""
    links = golden.get("link")
    return [
        target
        for link in (links if isinstance(links, list) else ())
        if isinstance(link, dict) and link.get("type") == REFER and (target := ref_id(link))
    ]


def link_target(resource: dict, link_type: str) -> str | None:
    """The Patient id of the first link of ``link_type`` (``replaced-by``...), or None."""
    links = resource.get("link")
    for link in links if isinstance(links, list) else ():
        if isinstance(link, dict) and link.get("type") == link_type and (target := ref_id(link)):
            return target
    return None


def organization_of(resource: dict) -> str | None:
    """``Organization/<id>`` of the member tag on a resource, or None."""
    for tag in _tags(resource):
        if isinstance(tag, dict) and tag.get("system") == MEMBER_TAG_SYSTEM:
            code = tag.get("code")
            if isinstance(code, str):
                return "Organization/" + code
    return None


_TUPLES = frozenset(f.name for f in dataclasses.fields(Record) if f.type.startswith("tuple"))
_FIELDS = frozenset(f.name for f in dataclasses.fields(Record))


def record_json(record: Record) -> dict:
    """A normalised :class:`Record` as JSON."""
    return dataclasses.asdict(record)


def record_of(data: dict) -> Record:
    """The :class:`Record` of :func:`record_json` output (unknown keys ignored)."""
    return Record(**{k: tuple(v) if k in _TUPLES else v for k, v in data.items() if k in _FIELDS})


def record_index(body: dict) -> list[IndexRow]:
    """Index rows of a HieMpiRecord body: ``key`` per blocking key, and ``golden``."""
    rows = [IndexRow("key", text=key) for key in body.get("keys", ())]
    if body.get("golden"):
        rows.append(IndexRow("golden", text=body["golden"]))
    return rows


def review_index(body: dict) -> list[IndexRow]:
    """Index rows of a HieMpiReview body: ``status``, ``record`` and ``candidate``."""
    return [
        IndexRow("status", text=body["status"]),
        IndexRow("record", text=body["record"]),
        IndexRow("candidate", text=body["candidate"]),
    ]


def link_index(body: dict) -> list[IndexRow]:
    """Index rows of a HieMpiLink body: ``golden`` (absent once the record is deleted)."""
    return [IndexRow("golden", text=body["golden"])] if body.get("golden") else []


def merge_index(body: dict) -> list[IndexRow]:
    """Index rows of a HieMpiMerge body: ``target`` and ``status``."""
    return [IndexRow("target", text=body["target"]), IndexRow("status", text=body["status"])]


INDEXERS = {
    RECORD_TYPE: record_index,
    REVIEW_TYPE: review_index,
    LINK_TYPE: link_index,
    MERGE_TYPE: merge_index,
}
