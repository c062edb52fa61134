"""Site outages in a real deployment on loopback: a SuperLink behind its front and two SuperNodes with TLS and node
authentication, the coordinator's shipped quorum settings (min_sites 2, quorum 1), echo_vit_tiny on phantom data.

- A site killed mid-round and restarted at once is recognised as restarted: its lost message is sent again and the
  round counts both sites. A site killed mid-round for good is detected by its missing heartbeats: the round
  completes with the other site within seconds, not the round timeout, and the run finishes. Every drop and
  rejoin is an event under the site's name.
- With a quorum the federation cannot meet during an outage, the run retries the round, then pauses (one line, no
  traceback, status "paused"); once the site is back, `resume` finishes it.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from deploy_helpers import Deployment, kill_group, running

from builders import tiny_run
from fedecho.server.submit import EXIT_PAUSED, submit_run
from fedecho.storage import Store
from fedecho.storage.store import store_url

pytestmark = pytest.mark.slow


def _clientapps_in_group(pgid: int) -> list[int]:
    """PIDs of flwr-clientapp processes in a SuperNode's process group (the spare runner started ahead is one)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,pgid,args"], capture_output=True, text=True, check=True).stdout
    pids = []
    for line in out.splitlines()[1:]:
        pid, group, args = line.split(None, 2)
        if int(group) == pgid and "flwr-clientapp" in args:
            pids.append(int(pid))
    return pids


