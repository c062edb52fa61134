"""The site database's manifest table (SQLAlchemy ORM models), and the base of every site table.

Other site modules define their tables on `SiteBase` (client/audit.py: site_audit, bundle_approvals;
fedecho/privacy/ledger.py: privacy_ledger). A change to any of them needs a revision in
fedecho/storage/migrations/site/ that makes the same change to existing databases; tests/test_store_migrations.py
fails while the two differ.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Double, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fedecho.storage.columns import JSONText


class SiteBase(DeclarativeBase):
    """Every table of the site database; subclass it to add one (and add a revision that creates it)."""


class FileEntry(SiteBase):
    """One ingested file (or pseudo-video): registered (ok) or quarantined with a reason."""

    __tablename__ = "files"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    record_key: Mapped[str | None] = mapped_column(String(32), unique=True, nullable=True)  # ok rows only
    sha256: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)  # of the original bytes
    path_hash: Mapped[str] = mapped_column(String(64), index=True)  # salted hash of the path in SOURCE
    source_kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(32), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    patient: Mapped[str] = mapped_column(String(64), default="", index=True)
    study: Mapped[str] = mapped_column(String(64), default="")
    series: Mapped[str] = mapped_column(String(64), default="")
    instance: Mapped[str] = mapped_column(String(64), default="")
    frames: Mapped[int | None] = mapped_column(Integer, nullable=True)  # as stored (decoded)
    fps: Mapped[float | None] = mapped_column(Double, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)  # as stored (sector crop)
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    channels: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax: Mapped[str] = mapped_column(String(64), default="")
    manufacturer: Mapped[str] = mapped_column(String(64), default="")
    model: Mapped[str] = mapped_column(String(64), default="")
    sector: Mapped[str] = mapped_column(String(96), default="")  # region | image (why) | as_published
    split: Mapped[str] = mapped_column(String(8), default="")
    targets: Mapped[dict[str, Any]] = mapped_column(JSONText, default=dict)
    ingested: Mapped[float] = mapped_column(Double)


__all__ = ["FileEntry", "SiteBase"]
