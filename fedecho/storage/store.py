"""The persistent run store: runs, phases, rounds, per-site results, checkpoints, sites, events, audit logs.

One SQLAlchemy database: a SQLite file by default, PostgreSQL (or another SQLAlchemy URL) from the server config
or `--store`. Every public write is one transaction, so a crash leaves either the old or the new state; the
engine settings (SQLite WAL, BEGIN IMMEDIATE for writes) are fedecho.storage.engine's, the tables
fedecho.storage.server_schema's, and opening a store applies the schema revisions it lacks
(fedecho.storage.migrations).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import ClassVar

from sqlalchemy import delete, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Delete

from fedecho.storage.engine import Database, sqlite_file
from fedecho.storage.migrations import SERVER, Migrations
from fedecho.storage.rows import (
    AccessRow,
    AuditRow,
    CheckpointRow,
    EventRow,
    PhaseRow,
    RoundRow,
    RunRow,
    SiteResultRow,
    SiteRow,
)
from fedecho.storage.server_schema import Access, Audit, Checkpoint, Event, Phase, Round, Run, Site, SiteResult

DEFAULT_STATE = "fedecho-state"
DB_NAME = "fedecho.db"

SITES_SUFFIX = ".sites"  # a round's `<metric>.sites`: how many sites its federated evaluation mean is over
RUN_STATUSES = ("running", "paused", "stopped", "failed", "finished")  # paused: resumable once sites are back
PHASE_STATUSES = ("pending", "running", "finished")
RESULT_KINDS = ("train", "evaluate", "query")  # query: a statistics query (fedecho.fl.statistics)
RESULT_STATUSES = ("ok", "failed", "rejected", "refused")
AUDIT_STATUSES = ("accepted", "failed", "rejected", "refused")
ACCESS_KINDS = ("control", "runtime", "fleet", "other", "bundle", "registration")
ACCESS_DECISIONS = ("refused", "allowed")


class StoreMissing(FileNotFoundError):
    """Raised by Store(url, create=False) when there is no store at url (read-only commands never create one)."""


def state_db_path(state: str | Path | None = None) -> Path:
    """The SQLite file of a state folder: state, else $FEDECHO_STATE, else ./fedecho-state (not created)."""
    folder = Path(state or os.environ.get("FEDECHO_STATE") or DEFAULT_STATE).expanduser().absolute()
    return folder / DB_NAME


def store_url(state: str | Path | None = None, url: str | None = None) -> str:
    """The store's SQLAlchemy URL: url if given, else the SQLite file in the state folder (created)."""
    if url:
        return url
    db = state_db_path(state)
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def _now() -> float:
    return time.time()


def _delete_checkpoint(run_id: int, phase: str, round: int) -> Delete:
    return delete(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.phase == phase, Checkpoint.round == round)


