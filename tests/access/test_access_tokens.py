"""Access tokens: what the server mints, what it refuses, key rotation, and tokens of
an external OpenID provider."""

from __future__ import annotations

import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient

from hie.access.keys import KeyRing
from hie.access.principal import ADMIN, MEMBER
from hie.access.tokens import TokenAuthority
from hie.app import create_app
from hie.config import Settings
from tests.access.conftest import (
    BASE,
    ORG,
    Signer,
    add_organization,
    admin_token,
    client_definition,
    hs256,
    jwks_url,
    unsigned,
)
from tests.access.conftest import (
    access_claims as claims,
)
from tests.conftest import make_store


def status(api: TestClient, token: str) -> int:
    return api.get("/fhir/Patient", headers={"Authorization": f"Bearer {token}"}).status_code


def test_minted_claims_make_the_principal(app):
    tokens = app.state.tokens
    token = tokens.mint(
        "member-1",
        "system/Patient.rs",
        60,
        organization=ORG,
        roles=(MEMBER,),
        break_glass=True,
        purpose="ETREAT",
        user="Dr. Wang",
        user_role="doctor",
    )
    assert jwt.get_unverified_header(token)["kid"] == app.state.keys.active_kid
    p = tokens.verify(token)
    assert (p.client_id, p.scope, p.organization) == ("member-1", "system/Patient.rs", ORG)
    assert p.roles == frozenset({MEMBER}) and p.break_glass
    assert (p.purpose, p.user, p.user_role) == ("ETREAT", "Dr. Wang", "doctor")
    assert p.token_id == jwt.decode(token, options={"verify_signature": False})["jti"]
    plain = tokens.verify(tokens.mint("c", "system/*.rs", 60))
    assert plain.purpose == "TREAT" and plain.roles == frozenset() and plain.organization is None


def test_iua_claims_nested_under_extensions(app):
    iua = {
        "subject_name": "Dr. Li",
        "subject_role": {"system": "urn:oid:2.16.840.1.113883.6.96", "code": "309343006"},
        "purpose_of_use": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
            "code": "HRESCH",
        },
    }
    token = app.state.keys.sign_jwt(claims(extensions={"ihe_iua": iua}))
    p = app.state.tokens.verify(token)
    assert (p.user, p.user_role, p.purpose) == ("Dr. Li", "309343006", "HRESCH")


