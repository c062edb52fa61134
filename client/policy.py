"""A site's policy: what the coordinator may ask of this hospital, checked at the site before any data is read.

The `[policy]` table of site.toml lists the phases, tasks and models the site takes part in and the most local
steps it trains per round (differential privacy is the `[privacy]` table's: `fedecho.privacy.dp_policy`
enforces DP-SGD, the noise floor and the epsilon budget at training time). The ClientApp builds a `Request`
from each message (the run file's text, the phase and the round's options: nothing from the site's data)
and asks `SitePolicy.check`; a request outside the policy is refused before a single file is opened.

Without a `[policy]` table every phase, task and model is allowed and local steps are unbounded: installing
fedecho does not by itself restrict a site, writing the table does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedecho._toml import Table

PHASES = ("pretrain", "finetune")


@dataclass(frozen=True)
class Request:
    """What one message asks the site to do, from the message alone (never from patient data)."""

    kind: str  # train | evaluate
    phase: str
    model: str
    tasks: tuple[str, ...]  # fine-tuning heads (empty in pre-training)
    steps: int  # fixed local steps per round (0: `epochs` passes over the site's training videos)
    epochs: int
    batch_size: int


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


ALLOW = Decision(True, "within the site's policy")


@dataclass(frozen=True)
class SitePolicy:
    """One site's rules; None or 0 means "no restriction" for that field."""

    phases: tuple[str, ...] = PHASES
    tasks: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    max_local_steps: int = 0

    def check(self, req: Request, train_videos: Callable[[], int] | None = None) -> Decision:
        """Allowed or refused with a reason. train_videos counts the site's training videos; it is called only
        for an epoch-based training request under a step bound (it reads the data index, not the videos)."""
        if req.phase not in self.phases:
            return Decision(False, f"phase {req.phase!r} is not allowed (policy phases: {', '.join(self.phases)})")
        if self.models is not None and req.model not in self.models:
            return Decision(False, f"model {req.model!r} is not allowed (policy models: {', '.join(self.models)})")
        if self.tasks is not None:
            extra = [t for t in req.tasks if t not in self.tasks]
            if extra:
                return Decision(
                    False, f"task(s) {', '.join(extra)} not allowed (policy tasks: {', '.join(self.tasks) or 'none'})"
                )
        if req.kind != "train":
            return ALLOW  # evaluation trains nothing: the step bound is for training
        if self.max_local_steps:
            if req.steps:
                planned, how = req.steps, f"steps = {req.steps}"
            elif train_videos is None:
                return Decision(False, "cannot bound an epoch-based round: the site's video count is unknown")
            else:
                n = train_videos()
                planned = req.epochs * math.ceil(n / max(req.batch_size, 1))
                how = f"{req.epochs} epoch(s) x ceil({n} videos / batch {req.batch_size})"
            if planned > self.max_local_steps:
                return Decision(
                    False, f"{planned} local steps per round ({how}) exceed the site's maximum {self.max_local_steps}"
                )
        return ALLOW

    def describe(self) -> str:
        """One line for logs and `fedecho client start`."""
        parts = [
            f"phases {', '.join(self.phases)}",
            f"tasks {', '.join(self.tasks) if self.tasks is not None else 'any'}",
            f"models {', '.join(self.models) if self.models is not None else 'any'}",
            f"max local steps {self.max_local_steps or 'unbounded'}",
        ]
        return "; ".join(parts)


DEFAULT_POLICY = SitePolicy()


def _names(table: Table, key: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...] | None:
    """A list of names, or None when the field is absent (no restriction)."""
    value = table._get(key, None)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise table.error(key, f"must be a list of names, not {value!r}")
    if allowed is not None:
        bad = [v for v in value if v not in allowed]
        if bad:
            raise table.error(key, f"has unknown value(s) {', '.join(map(repr, bad))} (known: {', '.join(allowed)})")
    return tuple(value)


def parse_policy(raw: dict[str, Any], path: Path) -> SitePolicy:
    """The [policy] table of a site.toml (absent: DEFAULT_POLICY); mistakes name the file and the field."""
    if "policy" not in raw:
        return DEFAULT_POLICY
    t = Table(raw, path, "policy")
    policy = SitePolicy(
        phases=PHASES if (phases := _names(t, "phases", PHASES)) is None else phases,
        tasks=_names(t, "tasks"),
        models=_names(t, "models"),
        max_local_steps=t.integer("max_local_steps", 0, minimum=0),
    )
    t.finish()
    return policy


def request_from(cfg: Any, phase: str, train: bool) -> Request:
    """The Request of a parsed run file (FedRunConfig) for one phase; reads nothing but the message."""
    pcfg = cfg.phase(phase)
    return Request(
        kind="train" if train else "evaluate",
        phase=phase,
        model=cfg.local.model_name,
        tasks=tuple(cfg.phase("finetune").tasks) if phase == "finetune" else (),
        steps=int(pcfg.steps),
        epochs=int(pcfg.epochs),
        batch_size=int(pcfg.batch_size),
    )


def train_video_count(data: Path, labels: str = "", partition: tuple[int, int] | None = None) -> int:
    """Training videos of a site from its data index (file lists, headers): no frame is decoded."""
    from fedecho.data.source import open_source
    from fedecho.train.run import partition_of

    source = open_source(data, **({"labels": labels} if labels else {}))
    records = [r for r in source.scan().records if r.split == "train"]
    if partition is not None:
        records = [r for r in records if partition_of(r, partition[1]) == partition[0]]
    return len(records)


def enforce(site: Any, cfg: Any, phase: str, train: bool) -> str:
    """Check a message against the site's policy before any data access; raise Refused (the ClientApp's
    refusal) on a violation, return the reason it was allowed otherwise."""
    from fedecho.client.app import Refused

    policy = getattr(site, "policy", None) or DEFAULT_POLICY
    partition = getattr(site, "partition", None)
    decision = policy.check(
        request_from(cfg, phase, train), lambda: train_video_count(site.data, site.labels, partition)
    )
    if not decision.allowed:
        raise Refused(f"policy: {decision.reason}")
    return decision.reason


__all__ = [
    "DEFAULT_POLICY",
    "Decision",
    "Request",
    "SitePolicy",
    "enforce",
    "parse_policy",
    "request_from",
    "train_video_count",
]
