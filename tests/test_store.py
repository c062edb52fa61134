"""The run store on a real SQLite file and on a real PostgreSQL server: every method round-trips, replaces where it
should, keeps its audit logs append-only, and shares a database between processes."""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import DBAPIError

from fedecho.storage import RoundRow, Store, StoreMissing, state_db_path, store_url

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store's URL: a SQLite file, or a fresh database on the session's PostgreSQL server."""
    return store_url(tmp_path / "state") if request.param == "sqlite" else request.getfixturevalue("pg_url")


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    yield s
    s.close()


def _round(store: Store, run: int, phase: str, rnd: int, loss: float, replied: int = 2) -> None:
    store.add_round(
        run, phase, rnd, started=100.0 + rnd, finished=101.5 + rnd, sites_sampled=2, sites_replied=replied,
        train={"train_loss": loss}, evaluate={"val_loss": loss + 0.1}, server={"server_ef_mae": 5.0 - rnd},
    )  # fmt: skip


def test_store_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert store_url(tmp_path, url="postgresql://u@h/db") == "postgresql://u@h/db"
    assert store_url(tmp_path / "a") == f"sqlite:///{tmp_path / 'a' / 'fedecho.db'}" and (tmp_path / "a").is_dir()
    monkeypatch.setenv("FEDECHO_STATE", str(tmp_path / "env"))
    assert store_url() == f"sqlite:///{tmp_path / 'env' / 'fedecho.db'}"
    monkeypatch.delenv("FEDECHO_STATE")
    monkeypatch.chdir(tmp_path)
    assert state_db_path() == tmp_path / "fedecho-state" / "fedecho.db"


def test_runs(store: Store) -> None:
    a = store.create_run("alpha", 'name = "alpha"\n', mode="simulation")
    b = store.create_run("beta", "", flower_run_id=77)
    assert [r.id for r in store.list_runs()] == [b, a]  # newest first
    run = store.get_run(a)
    assert (run.name, run.mode, run.status, run.flower_run_id) == ("alpha", "simulation", "running", None)
    assert run.message == ""
    assert run.config_toml == 'name = "alpha"\n' and run.created <= run.updated
    store.set_run_status(a, "failed", "site02 sent NaN")
    store.set_flower_run_id(a, 4242)
    run = store.get_run(a)
    assert (run.status, run.message, run.flower_run_id) == ("failed", "site02 sent NaN", 4242)
    assert store.get_run(b).flower_run_id == 77 and store.get_run(b).mode == "deployment"
    with pytest.raises(ValueError, match="run status"):
        store.set_run_status(a, "exploded")


def test_unknown_run_is_a_clear_key_error(store: Store) -> None:
    with pytest.raises(KeyError) as e:
        store.get_run(99)
    assert e.value.args[0] == f"no run 99 in {store.url}"
    for call in (
        lambda: store.set_run_status(99, "stopped"),
        lambda: store.add_phase(99, "pretrain", 3),
        lambda: store.add_event(99, "resume", "x"),
        lambda: _round(store, 99, "pretrain", 1, 1.0),
    ):
        with pytest.raises(KeyError, match="no run 99"):
            call()
    assert store.list_runs() == [] and store.events() == []  # nothing half-written


def test_phases(store: Store) -> None:
    run = store.create_run("r", "")
    store.add_phase(run, "pretrain", 3)
    store.add_phase(run, "finetune", 2)
    store.set_phase_status(run, "pretrain", "running")
    store.add_phase(run, "pretrain", 5)  # idempotent: keeps position and status, updates rounds
    assert [(p.name, p.rounds, p.status) for p in store.phases(run)] == [
        ("pretrain", 5, "running"),
        ("finetune", 2, "pending"),
    ]
    with pytest.raises(KeyError, match="no phase 'test'"):
        store.set_phase_status(run, "test", "running")


def test_rounds_replace_and_last_round(store: Store) -> None:
    run = store.create_run("r", "")
    other = store.create_run("other", "")
    assert store.last_round(run) is None
    for rnd in (1, 2, 3):
        _round(store, run, "pretrain", rnd, 1.0 / rnd)
    _round(store, run, "finetune", 1, 0.9)
    _round(store, other, "pretrain", 9, 0.1)
    last = store.last_round(run)
    assert last == RoundRow(
        run, "finetune", 1, 101.0, 102.5, 2, 2, {"train_loss": 0.9}, {"val_loss": 1.0}, {"server_ef_mae": 4.0}
    )
    assert [(r.phase, r.round) for r in store.rounds(run)] == [
        ("pretrain", 1), ("pretrain", 2), ("pretrain", 3), ("finetune", 1),
    ]  # fmt: skip
    # a resumed run redoes pretrain round 3: one row, the new values, now the last completed
    _round(store, run, "pretrain", 3, 0.25, replied=1)
    pre = store.rounds(run, "pretrain")
    assert [r.round for r in pre] == [1, 2, 3] and pre[-1].train == {"train_loss": 0.25} and pre[-1].sites_replied == 1
    assert store.last_round(run).phase == "pretrain" and store.last_round(run).round == 3
    assert len(store.rounds(run)) == 4 and [r.round for r in store.rounds(other)] == [9]


def test_metric_values_round_trip(store: Store) -> None:
    """NaN/inf (a diverged loss) and numpy scalars survive; JSON would otherwise drop or reject them."""
    np = pytest.importorskip("numpy")
    run = store.create_run("r", "")
    train = {"train_loss": float("nan"), "grad": float("inf"), "num-examples": 12, "seconds": np.float32(1.5)}
    store.add_round(
        run, "pretrain", 1, started=1.0, finished=2.0, sites_sampled=1, sites_replied=1, train=train, evaluate={},
        server={},
    )  # fmt: skip
    got = store.rounds(run)[0].train
    assert math.isnan(got["train_loss"]) and got["grad"] == math.inf and got["num-examples"] == 12
    assert got["seconds"] == 1.5


def test_site_results(store: Store) -> None:
    run = store.create_run("r", "")
    store.add_site_result(
        run, "pretrain", 1, "site01", "train", status="ok", metrics={"train_loss": 0.5, "epsilon": 0.8},
        num_examples=40, bytes_down=1000, bytes_up=900,
    )  # fmt: skip
    store.add_site_result(
        run, "pretrain", 1, "site02", "train", status="failed", metrics={}, num_examples=0, bytes_down=1000,
        bytes_up=0, reason="timeout after 600 s",
    )  # fmt: skip
    store.add_site_result(
        run, "pretrain", 1, "site01", "evaluate", status="ok", metrics={"val_loss": 0.6}, num_examples=10,
        bytes_down=1000, bytes_up=10,
    )  # fmt: skip
    store.add_site_result(
        run, "finetune", 2, "site01", "train", status="refused", metrics={}, num_examples=0, bytes_down=0,
        bytes_up=0, reason="privacy budget spent",
    )  # fmt: skip
    rows = store.site_results(run)
    assert [(r.phase, r.round, r.site, r.kind, r.status) for r in rows] == [
        ("pretrain", 1, "site01", "train", "ok"),
        ("pretrain", 1, "site02", "train", "failed"),
        ("pretrain", 1, "site01", "evaluate", "ok"),
        ("finetune", 2, "site01", "train", "refused"),
    ]
    first = rows[0]
    assert first.metrics == {"train_loss": 0.5, "epsilon": 0.8} and first.num_examples == 40
    assert (first.bytes_down, first.bytes_up, first.reason) == (1000, 900, "") and first.created > 0
    assert rows[1].reason == "timeout after 600 s"
    assert len(store.site_results(run, "pretrain")) == 3 and len(store.site_results(run, "pretrain", 1)) == 3
    assert store.site_results(run, round=2)[0].status == "refused" and store.site_results(run, "pretrain", 2) == []
    # the same (phase, round, site, kind) again replaces the earlier reply
    store.add_site_result(
        run, "pretrain", 1, "site02", "train", status="ok", metrics={"train_loss": 0.7}, num_examples=30,
        bytes_down=1000, bytes_up=900,
    )  # fmt: skip
    site02 = [r for r in store.site_results(run, "pretrain", 1) if r.site == "site02"]
    assert len(site02) == 1 and site02[0].status == "ok" and site02[0].reason == ""
    with pytest.raises(ValueError, match="result status"):
        store.add_site_result(
            run, "pretrain", 1, "site01", "train", status="maybe", metrics={}, num_examples=0, bytes_down=0,
            bytes_up=0,
        )  # fmt: skip


def test_checkpoints(store: Store) -> None:
    run = store.create_run("r", "")
    store.add_checkpoint(run, "pretrain", 1, "/ckpt/pretrain-1.safetensors", "a" * 64)
    store.add_checkpoint(run, "pretrain", 2, "/ckpt/pretrain-2.safetensors", "b" * 64)
    store.add_checkpoint(run, "finetune", 1, "/ckpt/finetune-1.safetensors", "c" * 64)
    assert [(c.phase, c.round) for c in store.checkpoints(run)] == [("finetune", 1), ("pretrain", 2), ("pretrain", 1)]
    newest = store.checkpoints(run)[0]
    assert newest.path == "/ckpt/finetune-1.safetensors" and newest.sha256 == "c" * 64 and newest.run_id == run
    store.add_checkpoint(run, "pretrain", 2, "/ckpt/pretrain-2.safetensors", "d" * 64)  # re-saved after resume
    assert [c.sha256[0] for c in store.checkpoints(run)] == ["d", "c", "a"]


def test_sites(store: Store) -> None:
    store.upsert_site("site02")
    store.upsert_site("site01", public_key_sha256="f" * 64, node_id=11)
    first = {s.name: s for s in store.sites()}
    store.upsert_site("site01", node_id=12)  # a new SuperNode id; key hash kept
    s01 = {s.name: s for s in store.sites()}["site01"]
    assert [s.name for s in store.sites()] == ["site01", "site02"]
    assert (s01.public_key_sha256, s01.node_id) == ("f" * 64, 12)
    assert s01.first_seen == first["site01"].first_seen and s01.last_seen >= first["site01"].last_seen
    assert first["site02"].public_key_sha256 is None and first["site02"].node_id is None


def test_events(store: Store) -> None:
    run = store.create_run("r", "")
    store.add_event(None, "server-start", "listening on :9092")
    store.add_event(run, "site-dropped", "no reply in 600 s", site="site02")
    store.add_event(run, "resume", "from pretrain round 2")
    assert [(e.kind, e.site) for e in store.events(run)] == [("site-dropped", "site02"), ("resume", None)]
    all_events = store.events()
    assert [e.kind for e in all_events] == ["server-start", "site-dropped", "resume"]
    assert all_events[0].run_id is None and all_events[1].run_id == run and all_events[0].id < all_events[1].id


def test_two_stores_on_one_database(db_url: str) -> None:
    url = db_url
    a, b = Store(url), Store(url)
    run = a.create_run("shared", "")
    b.add_phase(run, "pretrain", 2)
    _round(a, run, "pretrain", 1, 0.5)
    assert b.last_round(run).round == 1 and [p.name for p in a.phases(run)] == ["pretrain"]
    # another process writes while both are open
    code = (
        "import sys; from fedecho.storage import Store; s = Store(sys.argv[1]);"
        "s.add_event(int(sys.argv[2]), 'from-child', 'hello'); s.close()"
    )
    subprocess.run([sys.executable, "-c", code, url, str(run)], check=True, timeout=60)
    assert [e.kind for e in a.events(run)] == ["from-child"] == [e.kind for e in b.events(run)]
    a.close()
    b.close()
    if url.startswith("sqlite"):
        con = sqlite3.connect(url.removeprefix("sqlite:///"))
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        con.close()


def test_audit_logs_are_append_only(store: Store) -> None:
    """Rows of audit and access_audit can be added, never changed or removed, not even by SQL around the Store."""
    run = store.create_run("r", "")
    store.add_audit(run, "pretrain", 1, "train", "site01", status="accepted", sha256="a" * 64)
    store.add_access("203.0.113.9", "other", "GET /", "refused", "not a Flower path")
    for sql in (
        "UPDATE audit SET status = 'rejected'", "DELETE FROM audit",
        "UPDATE access_audit SET decision = 'allowed'", "DELETE FROM access_audit",
    ):  # fmt: skip
        with pytest.raises(DBAPIError, match="is append-only"), store.write() as s:
            s.execute(text(sql))
    assert [a.status for a in store.audit()] == ["accepted"] and [a.decision for a in store.access()] == ["refused"]


def test_a_failed_write_leaves_the_old_state(store: Store) -> None:
    """Replacing a round deletes then inserts in one transaction: a failed insert keeps the old round."""
    from sqlalchemy.exc import IntegrityError

    run = store.create_run("r", "")
    _round(store, run, "pretrain", 1, 0.5)
    with pytest.raises(IntegrityError):
        store.add_round(
            run, "pretrain", 1, started=None, finished=2.0, sites_sampled=1, sites_replied=1,  # type: ignore[arg-type]
            train={}, evaluate={}, server={},
        )  # fmt: skip
    assert [r.train for r in store.rounds(run)] == [{"train_loss": 0.5}]


def test_missing_store_is_not_created(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nowhere' / 'fedecho.db'}"
    with pytest.raises(StoreMissing, match="no fedecho store"):
        Store(url, create=False)
    assert not (tmp_path / "nowhere").exists()
    Store(store_url(tmp_path / "here")).close()
    Store(store_url(tmp_path / "here"), create=False).close()


def test_missing_store_on_postgresql_is_not_created(pg_url: str) -> None:
    """An empty PostgreSQL database is no store for a read-only command, and stays empty."""
    with pytest.raises(StoreMissing, match="no runs table"):
        Store(pg_url, create=False)
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    assert inspect(engine).get_table_names() == []
    engine.dispose()
    with Store(pg_url) as store:
        assert store.schema_revision() is not None
    Store(pg_url, create=False).close()