class Store(Database):
    """Run state of fedecho federations; safe to share between processes (each write is one transaction)."""

    migrations: ClassVar[Migrations] = SERVER

    def __init__(self, url: str, *, create: bool = True) -> None:
        """Open the store at url, creating it or bringing its schema up to date; create=False raises
        StoreMissing where there is no store (and creates none)."""
        file = sqlite_file(url)
        if not create and file and not file.exists():
            shown = make_url(url).render_as_string(hide_password=True)
            raise StoreMissing(f"no fedecho store at {shown} (no file {file})")
        super().__init__(url)
        try:
            if not create and not self.has_table(Run.__tablename__):
                raise StoreMissing(f"no fedecho store at {self.shown_url} (no runs table)")
            self.migrate()  # under the write lock: two processes may open at once
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"Store({self.shown_url!r})"

    def _run(self, s: Session, run_id: int) -> Run:
        run = s.get(Run, run_id)
        if run is None:
            raise KeyError(f"no run {run_id} in {self.shown_url}")
        return run

    # ------------------------------------------------------------ runs

    def create_run(
        self, name: str, config_toml: str, *, mode: str = "deployment", flower_run_id: int | None = None
    ) -> int:
        """Start a run record in status "running"; returns its id (the RUN_ID of `fedecho runs show`)."""
        now = _now()
        with self.write() as s:
            run = Run(
                name=name, mode=mode, status="running", message="", config_toml=config_toml,
                flower_run_id=flower_run_id, created=now, updated=now,
            )  # fmt: skip
            s.add(run)
            s.flush()
            return run.id

    def get_run(self, run_id: int) -> RunRow:
        with self.read() as s:
            return _run_row(self._run(s, run_id))

    def list_runs(self) -> list[RunRow]:
        """All runs, newest first."""
        with self.read() as s:
            return [_run_row(r) for r in s.scalars(select(Run).order_by(Run.created.desc(), Run.id.desc()))]

    def set_run_status(self, run_id: int, status: str, message: str = "") -> None:
        _check(status, RUN_STATUSES, "run status")
        with self.write() as s:
            run = self._run(s, run_id)
            run.status, run.message, run.updated = status, message, _now()

    def set_flower_run_id(self, run_id: int, flower_run_id: int) -> None:
        with self.write() as s:
            run = self._run(s, run_id)
            run.flower_run_id, run.updated = flower_run_id, _now()

    # ------------------------------------------------------------ phases

    def add_phase(self, run_id: int, name: str, rounds: int) -> None:
        """Declare a phase (status "pending"); adding it again only updates its round count (resume)."""
        with self.write() as s:
            self._run(s, run_id)
            phase = s.scalar(select(Phase).where(Phase.run_id == run_id, Phase.name == name))
            if phase is None:
                s.add(Phase(run_id=run_id, name=name, rounds=rounds, status="pending"))
            else:
                phase.rounds = rounds

    def set_phase_status(self, run_id: int, name: str, status: str) -> None:
        _check(status, PHASE_STATUSES, "phase status")
        with self.write() as s:
            self._run(s, run_id)
            phase = s.scalar(select(Phase).where(Phase.run_id == run_id, Phase.name == name))
            if phase is None:
                raise KeyError(f"no phase {name!r} in run {run_id} in {self.shown_url}")
            phase.status = status
            self._run(s, run_id).updated = _now()

    def phases(self, run_id: int) -> list[PhaseRow]:
        """The run's phases in the order they were added."""
        with self.read() as s:
            rows = s.scalars(select(Phase).where(Phase.run_id == run_id).order_by(Phase.id))
            return [PhaseRow(p.run_id, p.name, p.rounds, p.status) for p in rows]

    # ------------------------------------------------------------ rounds

    def add_round(
        self,
        run_id: int,
        phase: str,
        round: int,
        *,
        started: float,
        finished: float,
        sites_sampled: int,
        sites_replied: int,
        train: dict[str, float],
        evaluate: dict[str, float],
        server: dict[str, float],
    ) -> None:
        """Record a completed round; a round added again (a resumed run redid it) replaces the old record."""
        with self.write() as s:
            self._run(s, run_id).updated = _now()
            s.execute(delete(Round).where(Round.run_id == run_id, Round.phase == phase, Round.round == round))
            s.add(
                Round(
                    run_id=run_id, phase=phase, round=round, started=started, finished=finished,
                    sites_sampled=sites_sampled, sites_replied=sites_replied, train=train, evaluate=evaluate,
                    server=server,
                )
            )  # fmt: skip

    def rounds(self, run_id: int, phase: str | None = None) -> list[RoundRow]:
        """Completed rounds in order of completion (a redone round counts when it was redone)."""
        q = select(Round).where(Round.run_id == run_id)
        if phase is not None:
            q = q.where(Round.phase == phase)
        with self.read() as s:
            return [_round_row(r) for r in s.scalars(q.order_by(Round.id))]

    def last_round(self, run_id: int) -> RoundRow | None:
        """The last completed round of any phase: where a resumed run continues from."""
        with self.read() as s:
            r = s.scalar(select(Round).where(Round.run_id == run_id).order_by(Round.id.desc()).limit(1))
            return None if r is None else _round_row(r)

    # ------------------------------------------------------------ per-site results

    def add_site_result(
        self,
        run_id: int,
        phase: str,
        round: int,
        site: str,
        kind: str,
        *,
        status: str,
        metrics: dict[str, float],
        num_examples: int,
        bytes_down: int,
        bytes_up: int,
        reason: str = "",
    ) -> None:
        """Record one site's train or evaluate reply (or its failure); re-adding the same key replaces it."""
        _check(kind, RESULT_KINDS, "result kind")
        _check(status, RESULT_STATUSES, "result status")
        with self.write() as s:
            self._run(s, run_id)
            s.execute(
                delete(SiteResult).where(
                    SiteResult.run_id == run_id, SiteResult.phase == phase, SiteResult.round == round,
                    SiteResult.site == site, SiteResult.kind == kind,
                )
            )  # fmt: skip
            s.add(
                SiteResult(
                    run_id=run_id, phase=phase, round=round, site=site, kind=kind, status=status, metrics=metrics,
                    num_examples=int(num_examples), bytes_down=int(bytes_down), bytes_up=int(bytes_up),
                    reason=reason, created=_now(),
                )
            )  # fmt: skip

    def site_results(self, run_id: int, phase: str | None = None, round: int | None = None) -> list[SiteResultRow]:
        """Per-site results in the order they were recorded."""
        q = select(SiteResult).where(SiteResult.run_id == run_id)
        if phase is not None:
            q = q.where(SiteResult.phase == phase)
        if round is not None:
            q = q.where(SiteResult.round == round)
        with self.read() as s:
            return [
                SiteResultRow(
                    r.run_id, r.phase, r.round, r.site, r.kind, r.status, dict(r.metrics), r.num_examples,
                    r.bytes_down, r.bytes_up, r.reason, r.created,
                )
                for r in s.scalars(q.order_by(SiteResult.id))
            ]  # fmt: skip

    # ------------------------------------------------------------ checkpoints

    def add_checkpoint(self, run_id: int, phase: str, round: int, path: str, sha256: str) -> None:
        """Record a saved global model (re-saving the same phase and round replaces the record)."""
        with self.write() as s:
            self._run(s, run_id).updated = _now()
            s.execute(_delete_checkpoint(run_id, phase, round))
            s.add(Checkpoint(run_id=run_id, phase=phase, round=round, path=str(path), sha256=sha256, created=_now()))

    def remove_checkpoint(self, run_id: int, phase: str, round: int) -> None:
        """Forget a checkpoint's record (retention: its files go next)."""
        with self.write() as s:
            s.execute(_delete_checkpoint(run_id, phase, round))

    def checkpoints(self, run_id: int) -> list[CheckpointRow]:
        """The run's checkpoints, newest first."""
        q = select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.id.desc())
        with self.read() as s:
            return [CheckpointRow(c.run_id, c.phase, c.round, c.path, c.sha256, c.created) for c in s.scalars(q)]

    # ------------------------------------------------------------ sites

    def upsert_site(self, name: str, *, public_key_sha256: str | None = None, node_id: int | None = None) -> None:
        """Note that a site was seen now; a given key hash or node id replaces the stored one."""
        for attempt in range(2):  # two servers inserting the same new site at once: the loser updates instead
            try:
                with self.write() as s:
                    now = _now()
                    site = s.get(Site, name)
                    if site is None:
                        s.add(
                            Site(
                                name=name, public_key_sha256=public_key_sha256, node_id=node_id, first_seen=now,
                                last_seen=now,
                            )
                        )  # fmt: skip
                    else:
                        site.last_seen = now
                        if public_key_sha256 is not None:
                            site.public_key_sha256 = public_key_sha256
                        if node_id is not None:
                            site.node_id = node_id
                return
            except IntegrityError:
                if attempt:
                    raise

    def sites(self) -> list[SiteRow]:
        """Every site ever seen, by name."""
        with self.read() as s:
            return [
                SiteRow(x.name, x.public_key_sha256, x.node_id, x.first_seen, x.last_seen)
                for x in s.scalars(select(Site).order_by(Site.name))
            ]

    # ------------------------------------------------------------ events

    def add_event(self, run_id: int | None, kind: str, message: str, *, site: str | None = None) -> None:
        """Append a log line (site dropped, checkpoint hash mismatch, resume, ...); run_id None: not run-bound."""
        with self.write() as s:
            if run_id is not None:
                self._run(s, run_id)
            s.add(Event(run_id=run_id, site=site, kind=kind, message=message, created=_now()))

    def events(self, run_id: int | None = None) -> list[EventRow]:
        """Events oldest first: those of run_id, or all events when run_id is None."""
        q = select(Event)
        if run_id is not None:
            q = q.where(Event.run_id == run_id)
        with self.read() as s:
            return [
                EventRow(e.id, e.run_id, e.site, e.kind, e.message, e.created) for e in s.scalars(q.order_by(Event.id))
            ]

    # ------------------------------------------------------------ audit (append-only)

    def add_audit(
        self,
        run_id: int,
        phase: str,
        round: int,
        kind: str,
        site: str,
        *,
        status: str,
        reason: str = "",
        node_id: int | None = None,
        bytes_down: int = 0,
        bytes_up: int = 0,
        sha256: str = "",
    ) -> None:
        """Append one reply to the audit log; there is no method to change or remove a row."""
        _check(kind, RESULT_KINDS, "audit kind")
        _check(status, AUDIT_STATUSES, "audit status")
        with self.write() as s:
            s.add(
                Audit(
                    run_id=run_id, phase=phase, round=round, kind=kind, site=site, node_id=node_id, status=status,
                    reason=reason, bytes_down=int(bytes_down), bytes_up=int(bytes_up), sha256=sha256,
                    created=_now(),
                )
            )  # fmt: skip

    def audit(self, run_id: int | None = None, site: str | None = None, limit: int | None = None) -> list[AuditRow]:
        """Audit rows oldest first (the newest `limit` of them), optionally of one run and/or one site."""
        q = select(Audit)
        if run_id is not None:
            q = q.where(Audit.run_id == run_id)
        if site is not None:
            q = q.where(Audit.site == site)
        q = q.order_by(Audit.id.desc())
        if limit:
            q = q.limit(limit)
        with self.read() as s:
            rows = [
                AuditRow(
                    a.id, a.run_id, a.phase, a.round, a.kind, a.site, a.node_id, a.status, a.reason, a.bytes_down,
                    a.bytes_up, a.sha256, a.created,
                )
                for a in s.scalars(q)
            ]  # fmt: skip
        return rows[::-1]

    # ------------------------------------------------------------ access audit (append-only)

    def add_access(
        self, source: str, kind: str, request: str, decision: str, reason: str = "", *, created: float | None = None
    ) -> None:
        """Append one access decision (refused request, refused bundle, key registered or removed)."""
        _check(kind, ACCESS_KINDS, "access kind")
        _check(decision, ACCESS_DECISIONS, "access decision")
        with self.write() as s:
            s.add(
                Access(
                    source=source, kind=kind, request=request, decision=decision, reason=reason,
                    created=_now() if created is None else created,
                )
            )  # fmt: skip

    def access(self, limit: int | None = None) -> list[AccessRow]:
        """Access audit rows oldest first (the newest `limit` of them)."""
        q = select(Access).order_by(Access.id.desc())
        if limit:
            q = q.limit(limit)
        with self.read() as s:
            rows = [AccessRow(a.id, a.source, a.kind, a.request, a.decision, a.reason, a.created) for a in s.scalars(q)]
        return rows[::-1]


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(allowed)}")


def _run_row(r: Run) -> RunRow:
    return RunRow(r.id, r.name, r.mode, r.status, r.message, r.config_toml, r.flower_run_id, r.created, r.updated)


def _round_row(r: Round) -> RoundRow:
    return RoundRow(
        r.run_id, r.phase, r.round, r.started, r.finished, r.sites_sampled, r.sites_replied,
        dict(r.train), dict(r.evaluate), dict(r.server),
    )  # fmt: skip


__all__ = [
    "DEFAULT_STATE",
    "AccessRow",
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
]
