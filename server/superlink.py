"""Run the coordinator's Flower SuperLink: argv and environment, start, readiness, site registration, stop.

The SuperLink serves the Fleet (sites), Control (`flwr`) and Runtime (ServerApp) APIs on one TLS port. It is
started with SuperNode authentication (only registered public keys may join), a persistent database in the
state folder (registrations and run history survive a restart), no runtime dependency installation (the
code a run executes is the installed fedecho package, nothing is downloaded), and FLWR_HOME in the state
folder. fedecho's own `flwr` calls go through the connection named `fedecho` in $FLWR_HOME/config.toml.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedecho._proc import flower_bin, flower_env, spawn, tail, wait_for
from fedecho.security.certs import CertError, load_site_public_key
from fedecho.server.config import CONNECTION, ServerConfig
from fedecho.storage.files import atomic_write_bytes


class SuperLinkError(RuntimeError):
    """The SuperLink did not start, or a control call to it failed."""


@dataclass(frozen=True)
class SiteRegistration:
    """One site's public key as the SuperLink knows it."""

    name: str
    public_key: Path
    node_id: str
    status: str  # "registered" (new now), "already registered", or an error message


def superlink_argv(cfg: ServerConfig, insecure: bool = False) -> list[str]:
    """The flower-superlink command line for this config (TLS + node auth unless insecure)."""
    argv = [
        flower_bin("flower-superlink"),
        "--database", str(cfg.database),
        "--disable-runtime-dependency-installation",
        "--host", cfg.listen_host,
        "--port", str(cfg.listen_port),
    ]  # fmt: skip
    if insecure:
        return [*argv, "--insecure"]
    return [
        *argv,
        "--ssl-ca-certfile", str(cfg.ca_cert),
        "--ssl-certfile", str(cfg.server_cert),
        "--ssl-keyfile", str(cfg.server_key),
        "--enable-supernode-auth",
    ]  # fmt: skip


def superlink_env(cfg: ServerConfig) -> dict[str, str]:
    return flower_env(cfg.flwr_home)


def write_connection(cfg: ServerConfig, insecure: bool = False) -> Path:
    """Write $FLWR_HOME/config.toml with the `fedecho` connection (the default), for `flwr run|ls|supernode`."""
    conn: dict[str, Any] = {"address": cfg.control}
    if insecure:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(cfg.ca_cert)
    data = {"superlink": {"default": CONNECTION, CONNECTION: conn}}
    path = cfg.flwr_home / "config.toml"
    atomic_write_bytes(path, tomli_w.dumps(data).encode())
    return path


def check_tls_files(cfg: ServerConfig) -> None:
    """Fail early, naming the file, if the TLS material is missing (before Flower's own terser error)."""
    for f in (cfg.ca_cert, cfg.server_cert, cfg.server_key):
        if not f.is_file():
            raise SuperLinkError(f"{f} not found: create it with `fedecho certs init {cfg.certs} --server-address ...`")


