"""The MPI engine (PatientIndex) on the stores, below HTTP: decisions, golden records,
survivorship, steward operations, races between processes, rematch and training."""

from __future__ import annotations

import random
from dataclasses import dataclass

import orjson
import pytest

from hie.access.principal import ADMIN, MEMBER, STEWARD, Principal
from hie.access.scopes import ACTIONS, Grant
from hie.config import Settings
from hie.fhir.errors import FhirError
from hie.fhir.search.registry import Registry
from hie.fhir.service import FhirService
from hie.mpi import RESIDENT_ID_SYSTEM
from hie.mpi.golden import golden_body
from hie.mpi.index import PatientIndex
from hie.mpi.records import (
    DIFFERENT,
    ENTERPRISE_ID_SYSTEM,
    GOLDEN_TAG,
    LINK_TYPE,
    MODEL_TYPE,
    OPEN,
    RECORD_TYPE,
    REVIEW_TYPE,
    SAME,
    golden_of_member,
    is_golden,
    refer_members,
    review_id,
)
from hie.mpi.state import Pending
from hie.store import ConditionConflict, VersionConflict
from tests.conftest import make_store
from tests.mpi.people import person

GRANTS = (Grant("system", "*", frozenset(ACTIONS)),)


def member(org: str) -> Principal:
    return Principal(
        f"client-{org}", GRANTS, organization=f"Organization/{org}", roles=frozenset({MEMBER})
    )


STEWARD_P = Principal("steward-1", GRANTS, roles=frozenset({STEWARD}))
ADMIN_P = Principal("admin-1", GRANTS, roles=frozenset({ADMIN}))


@dataclass
class Env:
    store: object
    service: FhirService
    index: PatientIndex

    async def create(self, body: dict, who: Principal | None = None) -> dict:
        write, result = await self.service.plan_create(who or member("a"), "Patient", body)
        await self.store.commit([write, *result.extra])
        return orjson.loads(write.body)

    async def update(self, body: dict, who: Principal | None = None) -> dict:
        plan = self.service.plan_update(who or member("a"), "Patient", body["id"], body)
        write, result = await plan
        await self.store.commit([write, *result.extra])
        return orjson.loads(write.body)

    async def delete(self, id_: str, who: Principal | None = None) -> None:
        write, result = await self.service.plan_delete(who or member("a"), "Patient", id_)
        await self.store.commit([write, *result.extra])

    async def body(self, type_: str, id_: str) -> dict | None:
        v = await self.store.read(type_, id_)
        return None if v is None or v.body is None else orjson.loads(v.body)

    async def golden(self, patient: dict) -> dict:
        return await self.body(
            "Patient", golden_of_member(await self.body("Patient", patient["id"]))
        )

    async def reviews(self, status: str = OPEN) -> list[dict]:
        return (await self.index.reviews(status, 100, 0))[0]


@pytest.fixture(params=["sqlite", "mongomock"])
async def env(request, tmp_path):
    store = make_store(request.param, tmp_path)
    await store.open()
    service = FhirService(store, Settings(data_dir=tmp_path), Registry())
    index = PatientIndex(store, service.new_write)
    await index.start()
    service.mpi = index
    yield Env(store, service, index)
    await store.close()


ZHANG = person("张", "三", "1980-05-06", 11, phone="13912345678")
LI = person("李", "四", "1975-01-02", 21, phone="13612345678")


async def test_same_person_from_two_members_shares_one_golden_record(env):
    a = await env.create(ZHANG, member("a"))
    b = await env.create(
        {**ZHANG, "telecom": [{"system": "phone", "value": "+86 139-1234-5678"}]}, member("b")
    )
    golden = await env.golden(a)
    assert golden_of_member(b) == golden_of_member(a) == golden["id"]
    assert is_golden(golden) and golden["meta"]["tag"] == [GOLDEN_TAG]
    assert sorted(refer_members(golden)) == sorted([a["id"], b["id"]])
    assert golden["identifier"][0] == {
        "use": "official",
        "system": ENTERPRISE_ID_SYSTEM,
        "value": golden["id"],
    }
    assert len(golden["telecom"]) == 1  # one number, written two ways
    record = await env.body(RECORD_TYPE, b["id"])
    assert record["golden"] == golden["id"] and record["organization"] == "Organization/b"
    assert any(k.startswith("id:") for k in record["keys"])
    link = await env.body(LINK_TYPE, b["id"])
    assert link["action"] == "link" and link["by"] == "mpi" and link["score"] > 0.999


