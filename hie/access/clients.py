"""The registry of client systems (member institutions' backends) allowed to ask for
access tokens: who they are, which member organisation they act for, their roles, the
scopes they may be granted and the public keys their client assertions are signed with.

Clients are stored through the Store port as the hidden (non-FHIR) type ``HieClient``,
one document per client (id = ``client_id``), written with compare-and-set. The
registry keeps all of them in memory (an alliance has tens to hundreds of clients),
re-read from the store when the copy is older than a few seconds, so every token
request does not cost a store read and a change made by another process is seen soon.
Nothing stored is secret: only public keys (or the URL of a JWK Set) are accepted.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import re
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import orjson
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from hie.access.principal import ROLES
from hie.access.scopes import check_scopes
from hie.store import Store, VersionConflict, Write

log = logging.getLogger("hie.access")

#: The Store type clients are kept under; not a FHIR type, so never served as one.
CLIENT_TYPE = "HieClient"
#: Signature algorithms a client assertion may use (SMART Backend Services).
ASSERTION_ALGORITHMS = ("RS384", "ES384")
CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ORGANIZATION = re.compile(r"Organization/([A-Za-z0-9\-.]{1,64})")
_FIELDS = (
    "client_id",
    "name",
    "organization",
    "roles",
    "scope",
    "jwks",
    "jwks_uri",
    "break_glass",
    "active",
    "source",
)
#: JWK members that only a private (or symmetric) key has.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_PUBLIC_MEMBERS = {"RSA": ("n", "e"), "EC": ("crv", "x", "y")}
_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1}
#: How long the in-memory copy of the registry is trusted.
CACHE_SECONDS = 3.0
#: JWK Sets fetched from a ``jwks_uri``: kept this long, refetched on an unknown kid
#: at most this often, and no larger than this.
JWKS_TTL = 300.0
JWKS_MIN_REFETCH = 10.0
JWKS_MAX_BYTES = 256 * 1024
JWKS_TIMEOUT = 5.0


class ClientError(ValueError):
    """A client definition that cannot be registered (the message says why)."""


class ClientConflict(Exception):
    """The client exists already, or changed while it was being written."""


class JwksUnavailable(Exception):
    """A client's ``jwks_uri`` could not be fetched or holds no JWK Set."""