@pytest.fixture(scope="module")
def federation(federated_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    sites = {name: federated_phantom / name for name in ("site01", "site02")}
    # the shipped min_sites and quorum; a short site_wait and one retry so that the pause comes quickly
    with running(tmp_path_factory.mktemp("fed"), sites, round_timeout=300.0, site_wait=8.0, round_retries=1) as dep:
        yield dep


def _kill_when_training(dep: Deployment, name: str, then: Callable[[], None] | None = None) -> threading.Event:
    """Start a thread that SIGKILLs site `name`'s whole SuperNode (its ClientApp too: a crash, not a goodbye) as
    soon as it is at work on a message, then calls `then`; the event is set once it has been killed."""
    killed = threading.Event()

    def watch() -> None:
        victim = dep.supernodes[name]
        deadline = time.monotonic() + 300
        # one runner is always waiting as a spare: a second one means a ClientApp is at work
        while time.monotonic() < deadline and len(_clientapps_in_group(victim.pid)) < 2:
            time.sleep(0.2)
        kill_group(victim)
        killed.set()
        if then is not None:
            then()

    threading.Thread(target=watch, daemon=True).start()
    return killed


def test_site_outages_do_not_stop_a_run(federation: Deployment, tmp_path: Path) -> None:
    run_toml = tmp_path / "tiny.toml"
    run_toml.write_text(tiny_run(wire="float16", pretrain_rounds=2, finetune_rounds=1))
    first_kill = {"at": 0.0}
    second: dict[str, object] = {}
    lines: list[str] = []

    def restart_site02() -> None:
        first_kill["at"] = time.monotonic()
        federation.start_supernode("site02")  # waits until it is connected again
        first_kill["reconnected"] = time.monotonic() - first_kill["at"]

    def echo(line: str) -> None:
        lines.append(line)
        if "pretrain round 1:" in line:  # site02's next ClientApp is its pre-training round 2: crash, restart
            second["restart"] = _kill_when_training(federation, "site02", restart_site02)
        if "pretrain round 2:" in line:  # and its fine-tuning round 1: crash for good
            second["killed"] = _kill_when_training(federation, "site02")
            second["at"] = time.monotonic()
        if "finetune round 1:" in line:
            second["round_end"] = time.monotonic()

    sub = submit_run(federation.server, run_toml, echo=echo)
    out = "\n".join(lines)
    assert sub.returncode == 0 and sub.status == "finished:completed", out
    assert "Traceback" not in out, out
    assert first_kill["reconnected"] < 20, first_kill  # a crashed site is back within seconds
    killed = second["killed"]
    assert isinstance(killed, threading.Event) and killed.is_set(), out

    with Store(store_url(federation.server.state)) as store:
        (run,) = [r for r in store.list_runs() if r.flower_run_id == sub.flower_run_id]
        assert run.status == "finished"
        rounds = store.rounds(run.id)
        # the restarted site retrained its lost round; the dead one was left out of the last
        assert [(r.phase, r.round, r.sites_replied) for r in rounds] == [
            ("pretrain", 1, 2), ("pretrain", 2, 2), ("finetune", 1, 1)
        ]  # fmt: skip
        assert all(np.isfinite(r.train["train_loss"]) for r in rounds)
        last = rounds[-1]
        # detected by its heartbeats (about 20 s), not the round timeout (300 s)
        assert last.finished - last.started < 90, (last.started, last.finished)
        events = [(e.kind, e.site) for e in store.events(run.id)]
        assert events.count(("site-dropped", "site02")) == 2, events
        assert ("site-rejoined", "site02") in events, events
        assert all(site in (None, "site01", "site02") for _, site in events), events  # never node-<id>
        results = store.site_results(run.id)
        assert {r.site for r in results} == {"site01", "site02"}
        (dead,) = [r for r in results if (r.phase, r.kind, r.site) == ("finetune", "train", "site02")]
        assert dead.status == "failed" and "offline" in dead.reason
        assert {a.site for a in store.audit(run.id)} == {"site01", "site02"}


def test_a_quorum_the_outage_breaks_pauses_the_run_and_resume_finishes_it(
    federation: Deployment, tmp_path: Path
) -> None:
    if federation.supernodes["site02"].poll() is not None:
        federation.start_supernode("site02")
    run_toml = tmp_path / "quorum2.toml"
    run_toml.write_text(tiny_run(pretrain_rounds=2, finetune_rounds=0).replace("[run]", "[run]\nmin_sites = 2", 1))
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        if "pretrain round 1:" in line:
            _kill_when_training(federation, "site02")

    sub = submit_run(federation.server, run_toml, echo=echo)
    out = "\n".join(lines)
    assert sub.returncode == EXIT_PAUSED and sub.run_status == "paused", (sub, out)
    assert "Traceback" not in out and "RoundFailed" not in out, out
    paused = [line for line in lines if " paused: " in line]
    assert len(paused) == 1 and "pretrain round 2" in paused[0] and "fedecho server resume" in paused[0], out
    with Store(store_url(federation.server.state)) as store:
        run = max(store.list_runs(), key=lambda r: r.id)
        assert run.status == "paused" and [r.round for r in store.rounds(run.id)] == [1]
        kinds = [e.kind for e in store.events(run.id)]
        assert "site-dropped" in kinds and "round-retry" in kinds and kinds[-1] == "paused", kinds

    federation.start_supernode("site02")
    resumed = submit_run(federation.server, None, resume=run.id)
    assert resumed.returncode == 0, resumed
    with Store(store_url(federation.server.state)) as store:
        assert store.get_run(run.id).status == "finished"
        assert [(r.round, r.sites_replied) for r in store.rounds(run.id)] == [(1, 2), (2, 2)]


def test_statistics_queries_and_control_variates_cross_real_processes(federation: Deployment, tmp_path: Path) -> None:
    """Fine-tuning with SCAFFOLD, the federated target statistics and the ridge refit in a deployment: the
    queries and the control variates travel through the SuperLink, the site runners and back (packed like
    the model), and every site's audit log records what its statistics replies carried."""
    for name in ("site01", "site02"):
        if federation.supernodes[name].poll() is not None:
            federation.start_supernode(name)
    text = tiny_run(pretrain_rounds=0, finetune_rounds=2, freeze=False).replace("[run]", "[run]\nmin_sites = 2", 1)
    text = text.replace('tasks = ["ef"]', 'tasks = ["ef"]\nscaffold = true\ntarget_stats = true\nrefit = "end"')
    run_toml = tmp_path / "methods.toml"
    run_toml.write_text(text)
    sub = submit_run(federation.server, run_toml)
    assert sub.returncode == 0 and sub.run_status == "finished", sub
    with Store(store_url(federation.server.state)) as store:
        run = max(store.list_runs(), key=lambda r: r.id)
        kinds = [e.kind for e in store.events(run.id)]
        assert "target-stats" in kinds and "refit" in kinds, kinds
        queries = [r for r in store.site_results(run.id) if r.kind == "query"]
        assert {r.site for r in queries} == {"site01", "site02"} and all(r.status == "ok" for r in queries)
        train = [r for r in store.site_results(run.id) if r.kind == "train"]
        assert len(train) == 4 and all(r.status == "ok" and r.bytes_up > 0 for r in train)
        audited = {(a.kind, a.site, a.status) for a in store.audit(run.id)}
    assert {("query", s, "accepted") for s in ("site01", "site02")} <= audited, audited
