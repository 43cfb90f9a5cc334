"""The consent policy logic (hie/access/consent.py) without HTTP: parsing and
validating Consents, and the two forms of one decision kept equal: the per-resource
evaluation (reads) and the store query term (searches), checked against the store's
reference semantics on randomly generated Consents and resources."""

from __future__ import annotations

import random

import orjson
import pytest

from hie.access import consent as rules
from hie.access import consents
from hie.access.consent import Accessor, Policy, Provision
from hie.access.consents import ConsentBook, ConsentView, Ledger
from hie.access.decision import MEMBER_TAG_SYSTEM
from hie.access.patients import PatientLinks
from hie.fhir.errors import FhirError
from hie.fhir.search.extract import index_rows
from hie.fhir.search.registry import default_registry
from hie.store import Version, Write
from hie.store.query import Cond, Match, WrittenAfter
from tests.conftest import make_store
from tests.store.oracle import WRITTEN, evaluate

SCOPE = {"coding": [{"system": rules.SCOPE_SYSTEM, "code": rules.PRIVACY}]}
HIV = (rules.ACT_CODE, "HIV")
PSY = (rules.ACT_CODE, "PSY")
RESTRICTED = (rules.CONFIDENTIALITY, "R")
NOW = "2026-06-01T00:00:00.000000Z"


def consent(provision: dict | None = None, **extra) -> dict:
    body = {
        "resourceType": "Consent",
        "status": "active",
        "scope": SCOPE,
        "patient": {"reference": "Patient/p1"},
        **extra,
    }
    if provision is not None:
        body["provision"] = provision
    return body


def actor(ref: str) -> dict:
    return {"role": {"text": "recipient"}, "reference": {"reference": ref}}


def problems(body: dict) -> list[str]:
    with pytest.raises(FhirError) as caught:
        rules.parse_policy(body, "Consent/x")
    assert caught.value.status == 422
    return [i.expression[0] for i in caught.value.issues]


# ------------------------------------------------------------------ parsing
def test_parse_nested_provisions_and_base_rule():
    policy = rules.parse_policy(
        consent(
            {
                "provision": [
                    {
                        "type": "permit",
                        "actor": [actor("Organization/b")],
                        "purpose": [{"system": rules.PURPOSE_SYSTEM, "code": "TREAT"}],
                        "class": [{"system": rules.CLASS_SYSTEM, "code": "Observation"}],
                        "securityLabel": [{"system": rules.ACT_CODE, "code": "HIV"}],
                        "dataPeriod": {"start": "2020", "end": "2021-06"},
                    }
                ]
            },
            policyRule={"coding": [{"system": rules.ACT_CODE, "code": "OPTOUT"}]},
        ),
        "Consent/x",
    )
    assert policy.root.type == "deny"  # from the policyRule
    child = policy.root.children[0]
    assert child.path == "1.1" and child.type == "permit"
    assert child.actors == ("Organization/b",)
    assert child.labels == {HIV} and child.classes == {"Observation"}
    assert child.data_period == ("2020-01-01T00:00:00.000000Z", "2021-06-30T23:59:59.999999Z")


def test_inactive_and_other_scopes_are_not_policies():
    assert rules.parse_policy(consent({"type": "deny"}, status="inactive"), "Consent/x") is None
    research = consent({"type": "deny"}, scope={"coding": [{"code": "research"}]})
    assert rules.parse_policy(research, "Consent/x") is None


