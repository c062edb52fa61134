"""The coordinator's deployment settings (configs/server.toml, table [server]).

One file says where the SuperLink keeps its state, which address the sites dial, where the TLS material
and the sites' public keys are, and the federation-wide settings the ServerApp needs (store, held-out
evaluation data, round timeout, minimum number of sites). Relative paths are taken from the file's folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedecho._proc import StateFolder, is_loopback
from fedecho._toml import ConfigFileError, Table, read_toml
from fedecho.security.certs import CertError, split_host_port

DEFAULT_PORT = 9093
CONNECTION = "fedecho"  # the name of the SuperLink connection in $FLWR_HOME/config.toml


@dataclass(frozen=True)
class ServerConfig(StateFolder):
    """Everything `fedecho server start|run|status` needs; see configs/server.toml for each field."""

    path: Path
    state: Path
    address: str  # what the sites dial: host:port, in the server certificate's SANs
    listen_host: str
    listen_port: int
    control: str  # where fedecho's own `flwr` calls reach the SuperLink (loopback by default)
    certs: Path
    keys: Path
    store: str | None
    eval_data: Path | None
    round_timeout: float
    min_sites: int
    trace_messages: bool = False  # the ServerApp writes every message to STATE/trace/ (fedecho.server.trace)

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
    extra = sorted(set(raw) - {"server"})
    if extra:
        raise ConfigFileError(f"{path}: unknown table(s) {', '.join(extra)} (known: server)")
    t = Table(raw, path, "server")
    host, port = _address(t, "address")
    listen_host, listen_port = _address(t, "listen", _join("0.0.0.0", port))
    wildcard = listen_host in ("0.0.0.0", "::", "")
    default_control = _join("127.0.0.1" if wildcard else listen_host, listen_port)
    control_host, control_port = _address(t, "control", default_control)
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
        trace_messages=t.flag("trace_messages", False),
    )
    t.finish()
    return cfg
