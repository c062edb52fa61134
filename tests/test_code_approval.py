"""Code approval with real SuperLink/SuperNode processes: the default fedecho bundle runs without approval; a
bundle carrying its own code is refused at both sites without that code ever being imported, recorded in
both audit logs and the server store; after `fedecho client approve` one site runs it, the other still refuses.

fedecho's coordinator refuses such a bundle itself before any site sees it; the sites' approval is what holds
against a coordinator that does not (someone who controls the SuperLink), so the test replaces the
coordinator's ServerApp runner with Flower's stock SuperExec, which runs whatever reaches the SuperLink."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_helpers import make_deployment
from typer.testing import CliRunner

from builders import tiny_run
from fedecho._proc import flower_bin, flower_env, spawn, stop
from fedecho.cli import app as cli
from fedecho.client.approval import app_dir_bundle
from fedecho.client.audit import SiteLog
from fedecho.server.submit import build_app_dir, flwr_run, submit_run
from fedecho.storage import Store
from fedecho.storage.store import store_url

pytestmark = pytest.mark.slow
runner = CliRunner()

MARKER_APP = """
from pathlib import Path

Path({marker!r}).write_text("bundle code was imported")
from fedecho.client.app import app as fedecho_app  # noqa: E402

app = fedecho_app  # a plain assignment: `flwr run` checks the component by reading the module, not importing it
"""


def test_sites_run_only_approved_bundles(federated_phantom: Path, tmp_path: Path) -> None:
    dep = make_deployment(tmp_path / "fed", round_timeout=120.0, min_sites=1)
    try:
        for name in ("site01", "site02"):
            dep.add_site(name, federated_phantom / name)
        dep.start_all()
        run_toml = tmp_path / "tiny.toml"
        run_toml.write_text(tiny_run(pretrain_rounds=1, finetune_rounds=0))
        lines: list[str] = []

        # 1. the code-less fedecho bundle for the installed version: no approval needed
        sub = submit_run(dep.server, run_toml, echo=lines.append)
        assert sub.returncode == 0 and sub.status == "finished:completed", "\n".join(lines)

        # a compromised coordinator from here on: Flower's own SuperExec takes the ServerApp tasks
        cfg, coordinator = dep.server, dep.coordinator
        assert coordinator is not None
        stop(coordinator.procs["runner"], grace=10)
        coordinator.procs["runner"] = spawn(
            [flower_bin("flower-superexec"), "--runtime-api-address", cfg.control, "--root-certificates",
             str(cfg.ca_cert), "--superexec-auth-secret-file", str(cfg.runtime_secret)],
            flower_env(cfg.flwr_home), cfg.logs / "stock-superexec.log",
        )  # fmt: skip

        # 2. a bundle with code of its own: refused at both sites, its module never imported
        marker = tmp_path / "imported.txt"
        app_dir = build_app_dir(dep.server, run_toml, clientapp="markerapp:app")
        (app_dir / "markerapp.py").write_text(MARKER_APP.format(marker=str(marker)))
        digest = app_dir_bundle(app_dir).sha256
        sub = flwr_run(dep.server, app_dir, echo=lines.append)
        assert sub.returncode != 0 and not marker.exists(), "\n".join(lines)

        # 3. site01 approves it (the hash is in its audit log and the refused bundle is kept for review)
        site01 = dep.sites["site01"]
        with SiteLog(site01.state) as log:
            refused = [r for r in log.rows() if r.decision == "refused"]
        assert refused and refused[-1].bundle_sha256 == digest and "not approved" in refused[-1].reason
        assert (site01.state / "bundles" / "refused" / f"{digest}.fab").is_file()
        res = runner.invoke(cli, ["client", "approve", digest, "--site", str(site01.path)])
        assert res.exit_code == 0, res.output
        sub = flwr_run(dep.server, app_dir, echo=lines.append)
        assert sub.returncode == 0 and sub.status == "finished:completed", "\n".join(lines)
        assert marker.exists()
    finally:
        dep.close()
        (tmp_path / "flwr-run.log").write_text("\n".join(lines))

    with Store(store_url(dep.server.state)) as store:
        runs = sorted(r.id for r in store.list_runs())
        assert len(runs) == 3
        first, refused_run, approved_run = runs
        status = {(r.run_id, r.site): r.status for r in store.site_results(first) if r.kind == "train"}
        assert status == {(first, "site01"): "ok", (first, "site02"): "ok"}
        audit = store.audit(refused_run)
        assert {(a.site, a.status) for a in audit} == {("site01", "refused"), ("site02", "refused")}
        assert all("not approved" in a.reason for a in audit)
        train = {a.site: a for a in store.audit(approved_run) if a.kind == "train"}
        assert train["site01"].status == "accepted" and train["site02"].status == "refused"
    with SiteLog(site01.state) as log:
        ran = [r for r in log.rows(approved_run) if r.message_type == "train"]
    assert ran and ran[0].decision == "allowed" and ran[0].bundle_sha256 == digest
    assert ran[0].update_sha256 == train["site01"].sha256
