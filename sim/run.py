"""`fedecho sim`: the same ServerApp and ClientApp in Flower's simulation engine (Ray), N virtual sites.

Where the sites' data comes from:
- a folder of per-site datasets (what `fedecho synth --sites N` writes: site01/, site02/, ...): the
  natural split, one virtual hospital per folder;
- one dataset (an EchoNet-Dynamic, CAMUS or TMED-2 folder): partitioned into N virtual hospitals,
  by patient where the source knows patients (`fedecho.train.run.partition_of`).

Where the virtual sites run (a private Ray on this machine, or an existing Ray cluster) and what each reserves
is `fedecho.sim.cluster`'s.

The server checks every reply as in a deployment, with two differences. Sites are named by their replies
(`fedecho.server.identity.SiteNames`): the virtual sites are the researcher's own processes, and Flower draws
their node ids inside the simulation, where no registry can name them. Each virtual site may claim at most
as many examples as its folder holds videos (`example_caps`), the coordinator's default where it cannot tell.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context

from fedecho.client.app import build_client_app
from fedecho.client.policy import DEFAULT_POLICY, SitePolicy
from fedecho.client.site import Site
from fedecho.data.source import detect_source, open_source
from fedecho.fl.config import FedRunConfig
from fedecho.privacy.dp_policy import DEFAULT_PRIVACY, PrivacyPolicy
from fedecho.server.app import build_server_app
from fedecho.server.identity import SiteNames
from fedecho.server.rounds import ServerSettings
from fedecho.sim.cluster import RayPlan, plan_ray, ray_token, start_ray, stop_ray
from fedecho.storage.store import store_url


@dataclass
class SimSites:
    """Virtual hospitals: site k reads its own folder, or the k-th partition of one dataset."""

    names: list[str]
    folders: list[Path]
    partitioned: bool
    cache: Path
    state: Path
    policies: dict[str, SitePolicy] = field(default_factory=dict)  # by site name; others: `policy`
    privacy: dict[str, PrivacyPolicy] = field(default_factory=dict)  # [privacy] by site name; others: default
    policy: SitePolicy = DEFAULT_POLICY  # the policy of every site `policies` does not name

    def __call__(self, context: Context) -> Site:
        return self.site(int(context.node_config["partition-id"]))

    def site(self, k: int) -> Site:
        return Site(
            name=self.names[k],
            data=self.folders[k],
            cache=self.cache,
            state=self.state / "sites" / self.names[k],
            partition=(k, len(self.names)) if self.partitioned else None,
            policy=self.policies.get(self.names[k], self.policy),
            privacy=self.privacy.get(self.names[k], DEFAULT_PRIVACY),
        )


def site_layout(data: Path, sites: int | None) -> tuple[list[str], list[Path], bool]:
    """Per-site folders when data holds several datasets, else one dataset split `sites` ways."""
    data = Path(data)
    if not data.is_dir():
        raise ValueError(f"{data}: no such data folder")
    if detect_source(data) is None:
        folders = sorted(d for d in data.iterdir() if d.is_dir() and detect_source(d) is not None)
        if not folders:
            raise ValueError(f"{data}: neither a dataset nor a folder of per-site datasets")
        if sites is not None and sites != len(folders):
            if sites > len(folders):
                raise ValueError(f"{data} holds {len(folders)} site datasets; --sites {sites} is more")
            folders = folders[:sites]
        return [d.name for d in folders], folders, False
    n = sites or 3
    return [f"site{k + 1:02d}" for k in range(n)], [data] * n, True


def example_caps(cfg: FedRunConfig, names: list[str], folders: list[Path]) -> dict[str, int]:
    """Each virtual site's cap on claimed examples: the videos its folder holds (a partition holds fewer), found
    by the scan its training does too; a folder that cannot be scanned gets the default cap."""
    options = {"labels": cfg.local.data.labels} if cfg.local.data.labels else {}
    counts: dict[Path, int] = {}
    caps: dict[str, int] = {}
    for name, folder in zip(names, folders, strict=True):
        if folder not in counts:
            try:
                counts[folder] = len(open_source(folder, cfg.local.data.source, **options).scan().records)
            except Exception:  # the site's own training reports what is wrong with its data
                counts[folder] = 0
        if counts[folder] > 0:
            caps[name] = counts[folder]
    return caps


def simulate(
    cfg: FedRunConfig,
    data: Path,
    state: Path,
    sites: int | None = None,
    store: str | None = None,
    resume: int = 0,
    eval_data: Path | None = None,
    round_timeout: float = 3600.0,
    cpus_per_site: float | None = None,
    on_round: Any = None,
    policies: dict[str, SitePolicy] | None = None,
    privacy: dict[str, PrivacyPolicy] | None = None,
    default_policy: SitePolicy = DEFAULT_POLICY,
    gpus_per_site: float | None = None,
    parallel_sites: int | None = None,
    ray_address: str | None = None,
    plan: RayPlan | None = None,
) -> int:
    """Run a federated simulation to the end; returns the fedecho run id (in the store).

    Every virtual site enforces a site policy as a deployed one does: its own from `policies`, else
    `default_policy` (by default a deployed site's default, `fedecho.client.policy.DEFAULT_POLICY`, which
    refuses updates and metrics from fewer than 10 videos). Where the sites run and what each reserves is
    `plan`, else `plan_ray` of the resource arguments (`SimResourceError` where they cannot be met)."""
    from flwr.simulation import run_simulation

    state = Path(state).resolve()
    names, folders, partitioned = site_layout(data, sites)
    if plan is None:
        plan = plan_ray(len(names), cpus_per_site, gpus_per_site, parallel_sites, ray_address)
    elif plan.sites != len(names):
        raise ValueError(f"the Ray plan is for {plan.sites} sites; {data} gives {len(names)}")
    state.mkdir(parents=True, exist_ok=True)
    folders = [f.resolve() for f in folders]
    site_resolver = SimSites(
        names, folders, partitioned, state / "cache", state, dict(policies or {}), dict(privacy or {}), default_policy
    )
    settings = ServerSettings(
        state=state,
        store_url=store_url(state, store),
        round_timeout=round_timeout,
        min_sites=len(names) if cfg.run.fraction >= 1 else 1,
        quorum=len(names) if cfg.run.fraction >= 1 else 1,  # virtual sites do not drop out
        eval_data=eval_data,
        eval_cache=state / "cache",
        mode="simulation",
        poll_interval=0.1,
        site_names=SiteNames(),
        max_examples_per_site=example_caps(cfg, names, folders),
    )
    outcome: dict[str, Any] = {}

    def resolve(context: Context) -> tuple[str, ServerSettings, int]:
        return cfg.text, settings, resume

    def record(phase: str, server_round: int, summary: dict[str, Any]) -> None:
        outcome.setdefault("rounds", []).append((phase, server_round, summary))
        if on_round is not None:
            on_round(phase, server_round, summary)

    server_app = build_server_app(resolve, on_round=record, outcome=outcome)
    client_app = build_client_app(site_resolver)
    os.environ["FEDECHO_THREADS"] = str(plan.threads)  # the ServerApp's threads, in this process
    backend: dict[str, Any] = {"client_resources": plan.client_resources, "init_args": {}}
    try:
        # Ray is started (or joined) here, not by Flower's backend, which would give the sites this process's
        # sys.path as their PYTHONPATH on every node and has no room for their environment
        with contextlib.nullcontext() if plan.address else ray_token():
            start_ray(plan)
            run_simulation(server_app, client_app, num_supernodes=len(names), backend_config=backend)
    finally:
        stop_ray()  # a private Ray stops; from a cluster the driver disconnects
    if "error" in outcome:
        raise outcome["error"]
    if "run_id" not in outcome:
        raise RuntimeError("the simulation ended before the ServerApp started a run (see the log above)")
    return int(outcome["run_id"])
