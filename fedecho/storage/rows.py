"""The run store's rows as handed out: plain, frozen values (no session or lazy loading behind them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunRow:
    id: int
    name: str
    mode: str
    status: str
    message: str
    config_toml: str
    flower_run_id: int | None
    created: float
    updated: float


@dataclass(frozen=True)
class PhaseRow:
    run_id: int
    name: str
    rounds: int
    status: str


@dataclass(frozen=True)
class RoundRow:
    run_id: int
    phase: str
    round: int
    started: float
    finished: float
    sites_sampled: int
    sites_replied: int
    train: dict[str, Any]
    evaluate: dict[str, Any]
    server: dict[str, Any]


@dataclass(frozen=True)
class SiteResultRow:
    run_id: int
    phase: str
    round: int
    site: str
    kind: str
    status: str
    metrics: dict[str, Any]
    num_examples: int
    bytes_down: int
    bytes_up: int
    reason: str
    created: float


@dataclass(frozen=True)
class CheckpointRow:
    run_id: int
    phase: str
    round: int
    path: str
    sha256: str
    created: float


@dataclass(frozen=True)
class SiteRow:
    name: str
    public_key_sha256: str | None
    node_id: int | None
    first_seen: float
    last_seen: float


@dataclass(frozen=True)
class EventRow:
    id: int
    run_id: int | None
    site: str | None
    kind: str
    message: str
    created: float


@dataclass(frozen=True)
class AuditRow:
    id: int
    run_id: int
    phase: str
    round: int
    kind: str
    site: str
    node_id: int | None
    status: str  # accepted | rejected | refused | failed
    reason: str
    bytes_down: int
    bytes_up: int
    sha256: str  # of the reply's arrays as received (the site logs the same digest for what it sent)
    created: float


@dataclass(frozen=True)
class AccessRow:
    id: int
    source: str  # the network address the request came from (or "coordinator (loopback)")
    kind: str  # control | runtime | fleet | other (a refused request) | bundle | registration
    request: str  # method and path, the bundle's hash, or the site key
    decision: str  # refused | allowed
    reason: str
    created: float


__all__ = [
    "AccessRow",
    "AuditRow",
    "CheckpointRow",
    "EventRow",
    "PhaseRow",
    "RoundRow",
    "RunRow",
    "SiteResultRow",
    "SiteRow",
]
