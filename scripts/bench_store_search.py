#!/usr/bin/env python
"""Search latency of :class:`hie.store.sqlite.SqliteStore` as the data grows.

For each size N (resources in total) a fresh store in a temporary directory is filled
through :meth:`SqliteStore.commit` in large batches with a synthetic alliance:
Organizations (N/10,000), Practitioners (N/200, each in an Organization), Patients
(N/10, each with a Practitioner) and Observations (the rest, each of a Patient).
Ids are random hex like the server's. Index rows are what the extractor would give:

* Patient: ``identifier`` (token), ``name`` (8 random letters), ``gender``,
  ``birthdate`` (a day as [low, high]), ``general-practitioner`` (reference);
* Practitioner: ``identifier``, ``name``, ``organization``; Organization: ``name``;
* Observation: ``code`` (N/50 LOINC-like codes, so about 45 Observations a code at
  every size), ``status`` (90% ``final``), ``subject``, ``date`` (an instant in a
  10-year span), ``value-quantity`` (a value in [0, 1000) with its precision interval).

Loading uses ``synchronous=OFF`` and a large writer page cache (``--load-cache-mb``);
the searches run on the store reopened with its defaults. Each search runs ~200 times
with random arguments after a warm-up; the report gives p50/p95 in milliseconds and
as a multiple of the baseline, a ``read()`` by primary key measured in the same run
(the ``x`` columns). Query arguments are chosen so that the single-parameter searches
match a bounded number of resources (about 50) at every size; ``matches`` is their
mean total. The broad rows (a sort of all Observations, ``match_ids`` of
``status=final``) show the cost of walking an order; searches return the total.

Output: Markdown on stdout, progress on stderr. Example::

    .venv/bin/python scripts/bench_store_search.py --sizes 10k,100k,1m
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from hie.store import Write
from hie.store import sqlite as sqlite_store
from hie.store.query import Chain, Cond, Has, IndexRow, Match, Query, Sort
from hie.store.sqlite import SqliteStore

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
EPOCH = 1_577_836_800  # 2020-01-01T00:00:00Z
SPAN = 10 * 365 * 86_400
BATCH = 5_000


def instant(seconds: float) -> str:
    """Seconds since the epoch as the store's instant text."""
    whole = int(seconds)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{stamp}.{int((seconds - whole) * 1e6):06d}Z"


def parse_size(text: str) -> int:
    text = text.strip().lower()
    factor = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("km")) * factor)


@dataclass
class Data:
    """The ids of each type and what queries need to know about the generated data."""

    orgs: list[str]
    practitioners: list[str]
    patients: list[str]
    observations: list[str]
    codes: int
    names: list[str]
    npi: list[str]


def random_id(rnd: random.Random) -> str:
    return f"{rnd.getrandbits(128):032x}"