def test_refused_access_tokens(app, tmp_path):
    keys: KeyRing = app.state.keys
    kid = keys.active_kid
    good = keys.sign_jwt(claims())
    other = keys.sign_jwt(claims(sub="other"))
    public_pem = keys.public_key(kid).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    refused = {
        "expired": keys.sign_jwt(claims(exp=int(time.time()) - 60)),
        "wrong signature": good.rsplit(".", 1)[0] + "." + other.rsplit(".", 1)[1],
        "alg none": unsigned({"alg": "none", "kid": kid}, claims()),
        "HS256 keyed with the public key": hs256(
            {"alg": "HS256", "kid": kid}, claims(), public_pem
        ),
        "wrong audience": keys.sign_jwt(claims(aud="another-server")),
        "wrong issuer": keys.sign_jwt(claims(iss="someone")),
        "another key ring": KeyRing(tmp_path / "elsewhere").sign_jwt(claims()),
        "no kid": jwt.encode(claims(), keys._private[kid], "ES256"),
        "no jti": keys.sign_jwt(claims(jti=None)),
        "unknown role": keys.sign_jwt(claims(roles=["superuser"])),
        "bad purpose": keys.sign_jwt(claims(purpose_of_use="SHOPPING")),
        "malformed": "a.b.c",
    }
    with TestClient(app, base_url=BASE) as api:
        assert status(api, good) == 200
        for what, token in refused.items():
            r = api.get("/fhir/Patient", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401, what
            assert r.headers["www-authenticate"].startswith("Bearer"), what
            assert r.json()["resourceType"] == "OperationOutcome", what


def test_key_rotation(app):
    keys: KeyRing = app.state.keys
    tokens: TokenAuthority = app.state.tokens
    with TestClient(app, base_url=BASE) as api:
        old_kid = keys.active_kid
        old = tokens.mint("c", "system/*.cruds", 600, roles=(ADMIN,))
        assert status(api, old) == 200
        new_kid = keys.rotate()
        new = tokens.mint("c", "system/*.cruds", 600, roles=(ADMIN,))
        assert jwt.get_unverified_header(new)["kid"] == new_kid != old_kid
        published = {k["kid"] for k in api.get("/auth/jwks").json()["keys"]}
        assert published == {old_kid, new_kid}
        assert status(api, old) == 200 and status(api, new) == 200
        keys.retire(old_kid)
        assert status(api, old) == 401  # even though it was verified (and cached) before
        assert status(api, new) == 200
        assert {k["kid"] for k in api.get("/auth/jwks").json()["keys"]} == {new_kid}


# --- an external OpenID provider ------------------------------------------------

IDP = "https://idp.example.org/realms/alliance"


@pytest.fixture
def idp(jwks_server) -> Signer:
    """The provider's RSA key, its JWK Set served by ``jwks_server``."""
    key = Signer("RS384")
    jwks_server.jwks = {"keys": [{**key.jwk(), "use": "sig"}]}
    return key


@pytest.fixture
def oidc_app(tmp_path, store_kind, jwks_server, idp):
    settings = Settings(
        data_dir=tmp_path,
        oidc_issuer=IDP,
        oidc_jwks_url=jwks_url(jwks_server),
        oidc_audience="hie-api",
    )
    return create_app(settings, make_store(store_kind, tmp_path))


def external(key: Signer, **changes) -> str:
    now = int(time.time())
    out = {
        "iss": IDP,
        "aud": "hie-api",
        "sub": "f81d4fae",
        "azp": "portal",
        "scope": "system/Patient.rs system/Encounter.rs openid",
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "extensions": {"ihe_iua": {"subject_name": "Dr. Zhao", "purpose_of_use": "COC"}},
    }
    out.update(changes)
    out = {k: v for k, v in out.items() if v is not None}
    return jwt.encode(out, key.private, "RS256", headers={"kid": key.kid})


def test_external_provider_tokens(oidc_app, idp, rs_key):
    key = idp
    with TestClient(oidc_app, base_url=BASE) as api:
        api.headers["Authorization"] = f"Bearer {admin_token(oidc_app)}"
        add_organization(api)
        portal = client_definition("portal", rs_key, break_glass=True)
        assert api.post("/admin/clients", json=portal).status_code == 201

        token = external(key)
        assert status(api, token) == 200
        p = oidc_app.state.tokens.verify(token)
        assert (p.client_id, p.organization, p.roles) == ("portal", ORG, frozenset({MEMBER}))
        assert p.scope == "system/Patient.rs"  # narrowed to the registration
        assert p.break_glass and (p.user, p.purpose) == ("Dr. Zhao", "COC")
        via_client_id = external(
            key, azp=None, client_id="portal", scope=None, scp=["system/Patient.r"]
        )
        assert oidc_app.state.tokens.verify(via_client_id).scope == "system/Patient.r"

        refused = {
            "unregistered client": external(key, azp="stranger"),
            "wrong audience": external(key, aud="someone-else"),
            "expired": external(key, exp=int(time.time()) - 60),
            "unknown key": external(Signer("RS384")),
            "HS256": hs256(
                {"alg": "HS256", "kid": key.kid},
                {"iss": IDP, "aud": "hie-api", "azp": "portal", "exp": int(time.time()) + 60},
                b"secret",
            ),
        }
        for what, bad in refused.items():
            assert status(api, bad) == 401, what

        assert api.delete("/admin/clients/portal").status_code == 200
        assert status(api, external(key)) == 401  # inactive client
