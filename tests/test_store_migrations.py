"""Schema revisions, applied when a store opens: a run store and a site database written by fedecho 0.1.0
(tests/fixtures/release-0.1.0: tables from create_all, no version table) open as the baseline revision with every
row kept, on SQLite and on PostgreSQL; a later revision that adds a column is applied on the next open; a migrated
schema equals the models; two processes opening an old store at once upgrade it once; a store from a newer
fedecho is refused by name."""

from __future__ import annotations

import math
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import ClassVar

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fixtures.make_store_fixture import BUNDLE_SHA, FILE_SHA, RUN_CONFIG
from sqlalchemy import MetaData, create_engine, event, inspect, text
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from fedecho.cli import app
from fedecho.client.audit import SiteLog
from fedecho.privacy.ledger import PrivacyLedger
from fedecho.storage.engine import StoreError, make_engine
from fedecho.storage.migrations import SERVER, SITE, Migrations
from fedecho.storage.server_schema import Base
from fedecho.storage.site_schema import SiteBase
from fedecho.storage.site_store import SiteStore
from fedecho.storage.store import Store, store_url

RELEASE = Path(__file__).parent / "fixtures" / "release-0.1.0"
BASELINE = "0001"

NEXT_REVISION = '''"""A test-only revision after the newest: a column `note` on {table}."""

import sqlalchemy as sa
from alembic import op

revision = "9001"
down_revision = "{down}"


def upgrade() -> None:
    op.add_column("{table}", sa.Column("note", sa.Text(), nullable=False, server_default="none"))
'''


def with_next_revision(migrations: Migrations, folder: Path, table: str) -> Migrations:
    """migrations plus a revision in folder that adds a column to table."""
    folder.mkdir()
    (folder / "v9001_note.py").write_text(NEXT_REVISION.format(table=table, down=migrations.head()))
    return migrations.with_location(folder)


def schema_diff(engine: Engine, metadata: MetaData) -> list[object]:
    """What alembic's autogenerate would change to make the database's schema the models' (nothing, we hope)."""
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), metadata)


