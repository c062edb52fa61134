"""Resume across a coordinator restart, with real processes on loopback: `fedecho server start` runs a SuperLink
(TLS + node authentication) with two SuperNodes, and `fedecho server run` submits a 3-round FedAdam pre-training
run. As soon as the store records round 1, the coordinator gets Ctrl-C (which must also end the ServerApp), is
started again on the same state folder, the SuperNodes reconnect by themselves, and `fedecho server resume`
finishes the run. Every round's checkpoint (global model and FedAdam's moments) and every round's losses must
equal those of an uninterrupted run of the same run file in Flower's simulation engine, bit for bit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from deploy_helpers import Deployment, kill_group, make_deployment
from safetensors.torch import load_file

from builders import TINY_DATA, tiny_run
from fedecho._proc import spawn, stop, tail, wait_for
from fedecho.fl.config import parse_run_config
from fedecho.server.checkpoints import strategy_path
from fedecho.server.superlink import SuperLinkError, list_nodes
from fedecho.sim.run import simulate
from fedecho.storage import Store
from fedecho.storage.store import StoreMissing, store_url

SITES = ("site01", "site02")
RUN_TOML = tiny_run(strategy="fedadam", pretrain_rounds=3, finetune_rounds=0, freeze=False)


def _flower_pids(flwr_home: Path) -> list[int]:
    """Live processes whose FLWR_HOME is flwr_home: the SuperLink starts its SuperExec and ServerApps in sessions
    of their own, so killing the SuperLink's process group does not reach them; their environment does."""
    marker = f"FLWR_HOME={flwr_home.resolve()}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
    return pids


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _leftovers(dep: Deployment) -> list[int]:
    homes = [dep.server.flwr_home, *(site.flwr_home for site in dep.sites.values())]
    return [pid for home in homes for pid in _flower_pids(home)]


@dataclass
class Federation:
    """The deployment, with its coordinator run as an operator runs it: `fedecho server start`, Ctrl-C to stop."""

    dep: Deployment
    log: Path
    commands: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cli(self, *args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
        """A `fedecho` command in a session of its own (as from a terminal of its own), output appended to log."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
        with open(log or self.log, "ab") as out:
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "fedecho"), *args], cwd=self.dep.root, env=env, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self.commands.append(proc)
        return proc

    def start_server(self) -> subprocess.Popen[bytes]:
        """`fedecho server start`; returns once it reports the SuperLink ready (sites registered)."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        proc = self.cli("server", "start", "--config", str(self.dep.server.path), "--quiet")

        def ready() -> bool:
            said = self.log.read_bytes()[offset:].decode(errors="replace")
            return proc.poll() is not None or "SuperLink ready" in said

        assert wait_for(ready, 120.0) and proc.poll() is None, tail(self.log, 40)
        return proc

    def ctrl_c(self, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> int | None:
        """Ctrl-C in the command's terminal (SIGINT to its process group); its exit code, None if it hung."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Ctrl-C for every command still running (a coordinator then stops its SuperLink), then kill what is left."""
        for proc in reversed(self.commands):
            if proc.poll() is None:
                self.ctrl_c(proc, timeout=40.0)
            kill_group(proc)
        self.dep.close()
        wait_for(lambda: not _leftovers(self.dep), 15.0)
        _kill_pids(_leftovers(self.dep))  # anything Flower detached from the groups killed above


@pytest.fixture()
def federation(federated_phantom: Path, tmp_path: Path) -> Iterator[Federation]:
    """Coordinator up, both SuperNodes connected; min_sites = 2, so every round waits for both sites."""
    dep = make_deployment(tmp_path / "fed", round_timeout=300.0, min_sites=2)
    fed = Federation(dep, tmp_path / "coordinator.log")
    try:
        for name in SITES:
            dep.add_site(name, federated_phantom / name)  # site.toml with threads = 1, as the simulation's sites
        fed.start_server()
        for name in SITES:
            dep.start_supernode(name)
        yield fed
    finally:
        fed.close()


def _open_store(dep: Deployment) -> Store | None:
    """The coordinator's store once the ServerApp has created it (in the state folder, which the submission
    passes to the ServerApp as `fedecho-state`)."""
    try:
        return Store(store_url(dep.server.state), create=False)
    except StoreMissing:
        return None


def _wait_first_round(dep: Deployment, cli: subprocess.Popen[bytes], log: Path, timeout: float = 400.0) -> int:
    """The fedecho run id, once the store holds its round 1 (the only run in this store)."""
    deadline = time.monotonic() + timeout
    store = None
    while time.monotonic() < deadline:
        assert cli.poll() is None, f"`fedecho server run` ended early ({cli.returncode}):\n{tail(log, 60)}"
        store = store or _open_store(dep)
        if store is not None:
            runs = store.list_runs()
            if runs and store.rounds(runs[0].id):
                store.close()
                return runs[0].id
        time.sleep(0.2)
    raise AssertionError(f"round 1 not recorded within {timeout:.0f} s:\n{tail(log, 60)}")


def _online(dep: Deployment) -> int:
    try:
        return sum(1 for n in list_nodes(dep.server) if n.get("status") == "online")
    except SuperLinkError:
        return 0


def _checkpoints(store: Store, run_id: int) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    """(phase, round) -> the global model's tensors and the strategy state's (prefixed `strategy/`)."""
    out = {}
    for c in store.checkpoints(run_id):
        strategy = load_file(strategy_path(Path(c.path)))
        out[(c.phase, c.round)] = {**load_file(c.path), **{f"strategy/{k}": v for k, v in strategy.items()}}
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_stop_ends_what_the_process_started_in_sessions_of_its_own(tmp_path: Path) -> None:
    """The SuperLink starts its SuperExec (and that its ServerApps) with start_new_session, out of reach of a
    group signal; a ServerApp blocked in Flower's retry loop then ignores its parent monitor's SIGINT."""
    pid_file = tmp_path / "child.pid"
    child_code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(300)"
    parent_code = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {child_code!r}], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(300)\n"
    )
    proc = spawn([sys.executable, "-c", parent_code], dict(os.environ), tmp_path / "parent.log")
    child = 0
    try:
        assert wait_for(lambda: pid_file.exists() and pid_file.read_text(), 60.0), tail(tmp_path / "parent.log")
        child = int(pid_file.read_text())
        assert _running(child)
        stop(proc, grace=5.0)
        assert proc.poll() is not None and not _running(child)
    finally:
        kill_group(proc)
        if child:
            _kill_pids([child])