async def test_different_people_get_their_own_golden_records(env):
    a = await env.create(ZHANG)
    b = await env.create(LI)
    assert golden_of_member(a) != golden_of_member(b)
    assert await env.reviews() == []


async def test_an_uncertain_pair_opens_a_review_and_a_golden_record_of_its_own(env):
    a = await env.create({**ZHANG, "identifier": []})
    b = await env.create({**ZHANG, "identifier": [], "telecom": []}, member("b"))
    assert golden_of_member(a) != golden_of_member(b)
    [review] = await env.reviews()
    assert review["record"] == b["id"] and review["candidate"] == golden_of_member(a)
    assert review["candidateRecord"] == a["id"]
    assert review["fields"]["family"] == "exact" and review["fields"]["phone"] == "missing"
    assert 0.05 <= review["probability"] < 1 and review["reason"] == "uncorroborated"
    assert {e["field"] for e in review["explanation"]} >= {"national_id", "birth_date"}


async def test_records_planned_together_match_each_other(env):
    pending = Pending()
    plans = []
    for n, org in enumerate(("a", "b")):
        body = {**ZHANG, "id": f"p{n}"}
        write, _ = await env.service.plan_create(
            member(org), "Patient", body, id_=f"p{n}", pending=pending
        )
        plans.append(write)
    goldens = [w for w in pending.writes() if w.type == "Patient"]
    assert len(goldens) == 1  # one write of the one golden record, with both members
    await env.store.commit([*plans, *pending.writes()])
    golden = await env.body("Patient", goldens[0].id)
    assert sorted(refer_members(golden)) == ["p0", "p1"]


async def test_a_concurrent_registration_the_decision_did_not_see_fails_its_commit(env):
    """Two processes register the same person at once: the guard on the record's blocking
    keys makes the second commit fail, and planning again links it."""
    first, _ = await env.service.plan_create(
        member("a"), "Patient", ZHANG, pending=(one := Pending())
    )
    second, _ = await env.service.plan_create(
        member("b"), "Patient", ZHANG, pending=(two := Pending())
    )
    await env.store.commit([first, *one.writes()])
    with pytest.raises((ConditionConflict, VersionConflict)):
        await env.store.commit([second, *two.writes()])
    b = await env.create(ZHANG, member("b"))
    assert golden_of_member(b) == golden_of_member(orjson.loads(first.body))


async def test_a_golden_record_changed_meanwhile_fails_the_commit(env):
    a = await env.create(ZHANG)
    plan_one, plan_two = Pending(), Pending()
    one, _ = await env.service.plan_create(member("b"), "Patient", ZHANG, pending=plan_one)
    two, _ = await env.service.plan_create(member("c"), "Patient", ZHANG, pending=plan_two)
    await env.store.commit([one, *plan_one.writes()])
    with pytest.raises((ConditionConflict, VersionConflict)):
        await env.store.commit([two, *plan_two.writes()])
    assert len(refer_members(await env.golden(a))) == 2


async def test_update_rebuilds_the_golden_record(env):
    a = await env.create(ZHANG)
    b = await env.create(ZHANG, member("b"))
    await env.update(
        {**b, "address": [{"line": ["建国路88号"], "district": "朝阳区", "city": "北京市"}]},
        member("b"),
    )
    golden = await env.golden(a)
    assert golden["address"][0]["line"] == ["建国路88号"]
    assert sorted(refer_members(golden)) == sorted([a["id"], b["id"]])


