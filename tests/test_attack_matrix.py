"""Every endpoint against every bad credential: no token, expired, wrong signature,
wrong audience, ``alg: none``, HS256 keyed with the server's public key, a scope too
narrow, another member's resource. Each gets 401 or 403 with an OperationOutcome,
discloses nothing (not even whether the resource exists), and is audited."""

from __future__ import annotations

import time

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient

from hie.access.keys import KeyRing
from tests.access.conftest import access_claims, hs256, unsigned
from tests.conftest import FHIR

SECRET_NAME = "Zhuge"
PATCH = [{"op": "replace", "path": "/gender", "value": "male"}]


def _endpoints(pid: str) -> list[tuple[str, str, object, str]]:
    """(method, url, body, content type) of every endpoint serving or changing data."""
    patient = {"resourceType": "Patient", "id": pid, "name": [{"family": "X"}]}
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": f"Patient/{pid}"}}],
    }
    return [
        ("GET", f"/fhir/Patient/{pid}", None, FHIR),
        ("GET", f"/fhir/Patient/{pid}/_history/1", None, FHIR),
        ("GET", f"/fhir/Patient/{pid}/_history", None, FHIR),
        ("GET", "/fhir/Patient/_history", None, FHIR),
        ("GET", "/fhir/_history", None, FHIR),
        ("GET", f"/fhir/Patient?family={SECRET_NAME}", None, FHIR),
        (
            "POST",
            "/fhir/Patient/_search",
            f"family={SECRET_NAME}",
            "application/x-www-form-urlencoded",
        ),
        ("GET", "/fhir?_type=Patient", None, FHIR),
        ("GET", f"/fhir/Patient/{pid}/Observation", None, FHIR),
        ("POST", "/fhir/Patient", patient, FHIR),
        ("PUT", f"/fhir/Patient/{pid}", patient, FHIR),
        ("PATCH", f"/fhir/Patient/{pid}", PATCH, "application/json-patch+json"),
        ("DELETE", f"/fhir/Patient/{pid}", None, FHIR),
        ("PUT", f"/fhir/Patient?family={SECRET_NAME}", patient, FHIR),
        ("DELETE", f"/fhir/Patient?family={SECRET_NAME}", None, FHIR),
        ("POST", "/fhir", bundle, FHIR),
        ("POST", "/fhir/$reindex", None, FHIR),
        ("GET", "/fhir/AuditEvent", None, FHIR),
        ("GET", "/fhir/AuditEvent/$verify", None, FHIR),
        ("GET", f"/fhir/Patient/{pid}/$access-report", None, FHIR),
        ("GET", "/admin/clients", None, "application/json"),
        ("GET", f"/admin/clients/{pid}", None, "application/json"),
        ("POST", "/admin/clients", {"client_id": "x"}, "application/json"),
        ("DELETE", f"/admin/clients/{pid}", None, "application/json"),
    ]


def intruder(**changes) -> dict:
    """Claims of a would-be administrator and auditor."""
    return access_claims(
        sub="intruder", client_id="intruder", roles=["admin", "auditor"], **changes
    )


@pytest.fixture
def forged(app, tmp_path) -> dict[str, dict[str, str]]:
    """Authorization headers that must all get 401."""
    keys: KeyRing = app.state.keys
    public_pem = keys.token_keys()[keys.active_kid].public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    tokens = {
        "expired": keys.sign_jwt(intruder(exp=int(time.time()) - 60, iat=0)),
        "wrong signature": KeyRing(tmp_path / "other-keys").sign_jwt(intruder()),
        "wrong audience": keys.sign_jwt(intruder(aud="https://elsewhere.example/fhir")),
        "wrong issuer": keys.sign_jwt(intruder(iss="someone-else")),
        "alg none": unsigned({"alg": "none", "typ": "JWT"}, intruder()),
        "HS256 with the public key": hs256(
            {"alg": "HS256", "typ": "JWT", "kid": keys.active_kid}, intruder(), public_pem
        ),
        "garbage": "not.a.token",
    }
    headers = {name: {"Authorization": f"Bearer {t}"} for name, t in tokens.items()}
    headers["no token"] = {}
    headers["basic auth"] = {"Authorization": "Basic YWRtaW46YWRtaW4="}
    return headers


@pytest.fixture
def hie(app) -> TestClient:
    with TestClient(app, base_url="http://hie.test") as c:
        yield c


