"""The one access decision point: every interaction asks here before it touches
patient data, and every result passes through here before it is returned.

The inputs of a decision are the caller (:class:`Principal`: client, member
organisation, roles, scopes, purpose of use, and its request's patients' consent
decisions, :class:`~hie.access.consents.ConsentView`), the action (SMART
``c r u d s``), the resource type and, for results and changes, the resources
themselves. Scopes decide per type; consent per resource: :func:`require_visible`
for a read, :func:`disclose` for any list of results, and for searches
:func:`consent_filter`, store query terms that leave withheld resources out in the
store (so that totals and pages count only what the caller may see), with
:func:`released` for what such a search returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import orjson

from hie.access.principal import ADMIN, AUDITOR, Principal
from hie.access.purpose import BREAK_GLASS, BREAK_GLASS_LABEL
from hie.fhir.errors import error
from hie.store import Version
from hie.store.query import AnyOf, Chain, Has, Not, Query, Term

if TYPE_CHECKING:
    from hie.access.consents import ConsentView

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
    return None if version.body is None else writer_in(orjson.loads(version.body))


def writer_in(resource: dict) -> str | None:
    """The member organisation (``Organization/<id>``) a resource's tag names."""
    for tag in (resource.get("meta") or {}).get("tag", ()):
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
    """The versions among results that ``principal`` may see: of types its scopes
    cover (others are left out, as for an ``_include``) and that the patients'
    consent releases to it (labelled when only break-glass does)."""
    allowed: dict[str, bool] = {}
    view = principal.consent
    out = []
    for v in versions:
        ok = allowed.get(v.type)
        if ok is None:
            ok = allowed[v.type] = permits(principal, action, v.type)
        if ok and view is not None:
            v = view.admit(v)
        if ok and v is not None:
            out.append(v)
    return out


def require_visible(principal: Principal, version: Version) -> Version:
    """``version`` if the patients' consent lets ``principal`` see it (labelled when
    only break-glass does); 403 otherwise."""
    view = principal.consent
    if view is None:
        return version
    shown = view.admit(version)
    if shown is None:
        raise error(
            403,
            "forbidden",
            f"{version.type}/{version.id} is withheld under the patient's consent "
            "(see Patient/[id]/$consent-decision)",
        )
    return shown


async def consent_filter(principal: Principal, type_: str, query: Query) -> Query:
    """``query`` over ``type_`` narrowed to what the patients' consent lets
    ``principal`` see: the resources it finds, and those its chains and ``_has``
    conditions look through (a withheld resource must not make a search match)."""
    view = principal.consent
    return query if view is None else await _narrowed(view, type_, query)


async def _narrowed(view: ConsentView, type_: str, query: Query) -> Query:
    out = tuple([await _guarded(view, t) for t in query])
    return (*out, *await view.terms(type_, query))


async def _guarded(view: ConsentView, term: Term) -> Term:
    if isinstance(term, Chain):
        return replace(term, query=await _narrowed(view, term.target, term.query))
    if isinstance(term, Has):
        return replace(term, query=await _narrowed(view, term.type, term.query))
    if isinstance(term, AnyOf):
        return AnyOf(tuple([await _guarded(view, t) for t in term.terms]))
    if isinstance(term, Not):
        return Not(await _guarded(view, term.term))
    return term


def released(principal: Principal, versions: list[Version], state: dict | None = None) -> list:
    """What a search filtered by :func:`consent_filter` returns to ``principal``:
    ``versions`` as they are, labelled under break-glass, and checked one by one when
    they come from a paging snapshot made under other consent decisions (``state``:
    the snapshot's, see :func:`consent_state`)."""
    view = principal.consent
    if view is None:
        return versions
    if view.break_glass or (state is not None and state.get("consent") != consent_state(principal)):
        return [v for v in map(view.admit, versions) if v is not None]
    return versions


def consent_state(principal: Principal) -> list | None:
    """What a paging snapshot remembers of the consent decisions it was made under."""
    view = principal.consent
    if view is None:
        return None
    acc = view.accessor
    return [acc.organization, acc.purpose, acc.user, acc.user_role, view.ledger.seq]


def overridden(principal: Principal) -> list[dict]:
    """``meta.security`` for a Bundle of this request: the break-glass label when
    break-glass released something the patients' consent withholds."""
    view = principal.consent
    return [BREAK_GLASS_LABEL] if view is not None and view.overridden else []