async def test_update_that_no_longer_matches_leaves_the_golden_record(env):
    a = await env.create(ZHANG)
    b = await env.create(ZHANG, member("b"))
    other = {**LI, "id": b["id"]}
    b2 = await env.update(other, member("b"))
    assert golden_of_member(b2) != golden_of_member(a)
    assert refer_members(await env.golden(a)) == [a["id"]]
    link = await env.body(LINK_TYPE, b["id"])
    assert link["action"] == "relink" and link["previous"] == golden_of_member(a)


async def test_update_of_a_record_alone_links_it_when_it_now_matches(env):
    a = await env.create(ZHANG)
    b = await env.create(LI, member("b"))
    old_golden = golden_of_member(b)
    b2 = await env.update({**ZHANG, "id": b["id"]}, member("b"))
    assert golden_of_member(b2) == golden_of_member(a)
    assert await env.body("Patient", old_golden) is None  # its last member left: deleted


async def test_delete_removes_the_member_and_the_last_member_takes_the_golden_record(env):
    a = await env.create(ZHANG)
    b = await env.create(ZHANG, member("b"))
    golden_id = golden_of_member(a)
    await env.delete(b["id"], member("b"))
    assert refer_members(await env.body("Patient", golden_id)) == [a["id"]]
    assert await env.body(RECORD_TYPE, b["id"]) is None
    assert (await env.body(LINK_TYPE, b["id"]))["action"] == "unlink"
    await env.delete(a["id"])
    assert await env.body("Patient", golden_id) is None


async def test_deleting_withdraws_open_reviews(env):
    await env.create({**ZHANG, "identifier": []})
    b = await env.create({**ZHANG, "identifier": [], "telecom": []}, member("b"))
    assert len(await env.reviews()) == 1
    await env.delete(b["id"], member("b"))
    assert await env.reviews() == []


@pytest.mark.parametrize(
    "garbage",
    [
        {"gender": "male"},
        {"name": [{"family": "张" * 10_000}], "birthDate": "1980-05-06"},
        {"name": [{"family": "张", "given": ["三"]}], "birthDate": "1066-10-14"},
        {"identifier": [{"system": RESIDENT_ID_SYSTEM, "value": "11010519800506ABCD"}]},
    ],
    ids=["nothing", "long-name", "absurd-date", "id-letters"],
)
async def test_garbage_is_flagged_and_never_linked(env, garbage):
    body = {"resourceType": "Patient", **garbage}
    a = await env.create(body)
    b = await env.create(body, member("b"))
    assert golden_of_member(a) != golden_of_member(b)
    record = await env.body(RECORD_TYPE, a["id"])
    assert record["flags"]
    assert await env.reviews() == []


async def test_a_block_over_the_cap_is_skipped_and_sends_to_review(env, monkeypatch):
    monkeypatch.setattr("hie.mpi.index.BLOCK_CAP", 2)
    for n in range(3):
        await env.create(
            person(
                "王", f"芳{'一二三'[n]}", "1990-03-0" + str(n + 1), 2 * n + 2, phone="01065123456"
            )
        )
    lone = {"resourceType": "Patient", "telecom": [{"system": "phone", "value": "01065123456"}]}
    created = await env.create(lone)
    record = await env.body(RECORD_TYPE, created["id"])
    assert record["reason"] == "blocks-over-cap:tel:01065123456"


async def test_steward_link_is_kept_when_the_record_changes(env):
    a = await env.create(ZHANG)
    b = await env.create(LI, member("b"))
    writes = await env.index.plan_link(STEWARD_P, b["id"], golden_of_member(a), "same person")
    await env.store.commit(writes)
    assert sorted(refer_members(await env.golden(a))) == sorted([a["id"], b["id"]])
    assert (await env.body(REVIEW_TYPE, review_id(b["id"], golden_of_member(a))))["status"] == SAME
    b2 = await env.update({**(await env.body("Patient", b["id"])), "gender": "female"}, member("b"))
    assert golden_of_member(b2) == golden_of_member(a)


