"""The SMART configuration, the JWK Set, and the client administration API."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from hie.access.principal import MEMBER
from hie.app import create_app
from hie.config import Settings
from tests.access.conftest import BASE, ORG, Signer, add_organization, client_definition


def test_smart_configuration_and_jwks(api):
    r = api.get("/fhir/.well-known/smart-configuration", headers={"Authorization": ""})
    assert r.status_code == 200
    config = r.json()
    assert config["token_endpoint"] == f"{BASE}/auth/token"
    assert config["jwks_uri"] == f"{BASE}/auth/jwks"
    assert config["grant_types_supported"] == ["client_credentials"]
    assert config["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert config["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert "system/*.rs" in config["scopes_supported"]
    assert set(config["capabilities"]) == {
        "client-confidential-asymmetric",
        "permission-v1",
        "permission-v2",
    }
    jwks = api.get("/auth/jwks", headers={"Authorization": ""}).json()
    assert [k["kid"] for k in jwks["keys"]] == [api.app.state.keys.active_kid]
    assert all("d" not in k for k in jwks["keys"])


def test_register_show_replace_list_and_deactivate(members, rs_key):
    listed = members.get("/admin/clients").json()
    assert [c["client_id"] for c in listed] == ["es-client", "rs-client"]
    shown = members.get("/admin/clients/rs-client").json()
    assert shown["organization"] == ORG and shown["active"] is True
    assert shown["jwks"]["keys"][0]["kid"] == rs_key.kid
    assert shown["source"] == "urn:hie:test:rs-client"

    changed = client_definition("rs-client", rs_key, scope="system/*.rs", break_glass=True)
    r = members.put("/admin/clients/rs-client", json=changed)
    assert r.status_code == 200
    assert r.json()["scope"] == "system/*.rs" and r.json()["break_glass"] is True
    r = members.put("/admin/clients/new-one", json=client_definition("new-one", rs_key))
    assert r.status_code == 201

    r = members.delete("/admin/clients/rs-client")
    assert r.status_code == 200 and r.json()["active"] is False
    assert members.get("/admin/clients/rs-client").json()["active"] is False
    assert members.delete("/admin/clients/ghost").status_code == 404
    assert members.get("/admin/clients/ghost").status_code == 404


def test_only_administrators_manage_clients(members, rs_key):
    member = members.app.state.tokens.mint("rs-client", "system/*.cruds", 60, roles=(MEMBER,))
    for headers, code in (
        ({"Authorization": ""}, 401),
        ({"Authorization": f"Bearer {member}"}, 403),
    ):
        assert members.get("/admin/clients", headers=headers).status_code == code
        r = members.post("/admin/clients", json=client_definition("x", rs_key), headers=headers)
        assert r.status_code == code
        assert r.json()["resourceType"] == "OperationOutcome"
        assert members.delete("/admin/clients/rs-client", headers=headers).status_code == code
    assert members.get("/admin/clients/rs-client").json()["active"] is True


def _weak_rsa_jwk() -> dict:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    return {**RSAAlgorithm.to_jwk(key, as_dict=True), "kid": "weak"}


def _private_jwk() -> dict:
    key = ec.generate_private_key(ec.SECP384R1())
    return {**ECAlgorithm.to_jwk(key, as_dict=True), "kid": "private"}


def _p256_only() -> dict:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return {**ECAlgorithm.to_jwk(key, as_dict=True), "kid": "p256"}


def test_invalid_definitions_store_nothing(members, rs_key):
    good = client_definition("bad", rs_key)
    invalid = {
        "unknown field": good | {"secret": "x"},
        "bad client_id": good | {"client_id": "has space"},
        "unknown role": good | {"roles": ["member", "root"]},
        "no roles": good | {"roles": []},
        "bad scope": good | {"scope": "system/Patient.rs openid"},
        "patient scope": good | {"scope": "patient/*.rs"},
        "fine-grained scope": good | {"scope": "system/Observation.rs?category=vital-signs"},
        "bad organization": good | {"organization": "Patient/p1"},
        "unknown organization": good | {"organization": "Organization/nowhere"},
        "weak RSA key": good | {"jwks": {"keys": [_weak_rsa_jwk()]}},
        "private key": good | {"jwks": {"keys": [_private_jwk()]}},
        "symmetric key": good | {"jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}]}},
        "no kid": good
        | {"jwks": {"keys": [{k: v for k, v in rs_key.jwk().items() if k != "kid"}]}},
        "no usable key": good | {"jwks": {"keys": [_p256_only()]}},
        "both jwks and jwks_uri": good | {"jwks_uri": "https://example.org/jwks"},
        "http jwks_uri": {k: v for k, v in good.items() if k != "jwks"}
        | {"jwks_uri": "http://example.org/jwks"},
        "bad break_glass": good | {"break_glass": "yes"},
        "not an object": [good],
    }
    for what, body in invalid.items():
        r = members.post("/admin/clients", json=body)
        assert r.status_code == 400, what
        assert r.json()["resourceType"] == "OperationOutcome", what
    assert (
        members.post(
            "/admin/clients", content=b"{not json", headers={"Content-Type": "application/json"}
        ).status_code
        == 400
    )
    r = members.post("/admin/clients", content=b"x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = members.put("/admin/clients/other", json=good)
    assert r.status_code == 400  # client_id differs from the URL
    assert (
        members.post("/admin/clients", json=client_definition("rs-client", rs_key)).status_code
        == 409
    )
    assert "bad" not in [c["client_id"] for c in members.get("/admin/clients").json()]
    assert members.get("/admin/clients/bad").status_code == 404


def test_p256_keys_beside_a_usable_one_are_accepted(members):
    key = Signer("ES384")
    body = client_definition("mixed", key, jwks={"keys": [key.jwk(), _p256_only()]})
    r = members.post("/admin/clients", json=body)
    assert r.status_code == 201
    assert len(r.json()["jwks"]["keys"]) == 2


def test_local_developer_administers_without_a_token(tmp_path, rs_key):
    app = create_app(Settings(data_dir=tmp_path, auth=False, audit=False))
    with TestClient(app) as c:
        add_organization(c)
        assert c.post("/admin/clients", json=client_definition("dev", rs_key)).status_code == 201
        assert [x["client_id"] for x in c.get("/admin/clients").json()] == ["dev"]
