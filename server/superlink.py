"""Run the coordinator: the Flower SuperLink, its ServerApp runner and its public front; site registration.

The SuperLink serves the Fleet (sites), Control (`flwr`) and Runtime (ServerApp) APIs on one TLS port, so it
binds a loopback address only (`[server].control`): the network reaches it through the public front
(`fedecho.server.front`, nginx with a Fleet-only allow-list), and Control stays on this machine. It is started
with SuperNode authentication (only registered public keys may join), a persistent database in the state
folder (registrations and run history survive a restart), no runtime dependency installation (the code a run
executes is the installed fedecho package, nothing is downloaded), FLWR_HOME in the state folder, and
`--isolation process`: the ServerApp runs under fedecho's own runner (`fedecho.server.runtime`), which runs
only fedecho's code-less submission. fedecho's own `flwr` calls go through the connection named `fedecho`
in $FLWR_HOME/config.toml, to the loopback address.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedecho._proc import ensure_secret, flower_bin, flower_env, spawn, stop, tail, wait_for
from fedecho.security.certs import CertError, load_site_public_key, split_host_port
from fedecho.server.config import CONNECTION, ServerConfig
from fedecho.server.front import FrontError, front_health, start_front, stop_stale_front
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
    """The flower-superlink command line for this config (TLS + node auth unless insecure), on the loopback
    control address, with ServerApps left to fedecho's runner."""
    host, port = split_host_port(cfg.control)
    argv = [
        flower_bin("flower-superlink"),
        "--database", str(cfg.database),
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
        "--isolation", "process",
        "--superexec-auth-secret-file", str(ensure_secret(cfg.runtime_secret)),
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


def _write_registry(cfg: ServerConfig, registry: dict[str, dict[str, str]]) -> None:
    atomic_write_bytes(_registry_path(cfg), (json.dumps(registry, indent=2) + "\n").encode())


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
    _write_registry(cfg, registry)
    for r in results:
        if r.status == "registered":
            _audit_registration(cfg, r.name, f"registered as node {r.node_id}")
    return results


COORDINATOR = "coordinator (loopback)"  # the source of what fedecho's own commands do on the coordinator machine


def _audit_registration(cfg: ServerConfig, name: str, what: str) -> None:
    from fedecho.storage.store import Store, store_url

    with Store(store_url(cfg.state, cfg.store)) as store:
        store.add_access(COORDINATOR, "registration", f"site {name}", "allowed", what)


def unregister_site(cfg: ServerConfig, name: str) -> str:
    """Remove a site: unregister its node at the SuperLink, move its key out of the keys folder (to
    keys/removed/, so a restart does not register it again) and drop it from the registry. Returns its node id."""
    registry = read_registry(cfg)
    pub = cfg.keys / f"{name}.pub"
    if name not in registry and not pub.is_file():
        known = ", ".join(sorted(registry)) or "none"
        raise SuperLinkError(f"no site {name!r} is registered (registered: {known})")
    node_id = str(registry.get(name, {}).get("node_id", ""))
    if node_id:
        try:
            flwr_json(cfg, "supernode", "unregister", node_id, CONNECTION)
        except SuperLinkError as e:
            if "not found" not in str(e).lower():
                raise
    if pub.is_file():
        removed = cfg.keys / "removed"
        removed.mkdir(exist_ok=True)
        pub.replace(removed / pub.name)
    registry.pop(name, None)
    _write_registry(cfg, registry)
    _audit_registration(cfg, name, f"removed (node {node_id or '?'}); its key moved to {cfg.keys / 'removed'}")
    return node_id


def list_nodes(cfg: ServerConfig) -> list[dict[str, Any]]:
    """`flwr supernode list`: node id, status (registered/online/offline/unregistered) and timestamps."""
    return list(flwr_json(cfg, "supernode", "list", CONNECTION).get("nodes", []))


def list_runs(cfg: ServerConfig) -> list[dict[str, Any]]:
    """`flwr ls`: the SuperLink's runs with status and timing."""
    return list(flwr_json(cfg, "ls", CONNECTION).get("runs", []))


def pid_file(cfg: ServerConfig) -> Path:
    return cfg.state / "superlink.pid"


def runner_argv(cfg: ServerConfig, insecure: bool = False) -> list[str]:
    """The coordinator's ServerApp runner (`fedecho.server.runtime executor`) for this config."""
    argv = [
        sys.executable, "-m", "fedecho.server.runtime", "executor",
        "--runtime-api-address", cfg.control,
        "--secret-file", str(ensure_secret(cfg.runtime_secret)),
        "--server-config", str(cfg.path),
    ]  # fmt: skip
    return argv if insecure else [*argv, "--root-certificates", str(cfg.ca_cert)]


@dataclass
class Coordinator:
    """The coordinator's three processes, started and stopped in order: the SuperLink (loopback), its ServerApp
    runner, and the public front (the only one the network sees). Each logs to <state>/logs/NAME.log."""

    cfg: ServerConfig
    insecure: bool = False
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log(self, name: str) -> Path:
        return self.cfg.logs / f"{name}.log"

    def start(self, timeout: float = 60.0) -> None:
        """Start all three and wait until the SuperLink and the front answer /health; on failure stop what
        started and raise SuperLinkError with the failing process's last log lines."""
        try:
            self.procs["superlink"] = start_superlink(self.cfg, self.insecure, self.log("superlink"))
            wait_ready(self.cfg, self.procs["superlink"], self.insecure, timeout, self.log("superlink"))
            argv = [*runner_argv(self.cfg, self.insecure), "--parent-pid", str(self.procs["superlink"].pid)]
            self.procs["runner"] = spawn(argv, flower_env(self.cfg.flwr_home), self.log("runner"), cwd=self.cfg.state)
            stop_stale_front(self.cfg)
            self.procs["front"] = start_front(self.cfg, self.insecure, self.log("front"))
            front = self.procs["front"]
            ok = wait_for(lambda: front.poll() is not None or front_health(self.cfg, self.insecure), timeout, 0.2)
            if front.poll() is not None or not ok:
                raise SuperLinkError(
                    f"the public front (nginx) on {self.cfg.listen} did not come up:\n{tail(self.log('front'))}"
                )
            if (gone := self.exited()) is not None:
                raise SuperLinkError(f"the coordinator's {gone} exited at start:\n{tail(self.log(gone))}")
        except (SuperLinkError, FrontError, OSError):
            self.stop()
            raise

    def exited(self) -> str | None:
        """The name of a process that has exited (the coordinator is then incomplete), else None."""
        return next((name for name, p in self.procs.items() if p.poll() is not None), None)

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def stop(self) -> int:
        """Front first (no new requests), then the runner, then the SuperLink; returns the SuperLink's code."""
        code = 0
        for name in ("front", "runner", "superlink"):
            proc = self.procs.get(name)
            if proc is not None:
                rc = stop(proc, grace=10 if name != "superlink" else 20)
                code = rc if name == "superlink" else code
        return code
