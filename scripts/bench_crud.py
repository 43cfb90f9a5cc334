#!/usr/bin/env python
"""CRUD and transaction-ingest benchmark of the HIE FHIR API on the embedded store.

Starts two real ``hie serve`` subprocesses on the same fresh temporary data directory
(free ports on 127.0.0.1): ``hie``, the secured server (authentication and audit on, a
token minted with ``hie token``), and ``open`` (``HIE_AUTH=off HIE_AUDIT=off``). Only
one of them is under load at a time. It pre-fills the store through the secured server
with transaction Bundles up to each data size, and drives the servers with N
concurrent ``httpx.AsyncClient`` workers for four operations:

* ``read``   GET ``/fhir/{type}/{id}`` of random stored resources;
* ``update`` PUT ``/fhir/Observation/{id}`` of random stored Observations;
* ``create`` POST ``/fhir/Patient`` and ``/fhir/Observation`` (alternating);
* ``bundle`` POST ``/fhir`` transaction Bundles: one Patient plus Observations that
  reference it through its ``urn:uuid:`` fullUrl.

Each operation runs ``--rounds`` times on each of the two servers, in alternating order
(``hie open open hie ...``, so that drift and the growing store hit both alike), and
then against two baselines:

* ``bare``: a minimal FastAPI app served by uvicorn in a subprocess the same way
  (same worker count) whose routes return fixed responses carrying the very bytes HIE
  returned for that operation (write routes read the request body first);
* ``raw``: the same work on :class:`hie.store.sqlite.SqliteStore` in-process (a commit
  of a pre-built ``Write``, ``read()``, one commit of a whole Bundle's writes).

Reads are also measured on both servers at each ``--scaling`` concurrency. For the two
HIE servers the script reads from the database file (read-only) how many AuditEvents
each phase wrote, in how many group commits (versions of ``HieAuditHead/head``), and
how much the database grew.

Every data size (``--sizes``) gets a fresh store. Every phase is warmed up and then
runs for a fixed duration (or a fixed count with ``--ops``); everything listens on
127.0.0.1 only, and the servers (which also die with this process) and the temporary
data are removed at the end. Each worker has its own keep-alive ``httpx.AsyncClient``
(``--shared-pool``: one client, one pool). The load generator shares the machine's
cores with the servers, so the report gives each server's CPU time per operation
beside the throughput; it also measures the CPU other processes used during each
phase and measures a disturbed phase again (``--retries``).

Output: a Markdown report on stdout (``--json PATH`` also writes every figure as
JSON); progress goes to stderr.

Example::

    .venv/bin/python scripts/bench_crud.py --sizes 1k,10k,100k --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
from bench_common import (  # the scripts' shared helpers, next to this file
    CATEGORY_SYSTEM,
    FHIR_JSON,
    HOST,
    LOINC,
    Server,
    ascending_sizes,
    clean_env,
    die_with_parent,
    fmt_ms,
    fmt_num,
    free_port,
    hie_executable,
    log,
    machine_busy_seconds,
    machine_info,
    percentile,
    run_async,
    tree_cpu_seconds,
)
from fastapi import FastAPI, Request
from starlette.responses import Response

MEDIA = f"{FHIR_JSON}; charset=utf-8"
BARE_ENV = "HIE_BENCH_BARE_SPEC"
OPS = ("read", "update", "create", "bundle")
SERVED = ("hie", "open")  # HIE with auth and audit on; with both off (baselines: bare, raw)
EXPECTED_STATUS = {"read": 200, "update": 200, "create": 201, "bundle": 200}
PHASE_TIMEOUT = 600.0  # hard stop for --ops phases
PREFILL_CONCURRENCY = 4
RAW_PREBUILD_CAP = 200_000  # most Writes pre-built for one raw-store phase


# --------------------------------------------------------------------------- data
GIVEN = [
    "Anna",
    "Ben",
    "Chloe",
    "David",
    "Emma",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kofi",
    "Lena",
    "Mateo",
    "Nora",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
]
FAMILY = [
    "Schmidt",
    "Okafor",
    "Garcia",
    "Nguyen",
    "Jensen",
    "Kowalski",
    "Rossi",
    "Tanaka",
    "Müller",
    "Dubois",
    "Haddad",
    "Novak",
    "Silva",
    "Ivanova",
    "Larsen",
    "Cohen",
]
CITIES = [
    ("Berlin", "DE"),
    ("Lyon", "FR"),
    ("Porto", "PT"),
    ("Gdańsk", "PL"),
    ("Aarhus", "DK"),
    ("Graz", "AT"),
    ("Turin", "IT"),
    ("Utrecht", "NL"),
]


class Generator:
    """Realistic-looking Patients, Observations and transaction Bundles (seeded)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.mrn = 0

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def patient(self) -> dict:
        r = self.rng
        self.mrn += 1
        city, country = r.choice(CITIES)
        gender = r.choice(["female", "male"])
        born = dt.date(1930, 1, 1) + dt.timedelta(days=r.randrange(90 * 365))
        return {
            "resourceType": "Patient",
            "identifier": [
                {
                    "use": "usual",
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                "code": "MR",
                            }
                        ]
                    },
                    "system": "urn:oid:1.2.276.0.76.4.17",
                    "value": f"MRN-{r.randrange(10**8):08d}-{self.mrn}",
                }
            ],
            "active": True,
            "name": [
                {
                    "use": "official",
                    "family": r.choice(FAMILY),
                    "given": r.sample(GIVEN, r.choice([1, 1, 2])),
                }
            ],
            "telecom": [
                {"system": "phone", "value": f"+49 30 {r.randrange(10**7):07d}", "use": "home"}
            ],
            "gender": gender,
            "birthDate": born.isoformat(),
            "address": [
                {
                    "use": "home",
                    "line": [f"{r.randrange(1, 200)} {r.choice(FAMILY)}straße"],
                    "city": city,
                    "postalCode": f"{r.randrange(10000, 99999)}",
                    "country": country,
                }
            ],
        }

    def observation(self, subject: str, id_: str | None = None) -> dict:
        r = self.rng
        code, display, unit, mean, sd, decimals, category = r.choice(LOINC)
        value = round(max(0.0, r.gauss(mean, sd)), decimals)
        if decimals == 0:
            value = int(value)
        when = dt.datetime(2020, 1, 1, tzinfo=dt.UTC) + dt.timedelta(
            seconds=r.randrange(4 * 365 * 86400)
        )
        obs: dict[str, Any] = {"resourceType": "Observation"}
        if id_ is not None:
            obs["id"] = id_
        obs.update(
            {
                "status": r.choice(["final", "final", "final", "amended"]),
                "category": [
                    {
                        "coding": [
                            {
                                "system": CATEGORY_SYSTEM,
                                "code": category,
                                "display": category.replace("-", " ").title(),
                            }
                        ]
                    }
                ],
                "code": {
                    "coding": [{"system": "http://loinc.org", "code": code, "display": display}],
                    "text": display,
                },
                "subject": {"reference": subject},
                "effectiveDateTime": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "valueQuantity": {
                    "value": value,
                    "unit": unit,
                    "system": "http://unitsofmeasure.org",
                    "code": unit,
                },
            }
        )
        return obs

    def bundle(self, size: int) -> dict:
        """A transaction: one Patient and ``size - 1`` Observations referencing it."""
        patient_url = f"urn:uuid:{self.uuid()}"
        entries = [
            {
                "fullUrl": patient_url,
                "resource": self.patient(),
                "request": {"method": "POST", "url": "Patient"},
            }
        ]
        for _ in range(size - 1):
            entries.append(
                {
                    "fullUrl": f"urn:uuid:{self.uuid()}",
                    "resource": self.observation(patient_url),
                    "request": {"method": "POST", "url": "Observation"},
                }
            )
        return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


