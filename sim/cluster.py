"""Where `fedecho sim`'s virtual sites run, and what each reserves.

`plan_ray` decides it, as a `RayPlan`: each virtual site is a Ray actor that reserves CPUs and a share
of a GPU. By default a site reserves 1 CPU and as many train at once as the CPUs hold; `parallel` sites at once
split the CPUs between them; GPUs, where there are any, are shared between the sites that train at once (at
most one a site). Ray starts a site only where its whole reservation is free, so a reservation no node can
hold is refused before anything starts, instead of waiting forever. Inside an actor Ray sets
CUDA_VISIBLE_DEVICES to the site's GPU and training picks it (`fedecho.device.pick_device`); a site that
reserves none sees no GPU and trains on the CPU, with as many torch threads as CPUs it reserves.

Two kinds of Ray:
- a private one on this machine (the default): started for the run and shut down before `simulate` returns,
  so no background process outlives it; Ray binds its ports on every interface, so every RPC needs this
  process's random token (`ray_token`);
- an existing cluster (`ray_address`, the address `ray start --head` printed): the driver joins it and leaves
  it; nothing is started or stopped there. Its token is the researcher's (RAY_AUTH_MODE, RAY_AUTH_TOKEN in
  the environment), and this process must run on one of its nodes. An address where nothing answers, a
  refused token or a machine outside the cluster are refused in seconds (`cluster_nodes`). Ray reads its token
  settings once per process; fedecho has it read them again before each start or join (`reload_ray_auth`).
Either way nothing is installed, uploaded or downloaded: the sites' processes get only environment variables
(`RayPlan.site_env`: torch threads, telemetry off), Ray's dashboard and usage stats are off on the Ray fedecho
starts, and the sites read their data and keep their state at the paths given here, on whichever node they
run (on a cluster: a file system every node sees at the same path).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import secrets
import socket
import sys
import threading
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from fedecho._env import NO_TELEMETRY, environ

RAY_VERSION = "2.55.1"  # the Ray whose internals `ray_internals` names (pinned in constraints.txt)
RAY_STEP = 10_000  # Ray counts resources in steps of 1/10000: a reservation is a whole number of them
CONNECT_TIMEOUT = 5.0  # seconds for an existing cluster's address to answer, and again for its GCS to


class SimResourceError(ValueError):
    """The simulation's resource options cannot be met where it would run (or the Ray cluster cannot be
    joined): refused before anything starts, since Ray would wait forever for a reservation nobody holds."""


@dataclass(frozen=True)
class Node:
    """What one Ray node offers the virtual sites."""

    cpus: float
    gpus: float


@dataclass(frozen=True)
class RayPlan:
    """Where the virtual sites run and what each reserves: Flower starts as many site actors as the nodes
    hold (`capacity`), and each round's sites queue for them."""

    sites: int
    where: str  # "this machine" or "the Ray cluster at HOST:PORT", for messages
    address: str | None  # an existing cluster's GCS address; None: a private Ray on this machine
    nodes: tuple[Node, ...]
    cpus_per_site: float
    gpus_per_site: float
    capacity: int  # site actors the nodes hold at once
    ray_cpus: int | None = None  # a private Ray's CPUs (None on a cluster: its own)
    notes: tuple[str, ...] = ()

    @property
    def parallel(self) -> int:
        """Sites that train at once."""
        return min(self.capacity, self.sites)

    @property
    def threads(self) -> int:
        """torch threads in each site: the whole CPUs it reserves, at least one."""
        return max(1, int(self.cpus_per_site))

    @property
    def client_resources(self) -> dict[str, float]:
        return {"num_cpus": self.cpus_per_site, "num_gpus": self.gpus_per_site}

    def site_env(self) -> dict[str, str]:
        """The environment of the sites' processes on every node: fedecho's telemetry settings as this process
        has them, the site's torch threads, and no GPU for a site that reserves none (Ray hides only the GPUs
        other actors hold: RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0)."""
        env = {k: os.environ.get(k, v) for k, v in NO_TELEMETRY.items()}
        env["FEDECHO_THREADS"] = str(self.threads)
        if self.gpus_per_site == 0:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def describe(self) -> str:
        cpus, gpus = sum(n.cpus for n in self.nodes), sum(n.gpus for n in self.nodes)
        nodes = _count(len(self.nodes), "node") + ", " if self.address else ""
        where = self.where if self.address else "a private Ray on this machine"
        gpu = _count(self.gpus_per_site, "GPU") if self.gpus_per_site else "no GPU"
        return (
            f"virtual sites on {where} ({nodes}{_count(cpus, 'CPU')}, {_count(gpus, 'GPU')}): {self.parallel} of "
            f"{self.sites} train at once, each on {_count(self.cpus_per_site, 'CPU')} "
            f"({_count(self.threads, 'torch thread')}) and {gpu}"
        )


