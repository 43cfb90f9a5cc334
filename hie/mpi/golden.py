"""Survivorship: a golden record's demographics, built from its member records.

A golden record is rebuilt from all its members every time one of them changes, so it never
depends on the order of events. Members are ranked most recently updated first (then by
id); "most recent" breaks every tie below.

- ``identifier``: the enterprise identifier (the golden record's id), then the union of
  the members' identifiers, deduplicated on system and value;
- ``name``: one name, the most common among the members' current names (official, else
  usual, else any but old/maiden/anonymous: the one :func:`~hie.mpi.normalize.normalize`
  matches on), where a Han name whose use is official or usual wins over any other.
  Members whose name was flagged (placeholder such as 新生儿, too long, invalid) do not vote;
- ``gender``, ``birthDate``, ``deceased[x]``, ``maritalStatus``, ``multipleBirth[x]``:
  the value given by the most members. A birth date flagged invalid, absurd or a
  placeholder does not vote, nor does a gender ``unknown`` while another is known;
- ``telecom``: the union, deduplicated on the normalised value (phones in canonical form,
  so ``+86 139-1234-5678`` and ``13912345678`` are one); unusable phone numbers (00000000)
  are left out;
- ``address``: the union, deduplicated on the folded text of its parts; historical
  (``use: old``) addresses are left out;
- ``link``: a ``refer`` link to each member record, and the links the MPI put on the
  golden record itself (``replaces``/``replaced-by`` of a merge), kept as they were.

The golden record is ``active`` unless it was merged away (then the merge sets it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence

import orjson

from hie.fhir.search.text import fold
from hie.mpi.normalize import canonical_phone, normalize
from hie.mpi.records import (
    ENTERPRISE_ID_SYSTEM,
    GOLDEN_TAG,
    MPI_SOURCE,
    REFER,
    patient_ref,
)

HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff]")
_NAME_FLAGS = frozenset({"name-placeholder", "name-too-long", "name-invalid"})
_BIRTH_FLAGS = frozenset({"birthdate-invalid", "birthdate-absurd", "birthdate-placeholder"})
_SKIPPED_NAME_USES = ("old", "anonymous", "maiden")
#: Single-valued fields decided by majority; a choice type ([x]) is one field.
_VOTED = (
    ("gender",),
    ("birthDate",),
    ("deceasedBoolean", "deceasedDateTime"),
    ("maritalStatus",),
    ("multipleBirthBoolean", "multipleBirthInteger"),
)


def _key(value: object) -> bytes:
    return orjson.dumps(value, default=str, option=orjson.OPT_SORT_KEYS)


def _majority(votes: Sequence[tuple[Hashable, object]]) -> object | None:
    """The value voted most often; ties go to the earliest vote (the most recent member)."""
    counts: dict[Hashable, int] = {}
    first: dict[Hashable, object] = {}
    for key, value in votes:
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, value)
    if not counts:
        return None
    best = max(counts.values())
    return next(first[k] for k in counts if counts[k] == best)


def _dicts(value: object) -> list[dict]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _current_name(member: dict) -> dict | None:
    names = [n for n in _dicts(member.get("name")) if n.get("use") not in _SKIPPED_NAME_USES]
    for use in ("official", "usual"):
        for name in names:
            if name.get("use") == use:
                return name
    return names[0] if names else None


def _is_han(name: dict) -> bool:
    parts = [name.get("family"), name.get("text"), *(name.get("given") or ())]
    return any(isinstance(p, str) and HAN.search(p) for p in parts)


def _name_key(name: dict) -> tuple:
    given = tuple(fold(g) for g in name.get("given") or () if isinstance(g, str))
    family = name.get("family") if isinstance(name.get("family"), str) else ""
    text = name.get("text") if isinstance(name.get("text"), str) else ""
    return (fold(family), given) if family or given else ("", (fold(text),))


def _name(members: Sequence[dict], flags: Sequence[frozenset[str]]) -> dict | None:
    names = [
        name
        for member, flagged in zip(members, flags, strict=True)
        if not flagged & _NAME_FLAGS and (name := _current_name(member)) is not None
    ]
    preferred = [n for n in names if n.get("use") in ("official", "usual") and _is_han(n)]
    chosen = _majority([(_name_key(n), n) for n in preferred or names])
    return dict(chosen) if chosen is not None else None


def _voted(members: Sequence[dict], flags: Sequence[frozenset[str]]) -> dict:
    out: dict = {}
    for fields in _VOTED:
        votes = []
        for member, flagged in zip(members, flags, strict=True):
            if fields == ("birthDate",) and flagged & _BIRTH_FLAGS:
                continue
            for field in fields:
                value = member.get(field)
                if value is not None:
                    votes.append((_key([field, value]), (field, value)))
                    break
        if fields == ("gender",) and any(v[1][1] != "unknown" for v in votes):
            votes = [v for v in votes if v[1][1] != "unknown"]
        chosen = _majority(votes)
        if chosen is not None:
            out[chosen[0]] = chosen[1]
    return out


def _union(items: list[dict], key: Callable[[dict], Hashable | None]) -> list[dict]:
    seen: set[Hashable] = set()
    out = []
    for item in items:
        k = key(item)
        if k is None or k in seen:
            continue
        seen.add(k)
        out.append(item)
    return out


def _identifier_key(identifier: dict) -> Hashable | None:
    value = identifier.get("value")
    if not isinstance(value, str) or not value.strip():
        return None
    if identifier.get("system") == ENTERPRISE_ID_SYSTEM:
        return None
    return identifier.get("system"), value.strip()


def _telecom_key(telecom: dict) -> Hashable | None:
    value = telecom.get("value")
    if not isinstance(value, str) or not value.strip():
        return None
    system = telecom.get("system")
    if system in ("phone", "sms", "fax", None):
        phone = canonical_phone(value)
        return ("phone", phone) if phone else None
    return system, fold(value.strip())


def _address_key(address: dict) -> Hashable | None:
    if address.get("use") == "old":
        return None
    parts = [
        *(line for line in address.get("line") or () if isinstance(line, str)),
        *(
            address.get(k)
            for k in ("text", "district", "city", "state", "postalCode", "country")
            if isinstance(address.get(k), str)
        ),
    ]
    folded = tuple(f for f in (fold(p.strip()) for p in parts) if f)
    return folded or None


def ranked(members: Sequence[dict]) -> list[dict]:
    """Members most recently updated first, then by id (the survivorship tie-break)."""

    def updated(member: dict) -> str:
        meta = member.get("meta")
        value = meta.get("lastUpdated") if isinstance(meta, dict) else None
        return value if isinstance(value, str) else ""

    by_id = sorted(members, key=lambda m: str(m.get("id", "")))
    return sorted(by_id, key=updated, reverse=True)


def golden_body(golden_id: str, members: Sequence[dict], previous: dict | None = None) -> dict:
    """The golden record ``golden_id`` of ``members`` (member Patient JSON), keeping the
    merge links and ``active`` of its ``previous`` version (see the module docstring)."""
    members = ranked(members)
    flags = [frozenset(normalize(m).flags) for m in members]
    body: dict = {
        "resourceType": "Patient",
        "id": golden_id,
        "meta": {"tag": [dict(GOLDEN_TAG)], "source": MPI_SOURCE},
        "identifier": [
            {"use": "official", "system": ENTERPRISE_ID_SYSTEM, "value": golden_id},
            *_union([i for m in members for i in _dicts(m.get("identifier"))], _identifier_key),
        ],
        "active": (previous or {}).get("active", True),
    }
    name = _name(members, flags)
    if name is not None:
        body["name"] = [name]
    telecom = _union([t for m in members for t in _dicts(m.get("telecom"))], _telecom_key)
    if telecom:
        body["telecom"] = telecom
    voted = _voted(members, flags)
    body.update((k, voted[k]) for k in ("gender", "birthDate") if k in voted)
    address = _union([a for m in members for a in _dicts(m.get("address"))], _address_key)
    if address:
        body["address"] = address
    body.update((k, v) for k, v in voted.items() if k not in body)
    kept = [link for link in _dicts((previous or {}).get("link")) if link.get("type") != REFER]
    refer = [
        {"other": {"reference": patient_ref(str(m["id"]))}, "type": REFER}
        for m in sorted(members, key=lambda m: str(m.get("id")))
    ]
    if kept or refer:
        body["link"] = refer + kept
    return body


def same_content(a: dict | None, b: dict | None) -> bool:
    """Whether two resource bodies are equal but for ``meta.versionId``/``lastUpdated``."""
    if a is None or b is None:
        return a is b

    def strip(body: dict) -> bytes:
        meta = {
            k: v
            for k, v in (body.get("meta") or {}).items()
            if k not in ("versionId", "lastUpdated")
        }
        return _key({**body, "meta": meta})

    return strip(a) == strip(b)
