"""Schema revisions of fedecho's databases (Alembic), applied by each store when it opens.

Two histories: `server/` for the run store (`Store`), `site/` for a site's database (`SiteStore`). Each one's
revision 0001 is the schema as fedecho 0.1.0 made it (create_all, no version table). That revision creates the
tables a database lacks, so a database 0.1.0 wrote, complete (a run store) or with only some tables (a site
database where only `fedecho data add` ran), is brought to it and stamped, and an empty one is created by it.

Opening a store reads the revision it is at; where that is not the newest, the missing revisions run in one
write transaction (SQLite: the write lock taken up front; PostgreSQL: an advisory lock), so two processes that
open an old store at once upgrade it once. No alembic.ini or env.py: the configuration is built here.

Adding a revision: a file `vNNNN_what.py` in the history's folder with `revision = "NNNN"`, `down_revision` the
newest one before it and `upgrade()` in alembic.op (add_column, create_table, ...), and the same change in the
models (server_schema.py, site_schema.py); tests/test_store_migrations.py checks that a migrated database equals
the models on SQLite and PostgreSQL. On SQLite a revision runs with foreign keys on, inside one transaction: a
table rebuild (op.batch_alter_table) of `runs` would cascade deletes into its child tables.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from fedecho.storage.engine import StoreError

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory
    from sqlalchemy.engine import Connection, Engine

HERE = Path(__file__).resolve().parent
log = logging.getLogger(__name__)
_PG_LOCK = 0x66656465636F  # pg_advisory_xact_lock key: one fedecho migration at a time per database


@functools.cache
def _script(locations: tuple[Path, ...]) -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    quiet = logging.getLogger("alembic")
    if quiet.level == logging.NOTSET:  # its setup chatter is no news to a user; a revision run is logged below
        quiet.setLevel(logging.WARNING)
    return ScriptDirectory(locations[0], version_locations=[str(p) for p in locations])


def _current(conn: Connection) -> str | None:
    from alembic.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


@dataclass(frozen=True)
class Migrations:
    """One history of revisions: its name and the folders its revision files are in."""

    name: str
    locations: tuple[Path, ...]

    def with_location(self, folder: str | Path) -> Migrations:
        """This history with the revisions in folder added (a later revision, e.g. in a test)."""
        return replace(self, locations=(*self.locations, Path(folder)))

    def script(self) -> ScriptDirectory:
        return _script(self.locations)

    def head(self) -> str:
        """The newest revision."""
        heads = self.script().get_heads()
        if len(heads) != 1:
            raise StoreError(f"the {self.name} schema history has {len(heads)} newest revisions, not one: {heads}")
        return heads[0]

    def current(self, engine: Engine) -> str | None:
        """The revision the database is at (None: never migrated)."""
        with engine.connect() as conn:
            return _current(conn)

    def upgrade(self, read: Engine, write: Engine, shown_url: str) -> None:
        """Run the revisions the database lacks, in one write transaction; a read only where there are none."""
        head = self.head()
        current = self.current(read)
        if current == head:
            return
        self._known(current, shown_url)
        with write.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})
            before = _current(conn)  # another process may have upgraded it meanwhile
            self._known(before, shown_url)
            if before != head:
                self._run(conn, head)
                log.info("%s: %s schema upgraded from revision %s to %s", shown_url, self.name, before, head)

    def _known(self, revision: str | None, shown_url: str) -> None:
        from alembic.script.revision import ResolutionError
        from alembic.util import CommandError

        if revision is None:
            return
        try:
            self.script().get_revision(revision)
        except (ResolutionError, CommandError):
            raise StoreError(
                f"the {self.name} schema of {shown_url} is at revision {revision!r}, which this fedecho does not "
                f"know (its newest is {self.head()!r}): a newer fedecho wrote it; open it with that release"
            ) from None

    def _run(self, conn: Connection, head: str) -> None:
        from alembic.config import Config
        from alembic.runtime.environment import EnvironmentContext

        script = self.script()

        def steps(revision: Any, _context: Any) -> Any:
            return script._upgrade_revs(head, revision)

        with EnvironmentContext(Config(), script, fn=steps, destination_rev=head) as env:
            env.configure(connection=conn)
            env.run_migrations()


SERVER = Migrations("server", (HERE / "server",))
SITE = Migrations("site", (HERE / "site",))

__all__ = ["SERVER", "SITE", "Migrations"]
