#!/usr/bin/env python
"""Master patient index benchmark: ``Patient/$match`` latency and registration throughput
as the population grows, on the embedded store.

Starts a real ``hie serve`` (authentication and audit on) on a fresh temporary data
directory, registers three member clients (``hie client add``) and fills the store with
the synthetic Chinese population of ``scripts/mpi_population.py`` (each person registered
at one to three members, with the generator's typos, homophones and missing fields): every
member registration is a Patient create in a transaction Bundle of ``--bundle-size``
entries from that member, so the MPI matches it as it arrives. The population grows in
steps (``--sizes``, in people: golden records); at each step the script measures, against
the same server:

* ``$match``: ``POST /fhir/Patient/$match`` of ``--queries`` query Patients, half of them
  a stored registration of a random known person as another member would send it, half a
  person nobody registered; one client (latency) and ``--concurrency`` clients. Before
  them, ``--warmup`` queries of other people, one client, timed apart: the server has
  just started on data the loader wrote, and a server in service has its working set
  cached. The report gives both;
* the baseline: ``GET /fhir/Patient?identifier=<system>|<value>`` for the same people (an
  indexed search through the same authentication, audit and HTTP path), so the report
  gives ``$match`` / search;
* registration throughput: ``POST /fhir/Patient`` of new people's registrations for
  ``--duration`` seconds with ``--concurrency`` clients, against ``POST /fhir/Observation``
  (no MPI work) in the same phase order;
* the golden records, HieMpiRecord entries, review items and database size.

With ``--fill bulk`` the population is not registered through the API but loaded with
the server stopped by :mod:`mpi_bulk` (the same MPI decisions and writes, without HTTP or
AuditEvents; hours become minutes), and the ``$match`` answers are checked: a known
person's query must find the golden record the loader linked that registration to, first.

``--reuse`` measures again the population a previous run left in ``--workdir`` (give
the one size it loaded last, and the same ``--seed`` and ``--fresh-people``): each
registration's member record and golden record are read from the store, and the answers
are checked in the same way. A 1M population takes two hours to load and minutes to
measure again.

Output: a Markdown report on stdout (``--json PATH`` writes every figure); progress on
stderr. Examples::

    .venv/bin/python scripts/bench_mpi.py --sizes 10k,100k
    .venv/bin/python scripts/bench_mpi.py --fill bulk --sizes 10k,100k,1m --workdir /tmp/mpi
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import orjson
from bench_common import (  # the scripts' shared helpers, next to this file
    FHIR_JSON,
    HOST,
    Server,
    ascending_sizes,
    clean_env,
    fmt_ms,
    fmt_num,
    free_port,
    hie_executable,
    log,
    machine_info,
    percentile,
    run_async,
)
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from mpi_bulk import BulkLoader
from mpi_population import MEMBER_NAMES, population

from hie.mpi import RESIDENT_ID_SYSTEM

MEMBERS = MEMBER_NAMES[:3]
SCOPE = "system/Patient.cruds system/Observation.cruds"


def _hie(*args: str, data_dir: Path) -> str:
    done = subprocess.run(
        [*hie_executable(), *args],
        env=clean_env(HIE_DATA_DIR=str(data_dir)),
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def member_tokens(data_dir: Path, register: bool = True) -> dict[str, str]:
    """Register one client per member (a throw-away public key: the benchmark mints its
    tokens with ``hie token`` instead of the token endpoint; ``register=False``: they are
    registered already) and mint day-long tokens."""
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    pem = data_dir / "bench-client.pem"
    pem.write_bytes(key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    tokens = {}
    for i, member in enumerate(MEMBERS):
        client = f"bench-{i}"
        if register:
            _hie(
                "client", "add", client, "--org", f"Organization/{member}", "--role", "member",
                "--org-name", member, "--scope", SCOPE, "--public-key", str(pem),
                data_dir=data_dir,
            )  # fmt: skip
        out = _hie("token", "--client", client, "--ttl", "86400", data_dir=data_dir)
        tokens[member] = out.splitlines()[-1]
    return tokens


def _match_params(patient: dict) -> dict:
    """The ``$match`` Parameters of a query Patient (ten results at most)."""
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "resource", "resource": patient},
            {"name": "count", "valueInteger": 10},
        ],
    }


def stored_population(data_dir: Path) -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    """From a data directory: member record ids by (identifier system, value), leaving
    golden records out; golden record ids by member record id."""
    db = data_dir / "hie.sqlite3"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        golden = dict(
            conn.execute(
                "SELECT id, text FROM search_index WHERE type = 'HieMpiRecord' AND param = 'golden'"
            )
        )
        ids = {
            (system, value): id_
            for id_, system, value in conn.execute(
                "SELECT id, system, text FROM search_index WHERE type = 'Patient'"
                " AND param = 'identifier' AND system <> ?",
                (RESIDENT_ID_SYSTEM,),
            )
            if id_ in golden
        }
    finally:
        conn.close()
    return ids, golden


def resident_id(patient: dict) -> str | None:
    for identifier in patient.get("identifier", ()):
        if identifier.get("system") == RESIDENT_ID_SYSTEM and identifier.get("value"):
            return identifier["value"]
    return None


class Bench:
    """One server, its member clients and the growing population."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.data_dir = workdir / "data"
        if not args.reuse:
            self.data_dir.mkdir()
        self.tokens = member_tokens(self.data_dir, register=not args.reuse)
        port = free_port()
        argv = [*hie_executable(), "serve", "--port", str(port), "--data-dir", str(self.data_dir)]
        self.server = Server("hie", argv, clean_env(), port, workdir / "server.log")
        self.base = f"http://{HOST}:{port}/fhir"
        people = args.sizes[-1] + args.fresh_people
        log(f"generating {people:,} synthetic people")
        registrations = population(people, members=len(MEMBERS), seed=args.seed)
        rng = random.Random(args.seed)
        fresh = set(rng.sample(sorted({p for _, _, p in registrations}), args.fresh_people))
        fresh_list = [(m, pat, p) for m, pat, p in registrations if p in fresh]
        unknown = {p for _, _, p in fresh_list[::2]}
        #: registrations of people never stored (the "nobody" half of the $match queries)
        self.unknown = [(m, pat) for m, pat, p in fresh_list if p in unknown]
        #: registrations of people the registration phases add
        self.fresh = [(m, pat) for m, pat, p in fresh_list if p not in unknown]
        self.stream = [(m, pat, p) for m, pat, p in registrations if p not in fresh]
        self.loaded = 0  # registrations of self.stream sent so far
        #: each stored person's registrations: (member, Patient, member record id when known)
        self.people: dict[str, list[tuple[str, dict, str | None]]] = {}
        #: the golden record of each member record, where known (bulk load, reuse)
        self.golden_of: dict[str, str] = {}
        self.loader = None
        if args.fill == "bulk" and not args.reuse:
            organizations = {m: f"Organization/{m}" for m in MEMBERS}
            clients = {m: f"bench-{i}" for i, m in enumerate(MEMBERS)}
            self.loader = BulkLoader(self.data_dir, organizations, clients, args.seed)

    def client(self, member: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base,
            headers={"Authorization": f"Bearer {self.tokens[member]}", "Content-Type": FHIR_JSON},
            timeout=120,
        )

    def _next(self, people: int) -> list[tuple[str, dict, str]]:
        """The registrations of the stream that bring the stored persons to ``people``."""
        out = []
        while len(self.people) < people and self.loaded < len(self.stream):
            out.append(self.stream[self.loaded])
            self.loaded += 1
            self.people.setdefault(out[-1][2], [])
        return out

    async def fill_bulk(self, people: int) -> dict:
        """Load the registrations with the server stopped (:mod:`mpi_bulk`)."""
        regs = self._next(people)
        self.server.stop()
        log(f"  bulk-loading {len(regs):,} registrations")
        ids, stats = await self.loader.load([(m, pat) for m, pat, _ in regs])
        for (member, patient, person), pid in zip(regs, ids, strict=True):
            self.people[person].append((member, patient, pid))
        self.golden_of = self.loader.golden_of
        log(f"  loaded: {stats}")
        self.server.start(timeout=600)
        return {**stats, "registrations": len(regs)}

    def reuse(self, people: int) -> dict:
        """Take the population a previous run left in the data directory as loaded: each
        registration's member record found by its member identifier, each member
        record's golden record by its ``HieMpiRecord``."""
        regs = self._next(people)
        log(f"  reusing the stored population ({len(regs):,} registrations)")
        ids, self.golden_of = stored_population(self.data_dir)
        for member, patient, person in regs:
            mrn = next(i for i in patient["identifier"] if i["system"] != RESIDENT_ID_SYSTEM)
            self.people[person].append((member, patient, ids.get((mrn["system"], mrn["value"]))))
        self.server.start(timeout=600)
        return {"registrations": len(regs), "reused": True}

    async def fill(self, people: int) -> dict:
        """Register the stream through the API until ``people`` distinct persons are stored."""
        batch: dict[str, list[dict]] = {m: [] for m in MEMBERS}
        queue: asyncio.Queue = asyncio.Queue(maxsize=8)
        sent = 0

        async def worker() -> None:
            nonlocal sent
            clients = {m: self.client(m) for m in MEMBERS}
            try:
                while (item := await queue.get()) is not None:
                    member, entries = item
                    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
                    r = await clients[member].post("", content=orjson.dumps(bundle))
                    if r.status_code != 200:
                        raise RuntimeError(f"transaction failed {r.status_code}: {r.text[:500]}")
                    sent += len(entries)
            finally:
                for c in clients.values():
                    await c.aclose()

        workers = [asyncio.create_task(worker()) for _ in range(self.args.fill_concurrency)]
        start = time.perf_counter()
        count = 0
        for member, patient, person in self._next(people):
            self.people[person].append((member, patient, None))
            batch[member].append(
                {"resource": patient, "request": {"method": "POST", "url": "Patient"}}
            )
            count += 1
            if len(batch[member]) >= self.args.bundle_size:
                await queue.put((member, batch[member]))
                batch[member] = []
        for member, entries in batch.items():
            if entries:
                await queue.put((member, entries))
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
        seconds = time.perf_counter() - start
        log(f"  filled {count:,} registrations in {seconds:.1f} s ({count / seconds:,.0f}/s)")
        return {"registrations": count, "seconds": seconds, "per_second": count / seconds}

    def queries(self, n: int, rng: random.Random, taken: set[str]) -> list[tuple[dict, str | None]]:
        """Half known people (a stored registration, with the golden record it belongs to
        when the loader knows it), half people nobody registered (``None``); none of the
        people in ``taken``, to which the people chosen are added."""
        free = sorted(set(self.people) - taken)
        known = rng.sample(free, min(n // 2, len(free)))
        out = []
        for person in known:
            _, patient, pid = rng.choice(self.people[person])
            out.append((patient, self.golden_of.get(pid)))
        spare = [i for i in range(len(self.unknown)) if f"unknown:{i}" not in taken]
        unknown = rng.sample(spare, min(n - len(out), len(spare)))
        out += [(self.unknown[i][1], None) for i in unknown]
        taken.update(known, (f"unknown:{i}" for i in unknown))
        rng.shuffle(out)
        return out

    async def timed(
        self, items: list, call: Callable[[httpx.AsyncClient, object], Awaitable[int]], conc: int
    ) -> dict:
        """Run ``call`` over ``items`` with ``conc`` clients; latency percentiles in ms."""
        latencies: list[float] = []
        queue = list(items)
        member = MEMBERS[0]

        async def worker() -> None:
            async with self.client(member) as c:
                while queue:
                    item = queue.pop()
                    t = time.perf_counter()
                    status = await call(c, item)
                    latencies.append((time.perf_counter() - t) * 1000)
                    if status >= 400:
                        raise RuntimeError(f"request failed with {status}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        seconds = time.perf_counter() - start
        latencies.sort()
        return {
            "n": len(latencies),
            "ops": len(latencies) / seconds,
            "p50": percentile(latencies, 0.5),
            "p95": percentile(latencies, 0.95),
        }

    async def match_phase(self, rng: random.Random) -> dict:
        """``--warmup`` queries first, then the measured ones: other people, so that the
        measured queries find the server's cache as a server in service has it, not
        their own blocks read by the warm-up. The warm-up is timed too (``warmup``: the
        first queries after the server started on the new data)."""
        taken: set[str] = set()
        queries = self.queries(self.args.queries, rng, taken)
        params = [_match_params(q) for q, _ in queries]
        warm = [_match_params(q) for q, _ in self.queries(self.args.warmup, rng, taken)]
        ids = [resident_id(q) for q, _ in queries]
        ids = [i for i in ids if i] or ["000000000000000000"]

        async def match(c: httpx.AsyncClient, body: object) -> int:
            r = await c.post("/Patient/$match", content=orjson.dumps(body))
            return r.status_code

        async def search(c: httpx.AsyncClient, value: object) -> int:
            r = await c.get("/Patient", params={"identifier": f"{RESIDENT_ID_SYSTEM}|{value}"})
            return r.status_code

        out = {"warmup": await self.timed(warm, match, 1)}
        log(f"  warm-up: {out['warmup']}")
        for conc in (1, self.args.concurrency):
            out[f"match_c{conc}"] = await self.timed(params, match, conc)
            out[f"search_c{conc}"] = await self.timed(ids, search, conc)
        if self.golden_of:
            out["check"] = await self.check(params, [g for _, g in queries])
        return out

    async def check(self, params: list[dict], expected: list[str | None]) -> dict:
        """Untimed: whether each known person's query finds its golden record first (as
        the loader linked it), and whether queries of people nobody registered find no
        certain match."""
        counts = {"known": 0, "first": 0, "found": 0, "unknown": 0, "no_certain": 0}
        async with self.client(MEMBERS[0]) as c:
            for body, golden in zip(params, expected, strict=True):
                r = await c.post("/Patient/$match", content=orjson.dumps(body))
                entries = [  # leave out the OperationOutcome notes (search mode "outcome")
                    e for e in r.json().get("entry", []) if e["search"].get("mode") == "match"
                ]
                ids = [e["resource"]["id"] for e in entries]
                if golden is None:
                    counts["unknown"] += 1
                    grades = [_grade(e) for e in entries]
                    counts["no_certain"] += "certain" not in grades
                else:
                    counts["known"] += 1
                    counts["first"] += ids[:1] == [golden]
                    counts["found"] += golden in ids
        log(f"  $match answers: {counts}")
        return counts

    async def register_phase(self) -> dict:
        """POST single registrations of fresh people (MPI on) against Observations."""
        out = {}
        duration = self.args.duration
        for kind in ("Patient", "Observation", "Observation", "Patient"):
            fresh = iter(self.fresh[self.fresh_used :])
            latencies: list[float] = []
            stop = time.perf_counter() + duration

            async def worker(fresh=fresh, latencies=latencies, stop=stop, kind=kind) -> None:
                async with self.client(MEMBERS[1]) as c:
                    while time.perf_counter() < stop:
                        if kind == "Patient":
                            item = next(fresh, None)
                            if item is None:
                                return
                            self.fresh_used += 1
                            body = item[1]
                        else:
                            body = {
                                "resourceType": "Observation",
                                "status": "final",
                                "code": {"text": "bench"},
                                "subject": {"reference": "Patient/bench"},
                            }
                        t = time.perf_counter()
                        r = await c.post(f"/{kind}", content=orjson.dumps(body))
                        latencies.append((time.perf_counter() - t) * 1000)
                        if r.status_code != 201:
                            raise RuntimeError(f"{kind} create failed {r.status_code}: {r.text}")

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(self.args.concurrency)))
            seconds = time.perf_counter() - start
            latencies.sort()
            out.setdefault(kind, []).append(
                {
                    "n": len(latencies),
                    "ops": len(latencies) / seconds,
                    "p50": percentile(latencies, 0.5),
                    "p95": percentile(latencies, 0.95),
                }
            )
        return out

    def counts(self) -> dict:
        db = self.data_dir / "hie.sqlite3"
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            n = dict(conn.execute("SELECT type, n FROM live_counts").fetchall())
            golden = conn.execute(
                "SELECT count(*) FROM search_index WHERE type = 'Patient' AND param = '_tag'"
                " AND text = 'golden-record'"
            ).fetchone()[0]
            pages, free, size = (
                conn.execute(f"PRAGMA {p}").fetchone()[0]
                for p in ("page_count", "freelist_count", "page_size")
            )
        finally:
            conn.close()
        wal = db.with_name(db.name + "-wal")
        return {
            "patients": n.get("Patient", 0),
            "golden": golden,
            "records": n.get("HieMpiRecord", 0),
            "reviews": n.get("HieMpiReview", 0),
            "db_mib": ((pages - free) * size + (wal.stat().st_size if wal.exists() else 0)) / 2**20,
        }

    async def run(self) -> list[dict]:
        rng = random.Random(self.args.seed + 1)
        self.fresh_used = 0
        steps = []
        for size in self.args.sizes:
            log(f"step: {size:,} people")
            if self.args.reuse:
                fill = self.reuse(size)
            else:
                fill = await (self.fill_bulk(size) if self.loader else self.fill(size))
            step = {"people": size, "fill": fill}
            step.update(await self.match_phase(rng))
            step["register"] = await self.register_phase()
            step["store"] = self.counts()
            steps.append(step)
            log(f"  {step['store']}")
        return steps


def _grade(entry: dict) -> str | None:
    for ext in entry.get("search", {}).get("extension", ()):
        if ext.get("url", "").endswith("match-grade"):
            return ext.get("valueCode")
    return None


def report(args: argparse.Namespace, steps: list[dict], machine: dict) -> str:
    c = args.concurrency
    lines = [
        f"Machine: {machine}",
        f"Fill: {'reused' if args.reuse else args.fill}",
        "",
        f"| people | member records | golden records | reviews | DB MiB | fill regs/s "
        f"| $match p50 / p95 ms (c1) | warm-up $match p50 / p95 ms (first {args.warmup}) "
        f"| search p50 / p95 ms (c1) | $match / search p50 "
        f"| $match ops/s (c{c}) | search ops/s (c{c}) | Patient create/s (c{c}) "
        f"| Observation create/s (c{c}) | Patient / Observation |",
        "|---" * 15 + "|",
    ]
    for s in steps:
        m1, s1, w = s["match_c1"], s["search_c1"], s["warmup"]
        mc, sc = s[f"match_c{c}"], s[f"search_c{c}"]
        pat = statistics.median(r["ops"] for r in s["register"]["Patient"])
        obs = statistics.median(r["ops"] for r in s["register"]["Observation"])
        st = s["store"]
        lines.append(
            f"| {s['people']:,} | {st['patients'] - st['golden']:,} | {st['golden']:,} "
            f"| {st['reviews']:,} | {st['db_mib']:,.0f} "
            f"| {fmt_num(s['fill']['per_second']) if 'per_second' in s['fill'] else 'reused'} "
            f"| {fmt_ms(m1['p50'])} / {fmt_ms(m1['p95'])} "
            f"| {fmt_ms(w['p50']) if w['n'] else '-'} / {fmt_ms(w['p95']) if w['n'] else '-'} "
            f"| {fmt_ms(s1['p50'])} / "
            f"{fmt_ms(s1['p95'])} | {m1['p50'] / s1['p50']:.2f}× | {fmt_num(mc['ops'])} "
            f"| {fmt_num(sc['ops'])} | {fmt_num(pat)} | {fmt_num(obs)} | {pat / obs:.0%} |"
        )
    checks = [(s["people"], s["check"]) for s in steps if "check" in s]
    if checks:
        lines += [
            "",
            "| people | known people's $match: own golden record first / listed | "
            "unknown people's $match: no certain match |",
            "|---|---|---|",
        ]
        for people, c in checks:
            lines.append(
                f"| {people:,} | {c['first']} / {c['found']} of {c['known']} "
                f"| {c['no_certain']} of {c['unknown']} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes",
        type=ascending_sizes,
        default="10k,100k",
        help="people (golden records) per step, ascending",
    )
    p.add_argument("--queries", type=int, default=400, help="$match queries per phase")
    p.add_argument(
        "--warmup",
        type=int,
        default=2000,
        help="unmeasured $match queries of other people before each measured phase",
    )
    p.add_argument("--concurrency", type=int, default=4, help="clients of the loaded phases")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per registration phase")
    p.add_argument("--bundle-size", type=int, default=100, help="registrations per Bundle")
    p.add_argument("--fill-concurrency", type=int, default=2, help="Bundles in flight")
    p.add_argument("--fresh-people", type=int, default=3000, help="people kept for queries")
    p.add_argument("--seed", type=int, default=20250630)
    p.add_argument(
        "--fill",
        choices=("api", "bulk"),
        default="api",
        help="register the population through the API, or bulk-load it (scripts/mpi_bulk.py)",
    )
    p.add_argument("--json", type=Path, help="also write every figure as JSON here")
    p.add_argument("--workdir", type=Path, help="a new directory for the data, kept afterwards")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="measure again the population a previous run left in --workdir (one size: "
        "the one it loaded last, with the same --seed and --fresh-people) without loading",
    )
    args = p.parse_args(argv)
    if args.reuse and (args.workdir is None or len(args.sizes) != 1):
        p.error("--reuse needs --workdir and one size")
    return args


def main() -> None:
    args = parse_args()
    if args.workdir and not args.reuse:
        args.workdir.mkdir(parents=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hie-bench-mpi-"))
    try:
        bench = Bench(args, workdir)
        if args.fill == "api" and not args.reuse:
            bench.server.start()
        try:
            steps = run_async(bench.run())
        finally:
            bench.server.stop()
        machine = machine_info()
        print(report(args, steps, machine))
        if args.json:
            args.json.write_bytes(orjson.dumps({"args": vars(args), "steps": steps}, default=str))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
