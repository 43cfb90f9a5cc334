"""Fixtures of the authorisation tests: client key pairs (generated per test session,
never stored), signed assertions, a TestClient with an administrator's token and two
registered member clients."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time
import uuid
from collections.abc import Iterator

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from hie.access.oauth import ASSERTION_TYPE
from hie.access.principal import ADMIN
from hie.access.tokens import AUDIENCE, ISSUER

BASE = "http://hie.test"
TOKEN_URL = f"{BASE}/auth/token"
ORG = "Organization/org-a"
FHIR = "application/fhir+json"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict, claims: dict) -> str:
    """A JWS with the given header and no signature (``alg: none``)."""
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}."


def hs256(header: dict, claims: dict, secret: bytes) -> str:
    """An HS256 JWS built by hand (pyjwt refuses a PEM as HMAC secret)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def access_claims(**changes) -> dict:
    """Claims of an access token of this server (an administrator's); a change to None
    removes the claim."""
    now = int(time.time())
    out = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "c",
        "client_id": "c",
        "scope": "system/*.cruds",
        "roles": [ADMIN],
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
    }
    out.update(changes)
    return {k: v for k, v in out.items() if v is not None}


class Signer:
    """A client's key pair for ``alg`` (RS384: RSA 2048; ES384: EC P-384)."""

    def __init__(self, alg: str):
        self.alg = alg
        if alg == "RS384":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            self.private = ec.generate_private_key(ec.SECP384R1())
        self.kid = uuid.uuid4().hex

    def jwk(self) -> dict:
        """The public JWK, with kid."""
        algorithm = RSAAlgorithm if self.alg == "RS384" else ECAlgorithm
        return {**algorithm.to_jwk(self.private.public_key(), as_dict=True), "kid": self.kid}

    def jwks(self) -> dict:
        return {"keys": [self.jwk()]}

    def claims(self, client_id: str, aud: str = TOKEN_URL, **changes) -> dict:
        """Valid assertion claims; a change to None removes the claim."""
        now = int(time.time())
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": aud,
            "iat": now,
            "exp": now + 240,
            "jti": uuid.uuid4().hex,
        }
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}

    def assertion(self, client_id: str, *, headers: dict | None = None, **changes) -> str:
        """A signed client assertion of ``client_id``."""
        return jwt.encode(
            self.claims(client_id, **changes),
            self.private,
            algorithm=self.alg,
            headers={"kid": self.kid, **(headers or {})},
        )


@pytest.fixture(scope="session")
def rs_key() -> Signer:
    return Signer("RS384")


@pytest.fixture(scope="session")
def es_key() -> Signer:
    return Signer("ES384")


def token_form(assertion: str, scope: str = "system/Patient.rs", **extra: str) -> dict:
    """The form of a SMART Backend Services token request."""
    return {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
        **extra,
    }


def admin_token(app) -> str:
    return app.state.tokens.mint("local-admin", "system/*.cruds", 600, roles=(ADMIN,))


def client_definition(client_id: str, key: Signer, **changes) -> dict:
    """A member client of org-a allowed Patient (all) and Observation (read, search)."""
    return {
        "client_id": client_id,
        "name": f"{client_id} system",
        "organization": ORG,
        "roles": ["member"],
        "scope": "system/Patient.cruds system/Observation.rs",
        "jwks": key.jwks(),
        "source": f"urn:hie:test:{client_id}",
        **changes,
    }


def add_organization(api: TestClient, ref: str = ORG, name: str = "Hospital A") -> None:
    type_, id_ = ref.split("/")
    body = {"resourceType": type_, "id": id_, "name": name}
    r = api.put(f"/fhir/{ref}", json=body, headers={"Content-Type": FHIR})
    assert r.status_code in (200, 201), r.text


@pytest.fixture
def api(app) -> Iterator[TestClient]:
    """The test's only TestClient, holding an administrator's token."""
    with TestClient(app, base_url=BASE) as c:
        c.headers["Authorization"] = f"Bearer {admin_token(app)}"
        yield c


@pytest.fixture
def members(api, rs_key, es_key) -> TestClient:
    """org-a with two registered clients: ``rs-client`` (RS384) and ``es-client`` (ES384)."""
    add_organization(api)
    for client_id, key in (("rs-client", rs_key), ("es-client", es_key)):
        r = api.post("/admin/clients", json=client_definition(client_id, key))
        assert r.status_code == 201, r.text
    return api


def get_token(api: TestClient, form: dict) -> dict:
    """POST a token request without the administrator's Authorization header."""
    r = api.post("/auth/token", data=form, headers={"Authorization": ""})
    assert r.status_code == 200, r.text
    return r.json()


class JwksServer(http.server.ThreadingHTTPServer):
    jwks: dict
    hits: int = 0


class _JwksHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.hits += 1
        body = json.dumps(self.server.jwks).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    """A JWK Set served over http on the loopback interface."""
    server = JwksServer(("127.0.0.1", 0), _JwksHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def jwks_url(server: JwksServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
