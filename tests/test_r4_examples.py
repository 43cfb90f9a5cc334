"""The official R4 examples (npm ``hl7.fhir.r4.examples`` 4.0.1) over HTTP.

Every example of a served type is written (``PUT`` with its own id, every tenth by
``POST``) and read back equal to what was sent, apart from ``meta.versionId``,
``meta.lastUpdated`` and ``meta.source`` (the writing client), which the server sets,
and a Patient's link to its golden record, which the master patient index sets; the rest
of ``meta`` (profile, tag, security...) and the Patient's own links must survive. The
14 examples that break R4's own rules, and 3 Consents this server refuses because it
could not enforce them as written, are listed in :data:`KNOWN_INVALID` with the
rejection they must get; any other rejection fails.
Examples of unserved types must get 404 with an OperationOutcome, and AuditEvent
examples 405: the audit log is written by the server only.

The package (191 MB unpacked) is fetched once with ``npm pack`` into ``tests/.cache``
and read straight from the tarball. Without npm or network the tests fail, unless
``HIE_SKIP_R4_EXAMPLES=1`` is set, which skips them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hie.access.decision import AUDIT_TYPES
from hie.app import create_app
from hie.config import Settings
from hie.fhir.types import served_types
from hie.mpi.records import golden_of_member
from hie.store.sqlite import SqliteStore
from tests.conftest import make_store

PACKAGE = "hl7.fhir.r4.examples"
VERSION = "4.0.1"
TARBALL = f"{PACKAGE}-{VERSION}.tgz"
SHA1 = "537ea7db3f3c7b3575fe2eaa7808bad21261cca3"  # dist.shasum on registry.npmjs.org
CACHE = Path(__file__).parent / ".cache"
SKIP_ENV = "HIE_SKIP_R4_EXAMPLES"
#: Resource files in the package (every ``package/*.json`` but ``package.json``).
RESOURCE_FILES = 5306
#: Every POST_EVERY-th served example is created with POST instead of PUT.
POST_EVERY = 10


@dataclass(frozen=True)
class Rejection:
    """How the server must reject an example that breaks R4: the status and the
    ``expression`` of the first issue (None: the issue has none)."""

    status: int
    expression: str | None
    method: str = "PUT"


_NO_BASE = Rejection(422, "SearchParameter.base")  # SearchParameter.base is 1..*

KNOWN_INVALID: dict[str, Rejection] = {
    # ImplementationGuide.name and .status are 1..1; both are missing (same resource).
    "ImplementationGuide-fhir.json": Rejection(422, "ImplementationGuide.name"),
    "ig-r4.json": Rejection(422, "ImplementationGuide.name"),
    # Questionnaire.item.linkId is 1..1.
    "Questionnaire-qs1.json": Rejection(422, "Questionnaire.item[0].item[0].linkId"),
    "SearchParameter-codesystem-extensions-CodeSystem-author.json": _NO_BASE,
    "SearchParameter-codesystem-extensions-CodeSystem-effective.json": _NO_BASE,
    "SearchParameter-codesystem-extensions-CodeSystem-end.json": _NO_BASE,
    "SearchParameter-codesystem-extensions-CodeSystem-keyword.json": _NO_BASE,
    "SearchParameter-codesystem-extensions-CodeSystem-workflow.json": _NO_BASE,
    "SearchParameter-valueset-extensions-ValueSet-author.json": _NO_BASE,
    "SearchParameter-valueset-extensions-ValueSet-effective.json": _NO_BASE,
    "SearchParameter-valueset-extensions-ValueSet-end.json": _NO_BASE,
    "SearchParameter-valueset-extensions-ValueSet-keyword.json": _NO_BASE,
    "SearchParameter-valueset-extensions-ValueSet-workflow.json": _NO_BASE,
    # The id has 68 characters (at most 64). POSTed, so that the body's id is judged
    # (a PUT fails on the URL's id first, with no expression).
    "SearchParameter-questionnaireresponse-extensions-QuestionnaireResponse-item-subject.json": (
        Rejection(400, "SearchParameter.id", method="POST")
    ),
    # Consents the consent engine refuses rather than store as rules it cannot apply
    # (README "Consent"): a Patient as actor (patients never call this server)...
    "Consent-consent-example-grantor.json": Rejection(422, "Consent.provision.actor[1].reference"),
    # ...nested provisions without a type (R4: "required in all nested rules")...
    "Consent-consent-example-pkb.json": Rejection(422, "Consent.provision.provision[0].type"),
    # ...and provision.code, which is not supported.
    "Consent-consent-example-signature.json": Rejection(422, "Consent.provision.provision[0].code"),
}


# ---------------------------------------------------------------- the package
def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unavailable(message: str):
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(message)
    pytest.fail(f"{message} (set {SKIP_ENV}=1 to skip these tests)", pytrace=False)


def _npm_pack(dest: Path) -> None:
    """``npm pack`` the package into ``dest`` (through a temporary directory, so an
    interrupted download never leaves a truncated tarball behind)."""
    npm = shutil.which("npm")
    if npm is None:
        _unavailable(f"npm is not installed: cannot fetch {PACKAGE}@{VERSION}")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        try:
            proc = subprocess.run(
                [npm, "pack", f"{PACKAGE}@{VERSION}"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=900,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            _unavailable(f"npm pack {PACKAGE}@{VERSION} failed: {exc}")
        fetched = Path(tmp) / TARBALL
        if proc.returncode != 0 or not fetched.is_file():
            _unavailable(
                f"npm pack {PACKAGE}@{VERSION} failed (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-2000:]}"
            )
        os.replace(fetched, dest)


@pytest.fixture(scope="session")
def r4_examples_tarball() -> Path:
    """The examples package tarball in ``tests/.cache``, fetched if absent."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1")
    path = CACHE / TARBALL
    if not path.is_file() or _sha1(path) != SHA1:
        _npm_pack(path)
    actual = _sha1(path)
    if actual != SHA1:
        _unavailable(f"{path} has SHA-1 {actual}, expected {SHA1}")
    return path


