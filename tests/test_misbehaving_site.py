"""A misbehaving site cannot take a deployed federation over, with real processes on loopback (TLS, node
authentication): site02 is a real SuperNode whose ClientApp trains honestly and then tampers with its reply,
through a test-only sitecustomize (tests/misbehave/) on its processes' PYTHONPATH alone: round 1 its update
times 1e6, round 2 a claimed 10^9 examples, round 3 NaN examples, round 4 infinite examples, round 5 the
honest site's name. Every reply of its is rejected, recorded under its registered name with the reason, and
the run finishes with the global models that site01 trains alone on the same SuperLink, tensor for tensor."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import tamper
import torch
from deploy_helpers import make_deployment
from safetensors.torch import load_file

from builders import tiny_run
from fedecho._env import environ
from fedecho.server.submit import submit_run
from fedecho.server.superlink import read_registry
from fedecho.storage import Store
from fedecho.storage.store import store_url

pytestmark = pytest.mark.slow

PLAN = "train:1=scale,train:2=count:1e9,train:3=count:nan,train:4=count:inf,train:5=name:site01"
TESTS = Path(__file__).resolve().parent


def test_a_misbehaving_site_is_rejected_round_after_round_and_changes_nothing(
    federated_phantom: Path, tmp_path: Path
) -> None:
    run_toml = tmp_path / "tiny.toml"
    text = tiny_run(pretrain_rounds=5, finetune_rounds=0, freeze=False)
    run_toml.write_text(text.replace("\n\n[finetune]", "\neval_every = 0\n\n[finetune]", 1))  # evaluate once
    dep = make_deployment(tmp_path / "fed", round_timeout=120.0, min_sites=1)
    try:
        dep.add_site("site01", federated_phantom / "site01")
        site02 = dep.add_site("site02", federated_phantom / "site02")  # its key is registered by start_all ...
        del dep.sites["site02"]  # ... which starts only site01's SuperNode
        dep.start_all()
        dep.sites["site02"] = site02
        assert read_registry(dep.server)["site01"]["node_id"] == str(dep.node_ids["site01"])  # what names replies

        lines: list[str] = []
        alone = submit_run(dep.server, run_toml, echo=lines.append)
        assert alone.returncode == 0 and alone.status == "finished:completed", "\n".join(lines)

        pythonpath = os.pathsep.join([str(TESTS / "misbehave"), str(TESTS)])
        with environ({"PYTHONPATH": pythonpath, tamper.PLAN_ENV: PLAN, tamper.SITE_ENV: "site02"}):
            dep.start_supernode("site02")
        node = dep.node_ids["site02"]
        assert read_registry(dep.server)["site02"]["node_id"] == str(node)
        lines.clear()
        attacked = submit_run(dep.server, run_toml, echo=lines.append)
        assert attacked.returncode == 0 and attacked.status == "finished:completed", "\n".join(lines)

        with Store(store_url(dep.server.state)) as store:
            first, second = (r.id for r in sorted(store.list_runs(), key=lambda r: r.id))
            assert store.get_run(second).status == "finished"
            results = {(r.kind, r.round, r.site): r for r in store.site_results(second)}
            reasons = [
                "update norm ", "num-examples 1000000000 exceeds what this site may claim (100000)",
                "metric 'num-examples' is not finite: nan", "metric 'num-examples' is not finite: inf",
                f"node {node} is registered as site 'site02'; its reply names 'site01'",
            ]  # fmt: skip
            for n, reason in enumerate(reasons, start=1):
                assert results["train", n, "site01"].status == "ok"
                row = results["train", n, "site02"]
                assert row.status == "rejected" and row.reason.startswith(reason), (n, row.reason)
            audit = [(a.round, a.site, a.status, a.reason) for a in store.audit(second) if a.node_id == node]
            assert [a[:3] for a in audit if a[2] != "accepted"] == [(n, "site02", "rejected") for n in range(1, 6)]
            assert all(results["train", a[0], "site02"].reason == a[3] for a in audit if a[2] == "rejected")
            events = [e for e in store.events(second) if e.kind == "update-rejected"]
            assert [e.site for e in events] == ["site02"] * 5
            assert [r.sites_replied for r in store.rounds(second)] == [1] * 5
            mine = {c.round: load_file(c.path) for c in store.checkpoints(second)}
            theirs = {c.round: load_file(c.path) for c in store.checkpoints(first)}
        assert sorted(mine) == sorted(theirs) == [3, 4, 5]
        for n, ref in theirs.items():
            assert mine[n].keys() == ref.keys() and all(torch.equal(mine[n][k], ref[k]) for k in ref), n
    finally:
        dep.close()
