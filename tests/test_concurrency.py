"""Concurrent clients: optimistic locking with If-Match never loses an update, and
concurrent creates never collide.

Each scenario runs against a real ``hie serve`` process (embedded store, many
connections at once) and in-process on both stores through ``httpx.ASGITransport``
(requests interleave on one event loop wherever the server awaits). Every Patient also
gets a golden record from the master patient index: the searches counting Patients
leave golden records out (``MEMBERS``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx
import pytest

from hie.mpi.records import GOLDEN_TAG
from tests.server import HieServer, running_server

FHIR = "application/fhir+json"
WORKERS = 20
INCREMENTS = 3  # per worker
CREATES = 200
#: Search parameter leaving golden records (which carry their members' identifiers) out.
MEMBERS = {"_tag:not": f"{GOLDEN_TAG['system']}|{GOLDEN_TAG['code']}"}

Scenario = Callable[[httpx.AsyncClient], Awaitable[None]]


# ---------------------------------------------------------------- scenarios
async def new_counter(client: httpx.AsyncClient) -> str:
    """An Observation whose valueQuantity.value is the counter; its relative URL."""
    r = await client.post(
        "Observation",
        json={
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "counter"},
            "valueQuantity": {"value": 0},
        },
    )
    assert r.status_code == 201, r.text
    return f"Observation/{r.json()['id']}"


async def increment(client: httpx.AsyncClient, ref: str, tag: str) -> int:
    """Read, add one, write back guarded by the version read; on 412 start over.
    Returns how many attempts lost the race."""
    conflicts = 0
    while True:
        r = await client.get(ref)
        assert r.status_code == 200, r.text
        body = r.json()
        assert r.headers["ETag"] == f'W/"{body["meta"]["versionId"]}"'
        body["valueQuantity"]["value"] += 1
        body["note"] = [{"text": tag}]
        await asyncio.sleep(0)  # think time: let the other workers read meanwhile
        r = await client.put(ref, json=body, headers={"If-Match": r.headers["ETag"]})
        if r.status_code == 200:
            return conflicts
        assert r.status_code == 412, r.text
        assert r.json()["resourceType"] == "OperationOutcome"
        conflicts += 1


async def if_match_loses_no_update(client: httpx.AsyncClient) -> None:
    ref = await new_counter(client)

    async def worker(w: int) -> int:
        return sum([await increment(client, ref, f"w{w}-{k}") for k in range(INCREMENTS)])

    conflicts = sum(await asyncio.gather(*(worker(w) for w in range(WORKERS))))

    updates = WORKERS * INCREMENTS
    final = (await client.get(ref)).json()
    assert final["valueQuantity"]["value"] == updates
    assert final["meta"]["versionId"] == str(1 + updates)
    assert conflicts > 0, "the workers never raced; the test proves nothing"
    # Version n holds value n - 1: each update was applied to the one before it, and
    # every worker's increment landed exactly once.
    history = (await client.get(f"{ref}/_history", params={"_count": "1000"})).json()
    assert history["total"] == 1 + updates
    versions = {int(e["resource"]["meta"]["versionId"]): e["resource"] for e in history["entry"]}
    assert sorted(versions) == list(range(1, updates + 2))
    assert all(body["valueQuantity"]["value"] == n - 1 for n, body in versions.items())
    tags = Counter(body["note"][0]["text"] for n, body in versions.items() if n > 1)
    assert tags == Counter(f"w{w}-{k}" for w in range(WORKERS) for k in range(INCREMENTS))


async def same_if_match_has_one_winner(client: httpx.AsyncClient) -> None:
    ref = await new_counter(client)
    await increment(client, ref, "before")  # version 2
    current = (await client.get(ref)).json()
    assert current["meta"]["versionId"] == "2"

    async def attempt(w: int) -> httpx.Response:
        body = {**current, "valueQuantity": {"value": 100 + w}}
        return await client.put(ref, json=body, headers={"If-Match": 'W/"2"'})

    responses = await asyncio.gather(*(attempt(w) for w in range(WORKERS)))

    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 1, 412: WORKERS - 1}, statuses
    (winner,) = [w for w, r in enumerate(responses) if r.status_code == 200]
    assert responses[winner].headers["ETag"] == 'W/"3"'
    final = (await client.get(ref)).json()
    assert final["meta"]["versionId"] == "3"
    assert final["valueQuantity"]["value"] == 100 + winner
    history = (await client.get(f"{ref}/_history")).json()
    assert history["total"] == 3


async def concurrent_creates_never_collide(client: httpx.AsyncClient) -> None:
    system = f"urn:concurrent-creates:{uuid.uuid4()}"

    async def create(i: int) -> httpx.Response:
        return await client.post(
            "Patient",
            json={"resourceType": "Patient", "identifier": [{"system": system, "value": str(i)}]},
        )

    responses = await asyncio.gather(*(create(i) for i in range(CREATES)))

    assert [r.status_code for r in responses] == [201] * CREATES
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids)) == CREATES
    for r in responses:
        assert r.headers["Location"].endswith(f"/Patient/{r.json()['id']}/_history/1")

    reads = await asyncio.gather(*(client.get(f"Patient/{id_}") for id_ in ids))
    for i, (id_, r) in enumerate(zip(ids, reads, strict=True)):
        assert r.status_code == 200, r.text
        assert r.json()["id"] == id_
        assert r.json()["identifier"][0]["value"] == str(i)
        assert r.json()["meta"]["versionId"] == "1"

    found = (
        await client.get(
            "Patient", params={"identifier": f"{system}|", "_count": str(CREATES), **MEMBERS}
        )
    ).json()
    assert found["total"] == CREATES
    assert sorted(e["resource"]["id"] for e in found["entry"]) == sorted(ids)


async def concurrent_transactions_are_each_atomic(client: httpx.AsyncClient) -> None:
    """Transactions racing on one resource: each either applies all its entries or
    none; the If-Match guard lets exactly one of them through."""
    ref = await new_counter(client)
    system = f"urn:concurrent-tx:{uuid.uuid4()}"

    async def tx(w: int) -> httpx.Response:
        entries = [
            {
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": system, "value": f"{w}-{k}"}],
                },
                "request": {"method": "POST", "url": "Patient"},
            }
            for k in range(5)
        ]
        entries.append(
            {
                "resource": {
                    "resourceType": "Observation",
                    "id": ref.split("/")[1],
                    "status": "final",
                    "code": {"text": "counter"},
                    "valueQuantity": {"value": w},
                },
                "request": {"method": "PUT", "url": ref, "ifMatch": 'W/"1"'},
            }
        )
        return await client.post(
            "", json={"resourceType": "Bundle", "type": "transaction", "entry": entries}
        )

    responses = await asyncio.gather(*(tx(w) for w in range(WORKERS)))

    # Losers get 412 whether they lost before planning or at the commit.
    assert Counter(r.status_code for r in responses) == {200: 1, 412: WORKERS - 1}
    for r in responses:
        if r.status_code == 412:
            assert any("Bundle.entry[5]" in i["diagnostics"] for i in r.json()["issue"])
    (winner,) = [w for w, r in enumerate(responses) if r.status_code == 200]
    found = (await client.get("Patient", params={"identifier": f"{system}|", **MEMBERS})).json()
    assert found["total"] == 5
    assert {e["resource"]["identifier"][0]["value"] for e in found["entry"]} == {
        f"{winner}-{k}" for k in range(5)
    }
    final = (await client.get(ref)).json()
    assert final["meta"]["versionId"] == "2"
    assert final["valueQuantity"]["value"] == winner


SCENARIOS: dict[str, Scenario] = {
    "if-match-loses-no-update": if_match_loses_no_update,
    "same-if-match-one-winner": same_if_match_has_one_winner,
    "creates-never-collide": concurrent_creates_never_collide,
    "transactions-atomic": concurrent_transactions_are_each_atomic,
}


# ---------------------------------------------------------------- a real server
@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[HieServer]:
    with running_server(tmp_path_factory.mktemp("concurrency")) as s:
        yield s


@pytest.fixture
async def live(server: HieServer) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=CREATES, max_keepalive_connections=CREATES)
    async with server.async_client(limits=limits) as client:
        yield client


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_real_server(live: httpx.AsyncClient, scenario: str):
    await SCENARIOS[scenario](live)


# ---------------------------------------------------------------- in process
class Yielding:
    """A store proxy that lets other tasks run before each store call, as a networked
    database would. (The mongomock double never suspends, so without this every
    in-process request would run from its first read to its commit undisturbed and
    no two requests would ever race between them.)"""

    def __init__(self, store):
        self._store = store

    def __getattr__(self, name: str):
        attr = getattr(self._store, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        async def call(*args, **kwargs):
            await asyncio.sleep(0)
            return await attr(*args, **kwargs)

        return call


@pytest.fixture
async def asgi(app, mint) -> AsyncIterator[httpx.AsyncClient]:
    """A client on the app in this event loop (ASGITransport runs no lifespan, so the
    app's lifespan, which opens the store and starts the audit log, runs here)."""
    app.state.service.store = Yielding(app.state.store)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app),
            base_url="http://hie.test/fhir",
            headers={"Authorization": f"Bearer {mint()}", "Content-Type": FHIR},
            timeout=60,
        ) as client,
    ):
        yield client


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_in_process(asgi: httpx.AsyncClient, scenario: str):
    await SCENARIOS[scenario](asgi)