def examples(tarball: Path) -> Iterator[tuple[str, bytes, dict]]:
    """``(file name, raw JSON, parsed resource)`` for each resource in the package,
    read in tarball order without unpacking to disk."""
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            folder, _, name = member.name.partition("/")
            if not member.isfile() or folder != "package" or "/" in name:
                continue
            if not name.endswith(".json") or name in ("package.json", ".index.json"):
                continue
            raw = tar.extractfile(member).read()
            resource = json.loads(raw)
            if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
                yield name, raw, resource


# ---------------------------------------------------------------- the exchange
@pytest.fixture
def settings(tmp_path) -> Settings:
    """Room for the largest example (Bundle-resources.json, 35 MB)."""
    return Settings(data_dir=tmp_path, max_body_bytes=64 * 1024 * 1024)


@pytest.fixture
def app(settings, store_kind, tmp_path):
    """As in conftest, but SQLite skips fsync: these tests are about content, not
    durability, and 5,300 synchronous commits would cost tens of seconds."""
    if store_kind == "sqlite":
        return create_app(settings, SqliteStore(tmp_path, synchronous="OFF"))
    return create_app(settings, make_store(store_kind, tmp_path))


def _without_server_meta(resource: dict) -> dict:
    """``resource`` without meta.versionId/lastUpdated/source (and without an emptied
    meta), and without the link to its golden record the MPI puts on a Patient."""
    out = dict(resource)
    meta = dict(out.pop("meta", None) or {})
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    meta.pop("source", None)
    if meta:
        out["meta"] = meta
    if out.get("resourceType") == "Patient" and "link" in out:
        links = [link for link in out.pop("link") if golden_of_member({"link": [link]}) is None]
        if links:
            out["link"] = links
    return out


