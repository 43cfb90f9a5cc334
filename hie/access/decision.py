"""The one access decision point: every interaction asks here before it touches
patient data, and every result passes through here before it is returned. Later
policies (consent) are added here, never beside it.

The inputs of a decision are the caller (:class:`Principal`: client, member
organisation, roles, scopes, purpose of use), the action (SMART ``c r u d s``), the
resource type and, for results and changes, the resources themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from hie.access.principal import ADMIN, AUDITOR, Principal
from hie.access.purpose import BREAK_GLASS
from hie.fhir.errors import error
from hie.store import Version

_VERBS = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}
#: Types only auditors may read; nobody may change them through the API.
AUDIT_TYPES = frozenset({"AuditEvent"})
#: System of the tag naming the member organisation that wrote a resource.
MEMBER_TAG_SYSTEM = "http://hie.example/fhir/CodeSystem/member-organization"


def permits(principal: Principal, action: str, type_: str) -> bool:
    """True if ``principal`` may perform ``action`` (c/r/u/d/s) on resources of
    ``type_``: its scopes grant it, and audit records are read by auditors only."""
    if type_ in AUDIT_TYPES and not principal.has(AUDITOR):
        return False
    return principal.allows(action, type_)


def require(principal: Principal, action: str, type_: str) -> None:
    """Raise 403 unless ``principal`` may perform ``action`` on ``type_`` (``*``
    meaning every type, as for system-level history)."""
    if type_ == "*":
        allowed = any(action in g.actions and g.type == "*" for g in principal.grants)
    else:
        allowed = permits(principal, action, type_)
    if not allowed:
        target = "all resource types" if type_ == "*" else type_
        if type_ in AUDIT_TYPES and principal.allows(action, type_):
            reason = "audit records are readable by clients with the auditor role only"
        else:
            reason = f"the token's scopes ({principal.scope or 'none'}) do not permit it"
        raise error(403, "forbidden", f"{_VERBS[action].capitalize()} on {target} denied: {reason}")


def require_role(principal: Principal, role: str, what: str) -> None:
    """Raise 403 unless the client holds ``role`` (for ``what``, named in the error)."""
    if not principal.has(role):
        raise error(403, "forbidden", f"{what} needs a client with the {role} role")


def require_change(principal: Principal, current: Version) -> None:
    """Raise 403 unless ``principal`` may update or delete ``current``: members change
    only what their own organisation wrote; administrators may change anything."""
    if principal.has(ADMIN):
        return
    writer = writer_of(current)
    if writer is None or writer != principal.organization:
        raise error(
            403,
            "forbidden",
            f"{current.type}/{current.id} was written by another member; "
            "members may change only what they wrote",
        )


def writer_of(version: Version) -> str | None:
    """The member organisation (``Organization/<id>``) a stored version's tag names."""
    if version.body is None:
        return None
    meta = orjson.loads(version.body).get("meta") or {}
    for tag in meta.get("tag", ()):
        if _is_member_tag(tag) and isinstance(tag.get("code"), str):
            return f"Organization/{tag['code']}"
    return None


def stamp(resource: dict, principal: Principal) -> dict:
    """``resource`` stamped with where it came from: ``meta.source`` (the writing
    client's system) and a tag naming its member organisation; values a client sent
    for either are replaced."""
    meta = dict(resource.get("meta") or {})
    tags = [t for t in meta.get("tag", []) if not _is_member_tag(t)]
    if principal.organization:
        org_id = principal.organization.split("/", 1)[1]
        tags.append({"system": MEMBER_TAG_SYSTEM, "code": org_id})
    if tags:
        meta["tag"] = tags
    else:
        meta.pop("tag", None)
    meta["source"] = principal.source_uri
    return {**resource, "meta": meta}


def _is_member_tag(tag: object) -> bool:
    return isinstance(tag, dict) and tag.get("system") == MEMBER_TAG_SYSTEM


def require_purpose(principal: Principal) -> None:
    """Raise 403 if the caller asserts a break-glass purpose it is not allowed."""
    if principal.purpose in BREAK_GLASS and not principal.break_glass:
        raise error(
            403,
            "forbidden",
            f"Purpose of use {principal.purpose} (break-glass) is not permitted for "
            f"client {principal.client_id}",
        )


def disclose(principal: Principal, action: str, versions: Sequence[Version]) -> list[Version]:
    """The versions among results that ``principal`` may see (the others are left
    out, as for an ``_include`` of a type its scopes do not cover)."""
    allowed: dict[str, bool] = {}
    out = []
    for v in versions:
        ok = allowed.get(v.type)
        if ok is None:
            ok = allowed[v.type] = permits(principal, action, v.type)
        if ok:
            out.append(v)
    return out
