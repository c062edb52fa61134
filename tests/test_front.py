"""Nobody takes the federation over from the network: an outsider against a real coordinator on loopback.

The coordinator runs as `fedecho server start` runs it (SuperLink on 127.0.0.1 with TLS and SuperNode
authentication, its ServerApp runner, the nginx front on PUBLIC_HOST, the address the sites dial), with two
registered sites connected through the front. The outsider holds what every site holds and anyone can read
from the TLS handshake: the federation's CA certificate and the front's address. It runs Flower's own CLI
from a Flower home of its own, with no access to the coordinator's files.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import Deployment, free_port, kill_group, marker_app, running, write_server_toml
from typer.testing import CliRunner

from builders import tiny_run
from fedecho._proc import flower_bin, flower_env, tail, wait_for
from fedecho.cli import app
from fedecho.security.certs import create_site_keys, init_certs, split_host_port
from fedecho.server.config import load_server_config
from fedecho.server.front import folder, start_front, stop_stale_front, sync_refusals
from fedecho.server.submit import flwr_run
from fedecho.server.superlink import list_nodes, list_runs
from fedecho.sim.loopback import PUBLIC_HOST
from fedecho.storage import Store
from fedecho.storage.store import store_url

pytestmark = pytest.mark.slow
runner = CliRunner()


def code_app(root: Path, marker: Path) -> Path:
    """A Flower app folder with a module of its own (what `flwr new` would give an attacker)."""
    folder = root / "code-app"
    folder.mkdir(parents=True)
    (folder / "outsider_app.py").write_text(marker_app(marker))
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "outsider-app"\nversion = "1.0.0"\ndependencies = []\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n'
        '[tool.flwr.app]\npublisher = "outsider"\n'
        '[tool.flwr.app.components]\nserverapp = "outsider_app:server"\nclientapp = "outsider_app:client"\n'
        "[tool.flwr.app.config]\n"
    )
    return folder


class Outsider:
    """Flower's CLI with a Flower home that knows only the front's address and the CA certificate."""

    def __init__(self, root: Path, dep: Deployment) -> None:
        self.home = root / "outsider-flwr"
        self.home.mkdir(parents=True)
        ca = self.home / "ca.pem"
        ca.write_bytes(dep.server.ca_cert.read_bytes())
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "outside"\n'
            f'[superlink.outside]\naddress = "{dep.server.address}"\nroot-certificates = "{ca}"\n'
        )
        self.keys = create_site_keys(root / "outsider-keys", "outsider")

    def flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [flower_bin("flwr"), *args], env=flower_env(self.home), cwd=self.home, capture_output=True, text=True,
            timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip


def _failed(res: subprocess.CompletedProcess[str]) -> bool:
    """Flower's CLI says no: a non-zero exit, or a JSON answer without success."""
    if res.returncode != 0:
        return True
    start = res.stdout.find("{")
    try:
        return not json.loads(res.stdout[start:]).get("success", False)
    except (json.JSONDecodeError, ValueError):
        return True


def _get(url: str, ca: Path, method: str = "GET") -> int:
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@pytest.fixture(scope="module")
def federation(federated_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    sites = {name: federated_phantom / name for name in ("site01", "site02")}
    with running(tmp_path_factory.mktemp("front"), sites, round_timeout=120.0, min_sites=2) as dep:
        yield dep


def test_the_network_sees_the_fleet_api_only(federation: Deployment, tmp_path: Path) -> None:
    cfg = federation.server
    front = f"https://{cfg.address}"
    assert cfg.address.startswith(PUBLIC_HOST) and cfg.control.startswith("127.0.0.1:")
    assert _get(f"{front}/health", cfg.ca_cert) == 200
    for path in ("/docs", "/openapi.json", "/v1/control/list-runs", "/v1/runtime/acquire-task", "/v1/fleet/nope"):
        assert _get(f"{front}{path}", cfg.ca_cert, "POST") == 403, path
    assert _get(f"{front}/v1/fleet/register-node", cfg.ca_cert, "POST") == 403  # a site joins only if registered
    assert _get(f"{front}/v1/fleet/pull-messages", cfg.ca_cert, "GET") == 403  # the wrong method
    # a path read one way by the allow-list and another by Flower's router: nginx matches the normalised path
    # and passes on only that, so these are refused, or reach the Fleet route they normalise to
    for path in ("/v1/fleet/pull-messages/../../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs",
                 "/v1/fleet/pull-messages%2f..%2f..%2fcontrol%2flist-runs", "//v1/control/list-runs"):  # fmt: skip
        assert _get(f"{front}{path}", cfg.ca_cert, "POST") == 403, path
    assert _get(f"{front}/v1/control/../fleet/get-run", cfg.ca_cert, "POST") not in (200, 403)  # Flower: bad request
    # the SuperLink itself does not listen on the coordinator's network address, on its own port or any other
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection((PUBLIC_HOST, split_host_port(cfg.control)[1])),
    ):
        pass