@pytest.mark.parametrize(
    ("provision", "where"),
    [
        ({"type": "deny", "period": {"start": "2021", "end": "2020"}}, "Consent.provision.period"),
        (
            {"type": "deny", "dataPeriod": {"start": "2021-02-01", "end": "2021-01-31"}},
            "Consent.provision.dataPeriod",
        ),
        (
            {"type": "deny", "actor": [actor("Device/x")]},
            "Consent.provision.actor[0].reference",
        ),
        (
            {"type": "deny", "securityLabel": [{"system": "urn:mine", "code": "HIV"}]},
            "Consent.provision.securityLabel[0]",
        ),
        (
            {"type": "deny", "purpose": [{"system": rules.PURPOSE_SYSTEM, "code": "GOSSIP"}]},
            "Consent.provision.purpose[0]",
        ),
        (
            {"type": "deny", "class": [{"system": rules.CLASS_SYSTEM, "code": "Nonsense"}]},
            "Consent.provision.class[0]",
        ),
        ({"type": "deny", "code": [{"text": "x"}]}, "Consent.provision.code"),
        ({"type": "deny", "provision": [{"actor": []}]}, "Consent.provision.provision[0].type"),
        ({"type": "maybe"}, "Consent.provision.type"),
        (
            {
                "type": "deny",
                "data": [{"meaning": "authoredby", "reference": {"reference": "Patient/1"}}],
            },
            "Consent.provision.data[0].reference",
        ),
        ({"type": "deny", "actor": "Organization/b"}, "Consent.provision.actor"),
    ],
)
def test_bad_provisions_are_refused_with_their_place(provision, where):
    assert where in problems(consent(provision))


def test_a_consent_that_says_nothing_or_names_no_patient_is_refused():
    assert "Consent.provision.type" in problems(consent({}))
    body = consent({"type": "deny"})
    del body["patient"]
    assert "Consent.patient" in problems(body)


def nested(depth: int) -> dict:
    node: dict = {"type": "deny"}
    for level in range(depth - 1):
        node = {"type": "permit" if level % 2 else "deny", "provision": [node]}
    return node


def test_nesting_limit():
    assert rules.parse_policy(consent(nested(rules.MAX_DEPTH)), "Consent/x") is not None
    assert problems(consent(nested(20)))


# ------------------------------------------------------------------ decisions
def make_facts(labels=(), writer=None, dates=(NOW,), ref="Observation/o1", refs=()):
    return rules.Facts(
        "Observation",
        ref,
        writer,
        frozenset(labels),
        tuple(dates),
        ("Patient/p1",),
        lambda: frozenset(refs),
    )


def verdict(provision: Provision, acc: Accessor, facts) -> str | None:
    return rules.decide(Policy("Consent/x", "Patient/p1", provision), acc, facts, ACTORS, {}).result


ACTORS = {
    "Organization/a": rules.ActorFacts(orgs=frozenset({"Organization/a"})),
    "Organization/b": rules.ActorFacts(orgs=frozenset({"Organization/b"})),
    "CareTeam/t": rules.ActorFacts(orgs=frozenset({"Organization/c"})),
}
B_TREAT = Accessor("Organization/b", "TREAT", NOW)


def test_deepest_matching_provision_decides_and_deny_wins_among_siblings():
    tree = Provision(
        "1",
        "deny",
        children=(
            Provision("1.1", "permit", actors=("Organization/b",)),
            Provision("1.2", "permit", actors=("Organization/a",)),
        ),
    )
    assert verdict(tree, B_TREAT, make_facts()) == "permit"
    assert verdict(tree, Accessor("Organization/c", "TREAT", NOW), make_facts()) == "deny"
    contradictory = Provision(
        "1",
        "permit",
        children=(
            Provision("1.1", "permit", actors=("Organization/b",)),
            Provision("1.2", "deny", actors=("Organization/b",)),
        ),
    )
    assert verdict(contradictory, B_TREAT, make_facts()) == "deny"


def test_a_permit_releases_sensitive_labels_only_when_it_names_them():
    plain = Provision("1", "permit")
    assert verdict(plain, B_TREAT, make_facts([HIV])) == "deny"
    named = Provision("1", "deny", children=(Provision("1.1", "permit", labels=frozenset({HIV})),))
    assert verdict(named, B_TREAT, make_facts([HIV])) == "permit"
    assert verdict(named, B_TREAT, make_facts([HIV, PSY])) == "deny"  # PSY is not named
    assert verdict(named, B_TREAT, make_facts([])) == "deny"  # the permit covers HIV only