def _call(hie: TestClient, method: str, url: str, body, content_type: str, headers: dict):
    kwargs: dict = {"headers": {"Content-Type": content_type, **headers}}
    if isinstance(body, str):
        kwargs["content"] = body.encode()
    elif body is not None:
        kwargs["content"] = orjson.dumps(body)
    return hie.request(method, url, **kwargs)


def _refusals(hie: TestClient, auditor: dict) -> int:
    r = hie.get("/fhir/AuditEvent", params={"outcome": "4", "_summary": "count"}, headers=auditor)
    return r.json()["total"]


def _assert_refused(response, status: int, where: str) -> None:
    assert response.status_code == status, (where, response.status_code, response.text)
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", where
    assert SECRET_NAME not in response.text, where
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer"), where


@pytest.fixture
def stored(hie, mint) -> tuple[dict, dict, str]:
    """An administrator's and an auditor's headers, and a stored Patient's id."""
    admin = {"Authorization": f"Bearer {mint()}", "Content-Type": FHIR}
    auditor = {"Authorization": f"Bearer {mint('system/AuditEvent.rs', roles=('auditor',))}"}
    pid = hie.post(
        "/fhir/Patient",
        json={"resourceType": "Patient", "name": [{"family": SECRET_NAME}]},
        headers=admin,
    ).json()["id"]
    return admin, auditor, pid


def test_bad_credentials_get_401_everywhere_and_are_audited(hie, forged, stored):
    admin, auditor, pid = stored
    before = _refusals(hie, auditor)
    attempts = 0
    for name, headers in forged.items():
        for method, url, body, content_type in _endpoints(pid):
            where = f"{name}: {method} {url}"
            _assert_refused(_call(hie, method, url, body, content_type, headers), 401, where)
            attempts += 1
    assert _refusals(hie, auditor) == before + attempts
    assert hie.get(f"/fhir/Patient/{pid}", headers=admin).json()["meta"]["versionId"] == "1"


def test_narrow_scopes_get_403_and_do_not_reveal_existence(hie, mint, stored):
    _, auditor, pid = stored
    token = mint(
        "system/Practitioner.rs", "other-data", roles=("member",), organization="Organization/a"
    )
    narrow = {"Authorization": f"Bearer {token}"}
    before = _refusals(hie, auditor)
    attempts = 0
    for target in (pid, "does-not-exist"):
        answers = []
        for method, url, body, content_type in _endpoints(target):
            where = f"{target}: {method} {url}"
            response = _call(hie, method, url, body, content_type, narrow)
            if url == "/fhir":  # a batch answers 200; its entry is refused
                assert response.status_code == 200, where
                entry = response.json()["entry"][0]["response"]
                assert entry["status"] == "403" and SECRET_NAME not in response.text
                outcome = entry["outcome"]
            else:
                _assert_refused(response, 403, where)
                outcome = response.json()
            answers.append(outcome["issue"][0]["diagnostics"].replace(target, "ID"))
            attempts += 1
        if target == pid:
            existing = answers
        else:
            assert answers == existing  # the same refusal, whether or not it exists
    assert _refusals(hie, auditor) == before + attempts


def test_another_members_resource_cannot_be_changed(hie, mint):
    def member(client_id: str, org: str) -> dict:
        token = mint("system/*.cruds", client_id, roles=("member",), organization=org)
        return {"Authorization": f"Bearer {token}"}

    a, b = member("emr-a", "Organization/a"), member("emr-b", "Organization/b")
    auditor = {"Authorization": f"Bearer {mint('system/AuditEvent.rs', roles=('auditor',))}"}
    pid = hie.post(
        "/fhir/Patient",
        json={"resourceType": "Patient", "name": [{"family": SECRET_NAME}]},
        headers={**a, "Content-Type": FHIR},
    ).json()["id"]
    before = _refusals(hie, auditor)
    changes = [e for e in _endpoints(pid) if e[0] in ("PUT", "PATCH", "DELETE")]
    for method, url, body, content_type in changes:
        response = _call(hie, method, url, body, content_type, b)
        _assert_refused(response, 403, f"{method} {url}")
    assert _refusals(hie, auditor) == before + len(changes)
    current = hie.get(f"/fhir/Patient/{pid}", headers=a).json()
    assert current["meta"]["versionId"] == "1" and "gender" not in current
