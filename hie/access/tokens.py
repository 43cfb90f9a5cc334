"""Bearer tokens: the server's signing key, minting (``hie token``) and verification.

Tokens are ES256 JWTs signed with the server's key, which is created on first use in
the data directory (mode 0600) or read from ``HIE_SIGNING_KEY_FILE``. The key never
lives in the repository. Verified tokens are cached until they expire, so a request
pays for one signature check per token, not per request.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hie.access.principal import Principal
from hie.access.scopes import parse_scopes
from hie.fhir.errors import FhirError, Issue

ISSUER = "hie"
AUDIENCE = "hie-fhir"
_CACHE_LIMIT = 10_000


def load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The P-256 signing key at ``path``, generated (mode 0600) if missing."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} does not hold an EC private key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return key


def unauthorized(description: str) -> FhirError:
    """401 with the RFC 6750 challenge."""
    return FhirError(
        401,
        [Issue("login", description)],
        {
            "WWW-Authenticate": f'Bearer realm="hie", error="invalid_token", '
            f'error_description="{description}"'
        },
    )


class TokenAuthority:
    """Mints and verifies the server's access tokens."""

    def __init__(self, key: ec.EllipticCurvePrivateKey):
        self._key = key
        self._public = key.public_key()
        self._cache: dict[str, tuple[Principal, float]] = {}

    def mint(self, client_id: str, scope: str, ttl_seconds: int) -> str:
        """A signed access token for ``client_id`` carrying ``scope``."""
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": client_id,
            "client_id": client_id,
            "scope": scope,
            "iat": now,
            "exp": now + ttl_seconds,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._key, algorithm="ES256")

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; 401 otherwise."""
        cached = self._cache.get(token)
        if cached is not None and cached[1] > time.time():
            return cached[0]
        try:
            claims = jwt.decode(
                token,
                self._public,
                algorithms=["ES256"],
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "scope"]},
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("The access token has expired") from None
        except jwt.PyJWTError as exc:
            raise unauthorized(f"Invalid access token: {exc}") from None
        if not isinstance(claims["scope"], str) or not isinstance(claims["sub"], str):
            raise unauthorized("Invalid access token: malformed claims")
        principal = Principal(claims["sub"], parse_scopes(claims["scope"]), claims["scope"])
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = (principal, float(claims["exp"]))
        return principal

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an ``Authorization`` header value; 401 if absent/bad."""
        if not authorization:
            raise unauthorized("This server requires a bearer token (see `hie token`)")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("The Authorization header must be 'Bearer <token>'")
        return self.verify(token.strip())
