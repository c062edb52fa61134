"""Durable storage: crash-safe files and the SQLAlchemy stores.

- files.py: crash-safe file writes (temporary file, fsync, rename).
- engine.py: engines for SQLite and PostgreSQL URLs (SQLite: WAL, BEGIN IMMEDIATE for writes) and `Database`,
  the open / transactions / migrate / close base of both stores.
- columns.py: column types (JSON text that keeps NaN, unsigned 64-bit ids) and append-only triggers.
- server_schema.py, rows.py, store.py: the run store's tables, the rows it hands out, and `Store`.
- site_schema.py, site_store.py: a site database's manifest table, `SiteStore`, and `SiteTables`, the base of
  the audit log (client/audit.py) and the privacy ledger (fedecho/privacy/ledger.py) that keep tables in it.
- migrations/: the schema revisions of both (Alembic), applied when a store opens.

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