def _first_difference(sent, got, path: str = "") -> str | None:
    """Where ``got`` first differs from ``sent`` (a JSON pointer and both values)."""
    if type(sent) is not type(got) and not (
        isinstance(sent, int | float) and isinstance(got, int | float)
    ):
        return f"{path or '/'}: sent {sent!r:.80}, got {got!r:.80}"
    if isinstance(sent, dict):
        for key in sorted(sent.keys() | got.keys()):
            if key not in got:
                return f"{path}/{key}: missing in the read"
            if key not in sent:
                return f"{path}/{key}: added by the server ({got[key]!r:.80})"
            found = _first_difference(sent[key], got[key], f"{path}/{key}")
            if found:
                return found
        return None
    if isinstance(sent, list):
        if len(sent) != len(got):
            return f"{path}: {len(sent)} items sent, {len(got)} read"
        for i, (a, b) in enumerate(zip(sent, got, strict=True)):
            found = _first_difference(a, b, f"{path}/{i}")
            if found:
                return found
        return None
    return None if sent == got else f"{path}: sent {sent!r:.80}, got {got!r:.80}"


def _issues(response) -> str:
    try:
        issues = response.json().get("issue", [])
    except ValueError:
        return response.text[:300]
    return "; ".join(
        f"{i.get('diagnostics')} @ {','.join(i.get('expression', [])) or '-'}" for i in issues[:3]
    )


class Exchange:
    """Sends examples to the server and collects what went wrong."""

    def __init__(self, client):
        self.client = client
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self.stored: set[tuple[str, str]] = set()
        self.rejected: set[str] = set()

    def send(self, name: str, raw: bytes, resource: dict, method: str) -> None:
        type_ = resource["resourceType"]
        if type_ not in served_types():
            self._unserved(name, raw, type_)
            return
        if type_ in AUDIT_TYPES:
            self._append_only(name, raw, resource, method)
            return
        expected = KNOWN_INVALID.get(name)
        if expected is not None:
            method = expected.method
        if method == "PUT":
            key = (type_, resource["id"])
            response = self.client.put(f"/fhir/{type_}/{resource['id']}", content=raw)
            created = 200 if key in self.stored else 201
        else:
            response = self.client.post(f"/fhir/{type_}", content=raw)
            created = 201
        if expected is not None:
            self._rejection(name, method, response, expected)
        elif response.status_code != created:
            self.failures.append(
                f"{name}: {method} answered {response.status_code} (expected {created}): "
                f"{_issues(response)}"
            )
        elif method == "PUT":
            self._read_back(name, type_, resource, resource["id"], method)
        else:
            location = response.headers.get("location", "")
            prefix = f"{self.client.base_url}/fhir/{type_}/"
            id_, _, version = location.removeprefix(prefix).partition("/")
            if not location.startswith(prefix) or version != "_history/1":
                self.failures.append(f"{name}: POST answered Location {location!r}")
            else:
                self._read_back(name, type_, resource, id_, method)

    def _unserved(self, name: str, raw: bytes, type_: str) -> None:
        response = self.client.post(f"/fhir/{type_}", content=raw)
        body = response.json()
        issue = (body.get("issue") or [{}])[0]
        if (
            response.status_code != 404
            or body.get("resourceType") != "OperationOutcome"
            or issue.get("code") != "not-supported"
            or "not supported" not in issue.get("diagnostics", "")
        ):
            self.failures.append(
                f"{name}: POST of unserved {type_} answered {response.status_code}, "
                f"not 404 not-supported: {_issues(response)}"
            )
        else:
            self.counts["unserved"] += 1

    def _append_only(self, name: str, raw: bytes, resource: dict, method: str) -> None:
        type_ = resource["resourceType"]
        if method == "PUT":
            response = self.client.put(f"/fhir/{type_}/{resource['id']}", content=raw)
        else:
            response = self.client.post(f"/fhir/{type_}", content=raw)
        if response.status_code != 405 or response.json().get("resourceType") != (
            "OperationOutcome"
        ):
            self.failures.append(
                f"{name}: {method} of an audit record answered {response.status_code}, "
                f"not 405: {_issues(response)}"
            )
        else:
            self.counts["append-only"] += 1

    def _rejection(self, name: str, method: str, response, expected: Rejection) -> None:
        issues = [{}]
        if response.status_code >= 400:
            issues = response.json().get("issue") or issues
        expression = (issues[0].get("expression") or [None])[0]
        if response.status_code < 400:
            self.failures.append(
                f"{name} (known invalid): {method} answered {response.status_code}, expected "
                f"{expected.status} at {expected.expression!r}"
            )
        elif (response.status_code, expression) != (expected.status, expected.expression):
            self.failures.append(
                f"{name} (known invalid): {method} answered {response.status_code} at "
                f"{expression!r}, expected {expected.status} at {expected.expression!r}: "
                f"{_issues(response)}"
            )
        else:
            self.counts["rejected"] += 1
            self.rejected.add(name)

    def _read_back(self, name: str, type_: str, sent: dict, id_: str, method: str) -> None:
        self.stored.add((type_, id_))
        response = self.client.get(f"/fhir/{type_}/{id_}")
        if response.status_code != 200:
            self.failures.append(f"{name}: read of {type_}/{id_} answered {response.status_code}")
            return
        got = json.loads(response.content)
        meta = got.get("meta") or {}
        if not meta.get("versionId") or not meta.get("lastUpdated"):
            self.failures.append(f"{name}: the read has no meta.versionId/lastUpdated")
            return
        sent = _without_server_meta(sent)
        got = _without_server_meta(got)
        if method == "POST":  # the server assigns the id
            if sent.pop("id", None) == got.get("id"):
                self.failures.append(f"{name}: POST kept the client's id {id_!r}")
            got.pop("id", None)
        if got != sent:
            self.failures.append(f"{name}: read back differs at {_first_difference(sent, got)}")
        else:
            self.counts["accepted"] += 1

    def check(self) -> None:
        if self.failures:
            summary = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
            pytest.fail(
                f"{len(self.failures)} examples failed ({summary}):\n" + "\n".join(self.failures),
                pytrace=False,
            )


