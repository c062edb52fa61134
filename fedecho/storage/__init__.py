"""Durable storage: crash-safe files and the SQLAlchemy run store (runs, rounds, sites, checkpoints, events).

The store's names load on first use, so code that only writes files (data workers, the ClientApp's data
path) does not pay for importing SQLAlchemy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedecho.storage.files import atomic_path, atomic_write_bytes, atomic_write_csv, file_sha256

if TYPE_CHECKING:
    from fedecho.storage.store import (
        DEFAULT_STATE,
        AuditRow,
        CheckpointRow,
        EventRow,
        PhaseRow,
        RoundRow,
        RunRow,
        SiteResultRow,
        SiteRow,
        Store,
        StoreMissing,
        state_db_path,
        store_url,
    )

# Listed twice on purpose: __all__ must be a literal for linters and type checkers to see the re-exports.
_STORE_NAMES = {
    "DEFAULT_STATE",
    "AuditRow",
    "CheckpointRow",
    "EventRow",
    "PhaseRow",
    "RoundRow",
    "RunRow",
    "SiteResultRow",
    "SiteRow",
    "Store",
    "StoreMissing",
    "state_db_path",
    "store_url",
}


def __getattr__(name: str) -> Any:
    if name in _STORE_NAMES:
        return getattr(importlib.import_module("fedecho.storage.store"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_STATE",
    "AuditRow",
    "CheckpointRow",
    "EventRow",
    "PhaseRow",
    "RoundRow",
    "RunRow",
    "SiteResultRow",
    "SiteRow",
    "Store",
    "StoreMissing",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_csv",
    "file_sha256",
    "state_db_path",
    "store_url",
]