async def test_concurrent_conditional_creates_create_one_resource(asgi: httpx.AsyncClient):
    system = f"urn:conditional-create:{uuid.uuid4()}"
    body = {"resourceType": "Patient", "identifier": [{"system": system, "value": "1"}]}
    responses = await asyncio.gather(
        *(
            asgi.post("Patient", json=body, headers={"If-None-Exist": f"identifier={system}|1"})
            for _ in range(WORKERS)
        )
    )
    found = (await asgi.get("Patient", params={"identifier": f"{system}|1", **MEMBERS})).json()
    assert found["total"] == 1
    assert Counter(r.status_code for r in responses) == {201: 1, 200: WORKERS - 1}


async def test_concurrent_conditional_updates_create_one_resource(asgi: httpx.AsyncClient):
    system = f"urn:conditional-update:{uuid.uuid4()}"
    body = {"resourceType": "Patient", "identifier": [{"system": system, "value": "1"}]}
    responses = await asyncio.gather(
        *(
            asgi.put("Patient", params={"identifier": f"{system}|1"}, json=body)
            for _ in range(WORKERS)
        )
    )
    found = (await asgi.get("Patient", params={"identifier": f"{system}|1", **MEMBERS})).json()
    assert found["total"] == 1
    assert Counter(r.status_code for r in responses) == {201: 1, 200: WORKERS - 1}
    version = found["entry"][0]["resource"]["meta"]["versionId"]
    assert version == str(WORKERS)


async def test_concurrent_conditional_transactions_create_one_resource(asgi: httpx.AsyncClient):
    system = f"urn:conditional-tx:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:5b0c5c4e-0000-4000-8000-000000000001",
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": system, "value": "1"}],
                },
                "request": {
                    "method": "POST",
                    "url": "Patient",
                    "ifNoneExist": f"identifier={system}|1",
                },
            }
        ],
    }
    responses = await asyncio.gather(*(asgi.post("", json=bundle) for _ in range(WORKERS)))
    assert {r.status_code for r in responses} == {200}
    statuses = Counter(r.json()["entry"][0]["response"]["status"] for r in responses)
    assert statuses == {"201 Created": 1, "200 OK": WORKERS - 1}
    found = (await asgi.get("Patient", params={"identifier": f"{system}|1", **MEMBERS})).json()
    assert found["total"] == 1
