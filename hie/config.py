"""Settings, read once from ``HIE_*`` environment variables (documented in the README)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

#: Checks a national identifier system can get (``hie.mpi.normalize``: OPAQUE, GB11643).
ID_CHECKS = ("opaque", "gb11643")
#: Defaults of the MPI thresholds (``hie.mpi.model``'s; kept as literals so that reading
#: settings imports nothing else).
MATCH_PROBABILITY = 0.999
POSSIBLE_PROBABILITY = 0.05


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
    mpi: bool = True
    mpi_link_threshold: float = MATCH_PROBABILITY
    mpi_review_threshold: float = POSSIBLE_PROBABILITY
    #: More identifier systems matched as a national person identifier, beside the
    #: resident ID number: ``{system: "opaque" | "gb11643"}`` (``HIE_MPI_ID_SYSTEMS``,
    #: ``system=kind`` comma-separated).
    mpi_id_systems: dict[str, str] = field(default_factory=dict)
    #: Enforce patients' Consents (off only for benchmarks and local experiments).
    consent: bool = True
    #: The alliance default where no Consent applies: ``opt-out`` (share for
    #: treatment unless the patient refused) or ``opt-in`` (share only what a Consent
    #: permits).
    consent_default: str = "opt-out"

    def __post_init__(self) -> None:
        if self.consent_default not in ("opt-out", "opt-in"):
            raise ValueError(
                f"HIE_CONSENT_DEFAULT must be opt-out or opt-in, not {self.consent_default!r}"
            )
        for system, kind in self.mpi_id_systems.items():
            if kind not in ID_CHECKS or not system:
                raise ValueError(
                    f"HIE_MPI_ID_SYSTEMS: {system}={kind} is not system=opaque|gb11643"
                )
        if not 0 < self.mpi_review_threshold <= self.mpi_link_threshold < 1:
            raise ValueError(
                "HIE_MPI_REVIEW_THRESHOLD and HIE_MPI_LINK_THRESHOLD must be probabilities "
                f"with 0 < review <= link < 1, got review {self.mpi_review_threshold} and "
                f"link {self.mpi_link_threshold}"
            )

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
        if "HIE_CONSENT" in env:
            values["consent"] = _bool(env["HIE_CONSENT"])
        if "HIE_CONSENT_DEFAULT" in env:
            values["consent_default"] = env["HIE_CONSENT_DEFAULT"].strip().lower()
        if "HIE_MPI" in env:
            values["mpi"] = _bool(env["HIE_MPI"])
        if "HIE_MPI_LINK_THRESHOLD" in env:
            values["mpi_link_threshold"] = float(env["HIE_MPI_LINK_THRESHOLD"])
        if "HIE_MPI_ID_SYSTEMS" in env:
            pairs = [p.rpartition("=") for p in env["HIE_MPI_ID_SYSTEMS"].split(",") if p.strip()]
            values["mpi_id_systems"] = {k.strip(): v.strip() for k, _, v in pairs}
        if "HIE_MPI_REVIEW_THRESHOLD" in env:
            values["mpi_review_threshold"] = float(env["HIE_MPI_REVIEW_THRESHOLD"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def keys_path(self) -> Path:
        """The directory of the server's signing keys (see :mod:`hie.access.keys`)."""
        return self.keys_dir or self.data_dir / "keys"
