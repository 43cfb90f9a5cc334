"""Who is calling: the authenticated client and what its token grants."""

from __future__ import annotations

from dataclasses import dataclass

from hie.access.scopes import ACTIONS, Grant


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of a request, as established by its bearer token."""

    client_id: str
    grants: tuple[Grant, ...]
    scope: str = ""

    def allows(self, action: str, type_: str) -> bool:
        """True if some grant permits ``action`` (one of ``cruds``) on ``type_``."""
        return any(action in g.actions and (g.type == "*" or g.type == type_) for g in self.grants)


#: The caller when authentication is turned off for local development.
LOCAL_DEVELOPER = Principal(
    "local-developer", (Grant("system", "*", frozenset(ACTIONS)),), "system/*.cruds"
)