def test_an_outsider_cannot_list_register_stop_or_run(federation: Deployment, tmp_path: Path) -> None:
    cfg = federation.server
    nodes_before = sorted(str(n["node-id"]) for n in list_nodes(cfg))
    runs_before = sorted(str(r["run-id"]) for r in list_runs(cfg))
    assert len(nodes_before) == 2
    outsider = Outsider(tmp_path, federation)
    marker = tmp_path / "outsider-was-here"

    listed = outsider.flwr("ls", "outside", "--format", "json")
    assert _failed(listed) and "run-id" not in listed.stdout, listed.stdout + listed.stderr
    registered = outsider.flwr("supernode", "register", str(outsider.keys.public_key), "outside", "--format", "json")
    assert _failed(registered), registered.stdout + registered.stderr
    stopped = outsider.flwr("stop", runs_before[0] if runs_before else "1", "outside", "--format", "json")
    assert _failed(stopped), stopped.stdout + stopped.stderr
    ran = outsider.flwr("run", str(code_app(tmp_path, marker)), "outside", "--format", "json")
    assert _failed(ran), ran.stdout + ran.stderr

    # no trace in the federation: no node, no run, no file
    assert sorted(str(n["node-id"]) for n in list_nodes(cfg)) == nodes_before
    assert sorted(str(r["run-id"]) for r in list_runs(cfg)) == runs_before
    assert not marker.exists()
    # every attempt is in the server's access audit log, with the address it came from
    sync_refusals(cfg)  # the runner copies them every second; do not wait for it
    with Store(store_url(cfg.state)) as store:
        refused = [r for r in store.access() if r.decision == "refused" and r.kind == "control"]
    requests = {r.request for r in refused}
    assert "POST /v1/control/register-node" in requests, requests
    assert {"POST /v1/control/list-runs", "POST /v1/control/stop-run"} <= requests, requests
    assert any(r.startswith("POST /v1/control/") and "run" in r for r in requests - {"POST /v1/control/list-runs"})
    assert all(r.source.startswith("127.") for r in refused)  # the peer address as the front saw it
    reg = next(r for r in refused if r.request == "POST /v1/control/register-node")
    assert "coordinator's act" in reg.reason


def test_a_code_bundle_from_the_coordinator_itself_is_refused(federation: Deployment, tmp_path: Path) -> None:
    """Defence in depth: the loopback Control API accepts the run, the coordinator's runner refuses its code."""
    cfg = federation.server
    marker = tmp_path / "bundle-code-ran"
    lines: list[str] = []
    sub = flwr_run(cfg, code_app(tmp_path, marker), echo=lines.append)
    out = "\n".join(lines)
    assert sub.flower_run_id and sub.status == "finished:failed", out
    assert "not fedecho's code-less submission" in out and "outsider_app.py" in out, out
    assert not marker.exists()
    with Store(store_url(cfg.state)) as store:
        bundles = [r for r in store.access() if r.kind == "bundle"]
    assert bundles and bundles[-1].decision == "refused" and "outsider_app" in bundles[-1].reason


def test_sites_train_through_the_front_and_the_coordinator_works(federation: Deployment, tmp_path: Path) -> None:
    cfg = federation.server
    run_toml = tmp_path / "tiny.toml"
    run_toml.write_text(tiny_run(wire="int8", pretrain_rounds=1, finetune_rounds=1))
    wide = {"COLUMNS": "200"}
    res = runner.invoke(app, ["server", "run", "--config", str(run_toml), "--server", str(cfg.path)], env=wide)
    assert res.exit_code == 0, res.output
    assert "pretrain round 1" in res.output and "finetune round 1" in res.output, res.output
    with Store(store_url(cfg.state)) as store:
        run = store.list_runs()[-1]
        assert run.status == "finished"
        assert {(r.phase, r.sites_replied) for r in store.rounds(run.id)} == {("pretrain", 2), ("finetune", 2)}
        assert {s.site for s in store.site_results(run.id)} == {"site01", "site02"}
    res = runner.invoke(app, ["server", "status", "--server", str(cfg.path)], env=wide)
    assert res.exit_code == 0, res.output
    assert "public front up" in res.output and "finished:completed" in res.output
    assert res.output.count("online") >= 2 and "site01" in res.output and "site02" in res.output
    # both run ids on one row: fedecho's (with its name and status from the store) and Flower's
    assert re.search(rf"\b{run.id}\s.*tiny\s.*finished\s.*{run.flower_run_id}\s.*finished:completed", res.output)
    res = runner.invoke(app, ["audit", "--state", str(cfg.state), "--access"], env=wide)
    assert res.exit_code == 0 and "register-node" in res.output, res.output
    res = runner.invoke(app, ["runs", "show", str(run.id), "--server", str(cfg.path)], env=wide)
    assert res.exit_code == 0 and "tiny" in res.output and str(run.flower_run_id) in res.output, res.output
    # resuming the finished run submits nothing
    flower_runs = len(list_runs(cfg))
    res = runner.invoke(app, ["server", "resume", str(run.id), "--server", str(cfg.path)], env=wide)
    assert res.exit_code == 0 and f"run {run.id} is already finished; nothing to resume" in res.output, res.output
    assert len(list_runs(cfg)) == flower_runs
    # no runner the run started is left unreaped, at the coordinator or at a site
    assert federation.coordinator is not None
    procs = [*federation.coordinator.procs.values(), *federation.supernodes.values()]
    assert wait_for(lambda: not _zombies([p.pid for p in procs]), 15.0), _zombies([p.pid for p in procs])


