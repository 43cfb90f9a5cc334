"""Index-value extraction: the search rows stored beside each resource version.

Computed once at write time so that a search is an index lookup in either store.
"""

from __future__ import annotations

from hie.store.query import IndexRow


def index_rows(resource: dict, last_updated: str) -> list[IndexRow]:
    """The index rows of ``resource`` (whose version was written at ``last_updated``)."""
    rows = [IndexRow("_lastUpdated", low=last_updated, high=last_updated)]
    identifiers = resource.get("identifier")
    if isinstance(identifiers, dict):
        identifiers = [identifiers]
    if isinstance(identifiers, list):
        for ident in identifiers:
            if isinstance(ident, dict) and (ident.get("system") or ident.get("value")):
                rows.append(
                    IndexRow("identifier", system=ident.get("system"), text=ident.get("value"))
                )
    return rows