def release_store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The 0.1.0 run store's URL: a copy of the fixture file, or its tables and rows in a fresh PostgreSQL
    database as 0.1.0 made them there (create_all of the same tables, no version table, no triggers)."""
    copy = tmp_path / "fedecho.db"
    shutil.copyfile(RELEASE / "fedecho.db", copy)
    if backend == "sqlite":
        return f"sqlite:///{copy}"
    url = request.getfixturevalue("pg_url")
    source, target = create_engine(f"sqlite:///{copy}"), make_engine(url)
    meta = MetaData()

    @event.listens_for(meta, "column_reflect")
    def _generic(_inspector: object, _table: object, column: dict) -> None:
        column["type"] = column["type"].as_generic()  # SQLite's DOUBLE: PostgreSQL's DOUBLE PRECISION

    meta.reflect(source)
    meta.create_all(target)
    with source.connect() as a, target.begin() as b:
        for table in meta.sorted_tables:
            if rows := [dict(r) for r in a.execute(table.select()).mappings()]:
                b.execute(table.insert(), rows)
            if "id" in table.c:  # serial columns continue after the copied ids
                b.execute(
                    text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), max(id)) FROM {table.name}")
                )
    source.dispose()
    target.dispose()
    return url


def check_release_rows(store: Store) -> None:
    """Every row tests/fixtures/make_store_fixture.py wrote, read back through the Store."""
    [run] = store.list_runs()
    assert (run.id, run.name, run.mode, run.status, run.config_toml) == (
        1,
        "fixture",
        "simulation",
        "finished",
        RUN_CONFIG,
    )
    assert run.flower_run_id == (1 << 64) - 5  # unsigned 64-bit, stored as its signed bits
    assert [(p.name, p.rounds, p.status) for p in store.phases(1)] == [("pretrain", 2, "finished")]
    rounds = store.rounds(1)
    assert [r.round for r in rounds] == [1, 2] and rounds[1].train == {"train_loss": 0.5}
    assert math.isnan(rounds[0].evaluate["val_loss"])
    assert [(r.site, r.kind, r.status, r.bytes_up) for r in store.site_results(1)] == [
        ("site01", "train", "ok", 900)
    ] * 2
    assert [(c.phase, c.round, c.sha256) for c in store.checkpoints(1)] == [("pretrain", 2, "c" * 64)]
    assert [(s.name, s.node_id) for s in store.sites()] == [("site01", 11)]
    assert [(e.kind, e.site) for e in store.events(1)] == [("resume", "site01")]
    assert [(a.round, a.node_id) for a in store.audit(1)] == [(1, (1 << 63) + 7), (2, (1 << 63) + 7)]
    assert [(a.source, a.decision) for a in store.access()] == [("203.0.113.9", "refused")]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_release_store_opens_as_the_baseline_and_takes_a_new_revision(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = release_store(backend, tmp_path, request)
    engine = make_engine(url)
    assert "alembic_version" not in inspect(engine).get_table_names() and "runs" in inspect(engine).get_table_names()
    with Store(url) as store:  # recognised as the baseline: nothing recreated, every row kept, stamped
        assert store.schema_revision() == BASELINE
        check_release_rows(store)
        run = store.create_run("after", "")  # ids continue
        assert run == 2
    assert schema_diff(engine, Base.metadata) == []

    class NextStore(Store):  # the next release: one revision more
        migrations: ClassVar[Migrations] = with_next_revision(SERVER, tmp_path / "next", "runs")

    with NextStore(url) as store:
        assert store.schema_revision() == "9001"
        assert [r.name for r in store.list_runs()] == ["after", "fixture"]
        with store.read() as s:
            assert s.execute(text("SELECT id, note FROM runs ORDER BY id")).all() == [(1, "none"), (2, "none")]
        # the audit log is still append-only after the upgrade (on PostgreSQL: since the baseline's triggers)
        with pytest.raises(Exception, match="is append-only"), store.write() as s:
            s.execute(text("DELETE FROM audit"))
    # this release cannot read what the next one wrote, and says so; the reading commands as an error, exit 2
    with pytest.raises(StoreError, match=r"revision '9001', which this fedecho does not know \(its newest is '0001'\)"):
        Store(url)
    res = CliRunner().invoke(app, ["runs", "list", "--store", url], env={"COLUMNS": "400"})
    assert res.exit_code == 2 and "a newer fedecho wrote it" in res.output, res.output
    engine.dispose()


def test_a_release_site_database_opens_with_its_rows_and_takes_a_new_revision(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    shutil.copyfile(RELEASE / "site.db", site / "site.db")
    with SiteStore(site, create=False) as db:
        assert db.schema_revision() == BASELINE
        ok = db.files("ok")
        assert [(f.record_key, f.sha256, f.split, f.targets) for f in ok] == [
            ("r0001", FILE_SHA, "TRAIN", {"EF": 55.5})
        ]
        assert [f.reason for f in db.files("quarantined")] == ["no-pixels"]
    with SiteLog(site, create=False) as log:
        assert [(r.message_type, r.decision, r.flower_run_id) for r in log.rows()] == [("train", "allowed", 42)]
        assert log.approved(BUNDLE_SHA)
    with PrivacyLedger(site, create=False) as ledger:
        assert [(e.run, e.status, e.steps) for e in ledger.entries()] == [("fixture", "spent", 10)]
    assert schema_diff(make_engine(f"sqlite:///{site / 'site.db'}"), SiteBase.metadata) == []

    class NextSiteStore(SiteStore):
        migrations: ClassVar[Migrations] = with_next_revision(SITE, tmp_path / "next", "files")

    with NextSiteStore(site) as db:
        assert db.schema_revision() == "9001"
        assert [f.record_key for f in db.files()] == ["r0001", None]
        with db.read() as s:
            assert s.execute(text("SELECT note FROM files")).scalars().all() == ["none", "none"]


def test_a_release_site_database_with_only_its_manifest_gets_the_other_tables(tmp_path: Path) -> None:
    """0.1.0 created a site table when its module was imported: a site that only ran `fedecho data add` has the
    manifest alone. The baseline adds the rest, append-only trigger included, and keeps the manifest."""
    shutil.copyfile(RELEASE / "site.db", tmp_path / "site.db")
    con = sqlite3.connect(tmp_path / "site.db")
    for table in ("site_audit", "bundle_approvals", "privacy_ledger"):
        con.execute(f"DROP TABLE {table}")
    con.commit()
    con.close()
    with SiteLog(tmp_path, create=False) as log:
        assert log.rows() == [] and not log.approved(BUNDLE_SHA)
        log.record(message_type="evaluate", decision="refused", reason="policy")
        with pytest.raises(Exception, match="is append-only"), log.store.write() as s:
            s.execute(text("UPDATE site_audit SET decision = 'allowed'"))
        assert [f.record_key for f in log.store.files("ok")] == ["r0001"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_new_store_is_created_by_the_revisions_and_equals_the_models(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = store_url(tmp_path) if backend == "sqlite" else request.getfixturevalue("pg_url")
    with Store(url) as store:
        assert store.schema_revision() == SERVER.head()
        engine = make_engine(url)
        assert schema_diff(engine, Base.metadata) == []
        engine.dispose()
    with SiteStore(tmp_path / "site") as site:
        assert site.schema_revision() == SITE.head()
        assert schema_diff(site._engine, SiteBase.metadata) == []


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_revision_that_fails_leaves_the_store_as_it_was(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """All missing revisions run in one transaction: one that fails half-way takes back what it had done."""
    url = release_store(backend, tmp_path, request)
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "v9001_broken.py").write_text(
        NEXT_REVISION.format(table="runs", down=SERVER.head())
        + '    op.execute("UPDATE runs SET name = \'half-done\'")\n    raise RuntimeError("the revision failed")\n'
    )

    class BrokenStore(Store):
        migrations: ClassVar[Migrations] = SERVER.with_location(folder)

    with pytest.raises(RuntimeError, match="the revision failed"):
        BrokenStore(url)
    engine = make_engine(url)
    assert "alembic_version" not in inspect(engine).get_table_names()  # still a 0.1.0 store: the baseline too undone
    engine.dispose()
    with Store(url) as store:  # which opens as before: no column added, no row changed
        assert store.schema_revision() == BASELINE
        check_release_rows(store)
        with store.read() as s:
            assert "note" not in [c["name"] for c in inspect(s.connection()).get_columns("runs")]
            assert s.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [BASELINE]


def test_a_release_store_being_written_is_switched_to_wal_once_the_write_ends(tmp_path: Path) -> None:
    """SQLite refuses the switch to WAL at once, without its busy wait, while another connection writes a
    rollback-journal file (a 0.1.0 store): opening the store waits for that write instead of failing."""
    url = release_store("sqlite", tmp_path, None)  # type: ignore[arg-type]
    other = sqlite3.connect(tmp_path / "fedecho.db", isolation_level=None, check_same_thread=False)
    assert other.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE runs SET name = name")
    threading.Timer(0.5, lambda: other.execute("COMMIT")).start()
    with Store(url) as store:
        assert store.list_runs()
    other.close()
    assert sqlite3.connect(tmp_path / "fedecho.db").execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_openers_of_a_release_store_upgrade_it_once(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = release_store(backend, tmp_path, request)

    class NextStore(Store):
        migrations: ClassVar[Migrations] = with_next_revision(SERVER, tmp_path / "next", "runs")

    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            NextStore(url).close()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    with NextStore(url) as store, store.read() as s:
        assert s.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["9001"]
        assert [c["name"] for c in inspect(s.connection()).get_columns("runs")].count("note") == 1
