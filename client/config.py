"""A hospital site's settings (site.toml): its data, and how its SuperNode reaches the SuperLink.

Read twice: by `fedecho client start` (tables [site], [superlink], [supernode]) to start the SuperNode,
and by the ClientApp, which finds this file through the node config key `site-config` and reads [site]
for the data, cache, state folder, threads and device. Other top-level tables are left to the ClientApp.
Relative paths are taken from the file's folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedecho._proc import StateFolder, is_loopback
from fedecho._toml import Table, read_toml
from fedecho.client.policy import DEFAULT_POLICY, SitePolicy, parse_policy
from fedecho.privacy.dp_policy import DEFAULT_PRIVACY, PrivacyPolicy, parse_privacy
from fedecho.security.certs import CertError, split_host_port

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_SUPERNODE_PORT = 9094


@dataclass(frozen=True)
class SiteConfig(StateFolder):
    """One site; see configs/site.example.toml for each field."""

    path: Path
    name: str
    data: Path  # EchoNet-Dynamic folder or DICOM archive
    labels: Path | None  # DICOM archives: the site's labels CSV (None: next to the data / not needed)
    cache: Path
    state: Path
    threads: int
    device: str
    superlink: str  # host:port of the SuperLink
    ca: Path | None
    private_key: Path | None
    public_key: Path | None
    supernode_host: str
    supernode_port: int
    policy: SitePolicy = DEFAULT_POLICY  # [policy]: what this site agrees to do (fedecho.client.policy)
    privacy: PrivacyPolicy = DEFAULT_PRIVACY  # [privacy]: DP-SGD, budget and delta (fedecho.privacy.dp_policy)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the whole file, for the ClientApp's own tables

    @property
    def superlink_is_loopback(self) -> bool:
        return is_loopback(split_host_port(self.superlink)[0])


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and check a site.toml; mistakes raise ConfigFileError naming the file and the field."""
    path = Path(path).resolve()
    raw = read_toml(path)
    site = Table(raw, path, "site")
    link = Table(raw, path, "superlink", required=False)
    node = Table(raw, path, "supernode", required=False)
    name = site.text("name")
    if not name:
        raise site.error("name", "must not be empty")
    superlink = link.text("address", "127.0.0.1:9093")
    try:
        host, port = split_host_port(superlink)
    except CertError as e:
        raise link.error("address", str(e)) from e
    if not host or port is None:
        raise link.error("address", f"must be HOST:PORT, not {superlink!r}")
    cfg = SiteConfig(
        path=path,
        name=name,
        data=site.location("data"),
        labels=site.optional_location("labels"),
        cache=site.location("cache"),
        state=site.location("state"),
        threads=site.integer("threads", 2, minimum=1),
        device=site.choice("device", DEVICES, "auto"),
        superlink=superlink,
        ca=link.optional_location("ca"),
        private_key=link.optional_location("private_key"),
        public_key=link.optional_location("public_key"),
        supernode_host=node.text("host", "127.0.0.1"),
        supernode_port=node.integer("port", DEFAULT_SUPERNODE_PORT, minimum=1),
        policy=parse_policy(raw, path),
        privacy=parse_privacy(raw, path),
        raw=raw,
    )
    if cfg.supernode_port > 65535:
        raise node.error("port", f"must be at most 65535, not {cfg.supernode_port}")
    for table in (site, link, node):
        table.finish()
    return cfg