@dataclass
class Pool:
    """What the store holds (as far as the benchmark knows)."""

    patients: list[str] = field(default_factory=list)
    observations: list[tuple[str, str]] = field(default_factory=list)  # (id, patient id)


def ids_from_transaction_response(body: bytes, pool: Pool) -> None:
    """Record the ids a transaction created (entry 0 is the Patient)."""
    entries = orjson.loads(body)["entry"]
    ids = [e["response"]["location"].split("/")[1] for e in entries]
    patient = ids[0]
    pool.patients.append(patient)
    pool.observations.extend((oid, patient) for oid in ids[1:])


# --------------------------------------------------------------------------- stats
@dataclass
class PhaseResult:
    op: str
    variant: str
    target: int  # the --sizes value this phase belongs to
    size: int  # resources actually in the store when the phase started
    ops: int  # successful operations
    errors: int
    seconds: float
    ops_per_s: float
    resources_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    server_cpu_ms_per_op: float | None  # serving side: server process tree, or in-process
    client_cpu_pct: float | None  # load generator CPU (HTTP variants), % of one core
    other_cpu_cores: float | None  # CPU used by everything else on the machine, in cores
    concurrency: int = 0
    round: int = 1  # which of the --rounds this is (hie and open)
    attempts: int = 1  # measurements taken (a disturbed phase is measured again)
    kept: int = 1  # which of them is reported (the one least disturbed)
    first_error: str | None = None
    # hie and open only, over warm-up and every attempt: requests sent, AuditEvents
    # and group commits (HieAuditHead versions) added, logical database growth
    requests: int | None = None
    audit_records: int | None = None
    audit_commits: int | None = None
    db_growth_bytes: int | None = None


@dataclass(frozen=True)
class StoreState:
    """What the database file holds, read from it read-only."""

    data: int  # the benchmark's live resources: not AuditEvent, not the internal Hie*
    audit_records: int  # AuditEvent rows
    audit_commits: int  # versions of HieAuditHead/head: one per audit group commit
    bytes: int  # pages in use, WAL included (the reader's snapshot)

    @classmethod
    def of(cls, db: Path) -> StoreState:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30, isolation_level=None)
        with contextlib.closing(conn):
            conn.execute("BEGIN")  # one read transaction: a consistent snapshot
            counts = dict(conn.execute("SELECT type, n FROM live_counts"))  # kept per commit
            head = conn.execute(
                "SELECT version FROM resources WHERE type = 'HieAuditHead' AND id = 'head'"
            ).fetchone()
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        data = sum(n for t, n in counts.items() if t != "AuditEvent" and not t.startswith("Hie"))
        return cls(
            data, counts.get("AuditEvent", 0), head[0] if head else 0, (pages - free) * page_size
        )


Op = Callable[[int, Any], Awaitable[bool | str]]


async def drive(
    op: Op,
    items: Iterator[Any],
    *,
    concurrency: int,
    duration: float | None,
    max_ops: int | None,
    timeout: float = PHASE_TIMEOUT,
) -> tuple[int, int, float, list[float], str | None]:
    """Run ``op`` over ``items`` with ``concurrency`` workers until ``duration`` is up
    (when given), ``max_ops`` were issued, the items run out or ``timeout`` passed.
    ``op(worker, item)`` returns True on success or an error description.
    Returns (ok, errors, seconds, latencies, first error)."""
    latencies: list[float] = []
    state = {"issued": 0, "errors": 0, "first_error": None}
    start = time.perf_counter()
    deadline = start + (duration if duration is not None and max_ops is None else timeout)
    perf = time.perf_counter

    async def worker(wid: int) -> None:
        while perf() < deadline and (max_ops is None or state["issued"] < max_ops):
            try:
                item = next(items)
            except StopIteration:
                return
            state["issued"] += 1
            t0 = perf()
            try:
                outcome = await op(wid, item)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                outcome = f"{type(exc).__name__}: {exc}"
            if outcome is True:
                latencies.append(perf() - t0)
            else:
                state["errors"] += 1
                state["first_error"] = state["first_error"] or str(outcome)[:300]

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return (
        len(latencies),
        state["errors"],
        time.perf_counter() - start,
        latencies,
        state["first_error"],
    )


