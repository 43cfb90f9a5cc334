"""Persistence behind one port: :class:`Store`, with SQLite and MongoDB adapters."""

from hie.store.port import (
    INTERNAL_TYPES,
    JOURNAL_TYPES,
    REGISTER_TYPES,
    SEARCHED_INTERNAL_TYPES,
    ConditionConflict,
    Event,
    Page,
    Store,
    StoreError,
    TransactionsUnavailable,
    Version,
    VersionConflict,
    Write,
)

__all__ = [
    "INTERNAL_TYPES",
    "JOURNAL_TYPES",
    "REGISTER_TYPES",
    "SEARCHED_INTERNAL_TYPES",
    "ConditionConflict",
    "Event",
    "Page",
    "Store",
    "StoreError",
    "TransactionsUnavailable",
    "Version",
    "VersionConflict",
    "Write",
]
