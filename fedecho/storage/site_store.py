"""The site's own database (DIR/site.db): the manifest of registered files, and room for more.

It holds no identifying attribute: per file the content hash of the original, pseudonyms (salted
hashes), geometry, timing, encoding, status and a reason code; never a name, date, UID or path
(archive paths such as MIMIC-IV-ECHO's p<subject>/s<study> embed identifiers, so a path is kept
only as a salted hash). It never leaves the site.

Its tables are `SiteBase` models (fedecho.storage.site_schema, client/audit.py, fedecho/privacy/ledger.py);
`SiteStore` applies the schema revisions the file lacks each time it opens (fedecho.storage.migrations), and
hands out one-transaction sessions (`write()`, `read()`). Same engine settings as the run store: SQLite WAL,
foreign keys, BEGIN IMMEDIATE for writes. `SiteTables` is the base of the objects that keep their own tables
in it (the audit log, the privacy ledger): it opens the one SiteStore of a state folder and closes it.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fedecho.storage.engine import Closing, Database
from fedecho.storage.migrations import SITE, Migrations
from fedecho.storage.site_schema import FileEntry, SiteBase

DB_NAME = "site.db"
FILE_STATUSES = ("ok", "quarantined")


class SiteStoreMissing(FileNotFoundError):
    """SiteStore(dir, create=False) where no site database exists (read-only commands never create one)."""


@dataclass(frozen=True)
class FileRow:
    """A manifest row as plain values."""

    id: int
    record_key: str | None
    sha256: str | None
    path_hash: str
    source_kind: str
    status: str
    reason: str
    detail: str
    patient: str
    study: str
    series: str
    instance: str
    frames: int | None
    fps: float | None
    height: int | None
    width: int | None
    channels: int | None
    transfer_syntax: str
    manufacturer: str
    model: str
    sector: str
    split: str
    targets: dict[str, Any]
    ingested: float


_FILE_FIELDS = tuple(f.name for f in fields(FileRow))


def _row(e: FileEntry) -> FileRow:
    return FileRow(**{name: getattr(e, name) for name in _FILE_FIELDS})


def site_db_path(site_dir: str | Path) -> Path:
    return Path(site_dir) / DB_NAME


class SiteStore(Database):
    """The site database in DIR (DIR/site.db); each public write is one transaction."""

    migrations: ClassVar[Migrations] = SITE

    def __init__(self, site_dir: str | Path, *, create: bool = True) -> None:
        self.site_dir = Path(site_dir)
        db = site_db_path(self.site_dir)
        if not db.exists():
            if not create:
                raise SiteStoreMissing(f"{self.site_dir}: no registered site data (no {DB_NAME}); run fedecho data add")
            self.site_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))  # owner only; SQLite's -wal/-shm follow it
        super().__init__(f"sqlite:///{db}")
        self._batch: Session | None = None
        try:
            self.ensure_tables()
        except BaseException:
            self.close()
            raise

    def ensure_tables(self) -> None:
        """Apply the schema revisions the file lacks (creating every table of a new file)."""
        self.migrate()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group the add_file calls inside into one transaction: one durable commit for many rows (an
        archive's registration would otherwise wait on a disk sync per file); on an exception none is kept."""
        if self._batch is not None:  # nested: the outer batch commits
            yield
            return
        with self.write() as s:
            self._batch = s
            try:
                yield
            finally:
                self._batch = None

    # ------------------------------------------------------------ manifest

    def add_file(self, **values: Any) -> FileRow:
        """Insert one manifest row (status ok needs a record_key); inside batch() it commits with the batch."""
        if values.get("status") not in FILE_STATUSES:
            raise ValueError(f"file status must be one of {FILE_STATUSES}, not {values.get('status')!r}")
        values.setdefault("ingested", time.time())
        if self._batch is not None:
            entry = FileEntry(**values)
            self._batch.add(entry)
            self._batch.flush()
            return _row(entry)
        with self.write() as s:
            entry = FileEntry(**values)
            s.add(entry)
            s.flush()
            return _row(entry)

    def seen(self, path_hash: str, sha256: str | None) -> bool:
        """Was this very file (same path, same bytes) ingested before, with whatever outcome?"""
        with self.read() as s:
            q = select(FileEntry.id).where(FileEntry.path_hash == path_hash)
            q = q.where(FileEntry.sha256.is_(None) if sha256 is None else FileEntry.sha256 == sha256)
            return s.execute(q.limit(1)).first() is not None

    def fingerprints(self) -> dict[str, set[str | None]]:
        """Path hash -> the content hashes ingested from that path (any outcome): what a resumed pass
        skips without decoding, in one query rather than one per file."""
        out: dict[str, set[str | None]] = {}
        with self.read() as s:
            for path_hash, sha in s.execute(select(FileEntry.path_hash, FileEntry.sha256)):
                out.setdefault(path_hash, set()).add(sha)
        return out

    def registered_as(self, sha256: str) -> str | None:
        """The record key under which these bytes are registered, if they are."""
        with self.read() as s:
            q = select(FileEntry.record_key).where(FileEntry.sha256 == sha256, FileEntry.status == "ok")
            return s.execute(q.limit(1)).scalar()

    def files(self, status: str | None = None) -> list[FileRow]:
        with self.read() as s:
            q = select(FileEntry).order_by(FileEntry.id)
            if status is not None:
                q = q.where(FileEntry.status == status)
            return [_row(e) for e in s.scalars(q)]

    def record_keys(self) -> set[str]:
        with self.read() as s:
            return {k for k in s.scalars(select(FileEntry.record_key).where(FileEntry.status == "ok")) if k}

    def summary(self) -> dict[str, Any]:
        """Counts for `fedecho data report`: files by status and reason, frames, patients, splits."""
        with self.read() as s:
            by_status = dict(s.execute(select(FileEntry.status, func.count()).group_by(FileEntry.status)).all())
            reasons = dict(
                s.execute(
                    select(FileEntry.reason, func.count())
                    .where(FileEntry.status == "quarantined")
                    .group_by(FileEntry.reason)
                ).all()
            )
            ok = s.scalars(select(FileEntry).where(FileEntry.status == "ok")).all()
            return {
                "ok": int(by_status.get("ok", 0)),
                "quarantined": int(by_status.get("quarantined", 0)),
                "reasons": {str(k): int(v) for k, v in sorted(reasons.items())},
                "frames": sum(e.frames or 0 for e in ok),
                "patients": len({e.patient for e in ok if e.patient}),
                "splits": dict(sorted(Counter(e.split for e in ok).items())),
                "sources": dict(sorted(Counter(e.source_kind for e in ok).items())),
            }


class SiteTables(Closing):
    """Tables of another module in a site's database (the audit log, the privacy ledger): opens the one
    SiteStore of a state folder as `store` and closes it with itself."""

    def __init__(self, state: str | Path, *, create: bool = True) -> None:
        self.store = SiteStore(state, create=create)  # create=False: SiteStoreMissing where no site.db exists

    def close(self) -> None:
        self.store.close()


__all__ = [
    "DB_NAME",
    "FILE_STATUSES",
    "FileEntry",
    "FileRow",
    "SiteBase",
    "SiteStore",
    "SiteStoreMissing",
    "SiteTables",
    "site_db_path",
]
