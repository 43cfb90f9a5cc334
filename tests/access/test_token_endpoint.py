"""SMART Backend Services token endpoint: a signed client assertion in, an access token
out; every malformed or forged request refused as RFC 6749 says."""

from __future__ import annotations

import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient

from hie.app import create_app
from hie.config import Settings
from tests.access.conftest import (
    ORG,
    TOKEN_URL,
    Signer,
    add_organization,
    admin_token,
    client_definition,
    get_token,
    hs256,
    jwks_url,
    token_form,
    unsigned,
)
from tests.conftest import make_store


def test_round_trip_with_rs384_and_es384_clients(members, rs_key, es_key):
    for client_id, key in (("rs-client", rs_key), ("es-client", es_key)):
        body = get_token(members, token_form(key.assertion(client_id)))
        assert body["token_type"] == "bearer"
        assert body["scope"] == "system/Patient.rs"
        assert 0 < body["expires_in"] <= 300
        bearer = {"Authorization": f"Bearer {body['access_token']}"}
        assert members.get("/fhir/Patient", headers=bearer).status_code == 200
        assert members.get("/fhir/Encounter", headers=bearer).status_code == 403
        principal = members.app.state.tokens.verify(body["access_token"])
        assert principal.client_id == client_id
        assert principal.organization == "Organization/org-a"
        assert principal.roles == frozenset({"member"})
        assert principal.break_glass is False


def test_token_response_is_not_cached(members, rs_key):
    r = members.post("/auth/token", data=token_form(rs_key.assertion("rs-client")))
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["pragma"] == "no-cache"
    assert r.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("requested", "granted"),
    [
        ("system/Patient.rs system/Encounter.rs", "system/Patient.rs"),
        ("system/Patient.read", "system/Patient.read"),
        ("system/Patient.cruds system/Observation.s", "system/Patient.cruds system/Observation.s"),
        ("system/Observation.read system/Observation.read launch", "system/Observation.read"),
    ],
)
def test_scopes_are_narrowed_to_the_registration(members, rs_key, requested, granted):
    body = get_token(members, token_form(rs_key.assertion("rs-client"), requested))
    assert body["scope"] == granted


def test_aud_may_end_with_a_slash(members, es_key):
    get_token(members, token_form(es_key.assertion("es-client", aud=f"{TOKEN_URL}/")))


def _forged(rs_key: Signer) -> dict[str, str]:
    """Assertions that must be refused, by what is wrong with them."""
    other = Signer("RS384")
    other.kid = rs_key.kid
    public_pem = rs_key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    return {
        "alg none": unsigned({"alg": "none", "kid": rs_key.kid}, rs_key.claims("rs-client")),
        "HS256 keyed with the public key": hs256(
            {"alg": "HS256", "kid": rs_key.kid, "typ": "JWT"},
            rs_key.claims("rs-client"),
            public_pem,
        ),
        "RS256 instead of RS384": jwt.encode(
            rs_key.claims("rs-client"), rs_key.private, "RS256", headers={"kid": rs_key.kid}
        ),
        "wrong signature": other.assertion("rs-client"),
        "unknown kid": rs_key.assertion("rs-client", headers={"kid": "nope"}),
        "no kid": jwt.encode(rs_key.claims("rs-client"), rs_key.private, "RS384"),
        "wrong aud": rs_key.assertion("rs-client", aud="https://elsewhere.example/token"),
        "aud is the FHIR base": rs_key.assertion("rs-client", aud="http://hie.test/fhir"),
        "sub differs from iss": rs_key.assertion("rs-client", sub="es-client"),
        "iss of another client": rs_key.assertion("es-client"),
        "expired": rs_key.assertion("rs-client", exp=now - 120, iat=now - 400),
        "exp too far ahead": rs_key.assertion("rs-client", exp=now + 3600),
        "no exp": rs_key.assertion("rs-client", exp=None),
        "no jti": rs_key.assertion("rs-client", jti=None),
        "empty jti": rs_key.assertion("rs-client", jti=""),
        "jku not registered": rs_key.assertion(
            "rs-client", headers={"jku": "https://attacker.example/jwks"}
        ),
        "unknown client": rs_key.assertion("ghost"),
        "not a JWT": "not.a.jwt",
    }


def test_forged_and_invalid_assertions_are_refused(members, rs_key):
    for what, assertion in _forged(rs_key).items():
        r = members.post("/auth/token", data=token_form(assertion))
        assert r.status_code == 401, what
        assert r.json()["error"] == "invalid_client", what
        assert r.json()["error_description"], what
    # the genuine assertion still works: none of the above left a trace that blocks it
    get_token(members, token_form(rs_key.assertion("rs-client")))


def test_a_replayed_assertion_is_refused(members, rs_key):
    assertion = rs_key.assertion("rs-client")
    get_token(members, token_form(assertion))
    r = members.post("/auth/token", data=token_form(assertion))
    assert r.status_code == 401
    assert r.json() == {
        "error": "invalid_client",
        "error_description": "this assertion (its jti) has been used before",
    }
    # the same jti from another client is another assertion
    get_token(members, token_form(rs_key.assertion("rs-client", jti="shared-jti")))


def test_an_inactive_client_gets_no_token(members, rs_key):
    assert members.delete("/admin/clients/rs-client").status_code == 200
    r = members.post("/auth/token", data=token_form(rs_key.assertion("rs-client")))
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_client"


