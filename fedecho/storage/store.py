"""The persistent run store: runs, phases, rounds, per-site results, checkpoints, sites, events.

One SQLAlchemy database (a SQLite file by default, any SQLAlchemy URL such as PostgreSQL from the server
config). Every public write is one transaction, so a crash leaves either the old or the new state. SQLite
runs in WAL mode with foreign keys on, a busy timeout, and write transactions that take the write lock up
front (BEGIN IMMEDIATE), so a server and a `fedecho runs show` in another process can share one file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    DDL,
    BigInteger,
    Double,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    inspect,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.dml import Delete

DEFAULT_STATE = "fedecho-state"
DB_NAME = "fedecho.db"
BUSY_TIMEOUT_MS = 30_000

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


# ---------------------------------------------------------------- rows handed out (plain values, frozen)


@dataclass(frozen=True)
class RunRow:
    id: int
    name: str
    mode: str
    status: str
    message: str
    config_toml: str
    flower_run_id: int | None
    created: float
    updated: float


@dataclass(frozen=True)
class PhaseRow:
    run_id: int
    name: str
    rounds: int
    status: str


@dataclass(frozen=True)
class RoundRow:
    run_id: int
    phase: str
    round: int
    started: float
    finished: float
    sites_sampled: int
    sites_replied: int
    train: dict[str, Any]
    evaluate: dict[str, Any]
    server: dict[str, Any]


@dataclass(frozen=True)
class SiteResultRow:
    run_id: int
    phase: str
    round: int
    site: str
    kind: str
    status: str
    metrics: dict[str, Any]
    num_examples: int
    bytes_down: int
    bytes_up: int
    reason: str
    created: float


@dataclass(frozen=True)
class CheckpointRow:
    run_id: int
    phase: str
    round: int
    path: str
    sha256: str
    created: float


@dataclass(frozen=True)
class SiteRow:
    name: str
    public_key_sha256: str | None
    node_id: int | None
    first_seen: float
    last_seen: float


@dataclass(frozen=True)
class EventRow:
    id: int
    run_id: int | None
    site: str | None
    kind: str
    message: str
    created: float


@dataclass(frozen=True)
class AuditRow:
    id: int
    run_id: int
    phase: str
    round: int
    kind: str
    site: str
    node_id: int | None
    status: str  # accepted | rejected | refused | failed
    reason: str
    bytes_down: int
    bytes_up: int
    sha256: str  # of the reply's arrays as received (the site logs the same digest for what it sent)
    created: float


@dataclass(frozen=True)
class AccessRow:
    id: int
    source: str  # the network address the request came from (or "coordinator (loopback)")
    kind: str  # control | runtime | fleet | other (a refused request) | bundle | registration
    request: str  # method and path, the bundle's hash, or the site key
    decision: str  # refused | allowed
    reason: str
    created: float


# ---------------------------------------------------------------- schema


def _json_default(o: object) -> object:
    # numpy / torch scalars arrive from training code; store their Python value.
    item = getattr(o, "item", None)
    return item() if callable(item) else str(o)


class JSONText(TypeDecorator[dict[str, Any]]):
    """A dict as JSON text: unlike the JSON column types it keeps NaN/inf (a diverged loss) on every backend."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: dict[str, Any] | None, dialect: Any) -> str:
        return json.dumps(dict(value or {}), default=_json_default, sort_keys=True)

    def process_result_value(self, value: str | None, dialect: Any) -> dict[str, Any]:
        return json.loads(value) if value else {}


