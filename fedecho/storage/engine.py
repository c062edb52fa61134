"""Opening a database: engines for SQLite and PostgreSQL URLs, and the base class every store shares.

SQLite runs in WAL mode with foreign keys on, a busy timeout, durable commits, and write transactions that take
the write lock up front (BEGIN IMMEDIATE), so a server and a `fedecho runs show` in another process can share one
file. PostgreSQL URLs go through psycopg (version 3, the `postgres` extra). `Database` holds the engine, hands
out one-transaction sessions, brings the schema to its newest revision on open (fedecho.storage.migrations), and
closes; `Closing` is the context-manager half of it, for objects that hold a store rather than being one.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

if TYPE_CHECKING:
    from fedecho.storage.migrations import Migrations

BUSY_TIMEOUT_MS = 30_000


class StoreError(ValueError):
    """A database fedecho cannot use as it stands: no driver for its URL, or a schema newer than this fedecho
    (a ValueError, as a malformed URL is: the commands report either as an error that names the store)."""


def sqlite_file(url: str | URL) -> Path | None:
    """The file of a SQLite URL (None: in memory, or not SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def sqlite_engine(url: str | URL) -> Engine:
    """A SQLite engine: WAL, foreign keys, busy timeout, durable commits, BEGIN IMMEDIATE for writes.

    pysqlite's own transaction handling is switched off so that BEGIN is ours: a deferred transaction that
    reads first and writes later can fail at once with 'database is locked' when another process wrote in
    between; taking the write lock at BEGIN makes it wait (busy timeout) instead.
    """
    memory = sqlite_file(url) is None
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
            _wal(cur)
            cur.execute("PRAGMA synchronous = FULL")  # a committed round survives a power cut, not just a crash
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("fedecho_write") else "BEGIN")

    return engine


def _wal(cur: Any) -> None:
    """Switch a file to WAL, waiting out another connection's write: SQLite refuses the switch at once ('database
    is locked', no busy wait) while a rollback-journal file is being written, as when two processes first open a
    store an older release made."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if cur.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() == "wal":
                return
        except sqlite3.OperationalError as e:  # or it says the mode it kept
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError("database is locked: the store could not be switched to WAL")
        time.sleep(0.05)


def make_engine(url: str | URL) -> Engine:
    """The engine for a store URL: SQLite as above; `postgresql://` through psycopg 3; any other SQLAlchemy URL
    as SQLAlchemy opens it (checked on checkout, so a restarted database server costs no failed write)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return sqlite_engine(parsed)
    if backend == "postgresql":
        if parsed.drivername == "postgresql":  # SQLAlchemy's default would be psycopg2: fedecho ships psycopg 3
            parsed = parsed.set(drivername="postgresql+psycopg")
        if parsed.drivername == "postgresql+psycopg" and importlib.util.find_spec("psycopg") is None:
            shown = parsed.render_as_string(hide_password=True)
            raise StoreError(f"{shown}: a PostgreSQL store needs the psycopg driver: pip install 'fedecho[postgres]'")
    return create_engine(parsed, pool_pre_ping=True)


class Closing:
    """Close on leaving a `with` block; subclasses say what closing releases."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Database(Closing):
    """One open database: its engine, one-transaction sessions, its schema brought up to date by `migrate`.

    A subclass names its `migrations` (the revisions of its schema) and calls `migrate()` once it has decided
    that the database may be opened (or created)."""

    migrations: ClassVar[Migrations]

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self.shown_url = parsed.render_as_string(hide_password=True)  # for messages: never print a password
        self.backend = parsed.get_backend_name()
        self._engine = make_engine(url)
        self._write_engine = self._engine.execution_options(fedecho_write=True)

    def close(self) -> None:
        """Release connections (and SQLite file handles)."""
        self._engine.dispose()

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction (on SQLite the write lock taken up front): committed on success, else rolled
        back."""
        with Session(self._write_engine, expire_on_commit=False) as s, s.begin():
            yield s

    @contextmanager
    def read(self) -> Iterator[Session]:
        """One read transaction."""
        with Session(self._engine, expire_on_commit=False) as s, s.begin():
            yield s

    def has_table(self, name: str) -> bool:
        return inspect(self._engine).has_table(name)

    def migrate(self) -> None:
        """Bring the schema to the newest revision this fedecho knows; a no-op read where it is there already."""
        self.migrations.upgrade(self._engine, self._write_engine, self.shown_url)

    def schema_revision(self) -> str | None:
        """The schema revision the database is at (None: never migrated)."""
        return self.migrations.current(self._engine)


__all__ = [
    "BUSY_TIMEOUT_MS",
    "Closing",
    "Database",
    "StoreError",
    "make_engine",
    "sqlite_engine",
    "sqlite_file",
]
