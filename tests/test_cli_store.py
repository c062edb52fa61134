"""Where the reading commands find a coordinator's store, and what `fedecho server resume` does with a run id,
without a running coordinator: `--server configs/server.toml` reads the store the server config names, a
missing store says where it looked and how to point at the deployment's, and resuming a finished or unknown
run submits nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_helpers import free_port, write_server_toml
from typer.testing import CliRunner

from fedecho.cli import app
from fedecho.server.config import load_server_config
from fedecho.storage import Store, store_url

runner = CliRunner()
ENV = {"COLUMNS": "400", "FEDECHO_STATE": None}


@pytest.fixture
def coordinator(tmp_path: Path) -> Path:
    """A server.toml whose state folder holds a store with a finished run 1 and a paused run 2."""
    (tmp_path / "deploy").mkdir()
    path = write_server_toml(tmp_path / "deploy", free_port())
    cfg = load_server_config(path)
    with Store(store_url(cfg.state)) as store:
        done = store.create_run("quickstart", '[run]\nname = "quickstart"\n', flower_run_id=4242)
        store.set_run_status(done, "finished")
        paused = store.create_run("second", '[run]\nname = "second"\n')
        store.set_run_status(paused, "paused", "too few sites")
        store.add_audit(done, "pretrain", 1, "train", "site01", status="accepted")
    return path


def test_reading_commands_take_the_store_from_the_server_config(coordinator: Path, tmp_path: Path) -> None:
    server = ["--server", str(coordinator)]
    res = runner.invoke(app, ["runs", "list", *server], env=ENV)
    assert res.exit_code == 0 and "quickstart" in res.output and "second" in res.output, res.output
    assert "deploy/server/fedecho.db" in res.output  # says which store it read
    res = runner.invoke(app, ["runs", "show", "1", *server], env=ENV)
    assert res.exit_code == 0 and "quickstart" in res.output and "4242" in res.output, res.output
    res = runner.invoke(app, ["report", "1", *server, "--out", str(tmp_path / "report")], env=ENV)
    assert res.exit_code == 0 and (tmp_path / "report" / "index.html").is_file(), res.output
    res = runner.invoke(app, ["audit", *server, "--run", "1"], env=ENV)
    assert res.exit_code == 0 and "site01" in res.output and "accepted" in res.output, res.output
    res = runner.invoke(app, ["runs", "show", "1", *server, "--state", str(tmp_path)], env=ENV)
    assert res.exit_code == 2 and "without --state or --store" in res.output, res.output


def test_no_store_where_the_command_looked_says_how_to_find_the_deployments(
    coordinator: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for args in (["runs", "list"], ["runs", "show", "1"], ["report", "1", "--out", "r"], ["audit", "--run", "1"]):
        res = runner.invoke(app, args, env=ENV)
        assert res.exit_code == 2, res.output
        out = " ".join(res.output.split())
        assert f"{elsewhere}/fedecho-state/fedecho.db" in out and "FEDECHO_STATE is not set" in out, out
        assert "--server configs/server.toml" in out and "[server].state" in out, out
    assert not (elsewhere / "fedecho-state").exists() and not (elsewhere / "r").exists()  # nothing created
    # beside a configs/server.toml (the README's layout), the hint is the command that works here
    (elsewhere / "configs").mkdir()
    (elsewhere / "configs" / "server.toml").write_text(coordinator.read_text().replace('"server"', '"../server"'))
    res = runner.invoke(app, ["runs", "list"], env=ENV)
    assert res.exit_code == 2 and "Here: fedecho runs list --server configs/server.toml" in res.output, res.output
    res = runner.invoke(app, ["runs", "list", "--server", "configs/server.toml"], env=ENV)
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "the store of configs/server.toml, written at the coordinator's first" in out, out
    # $FEDECHO_STATE is named when it is what was read
    res = runner.invoke(app, ["runs", "list"], env={**ENV, "FEDECHO_STATE": str(tmp_path / "nowhere")})
    assert res.exit_code == 2 and "$FEDECHO_STATE=" in res.output, res.output
    res = runner.invoke(app, ["runs", "list", "--server", str(tmp_path / "no-such.toml")], env=ENV)
    assert res.exit_code == 2 and "no-such.toml" in res.output, res.output


def test_resume_of_a_finished_or_unknown_run_submits_nothing(coordinator: Path) -> None:
    cfg = load_server_config(coordinator)
    server = ["--server", str(coordinator)]
    res = runner.invoke(app, ["server", "resume", "1", *server], env=ENV)  # no SuperLink needed to say so
    assert res.exit_code == 0 and "run 1 is already finished; nothing to resume" in res.output, res.output
    res = runner.invoke(app, ["server", "resume", "9", *server], env=ENV)
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "cannot resume run 9: no run 9" in out and "fedecho runs list --server" in out, out
    assert not (cfg.state / "submissions").exists()
    res = runner.invoke(app, ["server", "resume", "2", *server], env=ENV)  # paused: resumable, so it asks the SuperLink
    assert res.exit_code == 2 and "no SuperLink answers" in res.output, res.output
    (coordinator.parent / "fresh").mkdir()
    fresh = write_server_toml(coordinator.parent / "fresh", free_port())
    res = runner.invoke(app, ["server", "resume", "1", "--server", str(fresh)], env=ENV)
    assert res.exit_code == 2 and "no run has been submitted to this coordinator" in " ".join(res.output.split())


def test_flwr_needs_a_command_and_a_running_coordinator(coordinator: Path) -> None:
    res = runner.invoke(app, ["server", "flwr", "--server", str(coordinator)], env=ENV)
    assert res.exit_code == 2 and "no flwr command" in res.output, res.output
    res = runner.invoke(app, ["server", "flwr", "--server", str(coordinator), "--", "ls"], env=ENV)
    assert res.exit_code == 2 and "no SuperLink answers" in res.output, res.output
    assert not (load_server_config(coordinator).flwr_home / "config.toml").exists()  # nothing was written or started