@pytest.mark.slow
def test_deployed_run_resumed_after_a_coordinator_restart_equals_an_uninterrupted_one(
    federation: Federation, federated_phantom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed, dep = federation, federation.dep
    run_toml = tmp_path / "tiny.toml"
    run_toml.write_text(RUN_TOML)
    server_toml = str(dep.server.path)
    coordinator = fed.commands[0]

    # 1. submit with the real CLI, which streams the run's log (in the background: it blocks until the run ends)
    run_log = tmp_path / "server-run.log"
    submit = fed.cli("server", "run", "--config", str(run_toml), "--server", server_toml, log=run_log)
    run_id = _wait_first_round(dep, submit, run_log)

    # 2. stop the coordinator mid-run (round 2 under way): Ctrl-C at `fedecho server start`
    assert fed.ctrl_c(coordinator) == 0, tail(fed.log, 40)
    assert wait_for(lambda: not _flower_pids(dep.server.flwr_home), 10.0), (
        "the SuperLink's SuperExec or ServerApp outlived it", _flower_pids(dep.server.flwr_home)
    )  # fmt: skip
    assert wait_for(lambda: submit.poll() is not None, 60.0), tail(run_log, 40)
    assert submit.returncode != 0, tail(run_log, 40)  # the stream broke: the run did not finish
    with Store(store_url(dep.server.state), create=False) as store:
        stopped = store.get_run(run_id)
        assert stopped.status != "finished" and [r.round for r in store.rounds(run_id)] == [1], stopped

    # 3. the same coordinator again (same state folder: store, checkpoints, superlink.db with the sites' keys);
    # the SuperNodes kept running and reconnect by themselves
    fed.start_server()
    assert wait_for(lambda: _online(dep) == len(SITES), 120.0), "\n".join(tail(dep.supernode_log(s), 20) for s in SITES)
    assert all(p.poll() is None for p in dep.supernodes.values())
    resume_log = tmp_path / "server-resume.log"
    resume = fed.cli("server", "resume", str(run_id), "--server", server_toml, log=resume_log)
    try:
        assert resume.wait(timeout=600) == 0, tail(resume_log, 60)
    except subprocess.TimeoutExpired:
        raise AssertionError(tail(resume_log, 60)) from None
    assert "finished:completed" in resume_log.read_text(), tail(resume_log, 60)

    # 4. the uninterrupted reference: the same run file in the simulation, each virtual site on 1 thread as the
    # deployed sites (threads = 1). Same seeds (run, phase, round), same data, replies aggregated in site order:
    # the deployment must equal it exactly, not within a tolerance.
    threads = torch.get_num_threads()
    monkeypatch.setenv("FEDECHO_THREADS", "1")  # simulate() sets it; monkeypatch restores it
    try:
        whole = simulate(
            parse_run_config(RUN_TOML, "tiny"), federated_phantom, tmp_path / "sim", cpus_per_site=1.0,
            default_policy=TINY_DATA,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)  # the simulated ServerApp ran in this process

    with Store(store_url(dep.server.state), create=False) as store, Store(store_url(tmp_path / "sim")) as ref:
        run = store.get_run(run_id)
        assert run.status == "finished" and run.mode == "deployment"
        assert [r.round for r in store.rounds(run_id)] == [1, 2, 3]
        assert any(e.kind == "resume" for e in store.events(run_id))
        ours, theirs = _checkpoints(store, run_id), _checkpoints(ref, whole)
        assert sorted(ours) == sorted(theirs) == [("pretrain", 1), ("pretrain", 2), ("pretrain", 3)]
        # round for round, bit for bit: the global model and FedAdam's moments
        for key in sorted(theirs):
            assert ours[key].keys() == theirs[key].keys(), key
            differ = [name for name, tensor in theirs[key].items() if not torch.equal(ours[key][name], tensor)]
            assert not differ, (key, f"{len(differ)} of {len(theirs[key])} tensors differ", differ[:5])
        # and the sites' losses: every local step and evaluation saw the same weights, data and masks
        for mine, other in zip(store.rounds(run_id), ref.rounds(whole), strict=True):
            assert mine.round == other.round
            assert mine.train["train_loss"] == other.train["train_loss"], mine.round
            assert mine.evaluate["val_loss"] == other.evaluate["val_loss"], mine.round
    fed.close()
    assert not _leftovers(dep)
