"""Comparing two records field by field into discrete agreement levels.

Each field of :data:`FIELDS` compares to a level: 0 is always ``missing`` (a value absent
or untrusted on either side: no evidence either way), 1 ``different``, higher levels agree
more. The levels are what the Fellegi-Sunter model weighs (:mod:`hie.mpi.model`).

A comparison also names a *conflict*, which overrides the score:

- ``id-conflict``: both records carry a national ID number verified by its check digit and
  the numbers differ. A person has one number, and a check digit catches every single-digit
  typo and adjacent transposition: two valid numbers are two people. Never a match, not
  even a possible one (a steward can still merge a person who really has two numbers).

The others forbid an automatic link whatever the score; the pair can only be reviewed:

- ``twin``: same family name and exact birth date, different given names, and not the
  same national ID number (for Han names also the same pattern with family and given
  swapped: a Han family name does not change at marriage). Twins share birth date,
  address, family name and often the parents' phone: evidence that is not independent,
  which Fellegi-Sunter would add up into a confident wrong link. A nearly equal number
  lifts the rule only when neither is a verified resident ID number: twins get
  consecutive GB 11643 sequence digits, so a number failing its check digit one digit
  away from a valid one may be the twin's, mistyped.
- ``name-placeholder``: a record named by a placeholder (新生儿, 王芳之子: a newborn named
  after the mother) and no shared ID number. Newborn twins have nothing else apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from rapidfuzz import fuzz
from rapidfuzz.distance import OSA, JaroWinkler

from hie.mpi.normalize import PLACEHOLDER_NAME, Record


@dataclass(frozen=True, slots=True)
class Field:
    """A compared field and the names of its levels (index = level, 0 = missing)."""

    name: str
    levels: tuple[str, ...]


_NAME_LEVELS = ("missing", "different", "similar", "close", "exact")
FIELDS: tuple[Field, ...] = (
    Field("national_id", ("missing", "different", "close", "exact")),
    Field("family", _NAME_LEVELS),
    Field("given", _NAME_LEVELS),
    Field("birth_date", ("missing", "different", "partial", "close", "exact")),
    Field("sex", ("missing", "different", "exact")),
    Field("phone", ("missing", "different", "close", "exact")),
    Field("street", ("missing", "different", "similar", "close", "exact")),
    Field("locality", ("missing", "different", "close", "exact")),
    Field("postcode", ("missing", "different", "close", "exact")),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)

ID_CONFLICT = "id-conflict"
TWIN = "twin"

NAME_CLOSE = 0.94
NAME_SIMILAR = 0.88
STREET_CLOSE = 85.0
STREET_SIMILAR = 70.0
LOCALITY_CLOSE = 0.90


class ComparisonVector(NamedTuple):
    """The level of each field of :data:`FIELDS`, in order, and the pair's conflict if any."""

    levels: tuple[int, ...]
    conflict: str = ""

    def labelled(self) -> dict[str, str]:
        """Each field's level by name (``{"family": "exact", ...}``)."""
        return {f.name: f.levels[level] for f, level in zip(FIELDS, self.levels, strict=True)}


def _national_id(a: Record, b: Record) -> int:
    """exact: the same trusted number; close: one edit or adjacent transposition apart, one
    side being a number that failed its check digit or length (a typo), or both unverified;
    different: both trusted and not close (two check-digit-valid numbers are never close)."""
    x, y = a.national_id, b.national_id
    if x and y:
        if x == y:
            return 3
        if not (a.id_checked or b.id_checked) and OSA.distance(x, y, score_cutoff=1) <= 1:
            return 2
        return 1
    x, y = x or a.id_suspect, y or b.id_suspect
    if x and y and (a.national_id or b.national_id or x == y):
        return 2 if OSA.distance(x, y, score_cutoff=1) <= 1 else 0
    return 0


def _name(a: str, a_roman: str, b: str, b_roman: str, han: bool) -> int:
    """exact: same folded name (simplified = traditional); close: same pinyin (homophones
    张/章) or Jaro-Winkler >= 0.94 on the romanised names; similar: >= 0.88 (not for two Han
    names: pinyin typos are not how Han names go wrong)."""
    if not a or not b:
        return 0
    if a == b:
        return 4
    if a_roman == b_roman and a_roman:
        return 3
    if han:
        return 1
    similarity = JaroWinkler.similarity(a_roman, b_roman)
    return 3 if similarity >= NAME_CLOSE else 2 if similarity >= NAME_SIMILAR else 1


