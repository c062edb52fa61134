"""A whole federation on one machine over loopback: certificates, configs, the coordinator, SuperNodes.

The deployment tests and `bench/federation.py` both need real Flower processes (TLS, node
authentication, the public front, the ServerApp and ClientApp runners) without a network; this is the one
harness they share. The coordinator's public address is on a second loopback address (PUBLIC_HOST,
127.0.0.2), its SuperLink on 127.0.0.1, as a real coordinator has its front on the network interface and its
SuperLink on loopback. Every process runs in its own session (process group) and is killed, with its group,
by `Deployment.close`, so a failure leaves nothing behind. Ports are free ones picked at run time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedecho._proc import stop
from fedecho.client.config import SiteConfig, load_site_config
from fedecho.client.supernode import start_supernode, wait_connected
from fedecho.security.certs import create_site_keys, init_certs
from fedecho.server.config import ServerConfig, load_server_config
from fedecho.server.superlink import Coordinator, register_sites

PUBLIC_HOST = "127.0.0.2"  # the coordinator's "network" address in tests: what sites (and outsiders) dial


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on host that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Hard kill of a spawned process and its process group (teardown: no grace)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)


def write_server_toml(
    root: Path,
    port: int,
    *,
    round_timeout: float = 600.0,
    min_sites: int = 2,
    eval_data: Path | None = None,
    trace_messages: bool = False,
    control_port: int | None = None,
    quorum: int | None = None,
    site_wait: float | None = None,
    round_retries: int | None = None,
) -> Path:
    """A server.toml under root with certs in root/certs, keys in root/keys, state in root/server: the front on
    PUBLIC_HOST:port, the SuperLink on 127.0.0.1 (a free port unless given); quorum, site_wait and round_retries
    are written only when given (else server.toml's defaults hold)."""
    path = root / "server.toml"
    path.write_text(
        "[server]\n"
        'state = "server"\n'
        f'address = "{PUBLIC_HOST}:{port}"\n'
        f'listen = "{PUBLIC_HOST}:{port}"\n'
        f'control = "127.0.0.1:{control_port or free_port()}"\n'
        'certs = "certs"\n'
        'keys = "keys"\n'
        f"round_timeout = {float(round_timeout)}\n"
        f"min_sites = {min_sites}\n"
        f'eval_data = "{eval_data or ""}"\n'
        f"trace_messages = {str(trace_messages).lower()}\n"
        + (f"quorum = {quorum}\n" if quorum is not None else "")
        + (f"site_wait = {float(site_wait)}\n" if site_wait is not None else "")
        + (f"round_retries = {round_retries}\n" if round_retries is not None else "")
    )
    return path


def write_site_toml(
    root: Path,
    name: str,
    superlink_port: int,
    data: Path,
    *,
    node_port: int | None = None,
    labels: Path | None = None,
    device: str = "cpu",
    devices: int = 1,
    extra: str = "",
) -> Path:
    """root/<name>/site.toml with its key pair in root/<name>/ and the federation CA from root/certs."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.toml"
    labels_line = f'labels = "{labels}"\n' if labels else ""
    path.write_text(
        "[site]\n"
        f'name = "{name}"\n'
        f'data = "{data}"\n'
        f"{labels_line}"
        'cache = "cache"\n'
        'state = "state"\n'
        f"threads = {devices}\n"
        f'device = "{device}"\n'
        f"devices = {devices}\n"
        "[superlink]\n"
        f'address = "{PUBLIC_HOST}:{superlink_port}"\n'
        'ca = "../certs/ca.pem"\n'
        f'private_key = "{name}.key"\n'
        f'public_key = "{name}.pub"\n'
        "[supernode]\n"
        f"port = {node_port or free_port()}\n"
        "# a phantom rehearsal: a handful of videos per site, below the default minimums (10 videos of 5 patients)\n"
        "[policy]\n"
        "min_videos = 1\n"
        "min_patients = 1\n"
        f"{extra}"
    )
    return path


@dataclass
class Deployment:
    """A coordinator (SuperLink with TLS and node authentication, its runner, its front) in `root`, plus the
    SuperNodes started against it."""

    root: Path
    server: ServerConfig
    coordinator: Coordinator | None = None
    supernodes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    sites: dict[str, SiteConfig] = field(default_factory=dict)
    node_ids: dict[str, int] = field(default_factory=dict)

    def add_site(
        self,
        name: str,
        data: Path,
        *,
        register: bool = True,
        labels: Path | None = None,
        device: str = "cpu",
        devices: int = 1,
        extra: str = "",
    ) -> SiteConfig:
        """Create the site's keys and site.toml; with register, copy its .pub to the server's keys folder."""
        keys = create_site_keys(self.root / name, name)
        if register:
            self.server.keys.mkdir(parents=True, exist_ok=True)
            (self.server.keys / f"{name}.pub").write_bytes(keys.public_key.read_bytes())
        path = write_site_toml(
            self.root, name, self.server.listen_port, data, labels=labels, device=device, devices=devices, extra=extra
        )
        site = load_site_config(path)
        self.sites[name] = site
        return site

    def start_all(self) -> None:
        """The SuperLink, the sites' key registrations, then every added site's SuperNode (connected)."""
        self.start_superlink()
        self.register()
        for name in self.sites:
            self.start_supernode(name)

    def start_superlink(self, timeout: float = 60.0) -> None:
        """The whole coordinator: SuperLink, ServerApp runner and public front."""
        self.coordinator = Coordinator(self.server)
        self.coordinator.start(timeout)

    def register(self) -> None:
        """Register every site key in the server's keys folder with the running SuperLink."""
        for reg in register_sites(self.server):
            if reg.status not in ("registered", "already registered"):
                raise RuntimeError(f"site key registration failed: {reg}")

    def start_supernode(self, name: str, *, wait: bool = True, timeout: float = 60.0) -> subprocess.Popen[bytes]:
        site = self.sites[name]
        proc = start_supernode(site)
        self.supernodes[name] = proc
        if wait:
            self.node_ids[name] = wait_connected(proc, site.logs / "supernode.log", timeout)
        return proc

    def supernode_log(self, name: str) -> Path:
        return self.sites[name].logs / "supernode.log"

    def close(self) -> None:
        """Stop SuperNodes first, then the SuperLink: cleanly if possible, killed with their groups anyway."""
        for proc in self.supernodes.values():
            with contextlib.suppress(Exception):
                stop(proc, grace=5)
            kill_group(proc)
        if self.coordinator is not None:
            with contextlib.suppress(Exception):
                self.coordinator.stop()
            for proc in self.coordinator.procs.values():
                kill_group(proc)


@contextlib.contextmanager
def running(root: Path, sites: dict[str, Path], **server_kwargs: object) -> Iterator[Deployment]:
    """A started deployment with these sites (name -> data folder), closed on exit whatever happens."""
    dep = make_deployment(root, **server_kwargs)
    try:
        for name, data in sites.items():
            dep.add_site(name, data)
        dep.start_all()
        yield dep
    finally:
        dep.close()


def make_deployment(root: Path, **server_kwargs: object) -> Deployment:
    """Certificates for 127.0.0.1 and a server.toml on a free port (the SuperLink is not started yet)."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port(PUBLIC_HOST)
    init_certs(root / "certs", f"{PUBLIC_HOST}:{port}")
    cfg = load_server_config(write_server_toml(root, port, **server_kwargs))  # type: ignore[arg-type]
    return Deployment(root=root, server=cfg)
