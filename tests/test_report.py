"""`fedecho runs list|show` and `fedecho report` on a plausible two-phase, two-site run in a real SQLite store."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from builders import cli_in_fresh_interpreter
from fedecho.cli import app
from fedecho.report import run_tables, write_report
from fedecho.storage import Store, store_url

runner = CliRunner()
ENV = {"COLUMNS": "220"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SITES = ("site01", "site02")


def _fill(store: Store, *, dp: bool) -> int:
    """Pretrain 3 rounds then finetune 3 rounds over 2 sites; site02 fails finetune round 2."""
    run = store.create_run("echo <fm> & co", 'name = "tiny"\n[fl]\nrounds = 3\n', mode="simulation", flower_run_id=9)
    for site in SITES:
        store.upsert_site(site, public_key_sha256="ab" * 32, node_id=hash(site) % 1000)
    t = 1_760_000_000.0
    for phase, metric in (("pretrain", "val_loss"), ("finetune", "val_ef_mae")):
        store.add_phase(run, phase, 3)
        store.set_phase_status(run, phase, "running")
        for rnd in (1, 2, 3):
            replied = 0
            for i, site in enumerate(SITES):
                failed = phase == "finetune" and rnd == 2 and site == "site02"
                train = {"train_loss": 1.0 / rnd + 0.1 * i, "num-examples": 40, "seconds": 3.5}
                evaluate = {"val_loss": 0.9 / rnd + 0.1 * i, metric: 5.0 / rnd + i}
                if dp:
                    train["epsilon"] = 0.5 * rnd + (3 if phase == "finetune" else 0) + 0.2 * i
                store.add_site_result(
                    run, phase, rnd, site, "train", status="failed" if failed else "ok",
                    metrics={} if failed else train,
                    num_examples=0 if failed else 40, bytes_down=4_000_000, bytes_up=0 if failed else 3_900_000,
                    reason="no reply within 600 s" if failed else "",
                )  # fmt: skip
                if not failed:
                    replied += 1
                    store.add_site_result(
                        run, phase, rnd, site, "evaluate", status="ok", metrics=evaluate,
                        num_examples=10, bytes_down=4_000_000, bytes_up=200,
                    )  # fmt: skip
            store.add_round(
                run, phase, rnd, started=t, finished=t + 12.5, sites_sampled=2, sites_replied=replied,
                train={"train_loss": 1.0 / rnd + 0.05}, evaluate={"val_loss": 0.9 / rnd, metric: 5.0 / rnd + 0.5},
                server={"server_ef_mae": 6.0 / rnd} if phase == "finetune" else {},
            )  # fmt: skip
            t += 20
            store.add_checkpoint(run, phase, rnd, f"/state/runs/{run}/{phase}-{rnd:03d}.safetensors", f"{rnd:064x}")
        store.set_phase_status(run, phase, "finished")
    store.add_event(run, "site-dropped", "site02 gave no reply in round 2 <b>", site="site02")
    store.add_event(run, "resume", "resumed from finetune round 1")
    store.set_run_status(run, "finished")
    return run


@pytest.fixture
def state(tmp_path: Path) -> tuple[Path, int]:
    folder = tmp_path / "state"
    with Store(store_url(folder)) as s:
        s.create_run("older run", "")
        run = _fill(s, dp=True)
    return folder, run


def test_runs_list_and_show(state: tuple[Path, int]) -> None:
    folder, run = state
    res = runner.invoke(app, ["runs", "list", "--state", str(folder)], env=ENV)
    assert res.exit_code == 0, res.output
    assert "echo <fm> & co" in res.output and "older run" in res.output and "finetune 3/3" in res.output
    assert res.output.index("echo <fm>") < res.output.index("older run")  # newest first
    res = runner.invoke(app, ["runs", "show", str(run), "--state", str(folder)], env=ENV)
    assert res.exit_code == 0, res.output
    out = res.output
    for text in ("pretrain", "finetune", "1/2", "val_ef_mae", "server_ef_mae", "no reply within 600 s", "epsilon"):
        assert text in out, text
    assert "site-dropped" in out and "<b>" in out and f"{3:064x}" in out and "finished" in out


@pytest.mark.slow
def test_report_writes_html_and_pngs(state: tuple[Path, int], tmp_path: Path) -> None:
    folder, run = state
    out = tmp_path / "report"
    res = runner.invoke(app, ["report", str(run), "--out", str(out), "--state", str(folder)], env=ENV)
    assert res.exit_code == 0, res.output
    page = (out / "index.html").read_text()
    assert "fedecho run 2: echo &lt;fm&gt; &amp; co" in page and "<fm>" not in page  # named, and escaped
    assert "&lt;b&gt;" in page and "<b>" not in page
    images = re.findall(r'<img src="([^"]+)"', page)
    assert set(images) == {"loss.png", "site_metrics.png", "server_metrics.png", "bytes.png", "privacy.png"}
    for name in images:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, name
    assert sorted(p.name for p in out.iterdir()) == sorted([*images, "index.html"])  # no temp files left
    assert "no reply within 600 s" in page and "val_ef_mae" in page and "rounds = 3" in page


def test_report_without_dp_or_rounds(tmp_path: Path) -> None:
    with Store(store_url(tmp_path / "state")) as s:
        run = _fill(s, dp=False)
        empty = s.create_run("just started", "")
        page = write_report(s, run, tmp_path / "a").read_text()
        assert "privacy.png" not in page and "loss.png" in page
        assert not any("epsilon" in t.header for t in run_tables(s, run))
        page = write_report(s, empty, tmp_path / "b").read_text()
        assert "<img" not in page and "no completed rounds" in page
        assert list((tmp_path / "b").iterdir()) == [tmp_path / "b" / "index.html"]


def test_unknown_run_and_missing_store_exit_2(state: tuple[Path, int], tmp_path: Path) -> None:
    folder, _ = state
    for args in (["runs", "show", "99"], ["report", "99", "--out", str(tmp_path / "r")]):
        res = runner.invoke(app, [*args, "--state", str(folder)], env=ENV)
        assert res.exit_code == 2 and "no run 99" in res.output, res.output
    assert not (tmp_path / "r").exists()
    missing = tmp_path / "nowhere"
    for args in (["runs", "list"], ["runs", "show", "1"], ["report", "1", "--out", str(tmp_path / "r")]):
        res = runner.invoke(app, [*args, "--state", str(missing)], env=ENV)
        assert res.exit_code == 2 and "no fedecho store" in res.output and "nowhere" in res.output, res.output
    assert not missing.exists()  # reading never creates a store
    res = runner.invoke(app, ["runs", "list", "--store", "nosuchdb://x"], env=ENV)
    assert res.exit_code == 2 and "cannot open the store" in res.output, res.output


@pytest.mark.parametrize("args", [["runs"], ["runs", "list"], ["runs", "show"], ["report"]])
def test_help(args: list[str]) -> None:
    res = runner.invoke(app, [*args, "--help"])
    assert res.exit_code == 0 and "Usage" in res.output


@pytest.mark.slow
def test_runs_list_and_show_never_import_the_plots(state: tuple[Path, int], tmp_path: Path) -> None:
    """The tables live apart from the plots: printing a run loads neither matplotlib nor the plotting module."""
    folder, run = state
    for args in (["runs", "list"], ["runs", "show", str(run)]):
        out, modules = cli_in_fresh_interpreter(*args, "--state", str(folder))
        assert "echo <fm> & co" in out and "finetune 3/3" in out, out  # it printed the real run
        assert "fedecho.report.tables" in modules
        drawn = sorted(m for m in modules if m.split(".")[0] == "matplotlib" or m == "fedecho.report.plots")
        assert not drawn, (args, drawn)
    out, modules = cli_in_fresh_interpreter("report", str(run), "--out", str(tmp_path / "r"), "--state", str(folder))
    assert (tmp_path / "r" / "loss.png").is_file(), out
    assert "matplotlib" in modules and "fedecho.report.plots" in modules  # the check can fail: report draws
