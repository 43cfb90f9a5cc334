"""The server's signing keys: access tokens and audit seals are signed with them.

Keys are EC P-256 private keys in PEM files under the keys directory
(``$HIE_DATA_DIR/keys`` unless ``HIE_KEYS_DIR`` says otherwise), created on first use
with mode 0600; the key never lives in the repository. Each key is named by its RFC
7638 JWK thumbprint (its ``kid``). The newest file signs; older ones still verify, so
rotating (``hie key rotate``) does not invalidate tokens already issued. Retiring a key
(``hie key retire KID``) deletes its private part and keeps its public part
(``KID.pub.pem``): audit seals signed with it stay verifiable forever.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from pathlib import Path

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

#: JWS algorithm of every signature the server makes.
ALGORITHM = "ES256"
_PRIVATE = ".pem"
_PUBLIC = ".pub.pem"
#: Least time between two looks at the directory for keys rotated or retired by
#: another process (``hie key rotate`` while the server runs).
_RELOAD_INTERVAL = 5.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The public JWK of a P-256 key (without ``kid``)."""
    numbers = key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64(numbers.x.to_bytes(32, "big")),
        "y": _b64(numbers.y.to_bytes(32, "big")),
    }


def thumbprint(key: ec.EllipticCurvePublicKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url) of a P-256 public key."""
    jwk = public_jwk(key)
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"))
    return _b64(hashlib.sha256(canonical.encode()).digest())


class KeyRing:
    """The signing keys in one directory: the newest signs, all verify."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._private: dict[str, ec.EllipticCurvePrivateKey] = {}
        self._public: dict[str, ec.EllipticCurvePublicKey] = {}
        self._active: str | None = None
        self._checked = 0.0
        self._stamp: int | None = None
        self._load()
        if self._active is None:
            self.rotate()

    # ------------------------------------------------------------- files
    def _dir_stamp(self) -> int | None:
        try:
            return self.directory.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def _refresh(self) -> None:
        """Re-read the directory when it changed (checked every few seconds)."""
        if time.monotonic() - self._checked < _RELOAD_INTERVAL:
            return
        self._checked = time.monotonic()
        if self._dir_stamp() != self._stamp:
            with self._lock:
                self._load()

    def _load(self) -> None:
        self._stamp = self._dir_stamp()
        private: dict[str, ec.EllipticCurvePrivateKey] = {}
        public: dict[str, ec.EllipticCurvePublicKey] = {}
        newest: tuple[float, str] | None = None
        if self.directory.is_dir():
            for path in sorted(self.directory.iterdir()):
                if path.name.endswith(_PUBLIC):
                    key = serialization.load_pem_public_key(path.read_bytes())
                    if isinstance(key, ec.EllipticCurvePublicKey):
                        public[thumbprint(key)] = key
                elif path.name.endswith(_PRIVATE):
                    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
                    if not isinstance(key, ec.EllipticCurvePrivateKey):
                        raise ValueError(f"{path} does not hold an EC private key")
                    kid = thumbprint(key.public_key())
                    private[kid] = key
                    public[kid] = key.public_key()
                    stamp = (path.stat().st_mtime, path.name)
                    if newest is None or stamp > newest:
                        newest = stamp
                        active = kid
        self._private, self._public = private, public
        self._active = active if newest is not None else None
        self._checked = time.monotonic()

    def rotate(self) -> str:
        """Create a new key, which signs from now on; returns its kid."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        kid = thumbprint(key.public_key())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path = self.directory / f"{kid}{_PRIVATE}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        # A rotation within the same second as the previous key must still win.
        later = max(time.time(), *(p.stat().st_mtime + 1e-3 for p in self._key_files()))
        os.utime(path, (later, later))
        self._write_public(kid, key.public_key())
        with self._lock:
            self._load()
        return kid

    def retire(self, kid: str) -> None:
        """Delete the private key ``kid`` (it no longer verifies tokens); its public
        part stays for audit seals. The active key cannot be retired."""
        if kid == self._active:
            raise ValueError(f"{kid} is the active key; rotate first")
        path = self.directory / f"{kid}{_PRIVATE}"
        if not path.exists():
            raise ValueError(f"no private key {kid} in {self.directory}")
        self._write_public(kid, self._public[kid])
        path.unlink()
        with self._lock:
            self._load()

    def _write_public(self, kid: str, key: ec.EllipticCurvePublicKey) -> None:
        path = self.directory / f"{kid}{_PUBLIC}"
        if not path.exists():
            path.write_bytes(
                key.public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )

    def _key_files(self) -> list[Path]:
        return [p for p in self.directory.iterdir() if p.name.endswith(_PRIVATE)]

    # ------------------------------------------------------------- use
    @property
    def active_kid(self) -> str:
        """The kid of the key that signs."""
        self._refresh()
        assert self._active is not None
        return self._active

    def token_keys(self) -> dict[str, ec.EllipticCurvePublicKey]:
        """Public keys that verify access tokens (those whose private key is kept)."""
        self._refresh()
        return {kid: self._public[kid] for kid in self._private}

    def all_keys(self) -> dict[str, ec.EllipticCurvePublicKey]:
        """Every public key, retired ones included (they still verify audit seals)."""
        self._refresh()
        return dict(self._public)

    def public_key(self, kid: str, *, tokens_only: bool = False):
        """The public key ``kid`` (None if unknown; with ``tokens_only``, also None for
        a retired key). A key rotated or retired by another process is seen within a
        few seconds."""
        return (self.token_keys() if tokens_only else self.all_keys()).get(kid)

    def jwks(self) -> dict:
        """The JWK Set of the token-verifying keys (served at ``/auth/jwks``)."""
        return {
            "keys": [
                {**public_jwk(key), "kid": kid, "use": "sig", "alg": ALGORITHM}
                for kid, key in sorted(self.token_keys().items())
            ]
        }

    def sign_jwt(self, claims: dict) -> str:
        """A compact JWS of ``claims`` signed by the active key (``kid`` in the header)."""
        return jwt.encode(
            claims, self._private[self.active_kid], ALGORITHM, headers={"kid": self.active_kid}
        )

    def sign(self, data: bytes) -> tuple[str, str]:
        """``(kid, signature)``: an ECDSA P-256/SHA-256 signature of ``data`` by the
        active key, DER-encoded and base64url."""
        kid = self.active_kid
        return kid, _b64(self._private[kid].sign(data, ec.ECDSA(hashes.SHA256())))

    def verify(self, kid: str, data: bytes, signature: str) -> bool:
        """True if ``signature`` (from :meth:`sign`) is valid for ``data`` under ``kid``."""
        key = self.public_key(kid)
        if key is None:
            return False
        try:
            raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
            key.verify(raw, data, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True