def plan_ray(
    sites: int,
    cpus_per_site: float | None = None,
    gpus_per_site: float | None = None,
    parallel_sites: int | None = None,
    ray_address: str | None = None,
) -> RayPlan:
    """What each of `sites` virtual sites reserves, on this machine (its cores and the GPUs torch sees) or on the
    Ray cluster at `ray_address` (its live nodes, which this process must be one of)."""
    if ray_address:
        address = parse_ray_address(ray_address)
        return plan_sites(sites, cluster_nodes(address), f"the Ray cluster at {address}", address,
                          cpus_per_site, gpus_per_site, parallel_sites)  # fmt: skip
    import torch

    here = Node(float(os.cpu_count() or 1), float(torch.cuda.device_count()))
    return plan_sites(sites, [here], "this machine", None, cpus_per_site, gpus_per_site, parallel_sites)


def plan_sites(
    sites: int,
    nodes: list[Node],
    where: str,
    address: str | None = None,
    cpus_per_site: float | None = None,
    gpus_per_site: float | None = None,
    parallel_sites: int | None = None,
) -> RayPlan:
    """The reservations, checked against the nodes: a site reserves `cpus_per_site` CPUs (default 1, or an equal
    share of the CPUs between `parallel_sites`) and `gpus_per_site` GPUs (default: the GPUs shared between the
    sites that train at once, at most one each; none without GPUs)."""
    notes: list[str] = []
    cpus, gpus = sum(n.cpus for n in nodes), sum(n.gpus for n in nodes)
    have = f"{where} has {_count(cpus, 'CPU')} and {_count(gpus, 'GPU')}" + (f" on {len(nodes)} nodes" * bool(address))
    any_node = f"any node of {where}" if address else where
    if cpus <= 0:
        raise SimResourceError(f"{where} offers no CPU to the virtual sites")
    target = parallel_sites
    if target is not None and target > sites:
        notes.append(f"--parallel-sites {target} is more than the {sites} sites: all {sites} train at once")
        target = sites
    if gpus_per_site:
        most = max(n.gpus for n in nodes)
        if most == 0:
            why = "" if address else " (torch.cuda.device_count() is 0)"
            raise SimResourceError(f"--gpus-per-site {gpus_per_site:g}: {where} has no GPU{why}")
        if gpus_per_site > 1 and gpus_per_site != int(gpus_per_site):
            raise SimResourceError(f"--gpus-per-site {gpus_per_site:g}: Ray reserves whole GPUs or a fraction of one")
        if gpus_per_site * RAY_STEP < 1:
            raise SimResourceError(f"--gpus-per-site {gpus_per_site:g}: Ray's smallest share of a GPU is 0.0001")
        if gpus_per_site > most:
            raise SimResourceError(
                f"--gpus-per-site {gpus_per_site:g} is more than {any_node} has ({_count(most, 'GPU')})"
            )
    on_gpu = gpus_per_site > 0 if gpus_per_site is not None else gpus > 0
    hosts = [n for n in nodes if n.gpus > 0] if on_gpu else list(nodes)  # Flower places no site elsewhere then
    explicit_cpus = cpus_per_site is not None
    if cpus_per_site is None:
        cpus_per_site = 1.0 if target is None else _share([n.cpus for n in hosts], target, math.inf)
        if cpus_per_site <= 0:
            raise SimResourceError(f"--parallel-sites {target}: {have}, too few to share between {target} sites")
    elif cpus_per_site > max(n.cpus for n in hosts):
        most = max(n.cpus for n in hosts)
        raise SimResourceError(f"--cpus-per-site {cpus_per_site:g} is more than {any_node} has ({_count(most, 'CPU')})")
    if gpus_per_site is None:
        at_once = target or min(sites, _fits([n.cpus for n in hosts], cpus_per_site))
        gpus_per_site = _share([n.gpus for n in hosts], max(at_once, 1), 1.0) if on_gpu else 0.0
    capacity = sum(
        min(int(n.cpus / cpus_per_site), int(n.gpus / gpus_per_site) if gpus_per_site > 0 else sys.maxsize)
        for n in hosts
    )
    each = _count(cpus_per_site, "CPU") + (f" and {_count(gpus_per_site, 'GPU')}" if gpus_per_site else "")
    if capacity == 0:
        raise SimResourceError(f"no node of {where} holds a site's {each} ({have})")
    ray_cpus = None if address else int(cpus)
    if target is not None and capacity < target:
        raise SimResourceError(
            f"--parallel-sites {target}: {have}, room for {_count(capacity, 'site')} of {each} at once"
        )
    if target is not None and capacity > target:
        whole = target * cpus_per_site
        if address is None and abs(whole - round(whole)) < 1e-9:
            ray_cpus, capacity = round(whole), target  # the private Ray gets just the CPUs of `target` sites
        elif address is None and explicit_cpus:
            raise SimResourceError(
                f"--parallel-sites {parallel_sites} with --cpus-per-site {cpus_per_site:g}: {have}, room for "
                f"{capacity} sites at once; leave out --cpus-per-site (each site then reserves a share)"
            )
        else:  # a cluster's CPUs are its own: the reservation alone decides how many fit
            notes.append(
                f"{where} holds {capacity} sites of {each} at once: up to {min(capacity, sites)} train at once"
            )
    return RayPlan(sites, where, address, tuple(nodes), cpus_per_site, gpus_per_site, capacity, ray_cpus,
                   tuple(notes))  # fmt: skip


