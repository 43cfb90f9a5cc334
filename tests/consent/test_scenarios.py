"""The consent engine's decisions as a table: each row is a default policy, the Consents
recorded, who asks and why, and exactly which resources of the fixed world
(:mod:`tests.consent.world`) that caller sees, through search, direct reads (403 for the
others) and the person's ``$everything``.

Compact Consent specs: ``by`` (member writing it, default b), ``patient`` (world key,
default PB), ``status``, ``scope``, ``policy`` (policyRule code; by default OPTIN/OPTOUT
after the root type) and ``provision``: ``type``, ``actor`` (references), ``action``,
``purpose``, ``class``, ``label`` (HIV, PSY, R), ``period`` / ``dataPeriod`` (start,
end), ``data`` ((meaning, world key or reference), ...) and nested ``provision`` lists.

World (writer): PA (A) and PB (B) are one person; Q (C) another. oa1 (A), oa2 (A, HIV),
ob1 (B, Confidentiality N: not sensitive), ob2 (B, PSY), ob3 (B, PSY + R), ox (B, about
Q with PB as performer: concerns both people), oq1 (C, about Q), cb (B, Condition of
PB), ea (A, Encounter of PA).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.consent.world import PERSON, WORLD

OPT_OUT, OPT_IN = "opt-out", "opt-in"


@dataclass(frozen=True)
class Row:
    name: str
    default: str
    consents: tuple[dict, ...]
    accessor: str
    purpose: str | None
    visible: str  # the world keys the accessor sees, space separated

    def __str__(self) -> str:
        return self.name


#: Everything not sensitively labelled.
PLAIN = "PA PB Q oa1 ob1 ox oq1 cb ea"
OWN_A = "PA oa1 oa2 ea"
OWN_B = "PB ob1 ob2 ob3 ox cb"
OWN_C = "Q oq1"
DENY_ALL = {"provision": {"type": "deny"}}
PERMIT_ALL = {"provision": {"type": "permit"}}

ROWS = [
    # ---------------------------------------------------------------- default policy
    Row("opt-out treatment: others' non-sensitive data", OPT_OUT, (), "c", None, PLAIN),
    Row("opt-out treatment: all own writes", OPT_OUT, (), "a", None, f"{PLAIN} oa2"),
    Row("opt-out explicit TREAT header", OPT_OUT, (), "c", "TREAT", PLAIN),
    Row("opt-out coordination of care is treatment", OPT_OUT, (), "c", "COC", PLAIN),
    Row("opt-out research: only own", OPT_OUT, (), "a", "HRESCH", OWN_A),
    Row("opt-out payment: only own", OPT_OUT, (), "b", "HPAYMT", OWN_B),
    Row("opt-in without consent: only own", OPT_IN, (), "c", None, OWN_C),
    Row("opt-in without consent: writer's own", OPT_IN, (), "b", None, OWN_B),
    # ---------------------------------------------------------------- permits
    Row(
        "opt-in + permit-all: person's plain data, not Q's (ox concerns Q too)",
        OPT_IN,
        (PERMIT_ALL,),
        "c",
        None,
        "PA PB Q oa1 ob1 oq1 cb ea",
    ),
    Row(
        "opt-in + policyRule OPTIN without provision",
        OPT_IN,
        ({"policy": "OPTIN"},),
        "c",
        None,
        "PA PB Q oa1 ob1 oq1 cb ea",
    ),
    Row(
        "opt-in + permit-all recorded at A",
        OPT_IN,
        ({**PERMIT_ALL, "by": "a", "patient": "PA"},),
        "b",
        None,
        "PA PB oa1 ob1 ob2 ob3 ox cb ea",
    ),
    Row(
        "opt-out + permit-all releases for research",
        OPT_OUT,
        (PERMIT_ALL,),
        "a",
        "HRESCH",
        "PA oa1 oa2 ea PB ob1 cb",
    ),
    Row(
        "permit without label does not release HIV/PSY/R",
        OPT_OUT,
        ({"provision": {"type": "permit", "actor": ["Organization/c"]}},),
        "c",
        None,
        PLAIN,
    ),
    Row(
        "permit HIV label for org C",
        OPT_OUT,
        (
            {
                "by": "a",
                "patient": "PA",
                "provision": {"type": "permit", "actor": ["Organization/c"], "label": ["HIV"]},
            },
        ),
        "c",
        None,
        f"{PLAIN} oa2",
    ),
    Row(
        "permit HIV label for org C: not for org B",
        OPT_OUT,
        (
            {
                "by": "a",
                "patient": "PA",
                "provision": {"type": "permit", "actor": ["Organization/c"], "label": ["HIV"]},
            },
        ),
        "b",
        None,
        f"{PLAIN} ob2 ob3",
    ),
    Row(
        "permit PSY: not a resource also labelled R",
        OPT_OUT,
        ({"provision": {"type": "permit", "actor": ["Organization/c"], "label": ["PSY"]}},),
        "c",
        None,
        f"{PLAIN} ob2",
    ),
    Row(
        "permit PSY with nested permit R releases both labels",
        OPT_OUT,
        (
            {
                "provision": {
                    "type": "permit",
                    "label": ["PSY"],
                    "provision": [{"type": "permit", "label": ["R"]}],
                }
            },
        ),
        "c",
        None,
        f"{PLAIN} ob2 ob3",
    ),
    Row(
        "purpose-limited permit, matching purpose",
        OPT_IN,
        ({"provision": {"type": "permit", "purpose": ["HRESCH"]}},),
        "c",
        "HRESCH",
        "PA PB Q oa1 ob1 oq1 cb ea",
    ),
    Row(
        "purpose-limited permit, other purpose",
        OPT_IN,
        ({"provision": {"type": "permit", "purpose": ["HRESCH"]}},),
        "c",
        "TREAT",
        OWN_C,
    ),
    Row(
        "permit for action collect is no read permit",
        OPT_IN,
        ({"provision": {"type": "permit", "action": ["collect"]}},),
        "c",
        None,
        OWN_C,
    ),
    Row(
        "permit for action access is a read permit",
        OPT_IN,
        ({"provision": {"type": "permit", "action": ["access"]}},),
        "c",
        None,
        "PA PB Q oa1 ob1 oq1 cb ea",
    ),
    Row(
        "CareTeam actor: a member of the team",
        OPT_IN,
        ({"provision": {"type": "permit", "actor": ["CareTeam/ct-c"]}},),
        "c",
        None,
        "PA PB Q oa1 ob1 oq1 cb ea",
    ),
    Row(
        "CareTeam actor: not a member of the team",
        OPT_IN,
        ({"provision": {"type": "permit", "actor": ["CareTeam/ct-c"]}},),
        "a",
        None,
        OWN_A,
    ),
    Row(
        "PractitionerRole actor: the user in that role",
        OPT_IN,
        ({"provision": {"type": "permit", "actor": ["PractitionerRole/pr-c"]}},),
        "c-dr",
        None,
        "PA PB Q oa1 ob1 oq1 cb ea",
    ),
    Row(
        "PractitionerRole actor: same organisation, no such user",
        OPT_IN,
        ({"provision": {"type": "permit", "actor": ["PractitionerRole/pr-c"]}},),
        "c",
        None,
        OWN_C,
    ),
    # ---------------------------------------------------------------- denials
    Row("deny-all at B covers A's records", OPT_OUT, (DENY_ALL,), "c", None, OWN_C),
    Row("deny-all: A still sees its own", OPT_OUT, (DENY_ALL,), "a", None, f"{OWN_A} Q oq1"),
    Row(
        "deny-all recorded at A, seen from B",
        OPT_OUT,
        ({**DENY_ALL, "by": "a", "patient": "PA"},),
        "b",
        None,
        f"{OWN_B} Q oq1",
    ),
    Row(
        "deny for one actor: that actor",
        OPT_OUT,
        ({"provision": {"type": "deny", "actor": ["Organization/c"]}},),
        "c",
        None,
        OWN_C,
    ),
    Row(
        "deny for one actor: another actor unaffected",
        OPT_OUT,
        ({"provision": {"type": "deny", "actor": ["Organization/c"]}},),
        "a",
        None,
        f"{PLAIN} oa2",
    ),
    Row(
        "deny one class",
        OPT_OUT,
        ({"provision": {"type": "deny", "class": ["Observation"]}},),
        "c",
        None,
        "PA PB Q oq1 cb ea",
    ),
    Row(
        "deny one instance",
        OPT_OUT,
        ({"provision": {"type": "deny", "data": [("instance", "ob1")]}},),
        "c",
        None,
        "PA PB Q oa1 ox oq1 cb ea",
    ),
    Row(
        "deny a resource and what it references (related)",
        OPT_OUT,
        ({"provision": {"type": "deny", "data": [("related", "ox")]}},),
        "c",
        None,
        "PA Q oa1 ob1 oq1 cb ea",
    ),
    Row(
        "policyRule OPTOUT without provision denies",
        OPT_OUT,
        ({"policy": "OPTOUT"},),
        "c",
        None,
        OWN_C,
    ),
    Row(
        "nested deny applies only within its parent's actor",
        OPT_OUT,
        (
            {
                "provision": {
                    "type": "permit",
                    "actor": ["Organization/c"],
                    "provision": [{"type": "deny", "class": ["Observation"]}],
                }
            },
        ),
        "a",
        None,
        f"{PLAIN} oa2",
    ),
    Row(
        "deny a record and its dependents",
        OPT_OUT,
        ({"provision": {"type": "deny", "data": [("dependents", "PB")]}},),
        "c",
        None,
        "PA Q oa1 oq1 ea",
    ),
    Row(
        "deny what B wrote (authoredby), recorded at A",
        OPT_OUT,
        (
            {
                "by": "a",
                "patient": "PA",
                "provision": {"type": "deny", "data": [("authoredby", "Organization/b")]},
            },
        ),
        "c",
        None,
        "PA Q oa1 oq1 ea",
    ),
    Row(
        "deny dataPeriod 2019-2020",
        OPT_OUT,
        ({"provision": {"type": "deny", "dataPeriod": ("2019-01-01", "2020-12-31")}},),
        "c",
        None,
        "PA PB Q ox oq1 cb ea",
    ),
    Row(
        "deny whose period is past is not in force",
        OPT_OUT,
        ({"provision": {"type": "deny", "period": ("2000-01-01", "2001-01-01")}},),
        "c",
        None,
        PLAIN,
    ),
    Row(
        "deny whose period has not begun is not in force",
        OPT_OUT,
        ({"provision": {"type": "deny", "period": ("2099-01-01", None)}},),
        "c",
        None,
        PLAIN,
    ),
    Row(
        "deny whose period is now is in force",
        OPT_OUT,
        ({"provision": {"type": "deny", "period": ("2000-01-01", "2099-01-01")}},),
        "c",
        None,
        OWN_C,
    ),
    Row(
        "inactive deny is ignored", OPT_OUT, ({**DENY_ALL, "status": "inactive"},), "c", None, PLAIN
    ),
    Row("draft deny is ignored", OPT_OUT, ({**DENY_ALL, "status": "draft"},), "c", None, PLAIN),
    Row(
        "deny of another scope is ignored",
        OPT_OUT,
        ({**DENY_ALL, "scope": "research"},),
        "c",
        None,
        PLAIN,
    ),
    Row(
        "deny for research only: treatment unaffected",
        OPT_OUT,
        ({"provision": {"type": "deny", "purpose": ["HRESCH"]}},),
        "c",
        None,
        PLAIN,
    ),
    # ---------------------------------------------------------------- nesting, conflicts
    Row(
        "nested permit inside deny: the named org",
        OPT_IN,
        (
            {
                "provision": {
                    "type": "deny",
                    "provision": [{"type": "permit", "actor": ["Organization/c"]}],
                }
            },
        ),
        "c",
        None,
        "PA PB Q oa1 ob1 oq1 cb ea",
    ),
    Row(
        "nested permit inside deny: another org",
        OPT_IN,
        (
            {
                "provision": {
                    "type": "deny",
                    "provision": [{"type": "permit", "actor": ["Organization/c"]}],
                }
            },
        ),
        "a",
        None,
        OWN_A,
    ),
    Row(
        "nested permit inside deny under opt-out: another org",
        OPT_OUT,
        (
            {
                "provision": {
                    "type": "deny",
                    "provision": [{"type": "permit", "actor": ["Organization/c"]}],
                }
            },
        ),
        "a",
        None,
        f"{OWN_A} Q oq1",
    ),
    Row(
        "nested deny inside permit",
        OPT_IN,
        (
            {
                "provision": {
                    "type": "permit",
                    "provision": [{"type": "deny", "class": ["Observation"]}],
                }
            },
        ),
        "c",
        None,
        "PA PB Q oq1 cb ea",
    ),
    Row(
        "contradictory siblings: deny wins (permit listed first)",
        OPT_OUT,
        (
            {
                "provision": {
                    "type": "deny",
                    "provision": [
                        {"type": "permit", "actor": ["Organization/c"]},
                        {"type": "deny", "class": ["Observation"]},
                    ],
                }
            },
        ),
        "c",
        None,
        "PA PB Q oq1 cb ea",
    ),
    Row(
        "contradictory siblings: deny wins (deny listed first)",
        OPT_OUT,
        (
            {
                "provision": {
                    "type": "deny",
                    "provision": [
                        {"type": "deny", "class": ["Observation"]},
                        {"type": "permit", "actor": ["Organization/c"]},
                    ],
                }
            },
        ),
        "c",
        None,
        "PA PB Q oq1 cb ea",
    ),
    Row(
        "two consents, one permit one deny: deny wins",
        OPT_IN,
        (
            {**PERMIT_ALL, "by": "a", "patient": "PA"},
            {"provision": {"type": "deny", "class": ["Observation"]}},
        ),
        "c",
        None,
        "PA PB Q oq1 cb ea",
    ),
    Row(
        "two permits: either permits",
        OPT_IN,
        (
            {"provision": {"type": "permit", "class": ["Patient"]}},
            {"by": "a", "patient": "PA", "provision": {"type": "permit", "class": ["Condition"]}},
        ),
        "c",
        None,
        "PA PB Q oq1 cb",
    ),
]


def test_the_table_is_well_formed():
    names = [r.name for r in ROWS]
    assert len(names) == len(set(names)) and len(ROWS) >= 20
    for row in ROWS:
        assert set(row.visible.split()) <= set(WORLD), row.name


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_scenario(build, row: Row):
    world = build(row.default, row.consents)
    expected = set(row.visible.split())

    assert world.search_keys(row.accessor, row.purpose) == expected, "search"
    assert world.read_keys(row.accessor, row.purpose) == expected, "read"

    # The person's $everything holds the visible part of the person's record.
    r = world.get(
        row.accessor,
        world.url("PA") + "/$everything",
        purpose=row.purpose,
        params={"_count": "100"},
    )
    if "PA" in expected:
        assert r.status_code == 200, r.text
    if r.status_code == 200:
        found = world.keys(r.json()) & set(WORLD)
        assert found == expected & PERSON, "$everything"
    else:
        assert r.status_code in (403, 404), r.text
