"""`fedecho sim` on an existing Ray cluster, and its resource options checked before anything starts.

The slow test is a researcher's own cluster on one machine: a real Ray head (`ray start --head --block`, token
authentication on, every port Ray lets one choose picked free) that the test starts, owns and stops. The real CLI
runs two virtual sites on it with `--ray-address` and the researcher's token from the environment, and the
cluster's own GCS then says what ran there: fedecho's job, its site actors and their reservations, the
environment the sites got, and one head, still alive. Ray's questions go through subprocesses: a process keeps
the first Ray token it loads, and this one may also run private simulations with fedecho's own.

The fast tests run the CLI in this process where it fails before any Ray is touched (no GPU here, nothing at the
address), and the reservation arithmetic on made-up machines and clusters.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from builders import tiny_run
from fedecho.cli import app
from fedecho.sim.cluster import Node, SimResourceError, parse_ray_address, plan_sites
from fedecho.sim.loopback import free_port, kill_group
from fedecho.storage import Store
from fedecho.synth import synthesize

BIN = Path(sys.executable).parent
RAY_PROCESSES = ("gcs_server", "raylet")


@dataclass
class Cluster:
    """A Ray head this test started: `ray start --block` in its own process group."""

    address: str
    env: dict[str, str]  # the researcher's environment: the cluster's token
    head: subprocess.Popen[bytes]
    temp: Path


def _token_env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "COLUMNS": "200"}


@pytest.fixture()
def cluster() -> Iterator[Cluster]:
    """A one-node Ray cluster with token authentication, 2 CPUs and no GPU, as `ray start --head` makes it."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths live under it
    env = _token_env(secrets.token_hex(32))
    ports = [free_port() for _ in range(14)]
    port = ports[0]
    named = zip(
        ("--node-manager-port", "--object-manager-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
         "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"),
        ports[1:8],
        strict=True,
    )  # fmt: skip
    cmd = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard=false", "--disable-usage-stats",
        "--temp-dir", str(temp), "--worker-port-list", ",".join(map(str, ports[8:])), "--block",
        *[str(x) for pair in named for x in pair],
    ]  # fmt: skip
    log = open(temp / "head.log", "wb")  # noqa: SIM115 (closed below, after the head is gone)
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.time() + 120
        while not _answers(port) or not _cluster_state(address, env, check=False).get("nodes"):
            assert head.poll() is None, (temp / "head.log").read_text()
            assert time.time() < deadline, "the Ray head did not come up in 120 s:\n" + (temp / "head.log").read_text()
            time.sleep(0.5)
        yield Cluster(address, env, head, temp)
    finally:
        if head.poll() is None:  # the test failed before stopping it: as `ray stop` would, then harder
            os.killpg(head.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                head.wait(timeout=60)
        kill_group(head)
        for pid in _processes_of(temp):  # whatever of this cluster outlived its head
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


# Run with the cluster's token: the nodes, jobs and actors in the cluster's GCS, as JSON.
_ASK = """
import asyncio, json, sys
from ray._raylet import GcsClient

gcs = GcsClient(address=sys.argv[1])
nodes = [
    {"id": n.node_id.hex(), "alive": n.state == 0, "head": n.is_head_node, "cpus": n.resources_total.get("CPU", 0)}
    for n in gcs.get_all_node_info(timeout=10).values()
]
jobs = [
    {"id": j.job_id.hex(), "entrypoint": j.entrypoint, "dead": j.is_dead,
     "runtime_env": json.loads(j.config.runtime_env_info.serialized_runtime_env or "{}")}
    for j in gcs.get_all_job_info(timeout=10).values()
]
async def actor_table():
    return await gcs.async_get_all_actor_info(timeout=10)

actors = asyncio.run(actor_table())
actors = [
    {"job": a.job_id.hex(), "class": a.class_name, "resources": dict(a.required_resources)} for a in actors.values()
]
print(json.dumps({"nodes": nodes, "jobs": jobs, "actors": actors}))
"""


def _cluster_state(address: str, env: dict[str, str], check: bool = True) -> dict:
    res = subprocess.run([sys.executable, "-c", _ASK, address], env=env, capture_output=True, text=True, timeout=90)
    if res.returncode != 0:
        assert not check, res.stderr
        return {}
    return json.loads(res.stdout.splitlines()[-1])


def _ray_started_by(marker: str, seen: set[int], stop: threading.Event) -> None:
    """Every GCS server or raylet that carries `marker` in its environment: one that the process given the
    marker started (a cluster's own processes do not have it)."""
    import psutil

    while not stop.wait(0.5):
        for p in psutil.process_iter(["name"]):
            if p.info["name"] in RAY_PROCESSES:
                with contextlib.suppress(psutil.Error):
                    if p.environ().get("FEDECHO_TEST_MARKER") == marker:
                        seen.add(p.pid)


def _processes_of(temp: Path, name: str | None = None) -> list[int]:
    """Pids of the cluster's own processes (their command lines name its temp folder), or of those called `name`."""
    import psutil

    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if name in (None, p.info["name"]) and any(str(temp) in arg for arg in p.info["cmdline"] or []):
                found.append(p.pid)
    return found


@pytest.mark.slow
def test_sim_runs_its_sites_on_an_existing_cluster_and_leaves_it_running(cluster: Cluster, tmp_path: Path) -> None:
    # enough training videos per site for a deployed site's default policy (10), as `fedecho sim` enforces it
    synthesize(tmp_path / "data", videos=44, sites=2, fmt="echonet", seed=5, max_frames=16, progress=False)
    (tmp_path / "tiny.toml").write_text(tiny_run())
    before = _cluster_state(cluster.address, cluster.env)
    [head] = before["nodes"]
    assert head["alive"] and head["head"] and head["cpus"] == 2
    gcs = _processes_of(cluster.temp, "gcs_server")
    assert len(gcs) == 1

    marker = secrets.token_hex(8)
    started: set[int] = set()
    stop = threading.Event()
    watcher = threading.Thread(target=_ray_started_by, args=(marker, started, stop), daemon=True)
    watcher.start()
    cmd = [
        str(BIN / "fedecho"), "sim", "--config", str(tmp_path / "tiny.toml"), "--data", str(tmp_path / "data"),
        "--state", str(tmp_path / "state"), "--ray-address", cluster.address, "--parallel-sites", "1",
    ]  # fmt: skip
    env = {**cluster.env, "FEDECHO_TEST_MARKER": marker}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    finally:
        stop.set()
        watcher.join()
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"virtual sites on the Ray cluster at {cluster.address}" in res.stdout, res.stdout
    assert "1 of 2 train at once, each on 2 CPUs (2 torch threads) and no GPU" in res.stdout, res.stdout
    with Store(f"sqlite:///{tmp_path / 'state' / 'fedecho.db'}", create=False) as store:
        [run] = store.list_runs()
        assert (run.mode, run.status) == ("simulation", "finished")
        assert [(r.phase, r.round, r.sites_replied) for r in store.rounds(run.id)] == [
            ("pretrain", 1, 2), ("pretrain", 2, 2), ("finetune", 1, 2),
        ]  # fmt: skip
    assert not started, f"fedecho started Ray processes of its own: {sorted(started)}"

    after = _cluster_state(cluster.address, cluster.env)
    assert after["nodes"] == before["nodes"]  # the one head, alive: fedecho stopped nothing and added no node
    assert _processes_of(cluster.temp, "gcs_server") == gcs
    [job] = [j for j in after["jobs"] if "fedecho sim" in j["entrypoint"]]
    assert job["dead"]  # the driver left when the run ended
    assert set(job["runtime_env"]) == {"env_vars"}, job["runtime_env"]  # nothing to install, upload or unpack
    site_env = job["runtime_env"]["env_vars"]
    assert site_env["FEDECHO_THREADS"] == "2" and site_env["CUDA_VISIBLE_DEVICES"] == ""
    assert site_env["RAY_USAGE_STATS_ENABLED"] == "0" and site_env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert "RAY_AUTH_TOKEN" not in site_env and "PYTHONPATH" not in site_env
    sites = [a for a in after["actors"] if a["job"] == job["id"]]
    assert [a["class"] for a in sites] == ["ClientAppActor"]  # --parallel-sites 1: one site actor
    assert sites[0]["resources"] == {"CPU": 2.0}

    # a researcher without the cluster's token is told so, at once
    wrong = {**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    t0 = time.time()
    res = subprocess.run(cmd[:-2], capture_output=True, text=True, timeout=120, env=wrong)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"the Ray cluster at {cluster.address} refused this process's token" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and time.time() - t0 < 60
    assert _cluster_state(cluster.address, cluster.env)["nodes"] == before["nodes"]

    # the cluster is the researcher's to stop
    os.killpg(cluster.head.pid, signal.SIGTERM)
    cluster.head.wait(timeout=60)
    deadline = time.time() + 30
    while _processes_of(cluster.temp, "gcs_server") or _processes_of(cluster.temp, "raylet"):
        assert time.time() < deadline, "the cluster's processes outlived its head"
        time.sleep(0.5)
    assert not _answers(int(cluster.address.rpartition(":")[2]))


# ------------------------------------------------------------------ refused before anything starts

runner = CliRunner()


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this machine has a GPU")
def test_gpus_per_site_without_a_gpu_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "tiny.toml").write_text(tiny_run())
    args = ["sim", "--config", str(tmp_path / "tiny.toml"), "--state", str(tmp_path / "state"), "--gpus-per-site", "1"]
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 2, res.output
    assert "--gpus-per-site 1: this machine has no GPU (torch.cuda.device_count() is 0)" in res.output
    assert not (tmp_path / "state" / "phantom").exists()  # refused before the phantom was made


def test_a_ray_address_where_nothing_answers_fails_at_once(tmp_path: Path) -> None:
    (tmp_path / "tiny.toml").write_text(tiny_run())
    address = f"127.0.0.1:{free_port()}"
    args = [
        "sim",
        "--config",
        str(tmp_path / "tiny.toml"),
        "--state",
        str(tmp_path / "state"),
        "--ray-address",
        address,
    ]
    t0 = time.time()
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 2, res.output
    assert f"--ray-address {address}: nothing answers there" in res.output
    assert time.time() - t0 < 15
    assert not (tmp_path / "state").exists()


def test_a_ray_client_address_is_refused() -> None:
    with pytest.raises(SimResourceError, match=r"expected HOST:PORT"):
        parse_ray_address("ray://head:10001")


# ------------------------------------------------------------------ what each site reserves

HERE = [Node(2, 0)]
GPU_BOX = [Node(16, 1)]


def test_by_default_a_site_reserves_one_cpu_and_as_many_train_at_once_as_fit() -> None:
    plan = plan_sites(3, HERE, "this machine")
    assert (plan.cpus_per_site, plan.gpus_per_site, plan.parallel, plan.ray_cpus) == (1.0, 0.0, 2, 2)
    assert plan.site_env()["FEDECHO_THREADS"] == "1" and plan.site_env()["CUDA_VISIBLE_DEVICES"] == ""


def test_parallel_sites_share_the_cpus_and_the_gpus() -> None:
    plan = plan_sites(3, HERE, "this machine", parallel_sites=3)
    assert (plan.cpus_per_site, plan.parallel, plan.threads) == (0.6666, 3, 1)  # 3 x 0.6666 fits Ray's 2 CPUs
    plan = plan_sites(3, GPU_BOX, "this machine")
    assert (plan.cpus_per_site, plan.gpus_per_site, plan.parallel) == (1.0, 0.3333, 3)
    assert "CUDA_VISIBLE_DEVICES" not in plan.site_env()  # Ray sets it to the site's GPU
    plan = plan_sites(3, GPU_BOX, "this machine", parallel_sites=2)
    assert (plan.cpus_per_site, plan.gpus_per_site, plan.parallel, plan.site_env()["FEDECHO_THREADS"]) == (
        8.0, 0.5, 2, "8",
    )  # fmt: skip
    plan = plan_sites(20, [Node(16, 8)], "this machine", parallel_sites=4)
    assert (plan.cpus_per_site, plan.gpus_per_site, plan.parallel) == (4.0, 1.0, 4)  # at most one GPU a site
    plan = plan_sites(3, GPU_BOX, "this machine", gpus_per_site=0)
    assert plan.gpus_per_site == 0 and plan.site_env()["CUDA_VISIBLE_DEVICES"] == ""  # asked for the CPU: no GPU


def test_parallel_sites_cap_a_private_ray_and_notes_what_it_cannot() -> None:
    plan = plan_sites(3, [Node(16, 0)], "this machine", cpus_per_site=2, parallel_sites=2)
    assert (plan.ray_cpus, plan.capacity) == (4, 2)  # the private Ray gets the CPUs of 2 sites, not 8 sites' worth
    plan = plan_sites(2, HERE, "this machine", parallel_sites=5)
    assert plan.parallel == 2 and plan.notes == ("--parallel-sites 5 is more than the 2 sites: all 2 train at once",)
    nodes = [Node(4, 0), Node(4, 0)]
    plan = plan_sites(5, nodes, "the Ray cluster at h:1", "h:1", parallel_sites=3)
    assert plan.cpus_per_site == 2 and plan.ray_cpus is None and plan.capacity == 4  # no split of 8 CPUs fits 3
    assert plan.notes == ("the Ray cluster at h:1 holds 4 sites of 2 CPUs at once: up to 4 train at once",)
    plan = plan_sites(4, [Node(32, 2), Node(8, 0)], "the Ray cluster at h:1", "h:1")
    assert (plan.gpus_per_site, plan.capacity) == (0.5, 4)  # sites go only where the GPUs are


@pytest.mark.parametrize(
    ("nodes", "options", "message"),
    [
        (HERE, {"gpus_per_site": 1}, r"--gpus-per-site 1: this machine has no GPU"),
        (GPU_BOX, {"gpus_per_site": 2}, r"--gpus-per-site 2 is more than this machine has \(1 GPU\)"),
        (GPU_BOX, {"gpus_per_site": 1.5}, r"whole GPUs or a fraction of one"),
        ([Node(8, 1)] * 2, {"gpus_per_site": 2}, r"more than any node of the Ray cluster at h:1 has \(1 GPU\)"),
        (HERE, {"cpus_per_site": 4}, r"--cpus-per-site 4 is more than this machine has \(2 CPUs\)"),
        (GPU_BOX, {"gpus_per_site": 1, "parallel_sites": 2}, r"--parallel-sites 2: .* room for 1 site of 8 CPUs"),
        (HERE, {"cpus_per_site": 0.5, "parallel_sites": 3}, r"room for 4 sites at once; leave out --cpus-per-site"),
    ],
)
def test_reservations_nobody_can_hold_are_refused(nodes: list[Node], options: dict, message: str) -> None:
    where, address = ("the Ray cluster at h:1", "h:1") if len(nodes) > 1 else ("this machine", None)
    with pytest.raises(SimResourceError, match=message):
        plan_sites(3, nodes, where, address, **options)


_PRIVATE_AFTER_IMPORT = """
import ray  # imported first, with no token in the environment: Ray reads its token settings now
from fedecho.sim.cluster import plan_ray, ray_token, start_ray, stop_ray
with ray_token():
    start_ray(plan_ray(1))
    print("cpus", ray.cluster_resources().get("CPU"))
stop_ray()
"""


def test_a_private_ray_starts_whatever_imported_ray_before() -> None:
    """Ray reads RAY_AUTH_* once, when first imported: a process (a notebook, a test session) that imported it
    earlier must still present the private Ray's token to its own Ray."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    res = subprocess.run(
        [sys.executable, "-c", _PRIVATE_AFTER_IMPORT], env=env, capture_output=True, text=True, timeout=180
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "cpus " in res.stdout


def test_the_ray_internals_the_simulation_uses_are_those_it_was_checked_with() -> None:
    """The pinned Ray has every internal `sim/cluster.py` uses; a Ray without one is a clear error at start."""
    import ray

    from fedecho.sim.cluster import RAY_VERSION, ray_internals

    assert ray.__version__ == RAY_VERSION, "Ray changed: check sim/cluster.py's ray_internals against it"
    internals = ray_internals()
    assert callable(internals.find_node_ids) and hasattr(internals.GcsNodeInfo, "ALIVE")
