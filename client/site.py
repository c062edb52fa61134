"""One hospital as the ClientApp sees it, and the checks its policy makes before any video is read.

Light on purpose (no torch): the policy checks run before the model or the data are loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedecho.client.policy import DEFAULT_POLICY, SitePolicy, request_from
from fedecho.fl.protocol import Refused
from fedecho.privacy.dp_policy import DEFAULT_PRIVACY, PrivacyPolicy

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeAlias

    from flwr.app import Context

    from fedecho.data import VideoRecord
    from fedecho.fl.config import FedRunConfig

    # How a ClientApp finds its site: from the SuperNode's node config, or the simulation's table.
    SiteResolver: TypeAlias = Callable[[Context], "Site"]


def train_video_count(data: Path, labels: str = "", partition: tuple[int, int] | None = None) -> int:
    """Training videos of a site from its data index (file lists, headers): no frame is decoded."""
    from fedecho.data.source import open_source
    from fedecho.train.run import partition_of

    source = open_source(data, **({"labels": labels} if labels else {}))
    records = [r for r in source.scan().records if r.split == "train"]
    if partition is not None:
        records = [r for r in records if partition_of(r, partition[1]) == partition[0]]
    return len(records)


@dataclass
class Site:
    """Its name, its data and its private state folder, and what it agreed to (policy, privacy)."""

    name: str
    data: Path
    cache: Path
    state: Path
    labels: str = ""
    device: str | None = None
    devices: int = 1  # data-parallel training over this many devices (`fedecho.train.parallel`)
    partition: tuple[int, int] | None = None  # simulation: the k-th of n virtual hospitals of one dataset
    policy: SitePolicy | None = None  # [policy] of site.toml; None: the default policy (fedecho.client.policy)
    privacy: PrivacyPolicy = DEFAULT_PRIVACY  # [privacy] of site.toml: DP-SGD, budget, delta (fedecho.privacy)

    @property
    def policy_in_force(self) -> SitePolicy:
        return self.policy or DEFAULT_POLICY

    def enforce(self, cfg: FedRunConfig, phase: str, train: bool) -> str:
        """Check a message against the site's policy before any data access; raise Refused on a violation,
        return the reason it was allowed otherwise."""
        decision = self.policy_in_force.check(
            request_from(cfg, phase, train), lambda: train_video_count(self.data, self.labels, self.partition)
        )
        if not decision.allowed:
            raise Refused(f"policy: {decision.reason}")
        return decision.reason

    def enforce_data(self, what: str, records: Sequence[VideoRecord]) -> None:
        """Refuse when the videos behind this round's update or metric (`records`: the data index's
        VideoRecords, nothing decoded) are fewer than the site's policy allows."""
        decision = self.policy_in_force.check_data(what, [r.group for r in records])
        if not decision.allowed:
            raise Refused(f"policy: {decision.reason}")
