"""Access tokens: minting the server's own and verifying them (or an external OpenID
provider's) into a :class:`~hie.access.principal.Principal`.

The server's tokens are ES256 JWTs signed by the active key of the
:class:`~hie.access.keys.KeyRing` (``kid`` in the header) and verified against the
key ring's token keys by that ``kid``, the algorithm fixed (never taken from the
token). They carry who the client is: ``client_id``/``sub``, ``scope``,
``organization``, ``roles``, ``break_glass``, and optionally the end user and the
purpose of use (IHE IUA: ``subject_name``, ``subject_role``, ``purpose_of_use``).

With ``HIE_OIDC_ISSUER`` and ``HIE_OIDC_JWKS_URL`` set, tokens issued by that
provider are accepted too: verified with its JWK Set, and mapped to the registered
client named by their ``client_id`` (or ``azp``) claim, which gives organisation,
roles and break-glass; their scopes are narrowed to the client's registered ones.

Verified tokens are cached (the server's own until they expire, external ones for a
few seconds), so a request pays for one signature check per token, not per request.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import jwt

from hie.access.clients import ClientRegistry
from hie.access.keys import ALGORITHM, KeyRing
from hie.access.principal import ROLES, TREATMENT, Principal
from hie.access.purpose import parse_purpose
from hie.access.scopes import negotiate, parse_scopes
from hie.config import Settings
from hie.fhir.errors import FhirError, Issue

ISSUER = "hie"
AUDIENCE = "hie-fhir"
#: Algorithms accepted from an external OpenID provider.
EXTERNAL_ALGORITHMS = ["RS256", "RS384", "ES256", "ES384"]
#: How long an external token's principal is reused before the registry is asked again.
EXTERNAL_CACHE_SECONDS = 5.0
_CACHE_LIMIT = 10_000


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


@dataclass(frozen=True)
class ExternalIssuer:
    """An OpenID provider whose access tokens are accepted."""

    issuer: str
    jwks: jwt.PyJWKClient
    audience: str

    @classmethod
    def from_settings(cls, settings: Settings) -> ExternalIssuer | None:
        """The provider ``HIE_OIDC_*`` configure, or None; ValueError if incomplete."""
        if not settings.oidc_issuer and not settings.oidc_jwks_url:
            return None
        if not settings.oidc_issuer or not settings.oidc_jwks_url:
            raise ValueError("set both HIE_OIDC_ISSUER and HIE_OIDC_JWKS_URL, or neither")
        audience = settings.oidc_audience or settings.base_url
        if not audience:
            raise ValueError("an external OpenID provider needs HIE_OIDC_AUDIENCE or HIE_BASE_URL")
        return cls(
            settings.oidc_issuer, jwt.PyJWKClient(settings.oidc_jwks_url, timeout=5), audience
        )


class TokenAuthority:
    """Mints the server's access tokens and verifies bearer tokens."""

    def __init__(
        self,
        keys: KeyRing,
        clients: ClientRegistry | None = None,
        external: ExternalIssuer | None = None,
    ):
        self._keys = keys
        self._clients = clients
        self._external = external
        #: token -> (principal, cached until, kid of our signing key or None)
        self._cache: dict[str, tuple[Principal, float, str | None]] = {}

    def mint(
        self,
        client_id: str,
        scope: str,
        ttl: int,
        *,
        organization: str | None = None,
        roles: Iterable[str] = (),
        break_glass: bool = False,
        purpose: str | None = None,
        user: str | None = None,
        user_role: str | None = None,
        source: str | None = None,
    ) -> str:
        """A signed access token for ``client_id`` carrying ``scope`` for ``ttl``
        seconds, and what the client is: its organisation, roles, break-glass right,
        and optionally the end user (name, role) and purpose of use it acts for."""
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": client_id,
            "client_id": client_id,
            "scope": scope,
            "roles": sorted(set(roles)),
            "break_glass": break_glass,
            "iat": now,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
        }
        optional = {
            "organization": organization,
            "purpose_of_use": purpose,
            "subject_name": user,
            "subject_role": user_role,
            "source": source,
        }
        claims.update((k, v) for k, v in optional.items() if v is not None)
        return self._keys.sign_jwt(claims)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an ``Authorization`` header value; 401 if absent/bad."""
        if not authorization:
            raise unauthorized("This server requires a bearer token (see `hie token`)")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("The Authorization header must be 'Bearer <token>'")
        return self.verify(token.strip())

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; 401 otherwise."""
        cached = self._cache.get(token)
        if cached is not None:
            principal, until, kid = cached
            valid_key = kid is None or self._keys.public_key(kid, tokens_only=True) is not None
            if until > time.time() and valid_key:
                return principal
            del self._cache[token]
        try:
            header = jwt.get_unverified_header(token)
            issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except jwt.PyJWTError as exc:
            raise unauthorized(f"Invalid access token: {exc}") from None
        kid = None
        if self._external is not None and issuer == self._external.issuer:
            principal, until = self._verify_external(token)
        else:
            kid = header.get("kid")
            principal, until = self._verify_own(token, kid)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = (principal, until, kid)
        return principal

    def _verify_own(self, token: str, kid: object) -> tuple[Principal, float]:
        key = self._keys.public_key(kid, tokens_only=True) if isinstance(kid, str) else None
        if key is None:
            raise unauthorized("Invalid access token: not signed by a key of this server")
        claims = _decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": ["exp", "iat", "sub", "scope", "jti"]},
        )
        scope, sub = claims["scope"], claims["sub"]
        roles, organization = claims.get("roles", []), claims.get("organization")
        source = claims.get("source")
        if not (
            isinstance(scope, str)
            and isinstance(sub, str)
            and isinstance(roles, list)
            and all(r in ROLES for r in roles)
            and isinstance(claims.get("break_glass", False), bool)
            and (organization is None or isinstance(organization, str))
            and (source is None or isinstance(source, str))
        ):
            raise unauthorized("Invalid access token: malformed claims")
        principal = Principal(
            sub,
            parse_scopes(scope),
            scope,
            organization=organization,
            roles=frozenset(roles),
            break_glass=claims.get("break_glass", False),
            token_id=str(claims["jti"]),
            source=source,
            **_end_user(claims),
        )
        return principal, float(claims["exp"])

    def _verify_external(self, token: str) -> tuple[Principal, float]:
        ext = self._external
        try:
            key = ext.jwks.get_signing_key_from_jwt(token).key
        except jwt.PyJWTError as exc:
            raise unauthorized(f"Invalid access token: no key of {ext.issuer} ({exc})") from None
        claims = _decode(
            token,
            key,
            algorithms=EXTERNAL_ALGORITHMS,
            audience=ext.audience,
            issuer=ext.issuer,
            options={"require": ["exp"]},
        )
        client_id = claims.get("client_id") or claims.get("azp")
        client = None
        if isinstance(client_id, str) and self._clients is not None:
            client = self._clients.cached(client_id)
        if client is None or not client.active:
            raise unauthorized(f"Access token of {ext.issuer} for no active registered client")
        requested = claims.get("scope", claims.get("scp", ""))
        if isinstance(requested, list):
            requested = " ".join(s for s in requested if isinstance(s, str))
        if not isinstance(requested, str):
            raise unauthorized("Invalid access token: malformed scope")
        scope = negotiate(requested, client.scope)
        jti = claims.get("jti")
        principal = Principal(
            client.client_id,
            parse_scopes(scope),
            scope,
            organization=client.organization,
            roles=frozenset(client.roles),
            break_glass=client.break_glass,
            token_id=jti if isinstance(jti, str) else None,
            source=client.source,
            **_end_user(claims),
        )
        return principal, min(float(claims["exp"]), time.time() + EXTERNAL_CACHE_SECONDS)