def letters(rnd: random.Random, n: int) -> str:
    return "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def generate(n: int, rnd: random.Random) -> tuple[Data, Iterator[list[Write]]]:
    """The data's ids, and its writes in batches."""
    counts = [max(5, n // 10_000), max(10, n // 200), n // 10]
    counts.append(n - sum(counts))
    orgs, practitioners, patients, observations = (
        [random_id(rnd) for _ in range(c)] for c in counts
    )
    data = Data(orgs, practitioners, patients, observations, max(20, n // 50), [], [])
    data.names = [letters(rnd, 8) for _ in patients]
    data.npi = [f"npi{k}" for k in range(len(practitioners))]

    def resource(type_: str, id_: str, **fields: object) -> bytes:
        meta = {"versionId": "1", "lastUpdated": instant(EPOCH)}
        return orjson.dumps({"resourceType": type_, "id": id_, "meta": meta, **fields})

    def writes() -> Iterator[Write]:
        lu = instant(EPOCH + SPAN)
        for k, id_ in enumerate(orgs):
            rows = (IndexRow("name", text=f"org {k}"),)
            yield Write("Organization", id_, 0, 1, lu, "POST", resource("Organization", id_), rows)
        for k, id_ in enumerate(practitioners):
            rows = (
                IndexRow("identifier", "urn:npi", data.npi[k]),
                IndexRow("name", text=letters(rnd, 8)),
                IndexRow("organization", "Organization", f"Organization/{rnd.choice(orgs)}"),
            )
            body = resource("Practitioner", id_, name=[{"family": rows[1].text}])
            yield Write("Practitioner", id_, 0, 1, lu, "POST", body, rows)
        for k, id_ in enumerate(patients):
            day = EPOCH - rnd.randrange(90 * 365) * 86_400
            gp = rnd.choice(practitioners)
            rows = (
                IndexRow("identifier", "urn:mrn", f"mrn{k}"),
                IndexRow("name", text=data.names[k]),
                IndexRow("gender", "http://hl7.org/fhir/administrative-gender", rnd.choice("mf")),
                IndexRow("birthdate", low=instant(day), high=instant(day + 86_399.999999)),
                IndexRow("general-practitioner", "Practitioner", f"Practitioner/{gp}"),
            )
            body = resource(
                "Patient",
                id_,
                name=[{"family": data.names[k], "given": ["Test"]}],
                gender="male",
                birthDate=rows[3].low[:10],
                generalPractitioner=[{"reference": f"Practitioner/{gp}"}],
            )
            yield Write("Patient", id_, 0, 1, lu, "POST", body, rows)
        for id_ in observations:
            at = EPOCH + rnd.random() * SPAN
            value = round(rnd.random() * 1000, 1)
            code = f"c{rnd.randrange(data.codes)}"
            subject = f"Patient/{rnd.choice(patients)}"
            rows = (
                IndexRow("code", LOINC, code),
                IndexRow("status", "http://hl7.org/fhir/observation-status", "final")
                if rnd.random() < 0.9
                else IndexRow("status", "http://hl7.org/fhir/observation-status", "amended"),
                IndexRow("subject", "Patient", subject),
                IndexRow("date", low=instant(at), high=instant(at)),
                IndexRow("value-quantity", UCUM, "mg", nlow=value - 0.05, nhigh=value + 0.05),
            )
            body = resource(
                "Observation",
                id_,
                status="final",
                code={"coding": [{"system": LOINC, "code": code}]},
                subject={"reference": subject},
                effectiveDateTime=rows[3].low,
                valueQuantity={"value": value, "unit": "mg", "system": UCUM, "code": "mg"},
            )
            yield Write("Observation", id_, 0, 1, instant(at), "POST", body, rows)

    def batches() -> Iterator[list[Write]]:
        batch: list[Write] = []
        for w in writes():
            batch.append(w)
            if len(batch) == BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    return data, batches()


def queries(data: Data, rnd: random.Random) -> list[tuple[str, str, Callable[[], Query]]]:
    """(name, type, generator of random queries) of each search (see the docstring)."""
    n_obs = len(data.observations)
    window = SPAN * 50 / n_obs  # seconds holding ~50 Observations

    def token() -> Query:
        code = f"c{rnd.randrange(data.codes)}"
        return (Match("code", (Cond("system", "eq", LOINC), Cond("text", "eq", code))),)

    def prefix() -> Query:
        return (Match("name", (Cond("text", "prefix", rnd.choice(data.names)[:5]),)),)

    def date() -> Query:
        start = EPOCH + rnd.random() * (SPAN - window)
        low, high = instant(start), instant(start + window)
        # Containment [low, high] plus the bound it implies on `low` (low <= high).
        conds = (Cond("low", "ge", low), Cond("low", "le", high), Cond("high", "le", high))
        return (Match("date", conds),)

    def number() -> Query:
        start = rnd.random() * 990
        # Values have one decimal (10,000 in [0, 1000), each [v - 0.05, v + 0.05]):
        # a range of 0.1 + w contains 10 w of them, each held by n_obs / 10,000.
        width = 0.1 + 50_000 / n_obs
        conds = (
            Cond("nlow", "ge", start),
            Cond("nlow", "le", start + width),
            Cond("nhigh", "le", start + width),
        )
        return (Match("value-quantity", conds),)

    def chain() -> Query:
        npi = Match("identifier", (Cond("text", "eq", rnd.choice(data.npi)),))
        gp = Chain("general-practitioner", "Practitioner", (npi,))
        return (Chain("subject", "Patient", (gp,)),)

    def has() -> Query:
        return (Has("Observation", "subject", token()),)

    return [
        ("token `code=C`", "Observation", token),
        ("string prefix `name=abcde`", "Patient", prefix),
        ("date range (containment)", "Observation", date),
        ("number range (containment)", "Observation", number),
        ("chain `subject.general-practitioner.identifier`", "Observation", chain),
        ("`_has:Observation:subject:code`", "Patient", has),
    ]


async def timed(run: Callable[[], Awaitable[object]], repeat: int) -> list[float]:
    for _ in range(min(20, repeat)):
        await run()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        await run()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def p(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[int(q) - 1]


async def bench(
    n: int, repeat: int, seed: int, load_cache_mb: int
) -> list[tuple[str, float, float, float]]:
    """Rows of (name, p50 ms, p95 ms, mean total) for size ``n``; the first is the baseline."""
    rnd = random.Random(seed)
    default_cache = sqlite_store.WRITER_CACHE_MB
    with tempfile.TemporaryDirectory(prefix="hie-bench-") as tmp:
        sqlite_store.WRITER_CACHE_MB = load_cache_mb
        store = SqliteStore(Path(tmp), synchronous="OFF")
        await store.open()
        data, batches = generate(n, rnd)
        start = time.perf_counter()
        for k, batch in enumerate(batches):
            await store.commit(batch)
            print(f"\r{n:,}: {min(n, (k + 1) * BATCH):,} loaded", end="", file=sys.stderr)
        load = time.perf_counter() - start
        size = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 1e9
        print(f" in {load:.0f} s ({n / load:,.0f}/s, {size:.1f} GB)", file=sys.stderr)
        await store.close()
        sqlite_store.WRITER_CACHE_MB = default_cache
        store = SqliteStore(Path(tmp), synchronous="NORMAL")
        await store.open()

        async def read() -> None:
            await store.read("Observation", rnd.choice(data.observations))

        rows = [("baseline: `read()` by id", *quantiles(await timed(read, repeat * 5)), 1.0)]
        for name, kind, make in queries(data, rnd):
            totals: list[int] = []

            async def search(make=make, kind=kind, totals=totals) -> None:
                totals.append((await store.search(kind, make(), count=20)).total)

            samples = await timed(search, repeat)
            rows.append((name, *quantiles(samples), statistics.mean(totals)))
        date_desc = (Sort("date", descending=True),)

        async def sorted_search() -> None:
            await store.search("Observation", (), sort=date_desc, count=20)

        async def sorted_ids() -> None:
            await store.match_ids("Observation", (), sort=date_desc, limit=20)

        final = (Match("status", (Cond("text", "eq", "final"),)),)

        async def broad_ids() -> None:
            await store.match_ids("Observation", final, limit=1000)

        async def broad_search() -> None:
            await store.search("Observation", final, count=20)

        n_obs = len(data.observations)
        for name, run, total in (
            ("`_sort=-date&_count=20`, all Observations (with total)", sorted_search, n_obs),
            ("`match_ids` sorted by -date, limit 20", sorted_ids, n_obs),
            ("`match_ids` of `status=final`, limit 1000", broad_ids, 0.9 * n_obs),
            ("`status=final&_count=20` (with total)", broad_search, 0.9 * n_obs),
        ):
            rows.append((name, *quantiles(await timed(run, max(10, repeat // 10))), total))
        await store.close()
    return rows


def quantiles(samples: list[float]) -> tuple[float, float]:
    return p(samples, 50), p(samples, 95)


def report(results: dict[int, list[tuple[str, float, float, float]]]) -> str:
    lines = []
    for n, rows in results.items():
        base50, base95 = rows[0][1], rows[0][2]
        lines += [
            f"\n### {n:,} resources\n",
            "| query | matches | p50 ms | p95 ms | p50 x | p95 x |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, p50, p95, total in rows:
            lines.append(
                f"| {name} | {total:,.0f} | {p50:.3f} | {p95:.3f} "
                f"| {p50 / base50:,.0f} | {p95 / base95:,.0f} |"
            )
    if len(results) > 1:
        sizes = list(results)
        lines += [
            "\n### p95 ms by size\n",
            "| query | " + " | ".join(f"{n:,}" for n in sizes) + " |",
            "|---|" + "---:|" * len(sizes),
        ]
        for k, (name, *_) in enumerate(results[sizes[0]]):
            lines.append(
                f"| {name} | " + " | ".join(f"{results[n][k][2]:.2f}" for n in sizes) + " |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10k,100k,1m", help="comma-separated, e.g. 10k,1m")
    parser.add_argument("--repeat", type=int, default=200, help="runs per search")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--load-cache-mb", type=int, default=1024, help="writer page cache while loading"
    )
    args = parser.parse_args()
    results = {}
    for n in (parse_size(s) for s in args.sizes.split(",")):
        results[n] = asyncio.run(bench(n, args.repeat, args.seed, args.load_cache_mb))
    print(report(results))


if __name__ == "__main__":
    main()
