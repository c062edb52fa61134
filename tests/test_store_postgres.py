"""`fedecho sim --store postgresql://...`: a whole simulated federation keeps its run in a real PostgreSQL server
(the session's throwaway one), and the reading commands find it there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from builders import tiny_run
from fedecho.storage import Store
from fedecho.synth import synthesize

FEDECHO = Path(sys.executable).with_name("fedecho")


@pytest.mark.slow
def test_sim_keeps_its_run_in_postgresql(pg_url: str, tmp_path: Path) -> None:
    # enough training videos per site for a deployed site's default policy (10); too few validation videos, so
    # each site refuses evaluation, as a real one would: both kinds of reply reach the store
    synthesize(tmp_path / "data", videos=44, sites=2, fmt="echonet", seed=5, max_frames=16, progress=False)
    (tmp_path / "tiny.toml").write_text(tiny_run())
    env = {**os.environ, "FEDECHO_THREADS": "2", "COLUMNS": "200"}
    cmd = [
        str(FEDECHO), "sim", "--config", str(tmp_path / "tiny.toml"), "--data", str(tmp_path / "data"),
        "--state", str(tmp_path / "state"), "--store", pg_url,
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"store: {pg_url}" in res.stdout, res.stdout
    assert not (tmp_path / "state" / "fedecho.db").exists()  # the run went to PostgreSQL, not to a SQLite file
    with Store(pg_url, create=False) as store:
        [run] = store.list_runs()
        assert (run.name, run.mode, run.status) == ("tiny", "simulation", "finished")
        assert [(r.phase, r.round, r.sites_replied) for r in store.rounds(run.id)] == [
            ("pretrain", 1, 2), ("pretrain", 2, 2), ("finetune", 1, 2),
        ]  # fmt: skip
        results = store.site_results(run.id)
        assert {(r.site, r.kind, r.status) for r in results} == {
            (site, kind, status)
            for site in ("site01", "site02")
            for kind, status in (("train", "ok"), ("evaluate", "refused"))
        }
        assert all("min_videos" in r.reason for r in results if r.kind == "evaluate")
        assert len(store.checkpoints(run.id)) == 3 and all(Path(c.path).is_file() for c in store.checkpoints(run.id))
        assert {a.status for a in store.audit(run.id)} >= {"accepted"}
    res = subprocess.run(
        [str(FEDECHO), "runs", "show", str(run.id), "--store", pg_url], capture_output=True, text=True, timeout=120,
        env=env,
    )  # fmt: skip
    assert res.returncode == 0 and "tiny" in res.stdout and "finished" in res.stdout, res.stdout + res.stderr
