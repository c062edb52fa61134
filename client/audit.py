"""The site's own record: every message it received and what it did, and the code bundles it approved.

Both live in the site's database, `<[site].state>/site.db` (SQLite, never sent anywhere). The audit table is
append-only: rows are only ever inserted, and SQLite triggers make any UPDATE or DELETE fail, so a row
written when a message arrived cannot be rewritten later by fedecho (someone with the file and a SQLite
shell can still drop the triggers: the log proves what fedecho did, not what an administrator did).
Each row: the run (Flower's id and fedecho's), round, phase, message type, the decision (allowed, refused,
failed) and why, the code bundle's hash, the data manifest's hash, epsilon spent, and the sha256 of the
update sent back (the same digest the server records for the reply, so the two logs can be joined).
When the site starts (`audit_start`), a row of message type "start" and decision "started" holds the settings
then in force (`fedecho.client.config.settings_in_force`), so an auditor sees what every later row was under.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Double, Integer, String, Text, select
from sqlalchemy.orm import Mapped, mapped_column

from fedecho.storage.columns import UInt64, append_only
from fedecho.storage.site_store import DB_NAME as SITE_DB
from fedecho.storage.site_store import SiteBase, SiteTables

DECISIONS = ("allowed", "refused", "failed", "started")  # "started": the site's settings when it started
START = "start"  # the message type of a start row


class _SiteAudit(SiteBase):
    __tablename__ = "site_audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created: Mapped[float] = mapped_column(Double)
    flower_run_id: Mapped[int | None] = mapped_column(UInt64, nullable=True)
    run_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # fedecho's run id, when the server sent it
    round: Mapped[int | None] = mapped_column(Integer, nullable=True)
    phase: Mapped[str] = mapped_column(String(64), default="")
    message_type: Mapped[str] = mapped_column(String(64))
    decision: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    bundle_sha256: Mapped[str] = mapped_column(String(64), default="")
    manifest_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    epsilon: Mapped[float | None] = mapped_column(Double, nullable=True)
    update_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    update_bytes: Mapped[int] = mapped_column(Integer, default=0)


class _Approval(SiteBase):
    __tablename__ = "bundle_approvals"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    approved: Mapped[float] = mapped_column(Double)
    note: Mapped[str] = mapped_column(Text, default="")


append_only(_SiteAudit.__table__)


@dataclass(frozen=True)
class SiteAuditRow:
    id: int
    created: float
    flower_run_id: int | None
    run_id: int | None
    round: int | None
    phase: str
    message_type: str
    decision: str
    reason: str
    bundle_sha256: str
    manifest_sha256: str | None
    epsilon: float | None
    update_sha256: str | None
    update_bytes: int


class SiteLog(SiteTables):
    """The site's audit log and bundle approvals in <state>/site.db."""

    def __init__(self, state: str | Path, *, create: bool = True) -> None:
        self.path = Path(state) / SITE_DB
        if not create and not self.path.exists():
            raise FileNotFoundError(f"no site database {self.path} (the site has received no message yet)")
        super().__init__(state, create=create)  # the one site database: manifest, ledger, audit

    # ------------------------------------------------------------ audit
    def record(
        self,
        *,
        message_type: str,
        decision: str,
        reason: str = "",
        flower_run_id: int | None = None,
        run_id: int | None = None,
        round: int | None = None,
        phase: str = "",
        bundle_sha256: str = "",
        manifest_sha256: str | None = None,
        epsilon: float | None = None,
        update_sha256: str | None = None,
        update_bytes: int = 0,
    ) -> None:
        """Append one row (one transaction)."""
        if decision not in DECISIONS:
            raise ValueError(f"decision {decision!r} is not one of {', '.join(DECISIONS)}")
        with self.store.write() as s:
            s.add(
                _SiteAudit(
                    created=time.time(), flower_run_id=flower_run_id, run_id=run_id, round=round, phase=phase,
                    message_type=message_type, decision=decision, reason=reason, bundle_sha256=bundle_sha256,
                    manifest_sha256=manifest_sha256, epsilon=epsilon, update_sha256=update_sha256,
                    update_bytes=int(update_bytes),
                )
            )  # fmt: skip

    def record_start(self, settings: list[str], manifest_sha256: str | None = None) -> None:
        """Append the row of a site start: the settings in force (one line each, as `settings_in_force` states
        them) and the data manifest's hash at that moment."""
        self.record(message_type=START, decision="started", reason="\n".join(settings), manifest_sha256=manifest_sha256)

    def rows(self, run_id: int | None = None, limit: int | None = None) -> list[SiteAuditRow]:
        """Rows oldest first (the newest `limit` of them); run_id matches fedecho's or Flower's run id."""
        q = select(_SiteAudit)
        if run_id is not None:
            q = q.where((_SiteAudit.run_id == run_id) | (_SiteAudit.flower_run_id == run_id))
        q = q.order_by(_SiteAudit.id.desc())
        if limit:
            q = q.limit(limit)
        with self.store.read() as s:
            found = [
                SiteAuditRow(**{c: getattr(r, c) for c in SiteAuditRow.__dataclass_fields__}) for r in s.scalars(q)
            ]
        return found[::-1]

    # ------------------------------------------------------------ approvals
    def approve(self, sha256: str, note: str = "") -> None:
        with self.store.write() as s:
            if s.get(_Approval, sha256) is None:
                s.add(_Approval(sha256=sha256, approved=time.time(), note=note))

    def revoke(self, sha256: str) -> bool:
        with self.store.write() as s:
            row = s.get(_Approval, sha256)
            if row is None:
                return False
            s.delete(row)
            return True

    def approved(self, sha256: str) -> bool:
        with self.store.read() as s:
            return s.get(_Approval, sha256) is not None

    def approvals(self) -> list[tuple[str, float, str]]:
        with self.store.read() as s:
            return [(a.sha256, a.approved, a.note) for a in s.scalars(select(_Approval).order_by(_Approval.approved))]


