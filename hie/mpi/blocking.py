"""Blocking: the few indexed keys through which a record finds its candidates.

A match never scans all patients: each record is stored under :func:`blocking_keys` and a
query reads the records under its own keys, 7 or 8 of them (``kind:value``):

- ``id:`` the characters of the national ID number, sorted: the number itself, and also
  the numbers that differ from it by transposed digits (a resident ID number of the right
  length that failed its check digit gives this key too: that is how a transposition
  shows; it still never agrees as an ID, see :mod:`hie.mpi.compare`);
- ``tel:`` each usable phone number;
- ``ny:`` both name parts as sound keys, in sorted order, and the birth year (a typo in the
  birth date; family and given names swapped);
- ``gy:`` the given name's sound key and the birth year (a mistyped family name and date);
- ``fd:`` the family name's sound key and the full birth date (a changed given name);
- ``np:`` both name parts and the locality, else the postcode (no usable birth date);
- ``ad:`` and ``ap:`` the locality, and the postcode, with the street up to its first number
  (``朝阳区:建国路88`` for 建国路88号, ``newcomb:5`` for "5 hone place"): the household,
  whatever the names.

Name sound keys are the Metaphone code of the romanised name: of its toneless pinyin for a
Han name (homophones 张/章 and the pinyin spelling "Zhang" share one key; 單 is read as
the surname ``shan``), of its letters otherwise. Placeholder and untrusted values (a birth
date of 1900-01-01, phone 00000000, 新生儿, an ID number with letters) are left out by
:func:`~hie.mpi.normalize.normalize`, so they create no key.

**Block cap.** A key shared by more than :data:`BLOCK_CAP` records (a care home's phone, a
common name and birth year in a big population) is not read: its records are not
candidates for that query, and the key is reported as skipped. A record for which nothing
else matched then goes to review rather than becoming a new identity
(:func:`hie.mpi.link.decide`). :class:`BlockIndex` is the in-memory reference of these
semantics; the store behind the API implements the same with a count per key.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable

import jellyfish

from hie.mpi.normalize import Record

_HOUSE = re.compile(r"^[^\d]*\d+")

BLOCK_CAP = 100
"""Most records a key may hold and still be read (at 1M golden records, a query reads at
most a few hundred candidates: well under the 50 ms budget at microseconds a comparison)."""


KEY_FIELDS: dict[str, frozenset[str]] = {
    "id": frozenset({"national_id"}),
    "tel": frozenset({"phone"}),
    "ny": frozenset({"family", "given", "birth_date"}),
    "gy": frozenset({"given", "birth_date"}),
    "fd": frozenset({"family", "birth_date"}),
    "np": frozenset({"family", "given", "locality", "postcode"}),
    "ad": frozenset({"street", "locality"}),
    "ap": frozenset({"street", "postcode"}),
}
"""The compared fields each kind of key is made of: pairs found through the key agree on
them by construction, so they tell nothing about how those fields agree in matches."""


def name_key(roman: str) -> str:
    """The sound key of a romanised name part: its Metaphone code.

    Han names are romanised as pinyin first, so 张, 章 and a clerk's "Zhang" share a key.
    """
    return jellyfish.metaphone(roman)


def blocking_keys(record: Record) -> list[str]:
    """The blocking keys of a record (none from missing, placeholder or untrusted data)."""
    keys = []
    digits = record.national_id or (record.id_suspect if len(record.id_suspect) == 18 else "")
    if len(digits) >= 6:
        keys.append("id:" + "".join(sorted(digits)))
    keys += ["tel:" + phone for phone in record.phones]
    family = name_key(record.family_roman) if record.family_roman else ""
    given = name_key(record.given_roman) if record.given_roman else ""
    names = ":".join(sorted((family, given))) if family and given else ""
    year, date = record.birth_date[:4], record.birth_date
    house = _HOUSE.search(record.street)
    street = house[0] if house else ""
    for kind, first, second in (
        ("ny", names, year),
        ("gy", given, year),
        ("fd", family, date if len(date) == 8 else ""),
        ("np", names, record.locality or record.postcode),
        ("ad", record.locality, street),
        ("ap", record.postcode, street),
    ):
        if first and second:
            keys.append(f"{kind}:{first}:{second}")
    return keys


class BlockIndex:
    """An in-memory index of records by blocking key, with the block cap applied on lookup."""

    def __init__(self, cap: int = BLOCK_CAP) -> None:
        self.cap = cap
        self._blocks: dict[str, list[Hashable]] = {}

    def add(self, record_id: Hashable, keys: Iterable[str]) -> None:
        """Index ``record_id`` under each of ``keys``."""
        for key in keys:
            self._blocks.setdefault(key, []).append(record_id)

    def lookup(self, keys: Iterable[str]) -> tuple[list[Hashable], list[str]]:
        """(candidate record ids, each once, in key order; keys skipped for exceeding the cap)."""
        found: dict[Hashable, None] = {}
        skipped = []
        for key in keys:
            block = self._blocks.get(key, ())
            if len(block) > self.cap:
                skipped.append(key)
            else:
                found.update(dict.fromkeys(block))
        return list(found), skipped
