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
