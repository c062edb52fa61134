"""Deployment on loopback with real processes: a SuperLink with TLS and SuperNode authentication, a
registered site that joins, an unregistered one that is refused, a run submitted as a code-less bundle,
`fedecho server status`, and `fedecho server start` stopping cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import Deployment, free_port, kill_group, make_deployment, marker_app, write_server_toml
from typer.testing import CliRunner

from fedecho._toml import ConfigFileError
from fedecho.cli import app
from fedecho.client.config import load_site_config
from fedecho.client.supernode import EXIT_ACTIVATION_REFUSED, SuperNodeError, wait_connected
from fedecho.security.certs import init_certs
from fedecho.server.config import load_server_config
from fedecho.server.submit import submit_run
from fedecho.server.superlink import health, list_nodes, read_registry, register_sites
from fedecho.storage import Store
from fedecho.storage.store import store_url

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One SuperLink (TLS + node auth) and one registered, connected site `alpha`."""
    root = tmp_path_factory.mktemp("deploy")
    toy = root / "toy"
    toy.mkdir()
    (toy / "deploy_toy.py").write_text(marker_app(root / "toy-ran"))  # importable on the coordinator
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(toy), old) if p)  # the toy app, for Flower's children
    dep = make_deployment(root, min_sites=1)
    try:
        dep.add_site("alpha", root / "no-data")
        dep.start_all()
        yield dep
    finally:
        dep.close()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def test_superlink_speaks_tls_with_the_federation_ca_only(deployment: Deployment, tmp_path: Path) -> None:
    cfg = deployment.server
    assert health(cfg)
    assert not health(cfg, insecure=True)  # no plain HTTP
    other = init_certs(tmp_path / "certs", cfg.address)
    foreign = load_server_config(write_server_toml(tmp_path, cfg.listen_port))
    assert foreign.ca_cert == other.ca_cert
    assert not health(foreign)  # a client trusting another CA refuses the handshake


def test_registered_site_joins(deployment: Deployment) -> None:
    node_id = deployment.node_ids["alpha"]
    assert read_registry(deployment.server)["alpha"]["node_id"] == str(node_id)
    nodes = {int(n["node-id"]): n for n in list_nodes(deployment.server)}
    assert nodes[node_id]["status"] == "online"
    again = register_sites(deployment.server)  # a restart re-registers: known keys are not an error
    assert [(r.name, r.status, r.node_id) for r in again] == [("alpha", "already registered", str(node_id))]


def test_unregistered_site_is_refused(deployment: Deployment) -> None:
    site = deployment.add_site("mallory", deployment.root / "no-data", register=False)
    proc = deployment.start_supernode("mallory", wait=False)
    with pytest.raises(SuperNodeError, match="refused"):
        wait_connected(proc, site.logs / "supernode.log", timeout=60)
    assert proc.wait(timeout=30) != 0
    assert f"Exit Code: {EXIT_ACTIVATION_REFUSED}" in deployment.supernode_log("mallory").read_text()
    statuses = {n["status"] for n in list_nodes(deployment.server)}
    assert statuses == {"online"}  # only alpha


def test_coordinator_runs_only_the_code_less_fedecho_bundle(deployment: Deployment, tmp_path: Path) -> None:
    """A code-less bundle naming other components (importable on the coordinator) is refused before anything
    of it is installed or imported, although it came from the coordinator's own `fedecho server run` path."""
    run_toml = tmp_path / "toy.toml"
    run_toml.write_text('[run]\nname = "toy"\n')
    marker = deployment.root / "toy-ran"
    lines: list[str] = []
    sub = submit_run(
        deployment.server, run_toml, echo=lines.append, serverapp="deploy_toy:server", clientapp="deploy_toy:client"
    )
    out = "\n".join(lines)
    assert sorted(p.name for p in sub.app_dir.iterdir()) == ["README.md", "pyproject.toml"]  # config, no code
    assert sub.flower_run_id and sub.status == "finished:failed" and sub.returncode != 0, out
    assert "not fedecho's code-less submission" in out and "deploy_toy:server" in out, out
    assert "Traceback" not in out
    assert not marker.exists()
    with Store(store_url(deployment.server.state)) as store:
        rows = [r for r in store.access() if r.kind == "bundle"]
    assert rows and rows[-1].decision == "refused" and "deploy_toy:server" in rows[-1].reason


