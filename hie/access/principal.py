"""Who is calling: the authenticated client, the member it belongs to, its roles, what
its token grants, and why it is asking (purpose of use)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from hie.access.scopes import ACTIONS, Grant

if TYPE_CHECKING:
    from hie.access.consents import ConsentView

#: Roles a registered client can hold.
MEMBER = "member"
REGIONAL_PLATFORM = "regional-platform"
AUDITOR = "auditor"
ADMIN = "admin"
#: A data steward: links, unlinks, merges and unmerges patient records in the master
#: patient index and resolves its review queue.
STEWARD = "steward"
ROLES = (MEMBER, REGIONAL_PLATFORM, AUDITOR, ADMIN, STEWARD)

#: Purpose of use (HL7 v3 PurposeOfUse) when neither token nor request names one.
TREATMENT = "TREAT"


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of a request, as established by its bearer token.

    ``organization`` is the member institution (``Organization/<id>``) the client
    belongs to, ``None`` for the server's own administrative tokens. ``user`` and
    ``user_role`` name the end user the client acts for, when its token says.
    ``break_glass`` says whether the client may assert an emergency purpose."""

    #: Prefix of the default ``meta.source`` of what a client writes.
    SOURCE_PREFIX = "urn:hie:client:"

    client_id: str
    grants: tuple[Grant, ...]
    scope: str = ""
    organization: str | None = None
    roles: frozenset[str] = frozenset()
    purpose: str = TREATMENT
    break_glass: bool = False
    user: str | None = None
    user_role: str | None = None
    token_id: str | None = None
    #: URI naming the client's system (its registration's ``source``), for meta.source.
    source: str | None = None
    #: The patients' consent decisions for this request (None: not subject to consent,
    #: e.g. an administrator, or consent is off). Set per request, never cached.
    consent: ConsentView | None = None

    def allows(self, action: str, type_: str) -> bool:
        """True if some grant permits ``action`` (one of ``cruds``) on ``type_``."""
        return any(action in g.actions and (g.type == "*" or g.type == type_) for g in self.grants)

    def has(self, role: str) -> bool:
        """True if the client holds ``role``."""
        return role in self.roles

    @property
    def source_uri(self) -> str:
        """``meta.source`` of what this caller writes: its registered source URI, or
        ``urn:hie:client:<client id>``."""
        return self.source or self.SOURCE_PREFIX + self.client_id

    def for_purpose(self, purpose: str) -> Principal:
        """The same caller asking for another purpose of use."""
        return replace(self, purpose=purpose, consent=None)

    def with_consent(self, view: ConsentView | None) -> Principal:
        """The same caller with its request's consent decisions."""
        return replace(self, consent=view)


#: The caller when authentication is turned off for local development: every scope,
#: every role, no member organisation.
LOCAL_DEVELOPER = Principal(
    "local-developer",
    (Grant("system", "*", frozenset(ACTIONS)),),
    "system/*.cruds",
    roles=frozenset(ROLES),
    break_glass=True,
)