class UInt64(TypeDecorator[int]):
    """Flower's run and node ids are unsigned 64-bit; SQL integers are signed: store the same bits."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Any) -> int | None:
        return None if value is None else (value - (1 << 64) if value >= (1 << 63) else value)

    def process_result_value(self, value: int | None, dialect: Any) -> int | None:
        return None if value is None else (value + (1 << 64) if value < 0 else value)


class Base(DeclarativeBase):
    pass


class _Run(Base):
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


class _Phase(Base):
    __tablename__ = "phases"
    __table_args__ = (UniqueConstraint("run_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # insertion order
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    rounds: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32))


class _Round(Base):
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


class _SiteResult(Base):
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


class _Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "phase", "round"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    phase: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    created: Mapped[float] = mapped_column(Double)


def _delete_checkpoint(run_id: int, phase: str, round: int) -> Delete:
    return delete(_Checkpoint).where(
        _Checkpoint.run_id == run_id, _Checkpoint.phase == phase, _Checkpoint.round == round
    )


class _Site(Base):
    __tablename__ = "sites"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    public_key_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    node_id: Mapped[int | None] = mapped_column(UInt64, nullable=True)
    first_seen: Mapped[float] = mapped_column(Double)
    last_seen: Mapped[float] = mapped_column(Double)


class _Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), nullable=True, index=True)
    site: Mapped[str | None] = mapped_column(String(200), nullable=True)
    kind: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    created: Mapped[float] = mapped_column(Double)


class _Audit(Base):
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


def append_only(table: Any) -> None:
    """SQLite triggers that abort any UPDATE or DELETE of table's rows (other databases: grant the server's
    role INSERT and SELECT only on it)."""
    for op in ("UPDATE", "DELETE"):
        ddl = DDL(
            f"CREATE TRIGGER IF NOT EXISTS {table.name}_no_{op.lower()} BEFORE {op} ON {table.name} "
            f"BEGIN SELECT RAISE(ABORT, '{table.name} is append-only'); END"
        )
        event.listen(table, "after_create", ddl.execute_if(dialect="sqlite"))


class _Access(Base):
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


append_only(_Audit.__table__)
append_only(_Access.__table__)


# ---------------------------------------------------------------- engine


def _sqlite_engine(url: str) -> Engine:
    """A SQLite engine: WAL, foreign keys, busy timeout, durable commits, BEGIN IMMEDIATE for writes.

    pysqlite's own transaction handling is switched off so that BEGIN is ours: a deferred transaction that
    reads first and writes later can fail at once with 'database is locked' when another process wrote in
    between; taking the write lock at BEGIN makes it wait (busy timeout) instead.
    """
    memory = make_url(url).database in (None, "", ":memory:")
    kwargs: dict[str, Any] = {"connect_args": {"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}}
    if memory:
        kwargs["poolclass"] = StaticPool  # one shared connection, else every connection is a new empty db
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys = ON")
        if not memory:
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = FULL")  # a committed round survives a power cut, not just a crash
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("fedecho_write") else "BEGIN")

    return engine


def _now() -> float:
    return time.time()


class Store:
    """Run state of fedecho federations; safe to share between processes (each write is one transaction)."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        """Open the store at url and create missing tables; create=False raises StoreMissing instead."""
        self.url = url
        parsed = make_url(url)
        self.shown_url = parsed.render_as_string(hide_password=True)  # for messages: never print a password
        self._sqlite = parsed.get_backend_name() == "sqlite"
        file = parsed.database if self._sqlite and parsed.database not in (None, "", ":memory:") else None
        if not create and file and not Path(file).exists():
            raise StoreMissing(f"no fedecho store at {self.shown_url} (no file {file})")
        self._engine = _sqlite_engine(url) if self._sqlite else create_engine(url, pool_pre_ping=True)
        self._write_engine = self._engine.execution_options(fedecho_write=True)
        missing = set(Base.metadata.tables) - set(inspect(self._engine).get_table_names())
        if missing and create:
            Base.metadata.create_all(self._write_engine)  # under the write lock: two processes may open at once
        elif _Run.__tablename__ in missing:
            self._engine.dispose()
            raise StoreMissing(f"no fedecho store at {self.shown_url} (no runs table)")

    def close(self) -> None:
        """Release connections (and SQLite file handles)."""
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.shown_url!r})"

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """One write transaction: committed on success, rolled back on any error."""
        with Session(self._write_engine, expire_on_commit=False) as s, s.begin():
            yield s

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self._engine, expire_on_commit=False) as s, s.begin():
            yield s

    def _run(self, s: Session, run_id: int) -> _Run:
        run = s.get(_Run, run_id)
        if run is None:
            raise KeyError(f"no run {run_id} in {self.shown_url}")
        return run

    # ------------------------------------------------------------ runs

    def create_run(
        self, name: str, config_toml: str, *, mode: str = "deployment", flower_run_id: int | None = None
    ) -> int:
        """Start a run record in status "running"; returns its id (the RUN_ID of `fedecho runs show`)."""
        now = _now()
        with self._write() as s:
            run = _Run(
                name=name, mode=mode, status="running", message="", config_toml=config_toml,
                flower_run_id=flower_run_id, created=now, updated=now,
            )  # fmt: skip
            s.add(run)
            s.flush()
            return run.id

    def get_run(self, run_id: int) -> RunRow:
        with self._read() as s:
            return _run_row(self._run(s, run_id))

    def list_runs(self) -> list[RunRow]:
        """All runs, newest first."""
        with self._read() as s:
            return [_run_row(r) for r in s.scalars(select(_Run).order_by(_Run.created.desc(), _Run.id.desc()))]

    def set_run_status(self, run_id: int, status: str, message: str = "") -> None:
        _check(status, RUN_STATUSES, "run status")
        with self._write() as s:
            run = self._run(s, run_id)
            run.status, run.message, run.updated = status, message, _now()

    def set_flower_run_id(self, run_id: int, flower_run_id: int) -> None:
        with self._write() as s:
            run = self._run(s, run_id)
            run.flower_run_id, run.updated = flower_run_id, _now()

    # ------------------------------------------------------------ phases

    def add_phase(self, run_id: int, name: str, rounds: int) -> None:
        """Declare a phase (status "pending"); adding it again only updates its round count (resume)."""
        with self._write() as s:
            self._run(s, run_id)
            phase = s.scalar(select(_Phase).where(_Phase.run_id == run_id, _Phase.name == name))
            if phase is None:
                s.add(_Phase(run_id=run_id, name=name, rounds=rounds, status="pending"))
            else:
                phase.rounds = rounds

    def set_phase_status(self, run_id: int, name: str, status: str) -> None:
        _check(status, PHASE_STATUSES, "phase status")
        with self._write() as s:
            self._run(s, run_id)
            phase = s.scalar(select(_Phase).where(_Phase.run_id == run_id, _Phase.name == name))
            if phase is None:
                raise KeyError(f"no phase {name!r} in run {run_id} in {self.shown_url}")
            phase.status = status
            self._run(s, run_id).updated = _now()

    def phases(self, run_id: int) -> list[PhaseRow]:
        """The run's phases in the order they were added."""
        with self._read() as s:
            rows = s.scalars(select(_Phase).where(_Phase.run_id == run_id).order_by(_Phase.id))
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
        with self._write() as s:
            self._run(s, run_id).updated = _now()
            s.execute(delete(_Round).where(_Round.run_id == run_id, _Round.phase == phase, _Round.round == round))
            s.add(
                _Round(
                    run_id=run_id, phase=phase, round=round, started=started, finished=finished,
                    sites_sampled=sites_sampled, sites_replied=sites_replied, train=train, evaluate=evaluate,
                    server=server,
                )
            )  # fmt: skip

    def rounds(self, run_id: int, phase: str | None = None) -> list[RoundRow]:
        """Completed rounds in order of completion (a redone round counts when it was redone)."""
        q = select(_Round).where(_Round.run_id == run_id)
        if phase is not None:
            q = q.where(_Round.phase == phase)
        with self._read() as s:
            return [_round_row(r) for r in s.scalars(q.order_by(_Round.id))]

    def last_round(self, run_id: int) -> RoundRow | None:
        """The last completed round of any phase: where a resumed run continues from."""
        with self._read() as s:
            r = s.scalar(select(_Round).where(_Round.run_id == run_id).order_by(_Round.id.desc()).limit(1))
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
        with self._write() as s:
            self._run(s, run_id)
            s.execute(
                delete(_SiteResult).where(
                    _SiteResult.run_id == run_id, _SiteResult.phase == phase, _SiteResult.round == round,
                    _SiteResult.site == site, _SiteResult.kind == kind,
                )
            )  # fmt: skip
            s.add(
                _SiteResult(
                    run_id=run_id, phase=phase, round=round, site=site, kind=kind, status=status, metrics=metrics,
                    num_examples=int(num_examples), bytes_down=int(bytes_down), bytes_up=int(bytes_up),
                    reason=reason, created=_now(),
                )
            )  # fmt: skip

    def site_results(self, run_id: int, phase: str | None = None, round: int | None = None) -> list[SiteResultRow]:
        """Per-site results in the order they were recorded."""
        q = select(_SiteResult).where(_SiteResult.run_id == run_id)
        if phase is not None:
            q = q.where(_SiteResult.phase == phase)
        if round is not None:
            q = q.where(_SiteResult.round == round)
        with self._read() as s:
            return [
                SiteResultRow(
                    r.run_id, r.phase, r.round, r.site, r.kind, r.status, dict(r.metrics), r.num_examples,
                    r.bytes_down, r.bytes_up, r.reason, r.created,
                )
                for r in s.scalars(q.order_by(_SiteResult.id))
            ]  # fmt: skip

    # ------------------------------------------------------------ checkpoints

    def add_checkpoint(self, run_id: int, phase: str, round: int, path: str, sha256: str) -> None:
        """Record a saved global model (re-saving the same phase and round replaces the record)."""
        with self._write() as s:
            self._run(s, run_id).updated = _now()
            s.execute(_delete_checkpoint(run_id, phase, round))
            s.add(_Checkpoint(run_id=run_id, phase=phase, round=round, path=str(path), sha256=sha256, created=_now()))

    def remove_checkpoint(self, run_id: int, phase: str, round: int) -> None:
        """Forget a checkpoint's record (retention: its files go next)."""
        with self._write() as s:
            s.execute(_delete_checkpoint(run_id, phase, round))

    def checkpoints(self, run_id: int) -> list[CheckpointRow]:
        """The run's checkpoints, newest first."""
        q = select(_Checkpoint).where(_Checkpoint.run_id == run_id).order_by(_Checkpoint.id.desc())
        with self._read() as s:
            return [CheckpointRow(c.run_id, c.phase, c.round, c.path, c.sha256, c.created) for c in s.scalars(q)]

    # ------------------------------------------------------------ sites

    def upsert_site(self, name: str, *, public_key_sha256: str | None = None, node_id: int | None = None) -> None:
        """Note that a site was seen now; a given key hash or node id replaces the stored one."""
        for attempt in range(2):  # two servers inserting the same new site at once: the loser updates instead
            try:
                with self._write() as s:
                    now = _now()
                    site = s.get(_Site, name)
                    if site is None:
                        s.add(
                            _Site(
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
        with self._read() as s:
            return [
                SiteRow(x.name, x.public_key_sha256, x.node_id, x.first_seen, x.last_seen)
                for x in s.scalars(select(_Site).order_by(_Site.name))
            ]

    # ------------------------------------------------------------ events

    def add_event(self, run_id: int | None, kind: str, message: str, *, site: str | None = None) -> None:
        """Append a log line (site dropped, checkpoint hash mismatch, resume, ...); run_id None: not run-bound."""
        with self._write() as s:
            if run_id is not None:
                self._run(s, run_id)
            s.add(_Event(run_id=run_id, site=site, kind=kind, message=message, created=_now()))

    def events(self, run_id: int | None = None) -> list[EventRow]:
        """Events oldest first: those of run_id, or all events when run_id is None."""
        q = select(_Event)
        if run_id is not None:
            q = q.where(_Event.run_id == run_id)
        with self._read() as s:
            return [
                EventRow(e.id, e.run_id, e.site, e.kind, e.message, e.created) for e in s.scalars(q.order_by(_Event.id))
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
        with self._write() as s:
            s.add(
                _Audit(
                    run_id=run_id, phase=phase, round=round, kind=kind, site=site, node_id=node_id, status=status,
                    reason=reason, bytes_down=int(bytes_down), bytes_up=int(bytes_up), sha256=sha256,
                    created=_now(),
                )
            )  # fmt: skip

    def audit(self, run_id: int | None = None, site: str | None = None, limit: int | None = None) -> list[AuditRow]:
        """Audit rows oldest first (the newest `limit` of them), optionally of one run and/or one site."""
        q = select(_Audit)
        if run_id is not None:
            q = q.where(_Audit.run_id == run_id)
        if site is not None:
            q = q.where(_Audit.site == site)
        q = q.order_by(_Audit.id.desc())
        if limit:
            q = q.limit(limit)
        with self._read() as s:
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
        with self._write() as s:
            s.add(
                _Access(
                    source=source, kind=kind, request=request, decision=decision, reason=reason,
                    created=_now() if created is None else created,
                )
            )  # fmt: skip

    def access(self, limit: int | None = None) -> list[AccessRow]:
        """Access audit rows oldest first (the newest `limit` of them)."""
        q = select(_Access).order_by(_Access.id.desc())
        if limit:
            q = q.limit(limit)
        with self._read() as s:
            rows = [AccessRow(a.id, a.source, a.kind, a.request, a.decision, a.reason, a.created) for a in s.scalars(q)]
        return rows[::-1]


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(allowed)}")


def _run_row(r: _Run) -> RunRow:
    return RunRow(r.id, r.name, r.mode, r.status, r.message, r.config_toml, r.flower_run_id, r.created, r.updated)


def _round_row(r: _Round) -> RoundRow:
    return RoundRow(
        r.run_id, r.phase, r.round, r.started, r.finished, r.sites_sampled, r.sites_replied,
        dict(r.train), dict(r.evaluate), dict(r.server),
    )  # fmt: skip


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
    "state_db_path",
    "store_url",
]