async def test_unlink_is_remembered(env):
    a = await env.create(ZHANG)
    b = await env.create(ZHANG, member("b"))
    golden_id = golden_of_member(a)
    await env.store.commit(await env.index.plan_unlink(STEWARD_P, b["id"], "twins"))
    b_now = await env.body("Patient", b["id"])
    assert golden_of_member(b_now) != golden_id
    assert (await env.body(REVIEW_TYPE, review_id(b["id"], golden_id)))["status"] == DIFFERENT
    b2 = await env.update({**b_now, "active": True}, member("b"))
    assert golden_of_member(b2) != golden_id  # never relinked automatically
    c = await env.create(ZHANG, member("c"))
    assert golden_of_member(c) in (golden_id, golden_of_member(b2))


async def test_unlink_of_a_record_alone_is_refused(env):
    a = await env.create(ZHANG)
    with pytest.raises(FhirError) as caught:
        await env.index.plan_unlink(STEWARD_P, a["id"], "why")
    assert caught.value.status == 409


async def test_resolve_review_same_and_different(env):
    a = await env.create({**ZHANG, "identifier": []})
    b = await env.create({**ZHANG, "identifier": [], "telecom": []}, member("b"))
    [review] = await env.reviews()
    await env.store.commit(await env.index.plan_resolve(STEWARD_P, review["id"], SAME))
    assert golden_of_member(await env.body("Patient", b["id"])) == golden_of_member(a)
    assert (await env.reviews(SAME))[0]["decidedBy"] == "steward-1"

    c = await env.create({**ZHANG, "identifier": [], "telecom": [], "gender": "male"}, member("c"))
    [review] = await env.reviews()
    assert review["record"] == c["id"]
    await env.store.commit(await env.index.plan_resolve(STEWARD_P, review["id"], DIFFERENT))
    await env.update({**(await env.body("Patient", c["id"])), "active": True}, member("c"))
    assert await env.reviews() == []  # a "different" pair is never proposed again
    with pytest.raises(FhirError):
        await env.index.plan_resolve(STEWARD_P, review["id"], "maybe")


async def test_merge_and_unmerge_golden_records(env):
    a = await env.create(ZHANG)
    b = await env.create(LI, member("b"))
    source, target = golden_of_member(b), golden_of_member(a)
    before = await env.body("Patient", source)
    await env.store.commit(await env.index.plan_merge(STEWARD_P, source, target))
    merged = await env.body("Patient", source)
    assert merged["active"] is False
    assert {"other": {"reference": f"Patient/{target}"}, "type": "replaced-by"} in merged["link"]
    survivor = await env.body("Patient", target)
    assert {"other": {"reference": f"Patient/{source}"}, "type": "replaces"} in survivor["link"]
    assert sorted(refer_members(survivor)) == sorted([a["id"], b["id"]])
    assert golden_of_member(await env.body("Patient", b["id"])) == target
    assert (await env.index.person(source)).golden == target
    with pytest.raises(FhirError):
        await env.index.plan_merge(STEWARD_P, source, target)

    await env.store.commit(await env.index.plan_unmerge(STEWARD_P, source))
    restored = await env.body("Patient", source)
    strip = {"meta"}
    assert {k: v for k, v in restored.items() if k not in strip} == {
        k: v for k, v in before.items() if k not in strip
    }
    assert refer_members(await env.body("Patient", target)) == [a["id"]]
    assert "replaces" not in str((await env.body("Patient", target))["link"])
    assert golden_of_member(await env.body("Patient", b["id"])) == source
    history = await env.store.history("Patient", source)
    assert history.total == 3  # created, merged, unmerged: new versions, never deletes


