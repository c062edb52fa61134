"""The whole deployment on loopback with real processes: a SuperLink and two SuperNodes with TLS and node
authentication run two pre-training rounds and one fine-tuning round of echo_vit_tiny on phantom data;
one SuperNode is killed in the middle of the fine-tuning round and the round completes with the other.
The store holds every round, per-site result and checkpoint."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from deploy_helpers import Deployment, kill_group, running

from builders import tiny_run
from fedecho.server.submit import submit_run
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


@pytest.fixture()
def federation(federated_phantom: Path, tmp_path: Path) -> Iterator[Deployment]:
    sites = {name: federated_phantom / name for name in ("site01", "site02")}
    with running(tmp_path / "fed", sites, round_timeout=60.0, min_sites=1) as dep:
        yield dep


def test_deployed_federation_survives_a_site_dying_mid_round(federation: Deployment, tmp_path: Path) -> None:
    run_toml = tmp_path / "tiny.toml"
    run_toml.write_text(tiny_run(wire="float16", pretrain_rounds=2, finetune_rounds=1))
    victim = federation.supernodes["site02"]
    killed = threading.Event()

    def kill_site02_when_it_trains() -> None:
        deadline = time.monotonic() + 300
        # one runner is always waiting as a spare: a second one means a ClientApp is at work
        while time.monotonic() < deadline and len(_clientapps_in_group(victim.pid)) < 2:
            time.sleep(0.2)
        kill_group(victim)  # the whole SuperNode, its ClientApp included: a crash, not a goodbye
        killed.set()

    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        if "pretrain round 2" in line and not killed.is_set():
            # pre-training is done: the next ClientApp site02 starts is its fine-tuning round 1
            threading.Thread(target=kill_site02_when_it_trains, daemon=True).start()

    sub = submit_run(federation.server, run_toml, echo=echo)
    out = "\n".join(lines)
    assert killed.is_set(), out
    assert sub.returncode == 0 and sub.status == "finished:completed", out

    with Store(store_url(federation.server.state)) as store:
        (run,) = store.list_runs()
        assert run.status == "finished" and run.flower_run_id == sub.flower_run_id
        rounds = store.rounds(run.id)
        assert [(r.phase, r.round, r.sites_replied) for r in rounds] == [
            ("pretrain", 1, 2), ("pretrain", 2, 2), ("finetune", 1, 1)
        ]  # fmt: skip
        assert all(np.isfinite(r.train["train_loss"]) for r in rounds)
        results = store.site_results(run.id)
        ok = {(r.phase, r.round, r.site) for r in results if r.kind == "train" and r.status == "ok"}
        assert ok == {(p, n, s) for p, n in (("pretrain", 1), ("pretrain", 2)) for s in ("site01", "site02")} | {
            ("finetune", 1, "site01")
        }
        assert all(r.bytes_up > 0 for r in results if r.status == "ok" and r.kind == "train")
        checkpoints = store.checkpoints(run.id)
        assert sorted((c.phase, c.round) for c in checkpoints) == [("finetune", 1), ("pretrain", 1), ("pretrain", 2)]
        assert all(Path(c.path).is_file() for c in checkpoints)