def test_purpose_specialisation_period_and_unresolved_actors():
    treat_only = Provision("1", "deny", purposes=frozenset({"TREAT"}))
    assert verdict(treat_only, Accessor("Organization/b", "ETREAT", NOW), make_facts()) == "deny"
    assert verdict(treat_only, Accessor("Organization/b", "HRESCH", NOW), make_facts()) is None
    expired = Provision(
        "1", "deny", period=("2020-01-01T00:00:00.000000Z", "2021-01-01T00:00:00.000000Z")
    )
    assert verdict(expired, B_TREAT, make_facts()) is None
    assert (
        verdict(Provision("1", "deny", actors=("Organization/gone",)), B_TREAT, make_facts())
        == "deny"
    )
    assert (
        verdict(Provision("1", "permit", actors=("Organization/gone",)), B_TREAT, make_facts())
        is None
    )


def test_default_policies():
    opt_out = Accessor("Organization/b", "TREAT", NOW)
    assert rules.default_verdict(opt_out, make_facts()).result == "permit"
    assert rules.default_verdict(opt_out, make_facts([RESTRICTED])).result == "deny"
    research = Accessor("Organization/b", "HRESCH", NOW)
    assert rules.default_verdict(research, make_facts()).result == "deny"
    opt_in = Accessor("Organization/b", "TREAT", NOW, default=rules.OPT_IN)
    assert rules.default_verdict(opt_in, make_facts()).result == "deny"


# ------------------------------------------------------------------ one semantics, two forms
PATIENTS = ("Patient/p1", "Patient/p2", "Patient/p3")
LABELS = (HIV, PSY, RESTRICTED)
ORGS = ("Organization/a", "Organization/b", "Organization/c")
PERIODS = (
    ("2019-01-01T00:00:00.000000Z", "2020-12-31T23:59:59.999999Z"),
    ("2021-01-01T00:00:00.000000Z", "2030-01-01T00:00:00.000000Z"),
)


def random_provision(rng: random.Random, path: str, depth: int, obs_ids) -> Provision:
    def some(pool, k=2):
        return frozenset(rng.sample(pool, rng.randint(1, k))) if rng.random() < 0.3 else frozenset()

    data = ()
    if rng.random() < 0.2:
        meaning = rng.choice(["instance", "dependents", "authoredby", "related"])
        ref = rng.choice(ORGS) if meaning == "authoredby" else f"Observation/{rng.choice(obs_ids)}"
        data = ((meaning, ref),)
    children = ()
    if depth < 3:
        children = tuple(
            random_provision(rng, f"{path}.{n + 1}", depth + 1, obs_ids)
            for n in range(rng.choice([0, 0, 1, 2]))
        )
    return Provision(
        path,
        rng.choice(["permit", "deny"]),
        period=rng.choice([None, None, None, PERIODS[0], PERIODS[1]]),
        actors=tuple(some(ORGS + ("CareTeam/t",))),
        actions=rng.choice(
            [frozenset(), frozenset(), frozenset({"collect"}), frozenset({"access"})]
        ),
        purposes=some(("TREAT", "HRESCH", "PUBHLTH")),
        classes=rng.choice(
            [frozenset(), frozenset(), frozenset({"Observation"}), frozenset({"Condition"})]
        ),
        labels=some(LABELS),
        data_period=rng.choice([None, None, PERIODS[0], PERIODS[1]]),
        data=data,
        children=children,
    )


def random_observation(rng: random.Random, n: int, obs_ids) -> dict:
    body: dict = {
        "resourceType": "Observation",
        "id": obs_ids[n],
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": rng.choice(PATIENTS)},
        "meta": {
            "security": [
                {"system": s, "code": c} for s, c in rng.sample(LABELS, rng.choice([0, 0, 0, 1, 2]))
            ]
        },
    }
    if rng.random() < 0.15:  # a second patient: visible only if both permit
        body["performer"] = [{"reference": rng.choice(PATIENTS)}]
    if rng.random() < 0.7:
        body["meta"]["tag"] = [
            {"system": MEMBER_TAG_SYSTEM, "code": rng.choice(ORGS).split("/")[1]}
        ]
    if rng.random() < 0.8:
        body["effectiveDateTime"] = rng.choice(["2019-05-05", "2020-07-01T10:00:00Z", "2024-03-03"])
    if rng.random() < 0.3:
        body["hasMember"] = [{"reference": f"Observation/{rng.choice(obs_ids)}"}]
    return body


