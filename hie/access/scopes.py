"""SMART scopes (App Launch v2, with v1 ``read``/``write`` accepted) and the
interactions they permit."""

from __future__ import annotations

import re
from dataclasses import dataclass

#: SMART v2 permission letters: create, read, update, delete, search.
ACTIONS = "cruds"
_SCOPE_RE = re.compile(r"(patient|user|system)/(\*|[A-Z][A-Za-z]+)\.(\*|read|write|c?r?u?d?s?)")
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}


@dataclass(frozen=True, slots=True)
class Grant:
    """One parsed scope: a resource type (or ``*``) and the actions it allows."""

    context: str
    type: str
    actions: frozenset[str]


def parse_scope(scope: str) -> Grant | None:
    """Parse one SMART clinical scope; None for other scopes (``openid``, ...)."""
    m = _SCOPE_RE.fullmatch(scope.split("?", 1)[0])
    if not m or not m[3]:
        return None
    context, type_, perms = m.groups()
    return Grant(context, type_, frozenset(_V1.get(perms, perms)))


def parse_scopes(scopes: str) -> tuple[Grant, ...]:
    """Parse a space-separated scope string, dropping non-clinical scopes."""
    return tuple(g for g in (parse_scope(s) for s in scopes.split()) if g is not None)


#: Contexts a registered client's scopes may name; ``patient/`` needs a launch
#: context that SMART Backend Services does not have.
CONTEXTS = ("system", "user")


def check_scopes(scope: str) -> str:
    """A registrable scope string (each scope a SMART ``system/`` or ``user/`` clinical
    scope without fine-grained ``?`` parameters), de-duplicated; ValueError otherwise."""
    out: list[str] = []
    for item in scope.split():
        grant = parse_scope(item)
        if grant is None or "?" in item:
            raise ValueError(f"{item!r} is not a SMART clinical scope (like system/*.rs)")
        if grant.context not in CONTEXTS:
            raise ValueError(f"{item!r}: only system/ and user/ scopes can be registered")
        if item not in out:
            out.append(item)
    if not out:
        raise ValueError("at least one scope is required")
    return " ".join(out)


def covers(allowed: Grant, wanted: Grant) -> bool:
    """True if ``allowed`` permits everything ``wanted`` asks for (same context, type
    equal or ``*``, a superset of the actions)."""
    return (
        allowed.context == wanted.context
        and allowed.type in ("*", wanted.type)
        and wanted.actions <= allowed.actions
    )


def negotiate(requested: str, allowed: str) -> str:
    """The requested scopes (as written, in order, without repeats) that some allowed
    scope covers; v1 and v2 forms compare by meaning (``system/*.read`` is
    ``system/*.rs``). Scopes with ``?`` parameters are never granted."""
    grants = parse_scopes(allowed)
    granted: list[str] = []
    for item in requested.split():
        wanted = parse_scope(item)
        if (
            wanted is not None
            and "?" not in item
            and item not in granted
            and any(covers(g, wanted) for g in grants)
        ):
            granted.append(item)
    return " ".join(granted)