# ---------------------------------------------------------------- the tests
@pytest.mark.slow
@pytest.mark.parametrize("store_kind", ["sqlite"], indirect=True)
def test_every_r4_example_round_trips(client, r4_examples_tarball):
    """The whole package on SQLite: accepted and read back equal, rejected as listed,
    or 404 for an unserved type."""
    exchange = Exchange(client)
    served = 0
    for name, raw, resource in examples(r4_examples_tarball):
        method = "PUT"
        if resource["resourceType"] in served_types():
            method = "POST" if served % POST_EVERY == 0 else "PUT"
            served += 1
        exchange.send(name, raw, resource, method)
    exchange.check()
    assert exchange.rejected == set(KNOWN_INVALID), "known-invalid examples not in the package"
    assert sum(exchange.counts.values()) == RESOURCE_FILES, exchange.counts


@pytest.mark.slow
@pytest.mark.parametrize("store_kind", ["mongomock"], indirect=True)
def test_r4_example_sample_round_trips(client, r4_examples_tarball):
    """The first valid example of each type in the package, on mongomock."""
    sample: dict[str, tuple[str, bytes, dict]] = {}
    for name, raw, resource in examples(r4_examples_tarball):
        if name not in KNOWN_INVALID:
            sample.setdefault(resource["resourceType"], (name, raw, resource))
    exchange = Exchange(client)
    for i, (_type, (name, raw, resource)) in enumerate(sorted(sample.items())):
        exchange.send(name, raw, resource, "POST" if i % POST_EVERY == 0 else "PUT")
    exchange.check()
    assert exchange.counts["accepted"] == len(sample.keys() & served_types() - AUDIT_TYPES)
    assert exchange.counts["append-only"] == 1
    assert exchange.counts["unserved"] == len(sample.keys() - served_types()) > 0