def test_flowers_cli_as_documented_talks_to_the_coordinator(federation: Deployment, tmp_path: Path) -> None:
    """`fedecho server flwr -- ls`, and `flwr ls` with FLWR_HOME=STATE/flwr, list the coordinator's runs over TLS
    and never start Flower's own local SuperLink (what plain `flwr ls` does with ~/.flwr)."""
    cfg = federation.server
    runs = {str(r["run-id"]) for r in list_runs(cfg)}
    before = _local_superlinks()
    fedecho = str(Path(sys.executable).parent / "fedecho")
    wrapped = subprocess.run(
        [fedecho, "server", "flwr", "--server", str(cfg.path), "--", "ls", "--format", "json"], cwd=tmp_path,
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    by_hand = subprocess.run(
        [flower_bin("flwr"), "ls", "--format", "json"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "FLWR_HOME": str(cfg.flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
             "FLWR_DISABLE_UPDATE_CHECK": "1"}, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    for res in (wrapped, by_hand):
        assert res.returncode == 0 and not _failed(res), res.stdout + res.stderr
        listed = json.loads(res.stdout[res.stdout.find("{") :])["runs"]
        assert {str(r["run-id"]) for r in listed} == runs, (listed, runs)  # the earlier tests' runs
    assert _local_superlinks() <= before
    assert not (cfg.flwr_home / "local-superlink").exists()


def _zombies(roots: list[int]) -> list[str]:
    """Exited but unreaped processes (state Z) among the descendants of roots, as 'pid (name) of parent'."""
    parent: dict[int, int] = {}
    state: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()
            parent[int(entry.name)], state[int(entry.name)] = int(fields[1]), fields[0]
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        for child in (c for c, p in parent.items() if p == pid):
            if state[child] == "Z":
                found.append(f"{child} of {pid}")
            todo.append(child)
    return found


def _local_superlinks() -> set[int]:
    """Flower's own local SuperLinks (`flower-superlink --insecure --simulation`, what `flwr` starts for its
    default `local` connection), by pid."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if any(a.endswith(b"flower-superlink") for a in argv) and b"--simulation" in argv:
            found.add(int(entry.name))
    return found


def test_only_the_coordinator_adds_or_removes_a_site(federation: Deployment, tmp_path: Path) -> None:
    cfg = federation.server
    before = {str(n["node-id"]) for n in list_nodes(cfg)}
    keys = create_site_keys(tmp_path / "site03", "site03")
    (cfg.keys / "site03.pub").write_bytes(keys.public_key.read_bytes())
    wide = {"COLUMNS": "200"}
    res = runner.invoke(app, ["server", "register", "--server", str(cfg.path)], env=wide)
    assert res.exit_code == 0 and "site03" in res.output, res.output
    added = {str(n["node-id"]) for n in list_nodes(cfg)} - before
    assert len(added) == 1
    res = runner.invoke(app, ["server", "unregister", "site03", "--server", str(cfg.path)], env=wide)
    assert res.exit_code == 0 and "site03 removed" in res.output, res.output
    assert {str(n["node-id"]) for n in list_nodes(cfg) if n.get("status") != "unregistered"} == before
    assert not (cfg.keys / "site03.pub").exists() and (cfg.keys / "removed" / "site03.pub").exists()
    res = runner.invoke(app, ["server", "unregister", "nobody", "--server", str(cfg.path)], env=wide)
    assert res.exit_code == 2 and "no site 'nobody'" in res.output
    with Store(store_url(cfg.state)) as store:
        regs = [r for r in store.access() if r.kind == "registration" and r.request == "site site03"]
    assert [r.reason.split(" ")[0] for r in regs] == ["registered", "removed"]


def test_a_front_left_behind_by_a_killed_coordinator_is_ended_at_the_next_start(tmp_path: Path) -> None:
    port = free_port(PUBLIC_HOST)
    init_certs(tmp_path / "certs", f"{PUBLIC_HOST}:{port}")
    cfg = load_server_config(write_server_toml(tmp_path, port))
    orphan = start_front(cfg)  # as if its `fedecho server start` had been killed with SIGKILL
    try:
        pid_file = folder(cfg) / "nginx.pid"
        assert wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 20.0), tail(cfg.logs / "front.log")
        other = tmp_path / "other"  # another coordinator's front on this machine is not touched
        other.mkdir()
        stop_stale_front(load_server_config(write_server_toml(other, free_port(PUBLIC_HOST))))
        assert orphan.poll() is None
        stop_stale_front(cfg)
        assert orphan.wait(timeout=20) is not None
    finally:
        kill_group(orphan)
