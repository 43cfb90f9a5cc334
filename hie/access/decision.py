"""The one access decision point: every interaction asks :func:`require` before it
touches patient data. Later policies (consent, break-glass, member organisations)
are added here, never beside it."""

from __future__ import annotations

from hie.access.principal import Principal
from hie.fhir.errors import error

_VERBS = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}


def require(principal: Principal, action: str, type_: str) -> None:
    """Raise 403 unless ``principal`` may perform ``action`` (c/r/u/d/s) on ``type_``
    (``*`` meaning every type, as for system-level history)."""
    if type_ == "*":
        allowed = any(action in g.actions and g.type == "*" for g in principal.grants)
    else:
        allowed = principal.allows(action, type_)
    if not allowed:
        target = "all resource types" if type_ == "*" else type_
        raise error(
            403,
            "forbidden",
            f"The token's scopes ({principal.scope or 'none'}) do not permit "
            f"{_VERBS[action]} on {target}",
        )