def _count(x: float, unit: str) -> str:
    return f"{x:g} {unit}{'s' * (x != 1)}"


def _fits(amounts: list[float], each: float) -> int:
    """Reservations of `each` the nodes hold, one amount a node, as Flower counts its actors."""
    return sum(int(a / each) for a in amounts)


def _share(amounts: list[float], n: int, cap: float) -> float:
    """The largest reservation, in Ray's steps and at most `cap`, of which the nodes hold `n` at once (0 if none).
    The best is a node's amount split k ways, so only those are tried."""
    best = 0.0
    for a in amounts:
        for k in range(1, n + 1):
            s = min(cap, math.floor(a / k * RAY_STEP) / RAY_STEP)
            if s > best and _fits(amounts, s) >= n:
                best = s
    return best


# ------------------------------------------------------------------ an existing Ray cluster

_ADDRESS = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:]+)\]|(?P<host>[\w.-]+)):(?P<port>\d{1,5})$")


def parse_ray_address(address: str) -> str:
    """HOST:PORT of a cluster's GCS, as `ray start --head` prints it."""
    m = _ADDRESS.match(address.strip())
    if not m or not 0 < int(m["port"]) < 65536:
        raise SimResourceError(
            f"--ray-address {address!r}: expected HOST:PORT, the address `ray start --head` printed "
            "(a Ray Client address, ray://..., is not supported)"
        )
    return address.strip()


def cluster_nodes(address: str) -> list[Node]:
    """The live nodes of the Ray cluster at `address`, asked of its GCS without joining it: an address where
    nothing answers, a refused token, or a cluster this machine is no node of fail here in seconds (Ray's
    driver would retry for a minute or more, printing as it goes)."""
    internals = ray_internals()

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        why = e.strerror or f"no answer in {CONNECT_TIMEOUT:g} s"
        raise SimResourceError(
            f"--ray-address {address}: nothing answers there ({why}); is the cluster's head running "
            "(`ray start --head`), and is that the address it printed?"
        ) from e
    infos = _ask_gcs(address)
    alive = [i for i in infos.values() if i.state == internals.GcsNodeInfo.ALIVE and i.resources_total]
    if not alive:
        raise SimResourceError(f"the Ray cluster at {address} has no live node")
    local = set(internals.find_node_ids())  # the raylets running on this machine
    if not any(i.node_id.hex() in local for i in alive):
        raise SimResourceError(
            f"this machine is no node of the Ray cluster at {address}: run fedecho sim on one of its nodes "
            f"(one that ran `ray start --head` or `ray start --address {address}`)"
        )
    return [Node(float(i.resources_total.get("CPU", 0)), float(i.resources_total.get("GPU", 0))) for i in alive]