@pytest.mark.parametrize(
    ("change", "status", "error"),
    [
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"grant_type": ""}, 400, "invalid_request"),
        ({"client_assertion_type": "urn:other"}, 401, "invalid_client"),
        ({"client_assertion": ""}, 401, "invalid_client"),
        ({"client_id": "es-client"}, 401, "invalid_client"),
        ({"scope": ""}, 400, "invalid_request"),
        ({"scope": "system/Encounter.rs"}, 400, "invalid_scope"),
        ({"scope": "system/*.rs"}, 400, "invalid_scope"),
        ({"scope": "system/Observation.cruds"}, 400, "invalid_scope"),
        ({"scope": "patient/Patient.rs"}, 400, "invalid_scope"),
        ({"scope": "system/Patient.rs?gender=female"}, 400, "invalid_scope"),
    ],
)
def test_bad_token_requests(members, rs_key, change, status, error):
    form = token_form(rs_key.assertion("rs-client")) | change
    r = members.post("/auth/token", data=form)
    assert r.status_code == status, r.text
    assert r.json()["error"] == error


def test_malformed_bodies_are_invalid_requests(members, rs_key):
    form = token_form(rs_key.assertion("rs-client"))
    encoded = "&".join(f"{k}={v}" for k, v in form.items())
    form_type = {"Content-Type": "application/x-www-form-urlencoded"}
    bad = [
        (json.dumps(form), {"Content-Type": "application/json"}),
        (encoded, {"Content-Type": "text/plain"}),
        (encoded + "&scope=system/Patient.r", form_type),
        ("grant_type=client_credentials&" + "x" * 70_000, form_type),
        (b"grant_type=\xff\xfe", form_type),
        ("", form_type),
    ]
    for content, headers in bad:
        r = members.post("/auth/token", content=content, headers=headers)
        assert r.status_code == 400, (content[:40], r.text)
        assert r.json()["error"] == "invalid_request"
        assert r.headers["cache-control"] == "no-store"
    assert members.get("/auth/token").status_code == 405


def test_aud_follows_the_configured_base_url(tmp_path, store_kind, rs_key):
    settings = Settings(data_dir=tmp_path, base_url="https://hie.example.org/fhir")
    app = create_app(settings, make_store(store_kind, tmp_path))
    with TestClient(app, base_url="http://internal:8080") as c:
        c.headers["Authorization"] = f"Bearer {admin_token(app)}"
        add_organization(c)
        assert c.post("/admin/clients", json=client_definition("rs-client", rs_key)).is_success
        config = c.get("/fhir/.well-known/smart-configuration").json()
        assert config["token_endpoint"] == "https://hie.example.org/auth/token"
        internal = rs_key.assertion("rs-client", aud="http://internal:8080/auth/token")
        assert c.post("/auth/token", data=token_form(internal)).status_code == 401
        public = rs_key.assertion("rs-client", aud="https://hie.example.org/auth/token")
        get_token(c, token_form(public))


def test_keys_from_a_jwks_uri(members, jwks_server, monkeypatch):
    key, rotated = Signer("ES384"), Signer("RS384")
    jwks_server.jwks = key.jwks()
    url = jwks_url(jwks_server)
    definition = client_definition("remote", key, jwks_uri=url)
    del definition["jwks"]
    assert members.post("/admin/clients", json=definition).status_code == 201
    get_token(members, token_form(key.assertion("remote")))
    get_token(members, token_form(key.assertion("remote", headers={"jku": url})))
    assert jwks_server.hits == 1  # cached
    jwks_server.jwks = {"keys": [key.jwk(), rotated.jwk()]}
    r = members.post("/auth/token", data=token_form(rotated.assertion("remote")))
    assert r.status_code == 401  # an unknown kid right after a fetch: no refetch storm
    assert jwks_server.hits == 1
    monkeypatch.setattr("hie.access.clients.JWKS_MIN_REFETCH", 0.0)
    get_token(members, token_form(rotated.assertion("remote")))  # unknown kid: refetched
    assert jwks_server.hits == 2


def test_token_requests_and_client_changes_are_audited(members, rs_key, app):
    auditor = app.state.tokens.mint("audit-office", "system/AuditEvent.rs", 600, roles=("auditor",))
    assertion = rs_key.assertion("rs-client")
    get_token(members, token_form(assertion))
    replay = members.post("/auth/token", data=token_form(assertion), headers={"Authorization": ""})
    assert replay.status_code == 401
    forged = members.post(
        "/auth/token",
        data=token_form(unsigned({"alg": "none"}, rs_key.claims("rs-client"))),
        headers={"Authorization": ""},
    )
    assert forged.status_code == 401
    logins = members.get(
        "/fhir/AuditEvent",
        params={"subtype": "110122", "_sort": "_id"},
        headers={"Authorization": f"Bearer {auditor}"},
    ).json()
    outcomes = [
        (e["resource"]["agent"][0].get("altId"), e["resource"]["outcome"]) for e in logins["entry"]
    ]
    assert outcomes == [("rs-client", "0"), ("rs-client", "4"), ("rs-client", "4")]
    assert "used before" in logins["entry"][1]["resource"]["outcomeDesc"]
    assert logins["entry"][0]["resource"]["agent"][1]["who"]["reference"] == ORG
    changes = members.get(
        "/fhir/AuditEvent",
        params={"subtype": "110137"},
        headers={"Authorization": f"Bearer {auditor}"},
    ).json()
    assert changes["total"] == 2  # the two registrations of the members fixture
