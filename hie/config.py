"""Settings, read once from ``HIE_*`` environment variables (documented in the README)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {value!r}")


@dataclass(frozen=True)
class Settings:
    """Server configuration; :meth:`from_env` is the only place env vars are read."""

    data_dir: Path = Path("hie-data")
    mongodb_uri: str | None = None
    mongodb_database: str = "hie"
    base_url: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    auth: bool = True
    token_ttl_seconds: int = 3600
    access_token_ttl: int = 300
    keys_dir: Path | None = None
    oidc_issuer: str | None = None
    oidc_jwks_url: str | None = None
    oidc_audience: str | None = None
    sqlite_synchronous: str = "FULL"
    default_count: int = 50
    max_count: int = 1000
    search_max_results: int = 10_000
    search_snapshot_ttl: int = 3600
    audit: bool = True
    audit_seal_records: int = 1000
    audit_seal_seconds: float = 10.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> Settings:
        """Build settings from ``HIE_*`` variables; keyword overrides win (CLI flags)."""
        env = os.environ if env is None else env
        values: dict = {}
        if "HIE_DATA_DIR" in env:
            values["data_dir"] = Path(env["HIE_DATA_DIR"])
        if env.get("HIE_MONGODB_URI"):
            values["mongodb_uri"] = env["HIE_MONGODB_URI"]
        if "HIE_MONGODB_DATABASE" in env:
            values["mongodb_database"] = env["HIE_MONGODB_DATABASE"]
        if env.get("HIE_BASE_URL"):
            values["base_url"] = env["HIE_BASE_URL"].rstrip("/")
        if "HIE_MAX_BODY_BYTES" in env:
            values["max_body_bytes"] = int(env["HIE_MAX_BODY_BYTES"])
        if "HIE_AUTH" in env:
            values["auth"] = _bool(env["HIE_AUTH"])
        if "HIE_TOKEN_TTL_SECONDS" in env:
            values["token_ttl_seconds"] = int(env["HIE_TOKEN_TTL_SECONDS"])
        if "HIE_ACCESS_TOKEN_TTL" in env:
            values["access_token_ttl"] = int(env["HIE_ACCESS_TOKEN_TTL"])
        if env.get("HIE_KEYS_DIR"):
            values["keys_dir"] = Path(env["HIE_KEYS_DIR"])
        for name in ("oidc_issuer", "oidc_jwks_url", "oidc_audience"):
            if env.get(f"HIE_{name.upper()}"):
                values[name] = env[f"HIE_{name.upper()}"]
        if "HIE_SQLITE_SYNCHRONOUS" in env:
            values["sqlite_synchronous"] = env["HIE_SQLITE_SYNCHRONOUS"].upper()
        if "HIE_DEFAULT_COUNT" in env:
            values["default_count"] = int(env["HIE_DEFAULT_COUNT"])
        if "HIE_MAX_COUNT" in env:
            values["max_count"] = int(env["HIE_MAX_COUNT"])
        if "HIE_SEARCH_MAX_RESULTS" in env:
            values["search_max_results"] = int(env["HIE_SEARCH_MAX_RESULTS"])
        if "HIE_SEARCH_SNAPSHOT_TTL" in env:
            values["search_snapshot_ttl"] = int(env["HIE_SEARCH_SNAPSHOT_TTL"])
        if "HIE_AUDIT" in env:
            values["audit"] = _bool(env["HIE_AUDIT"])
        if "HIE_AUDIT_SEAL_RECORDS" in env:
            values["audit_seal_records"] = int(env["HIE_AUDIT_SEAL_RECORDS"])
        if "HIE_AUDIT_SEAL_SECONDS" in env:
            values["audit_seal_seconds"] = float(env["HIE_AUDIT_SEAL_SECONDS"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def keys_path(self) -> Path:
        """The directory of the server's signing keys (see :mod:`hie.access.keys`)."""
        return self.keys_dir or self.data_dir / "keys"
