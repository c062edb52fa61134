"""Which site a reply comes from: the coordinator's answer, not the reply's.

A reply names its site (`info.site`), but a site writes its own replies, so that name proves nothing. What
Flower does prove is the node: with node authentication, a SuperNode signs its requests with the site's private
key, the SuperLink maps that key to the node id the coordinator registered for it, and a reply is stored only as
the answer of the node its message was sent to. `fedecho server start` writes `<state>/sites.json` (site name ->
node id and public key, `fedecho.server.superlink.read_registry`) when it registers the sites' keys, so
`RegistryNames` names each reply's site from the node id, and rejects a reply whose own name differs.

Without a registry the reply's own name is the only one there is (`SiteNames`): in `--insecure` development
deployments on loopback (no keys, so no registry) and in the Ray simulation, whose virtual sites are one
researcher's own processes and whose node ids are drawn at random inside Flower.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Identity:
    """The name a reply is recorded under, and why its content must be rejected ("" when it need not be)."""

    name: str
    problem: str = ""


@dataclass
class SiteNames:
    """The reply's own name, for federations without a registry (see the module's docstring). The last name a
    node gave is kept, so that a later timeout of that node is recorded under it."""

    seen: dict[int, str] = field(default_factory=dict)

    @property
    def trusted(self) -> bool:
        """True when names come from the coordinator's registry rather than from the replies."""
        return False

    def identify(self, node_id: int, claimed: str) -> Identity:
        """The site of a reply from `node_id` whose content names `claimed` ("" when it names none)."""
        if claimed:
            self.seen[node_id] = claimed
        return Identity(self.seen.get(node_id, f"node-{node_id}"))


@dataclass
class RegistryNames(SiteNames):
    """Names from the coordinator's registry `<state>/sites.json` ({name: {"node_id": "...", ...}}).

    The file is read again whenever a node id it does not hold replies, since a site may be registered while a
    run goes on. While the registry is empty or missing, or the SuperLink runs with `--insecure` (its pid file
    says so; node ids are then unauthenticated and unrelated to any registration), the reply's name is used.
    """

    state: Path = Path(".")
    by_node: dict[int, str] = field(default_factory=dict)
    unbound: list[str] = field(default_factory=list)  # registered sites whose node id the registry lacks

    @property
    def registry(self) -> Path:
        return self.state / "sites.json"

    @property
    def trusted(self) -> bool:
        return bool(self.by_node) and not self._insecure()

    def load(self) -> dict[int, str]:
        """node id -> site name; entries without a usable node id are left out (they name no node yet)."""
        try:
            data = json.loads(self.registry.read_text())
        except (OSError, ValueError):
            return {}
        out: dict[int, str] = {}
        self.unbound = []
        if isinstance(data, dict):
            for name, entry in data.items():
                node = entry.get("node_id", "") if isinstance(entry, dict) else ""
                if str(node).strip().isdigit():
                    out[int(str(node).strip())] = str(name)
                else:
                    self.unbound.append(str(name))
        return out

    def _insecure(self) -> bool:
        try:
            info = json.loads((self.state / "superlink.pid").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(info, dict) and info.get("insecure") is True

    def identify(self, node_id: int, claimed: str) -> Identity:
        if node_id not in self.by_node:
            self.by_node = self.load()
        if not self.trusted:
            return super().identify(node_id, claimed)
        name = self.by_node.get(node_id)
        if name is None:
            lacking = f" ({self.registry} has no node id for {', '.join(sorted(self.unbound))})" if self.unbound else ""
            return Identity(f"node-{node_id}", f"node {node_id} is not a registered site{lacking}")
        if claimed and claimed != name:
            return Identity(name, f"node {node_id} is registered as site {name!r}; its reply names {claimed!r}")
        return Identity(name)