async def measure(
    name: tuple[str, str, int, int],
    op: Op,
    items: Iterator[Any],
    *,
    args: argparse.Namespace,
    per_op_resources: int,
    server_pid: int | None,
    warmup_ops: int,
    concurrency: int | None = None,
) -> PhaseResult:
    """Warm up, then measure one (op, variant, size) phase with ``concurrency``
    workers (default ``--concurrency``); measure it again (up to ``--retries`` times,
    keeping the quietest attempt) while other processes on the machine used more than
    ``--quiet-threshold`` cores during it."""
    workers = concurrency or args.concurrency
    if warmup_ops:
        await drive(op, items, concurrency=workers, duration=None, max_ops=warmup_ops)
    best: PhaseResult | None = None
    for attempt in range(1, args.retries + 2):
        result = await _measure_once(name, op, items, args, per_op_resources, server_pid, workers)
        result.kept = attempt
        if result.ops + result.errors == 0:  # the items ran out (pre-built raw writes)
            break
        if best is None or (result.other_cpu_cores or 0) < (best.other_cpu_cores or 0):
            best = result
        if result.other_cpu_cores is None or result.other_cpu_cores <= args.quiet_threshold:
            break
        if attempt <= args.retries:
            log(f"  disturbed (other processes: {result.other_cpu_cores:.2f} cores); again")
    best = best or result
    best.attempts = attempt
    return best


async def _measure_once(
    name: tuple[str, str, int, int],
    op: Op,
    items: Iterator[Any],
    args: argparse.Namespace,
    per_op_resources: int,
    server_pid: int | None,
    concurrency: int,
) -> PhaseResult:
    op_name, variant, target, size = name
    cpu0 = tree_cpu_seconds(server_pid) if server_pid else None
    proc0 = time.process_time()
    busy0 = machine_busy_seconds()
    ok, errors, seconds, lat, first_error = await drive(
        op, items, concurrency=concurrency, duration=args.duration, max_ops=args.ops
    )
    busy1 = machine_busy_seconds()
    proc1 = time.process_time()
    cpu1 = tree_cpu_seconds(server_pid) if server_pid else None
    lat.sort()
    own = proc1 - proc0
    if server_pid:
        server_cpu = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None
        client_pct = 100.0 * own / seconds
        own += server_cpu or 0.0
    else:
        server_cpu, client_pct = own, None
    other = None
    if busy0 is not None and busy1 is not None:
        other = max(0.0, (busy1 - busy0 - own) / seconds)
    done = ok + errors
    result = PhaseResult(
        op=op_name,
        variant=variant,
        target=target,
        size=size,
        ops=ok,
        errors=errors,
        seconds=round(seconds, 3),
        ops_per_s=ok / seconds,
        resources_per_s=ok * per_op_resources / seconds,
        p50_ms=percentile(lat, 0.50) * 1e3,
        p95_ms=percentile(lat, 0.95) * 1e3,
        p99_ms=percentile(lat, 0.99) * 1e3,
        server_cpu_ms_per_op=(server_cpu * 1e3 / done) if server_cpu is not None and done else None,
        client_cpu_pct=client_pct,
        other_cpu_cores=other,
        concurrency=concurrency,
        first_error=first_error,
    )
    extra = f", {result.resources_per_s:,.0f} res/s" if per_op_resources > 1 else ""
    log(
        f"  {op_name:6} {variant:4} c{concurrency:<3} @ {size:>7,}: "
        f"{result.ops_per_s:9,.1f} ops/s{extra}"
        f"  p50 {result.p50_ms:7.2f} ms  p95 {result.p95_ms:7.2f} ms"
        + (f"  other CPU {other:.2f} cores" if other is not None and other > 0.2 else "")
        + (f"  ERRORS {errors} ({first_error})" if errors else "")
    )
    return result


# --------------------------------------------------------------------------- servers


# --------------------------------------------------------------------------- bare app
def bare_app():
    """The baseline: minimal FastAPI routes returning fixed FHIR bytes (uvicorn factory)."""
    spec = orjson.loads(Path(os.environ[BARE_ENV]).read_bytes())
    fixed = {
        key: (entry["status"], entry["body"].encode(), entry["headers"])
        for key, entry in spec.items()
    }
    app = FastAPI(title="bare", docs_url=None, redoc_url=None, openapi_url=None)

    def reply(key: str) -> Response:
        status, body, headers = fixed[key]
        return Response(body, status, headers=headers, media_type=MEDIA)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/bare/{type_}/{id_}")
    async def read(request: Request, type_: str, id_: str) -> Response:
        return reply(f"read:{type_}")

    @app.post("/bare/{type_}")
    async def create(request: Request, type_: str) -> Response:
        await request.body()
        return reply(f"create:{type_}")

    @app.put("/bare/{type_}/{id_}")
    async def update(request: Request, type_: str, id_: str) -> Response:
        await request.body()
        return reply(f"update:{type_}")

    @app.post("/bare")
    async def bundle(request: Request) -> Response:
        await request.body()
        return reply("bundle")

    return app


def serve_bare(port: int, workers: int) -> None:
    import uvicorn

    uvicorn.run(
        "bench_crud:bare_app",
        app_dir=str(Path(__file__).resolve().parent),
        host=HOST,
        port=port,
        workers=workers,
        factory=True,
        log_level="warning",
        access_log=False,
        proxy_headers=True,
    )


# --------------------------------------------------------------------------- benchmark


