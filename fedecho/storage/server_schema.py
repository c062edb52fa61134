"""The run store's tables (SQLAlchemy ORM models), as of the newest schema revision.

A change here needs a revision in fedecho/storage/migrations/server/ that makes the same change to existing
stores; tests/test_store_migrations.py fails while the two differ.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Double, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fedecho.storage.columns import JSONText, UInt64, append_only


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    mode: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    config_toml: Mapped[str] = mapped_column(Text)
    flower_run_id: Mapped[int | None] = mapped_column(UInt64, nullable=True)
    created: Mapped[float] = mapped_column(Double)
    updated: Mapped[float] = mapped_column(Double)


class Phase(Base):
    __tablename__ = "phases"
    __table_args__ = (UniqueConstraint("run_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # insertion order
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    rounds: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32))


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "phase", "round"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # completion order
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    phase: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    started: Mapped[float] = mapped_column(Double)
    finished: Mapped[float] = mapped_column(Double)
    sites_sampled: Mapped[int] = mapped_column(Integer)
    sites_replied: Mapped[int] = mapped_column(Integer)
    train: Mapped[dict[str, Any]] = mapped_column(JSONText)
    evaluate: Mapped[dict[str, Any]] = mapped_column(JSONText)
    server: Mapped[dict[str, Any]] = mapped_column(JSONText)


class SiteResult(Base):
    __tablename__ = "site_results"
    __table_args__ = (UniqueConstraint("run_id", "phase", "round", "site", "kind"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    phase: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    site: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONText)
    num_examples: Mapped[int] = mapped_column(Integer)
    bytes_down: Mapped[int] = mapped_column(Integer)
    bytes_up: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[float] = mapped_column(Double)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "phase", "round"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    phase: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    created: Mapped[float] = mapped_column(Double)


class Site(Base):
    __tablename__ = "sites"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    public_key_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    node_id: Mapped[int | None] = mapped_column(UInt64, nullable=True)
    first_seen: Mapped[float] = mapped_column(Double)
    last_seen: Mapped[float] = mapped_column(Double)


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), nullable=True, index=True)
    site: Mapped[str | None] = mapped_column(String(200), nullable=True)
    kind: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    created: Mapped[float] = mapped_column(Double)


class Audit(Base):
    """Every reply the server received (or waited for in vain); append-only (no update or delete)."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(Integer, index=True)  # no foreign key: the log outlives what it logs
    phase: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    site: Mapped[str] = mapped_column(String(200))
    node_id: Mapped[int | None] = mapped_column(UInt64, nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    bytes_down: Mapped[int] = mapped_column(BigInteger)
    bytes_up: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    created: Mapped[float] = mapped_column(Double)


class Access(Base):
    """Who tried what at the coordinator outside the rounds: requests the public front refused, app bundles the
    ServerApp runner refused, site keys registered or removed; append-only."""

    __tablename__ = "access_audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    request: Mapped[str] = mapped_column(Text)
    decision: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[float] = mapped_column(Double)


append_only(Audit.__table__)
append_only(Access.__table__)


__all__ = ["Access", "Audit", "Base", "Checkpoint", "Event", "Phase", "Round", "Run", "Site", "SiteResult"]
