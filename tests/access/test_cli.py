"""``hie client``, ``hie key`` and ``hie token`` on a data directory of their own."""

from __future__ import annotations

import json
import os

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from hie.app import create_app
from hie.cli import app as cli
from hie.config import Settings
from tests.access.conftest import Signer

runner = CliRunner()


@pytest.fixture
def hie(tmp_path, monkeypatch):
    """``hie ARGS --data-dir TMP``, returning the result (exit code checked by callers)."""
    for name in [n for n in os.environ if n.startswith("HIE_")]:
        monkeypatch.delenv(name)

    def run(*args: str):
        end = args.index("--") if "--" in args else len(args)  # options before "--"
        return runner.invoke(cli, [*args[:end], "--data-dir", str(tmp_path), *args[end:]])

    return run


def claims_of(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def test_register_a_member_and_mint_its_token(hie, tmp_path, rs_key, es_key):
    pem = tmp_path / "member.pub.pem"
    pem.write_bytes(
        rs_key.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    r = hie(
        "client", "add", "member-1", "--org", "Organization/hosp-1", "--org-name", "Hospital 1",
        "--role", "member", "--role", "regional-platform", "--scope", "system/*.rs",
        "--public-key", str(pem), "--break-glass", "--source", "urn:oid:1.2.3",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "created Organization/hosp-1" in r.output and "registered client member-1" in r.output
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(es_key.jwks()))
    r = hie(
        "client", "add", "member-2", "--org", "Organization/hosp-1", "--role", "member",
        "--scope", "system/Patient.rs", "--jwks", str(jwks), "--name", "Clinic system",
    )  # fmt: skip
    assert r.exit_code == 0, r.output

    listed = hie("client", "list").output.splitlines()
    assert [line.split("\t")[0] for line in listed] == ["member-1", "member-2"]
    shown = json.loads(hie("client", "show", "member-1").output)
    assert shown["roles"] == ["member", "regional-platform"] and shown["break_glass"] is True
    assert shown["jwks"]["keys"][0]["kty"] == "RSA" and "d" not in shown["jwks"]["keys"][0]

    r = hie("token", "--client", "member-1", "--scope", "system/Patient.rs system/Encounter.cruds",
            "--purpose", "ETREAT", "--user", "Dr. Wang")  # fmt: skip
    assert r.exit_code == 0, r.output
    token = r.output.strip()
    claims = claims_of(token)
    assert claims["client_id"] == "member-1" and claims["scope"] == "system/Patient.rs"
    assert claims["organization"] == "Organization/hosp-1"
    assert claims["roles"] == ["member", "regional-platform"] and claims["break_glass"] is True
    assert claims["purpose_of_use"] == "ETREAT" and claims["subject_name"] == "Dr. Wang"
    assert claims_of(hie("token", "--client", "member-2").output.strip())["scope"] == (
        "system/Patient.rs"
    )

    app = create_app(Settings(data_dir=tmp_path))
    with TestClient(app) as c:
        bearer = {"Authorization": f"Bearer {token}"}
        assert c.get("/fhir/Patient", headers=bearer).status_code == 200
        assert c.get("/fhir/Organization/hosp-1", headers=bearer).status_code == 403

    assert hie("token", "--client", "member-2", "--purpose", "BTG").exit_code == 1
    assert hie("token", "--client", "member-1", "--scope", "system/Encounter.c").exit_code == 1
    assert hie("token", "--client", "ghost").exit_code == 1
    assert hie("client", "remove", "member-1").exit_code == 0
    r = hie("token", "--client", "member-1")
    assert r.exit_code == 1 and "not an active registered client" in r.output
    assert "inactive" in hie("client", "list").output.splitlines()[0]
    assert hie("client", "remove", "ghost").exit_code == 1
    assert hie("client", "show", "ghost").exit_code == 1


def test_local_admin_token(hie):
    r = hie("token", "--scope", "system/Patient.r")
    assert r.exit_code == 0, r.output
    claims = claims_of(r.output.strip())
    assert claims["client_id"] == "local-admin" and claims["roles"] == ["admin"]
    assert claims["scope"] == "system/Patient.r" and "organization" not in claims
    assert claims_of(hie("token").output.strip())["scope"] == "system/*.cruds"
    assert hie("token", "--purpose", "NOPE").exit_code == 1


def test_refused_registrations(hie, tmp_path):
    private = tmp_path / "private.pem"
    private.write_bytes(
        Signer("ES384").private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    base = ["client", "add", "c1", "--org", "Organization/o1", "--role", "member"]
    r = hie(*base, "--scope", "system/*.rs", "--public-key", str(private), "--org-name", "O")
    assert r.exit_code == 1 and "public key" in r.output
    r = hie(*base, "--scope", "system/*.rs", "--jwks-url", "https://example.org/jwks")
    assert r.exit_code == 1 and "does not exist" in r.output
    r = hie(*base, "--scope", "system/*.rs")
    assert r.exit_code == 1 and "exactly one of" in r.output
    r = hie(*base, "--scope", "everything", "--jwks-url", "https://example.org/jwks")
    assert r.exit_code == 1 and "scope" in r.output
    assert hie("client", "list").output == ""


def test_keys(hie, tmp_path):
    first = hie("token").output.strip()
    listed = hie("key", "list").output.splitlines()
    assert len(listed) == 1 and listed[0].endswith("\tactive")
    old_kid = listed[0].split("\t")[0]
    assert jwt.get_unverified_header(first)["kid"] == old_kid

    r = hie("key", "rotate")
    assert r.exit_code == 0
    new_kid = r.output.strip()
    assert jwt.get_unverified_header(hie("token").output.strip())["kid"] == new_kid
    assert sorted(hie("key", "list").output.splitlines()) == sorted(
        [f"{old_kid}\tverifies", f"{new_kid}\tactive"]
    )
    # "--": a kid (a base64url thumbprint) may start with a dash
    assert hie("key", "retire", "--", new_kid).exit_code == 1  # the active key
    assert hie("key", "retire", "--", old_kid).exit_code == 0
    assert hie("key", "list").output.splitlines() == [f"{new_kid}\tactive"]
    with TestClient(create_app(Settings(data_dir=tmp_path))) as c:
        assert (
            c.get("/fhir/Patient", headers={"Authorization": f"Bearer {first}"}).status_code == 401
        )