def _names(a: Record, b: Record) -> tuple[int, int]:
    """(family, given) levels, in the order that agrees best: as given, or family and given
    swapped when both then agree (for Han names, one is enough: a clerk who typed the family
    name into the given name field)."""
    han = a.han and b.han
    family = _name(a.family, a.family_roman, b.family, b.family_roman, han)
    given = _name(a.given, a.given_roman, b.given, b.given_roman, han)
    if family + given >= 7 or not (a.family and a.given and b.family and b.given):
        return family, given
    swapped_family = _name(a.family, a.family_roman, b.given, b.given_roman, han)
    swapped_given = _name(a.given, a.given_roman, b.family, b.family_roman, han)
    agreeing = (max if han else min)(swapped_family, swapped_given)
    if agreeing >= 3 and swapped_family + swapped_given > family + given:
        return swapped_family, swapped_given
    return family, given


def _birth_date(a: str, b: str) -> int:
    """exact; close: one digit or two adjacent digits differ, or day and month swapped;
    partial: two of year, month, day agree, or the less precise date contains the other;
    different."""
    if not a or not b:
        return 0
    if a == b:
        return 4 if len(a) == 8 else 2
    if len(a) != 8 or len(b) != 8:
        n = min(len(a), len(b))
        return 2 if a[:n] == b[:n] else 1
    if OSA.distance(a, b, score_cutoff=1) <= 1 or (
        a[:4] == b[:4] and a[4:6] == b[6:8] and a[6:8] == b[4:6]
    ):
        return 3
    same = (a[:4] == b[:4]) + (a[4:6] == b[4:6]) + (a[6:] == b[6:])
    return 2 if same >= 2 else 1


def _phone(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    """exact: a number in common; close: numbers one typo apart (a digit, or two swapped)."""
    if not a or not b:
        return 0
    best = 1
    for x in a:
        for y in b:
            if x == y:
                return 3
            if len(x) == len(y) and OSA.distance(x, y, score_cutoff=1) <= 1:
                best = 2
    return best


def _street(a: str, b: str) -> int:
    """exact; close: one is the start of the other (建国路88号 and 建国路88号3单元402室) or
    Indel similarity >= 85 %; similar: >= 70 % (order of words ignored)."""
    if not a or not b:
        return 0
    if a == b:
        return 4
    if min(len(a), len(b)) >= 4 and (a.startswith(b) or b.startswith(a)):
        return 3
    similarity = max(fuzz.ratio(a, b), fuzz.token_sort_ratio(a, b))
    return 3 if similarity >= STREET_CLOSE else 2 if similarity >= STREET_SIMILAR else 1


_CITY = frozenset("市州盟")
_COUNTY = frozenset("区县旗")


def _locality(a: str, b: str) -> int:
    """exact; close: Jaro-Winkler >= 0.9; different. A city and a county (北京市, 朝阳区) are
    not compared: missing."""
    if not a or not b:
        return 0
    if a == b:
        return 3
    if (a[-1] in _CITY and b[-1] in _COUNTY) or (a[-1] in _COUNTY and b[-1] in _CITY):
        return 0
    return 2 if JaroWinkler.similarity(a, b) >= LOCALITY_CLOSE else 1


def _postcode(a: str, b: str) -> int:
    if not a or not b:
        return 0
    if a == b:
        return 3
    return 2 if len(a) == len(b) and OSA.distance(a, b, score_cutoff=1) <= 1 else 1


def compare(a: Record, b: Record) -> ComparisonVector:
    """The agreement level of each field of two records, and their conflict if any."""
    family, given = _names(a, b)
    birth = _birth_date(a.birth_date, b.birth_date)
    national_id = _national_id(a, b)
    conflict = ""
    if national_id == 1 and a.id_checked and b.id_checked:
        conflict = ID_CONFLICT
    elif (
        birth == 4
        and (national_id < 2 or (national_id == 2 and (a.id_checked or b.id_checked)))
        and ((family >= 3 and given == 1) or (a.han and b.han and given >= 3 and family == 1))
    ):
        conflict = TWIN
    elif national_id < 3 and (PLACEHOLDER_NAME in a.flags or PLACEHOLDER_NAME in b.flags):
        conflict = PLACEHOLDER_NAME
    levels = (
        national_id,
        family,
        given,
        birth,
        (2 if a.sex == b.sex else 1) if a.sex and b.sex else 0,
        _phone(a.phones, b.phones),
        _street(a.street, b.street),
        _locality(a.locality, b.locality),
        _postcode(a.postcode, b.postcode),
    )
    return ComparisonVector(levels, conflict)
