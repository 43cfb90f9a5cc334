#!/usr/bin/env python
"""What one audit record costs: CPU per AuditEvent on the embedded store, by stage.

Every audited request writes one AuditEvent (``hie.audit``). This benchmark takes the
record of a typical read (a client of a member organisation reads an Observation of a
patient) through the stages it passes in the server, in-process and without HTTP, and
gives the CPU each costs per record:

* ``build``: the AuditEvent's body (:func:`hie.audit.events.audit_event`), on the event
  loop of the request;
* ``append``: :meth:`hie.audit.log.AuditLog.append` by ``--group`` concurrent callers, so
  that records share group commits as concurrent requests do: chaining, hashing, the
  search index rows, the chain head and the store commit (``synchronous=FULL``) of the
  record and its rows (the store's journal, see :data:`hie.store.port.JOURNAL_TYPES`);
* ``extract``: the part of ``append`` that computes the index rows (through the
  SearchParameters' FHIRPath), timed in a pass of its own over the same records;

against the baseline ``raw``: :meth:`SqliteStore.commit` of the same bodies as
pre-built writes, ``--group`` to a commit, without chain or index rows (the least a
durable append of the record costs through the store port).

The log is first filled to each of ``--sizes`` records (by ``AuditLog.append``), so that
growth shows. CPU is the process's (all threads; nothing else runs in it), per
record, the median of ``--rounds`` rounds of ``--records`` records.

Output: a Markdown table on stdout (``--json PATH`` also writes the figures); progress on
stderr.

Example::

    .venv/bin/python scripts/bench_audit.py --sizes 1k,10k,100k
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench_common import ascending_sizes, log, machine_info, run_async

from hie import jsonio
from hie.access.keys import KeyRing
from hie.access.principal import Principal
from hie.app import audit_log
from hie.audit.events import Where, audit_event
from hie.config import Settings
from hie.fhir.search.extract import index_rows
from hie.fhir.search.registry import Registry
from hie.fhir.service import FhirService
from hie.store.sqlite import SqliteStore

STAGES = ("build", "append", "extract", "raw")
_PRINCIPAL = Principal(
    "emr-client", ("system/*.rs",), organization="Organization/member-1", token_id="t-1"
)
_WHERE = Where("http://127.0.0.1:8080/fhir", "10.0.0.7")


def read_event(n: int) -> dict:
    """The AuditEvent of the ``n``-th read: an Observation of one of 500 patients."""
    return audit_event(
        _WHERE,
        _PRINCIPAL,
        "read",
        status=200,
        resources=[f"Observation/obs-{n}/_history/1"],
        patients=[f"Patient/pat-{n % 500}"],
    )


class Bench:
    """A fresh store with the server's audit log and record indexing."""

    def __init__(self, data_dir: Path, group: int):
        self.group = group
        self.store = SqliteStore(data_dir)
        settings = Settings(data_dir=data_dir)
        self.service = FhirService(self.store, settings, Registry())
        self.audit = audit_log(self.service, KeyRing(data_dir / "keys"), settings)
        self.made = 0  # events built so far (their numbers)
        self.raw_ids = 0

    async def start(self) -> None:
        await self.store.open()
        await self.audit.start()

    async def stop(self) -> None:
        await self.audit.stop()
        await self.store.close()

    def events(self, count: int) -> list[dict]:
        """The next ``count`` read records."""
        events = [read_event(self.made + k) for k in range(count)]
        self.made += count
        return events

    async def append(self, events: list[dict]) -> list[str]:
        """Append ``events``, ``group`` concurrent callers at a time, one event each;
        returns the records' ids."""
        ids = []
        for start in range(0, len(events), self.group):
            group = events[start : start + self.group]
            for found in await asyncio.gather(*(self.audit.append([e]) for e in group)):
                ids += found
        return ids

    async def round(self, count: int) -> dict[str, float]:
        """CPU µs per record of each stage over ``count`` new records."""
        out = {}
        t = time.process_time()
        events = self.events(count)
        out["build"] = time.process_time() - t

        t = time.process_time()
        ids = await self.append(events)
        out["append"] = time.process_time() - t

        stored = await self.store.read_many("AuditEvent", ids)
        if len(stored) != count:
            raise RuntimeError(f"{len(stored)} records stored, {count} were appended")
        records = [(jsonio.loads(v.body), v.last_updated) for v in stored]
        registry, base = self.service.registry, self.service.settings.base_url
        t = time.process_time()
        for record, instant in records:  # as the append built them, timed alone
            index_rows(record, instant, registry, base)
        out["extract"] = time.process_time() - t

        writes = []
        for body in self.events(count):
            self.raw_ids += 1
            writes.append(
                self.service.new_write(
                    "AuditEvent", f"raw-{self.raw_ids}", body, None, "POST", indexed=False
                )
            )
        t = time.process_time()
        for start in range(0, count, self.group):
            await self.store.commit(writes[start : start + self.group])
        out["raw"] = time.process_time() - t
        return {k: v / count * 1e6 for k, v in out.items()}


async def measure(args: argparse.Namespace) -> list[dict]:
    steps = []
    with tempfile.TemporaryDirectory(prefix="hie-bench-audit-") as tmp:
        bench = Bench(Path(tmp), args.group)
        await bench.start()
        try:
            stored = 0
            for size in args.sizes:
                log(f"filling the log to {size:,} records")
                while stored < size:
                    chunk = min(5000, size - stored)
                    await bench.append(bench.events(chunk))
                    stored += chunk
                rounds = []
                for r in range(args.rounds):
                    rounds.append(await bench.round(args.records))
                    stored += args.records
                    log(f"  {size:,} round {r + 1}: " + _line(rounds[-1]))
                medians = {k: statistics.median(r[k] for r in rounds) for k in STAGES}
                steps.append({"size": size, "us_per_record": medians, "rounds": rounds})
        finally:
            await bench.stop()
    return steps


def _line(figures: dict[str, float]) -> str:
    return ", ".join(f"{k} {figures[k]:.0f}" for k in STAGES)


def report(args: argparse.Namespace, steps: list[dict], machine: dict) -> str:
    lines = [
        f"Machine: {machine}",
        f"Records per round: {args.records:,}, {args.rounds} rounds (median), "
        f"{args.group} records per group commit",
        "",
        "| records stored | build µs | append µs (of which extract) | "
        "audit total µs | raw store append µs | total ÷ raw |",
        "|---|---|---|---|---|---|",
    ]
    for step in steps:
        f = step["us_per_record"]
        total = f["build"] + f["append"]
        lines.append(
            f"| {step['size']:,} | {f['build']:.0f} | {f['append']:.0f} ({f['extract']:.0f}) | "
            f"{total:.0f} | {f['raw']:.0f} | {total / f['raw']:.1f}× |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes",
        type=ascending_sizes,
        default="1k,10k,100k",
        help="records in the log before measuring, ascending",
    )
    p.add_argument("--records", type=int, default=3000, help="records per measured round")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per size (median)")
    p.add_argument("--group", type=int, default=5, help="concurrent callers per group commit")
    p.add_argument("--json", type=Path, help="also write every figure as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info()
    steps = run_async(measure(args))
    print(report(args, steps, machine))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "steps": steps}, indent=2))


if __name__ == "__main__":
    main()