async def test_merge_and_unmerge_member_records_of_one_organisation(env):
    a = await env.create(ZHANG)
    dup = await env.create(LI)
    source_golden = golden_of_member(dup)
    await env.store.commit(await env.index.plan_merge(STEWARD_P, dup["id"], a["id"]))
    merged = await env.body("Patient", dup["id"])
    assert merged["active"] is False and golden_of_member(merged) == golden_of_member(a)
    assert await env.body("Patient", source_golden) is None
    assert "replaces" in str((await env.body("Patient", a["id"]))["link"])

    await env.store.commit(await env.index.plan_unmerge(STEWARD_P, dup["id"]))
    restored = await env.body("Patient", dup["id"])
    assert restored.get("active") is None and "replaced-by" not in str(restored["link"])
    assert golden_of_member(restored) != golden_of_member(a)
    assert "replaces" not in str((await env.body("Patient", a["id"]))["link"])


async def test_merge_refuses_members_of_two_organisations_and_mixed_kinds(env):
    a = await env.create(ZHANG, member("a"))
    b = await env.create(LI, member("b"))
    for source, target in ((a["id"], b["id"]), (a["id"], golden_of_member(b)), (a["id"], a["id"])):
        with pytest.raises(FhirError) as caught:
            await env.index.plan_merge(STEWARD_P, source, target)
        assert caught.value.status == 422


async def test_match_person_and_identifiers(env):
    a = await env.create(ZHANG)
    b = await env.create(ZHANG, member("b"))
    await env.create(LI)
    results = await env.index.match(ZHANG, count=None, only_certain=False)
    assert [r.golden.id for r in results] == [golden_of_member(a)]
    assert results[0].grade == "certain" and results[0].probability > 0.999
    assert {e["field"] for e in results[0].explanation} >= {"national_id", "phone"}
    loose = {**ZHANG, "identifier": [], "telecom": []}
    [possible] = await env.index.match(loose, count=5, only_certain=False)
    assert possible.grade in ("probable", "possible")
    assert await env.index.match(loose, count=5, only_certain=True) == []
    assert await env.index.match({"resourceType": "Patient"}, count=None, only_certain=False) == []

    found = await env.index.person(a["id"])
    assert found.golden == golden_of_member(a) and sorted(found.members) == sorted(
        [a["id"], b["id"]]
    )
    assert await env.index.person(found.golden) == found
    assert await env.index.person("nobody") is None
    number = ZHANG["identifier"][0]["value"]
    assert sorted(await env.index.by_identifier(RESIDENT_ID_SYSTEM, number)) == sorted(
        [a["id"], b["id"], found.golden]
    )


async def test_rematch_indexes_records_written_before_the_index(env):
    env.service.mpi = None
    a = await env.create(ZHANG)
    b = await env.create(ZHANG, member("b"))
    env.service.mpi = env.index
    report = await env.index.rematch(retrain=False)
    assert (report.records, report.indexed) == (2, 2)
    a2, b2 = await env.body("Patient", a["id"]), await env.body("Patient", b["id"])
    assert golden_of_member(a2) == golden_of_member(b2) is not None
    again = await env.index.rematch(retrain=False, batch=1)
    assert (again.records, again.indexed, again.relinked) == (2, 0, 0)


def population(n: int, seed: int = 7) -> list[dict]:
    """``n`` people registered twice, the second time with a typo or a missing field."""
    rng = random.Random(seed)
    families, givens = (
        "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗",
        "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂",
    )
    people = []
    for i in range(n):
        birth = f"{rng.randint(1940, 2010)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        body = person(
            rng.choice(families),
            rng.choice(givens) + rng.choice(givens),
            birth,
            rng.randint(1, 999),
            phone=f"13{rng.randint(100000000, 999999999)}",
        )
        twin = dict(body)
        if i % 3 == 0:
            twin.pop("telecom")
        elif i % 3 == 1:
            twin["identifier"] = []
        people += [body, twin]
    return people


