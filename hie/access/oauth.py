"""The token endpoint of SMART Backend Services
(https://hl7.org/fhir/smart-app-launch/backend-services.html): the OAuth 2.0
``client_credentials`` grant, the client authenticating with a JWT assertion signed by
its registered key (``private_key_jwt``, RFC 7523).

:func:`issue_token` holds the whole exchange; the HTTP route only reads the form and
renders the result or the :class:`OAuthError`.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping
from dataclasses import dataclass

import jwt

from hie.access.clients import (
    ASSERTION_ALGORITHMS,
    CLIENT_ID,
    Client,
    ClientRegistry,
    JwksUnavailable,
)
from hie.access.scopes import negotiate
from hie.access.tokens import TokenAuthority
from hie.store import Store

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: The latest an assertion may expire, counted from now (SMART: five minutes).
MAX_ASSERTION_LIFETIME = 300
#: Tolerated difference between the client's clock and ours.
CLOCK_SKEW = 30
_MAX_JTI = 256


@dataclass
class OAuthError(Exception):
    """A token request refused, as RFC 6749 §5.2 answers it. ``client_id`` is the
    client the request claimed to come from (unverified), when it named one."""

    status: int
    error: str
    description: str
    client_id: str | None = None

    def __str__(self) -> str:
        return f"{self.error}: {self.description}"

    def body(self) -> dict[str, str]:
        """The JSON error response."""
        return {"error": self.error, "error_description": self.description}


@dataclass(frozen=True)
class Issued:
    """A granted token request: the authenticated client and the JSON response."""

    client_id: str
    body: dict


def _invalid_client(description: str, client_id: str | None = None) -> OAuthError:
    return OAuthError(401, "invalid_client", description, client_id)


async def issue_token(
    form: Mapping[str, str],
    token_url: str,
    *,
    clients: ClientRegistry,
    tokens: TokenAuthority,
    store: Store,
    ttl: int,
) -> Issued:
    """Answer a token request (its form parameters) made to ``token_url``: check the
    grant, authenticate the client by its assertion, grant the requested scopes its
    registration covers, and mint an access token valid ``ttl`` seconds.
    Raises :class:`OAuthError`."""
    grant_type = form.get("grant_type")
    if not grant_type:
        raise OAuthError(400, "invalid_request", "grant_type is required")
    if grant_type != "client_credentials":
        raise OAuthError(400, "unsupported_grant_type", "only client_credentials is supported")
    client = await authenticate_client(form, token_url, clients, store)
    requested = form.get("scope")
    if not requested:
        raise OAuthError(400, "invalid_request", "scope is required", client.client_id)
    scope = negotiate(requested, client.scope)
    if not scope:
        raise OAuthError(
            400,
            "invalid_scope",
            f"none of the requested scopes is allowed; registered: {client.scope}",
            client.client_id,
        )
    token = tokens.mint(
        client.client_id,
        scope,
        ttl,
        organization=client.organization,
        roles=client.roles,
        break_glass=client.break_glass,
        source=client.source,
    )
    body = {"access_token": token, "token_type": "bearer", "expires_in": ttl, "scope": scope}
    return Issued(client.client_id, body)


async def authenticate_client(
    form: Mapping[str, str], token_url: str, clients: ClientRegistry, store: Store
) -> Client:
    """The registered, active client whose assertion (``client_assertion``) is valid
    for ``token_url`` and has not been used before; ``invalid_client`` otherwise."""
    if form.get("client_assertion_type") != ASSERTION_TYPE:
        raise _invalid_client(f"client_assertion_type must be {ASSERTION_TYPE}")
    assertion = form.get("client_assertion")
    if not assertion:
        raise _invalid_client("client_assertion (a signed JWT) is required")
    try:
        header = jwt.get_unverified_header(assertion)
        claimed = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise _invalid_client(f"client_assertion is not a JWT: {exc}") from None
    client_id = claimed.get("iss")
    if not isinstance(client_id, str) or not CLIENT_ID.fullmatch(client_id):
        raise _invalid_client("the assertion's iss must be the client_id")
    if form.get("client_id", client_id) != client_id:
        raise _invalid_client("client_id differs from the assertion's iss", client_id)
    alg, kid = header.get("alg"), header.get("kid")
    if alg not in ASSERTION_ALGORITHMS:
        raise _invalid_client(f"assertion alg must be RS384 or ES384, not {alg!r}", client_id)
    if not isinstance(kid, str):
        raise _invalid_client("the assertion header needs the kid of the signing key", client_id)
    client = await clients.get(client_id)
    if client is None or not client.active:
        raise _invalid_client(f"{client_id} is not an active registered client", client_id)
    if "jku" in header and header["jku"] != client.jwks_uri:
        raise _invalid_client("jku is not the client's registered JWK Set URL", client_id)
    try:
        keys = await clients.keys_for(client, kid, alg)
    except JwksUnavailable as exc:
        raise _invalid_client(f"the client's JWK Set is unavailable: {exc}", client_id) from None
    if not keys:
        raise _invalid_client(f"the client has no {alg} key {kid!r}", client_id)
    claims = _verify(assertion, keys, alg, client_id, token_url)
    await _claim_once(store, client_id, claims)
    return client


def _verify(assertion: str, keys: list, alg: str, client_id: str, token_url: str) -> dict:
    """The claims of an assertion signed by one of ``keys``, with ``iss`` = ``sub`` =
    the client and ``aud`` the token endpoint (with or without a trailing slash)."""
    base = token_url.rstrip("/")
    problem: jwt.PyJWTError | None = None
    for key in keys:
        try:
            claims = jwt.decode(
                assertion,
                key,
                algorithms=[alg],
                audience=[base, f"{base}/"],
                issuer=client_id,
                leeway=CLOCK_SKEW,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
            )
            break
        except jwt.InvalidSignatureError as exc:
            problem = exc
        except jwt.ExpiredSignatureError:
            raise _invalid_client("the assertion has expired", client_id) from None
        except jwt.InvalidAudienceError:
            raise _invalid_client(f"the assertion's aud must be {base}", client_id) from None
        except jwt.PyJWTError as exc:
            raise _invalid_client(f"invalid assertion: {exc}", client_id) from None
    else:
        raise _invalid_client(f"invalid assertion: {problem}", client_id)
    if claims["sub"] != client_id:
        raise _invalid_client("the assertion's sub must be the client_id", client_id)
    if claims["exp"] > time.time() + MAX_ASSERTION_LIFETIME + CLOCK_SKEW:
        raise _invalid_client("the assertion's exp is more than 5 minutes ahead", client_id)
    jti = claims["jti"]
    if not isinstance(jti, str) or not 0 < len(jti) <= _MAX_JTI:
        raise _invalid_client(f"jti must be a string of 1-{_MAX_JTI} characters", client_id)
    return claims


async def _claim_once(store: Store, client_id: str, claims: dict) -> None:
    """Record the assertion's ``jti`` until it expires; ``invalid_client`` if it was
    used before (a replayed assertion)."""
    until = dt.datetime.fromtimestamp(claims["exp"] + CLOCK_SKEW, dt.UTC).isoformat()
    if not await store.claim(f"client-assertion:{client_id}:{claims['jti']}", until):
        raise _invalid_client("this assertion (its jti) has been used before", client_id)