class Bench:
    """One benchmark run: per data size a fresh store, pre-fill, then every phase."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.gen = Generator(args.seed)
        self.pick = random.Random(args.seed + 1)  # choices of ids to read/update
        self.pool = Pool()
        self.results: list[PhaseResult] = []
        self.prefill_stats: list[dict] = []
        self.spans: dict[int, tuple[StoreState, StoreState]] = {}  # size step -> start, end
        self.db_mib: dict[int, float] = {}  # size step -> database + WAL size at its end
        self.hie: Server | None = None  # authentication and audit on
        self.open: Server | None = None  # HIE_AUTH=off HIE_AUDIT=off, same data
        self.bare: Server | None = None
        self.token = ""
        self.order = SERVED[::-1]  # the HIE servers' order in the last round

    # -- servers and clients -----------------------------------------------------
    def env(self, secured: bool = True) -> dict[str, str]:
        switch = "on" if secured else "off"
        return clean_env(
            HIE_DATA_DIR=str(self.data_dir),
            HIE_AUTH=switch,
            HIE_AUDIT=switch,
            HIE_SQLITE_SYNCHRONOUS=self.args.synchronous,
        )

    def start_hie(self, data_dir: Path) -> None:
        """``hie token``, then the secured and the open ``hie serve`` on a fresh data
        directory."""
        self.data_dir = data_dir
        data_dir.mkdir(parents=True)
        minted = subprocess.run(
            [*hie_executable(), "token", "--data-dir", str(data_dir), "--ttl", "86400"],
            env=self.env(),
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        self.token = minted.stdout.strip().splitlines()[-1]
        self.hie = self.serve("hie serve", secured=True)
        self.open = self.serve("open hie serve", secured=False)

    def serve(self, name: str, *, secured: bool) -> Server:
        """A started ``hie serve`` on the current data directory."""
        port = free_port()
        argv = [*hie_executable(), "serve", "--host", HOST, "--port", str(port)]
        argv += ["--data-dir", str(self.data_dir), "--workers", str(self.args.workers)]
        log_path = self.workdir / ("hie.log" if secured else "open.log")
        server = Server(name, argv, self.env(secured), port, log_path)
        server.start()
        return server

    def start_bare(self, spec: dict) -> None:
        spec_path = self.workdir / "bare-responses.json"
        spec_path.write_bytes(orjson.dumps(spec))
        port = free_port()
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve-bare", str(port)]
        argv += ["--workers", str(self.args.workers)]
        env = clean_env(**{BARE_ENV: str(spec_path)})
        self.bare = Server("bare FastAPI app", argv, env, port, self.workdir / "bare.log")
        self.bare.start()

    def clients(self, stack: contextlib.AsyncExitStack, base: str, n: int) -> list:
        """The load generator's HTTP clients for ``n`` workers: one keep-alive
        ``httpx.AsyncClient`` per worker, or with ``--shared-pool`` one client whose
        pool has a connection per worker (httpcore scans its whole pool on every
        request, which at 16 connections doubles the client's CPU per request on this
        kind of machine)."""
        import httpx

        headers = {
            "Authorization": f"Bearer {self.token}",
            "Content-Type": FHIR_JSON,
            "Accept": FHIR_JSON,
        }

        def make(connections: int):
            client = httpx.AsyncClient(
                base_url=base,
                limits=httpx.Limits(
                    max_connections=connections, max_keepalive_connections=connections
                ),
                timeout=httpx.Timeout(120.0),
                headers=headers,
            )
            stack.push_async_callback(client.aclose)
            return client

        if self.args.shared_pool:
            return [make(n)] * n
        return [make(1) for _ in range(n)]

    def state(self) -> StoreState:
        """What the current data directory's database holds now."""
        return StoreState.of(self.data_dir / "hie.sqlite3")

    def stored(self) -> int:
        """The benchmark's resources in the store right now (audit records excluded)."""
        return self.state().data

    # -- pre-fill ----------------------------------------------------------------
    async def prefill(self, clients: list, target: int) -> None:
        """Transaction Bundles over HTTP until the store holds ``target`` resources."""
        need = target - self.stored()
        if need <= 0:
            return
        size = self.args.bundle_size
        sizes = [size] * (need // size) + ([need % size] if need % size else [])
        if sizes[-1] == 1:  # a Bundle here is a Patient plus at least one Observation
            sizes[-1] = 2
        log(f"pre-filling {need:,} resources in {len(sizes)} transaction Bundles")

        async def post(wid: int, n: int) -> bool | str:
            body = orjson.dumps(self.gen.bundle(n))
            r = await clients[wid].post("/fhir", content=body)
            if r.status_code != 200:
                return f"HTTP {r.status_code}: {r.text[:200]}"
            ids_from_transaction_response(r.content, self.pool)
            return True

        _, errors, seconds, _, first = await drive(
            post,
            iter(sizes),
            concurrency=min(PREFILL_CONCURRENCY, len(clients)),
            duration=None,
            max_ops=None,
            timeout=3600,
        )
        if errors:
            raise RuntimeError(f"pre-fill failed: {first}")
        rate = sum(sizes) / seconds
        log(f"pre-filled to {self.stored():,} resources in {seconds:.1f} s ({rate:,.0f} res/s)")
        self.prefill_stats.append(
            {"target": target, "added": sum(sizes), "seconds": round(seconds, 2), "res_per_s": rate}
        )

    # -- workloads ---------------------------------------------------------------
    def make_workloads(self) -> dict[str, Any]:
        """Request payloads, pre-built so the load generator only sends bytes."""
        g, pick = self.gen, self.pick
        n = min(len(self.pool.patients), 512)
        subjects = pick.sample(self.pool.patients, n)
        creates = []
        for i in range(256):
            p, o = g.patient(), g.observation(f"Patient/{subjects[i % n]}")
            creates += [("Patient", p, orjson.dumps(p)), ("Observation", o, orjson.dumps(o))]
        obs = self.pool.observations
        updates = []
        for oid, pid in pick.sample(obs, min(len(obs), 4096)):
            body = g.observation(f"Patient/{pid}", id_=oid)
            updates.append((oid, body, orjson.dumps(body)))
        everything = [("Patient", p) for p in self.pool.patients]
        everything += [("Observation", o) for o, _ in obs]
        reads = [pick.choice(everything) for _ in range(50_000)]
        bundles = [orjson.dumps(g.bundle(self.args.bundle_size)) for _ in range(16)]
        return {"create": creates, "update": updates, "read": reads, "bundle": bundles}

    async def capture_bare_spec(self, http) -> dict:
        """The bytes and headers HIE answers each operation with, for the bare app."""
        w = self.make_workloads()
        spec: dict[str, dict] = {}

        def keep(key: str, r, expect: int, headers: Iterable[str]) -> None:
            if r.status_code != expect:
                raise RuntimeError(f"capturing {key}: HTTP {r.status_code}: {r.text[:300]}")
            spec[key] = {
                "status": r.status_code,
                "body": r.content.decode(),
                "headers": {h: r.headers[h] for h in headers if h in r.headers},
            }

        for type_, _, body in w["create"][:2]:
            r = await http.post(f"/fhir/{type_}", content=body)
            keep(f"create:{type_}", r, 201, ("etag", "last-modified", "location"))
            rid = r.headers["location"].split("/")[-3]
            r = await http.get(f"/fhir/{type_}/{rid}")
            keep(f"read:{type_}", r, 200, ("etag", "last-modified"))
        oid, _, body = w["update"][0]
        r = await http.put(f"/fhir/Observation/{oid}", content=body)
        keep("update:Observation", r, 200, ("etag", "last-modified"))
        r = await http.post("/fhir", content=w["bundle"][0])
        keep("bundle", r, 200, ())
        return spec

    # -- phases ------------------------------------------------------------------
    @staticmethod
    def http_op(clients: list, base: str, op: str) -> Op:
        expect = EXPECTED_STATUS[op]

        def check(r) -> bool | str:
            return True if r.status_code == expect else f"HTTP {r.status_code}: {r.text[:200]}"

        if op == "read":

            async def run(wid, item):
                return check(await clients[wid].get(f"{base}/{item[0]}/{item[1]}"))
        elif op == "update":

            async def run(wid, item):
                return check(
                    await clients[wid].put(f"{base}/Observation/{item[0]}", content=item[2])
                )
        elif op == "create":

            async def run(wid, item):
                return check(await clients[wid].post(f"{base}/{item[0]}", content=item[2]))
        else:

            async def run(wid, item):
                return check(await clients[wid].post(base, content=item))

        return run

    async def run_http(
        self,
        variant: str,
        clients: list,
        server: Server,
        op: str,
        w: dict,
        target: int,
        concurrency: int,
        round_: int = 1,
    ) -> PhaseResult:
        """One phase over HTTP; for the HIE servers also what it added to the store."""
        per = self.args.bundle_size if op == "bundle" else 1
        run = self.http_op(clients, "/bare" if variant == "bare" else "/fhir", op)
        sent = 0

        async def counted(wid, item):
            nonlocal sent
            sent += 1
            return await run(wid, item)

        before = self.state()
        profile = variant in SERVED and round_ == 1 and concurrency == self.args.concurrency
        spy = self.py_spy(server, f"{target}-{op}-{variant}") if profile else None
        try:
            result = await measure(
                (op, variant, target, before.data),
                counted,
                itertools.cycle(w[op]),
                args=self.args,
                per_op_resources=per,
                server_pid=server.proc.pid,
                warmup_ops=concurrency * (1 if op == "bundle" else 4),
                concurrency=concurrency,
            )
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits
                spy.wait(timeout=60)
        result.round = round_
        if variant in SERVED:
            after = self.state()
            result.requests = sent
            result.audit_records = after.audit_records - before.audit_records
            result.audit_commits = after.audit_commits - before.audit_commits
            result.db_growth_bytes = after.bytes - before.bytes
        return result

    def py_spy(self, server: Server, name: str) -> subprocess.Popen | None:
        """With ``--py-spy DIR``: ``py-spy record`` of ``server`` (every thread,
        collapsed stacks) to ``DIR/name.txt`` until SIGINT."""
        if self.args.py_spy is None:
            return None
        exe = shutil.which("py-spy") or Path(sys.executable).with_name("py-spy")
        out = Path(self.args.py_spy) / f"{name}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = [str(exe), "record", "-p", str(server.proc.pid), "-f", "raw", "-o", str(out)]
        return subprocess.Popen(
            [*argv, "--threads", "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )

    async def run_served(
        self, op: str, w: dict, target: int, clients: dict[str, list], concurrency: int
    ) -> None:
        """``--rounds`` phases of ``op`` on each HIE server; which one goes first
        alternates from round to round (hie open, open hie, hie open, ...)."""
        servers = {"hie": self.hie, "open": self.open}
        for round_ in range(1, self.args.rounds + 1):
            self.order = self.order[::-1]
            for v in self.order:
                r = await self.run_http(
                    v, clients[v], servers[v], op, w, target, concurrency, round_
                )
                self.results.append(r)

    async def run_raw(self, store, service, op: str, w: dict, target: int) -> PhaseResult:
        """The same operation on the store directly, in this process."""
        from hie.fhir.service import new_id

        args = self.args
        per = args.bundle_size if op == "bundle" else 1
        size = self.stored()
        if op == "read":

            async def read(wid, item):
                return True if await store.read(item[0], item[1]) is not None else "not found"

            return await measure(
                (op, "raw", target, size),
                read,
                itertools.cycle(w["read"]),
                args=args,
                per_op_resources=1,
                server_pid=None,
                warmup_ops=args.concurrency * 4,
            )

        async def commit(wid, writes):
            await store.commit(writes)
            return True

        versions: dict[str, int] = {}
        update_targets = itertools.cycle(w["update"])
        create_bodies = itertools.cycle(w["create"])

        async def build_one() -> list:
            if op == "update":  # versions chain: a target recurs only after >= 4096 ops
                oid, body, _ = next(update_targets)
                if oid not in versions:
                    versions[oid] = (await store.read("Observation", oid)).version
                prev = SimpleNamespace(version=versions[oid])
                versions[oid] += 1
                return [service.new_write("Observation", oid, body, prev, "PUT")]
            if op == "create":
                type_, body, _ = next(create_bodies)
                return [service.new_write(type_, new_id(), body, None, "POST")]
            pid = new_id()
            writes = [service.new_write("Patient", pid, self.gen.patient(), None, "POST")]
            ref = f"Patient/{pid}"
            writes += [
                service.new_write("Observation", new_id(), self.gen.observation(ref), None, "POST")
                for _ in range(per - 1)
            ]
            return writes

        async def build(n: int) -> list:
            return [await build_one() for _ in range(n)]

        # The warm-up doubles as calibration of how many Writes the phase needs.
        warm = args.concurrency * (1 if op == "bundle" else 4)
        warm_writes = await build(warm)
        t0 = time.perf_counter()
        await drive(
            commit, iter(warm_writes), concurrency=args.concurrency, duration=None, max_ops=None
        )
        rate = warm / (time.perf_counter() - t0)
        if args.ops is not None:
            count = args.ops
        else:
            count = int(rate * args.duration * 2.5) + args.concurrency
        count = min(count, max(args.concurrency, RAW_PREBUILD_CAP // per))
        prebuilt = await build(count)
        result = await measure(
            (op, "raw", target, size),
            commit,
            iter(prebuilt),
            args=args,
            per_op_resources=per,
            server_pid=None,
            warmup_ops=0,
        )
        if args.ops is None and result.seconds < args.duration * 0.9:
            log(f"  note: raw {op} used all {count:,} pre-built writes in {result.seconds:.1f} s")
        return result

    async def run_size(self, target: int, stack: contextlib.AsyncExitStack) -> None:
        """Everything at one data size, on a fresh store."""
        from hie.config import Settings
        from hie.fhir.search.registry import Registry
        from hie.fhir.service import FhirService
        from hie.store.sqlite import SqliteStore

        args = self.args
        self.pool = Pool()
        self.start_hie(self.workdir / f"data-{target}")
        async with contextlib.AsyncExitStack() as local:
            n = max([args.concurrency, *args.scaling])
            clients = {
                "hie": self.clients(local, self.hie.url, n),
                "open": self.clients(local, self.open.url, n),
            }
            await self.prefill(clients["hie"], target)
            if self.bare is None:
                self.start_bare(await self.capture_bare_spec(clients["hie"][0]))
                self.bare_clients = self.clients(stack, self.bare.url, args.concurrency)
            w = self.make_workloads()
            first = self.state()
            log(
                f"size {target:,}: store holds {first.data:,} resources "
                f"and {first.audit_records:,} AuditEvents"
            )
            settings = Settings(data_dir=self.data_dir, sqlite_synchronous=args.synchronous)
            store = SqliteStore(self.data_dir, synchronous=args.synchronous)
            await store.open()
            local.push_async_callback(store.close)
            service = FhirService(store, settings, Registry())
            for op in OPS:
                await self.run_served(op, w, target, clients, args.concurrency)
                self.results.append(
                    await self.run_http(
                        "bare", self.bare_clients, self.bare, op, w, target, args.concurrency
                    )
                )
                self.results.append(await self.run_raw(store, service, op, w, target))
                if op == "read":  # throughput against concurrency, before the writes
                    for c in args.scaling:
                        if c != args.concurrency:
                            await self.run_served(op, w, target, clients, c)
        self.spans[target] = (first, self.state())
        self.db_mib[target] = round(
            sum(f.stat().st_size for f in self.data_dir.glob("hie.sqlite3*")) / 2**20, 1
        )
        self.hie.stop()
        self.open.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    async def run(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            for target in self.args.sizes:
                await self.run_size(target, stack)

    def servers(self) -> list[Server]:
        """The running servers: secured HIE, open HIE, bare app (as started)."""
        return [s for s in (self.hie, self.open, self.bare) if s is not None]

    def stop(self) -> None:
        for server in self.servers():
            server.stop()


# --------------------------------------------------------------------------- report


MEDIAN_FIELDS = (
    "ops_per_s",
    "resources_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "server_cpu_ms_per_op",
    "client_cpu_pct",
    "other_cpu_cores",
)
SUM_FIELDS = (
    "ops",
    "errors",
    "seconds",
    "attempts",
    "requests",
    "audit_records",
    "audit_commits",
    "db_growth_bytes",
)
Key = tuple[str, str, int, int]  # op, variant, size step, concurrency


def medians(results: list[PhaseResult]) -> dict[Key, PhaseResult]:
    """One figure per (op, variant, size step, concurrency): the median of its rounds,
    counts summed."""
    groups: dict[Key, list[PhaseResult]] = {}
    for r in results:
        groups.setdefault((r.op, r.variant, r.target, r.concurrency), []).append(r)

    def values(rs: list[PhaseResult], name: str) -> list:
        return [v for v in (getattr(r, name) for r in rs) if v is not None]

    return {
        key: replace(
            rs[0],
            **{f: statistics.median(v) if (v := values(rs, f)) else None for f in MEDIAN_FIELDS},
            **{f: sum(v) if (v := values(rs, f)) else None for f in SUM_FIELDS},
        )
        for key, rs in groups.items()
    }


def report(bench: Bench, info: dict, argv: list[str]) -> str:
    args = bench.args
    med = medians(bench.results)
    c = args.concurrency
    by = {(op, v, t): r for (op, v, t, conc), r in med.items() if conc == c}
    targets = list(dict.fromkeys(r.target for r in bench.results))
    out = ["# HIE CRUD benchmark", "", f"Command: `{' '.join(argv)}`", ""]
    out.append(
        f"Machine: {info['nproc']} CPUs ({info['cpu_model']}), {info['ram_gib']} GiB RAM, "
        f"Python {info['python']}, SQLite {info['sqlite']}, {info['event_loop']}; "
        f"hie {info['hie_revision']}; {info['date']}."
    )
    out.append(
        f"Settings: concurrency {c}, "
        + (f"{args.ops} ops per phase" if args.ops else f"{args.duration:g} s per phase")
        + f", bundle size {args.bundle_size}, {args.workers} uvicorn worker(s), "
        f"SQLite synchronous={args.synchronous}, seed {args.seed}, {args.rounds} round(s) "
        "per HIE server. The load generator and the servers share the same CPUs."
    )
    out += [
        "",
        "| size | op | HIE ops/s | HIE p50 / p95 ms | bare ops/s | bare p50 / p95 ms "
        "| raw ops/s | raw p50 / p95 ms | HIE / bare | HIE / raw "
        "| server CPU ms/op HIE / bare | HIE / bare by CPU | load-gen CPU % HIE / bare |",
        "|" + "---|" * 13,
    ]
    for target in targets:
        for op in OPS:
            h, b, r = (by.get((op, v, target)) for v in ("hie", "bare", "raw"))
            if h is None:
                continue
            cpu = f"{_cpu(h)} / {_cpu(b)}"
            client = f"{_pct(h)} / {_pct(b)}"
            out.append(
                f"| {target:,} | {op} | {_rate(h, op)} | {_lat(h)} | {_rate(b, op)} | {_lat(b)} "
                f"| {_rate(r, op)} | {_lat(r)} | {_ratio(h, b)} | {_ratio(h, r)} "
                f"| {cpu} | {_cpu_ratio(h, b)} | {client} |"
            )
    out += ["", *_audit_table(bench, by, targets), "", *_scaling_table(bench, med, targets)]
    out += [
        "",
        "Targets (embedded store):",
        "",
        "| size | read: HIE / bare >= 50% (throughput; by server CPU) "
        "| read: secured / open >= 70% (throughput; by server CPU) "
        "| bundle ingest >= 1,000 resources/s |",
        "|---|---|---|---|",
    ]
    for target in targets:
        h, o, b = (by.get(("read", v, target)) for v in ("hie", "open", "bare"))
        bh = by.get(("bundle", "hie", target))
        bundle_cell = "n/a"
        if bh:
            ok = bh.resources_per_s >= 1000
            bundle_cell = f"{bh.resources_per_s:,.0f} res/s {'met' if ok else 'MISSED'}"
        out.append(f"| {target:,} | {_target(h, b, 0.5)} | {_target(h, o, 0.7)} | {bundle_cell} |")
    out.append("")
    spans = ", ".join(
        f"{t:,}: {a.data:,} → {b.data:,} resources, {a.audit_records:,} → "
        f"{b.audit_records:,} AuditEvents ({bench.db_mib[t]:,.0f} MiB on disk)"
        for t, (a, b) in bench.spans.items()
    )
    out.append(
        "size = the --sizes step, each on a fresh store; stored at its first phase "
        f"→ after its last (write phases add data as they run): {spans}."
    )
    if bench.prefill_stats:
        fills = ", ".join(
            f"{p['added']:,} in {p['seconds']:.1f} s ({p['res_per_s']:,.0f} res/s)"
            for p in bench.prefill_stats
        )
        out.append(
            f"Pre-fill via transaction Bundles over HTTP to the secured server, concurrency "
            f"{PREFILL_CONCURRENCY} (includes server warm-up): {fills}."
        )
    others = [r for r in bench.results if r.other_cpu_cores is not None]
    if others:
        worst = max(others, key=lambda r: r.other_cpu_cores)
        mean = sum(r.other_cpu_cores for r in others) / len(others)
        out.append(
            f"CPU used by other processes on the machine during the phases: mean "
            f"{mean:.2f} cores, max {worst.other_cpu_cores:.2f} ({worst.op} {worst.variant} "
            f"at {worst.target:,})"
            + (" - figures are disturbed; rerun on a quiet machine." if mean > 0.25 else ".")
        )
    out.append(
        "HIE = the secured server (authentication and audit on); open = the same server "
        "on the same store with HIE_AUTH=off HIE_AUDIT=off; each the median of its "
        "rounds. bare = minimal FastAPI route returning the same bytes; raw = SqliteStore "
        "in-process. Server CPU = CPU time of the server process tree per operation "
        "(raw: the benchmark process); X / Y by CPU = Y's CPU per op / X's CPU per op. "
        "Load-gen CPU = the client process, % of one core."
    )
    return "\n".join(out) + "\n"


def _audit_table(bench: Bench, by: dict, targets: list[int]) -> list[str]:
    """Secured against open per operation, with what the audit log added."""
    rounds = {}
    for r in bench.results:
        if r.variant in SERVED and r.concurrency == bench.args.concurrency:
            rounds.setdefault((r.op, r.target, r.round), {})[r.variant] = r
    out = [
        "Authentication and audit overhead: secured (HIE) against open, concurrency "
        f"{bench.args.concurrency}:",
        "",
        "| size | op | secured ops/s | open ops/s | secured / open (each round) "
        "| secured p50 / p95 ms | open p50 / p95 ms | server CPU ms/op secured / open "
        "| secured / open by CPU | AuditEvents per request | AuditEvents per commit "
        "| DB growth KiB per 1,000 requests secured / open |",
        "|" + "---|" * 12,
    ]
    for target in targets:
        for op in OPS:
            h, o = by.get((op, "hie", target)), by.get((op, "open", target))
            if h is None or o is None:
                continue
            each = ", ".join(
                _ratio(pair["hie"], pair.get("open"))
                for (op_, t, _), pair in sorted(rounds.items())
                if (op_, t) == (op, target) and "hie" in pair
            )
            out.append(
                f"| {target:,} | {op} | {_rate(h, op)} | {_rate(o, op)} "
                f"| {_ratio(h, o)} ({each}) | {_lat(h)} | {_lat(o)} | {_cpu(h)} / {_cpu(o)} "
                f"| {_cpu_ratio(h, o)} | {_per(h.audit_records, h.requests)} "
                f"| {_per(h.audit_records, h.audit_commits)} | {_growth(h)} / {_growth(o)} |"
            )
    return out


def _scaling_table(bench: Bench, med: dict[Key, PhaseResult], targets: list[int]) -> list[str]:
    """Read throughput against concurrency on both HIE servers, with the group size."""
    levels = sorted({k[3] for k in med if k[0] == "read" and k[1] in SERVED})
    if len(levels) < 2:
        return []
    out = [
        "Reads against concurrency (does the audit log serialise the server?):",
        "",
        f"| size | concurrency | secured ops/s | open ops/s | secured / open "
        f"| secured speed-up vs {levels[0]} | open speed-up vs {levels[0]} "
        "| secured p50 / p95 ms | open p50 / p95 ms | server CPU ms/op secured / open "
        "| AuditEvents per commit |",
        "|" + "---|" * 11,
    ]
    for target in targets:
        base = {v: med.get(("read", v, target, levels[0])) for v in SERVED}
        for level in levels:
            h, o = (med.get(("read", v, target, level)) for v in SERVED)
            if h is None or o is None:
                continue
            out.append(
                f"| {target:,} | {level} | {_rate(h, 'read')} | {_rate(o, 'read')} "
                f"| {_ratio(h, o)} | {_speedup(h, base['hie'])} | {_speedup(o, base['open'])} "
                f"| {_lat(h)} | {_lat(o)} | {_cpu(h)} / {_cpu(o)} "
                f"| {_per(h.audit_records, h.audit_commits)} |"
            )
    return out


def _target(h: PhaseResult | None, base: PhaseResult | None, goal: float) -> str:
    """A target cell: h's throughput as a share of base's against ``goal``, and the
    same by server CPU."""
    if h is None or base is None or not base.ops_per_s:
        return "n/a"
    ratio = h.ops_per_s / base.ops_per_s
    return f"{ratio:.0%} {'met' if ratio >= goal else 'MISSED'}; {_cpu_ratio(h, base)}"


def _per(count: int | None, per: int | None) -> str:
    return "n/a" if count is None or not per else f"{count / per:,.1f}"


def _growth(x: PhaseResult) -> str:
    if x.db_growth_bytes is None or not x.requests:
        return "n/a"
    return fmt_num(x.db_growth_bytes / x.requests * 1000 / 1024)


def _speedup(x: PhaseResult, base: PhaseResult | None) -> str:
    return "n/a" if base is None or not base.ops_per_s else f"{x.ops_per_s / base.ops_per_s:.2f}×"


def _rate(x: PhaseResult | None, op: str) -> str:
    if x is None:
        return "n/a"
    s = fmt_num(x.ops_per_s, 0 if x.ops_per_s >= 100 else 1)
    if op == "bundle":
        s += f" ({fmt_num(x.resources_per_s)} res/s)"
    if x.errors:
        s += f" **{x.errors} errors**"
    return s


def _lat(x: PhaseResult | None) -> str:
    return "n/a" if x is None else f"{fmt_ms(x.p50_ms)} / {fmt_ms(x.p95_ms)}"


def _ratio(h: PhaseResult, x: PhaseResult | None) -> str:
    return "n/a" if x is None or not x.ops_per_s else f"{h.ops_per_s / x.ops_per_s:.1%}"


def _cpu_ratio(h: PhaseResult, b: PhaseResult | None) -> str:
    """Bare server CPU per op over HIE's: the throughput ratio if the server were the
    only bottleneck (on this machine the load generator usually is)."""
    if b is None or not h.server_cpu_ms_per_op or b.server_cpu_ms_per_op is None:
        return "n/a"
    return f"{b.server_cpu_ms_per_op / h.server_cpu_ms_per_op:.1%}"


def _cpu(x: PhaseResult | None) -> str:
    return "n/a" if x is None else fmt_num(x.server_cpu_ms_per_op, 2)


def _pct(x: PhaseResult | None) -> str:
    return "n/a" if x is None else fmt_num(x.client_cpu_pct)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark HIE create/read/update/transaction ingest against a bare "
        "FastAPI endpoint and the raw SQLite store.",
    )
    p.add_argument(
        "--sizes",
        type=ascending_sizes,
        default="1k,10k,100k",
        help="store sizes (resources) to measure at, ascending, e.g. 1k,10k,100k",
    )
    p.add_argument("--concurrency", type=int, default=16, help="concurrent client workers")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per measured phase")
    p.add_argument(
        "--ops", type=int, default=None, help="operations per phase (instead of --duration)"
    )
    p.add_argument("--bundle-size", type=int, default=100, help="entries per transaction Bundle")
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers of both servers")
    p.add_argument(
        "--synchronous",
        default="FULL",
        choices=["OFF", "NORMAL", "FULL", "EXTRA"],
        help="SQLite synchronous mode of server and raw store (HIE's default: FULL)",
    )
    p.add_argument(
        "--shared-pool",
        action="store_true",
        help="one httpx.AsyncClient with a pool of --concurrency connections for all workers "
        "(default: one keep-alive client per worker; the shared pool costs more client CPU)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="phases of each operation on each HIE server (secured and open), in "
        "alternating order; the report gives their median",
    )
    p.add_argument(
        "--scaling",
        default="1,4,16",
        help="concurrencies at which reads are measured on both HIE servers "
        "(comma-separated; '' for none)",
    )
    p.add_argument("--seed", type=int, default=20240601, help="RNG seed of the generated data")
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a phase again (keeping the quietest attempt) up to this many times "
        "when other processes used more than --quiet-threshold cores during it",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.5,
        help="CPU cores other processes may use during a phase before it is retried "
        "(a write phase's own disk I/O shows up as some 0.1-0.4 cores of kernel work)",
    )
    p.add_argument("--json", metavar="PATH", help="also write all figures as JSON to PATH")
    p.add_argument(
        "--py-spy",
        metavar="DIR",
        help="profile each HIE server with py-spy (on PATH or next to this Python) during "
        "its first round of each operation; collapsed stacks per thread to DIR. The "
        "profiler takes CPU: take the figures from a run without it",
    )
    p.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_bare is None:
        if args.concurrency < 1 or args.bundle_size < 2 or args.duration <= 0:
            p.error("--concurrency >= 1, --bundle-size >= 2 and --duration > 0 required")
        if args.ops is not None and args.ops < 1:
            p.error("--ops must be >= 1")
        args.scaling = sorted({int(c) for c in args.scaling.split(",") if c.strip()})
        if args.rounds < 1 or any(c < 1 for c in args.scaling):
            p.error("--rounds >= 1 and --scaling concurrencies >= 1 required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_bare is not None:
        serve_bare(args.serve_bare, args.workers)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on SIGTERM too
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="hie-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            run_async(bench.run())
        except BaseException:
            for server in bench.servers():
                if server.proc is not None:
                    log(f"{server.name} log tail:\n{server.tail()}")
            raise
        finally:
            bench.stop()
    shown = ["scripts/bench_crud.py", *(argv if argv is not None else sys.argv[1:])]
    sys.stdout.write(report(bench, info, [".venv/bin/python", *shown]))
    if args.json:
        payload = {
            "machine": info,
            "args": {k: v for k, v in vars(args).items() if k != "serve_bare"},
            "prefill": bench.prefill_stats,
            "stored": {
                str(t): {"start": asdict(a), "end": asdict(b), "db_mib": bench.db_mib.get(t)}
                for t, (a, b) in bench.spans.items()
            },
            "results": [asdict(r) for r in bench.results],
            "notes": "latencies in ms; server_cpu_ms_per_op is per attempted operation",
        }
        Path(args.json).write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
