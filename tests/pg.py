"""A throwaway PostgreSQL server for the tests, from the machine's PostgreSQL binaries (`make postgres` installs
them where they are missing): a data folder in a temporary directory, loopback TCP on a free port and a unix
socket in the same folder, trust authentication for its one role, no fsync. Stopped and removed after the session.

initdb and postgres refuse to run as root: as root they run as the `postgres` user (Debian's package creates it),
else as `nobody`.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedecho.sim.loopback import free_port

ROLE = "fedecho"
DEBIAN_BINARIES = Path("/usr/lib/postgresql")  # Debian's package: /usr/lib/postgresql/<major>/bin


def pg_bin() -> Path:
    """The folder of initdb, pg_ctl and postgres: from PATH, else the newest Debian install."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    installed = [p.parent for p in DEBIAN_BINARIES.glob("*/bin/initdb")]
    installed.sort(key=lambda b: int(b.parent.name) if b.parent.name.isdigit() else 0)
    if not installed:
        raise RuntimeError(
            "PostgreSQL's binaries (initdb, pg_ctl, postgres) are not on this machine, neither on PATH nor in "
            f"{DEBIAN_BINARIES}/<version>/bin: run `make postgres` (as root it installs Debian's postgresql)"
        )
    return installed[-1]


def _run_as() -> str | None:
    """The user the server runs as: None (this one) unless this is root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root, and neither a `postgres` nor a `nobody` user exists to run PostgreSQL as")


class PostgresServer:
    """One PostgreSQL server in a temporary folder; `database()` creates a fresh database and returns its URL."""

    def __init__(self) -> None:
        self.bin = pg_bin()
        self.user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="fedecho-pg-"))  # under /tmp: the server's user can reach it
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self._names = itertools.count(1)
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def _cmd(self, *args: str) -> list[str]:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        return [*prefix, *args]

    def _call(self, *args: str, timeout: float = 120) -> None:
        res = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if res.returncode:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}):\n{res.stdout}{res.stderr}{log}")

    def start(self) -> None:
        self._call(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", ROLE, "--auth=trust", "-E", "UTF8",
            "--no-locale", "--no-sync",
        )  # fmt: skip
        for attempt in range(3):  # a free port can be taken between finding it and binding it
            self.port = free_port()
            options = (
                f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off"
            )
            try:
                self._call(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                           "-w", "-t", "60", "start")  # fmt: skip
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._call(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new, empty database; its SQLAlchemy URL."""
        import psycopg

        name = f"test{next(self._names)}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user=ROLE, dbname="postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (started on first use: a few seconds)."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """The URL of a fresh PostgreSQL database."""
    return postgres.database()