def start_superlink(cfg: ServerConfig, insecure: bool = False, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start flower-superlink in its own session; its output goes to <state>/logs/superlink.log."""
    if not insecure:
        check_tls_files(cfg)
    cfg.state.mkdir(parents=True, exist_ok=True)
    cfg.flwr_home.mkdir(parents=True, exist_ok=True)
    write_connection(cfg, insecure)
    return spawn(superlink_argv(cfg, insecure), superlink_env(cfg), log or cfg.logs / "superlink.log", cwd=cfg.state)


def health(cfg: ServerConfig, insecure: bool = False, timeout: float = 2.0) -> bool:
    """True when the SuperLink answers GET /health on its control address (over TLS checked against our CA)."""
    scheme = "http" if insecure else "https"
    try:
        context = None if insecure else ssl.create_default_context(cafile=str(cfg.ca_cert))
        with urllib.request.urlopen(f"{scheme}://{cfg.control}/health", timeout=timeout, context=context) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def wait_ready(
    cfg: ServerConfig,
    proc: subprocess.Popen[bytes],
    insecure: bool = False,
    timeout: float = 60.0,
    log: Path | None = None,
) -> None:
    """Block until the SuperLink is healthy; raise with its last log lines if it exits or times out."""
    log = log or cfg.logs / "superlink.log"
    ok = wait_for(lambda: proc.poll() is not None or health(cfg, insecure), timeout, interval=0.3)
    if proc.poll() is not None:
        raise SuperLinkError(f"flower-superlink exited with code {proc.returncode}:\n{tail(log)}")
    if not ok:
        raise SuperLinkError(f"flower-superlink not ready after {timeout:.0f} s (log: {log}):\n{tail(log)}")


def flwr(cfg: ServerConfig, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run the `flwr` CLI against this SuperLink (FLWR_HOME in the state folder)."""
    return subprocess.run(
        [flower_bin("flwr"), *args], env=flower_env(cfg.flwr_home), cwd=cfg.state, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def flwr_json(cfg: ServerConfig, *args: str) -> dict[str, Any]:
    """A `flwr ... --format json` call; raise SuperLinkError with Flower's message on failure."""
    res = flwr(cfg, *args, "--format", "json")
    start = res.stdout.find("{")
    try:
        data = json.loads(res.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        data = {}
    if res.returncode != 0 or not data.get("success", False):
        message = data.get("error-message") or (res.stderr or res.stdout).strip()
        raise SuperLinkError(f"flwr {' '.join(args)}: {message}")
    return data


def _registry_path(cfg: ServerConfig) -> Path:
    return cfg.state / "sites.json"


def read_registry(cfg: ServerConfig) -> dict[str, dict[str, str]]:
    """Site name -> {node_id, public_key}: which Flower node id each site's key was given."""
    try:
        data = json.loads(_registry_path(cfg).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def site_public_keys(cfg: ServerConfig) -> list[Path]:
    """The sites' public keys: every *.pub in the keys folder (site name = file stem)."""
    return sorted(cfg.keys.glob("*.pub")) if cfg.keys.is_dir() else []


def register_sites(cfg: ServerConfig) -> list[SiteRegistration]:
    """Register each site's public key with the SuperLink (idempotent: a known key is reported, not an error)."""
    registry = read_registry(cfg)
    results: list[SiteRegistration] = []
    for pub in site_public_keys(cfg):
        name, text = pub.stem, pub.read_text().strip()
        try:
            load_site_public_key(pub)
        except CertError as e:
            results.append(SiteRegistration(name, pub, "", f"skipped: {e}"))
            continue
        try:
            data = flwr_json(cfg, "supernode", "register", str(pub), CONNECTION, "--name", name)
            node_id, status = str(data.get("node-id", "")), "registered"
        except SuperLinkError as e:
            if "already in use" not in str(e):
                results.append(SiteRegistration(name, pub, "", f"failed: {e}"))
                continue
            known = registry.get(name, {})
            node_id = known.get("node_id", "") if known.get("public_key") == text else ""
            status = "already registered"
        registry[name] = {"node_id": node_id or registry.get(name, {}).get("node_id", ""), "public_key": text}
        results.append(SiteRegistration(name, pub, node_id, status))
    atomic_write_bytes(_registry_path(cfg), (json.dumps(registry, indent=2) + "\n").encode())
    return results


def list_nodes(cfg: ServerConfig) -> list[dict[str, Any]]:
    """`flwr supernode list`: node id, status (registered/online/offline/unregistered) and timestamps."""
    return list(flwr_json(cfg, "supernode", "list", CONNECTION).get("nodes", []))


def list_runs(cfg: ServerConfig) -> list[dict[str, Any]]:
    """`flwr ls`: the SuperLink's runs with status and timing."""
    return list(flwr_json(cfg, "ls", CONNECTION).get("runs", []))


def pid_file(cfg: ServerConfig) -> Path:
    return cfg.state / "superlink.pid"