@dataclass(frozen=True)
class Client:
    """One registered client (see :meth:`from_json` for the JSON form)."""

    client_id: str
    organization: str
    roles: tuple[str, ...]
    scope: str
    name: str = ""
    jwks: dict | None = None
    jwks_uri: str | None = None
    break_glass: bool = False
    active: bool = True
    source: str | None = None

    @classmethod
    def from_json(cls, data: object, client_id: str | None = None) -> Client:
        """Validate a client definition (``client_id`` from the URL wins over, and must
        agree with, the body's); ClientError naming the first problem."""
        if not isinstance(data, dict):
            raise ClientError("a client is a JSON object")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ClientError(f"unknown field(s): {', '.join(unknown)}")
        if client_id is not None and data.get("client_id", client_id) != client_id:
            raise ClientError("client_id in the body differs from the one in the URL")
        cid = data.get("client_id", client_id)
        if not isinstance(cid, str) or not CLIENT_ID.fullmatch(cid):
            raise ClientError("client_id must be 1-64 characters of A-Z a-z 0-9 . _ -")
        organization = data.get("organization")
        if not isinstance(organization, str) or not _ORGANIZATION.fullmatch(organization):
            raise ClientError("organization must be a reference Organization/<id>")
        roles = data.get("roles")
        if not isinstance(roles, list) or not roles or not all(r in ROLES for r in roles):
            raise ClientError(f"roles must be a non-empty list of: {', '.join(ROLES)}")
        scope = data.get("scope")
        if not isinstance(scope, str):
            raise ClientError("scope must be a space-separated string of SMART scopes")
        try:
            scope = check_scopes(scope)
        except ValueError as exc:
            raise ClientError(f"scope: {exc}") from None
        jwks, jwks_uri = data.get("jwks"), data.get("jwks_uri")
        if (jwks is None) == (jwks_uri is None):
            raise ClientError("exactly one of jwks (a JWK Set) and jwks_uri is required")
        name = data.get("name", cid)
        source = data.get("source")
        if not isinstance(name, str) or not name.strip():
            raise ClientError("name must be a non-empty string")
        if source is not None and not _is_uri(source):
            raise ClientError("source must be an absolute URI naming the client system")
        flags = {
            k: data.get(k, default) for k, default in (("break_glass", False), ("active", True))
        }
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise ClientError(f"{key} must be true or false")
        return cls(
            client_id=cid,
            organization=organization,
            roles=tuple(dict.fromkeys(roles)),
            scope=scope,
            name=name.strip(),
            jwks=None if jwks is None else check_jwks(jwks),
            jwks_uri=None if jwks_uri is None else check_jwks_uri(jwks_uri),
            source=source,
            **flags,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON form (absent optional fields left out)."""
        out = {
            "client_id": self.client_id,
            "name": self.name,
            "organization": self.organization,
            "roles": list(self.roles),
            "scope": self.scope,
            "jwks": self.jwks,
            "jwks_uri": self.jwks_uri,
            "break_glass": self.break_glass,
            "active": self.active,
            "source": self.source,
        }
        return {k: v for k, v in out.items() if v is not None}


def _is_uri(value: object) -> bool:
    if not isinstance(value, str) or len(value) > 1024 or any(c.isspace() for c in value):
        return False
    scheme, _, rest = value.partition(":")
    return bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme)) and bool(rest)


# ------------------------------------------------------------------ keys
def public_key(jwk: object):
    """The public key of a JWK: RSA of 2048 bits or more, or EC on P-256/P-384;
    ClientError for anything else, and for any private key material."""
    if not isinstance(jwk, dict):
        raise ClientError("a JWK is a JSON object")
    private = sorted(_PRIVATE_MEMBERS & set(jwk))
    if private:
        raise ClientError(f"JWK holds private key material ({', '.join(private)}): never send it")
    kty = jwk.get("kty")
    if kty not in _PUBLIC_MEMBERS:
        raise ClientError(f"JWK kty must be RSA or EC, not {kty!r}")
    if not all(isinstance(jwk.get(m), str) for m in _PUBLIC_MEMBERS[kty]):
        raise ClientError(f"{kty} JWK needs {', '.join(_PUBLIC_MEMBERS[kty])}")
    if kty == "EC" and jwk["crv"] not in _CURVES:
        raise ClientError(f"EC JWK curve must be P-256 or P-384, not {jwk['crv']!r}")
    try:
        key = (RSAAlgorithm if kty == "RSA" else ECAlgorithm).from_jwk(jwk)
    except Exception as exc:  # pyjwt raises several types for a malformed key
        raise ClientError(f"JWK is not a valid {kty} public key: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise ClientError(f"RSA key of {key.key_size} bits; 2048 at least")
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ClientError("JWK is not a public key")
    return key


def _checked(jwk: object) -> tuple[dict, Any]:
    """A JWK reduced to its public members, ``kid``, ``use`` and ``alg``, and its key;
    ClientError if it is not a public signing key with a ``kid``."""
    key = public_key(jwk)
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > 256:
        raise ClientError("every JWK needs a kid (the assertion header names it)")
    if jwk.get("use", "sig") != "sig":
        raise ClientError(f"JWK {kid}: use must be sig")
    if not isinstance(jwk.get("alg", ""), str):
        raise ClientError(f"JWK {kid}: alg must be a string")
    members = ("kty", "kid", "use", "alg", *_PUBLIC_MEMBERS[jwk["kty"]])
    return {m: jwk[m] for m in members if m in jwk}, key


def check_jwks(jwks: object) -> dict:
    """A registrable JWK Set: public signing keys only, each with a unique ``kid``,
    at least one usable for RS384 or ES384; ClientError otherwise."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise ClientError('jwks must be a JWK Set: {"keys": [...]}')
    keys = [_checked(k)[0] for k in jwks["keys"]]
    ids = [(k["kty"], k["kid"]) for k in keys]
    if len(set(ids)) != len(ids):
        raise ClientError("two keys of one type share a kid")
    if not any(_usable(k, alg) for k in keys for alg in ASSERTION_ALGORITHMS):
        raise ClientError("no key can sign RS384 or ES384 (an RSA or P-384 EC key)")
    return {"keys": keys}


def check_jwks_uri(uri: object) -> str:
    """A registrable JWK Set URL: https, or http on the loopback interface."""
    if not isinstance(uri, str) or len(uri) > 2048:
        raise ClientError("jwks_uri must be a URL")
    parts = urlsplit(uri)
    if parts.scheme == "https" and parts.hostname:
        return uri
    if parts.scheme == "http" and _loopback(parts.hostname):
        return uri
    raise ClientError("jwks_uri must be an https URL (http only on the loopback interface)")


def _loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _usable(jwk: dict, alg: str) -> bool:
    """True if ``jwk`` may verify an ``alg`` signature (RS384: RSA; ES384: P-384)."""
    if jwk.get("alg") not in (None, alg):
        return False
    if alg == "RS384":
        return jwk["kty"] == "RSA"
    return jwk["kty"] == "EC" and jwk["crv"] == "P-384"


def select_keys(jwks: Mapping, kid: str, alg: str) -> list:
    """Public keys of ``jwks`` named ``kid`` that can verify ``alg``; keys that are
    malformed or unusable (as in a fetched set) are skipped."""
    found = []
    for jwk in jwks.get("keys", ()):
        if not isinstance(jwk, dict) or jwk.get("kid") != kid:
            continue
        try:
            normal, key = _checked(jwk)
        except ClientError:
            continue
        if _usable(normal, alg):
            found.append(key)
    return found


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk_of_pem(pem: bytes) -> dict:
    """The public JWK (``kid`` = RFC 7638 thumbprint) of a PEM public key;
    ClientError for a private key or anything else."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem)
    except ValueError:
        raise ClientError("the file must hold a PEM public key (never a private key)") from None
    if isinstance(key, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(key, as_dict=True)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(key, as_dict=True)
    else:
        raise ClientError("the key must be RSA or EC")
    public_key(jwk)
    members = sorted(("kty", *_PUBLIC_MEMBERS[jwk["kty"]]))
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"))
    jwk["kid"] = _b64(hashlib.sha256(canonical.encode()).digest())
    return jwk


def _fetch_jwks(url: str) -> dict:
    """GET a JWK Set (blocking; run it in a thread)."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=JWKS_TIMEOUT) as response:
            data = response.read(JWKS_MAX_BYTES + 1)
    except OSError as exc:
        raise JwksUnavailable(f"cannot fetch {url}: {exc}") from None
    if len(data) > JWKS_MAX_BYTES:
        raise JwksUnavailable(f"{url} is larger than {JWKS_MAX_BYTES} bytes")
    try:
        jwks = json.loads(data)
    except ValueError:
        raise JwksUnavailable(f"{url} does not hold JSON") from None
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise JwksUnavailable(f"{url} does not hold a JWK Set")
    return jwks


# ------------------------------------------------------------------ registry
def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ClientRegistry:
    """The registered clients, read through a short-lived in-memory copy."""

    def __init__(self, store: Store, cache_seconds: float = CACHE_SECONDS):
        self.store = store
        self.cache_seconds = cache_seconds
        self._clients: dict[str, Client] = {}
        self._loaded_at: float | None = None
        #: Counts this process's writes: a refresh that overlapped one is discarded.
        self._writes = 0
        self._refreshing: asyncio.Task | None = None
        #: Fetched JWK Sets by URL, with the monotonic time of the fetch.
        self._remote: dict[str, tuple[dict, float]] = {}

    async def refresh(self) -> None:
        """Re-read every client from the store (a stored definition that no longer
        validates is logged and left out)."""
        writes = self._writes
        clients: dict[str, Client] = {}
        after = None
        while batch := await self.store.scan(CLIENT_TYPE, after=after):
            for version in batch:
                try:
                    clients[version.id] = Client.from_json(orjson.loads(version.body))
                except ClientError as exc:
                    log.error("registered client %s is invalid, ignored: %s", version.id, exc)
            after = batch[-1].id
        if writes == self._writes:
            self._clients, self._loaded_at = clients, time.monotonic()

    def _stale(self) -> bool:
        return self._loaded_at is None or time.monotonic() - self._loaded_at > self.cache_seconds

    async def get(self, client_id: str) -> Client | None:
        """The client ``client_id`` (active or not), or None if never registered."""
        if self._stale():
            await self.refresh()
        return self._clients.get(client_id)

    def cached(self, client_id: str) -> Client | None:
        """:meth:`get` without waiting (for synchronous token checks): the in-memory
        copy, refreshed in the background when it is older than a few seconds."""
        if self._stale() and (self._refreshing is None or self._refreshing.done()):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self._refreshing = loop.create_task(self.refresh())
                self._refreshing.add_done_callback(self._refreshed)
        return self._clients.get(client_id)

    @staticmethod
    def _refreshed(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("reading the client registry failed: %s", task.exception())

    async def all(self) -> list[Client]:
        """Every registered client, by id."""
        await self.refresh()
        return [self._clients[k] for k in sorted(self._clients)]

    async def save(self, client: Client, *, create: bool = False) -> bool:
        """Register or replace ``client``; True if it is new. ClientError if its
        organisation is not a stored Organization, ClientConflict if ``create`` and it
        exists, or if it changed meanwhile."""
        org_id = client.organization.split("/", 1)[1]
        org = await self.store.read("Organization", org_id)
        if org is None or org.deleted:
            raise ClientError(f"{client.organization} does not exist; create it first")
        current = await self.store.read(CLIENT_TYPE, client.client_id)
        if current is not None and create:
            raise ClientConflict(f"client {client.client_id} is already registered")
        await self._write(client, current.version if current else 0)
        return current is None

    async def deactivate(self, client_id: str) -> Client | None:
        """Mark ``client_id`` inactive (it gets no more tokens); None if unknown."""
        current = await self.store.read(CLIENT_TYPE, client_id)
        if current is None or current.deleted:
            return None
        client = replace(Client.from_json(orjson.loads(current.body)), active=False)
        await self._write(client, current.version)
        return client

    async def _write(self, client: Client, prev: int) -> None:
        body = orjson.dumps(client.to_json())
        method = "PUT" if prev else "POST"
        write = Write(CLIENT_TYPE, client.client_id, prev, prev + 1, _now(), method, body, ())
        try:
            await self.store.commit([write])
        except VersionConflict:
            raise ClientConflict(f"client {client.client_id} changed meanwhile; retry") from None
        self._writes += 1
        self._clients[client.client_id] = client

    async def keys_for(self, client: Client, kid: str, alg: str) -> list:
        """The client's public keys named ``kid`` usable for ``alg``: from its inline
        JWK Set, or from its ``jwks_uri`` (cached; refetched on an unknown kid)."""
        if client.jwks is not None:
            return select_keys(client.jwks, kid, alg)
        url = client.jwks_uri
        jwks, fetched_at = self._remote.get(url, ({}, None))
        age = None if fetched_at is None else time.monotonic() - fetched_at
        if age is not None and age < JWKS_TTL:
            keys = select_keys(jwks, kid, alg)
            if keys or age < JWKS_MIN_REFETCH:
                return keys
        jwks = await asyncio.to_thread(_fetch_jwks, url)
        self._remote[url] = (jwks, time.monotonic())
        return select_keys(jwks, kid, alg)