def _decode(token: str, key, **kwargs) -> dict:
    try:
        return jwt.decode(token, key, **kwargs)
    except jwt.ExpiredSignatureError:
        raise unauthorized("The access token has expired") from None
    except jwt.PyJWTError as exc:
        raise unauthorized(f"Invalid access token: {exc}") from None


def _end_user(claims: dict) -> dict:
    """``purpose``, ``user`` and ``user_role`` of the Principal from IUA-style claims,
    flat or under ``extensions.ihe_iua``; 401 when malformed."""
    extensions = claims.get("extensions")
    iua = extensions.get("ihe_iua") if isinstance(extensions, dict) else None
    iua = iua if isinstance(iua, dict) else {}

    def claim(name: str) -> object:
        return claims.get(name, iua.get(name))

    purpose, user, role = claim("purpose_of_use"), claim("subject_name"), claim("subject_role")
    out: dict = {"purpose": TREATMENT}
    try:
        if purpose is not None:
            out["purpose"] = parse_purpose(_code(purpose, with_system=True))
        if role is not None:
            out["user_role"] = _code(role, with_system=False)
    except (FhirError, ValueError) as exc:
        raise unauthorized(f"Invalid access token: {exc}") from None
    if user is not None:
        if not isinstance(user, str):
            raise unauthorized("Invalid access token: subject_name must be a string")
        out["user"] = user
    return out


def _code(value: object, *, with_system: bool) -> str:
    """A code from a claim: a string, a coding ``{system, code}`` or a list of one."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("code"), str):
        system = value.get("system")
        if with_system and isinstance(system, str):
            return f"{system}|{value['code']}"
        return value["code"]
    raise ValueError(f"not a code: {value!r}")