async def _settled(view: ConsentView):
    """The view's Observation terms once its withheld set is computed."""
    await view.book.idle()
    return await view.terms("Observation")


@pytest.mark.parametrize("kind", ["sqlite", "mongomock"])
@pytest.mark.parametrize("seed", range(40))
async def test_store_filter_equals_per_resource_decision(seed, kind, tmp_path, monkeypatch):
    """The store query term leaves out exactly what the per-resource decision
    withholds: in the reference semantics and in both stores, by the formula alone
    and with the caller's withheld set (inline, or kept by the store: odd seeds)."""
    if seed % 2:
        monkeypatch.setattr(consents, "INLINE_IDS", 0)
    rng = random.Random(seed)
    registry = default_registry()
    links = PatientLinks(registry)
    obs_ids = [f"o{n}" for n in range(30)]
    bodies = [random_observation(rng, n, obs_ids) for n in range(30)]
    world = {"Observation": {}}
    versions, writes = [], []
    for n, body in enumerate(bodies):
        updated = f"202{n % 6}-01-01T00:00:00.000000Z"
        rows = tuple(index_rows(body, updated, registry))
        world["Observation"][body["id"]] = (updated, rows)
        raw = orjson.dumps(body)
        versions.append(Version("Observation", body["id"], 1, updated, "POST", raw))
        writes.append(Write("Observation", body["id"], 0, 1, updated, "POST", raw, rows))
    store = make_store(kind, tmp_path)
    await store.open()
    await store.commit(writes)
    world[WRITTEN] = {("Observation", w.id): n for n, w in enumerate(writes, 1)}
    book = ConsentBook(store, registry, links, None)
    await book.current()  # the outbox read to its end: sets are computed from there
    policies = {
        p: tuple(
            Policy(f"Consent/{p[-2:]}{k}", p, random_provision(rng, "1", 1, obs_ids))
            for k in range(rng.randint(1, 2))
        )
        for p in PATIENTS[:2]
    }
    related = {
        f"Observation/{o}": frozenset(f"Observation/{x}" for x in obs_ids[:3]) for o in obs_ids
    }
    filed = {c.consent: (c, frozenset({p})) for p, cs in policies.items() for c in cs}
    ledger = Ledger(filed, by_patient=policies, actors=ACTORS, related=related)
    seen = set()
    for org in ORGS:
        for purpose in ("TREAT", "HRESCH"):
            for default in (rules.OPT_OUT, rules.OPT_IN):
                acc = Accessor(org, purpose, NOW, default=default)
                view = ConsentView(book, ledger, acc, False)
                # the formula alone, then with the caller's withheld set once computed
                for terms in (await view.terms("Observation"), await _settled(view)):
                    visible = set()
                    for v in versions:
                        expected = view.verdict(v).result == "permit"
                        got = all(evaluate(world, "Observation", v.id, t) for t in terms)
                        assert got == expected, (org, purpose, default, v.id, orjson.loads(v.body))
                        seen.add(expected)
                        visible.update([v.id] if expected else [])
                    found = await store.search("Observation", terms, count=100)
                    assert {v.id for v in found.items} == visible, (org, purpose, default)
                    assert found.total == len(visible)
                for patient in PATIENTS:  # a search naming a patient gets a narrower term
                    named = (Match("subject", (Cond("text", "eq", patient),)),)
                    narrow = await view.terms("Observation", named)
                    found = await store.search("Observation", named + narrow, count=100)
                    expected = {
                        b["id"]
                        for b in bodies
                        if b["subject"]["reference"] == patient and b["id"] in visible
                    }
                    got = {v.id for v in found.items}
                    # exact, except that a resource also about another patient with
                    # Consents may be withheld (the most restrictive reading)
                    assert got <= expected, (org, purpose, default, patient)
                    assert expected - got <= {b["id"] for b in bodies if "performer" in b}
    await store.close()
    assert seen == {True, False}  # the filter withholds some and shows others


