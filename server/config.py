"""The coordinator's deployment settings (configs/server.toml, table [server]).

One file says where the SuperLink keeps its state, which address the sites dial, where the TLS material
and the sites' public keys are, and the federation-wide settings the ServerApp needs (store, held-out
evaluation data, round timeout, minimum number of sites). Relative paths are taken from the file's folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedecho._proc import StateFolder, is_loopback
from fedecho._toml import Table, check_sections, read_toml
from fedecho.security.certs import CertError, split_host_port

DEFAULT_PORT = 9093
CONNECTION = "fedecho"  # the name of the SuperLink connection in $FLWR_HOME/config.toml
DEFAULT_MAX_EXAMPLES = 100_000  # examples a site may claim in one reply, unless [server] says otherwise


@dataclass(frozen=True)
class ServerConfig(StateFolder):
    """Everything `fedecho server start|run|status` needs; see configs/server.toml for each field."""

    path: Path
    state: Path
    address: str  # what the sites dial: host:port, in the server certificate's SANs
    listen_host: str
    listen_port: int
    control: str  # the SuperLink's own address: loopback only (Control and Runtime APIs stay on this machine)
    certs: Path
    keys: Path
    store: str | None
    eval_data: Path | None
    round_timeout: float
    min_sites: int  # sites connected before a run's first round starts
    quorum: int = 1  # accepted replies a round needs to count (fewer: the round is retried, then the run pauses)
    site_wait: float = 600.0  # seconds a round waits for enough connected sites
    round_retries: int = 2  # attempts at a round after the first, when too few sites replied
    trace_messages: bool = False  # the ServerApp writes every message to STATE/trace/ (fedecho.server.trace)
    nginx: str = "nginx"  # the public front's executable (fedecho.server.front)
    max_examples: int = DEFAULT_MAX_EXAMPLES  # a site's claimed num-examples per reply: at most this ...
    max_examples_per_site: Mapping[str, int] = field(default_factory=dict)  # ... or its own cap, by site name

    def examples_cap(self, site: str) -> int:
        """The most examples `site` may claim in one reply (FedAvg weights its update by the claim)."""
        return self.max_examples_per_site.get(site, self.max_examples)

    @property
    def ca_cert(self) -> Path:
        return self.certs / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.certs / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.certs / "server.key"

    @property
    def database(self) -> Path:
        """The SuperLink's own state (runs, nodes, messages): persistent, so a restart keeps registrations."""
        return self.state / "superlink.db"

    @property
    def listen(self) -> str:
        """HOST:PORT the public front binds."""
        return _join(self.listen_host, self.listen_port)

    @property
    def listen_local(self) -> str:
        """HOST:PORT at which this machine reaches the front (a wildcard bind answers on loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.listen_host, self.listen_host)
        return _join(host, self.listen_port)

    @property
    def runtime_secret(self) -> Path:
        """Signs the requests of the coordinator's ServerApp runner (fedecho.server.runtime) to the SuperLink."""
        return self.state / "runtime.secret"

    @property
    def loopback_only(self) -> bool:
        """True when nothing outside this machine can reach the SuperLink (the only case --insecure is allowed)."""
        return is_loopback(self.listen_host) and is_loopback(split_host_port(self.address)[0])


def _address(table: Table, key: str, default: str | None = None) -> tuple[str, int]:
    raw = table.text(key) if default is None else table.text(key, default)
    try:
        host, port = split_host_port(raw)
    except CertError as e:
        raise table.error(key, str(e)) from e
    if not host:
        raise table.error(key, f"has no host: {raw!r}")
    return host, port or DEFAULT_PORT


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_server_config(path: str | Path) -> ServerConfig:
    """Read and check configs/server.toml; a mistake raises ConfigFileError naming the file and field."""
    path = Path(path).resolve()
    raw = read_toml(path)
    check_sections(raw, path, {"server"})
    t = Table(raw, path, "server")
    host, port = _address(t, "address")
    listen_host, listen_port = _address(t, "listen", _join("0.0.0.0", port))
    # the SuperLink's own port: by default 100 above the front's (the ports just above are the sites' habit)
    default_control = listen_port + 100 if listen_port <= 65435 else listen_port - 100
    control_host, control_port = _address(t, "control", _join("127.0.0.1", default_control))
    if not is_loopback(control_host):
        raise t.error(
            "control",
            f"must be a loopback address (127.0.0.1, ::1, localhost), not {control_host!r}: the SuperLink's Control "
            "and Runtime APIs have no access control, so only the public front may face the network",
        )
    if control_port == listen_port and (control_host == listen_host or listen_host in ("0.0.0.0", "::", "")):
        raise t.error("control", f"port {control_port} is the public front's ([server].listen): choose another")
    store = t.text("store", "")
    cfg = ServerConfig(
        path=path,
        state=t.location("state", "state"),
        address=_join(host, port),
        listen_host=listen_host,
        listen_port=listen_port,
        control=_join(control_host, control_port),
        certs=t.location("certs", "certs"),
        keys=t.location("keys", "keys"),
        store=store or None,
        eval_data=t.optional_location("eval_data"),
        round_timeout=t.number("round_timeout", 3600.0, positive=True),
        min_sites=t.integer("min_sites", 2, minimum=1),
        quorum=t.integer("quorum", 1, minimum=1),
        site_wait=t.number("site_wait", 600.0, positive=True),
        round_retries=t.integer("round_retries", 2, minimum=0),
        trace_messages=t.flag("trace_messages", False),
        nginx=t.text("nginx", "nginx"),
        max_examples=t.integer("max_examples", DEFAULT_MAX_EXAMPLES, minimum=1),
        max_examples_per_site=t.integers("max_examples_per_site", minimum=1),
    )
    t.finish()
    if cfg.quorum > cfg.min_sites:
        raise t.error("quorum", f"({cfg.quorum}) must not exceed min_sites ({cfg.min_sites}): rounds could never count")
    return cfg