def manifest_sha256(data: Path, labels: str | Path = "") -> str:
    """A fingerprint of the site's data as it stands: sha256 over every file's relative path, size and
    modification time (the listing only: no patient file is opened). Any added, removed or rewritten file
    changes it; the same data gives the same hash on every message."""
    h = hashlib.sha256()
    data = Path(data)
    files = [data] if data.is_file() else sorted(p for p in data.rglob("*") if p.is_file())
    if labels:
        files.append(Path(labels))
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        rel = f.relative_to(data).as_posix() if data.is_dir() and f.is_relative_to(data) else str(f)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def audit_message(
    site: Any,
    msg: Any,
    options: dict[str, Any],
    decision: str,
    reason: str = "",
    *,
    manifest: str | None = None,
    epsilon: float | None = None,
    update: Any = None,
    message_type: str | None = None,
    sent: Any = None,
) -> None:
    """Append the ClientApp's row for one message (site: client.local.Site; update: the ArrayRecord sent, whose
    digest the server's audit records too; sent: the whole reply, whose array records' bytes are counted (a
    SCAFFOLD reply carries a control variate beside the update); message_type: what to record instead of the
    message's own type, e.g. a query with its question)."""
    from fedecho.fl.exchange import arrays_sha256, record_bytes

    with SiteLog(site.state) as site_log:
        site_log.record(
            message_type=message_type or str(msg.metadata.message_type), decision=decision, reason=reason,
            flower_run_id=int(msg.metadata.run_id),
            run_id=int(options["run-id"]) if "run-id" in options else None,
            round=int(options["server-round"]) if "server-round" in options else None,
            phase=str(options.get("phase", "")), bundle_sha256=current_bundle(), manifest_sha256=manifest,
            epsilon=epsilon, update_sha256=arrays_sha256(update) if update is not None else None,
            update_bytes=record_bytes(sent) if sent is not None else update.count_bytes() if update is not None else 0,
        )  # fmt: skip


def audit_start(cfg: Any, settings: list[str]) -> None:
    """Write the site's start row (cfg: client.config.SiteConfig; settings: `settings_in_force(cfg)`) to its
    audit log, with the manifest of its data as it stands."""
    with SiteLog(cfg.state) as site_log:
        site_log.record_start(settings, manifest_sha256(cfg.data, cfg.labels or ""))


BUNDLE_ENV = "FEDECHO_BUNDLE_SHA256"  # set by the site's ClientApp runner: the approved bundle's code hash


def current_bundle() -> str:
    """The code hash of the bundle this ClientApp process runs (empty in simulation)."""
    return os.environ.get(BUNDLE_ENV, "")


__all__ = [
    "BUNDLE_ENV",
    "SITE_DB",
    "START",
    "SiteAuditRow",
    "SiteLog",
    "audit_message",
    "audit_start",
    "current_bundle",
    "manifest_sha256",
]