def _ask_gcs(address: str) -> dict[Any, Any]:
    """The cluster's node table, read with the researcher's token (RAY_AUTH_* in the environment). The GCS client
    waits half a minute for a port that is not a GCS, so it gets CONNECT_TIMEOUT here, in a thread."""
    from ray.exceptions import AuthenticationError

    gcs_client = ray_internals().GcsClient
    reload_ray_auth()
    answer: dict[str, Any] = {}

    def ask() -> None:
        try:
            answer["nodes"] = gcs_client(address=address).get_all_node_info(timeout=CONNECT_TIMEOUT)
        except Exception as e:  # reported below, by kind
            answer["error"] = e

    asking = threading.Thread(target=ask, name="ray-gcs-probe", daemon=True)
    asking.start()
    asking.join(CONNECT_TIMEOUT * 2)
    if "nodes" in answer:
        return dict(answer["nodes"])
    error = answer.get("error")
    if isinstance(error, AuthenticationError):
        raise SimResourceError(
            f"the Ray cluster at {address} refused this process's token: set RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token"
        ) from error
    why = f": {error}" if error else f" within {CONNECT_TIMEOUT * 2:g} s"
    raise SimResourceError(f"--ray-address {address} answers, but no Ray GCS replied{why}")


# ------------------------------------------------------------------ starting and stopping Ray


def start_ray(plan: RayPlan) -> None:
    """Start the private Ray, or join the cluster, with the sites' environment on every node."""
    import ray

    reload_ray_auth()

    env = plan.site_env()
    common: dict[str, Any] = {"logging_level": "error", "log_to_driver": True}
    if plan.address is None:
        pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
        env["PYTHONPATH"] = (
            pythonpath  # as Flower gives its own Ray: this machine's sites import what this process does
        )
        ray.init(num_cpus=plan.ray_cpus, num_gpus=int(sum(n.gpus for n in plan.nodes)), include_dashboard=False,
                 runtime_env={"env_vars": env}, **common)  # fmt: skip
        return
    try:
        ray.init(address=plan.address, runtime_env={"env_vars": env}, **common)
    except Exception as e:  # the probe passed: whatever is left is Ray's to say
        raise SimResourceError(f"could not join the Ray cluster at {plan.address}: {e}") from e


def reload_ray_auth() -> None:
    """Make Ray read its token settings (RAY_AUTH_*) from the environment again: it reads them once, when first
    imported, so whatever imported Ray earlier in this process would otherwise decide which token is presented
    (a private Ray's own, or the researcher's for a cluster). Uses Ray's own reset (pinned Ray 2.55)."""
    internals = ray_internals()
    internals.AuthenticationTokenLoader.instance().reset_cache()
    internals.Config.initialize("")


def ray_internals() -> SimpleNamespace:
    """The parts of Ray below its public API that fedecho uses, from one place: reading a cluster's node table
    without joining it (as `ray status` does), finding this machine's raylets, and rereading the token settings.
    A Ray without them is a clear error naming what is missing, not a traceback mid-run."""
    import ray

    try:
        from ray._private.services import find_node_ids
        from ray._raylet import AuthenticationTokenLoader, Config, GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        if not callable(getattr(AuthenticationTokenLoader, "reset_cache", None)):
            raise AttributeError("AuthenticationTokenLoader.reset_cache")
    except (ImportError, AttributeError) as e:
        raise SimResourceError(
            f"Ray {ray.__version__} lacks {e} that fedecho's simulation uses (checked with Ray {RAY_VERSION}): "
            "install the pinned version (constraints.txt)"
        ) from e
    return SimpleNamespace(
        find_node_ids=find_node_ids, AuthenticationTokenLoader=AuthenticationTokenLoader, Config=Config,
        GcsClient=GcsClient, GcsNodeInfo=GcsNodeInfo,
    )  # fmt: skip


@functools.cache
def _process_token() -> str:
    """One random token per process, drawn at its first private simulation."""
    return secrets.token_hex(32)


def ray_token() -> contextlib.AbstractContextManager[None]:
    """Ray token authentication with a random token for this process's private Ray.

    Ray binds its GCS, raylet and worker ports on every interface; without a token anyone who can reach
    the machine could submit code to it. Ray's own processes inherit the token from the environment, and
    it is removed again afterwards (a researcher's own RAY_AUTH_* settings are kept as they were)."""
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _process_token(), "RAY_AUTH_TOKEN_PATH": None}
    return environ(token)


def stop_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass


__all__ = [
    "Node", "RayPlan", "SimResourceError", "cluster_nodes", "parse_ray_address", "plan_ray", "plan_sites",
    "ray_internals", "ray_token", "reload_ray_auth", "start_ray", "stop_ray",
]  # fmt: skip