def test_status_cli_shows_superlink_sites_and_runs(deployment: Deployment) -> None:
    res = runner.invoke(app, ["server", "status", "--server", str(deployment.server.path)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "SuperLink up" in res.output and "TLS + node auth" in res.output
    assert "alpha" in res.output and "online" in res.output and str(deployment.node_ids["alpha"]) in res.output


def test_server_start_registers_and_stops_cleanly_on_ctrl_c(deployment: Deployment, tmp_path: Path) -> None:
    """`fedecho server start` as an operator runs it: foreground, keys registered, Ctrl-C stops everything."""
    port = free_port()
    (tmp_path / "certs").mkdir()
    for f in ("ca.pem", "server.pem", "server.key"):
        (tmp_path / "certs" / f).write_bytes((deployment.server.certs / f).read_bytes())
    os.chmod(tmp_path / "certs" / "server.key", 0o600)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "alpha.pub").write_bytes((deployment.server.keys / "alpha.pub").read_bytes())
    config = write_server_toml(tmp_path, port)
    out = tmp_path / "out.txt"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from fedecho.cli import main; main()", "server", "start", "--config", str(config)],
            stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "SuperLink ready" not in out.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        text = out.read_text()
        assert "SuperLink ready" in text, text
        assert "alpha" in text and "registered" in text
        cfg = load_server_config(config)
        pid = int(__import__("json").loads((cfg.state / "superlink.pid").read_text())["pid"])
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0, out.read_text()
        assert "SuperLink stopped" in out.read_text()
        assert not (cfg.state / "superlink.pid").exists()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert (cfg.state / "superlink.db").is_file()  # persistent state
    finally:
        kill_group(proc)


def test_insecure_is_for_loopback_only(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('[server]\naddress = "superlink.example.org:9093"\nlisten = "0.0.0.0:9093"\n')
    res = runner.invoke(app, ["server", "start", "--config", str(config), "--insecure"])
    assert res.exit_code == 2 and "refused" in res.output
    site = tmp_path / "site.toml"
    site.write_text(
        '[site]\nname = "s"\ndata = "d"\ncache = "c"\nstate = "st"\n[superlink]\naddress = "10.0.0.1:9093"\n'
    )
    res = runner.invoke(app, ["client", "start", "--site", str(site), "--insecure"])
    assert res.exit_code == 2 and "refused" in res.output


def test_config_errors_name_file_and_field(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    for body, expect in [
        ('[server]\naddress = "h:1"\nround_timeout = "soon"\n', "[server].round_timeout must be a number"),
        ('[server]\naddress = "h:1"\nmin_site = 2\n', "unknown field(s) min_site"),
        ('[server]\nlisten = "h:1"\n', "missing the required field 'address'"),
        ('[server]\naddress = "h:99999"\n', "[server].address bad port"),
        ("[sever]\n", "unknown section [sever] (did you mean [server]?)"),
        ('[server]\naddress = "h:1"\ncontrol = "10.0.0.5:9193"\n', "[server].control must be a loopback address"),
        ('[server]\naddress = "h:1"\nlisten = "0.0.0.0:9093"\ncontrol = "127.0.0.1:9093"\n', "is the public front's"),
    ]:
        config.write_text(body)
        with pytest.raises(ConfigFileError) as e:
            load_server_config(config)
        assert str(config) in str(e.value) and expect in str(e.value), str(e.value)
    site = tmp_path / "site.toml"
    for body, expect in [
        ('[site]\nname = "s"\ncache = "c"\nstate = "s"\n', "missing the required field 'data'"),
        ('[site]\nname = "s"\ndata = "d"\ncache = "c"\nstate = "s"\ndevice = "tpu"\n', "[site].device must be one of"),
        (
            '[site]\nname = "s"\ndata = "d"\ncache = "c"\nstate = "s"\nthreads = 0\n',
            "[site].threads must be at least 1",
        ),
    ]:
        site.write_text(body)
        with pytest.raises(ConfigFileError) as e:
            load_site_config(site)
        assert str(site) in str(e.value) and expect in str(e.value), str(e.value)
    site.write_text('[site]\nname = "s"\ndata = "d"\ncache = "c"\nstate = "st"\n')
    cfg = load_site_config(site)
    assert cfg.data == tmp_path / "d" and cfg.threads == 2 and cfg.device == "auto"  # relative to the file


@pytest.mark.parametrize(
    "args", [["server"], ["server", "start"], ["server", "run"], ["server", "resume"], ["server", "status"],
             ["server", "register"], ["server", "unregister"], ["client"], ["client", "start"]],
)  # fmt: skip
def test_help(args: list[str]) -> None:
    assert runner.invoke(app, [*args, "--help"]).exit_code == 0


def test_run_without_a_superlink_says_how_to_start_one(tmp_path: Path) -> None:
    config = write_server_toml(tmp_path, free_port())
    run_toml = tmp_path / "r.toml"
    run_toml.write_text('[run]\nname = "x"\n')
    wide = {"COLUMNS": "300"}
    res = runner.invoke(app, ["server", "run", "--config", str(run_toml), "--server", str(config)], env=wide)
    assert res.exit_code == 2 and "fedecho server start" in res.output
    res = runner.invoke(app, ["server", "status", "--server", str(config)], env=wide)
    assert res.exit_code == 1 and "down" in res.output


def test_resume_takes_the_run_file_from_the_store(tmp_path: Path) -> None:
    from fedecho.server.submit import build_app_dir
    from fedecho.storage import Store
    from fedecho.storage.store import store_url

    cfg = load_server_config(write_server_toml(tmp_path, free_port()))
    with pytest.raises(ValueError, match="cannot resume run 7"):
        build_app_dir(cfg, None, resume=7)
    with Store(store_url(cfg.state)) as store:
        run_id = store.create_run("x", '[run]\nname = "x"\n', mode="deployment")
    app_dir = build_app_dir(cfg, None, resume=run_id)
    text = (app_dir / "pyproject.toml").read_text()
    assert f'"fedecho-resume" = {run_id}' in text or f"fedecho-resume = {run_id}" in text
    assert 'name = \\"x\\"' in text or 'name = "x"' in text
