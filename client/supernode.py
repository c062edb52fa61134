"""Run a hospital's Flower SuperNode: argv and environment from site.toml, start, connection check, stop.

The SuperNode dials the SuperLink over TLS (trusting only the federation CA), signs its requests with the
site's private key (the coordinator registered the public one), and serves its local Runtime API port with
`--isolation process`: the ClientApp processes are started not by Flower but by the site's own runner
(`fedecho.client.runtime`, in the SuperNode's process group), which judges each run's app bundle before any
of its code is installed (code approval). The runner's task requests are signed with a secret in the state
folder (mode 0600). The ClientApp learns where the site's settings are from the node config key
`site-config` (absolute path of site.toml), written to a small TOML file so that any path survives quoting.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomli_w

from fedecho._proc import ensure_secret, flower_env, spawn, tail, wait_for
from fedecho.client.config import SiteConfig
from fedecho.storage.files import atomic_write_bytes

# Flower's exit code (logged; the process itself exits 1) when the SuperLink refuses to activate the node,
# e.g. because its public key is not registered.
EXIT_ACTIVATION_REFUSED = 305
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_REFUSED = re.compile(rf"Exit Code: {EXIT_ACTIVATION_REFUSED}\b|Failed to activate SuperNode")


class SuperNodeError(RuntimeError):
    """The SuperNode could not start or was refused by the SuperLink."""


def node_config_file(site: SiteConfig) -> Path:
    """Write <state>/node-config.toml: `site-config` (absolute site.toml path) and `site-name`."""
    path = site.state / "node-config.toml"
    data = {"site-config": str(site.path), "site-name": site.name}
    atomic_write_bytes(path, tomli_w.dumps(data).encode())
    return path


def runtime_secret(site: SiteConfig) -> Path:
    """<state>/runtime.secret (0600, created once): signs the runner's task requests to the SuperNode."""
    return ensure_secret(site.state / "runtime.secret")


def check_site_files(site: SiteConfig) -> None:
    """Fail early, naming the file and the field, when the CA or the key is missing."""
    if site.ca is None:
        raise SuperNodeError(f"{site.path}: [superlink].ca is required (the federation's ca.pem)")
    if site.private_key is None:
        raise SuperNodeError(f"{site.path}: [superlink].private_key is required (from `fedecho certs site`)")
    for key, f in (("ca", site.ca), ("private_key", site.private_key)):
        if not f.is_file():
            raise SuperNodeError(f"{site.path}: [superlink].{key} = {f} does not exist")
    if site.private_key.stat().st_mode & 0o077:
        raise SuperNodeError(f"{site.private_key}: private key readable by others; run `chmod 600 {site.private_key}`")


def supernode_argv(site: SiteConfig, insecure: bool = False) -> list[str]:
    """The flower-supernode command line for this site (TLS + node authentication unless insecure), run through
    `fedecho.client.runtime flower-supernode`: Flower's SuperNode with shorter polling (see `_SuperNodeClock`)."""
    argv = [
        sys.executable, "-m", "fedecho.client.runtime", "flower-supernode", "--",
        "--superlink", site.superlink,
        "--node-config", str(node_config_file(site)),
        "--isolation", "process",
        "--superexec-auth-secret-file", str(runtime_secret(site)),
        "--host", site.supernode_host,
        "--port", str(site.supernode_port),
    ]  # fmt: skip
    if insecure:
        return [*argv, "--insecure"]
    assert site.ca is not None and site.private_key is not None
    return [*argv, "--root-certificates", str(site.ca), "--auth-supernode-private-key", str(site.private_key)]


def supernode_env(site: SiteConfig) -> dict[str, str]:
    """FLWR_HOME in the site's state folder (app bundles install there), telemetry off, threads pinned."""
    return flower_env(site.flwr_home, {"FEDECHO_THREADS": str(site.threads), "OMP_NUM_THREADS": str(site.threads)})


def start_supernode(site: SiteConfig, insecure: bool = False, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start flower-supernode in its own session; output to <state>/logs/supernode.log (or `log`)."""
    if not insecure:
        check_site_files(site)
    site.state.mkdir(parents=True, exist_ok=True)
    site.flwr_home.mkdir(parents=True, exist_ok=True)
    log = log or site.logs / "supernode.log"
    return spawn(node_argv(site, insecure), supernode_env(site), log, cwd=site.state)


def node_argv(site: SiteConfig, insecure: bool = False) -> list[str]:
    """The site's launcher (`python -m fedecho.client.runtime node`): it starts flower-supernode and runs the
    ClientApp runner beside it, all in one process group, and exits with the SuperNode's exit code."""
    return [
        sys.executable, "-m", "fedecho.client.runtime", "node",
        "--runtime-api-address", f"{site.supernode_host}:{site.supernode_port}",
        "--secret-file", str(runtime_secret(site)),
        "--", *supernode_argv(site, insecure),
    ]  # fmt: skip


def node_id_in_log(log: Path) -> int | None:
    """The node id the SuperLink gave this SuperNode, once it has connected (from its log)."""
    match = _NODE_ID.search(tail(log, 400))
    return int(match.group(1)) if match else None


def refused_in_log(log: Path) -> bool:
    """True when the SuperNode's log says the SuperLink refused to activate it (unregistered key)."""
    return bool(_REFUSED.search(tail(log, 400)))


def wait_connected(proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> int:
    """Block until the SuperNode is connected (returns its node id); raise if it exits or times out."""
    wait_for(lambda: proc.poll() is not None or node_id_in_log(log) is not None, timeout, interval=0.3)
    node_id = node_id_in_log(log)
    if node_id is not None:
        return node_id
    if proc.poll() is not None:
        if refused_in_log(log):
            raise SuperNodeError(
                f"the SuperLink refused this SuperNode (Flower exit code {EXIT_ACTIVATION_REFUSED}): is this site's "
                "public key registered at the coordinator (`fedecho server start` registers every *.pub "
                f"in its keys folder)?\n{tail(log)}"
            )
        raise SuperNodeError(f"flower-supernode exited with code {proc.returncode}:\n{tail(log)}")
    raise SuperNodeError(f"flower-supernode did not connect within {timeout:.0f} s (log: {log}):\n{tail(log)}")