@pytest.mark.parametrize("kind", ["sqlite", "mongomock"])
async def test_withheld_set_follows_changes_and_misses_no_write_it_has_not_seen(kind, tmp_path):
    """A caller's withheld set is computed once, at an outbox position; a resource
    written after it is decided by the formula in the same query (the store reads its
    outbox in that query), whether or not the book has seen the write yet and whatever
    its ``lastUpdated``: a fresh withheld resource never slips through."""
    registry = default_registry()
    store = make_store(kind, tmp_path)
    await store.open()

    def observation(id_: str, patient: str, updated: str, version: int = 1) -> Write:
        body = {
            "resourceType": "Observation",
            "id": id_,
            "status": "final",
            "code": {"text": "x"},
            "subject": {"reference": patient},
            "meta": {"lastUpdated": updated},
        }
        rows = tuple(index_rows(body, updated, registry))
        raw = orjson.dumps(body)
        return Write("Observation", id_, version - 1, version, updated, "PUT", raw, rows)

    old = "2025-01-01T00:00:00.000000Z"
    await store.commit([observation("o1", "Patient/p1", old), observation("o2", "Patient/p2", old)])
    book = ConsentBook(store, default_registry(), PatientLinks(registry), None)
    await book.current()  # reads the outbox to its end
    deny = Policy("Consent/c1", "Patient/p1", Provision("1", "deny"))
    ledger = Ledger({"Consent/c1": (deny, frozenset({"Patient/p1"}))}, {"Patient/p1": (deny,)})
    acc = Accessor("Organization/a", "TREAT", NOW, default=rules.OPT_OUT)
    view = ConsentView(book, ledger, acc, False)
    await view.terms("Observation")  # starts computing the set
    await book.idle()
    terms = await view.terms("Observation")
    assert terms[1].terms[1] == WrittenAfter(await store.last_event())  # the set's position

    async def visible() -> set[str]:
        view = ConsentView(book, ledger, acc, False)
        found = await store.search("Observation", await view.terms("Observation"), count=100)
        return {v.id for v in found.items}

    assert await visible() == {"o2"}
    # Written behind the book's back, with an old lastUpdated: the formula decides them.
    await store.commit([observation("o3", "Patient/p1", old), observation("o4", "Patient/p2", old)])
    assert await visible() == {"o2", "o4"}
    # o2 moves to the denied patient, o1 to the other one: the set alone would be wrong.
    await store.commit(
        [observation("o2", "Patient/p1", old, 2), observation("o1", "Patient/p2", old, 2)]
    )
    assert await visible() == {"o1", "o4"}
    await book.current()  # the book has seen the writes: the same answers
    assert await visible() == {"o1", "o4"}
    await store.close()


def test_filters_are_shared_by_a_members_users_unless_a_consent_names_users():
    """A member's users share its filters and withheld sets while no Consent names
    end users or their roles; once one does, each user gets its own."""
    book = ConsentBook(None, default_registry(), PatientLinks(default_registry()), None)
    by_org = Policy("Consent/c1", "Patient/p1", Provision("1", "deny", actors=("Organization/a",)))
    named = Policy("Consent/c2", "Patient/p1", Provision("1", "deny", actors=("Practitioner/u1",)))
    users = ("Practitioner/u1", "Practitioner/u2")
    for policy, shared in ((by_org, True), (named, False)):
        actors = {**ACTORS, "Practitioner/u1": rules.ActorFacts(users=frozenset({users[0]}))}
        if policy is by_org:
            actors.pop("Practitioner/u1")
        ledger = Ledger(
            {policy.consent: (policy, frozenset({"Patient/p1"}))},
            {"Patient/p1": (policy,)},
            actors=actors,
        )
        views = [
            ConsentView(book, ledger, Accessor("Organization/b", "TREAT", NOW, user=u), False)
            for u in users
        ]
        first, second = (v._filter("Observation", None) for v in views)
        assert (first is second) == shared
