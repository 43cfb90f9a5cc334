"""The master patient index (主索引) core: one person, one enterprise identity.

A pipeline in four steps, each a module:

1. :func:`normalize` a FHIR Patient into a :class:`Record` (names folded to simplified Han
   and pinyin, GB 11643 ID numbers checked, phones and addresses canonical, untrusted or
   placeholder data flagged and left out);
2. :func:`blocking_keys` index the record and find candidates without scanning everyone;
3. :func:`compare` a record with each candidate into per-field agreement levels, weighed by
   a Fellegi-Sunter :class:`Model` (m/u estimated without labels by :func:`train`, which
   runs EM with :func:`fit`; stored as JSON);
4. :func:`decide`: link to the one matching identity, send uncertain pairs to review, or
   start a new identity. A wrong link mixes two people's records and is worse than a
   missed one: two valid ID numbers never link; the twin pattern, a placeholder name, a
   household's shared phone and address alone, or name and birth date with nothing to
   corroborate them go to review at most.

Behind the API, :class:`PatientIndex` (:mod:`hie.mpi.index`) runs this on every Patient a
member writes: golden records (:mod:`hie.mpi.golden`, survivorship), links and reviews are
stored as the internal records of :mod:`hie.mpi.records`, and a data steward's operations
are in :mod:`hie.mpi.steward`.
"""

from hie.mpi.blocking import BLOCK_CAP, BlockIndex, blocking_keys
from hie.mpi.compare import FIELDS, ComparisonVector, compare
from hie.mpi.index import MatchResult, PatientIndex, Person, RematchReport
from hie.mpi.link import LINK, NEW, REVIEW, Decision, Scored, decide, score_clusters
from hie.mpi.model import MATCH, NO_MATCH, POSSIBLE, Model, fit
from hie.mpi.normalize import (
    ID_SYSTEMS,
    RESIDENT_ID_SYSTEM,
    Record,
    canonical_phone,
    gb11643_check_digit,
    is_valid_resident_id,
    normalize,
    parse_resident_id,
)
from hie.mpi.records import ENTERPRISE_ID_SYSTEM, GOLDEN_TAG, golden_of_member, is_golden
from hie.mpi.state import Pending
from hie.mpi.train import train

__all__ = [
    "BLOCK_CAP",
    "ENTERPRISE_ID_SYSTEM",
    "FIELDS",
    "GOLDEN_TAG",
    "ID_SYSTEMS",
    "LINK",
    "MATCH",
    "NEW",
    "NO_MATCH",
    "POSSIBLE",
    "RESIDENT_ID_SYSTEM",
    "REVIEW",
    "BlockIndex",
    "ComparisonVector",
    "Decision",
    "MatchResult",
    "Model",
    "PatientIndex",
    "Pending",
    "Person",
    "Record",
    "RematchReport",
    "Scored",
    "blocking_keys",
    "canonical_phone",
    "compare",
    "decide",
    "fit",
    "gb11643_check_digit",
    "golden_of_member",
    "is_golden",
    "is_valid_resident_id",
    "normalize",
    "parse_resident_id",
    "score_clusters",
    "train",
]