async def test_rematch_with_retraining_stores_the_model(env):
    env.service.mpi = None
    for body in population(120):
        await env.create(body)
    env.service.mpi = env.index
    report = await env.index.rematch(retrain=True)
    assert report.trained and report.model["records"] == 240
    assert report.records == 240 and report.indexed == 240
    assert (await env.store.read(MODEL_TYPE, "current")) is not None
    goldens = {
        golden_of_member(await env.body("Patient", v.id))
        for v in await env.store.scan("Patient", limit=1000)
        if not is_golden(orjson.loads(v.body))
    }
    assert len(goldens) <= 130  # most second registrations found their person
    fresh = PatientIndex(env.store, env.service.new_write, link_threshold=0.99)
    await fresh.start()
    assert fresh.model.info["records"] == 240 and fresh.model.match_probability == 0.99


def test_survivorship_majority_recency_and_han_names():
    old = {"id": "m1", "meta": {"lastUpdated": "2024-01-01T00:00:00Z"}}
    new = {"id": "m2", "meta": {"lastUpdated": "2025-01-01T00:00:00Z"}}
    third = {"id": "m3", "meta": {"lastUpdated": "2023-01-01T00:00:00Z"}}
    members = [
        {
            **old,
            "name": [{"use": "official", "family": "Zhang", "given": ["San"]}],
            "birthDate": "1980-05-06",
            "gender": "male",
        },
        {
            **new,
            "name": [{"use": "official", "family": "张", "given": ["三"]}],
            "birthDate": "1900-01-01",
            "gender": "unknown",
        },
        {**third, "name": [{"family": "Zhang", "given": ["San"]}], "birthDate": "1980-05-06"},
    ]
    body = golden_body("g", members)
    assert body["name"] == [{"use": "official", "family": "张", "given": ["三"]}]  # Han wins
    assert body["birthDate"] == "1980-05-06"  # the placeholder date does not vote
    assert body["gender"] == "male"  # unknown only when nothing else is known
    tie = golden_body("g", [{**old, "gender": "male"}, {**new, "gender": "female"}])
    assert tie["gender"] == "female"  # a tie goes to the most recently updated
    assert [link["other"]["reference"] for link in body["link"]] == [
        "Patient/m1",
        "Patient/m2",
        "Patient/m3",
    ]


def test_thresholds_apply_to_the_model():
    index = PatientIndex(None, None, link_threshold=0.9, review_threshold=0.2)
    assert (index.model.match_probability, index.model.possible_probability) == (0.9, 0.2)
    with pytest.raises(ValueError):
        Settings(mpi_link_threshold=0.01)
    assert Settings.from_env({"HIE_MPI_REVIEW_THRESHOLD": "0.1"}).mpi_review_threshold == 0.1


def test_cli_rematch_indexes_what_was_written_with_the_index_off(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from hie.app import create_app
    from hie.cli import app as cli

    for name in ("HIE_MONGODB_URI", "HIE_MPI", "HIE_AUDIT", "HIE_AUTH"):
        monkeypatch.delenv(name, raising=False)
    off = Settings(data_dir=tmp_path, auth=False, mpi=False)
    with TestClient(create_app(off), base_url="http://hie.test") as c:
        ids = [c.post("/fhir/Patient", json=ZHANG).json()["id"] for _ in range(2)]
    runner = CliRunner()
    trained = runner.invoke(cli, ["mpi", "train", "--data-dir", str(tmp_path)])
    assert trained.exit_code == 1 and "cannot train" in trained.output  # two records: too few
    result = runner.invoke(cli, ["mpi", "rematch", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "2 member records: 2 newly indexed" in result.output
    with TestClient(
        create_app(Settings(data_dir=tmp_path, auth=False)), base_url="http://hie.test"
    ) as c:
        first, second = (c.get(f"/fhir/Patient/{i}").json() for i in ids)
        assert golden_of_member(first) == golden_of_member(second) is not None
        audit = c.get("/fhir/AuditEvent", params={"subtype": "$mpi-rematch"}).json()
        assert audit["total"] == 1
        verify = c.get("/fhir/AuditEvent/$verify").json()
        assert any(p.get("valueBoolean") is True for p in verify["parameter"])
